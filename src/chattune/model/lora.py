"""LoRA (and its variants) on a loaded model, through peft: which modules, which init, what stays trainable.

model (transformers) --add_lora(LoraConfig)--> peft model; PiSSA/OLoRA's initial state kept so the saved
adapter is a plain LoRA (`train.save`).
"""

from __future__ import annotations

import dataclasses
import warnings

import torch
from torch import nn

from chattune.config.schema import MUTATING_INITS, LoraConfig, ModelConfig
from chattune.errors import ConfigError, ModelError


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
