"""What a checkpoint's state.pt must hold before `--resume` trusts it (`train.checkpoints` reads it).

A state.pt from elsewhere, or edited by hand, loads with `weights_only=True` and still may not be what
chattune wrote: wrong types, a step that is not its folder's, generator states no library accepts, optimizer
moments of other shapes. Each is refused here by name instead of failing steps later, or resuming wrongly.
"""

from __future__ import annotations

import random
from pathlib import Path

from chattune.errors import ChattuneError


def check_state(folder: Path, state: dict) -> None:
    """Types of what state.pt holds, the step against the folder's name, and every generator state tried on
    a throwaway generator: a hand-edited or foreign state.pt raises ValueError (damaged) here instead of a
    traceback at the first step after loading, or a resume from the wrong point."""
    import numpy as np
    import torch

    step, name = state["step"], folder.name.removeprefix("step-")
    if not isinstance(step, int) or isinstance(step, bool) or step < 1:
        raise ValueError(f"state.pt's step is {str(step)[:40]!r}, not a step number")
    if not name.isdigit() or int(name) != step:
        raise ValueError(f"state.pt is at step {step}, but its folder is named {folder.name}")
    optim = state["optimizer"]
    groups = optim.get("param_groups") if isinstance(optim, dict) else None
    if not isinstance(optim.get("state") if groups else None, dict) or not isinstance(groups, list):
        raise ValueError("state.pt's optimizer state is not an optimizer's state_dict")
    if not all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups):
        raise ValueError("state.pt's optimizer param_groups are malformed")
    for key, kind in (("scheduler", dict), ("config", dict), ("progress", dict), ("examples_sha256", str)):
        if state.get(key) is not None and not isinstance(state[key], kind):
            raise ValueError(f"state.pt's {key} is a {type(state[key]).__name__}, not a {kind.__name__}")
    rngs = state.get("rng")
    if rngs is not None and not isinstance(rngs, list):
        raise ValueError("state.pt's rng is not a list of generator states")
    for rng in rngs or []:
        try:  # the very calls set_rng_state makes, on generators nobody draws from
            torch.Generator().set_state(rng["torch"])
            random.Random().setstate(
                tuple(rng["python"][:1]) + (tuple(rng["python"][1]),) + rng["python"][2:]
            )
            kind, keys, pos, has_gauss, gauss_next = rng["numpy"]
            np.random.RandomState().set_state(
                (kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss_next)
            )
        except Exception as e:  # noqa: BLE001 - each library refuses a bad state in its own way
            raise ValueError(f"state.pt's random generator state is damaged ({type(e).__name__})") from None


def check_moments(folder: Path, optimizer, saved: dict) -> None:
    """Each saved optimizer moment has its parameter's shape (torch's load_state_dict does not look: a wrong
    one fails at the first step after resuming). Raises ChattuneError naming the checkpoint."""
    import torch

    params = [p for g in optimizer.param_groups for p in g["params"]]
    ids = [i for g in saved["param_groups"] for i in g["params"]]
    bad = len(ids) != len(params)
    for i, p in zip(ids, params, strict=False):
        moments = saved["state"].get(i, {})
        if not isinstance(moments, dict):
            bad = True
            break
        for v in moments.values():
            bad = bad or (torch.is_tensor(v) and v.dim() > 0 and v.shape != p.shape)
    if bad:
        raise ChattuneError(
            f"--resume: {folder}/state.pt holds optimizer state for other parameters than this model's: "
            "delete that checkpoint folder and run with --resume again"
        )
