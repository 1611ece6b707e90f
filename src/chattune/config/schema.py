"""Typed run configuration: YAML values -> frozen dataclasses, one per pipeline stage.

`load_config(path, overrides)` reads a YAML file, applies `section.key=value` overrides from the CLI,
and checks every key and type. A mistake raises `ConfigError` naming the file and the key. Each
stage receives only its own section; the resolved config is saved with every run and adapter.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from chattune.errors import ConfigError

MetricName = Literal[
    "bleu4", "rouge1", "rouge2", "rougeL",
    "bleu4_char", "rouge1_char", "rouge2_char", "rougeL_char",
    "accuracy", "macro_f1",
]  # fmt: skip


GENERATION_METRICS = ["bleu4", "rouge1", "rouge2", "rougeL"]


CHAR_METRICS = ["bleu4_char", "rouge1_char", "rouge2_char", "rougeL_char"]


CLASSIFICATION_METRICS = ["accuracy", "macro_f1"]


METRIC_NAMES = GENERATION_METRICS + CHAR_METRICS + CLASSIFICATION_METRICS


TASKS = ("generation", "classification")


@dataclass(frozen=True)
class ModelConfig:
    name_or_path: str = "builtin:tiny-qwen2"
    """A local model directory, a Hugging Face Hub id, a ModelScope id, or `builtin:tiny-qwen2`."""
    source: Literal["auto", "local", "huggingface", "modelscope"] = "auto"
    """Where a non-local id is fetched from; `auto` means Hugging Face Hub for ids, local for paths."""
    revision: str | None = None
    """A branch, tag or commit of the hub repository (`None`: the default branch)."""
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    """`auto`: bf16 on GPUs that support it, fp32 on CPU."""
    trust_remote_code: bool = False
    """Run code shipped with the model (needed by some models, e.g. older ERNIE releases). Off unless set."""
    attn_implementation: str = "auto"
    """`auto` picks the fastest correct kernel for the device and packing; or `sdpa`, `eager`, `flash_attention_2`."""
    chat_template: str | None = None
    """A named template shipped with chattune (`ernie-4.5`, `chatml`) or a path to a Jinja file, for models
    whose tokenizer has none or a wrong one. Default: the tokenizer's own."""
    quantization: Literal["none", "nf4", "int8"] = "none"
    """QLoRA: load the frozen base weights in 4-bit NF4 (double-quantized, bf16 compute) or 8-bit through
    bitsandbytes (`pip install 'chattune[qlora]'`, CUDA only); LoRA trains in full precision on top and is
    saved as an ordinary adapter for the unquantized base. Qwen2.5-7B then fits in about 10 GiB."""


Converter = Literal["news_cls", "disc_law", "huanhuan", "identity"]


@dataclass(frozen=True)
class ColumnsConfig:
    """Where the standard fields live in the user's records (LLaMA-Factory's `columns`): with
    `data.columns.prompt: question` the instruction is read from a `question` column. Unset: standard name.
    The alpaca field names are accepted as keys too (`data.columns.instruction: question`)."""

    KEY_ALIASES: ClassVar[dict[str, str]] = {"instruction": "prompt", "input": "query", "output": "response"}
    """Not a key: the alpaca field names a user may write instead of prompt / query / response."""

    prompt: str | None = None
    """Column holding the instruction (alpaca `instruction`)."""
    query: str | None = None
    """Column holding the extra input appended to the instruction (alpaca `input`)."""
    response: str | None = None
    """Column holding the answer (alpaca `output`)."""
    system: str | None = None
    """Column holding a per-record system prompt (`system`)."""
    history: str | None = None
    """Column holding earlier [question, answer] pairs (alpaca `history`)."""
    messages: str | None = None
    """Column holding the list of turns (`messages`; ShareGPT `conversations`)."""
    role: str | None = None
    """Key of a turn's speaker inside that list (`role`; ShareGPT `from`)."""
    content: str | None = None
    """Key of a turn's text inside that list (`content`; ShareGPT `value`)."""


