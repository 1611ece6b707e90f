"""What trains and how it is written: LoRA variants, QLoRA, full fine-tuning, between `models` and `train`.

`models.add_lora` builds the adapter (peft's DoRA, rsLoRA, init, modules_to_save) and `models.load_model`
the (quantized) base; this module holds the rest of each method's story:
- the weights' dtype: full fine-tuning keeps fp32 master weights (`training_model_config`);
- the optimizer: AdamW over the trainable weights, peft's LoRA+ groups, or memory mode's host AdamW;
- saving: a PiSSA/OLoRA adapter converted to a plain LoRA for the original base (`save_adapter`), or a
  complete model directory for full fine-tuning (`save_full_model`), and reading either back on resume.
Which combinations work is checked at config load (`config._check_methods`), not here.
"""

from __future__ import annotations

import copy
import dataclasses
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from chattune.config import MUTATING_INITS, LoraConfig, ModelConfig, TrainConfig


def training_model_config(model: ModelConfig, lora: LoraConfig, offload: bool) -> ModelConfig:
    """The `model` section to load with: full fine-tuning reads the weights in fp32.

    Why fp32 master weights: AdamW's update is often below bf16's resolution (8 bits of mantissa: a weight
    of 1.0 cannot move by less than 2**-8), so bf16 weights silently stop learning at small learning rates;
    HF Trainer and LLaMA-Factory also train full models from fp32 weights under bf16 autocast. It costs
    16 bytes a parameter (weight, gradient, two moments): 8 GiB for Qwen2.5-0.5B, 24 GiB for 1.5B. In memory
    mode (`train.offload`) the GPU keeps bf16 weights and the host AdamW keeps the fp32 masters instead.
    """
    if lora.enabled or offload:
        return model
    return dataclasses.replace(model, dtype="float32")


def initial_adapter_state(model: nn.Module, lora: LoraConfig) -> dict[str, torch.Tensor] | None:
    """A host copy of the adapter as initialised, for inits that move base weights into it (PiSSA, OLoRA).

    Saving needs it to turn the trained adapter into a plain LoRA for the unchanged base:
    W + dW = W_res + A B and W = W_res + A0 B0 give dW = A B - A0 B0 = [A | A0] [B | -B0] (rank 2r).
    None for the other inits (their adapter already applies to the original base).
    """
    if not lora.enabled or lora.init.partition("_niter_")[0] not in MUTATING_INITS:
        return None
    from peft import get_peft_model_state_dict

    return {k: v.detach().to("cpu", copy=True) for k, v in get_peft_model_state_dict(model).items()}


def save_adapter(model, folder: Path, state_dict: dict | None = None, initial: dict | None = None) -> None:
    """peft's `save_pretrained` into `folder`; with `initial` (see `initial_adapter_state`), converted by
    peft (`path_initial_model_for_weight_conversion`) to a rank-2r LoRA for the original base weights."""
    if initial is None:
        model.save_pretrained(folder, state_dict=state_dict)
        return
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory(prefix="chattune-init-") as tmp:
        init_dir = Path(tmp) / "initial"
        config = copy.deepcopy(model.peft_config["default"])
        config.init_lora_weights = True  # loaded as it is, not decomposed again from the residual base
        config.save_pretrained(str(init_dir))
        save_file(
            {k: v.contiguous() for k, v in initial.items()}, str(init_dir / "adapter_model.safetensors")
        )
        with warnings.catch_warnings():  # peft's advice to convert PiSSA to LoRA: this is the conversion
            warnings.filterwarnings("ignore", message=".*changes the base weights of the model")
            model.save_pretrained(
                folder, state_dict=state_dict, path_initial_model_for_weight_conversion=str(init_dir)
            )


def build_optimizer(model: nn.Module, lora: LoraConfig, tc: TrainConfig, device: str, offload: bool):
    """AdamW over the trainable weights (fused on CUDA); LoRA+ groups when `lora.loraplus_lr_ratio` is set
    (peft's `create_loraplus_optimizer`: B and 1-D weights at ratio x `train.lr`, A at `train.lr`); the host
    AdamW of memory mode with `offload`."""
    params = [p for p in model.parameters() if p.requires_grad]
    if offload:
        from chattune.offload import HostAdamW

        return HostAdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
    fused = device == "cuda"
    if lora.enabled and lora.loraplus_lr_ratio is not None:
        from peft.optimizers import create_loraplus_optimizer

        optimizer = create_loraplus_optimizer(
            model,
            torch.optim.AdamW,
            lr=tc.lr,
            loraplus_lr_ratio=lora.loraplus_lr_ratio,
            loraplus_weight_decay=tc.weight_decay,
            fused=fused,
        )
        # peft adds a group per kind even when it is empty; a checkpoint round-trip wants the same groups.
        optimizer.param_groups = [g for g in optimizer.param_groups if g["params"]]
        return optimizer
    return torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay, fused=fused)


def checkpoint_dtype(model_dir: Path) -> torch.dtype | None:
    """The dtype the base checkpoint was stored in (config.json), which a full fine-tune is saved in."""
    import json

    try:
        config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    name = config.get("dtype") or config.get("torch_dtype") or (config.get("text_config") or {}).get("dtype")
    value = getattr(torch, str(name), None) if name else None
    return value if isinstance(value, torch.dtype) else None


def save_full_model(
    model: nn.Module, tokenizer, folder: Path, dtype: torch.dtype | None, stop_ids: list[int]
):
    """A complete model directory (safetensors weights in `dtype`, config, and a generation config that
    stops at the end of the turn) that any transformers code loads; the caller adds the tokenizer."""
    from transformers import GenerationConfig

    state_dict = None
    if dtype is not None and dtype != next(model.parameters()).dtype:
        # A copy in the base's dtype: checkpoints are written mid-run, where the fp32 masters must stay.
        state_dict = {k: v.detach().to(dtype) for k, v in model.state_dict().items()}
    gen = model.generation_config if model.generation_config is not None else GenerationConfig()
    gen.eos_token_id = stop_ids
    if gen.pad_token_id is None:
        gen.pad_token_id = tokenizer.pad_token_id
    model.generation_config = gen
    model.save_pretrained(folder, state_dict=state_dict)


def load_trained_weights(model: nn.Module, folder: Path) -> None:
    """A checkpoint's weights back into `model`: the adapter of a peft model, or every weight of a full
    fine-tune (a model directory; a tied output head is stored once, under the input embedding)."""
    from safetensors.torch import load_file

    if hasattr(model, "peft_config"):
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(str(folder / "adapter_model.safetensors")))
        return
    state: dict = {}
    for f in sorted(folder.glob("*.safetensors")):
        state.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {k for k in missing if model.get_output_embeddings() is not None and k.endswith("lm_head.weight")}
    if unexpected or set(missing) - tied:
        from chattune.errors import ChattuneError

        raise ChattuneError(
            f"--resume: {folder} does not hold this model's weights (missing {sorted(set(missing) - tied)[:3]}, "
            f"unexpected {unexpected[:3]})"
        )
