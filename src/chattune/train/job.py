"""`run(cfg)`: one LoRA fine-tune, top to bottom.

data -> render (the model's own template, assistant-only labels) -> batches (padded or packed)
-> model + LoRA (transformers + peft) -> optimizer loop with evaluation before training and after
every epoch -> adapter folder that carries everything needed to use it.
Everything the user gave is checked before the run directory is created, so a bad config or data
file leaves nothing half-written behind.

Launched by torchrun / accelerate launch, every process runs this same function on the same plan and
takes its share of each optimizer step's micro-batches (`distributed.share_window`); rank 0 alone
prints, evaluates, logs and writes (see `distributed` for the rest). How the ranks share a step (one
process, DDP's replicas or FSDP2's shards) is chosen once, in `strategies`; the loop is `loop`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from pathlib import Path

from chattune.config.checks import check_run_dir_unused
from chattune.config.schema import Config
from chattune.console import say_once, tally
from chattune.data import check_sources, read_splits
from chattune.errors import ConfigError
from chattune.evaluate.benchmarks import read_benchmark_configs
from chattune.evaluate.judge import build_samples, read_samples
from chattune.evaluate.metrics import default_metrics, require_metric_packages
from chattune.model.load import load_tokenizer, pick_device, pick_dtype
from chattune.model.lora import add_lora, initial_adapter_state
from chattune.model.resolve import resolve_model_dir
from chattune.render.cache import render_all
from chattune.render.preflight import preflight, require_examples
from chattune.render.template import set_template_kwargs
from chattune.train import decide
from chattune.train.checkpoints import find_resume_point, fingerprint_examples
from chattune.train.compiling import compile_layers, doc_bound
from chattune.train.loop import Batches, Evaluation, forward_context, run_steps, train_step
from chattune.train.optim import build_optimizer
from chattune.train.preload import LoadedBase, start_base_load
from chattune.train.records import ModelSetup, Optim, Plan, RunDir, TrainingData
from chattune.train.rundir import open_run_dir, save
from chattune.train.strategies import Strategy, build_strategy, decoder_layers, strategy_for
from chattune.train.throughput import matmul_params
from chattune.train.world import World, check_launch, end_process_group, init_process_group, read_world


def run(cfg: Config, *, resume: bool = False) -> Path:
    """One fine-tune of `cfg` on every rank of the launch; returns the run directory (`train.output_dir`).

    `resume`: continue the run directory's last checkpoint (or start it again when it has none).
    Raises ChattuneError (ConfigError, DataError, ModelError) for what the user gave before anything
    is written, and when training diverges before an adapter is written.
    """
    t_start = time.time()
    world = check_run(cfg, resume)
    check_sources(cfg.data)  # a mistyped data path is said now, not after the model has loaded
    sharded = strategy_for(world, cfg.train.distributed).sharded  # the weights split over ranks (fsdp)
    model_dir = resolve_model_dir(cfg.model.name_or_path, cfg.model.source, cfg.model.revision)
    world = dataclasses.replace(world, device=pick_device(cfg.train.device))
    import torch

    torch.manual_seed(cfg.train.seed)  # before the load starts: LoRA's initial weights draw next
    base = start_base_load(cfg, model_dir, world, sharded)  # one process: loads while the data renders
    try:
        data = read_and_render(cfg, world, model_dir)
        plan = plan_steps(cfg, data, resume, sharded, world.is_main)
    except BaseException:
        base.settle()  # never exit while the load thread is still copying weights
        raise
    # Every check on the user's config and data has run on every rank: from here on ranks talk.
    joined = init_process_group(world)
    built = build_model(cfg, base.result(), world)
    strategy = build_strategy(built.model, cfg.train, world, built.loss_of)
    optim = build_optim(cfg, built, plan.total_steps, world)
    # Everything the user gave has been checked by now: only from here on is anything written.
    opened = open_run_dir(cfg, data, built, optim, strategy, plan, world, resume)
    evaluate = build_evaluation(cfg, data, built, strategy, opened, world, plan.total_steps)
    say_once(describe(cfg, built, plan, world))
    if opened.done.step == 0:
        evaluate(0, 0.0, "baseline")

    batches = build_batching(cfg, data, plan, built, world.device)
    forward_ctx = functools.partial(forward_context, built.model, built.half, built.compute_dtype)
    take_step = functools.partial(
        train_step, batches=batches, strategy=strategy, world=world, optim=optim, forward_ctx=forward_ctx
    )
    trained = run_steps(
        cfg.train,
        plan,
        take_step,
        opened,
        evaluate,
        optim,
        model=built.model,
        world=world,
        n_matmul=built.n_matmul,
        t_start=t_start,
    )
    save(cfg, built, strategy, opened, trained, world, t_start)
    if built.use_ckpt and built.use_compile:
        import torch._functorch.config as functorch_config

        functorch_config.activation_memory_budget = 1.0  # the default, for whatever runs next here
    end_process_group(joined)  # every rank returns once the adapter is written
    return Path(cfg.train.output_dir)


# -- the stages of run(), in order ---------------------------------------------------------------------------
def check_run(cfg: Config, resume: bool) -> World:
    """This process's place in the launch, once the config's numbers, the launch and `train.output_dir`
    are checked (on every rank, like every check before the run directory: a rank failing alone would
    leave the others waiting). Raises ConfigError / ChattuneError naming the key or folder."""
    _check_finite(cfg)
    if cfg.eval.samples or cfg.eval.samples_path:  # sample answers are scored after every epoch
        require_metric_packages(cfg.eval.metrics or default_metrics(cfg.eval.task))
    tc = cfg.train
    world = read_world()  # one process unless started by torchrun / accelerate launch
    if world.size > 1:
        check_launch(os.environ, tc.distributed)
        if tc.offload:
            raise ConfigError(
                "train.offload", "memory mode runs in one process; set it false with several GPUs"
            )
    elif tc.distributed == "fsdp":  # asked to shard, but nothing to shard over: say so, then train
        say_once(
            "note: train.distributed: fsdp shards the weights over several processes, and this run is one "
            "process, so each weight is whole on this GPU; start it with torchrun --nproc-per-node N to shard"
        )
    check_run_dir_unused(Path(tc.output_dir), resume)
    if tc.precision == "fp8":  # the GPU's FP8 tensor cores, before the data reads and the model loads
        from chattune.model.fp8 import check_fp8_device

        check_fp8_device(tc.device)
    return world


def read_and_render(cfg: Config, world: World, model_dir: Path) -> TrainingData:
    """Read the data, check it against the tokenizer's template (`preflight`) and render it.

    `model_dir`: the resolved model folder (its tokenizer). Raises DataError naming file and line for a
    bad row (with data.on_bad_row: error), and a readable error when no conversation is left to train on.
    """
    dc = cfg.data
    tokenizer = load_tokenizer(model_dir, cfg.model)
    set_template_kwargs(tokenizer, dc.template_kwargs)  # every rendering below and in sample answers
    train_convs, eval_convs, read_report, eval_read = read_splits(dc, cfg.train.seed)
    # Pre-flight: refuse to train on ids that differ from the template's or an untrained end of turn.
    for warning in preflight(tokenizer, train_convs, model_dir=model_dir, train_on=dc.train_on):
        if world.is_main:
            say_once(f"warning: {warning}")
    render_kw = dict(
        max_len=dc.max_len,
        truncation=dc.truncation,
        train_on=dc.train_on,
        on_bad_row=dc.on_bad_row,
        cache=dc.cache,
    )
    train_ex, train_report = render_all(
        tokenizer, train_convs, desc="tokenising the training set", **render_kw
    )
    eval_ex, eval_report = render_all(tokenizer, eval_convs, desc="tokenising the eval set", **render_kw)
    require_examples(train_report, dc)  # a readable refusal when every conversation was dropped
    if cfg.eval.max_eval_examples is not None:
        eval_ex = eval_ex[: cfg.eval.max_eval_examples]
    if cfg.eval.samples_path:
        samples = read_samples(
            cfg.eval.samples_path,
            cfg.eval.samples,
            fmt=dc.format,
            system_prompt=dc.system_prompt,
            converter=dc.eval_converter or (dc.converter if isinstance(dc.converter, str) else None),
            placeholders={"name": dc.identity_name, "author": dc.identity_author},
        )
    else:
        samples = build_samples(eval_convs, cfg.eval.samples)
    skipped, dropped = read_report.skipped, train_report.dropped
    sources = dc.train_path if isinstance(dc.train_path, str) else ", ".join(dc.train_path)
    say_once(
        f"data: {read_report.rows} rows read from {sources}, {sum(skipped.values())} skipped"
        f"{f' ({tally(skipped)})' if skipped else ''}; {len(train_ex)} train / {len(eval_ex)} eval examples; "
        f"{train_report.truncated} truncated to {dc.max_len} tokens, {sum(dropped.values())} dropped"
        f"{f' ({tally(dropped)})' if dropped else ''}"
    )
    benchmarks = read_benchmark_configs(cfg.eval.benchmarks)  # a bad file stops the run here, not later
    return TrainingData(
        model_dir, tokenizer, train_ex, eval_ex, samples, read_report, eval_read, train_report, eval_report,
        benchmarks,
    )  # fmt: skip


def plan_steps(cfg: Config, data: TrainingData, resume: bool, sharded: bool, is_main: bool) -> Plan:
    """The plan every rank computes alike from the data and the seed; with `resume`, the checkpoint to
    continue, and a config it cannot continue refused (ChattuneError), before the model loads."""
    from chattune.render.packing import build_batches as plan_batches

    tc = cfg.train
    lengths = [len(e["input_ids"]) for e in data.train_ex]
    batching = dict(
        packing=tc.packing, budget_tokens=tc.pack_tokens, micro_batch_size=tc.micro_batch_size, seed=tc.seed
    )
    steps_per_epoch = math.ceil(len(plan_batches(lengths, epoch=0, **batching)) / tc.grad_accum_steps)
    total_steps = tc.max_steps or max(1, math.ceil(tc.epochs * steps_per_epoch))
    n_epochs = math.ceil(total_steps / steps_per_epoch)
    fingerprint = fingerprint_examples(data.train_ex) if (tc.save_steps or resume) else ""
    point = None
    if resume:
        point = find_resume_point(Path(tc.output_dir), cfg, fingerprint, total_steps, sharded, is_main)
    return Plan(
        lengths, batching, tc.grad_accum_steps, steps_per_epoch, total_steps, n_epochs, fingerprint, point
    )


def build_model(cfg: Config, base: LoadedBase, world: World) -> ModelSetup:
    """The loaded base (`preload.start_base_load`) with LoRA (or every weight trainable), checkpointing and
    compilation decided and applied. Raises ChattuneError when compilation finds no decoder layers.
    """
    device = world.device
    import torch

    from chattune.model.attention import VARLEN, varlen_kernel_ready

    tc, dc = cfg.train, cfg.data
    model = base.model  # LoRA wraps it below
    model.config.use_cache = False  # a KV cache would let packed documents see each other
    if cfg.lora.enabled:
        model = add_lora(model, cfg.lora)
    else:
        model.requires_grad_(True)  # full fine-tuning: every weight trains
    initial_lora = initial_adapter_state(model, cfg.lora)  # PiSSA/OLoRA: to save a plain LoRA at the end
    if tc.precision == "fp8":  # frozen base linears to e4m3 once, before compilation sees the layers
        from chattune.model.fp8 import convert_to_fp8

        convert_to_fp8(decoder_layers(model))
    # The largest micro-batch in tokens: what activation memory scales with.
    micro_tokens = tc.pack_tokens if tc.packing else tc.micro_batch_size * dc.max_len
    use_ckpt = decide.use_checkpointing(
        tc,
        device,
        offload=base.offload,
        quantized=base.quantized,
        memory_tight=lambda: _memory_tight(model, micro_tokens),
    )
    if use_ckpt:
        _enable_checkpointing(model, by_compiler=base.use_compile)
    fixed_packs = decide.use_fixed_packs(
        tc,
        compiled=base.use_compile,
        varlen=base.attn == VARLEN and varlen_kernel_ready(),
        half=pick_dtype(cfg.model.dtype, device) in (torch.bfloat16, torch.float16),
    )
    if base.use_compile:
        if fixed_packs:  # layer 0 then shares the other layers' graph
            model.enable_input_require_grads()
        compile_layers(decoder_layers(model), static_shapes=fixed_packs)
    if base.offload:
        from chattune.train.offload import offload_input_embeddings

        if not offload_input_embeddings(model, device):
            say_once(
                "note: train.offload: the embedding table is tied to the output head or trained, so it "
                "stays on the GPU"
            )
    # Half-precision base weights with fp32 LoRA weights (peft's default) compute under autocast
    # (`loop.forward_context`); full fine-tuning's fp32 weights compute in the same half dtype.
    compute_dtype = pick_dtype(cfg.model.dtype, device)
    half = device == "cuda" and compute_dtype in (torch.bfloat16, torch.float16)
    ce_chunk_rows = 256 if base.offload else None  # memory mode: ~150 MB of logits at a time, not ~1 GB
    return ModelSetup(
        model=model,
        attn=base.attn,
        offload=base.offload,
        use_ckpt=use_ckpt,
        use_compile=base.use_compile,
        fixed_packs=fixed_packs,
        half=half,
        compute_dtype=compute_dtype,
        initial_lora=initial_lora,
        n_trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
        n_total=sum(p.numel() for p in model.parameters()),
        n_matmul=matmul_params(model),
        loss_of=functools.partial(_loss_sum, ce_chunk_rows=ce_chunk_rows),
    )


def _enable_checkpointing(model, *, by_compiler: bool) -> None:
    """Activation checkpointing, by the compiler for compiled layers, else transformers' own wrapper."""
    if by_compiler:
        # With a memory budget of 0 the partitioner saves only each compiled layer's inputs and recomputes
        # the rest in the backward (what checkpointing does, fused). transformers' own checkpoint wrapped
        # around compiled layers failed to recompute identically on an H100 (Qwen2.5-14B), so it is used only
        # for eager layers.
        import torch._functorch.config as functorch_config

        functorch_config.activation_memory_budget = 0.0
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()  # frozen embeddings: checkpointed blocks still need grads