@dataclass(frozen=True)
class DataConfig:
    train_path: str | list[str] = ""
    """Training data, one source or a list mixed in one run. A source is a .json (array) / .jsonl / .csv /
    .parquet file of alpaca {instruction, input, output[, system, history]}, {messages: [...]} or ShareGPT
    {conversations: [...]} records, a directory written by `datasets.save_to_disk`, or a dataset id on the
    Hugging Face Hub (`hf:owner/name` or `owner/name`) or ModelScope (`ms:owner/name`)."""
    train_samples: list[int | None] | None = None
    """Records drawn from each `train_path` source, in order (seeded): N samples N records (more than the
    source holds repeats it), null takes all. Unset: every record of every source."""
    eval_path: str | list[str] | None = None
    """Held-out data (same kinds of source); when unset, `eval_ratio` of the training data is split off."""
    eval_ratio: float = 0.0
    """Fraction of the training conversations held out for evaluation (deterministic from `train.seed`)."""
    format: Literal["auto", "alpaca", "messages", "sharegpt"] = "auto"
    """Record shape; `auto` tells it per record from its fields."""
    columns: ColumnsConfig = field(default_factory=ColumnsConfig)
    """Column names of the standard fields, for records that name them differently."""
    converter: Converter | list[Converter | None] | None = None
    """Convert a tutorial's raw records first (one for all sources, or a list aligned with `train_path`):
    `news_cls` {text, category, output}, `disc_law` {input, output}, `huanhuan` {instruction, input, output}
    (with their fixed system prompts), `identity` (LLaMA-Factory identity.json: fills {{name}}/{{author}})."""
    eval_converter: Converter | None = None
    """Converter for the `eval_path` sources. Default: `converter` when it is one for all sources (or a list
    aligned with `eval_path`); needed when `converter` is a list for mixed training sources."""
    identity_name: str | None = None
    """The assistant's name put in place of `{{name}}` by the `identity` converter."""
    identity_author: str | None = None
    """The author put in place of `{{author}}` by the `identity` converter."""
    system_prompt: str | None = None
    """System prompt put first in every conversation that has none (the tutorials use a fixed one)."""
    max_len: int = 384
    """Tokens per example after rendering; longer examples follow `truncation`."""
    truncation: Literal["keep_end", "cut_prompt", "drop"] = "keep_end"
    """`keep_end`: cut the answer but keep its end-of-turn token labeled; `cut_prompt`: drop the oldest
    turns, then cut the last question from the left, keeping the system prompt (an answer too long on its
    own keeps its question's end and is cut as by `keep_end`); `drop`: drop the example.
    Every mode keeps an example only with at least one answer token besides the end-of-turn token (an
    answer cut to its stop token alone would teach the model to answer nothing); the rest is dropped and
    counted with the reason, never trained all-masked."""
    train_on: Literal["all_assistant", "last_assistant"] = "all_assistant"
    """Which assistant turns of a multi-turn conversation are trained (labeled)."""
    max_samples: int | None = None
    """Read only the first N rows of each training source (before sampling and splitting)."""
    on_bad_row: Literal["error", "skip"] = "error"
    """`error`: the first bad row stops the run naming file and line; `skip`: skip and report counts."""
    dedup: bool = False
    """Drop conversations identical to an earlier one (they are counted either way)."""
    cache: bool = True
    """Cache tokenised examples under $CHATTUNE_CACHE/tokenized, keyed by tokenizer, template, `max_len`,
    options and data, so that a second run starts at once."""
    template_kwargs: dict = field(default_factory=dict)
    """Arguments passed to the chat template in every rendering (training labels, pre-flight, sample answers,
    chat, predict, eval, serve) and recorded in the adapter's inference.json, e.g. `{enable_thinking: false}`
    for Qwen3. Names are strings, values scalars (true/false, numbers, strings)."""

    def __post_init__(self) -> None:
        # Checks between keys of this section; types were checked when the values were read.
        for name, value in self.template_kwargs.items():
            if not isinstance(name, str) or not (value is None or isinstance(value, (bool, int, float, str))):
                raise ConfigError(
                    f"data.template_kwargs.{name}", f"expected a true/false, number or string, got {value!r}"
                )
        sources = self.train_path if isinstance(self.train_path, list) else [self.train_path]
        if isinstance(self.train_path, list) and (not sources or not all(sources)):
            raise ConfigError(
                "data.train_path", "a list of sources must be non-empty and hold no empty entry"
            )
        for key, value in [("data.train_samples", self.train_samples), ("data.converter", self.converter)]:
            if isinstance(value, list) and len(value) != len(sources):
                raise ConfigError(key, f"has {len(value)} entries but data.train_path has {len(sources)}")
        if any(n is not None and n <= 0 for n in self.train_samples or []):
            raise ConfigError("data.train_samples", "each entry must be a positive number of records or null")
        converters = self.converter if isinstance(self.converter, list) else [self.converter]
        if self.eval_path and self.eval_converter is None and isinstance(self.converter, list):
            n_eval = len(self.eval_path) if isinstance(self.eval_path, list) else 1
            if len(set(self.converter)) > 1 and n_eval != len(self.converter):
                raise ConfigError(
                    "data.eval_converter",
                    f"data.converter is a list for the {len(sources)} training sources, so the converter of "
                    f"the {n_eval} data.eval_path source(s) is unknown: set data.eval_converter (e.g. "
                    f"{next(c for c in self.converter if c)}) or null for records that need none",
                )
        if "identity" in converters + [self.eval_converter]:
            for key in ("identity_name", "identity_author"):
                if not getattr(self, key):
                    raise ConfigError(f"data.{key}", "must be set: the identity converter fills it in")


