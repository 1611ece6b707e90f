"""Resumable training state: the adapter, optimizer, scheduler and step, every `train.save_steps`.

`train` saves with `save_checkpoint` and `--resume` restores with `load_checkpoint`; sharded (FSDP) runs
gather whole tensors first, so a checkpoint is always a plain peft adapter plus `state.pt`.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from chattune.distributed import World, gather_trainable
from chattune.errors import ChattuneError, ConfigError


def save_checkpoint(
    ckpt_dir: Path, step: int, model, optimizer, scheduler, world: World, sharded: bool
) -> None:
    """Adapter weights + optimizer + scheduler + step, written atomically by rank 0; the last one is kept.

    Called on every rank. Sharded (FSDP) weights and optimizer state are first gathered whole (a
    collective); the LoRA weights are then also kept under their module names for `load_checkpoint`.
    """
    import torch

    lora = optim = None
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        lora = gather_trainable(model)
        whole = StateDictOptions(full_state_dict=True, cpu_offload=True)
        optim = get_optimizer_state_dict(model, optimizer, options=whole)
    if not world.is_main:
        return
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".ckpt-", dir=ckpt_dir))
    model.save_pretrained(tmp / "adapter", state_dict=lora)
    state = {"optimizer": optim if sharded else optimizer.state_dict(), "scheduler": scheduler.state_dict()}
    state["step"] = step
    if sharded:
        state["sharded_lora"] = lora
    torch.save(state, tmp / "state.pt")
    target = ckpt_dir / f"step-{step:07d}"
    tmp.rename(target)
    for old in sorted(ckpt_dir.glob("step-*"))[:-1]:
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(ckpt_dir: Path, model, optimizer, scheduler, sharded: bool) -> tuple[int, Path]:
    """The last checkpoint into model, optimizer and scheduler, on every rank; returns (its step, its folder)."""
    import torch

    from chattune.methods import load_trained_weights

    found = sorted(ckpt_dir.glob("step-*"))
    if not found:
        raise ChattuneError(f"--resume: no checkpoint in '{ckpt_dir}' (train.save_steps writes them)")
    last = found[-1]
    state = torch.load(last / "state.pt", weights_only=False)
    if sharded != ("sharded_lora" in state):
        raise ConfigError(
            "train.distributed",
            f"--resume: {last} was written by a run {'with' if not sharded else 'without'} train.distributed: "
            "fsdp over several processes; resume it the same way",
        )
    if sharded:  # whole tensors in, each rank keeps its shard
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        whole = StateDictOptions(full_state_dict=True, strict=False)
        set_model_state_dict(model, state["sharded_lora"], options=whole)
        set_optimizer_state_dict(model, optimizer, optim_state_dict=state["optimizer"], options=whole)
    else:
        load_trained_weights(model, last / "adapter")  # the adapter, or a full fine-tune's every weight
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return int(state["step"]), last