def _loss_sum(model, batch: dict, ce_chunk_rows: int | None):
    """The micro-batch's summed loss (0-d tensor)."""
    from chattune.model.loss import lm_loss_sum

    return lm_loss_sum(model, batch, ce_chunk_rows)[0]


def build_optim(cfg: Config, built: ModelSetup, total_steps: int, world: World) -> Optim:
    """AdamW (LoRA+ groups, or on the host in memory mode) and its schedule over `total_steps`."""
    device = world.device
    from transformers import get_scheduler

    tc = cfg.train
    if tc.grad_accum_steps % world.size:
        say_once(
            f"note: train.grad_accum_steps ({tc.grad_accum_steps}) is not a multiple of the {world.size} "
            "processes, so some of them idle for part of every step; a multiple keeps all of them busy"
        )
    params = [p for p in built.model.parameters() if p.requires_grad]
    optimizer = build_optimizer(built.model, cfg.lora, tc, device, built.offload)
    scheduler = get_scheduler(
        tc.lr_schedule,
        optimizer,
        num_warmup_steps=int(tc.warmup_ratio * total_steps),
        num_training_steps=total_steps,
    )
    return Optim(optimizer, scheduler, params, tc.max_grad_norm)


def build_evaluation(
    cfg: Config,
    data: TrainingData,
    built: ModelSetup,
    strategy: Strategy,
    opened: RunDir,
    world: World,
    total_steps: int,
) -> Evaluation:
    """Evaluation as the loop calls it (`loop.Evaluation`): rank 0, or every rank of sharded weights."""
    from chattune.infer.load import Loaded

    loaded = Loaded(
        model=built.model,
        tokenizer=data.tokenizer,
        system_prompt=cfg.data.system_prompt,
        end_of_turn_token=opened.facts.eot,
        name="training",
        stop_token_ids=opened.facts.stop_token_ids,  # the ids the saved folder records (adapter.stop_ids)
    )
    return Evaluation(
        cfg=cfg.eval,
        model=built.model,
        loaded=loaded,
        eval_ex=data.eval_ex,
        samples=data.samples,
        pad_id=data.tokenizer.pad_token_id,
        metric_names=cfg.eval.metrics or default_metrics(cfg.eval.task),
        tracker=opened.tracker,
        history=opened.history,
        takes_part=world.is_main or strategy.sharded,
        device=world.device,
        compiled=built.use_compile,
        benchmarks=data.benchmarks,
        total_steps=total_steps,
    )