# `lora.init` values: peft's `init_lora_weights` that need nothing but the weights (eva, corda and loftq
# need data or extra configs that chattune does not pass). pissa and olora move part of the base weights
# into the adapter; the saved adapter is converted back to a plain LoRA for the original base.
LORA_INITS = ("default", "gaussian", "pissa", "olora", "orthogonal")


MUTATING_INITS = ("pissa", "olora")


@dataclass(frozen=True)
class LoraConfig:
    enabled: bool = True
    """false: full fine-tuning; every parameter trains (fp32 master weights) and the run writes a complete
    model directory `<output_dir>/model` instead of `<output_dir>/adapter`. The other `lora.*` keys are unused."""
    r: int = 8
    """LoRA rank: the inner dimension of each update B @ A (trainable parameters grow linearly with it)."""
    alpha: int = 32
    """LoRA alpha: the update is scaled by alpha / r (alpha / sqrt(r) with `use_rslora`)."""
    dropout: float = 0.1
    """Dropout on the LoRA branch's input during training (0 turns it off)."""
    target_modules: list[str] | str = "all-linear"
    """Module names (the tutorials: q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj) or `all-linear`."""
    use_dora: bool = False
    """DoRA (peft `use_dora`): a trained magnitude per output feature on top of the LoRA direction; logits are
    unchanged at init. Slower per step than LoRA."""
    use_rslora: bool = False
    """rsLoRA (peft `use_rslora`): scale the update by alpha / sqrt(r) instead of alpha / r (stable at high r)."""
    init: str = "default"
    """peft's `init_lora_weights`: `default` (B = 0, logits unchanged), `gaussian`, `pissa` (principal singular
    vectors: base - A B is kept as residual, logits unchanged), `pissa_niter_N` (fast randomized SVD, N
    iterations), `olora` (QR), `orthogonal`."""
    loraplus_lr_ratio: float | None = None
    """LoRA+ (peft `create_loraplus_optimizer`): B's learning rate is this many times `train.lr` (A's);
    the paper uses 16. Unset: one learning rate."""
    layers_to_transform: list[int] | None = None
    """Only these decoder layers (0-based) get LoRA (peft `layers_to_transform`); unset: every layer. The
    backward pass stops at the lowest one, so the top layers alone train in a fraction of the time (the
    demo's CPU recipe)."""
    modules_to_save: list[str] = field(default_factory=list)
    """Modules trained whole and saved in the adapter, e.g. [lm_head] or [embed_tokens, lm_head] (new
    tokens). With tied embeddings each trains its own copy, and `merge` saves them untied."""

    def __post_init__(self) -> None:
        base, _, niter = self.init.partition("_niter_")
        if base not in LORA_INITS or (niter and (base != "pissa" or not niter.isdigit() or int(niter) < 1)):
            raise ConfigError(
                "lora.init",
                f"got {self.init!r}; use one of {', '.join(LORA_INITS)} or pissa_niter_N (N >= 1); "
                "eva, corda and loftq need data or settings that chattune does not pass",
            )
        if self.layers_to_transform is not None and (
            not self.layers_to_transform or any(i < 0 for i in self.layers_to_transform)
        ):
            raise ConfigError(
                "lora.layers_to_transform",
                f"must be a non-empty list of layer indices >= 0 (or unset for every layer), got {self.layers_to_transform}",
            )
        if self.loraplus_lr_ratio is not None and self.loraplus_lr_ratio < 1.0:
            raise ConfigError(
                "lora.loraplus_lr_ratio",
                f"must be >= 1 (B learns faster than A), got {self.loraplus_lr_ratio}",
            )
        if base in MUTATING_INITS and (self.use_dora or self.modules_to_save):
            key = "lora.use_dora" if self.use_dora else "lora.modules_to_save"
            raise ConfigError(
                key,
                f"cannot be combined with lora.init: {self.init}: the trained adapter is converted to a plain "
                "LoRA for the original base at save, and that conversion keeps only the lora_A/lora_B weights",
            )


