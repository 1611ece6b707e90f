"""Memory mode (`train.offload: true`): what the GPU need not hold lives in host memory.

Sits between `models` (model + LoRA on the GPU) and `train.run`'s loop. Two things move out:
- the input embedding table of an untied model (a lookup, 1 GiB in Qwen2.5-7B): ids go to the
  host, rows come back (T x hidden, ~29 MB for 4,096 tokens of 7B);
- AdamW's fp32 moments and a master copy of the LoRA weights (12 bytes a trainable parameter,
  1.9 GiB for 7B at r 64): the step runs on the CPU and the new weights are copied back.
With activation checkpointing (switched on by `train.offload` unless set to off) Qwen2.5-7B LoRA r 64
trains in under 16 GiB of GPU memory (bench/RESULTS.md). A tied model (Qwen2.5-0.5B..3B) keeps its
embedding on the GPU: the output head multiplies by the same matrix.

Why our own and not DeepSpeed ZeRO-Offload: DeepSpeed is not a dependency and cannot be installed on
the GPU image; LoRA's optimizer state is small enough that torch's own (fused) CPU AdamW steps it in a
fraction of a second, which several micro-batches a step amortise.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


def _hf(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def offload_input_embeddings(model: nn.Module, device: str | torch.device) -> bool:
    """Move an untied model's input embedding table to the host; its outputs still arrive on `device`.

    Forward hooks (PyTorch's public extension point) send the ids to the host and the looked-up rows
    back, detached (the table is frozen) but requiring grad when the ids' consumer needs it (activation
    checkpointing). Returns False, changing nothing, when the table is tied to the output head.
    """
    hf = _hf(model)
    embed = hf.get_input_embeddings()
    head = hf.get_output_embeddings()
    if head is not None and head.weight is embed.weight:
        return False
    if any(p.requires_grad for p in embed.parameters()):  # trained (full fine-tuning, modules_to_save):
        return False  # the hooks below pass no gradient back to a table on the host
    embed.to("cpu")
    target = torch.device(device)
    needs_grad = bool(
        getattr(hf, "is_activation_checkpointing", getattr(hf, "is_gradient_checkpointing", False))
    )

    def ids_to_host(module, args):  # to wherever the table is (the GPU during `embeddings_on_device`)
        return (args[0].to(module.weight.device),) + tuple(args[1:])

    def rows_to_device(module, args, output):
        if output.device.type == target.type:
            return None
        rows = output.detach().pin_memory() if target.type == "cuda" else output.detach()
        return rows.to(target, non_blocking=True).requires_grad_(needs_grad)

    embed.register_forward_pre_hook(ids_to_host)
    embed.register_forward_hook(rows_to_device)
    embed._chattune_offloaded = target  # read by `embeddings_on_device`
    return True


@contextlib.contextmanager
def embeddings_on_device(model: nn.Module) -> Iterator[None]:
    """Bring an offloaded embedding table back to the GPU for a while (evaluation and generation,
    whose code places tensors by the model's first parameter); a no-op otherwise."""
    embed = _hf(model).get_input_embeddings()
    target = getattr(embed, "_chattune_offloaded", None)
    if target is None:
        yield
        return
    embed.to(target)
    try:
        yield
    finally:
        embed.to("cpu")
        if target.type == "cuda":
            torch.cuda.empty_cache()  # give the table's memory back to the training peak's budget


class HostAdamW(torch.optim.AdamW):
    """AdamW over fp32 host copies of `params`; the GPU keeps only the weights and their gradients.

    `step()` copies the gradients to pinned host buffers, steps (torch's fused CPU kernel where it
    exists) and copies the weights back without blocking. `zero_grad` clears the GPU gradients;
    `state_dict`/`load_state_dict` and the lr schedulers work as for AdamW (its param_groups).
    """

    def __init__(self, params: list[nn.Parameter], **kwargs) -> None:
        self.device_params = list(params)
        pin = any(p.is_cuda for p in self.device_params)
        host = []
        for p in self.device_params:
            h = torch.empty(p.shape, dtype=torch.float32, pin_memory=pin)
            h.copy_(p.detach())
            host.append(nn.Parameter(h))
        self._grads = [torch.empty(p.shape, dtype=torch.float32, pin_memory=pin) for p in host]
        try:
            super().__init__(host, fused=True, **kwargs)
        except (RuntimeError, TypeError):  # no fused CPU kernel in this torch
            super().__init__(host, foreach=True, **kwargs)

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        host = [p for group in self.param_groups for p in group["params"]]
        for d, h, buf in zip(self.device_params, host, self._grads, strict=True):
            if d.grad is None:
                h.grad = None
                continue
            buf.copy_(d.grad, non_blocking=True)
            h.grad = buf
        if any(d.is_cuda for d in self.device_params):
            torch.cuda.synchronize()  # the gradients have landed in host memory
        loss = super().step(closure)
        for d, h in zip(self.device_params, host, strict=True):
            d.copy_(h, non_blocking=True)
        return loss

    def load_state_dict(self, state_dict: dict) -> None:  # type: ignore[override]
        """Moments and step from a checkpoint; the master weights from the (just restored) GPU weights."""
        super().load_state_dict(state_dict)
        with torch.no_grad():
            host = [p for group in self.param_groups for p in group["params"]]
            for d, h in zip(self.device_params, host, strict=True):
                h.copy_(d.detach())

    def zero_grad(self, set_to_none: bool = True) -> None:  # type: ignore[override]
        super().zero_grad(set_to_none=set_to_none)
        for d in self.device_params:
            if set_to_none:
                d.grad = None
            elif d.grad is not None:
                d.grad.zero_()
