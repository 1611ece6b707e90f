"""Load a resolved model directory: device and dtype, the tokenizer with the configured chat template,
quantization (bitsandbytes) and the transformers model itself. Input: `model.resolve`'s directory.
"""

from __future__ import annotations

from pathlib import Path

from chattune.config.schema import ModelConfig
from chattune.errors import ConfigError, ModelError


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
        from chattune.render.template import chat_template_path

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
