"""The optimizer of a run: AdamW over the trainable parameters (fused on CUDA), LoRA+ through peft's own
`create_loraplus_optimizer`, or `offload.HostAdamW` in memory mode.
"""

from __future__ import annotations

import torch
from torch import nn

from chattune.config.schema import LoraConfig, TrainConfig


def build_optimizer(model: nn.Module, lora: LoraConfig, tc: TrainConfig, device: str, offload: bool):
    """AdamW over the trainable weights (fused on CUDA); LoRA+ groups when `lora.loraplus_lr_ratio` is set
    (peft's `create_loraplus_optimizer`: B and 1-D weights at ratio x `train.lr`, A at `train.lr`); the host
    AdamW of memory mode with `offload`."""
    params = [p for p in model.parameters() if p.requires_grad]
    if offload:
        from chattune.train.offload import HostAdamW

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