def describe(cfg: Config, built: ModelSetup, plan: Plan, world: World) -> str:
    """The one line that says what is about to train, and how."""
    device = world.device
    tc = cfg.train
    return (
        f"model: {cfg.model.name_or_path} on {device} ({next(built.model.parameters()).dtype}, "
        f"attention {built.attn}, checkpointing {'on' if built.use_ckpt else 'off'}, compiled layers "
        f"{'on' if built.use_compile else 'off'}{', memory mode (offload)' if built.offload else ''}"
        f"{', fp8 base matmuls' if tc.precision == 'fp8' else ''}); "
        f"{'LoRA' if cfg.lora.enabled else 'full fine-tuning'} trains {built.n_trainable:,} of "
        f"{built.n_total:,} parameters; {plan.total_steps} optimizer step"
        f"{'s' if plan.total_steps != 1 else ''} over {plan.n_epochs} epoch(s)"
        + (f"; {world.size} processes share each step ({tc.distributed})" if world.size > 1 else "")
    )


def build_batching(cfg: Config, data: TrainingData, plan: Plan, built: ModelSetup, device: str) -> Batches:
    """How the loop turns the plan's micro-batches into tensors: padded, packed, or packs of one shape."""
    tc, pad_id = cfg.train, data.tokenizer.pad_token_id
    pack_shape: dict = {}
    if built.fixed_packs:
        pack_shape = dict(
            pad_to=tc.pack_tokens,
            pad_id=pad_id if pad_id is not None else 0,
            max_doc_tokens=doc_bound(plan.lengths, tc.pack_tokens),
        )
    return Batches(data.train_ex, tc.packing, pad_id, device, built.fixed_packs, pack_shape)


# -- helpers of run() ---------------------------------------------------------------------------------------
def _check_finite(cfg: Config) -> None:
    """Every number in the config is finite (`train.lr: .inf` would train into NaN weights)."""
    for section in dataclasses.fields(cfg):
        values = getattr(cfg, section.name)
        for f in dataclasses.fields(values):
            value = getattr(values, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{section.name}.{f.name}", f"must be a finite number, got {value}")


def _memory_tight(model, micro_tokens: int) -> bool:
    from chattune.model.loss import checkpointing_needed

    return checkpointing_needed(model, micro_tokens)