@dataclass(frozen=True)
class TrainConfig:
    output_dir: str = "runs/run"
    """The run directory: adapter, checkpoints, metrics.jsonl, predictions.jsonl, report.html. Must be new or
    empty unless `--resume`."""
    micro_batch_size: int = 4
    """Examples per forward/backward pass (without `packing`); with `packing`, `pack_tokens` sets its size."""
    grad_accum_steps: int = 4
    """Micro-batches whose gradients add up to one optimizer step (the effective batch is their product)."""
    epochs: float = 2.0
    """Passes over the training data; a fraction stops part-way (`max_steps` overrides it)."""
    max_steps: int | None = None
    """Optimizer steps; overrides `epochs` when set."""
    lr: float = 1e-4
    """Peak learning rate of AdamW, reached after the warm-up."""
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """How the learning rate decays from its peak to 0 (cosine, linear) or stays (constant) after the warm-up."""
    warmup_ratio: float = 0.0
    """Fraction of the optimizer steps over which the learning rate rises linearly from 0 to `lr`."""
    weight_decay: float = 0.0
    """AdamW's decoupled weight decay on the trainable parameters."""
    max_grad_norm: float = 1.0
    """Gradients are clipped to this global L2 norm before each optimizer step."""
    logging_steps: int = 10
    """Log `train/loss`, `train/lr`, `train/grad_norm` and `train/tokens_per_s` every N optimizer steps."""
    save_steps: int | None = None
    """Save a checkpoint (adapter + optimizer state, for `--resume`) every N optimizer steps before the
    last; the last step writes the run's adapter instead."""
    eval_steps: int | None = None
    """Evaluate every N optimizer steps in addition to the end of each epoch."""
    seed: int = 42
    """Seeds the split, the sampling of records, the batch order, LoRA's init and dropout: same seed, same run."""
    checkpointing: Literal["auto", "on", "off"] = "auto"
    """Activation checkpointing: `auto` turns it on only when memory is short (never on CPU), and with
    `offload`."""
    offload: bool = False
    """Memory mode (CUDA, one process): AdamW's state and the input embedding table (untied models) live in
    host memory and checkpointing is on unless set `off`; Qwen2.5-7B LoRA r 64 then trains in under 16 GiB
    (with `pack_tokens` 2048-4096). Slower: see bench/RESULTS.md."""
    packing: bool = False
    """Pack examples into rows of `pack_tokens` tokens (documents never attend to each other)."""
    pack_tokens: int = 4096
    """Tokens per packed micro-batch (with `packing`); the GPU's matrix units want thousands."""
    compile: Literal["auto", "on", "off"] = "auto"
    """`torch.compile` each decoder layer (regional compilation). `auto`: on CUDA for packed batches (padded
    batches change shape every step and would keep recompiling). With checkpointing, the compiler does the
    recomputation (activation memory budget 0) instead of transformers' checkpoint wrapper."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """`auto`: CUDA when a GPU is visible, else the CPU."""
    precision: Literal["bf16", "fp8"] = "bf16"
    """The base matmuls of a LoRA run. `bf16`: as the model's dtype. `fp8`: the frozen base weights of the
    decoder layers' linears quantized once to float8 e4m3 (per-row scales), activations and incoming
    gradients per token row, on Hopper's FP8 tensor cores (`chattune.model.fp8`); LoRA A/B, norms,
    attention, the LM head and the loss unchanged, and the adapter is an ordinary one. Needs a CUDA GPU of
    compute capability 9.0+ (checked before anything loads); not with full fine-tuning, QLoRA, DoRA or
    FSDP. Not yet equal to bf16: on the legal 7B job (one H100) it trained 1.33x faster and its final eval
    loss was 4 % higher (bench/RESULTS.md, issue 28)."""
    progress: bool = True
    """Show a progress bar on an interactive terminal (log lines are written either way)."""
    distributed: Literal["ddp", "fsdp"] = "ddp"
    """With several processes (`torchrun`, `accelerate launch`, `chattune train --gpus N`): `ddp` keeps a whole
    copy of the model in each and sums the LoRA gradients; `fsdp` shards the base weights over them (FSDP2),
    for a model too large for one GPU. Either way an optimizer step's `grad_accum_steps` micro-batches are
    shared out among the processes, so the global batch is the one-device batch. One process: ignored."""
    fsdp_reshard_after_forward: Literal["auto", "on", "off"] = "auto"
    """With `distributed: fsdp`: `on` frees each layer's gathered weights after its forward and gathers them
    again for its backward (least memory); `off` keeps them until the backward (one all-gather per layer per
    micro-batch instead of two; the whole model's weights are held at the end of the forward). `auto`: `off`
    when the model's weights take at most a quarter of the GPU's memory."""


@dataclass(frozen=True)
class BenchmarkConfig:
    """One multiple-choice benchmark scored before training, at the end, and after every epoch with
    `per_epoch` (`chattune bench` scores the same way; the README says where to get the files)."""

    task: Literal["ceval", "cmmlu", "mmlu", "mcq"] = "mcq"
    """The file layout: C-Eval, CMMLU or MMLU as published, or `mcq` (JSONL of question, choices, answer)."""
    data: str = ""
    """The benchmark's folder (holding val/ dev/ test/ or data/), or the `mcq` .jsonl file."""
    subjects: list[str] = field(default_factory=list)
    """Subjects (file names without the split suffix) to score; empty: every subject of the split."""
    max_questions: int | None = None
    """The first N questions of each subject (null: all)."""
    shots: int = 0
    """Dev-split examples put before each question (k-shot)."""
    split: str | None = None
    """The split scored; default C-Eval val, CMMLU test, MMLU test (C-Eval's test has no answers)."""
    dev: str | None = None
    """For `mcq` with `shots`: the JSONL file the examples come from."""
    scoring: Literal["letter", "choice"] = "letter"
    """`letter`: log-likelihood of each choice's letter (the benchmarks' standard); `choice`: of each
    choice's text per character (the cloze form, which models below ~1B answer better than chance)."""
    name: str | None = None
    """The metric's name, `bench/<name>/accuracy`; default: `task` (two entries need distinct names)."""
    per_epoch: bool = False
    """Also score after every epoch, not only before training and at the end."""

    def __post_init__(self):
        if not self.data:
            raise ConfigError("data", "the benchmark's folder or .jsonl file is required")
        if self.shots < 0:
            raise ConfigError("shots", f"must be 0 or more, got {self.shots}")
        if self.max_questions is not None and self.max_questions < 1:
            raise ConfigError(
                "max_questions", f"must be at least 1 (or null for all), got {self.max_questions}"
            )


@dataclass(frozen=True)
class EvalConfig:
    samples: int = 4
    """Held-out prompts answered before training and after every epoch (0 to turn off)."""
    samples_path: str | None = None
    """A data file whose first `samples` records are the sample prompts; default: the eval split's first."""
    max_new_tokens: int = 64
    """Bound on each sample answer (greedy decoding)."""
    batch_size: int = 8
    """Rows per batch for eval loss and for generating the samples."""
    loss: bool = True
    """Compute the eval loss on the eval split at each evaluation."""
    max_eval_examples: int | None = 200
    """Eval-loss examples used from the eval split (null: all)."""
    metrics: list[MetricName] = field(default_factory=list)
    """Metric names (bleu4, rouge1, rouge2, rougeL, *_char, accuracy, macro_f1); empty: per `task`,
    generation -> BLEU-4 and ROUGE-1/2/L on jieba words and on characters; classification -> accuracy
    and macro-F1 (the label-matching rule is in `metrics.compute_metrics`)."""
    task: Literal["generation", "classification"] = "generation"
    """`classification`: answers are labels, scored by accuracy and macro-F1; `generation`: free text."""
    benchmarks: list[BenchmarkConfig] = field(default_factory=list)
    """Multiple-choice benchmarks (see BenchmarkConfig) scored before and after training: their
    accuracy is logged as `bench/<name>/accuracy` and heads the run's report."""

    def __post_init__(self):
        names = [b.name or b.task for b in self.benchmarks]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ConfigError(
                "eval.benchmarks", f"two entries are named {twice[0]}; give each a distinct `name`"
            )


TrackerName = Literal["swanlab", "tensorboard", "mlflow", "wandb", "trackio", "none"]


@dataclass(frozen=True)
class TrackConfig:
    backend: TrackerName | list[TrackerName] = "none"
    """Trackers the run is mirrored to (metrics.jsonl and predictions.jsonl are always written): one name or
    a list of `swanlab`, `tensorboard`, `mlflow`, `wandb`, `trackio`; `none` (or `[]`): none. Each gets the
    same config, scalars, sample-answer tables and summary. MLflow, W&B and Trackio are optional extras
    (`pip install 'chattune[mlflow]'`, `[wandb]`, `[trackio]`)."""
    mode: Literal["auto", "cloud", "local", "offline", "disabled"] = "auto"
    """SwanLab mode, and W&B's. `auto`: cloud when an API key is configured (SwanLab's or W&B's own),
    otherwise offline (never prompts); `local`: SwanLab's local dashboard, W&B offline."""
    project: str = "chattune"
    """SwanLab / W&B / Trackio project and MLflow experiment (unless `group` is set). SwanLab's rule:
    1-100 characters of `0-9 a-z A-Z _ - + .` (checked at load when swanlab is a backend)."""
    experiment: str | None = None
    """The run's name in each tracker (1-512 characters); default: the tracker picks one."""
    description: str | None = None
    """1-1024 characters (SwanLab description, W&B notes, MLflow note)."""
    tags: list[str] = field(default_factory=list)
    """Each up to 512 characters (SwanLab / W&B tags, MLflow tag keys)."""
    required: bool = True
    """A tracker asked for that cannot start stops the run before training, so a run never ends without
    the record asked for. `false`: warn and go on with the others and metrics.jsonl."""
    group: str | None = None
    """SwanLab / W&B / Trackio group; the MLflow experiment when set. `chattune sweep` puts all its
    variants in one (the sweep's name)."""
    uri: str | None = None
    """MLflow tracking URI (`http://host:5000`, `sqlite:///abs/path.db`, `databricks`); default:
    MLFLOW_TRACKING_URI, else a SQLite store in the run directory (`<output_dir>/mlflow.db`)."""

    @property
    def backends(self) -> tuple[str, ...]:
        """`backend` as a tuple without `none` or repeats, in the order given."""
        names = [self.backend] if isinstance(self.backend, str) else list(self.backend)
        return tuple(dict.fromkeys(n for n in names if n != "none"))


@dataclass(frozen=True)
class SweepConfig:
    """Variants run by `chattune sweep` (one ordinary run each); `chattune train` ignores this section."""

    vary: list[str] = field(default_factory=list)
    """`section.key=V1,V2,...` as `--vary` takes it; several entries run every combination."""
    name: str | None = None
    """The sweep's tracker group and tag (SwanLab / W&B / Trackio group, MLflow experiment) and its compare
    page's title; default: the config file's name."""


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    """The base model and its tokenizer."""
    data: DataConfig = field(default_factory=DataConfig)
    """The training (and evaluation) data and how it is rendered."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """The adapter (or full fine-tuning with `enabled: false`)."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The optimizer loop, batching, checkpoints and hardware."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation before training and after every epoch: eval loss, sample answers, metrics."""
    track: TrackConfig = field(default_factory=TrackConfig)
    """Where metrics and sample answers are mirrored (SwanLab, TensorBoard, MLflow, W&B, Trackio) besides the
    run directory."""
    sweep: SweepConfig = field(default_factory=SweepConfig)
    """Variants for `chattune sweep`."""
