"""The folders a run writes that can be used or resumed: adapters, and checkpoints every `train.save_steps`.

`write_adapter` writes every adapter folder of a run, the final one and each checkpoint's, with what using
it needs (tokenizer + chat template, chattune.yaml, inference.json). `Checkpointer.save` adds `state.pt`:
optimizer, scheduler, step, every random generator training draws from, the run's config, a fingerprint
of its training examples and its progress. `find_resume_point` (`--resume`) finds the last complete
checkpoint and refuses a config it cannot continue, before the model loads; `Checkpointer.restore` then
restores it so the run goes on bit for bit. `save` holds the steps only while it copies that state to
host memory; a background thread writes it (`checkpoint_writer`), and `wait` returns once it is on disk.
A checkpoint is data, never code: `state.pt` is read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import shutil
import time
from array import array
from dataclasses import dataclass, field
from pathlib import Path

from chattune.config.load import config_to_dict
from chattune.config.resume import compare_configs
from chattune.config.schema import Config
from chattune.console import say
from chattune.errors import ChattuneError, ConfigError
from chattune.files import atomic_path
from chattune.train.checkpoint_checks import check_moments, check_state
from chattune.train.checkpoint_writer import BackgroundWriter, HostCopies, adapter_tensors, pinned_bytes
from chattune.train.save import AdapterFacts, write_adapter
from chattune.train.world import World, gather_trainable

STATE_KEYS = ("optimizer", "scheduler", "step")


def fingerprint_examples(examples: list[dict]) -> str:
    """sha256 of the rendered training examples (ids and labels, in order): what a resumed run must see again.

    It changes with the data file, the split, the tokenizer, the template, `max_len` and truncation alike.
    """
    h = hashlib.sha256()
    for e in examples:
        for key in ("input_ids", "labels"):
            ids = array("q", e[key])
            h.update(len(ids).to_bytes(8, "little"))
            h.update(ids.tobytes())
    return h.hexdigest()


# -- random generators ----------------------------------------------------------------------------------------
def read_rng_state(device: str) -> dict:
    """Every generator training can draw from (LoRA dropout draws from torch's), as tensors and plain data."""
    import numpy as np
    import torch

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.copy()), int(pos), int(has_gauss), float(gauss)),
    }
    if device == "cuda":
        state["cuda"] = torch.cuda.get_rng_state()  # this rank's device
    return state


def set_rng_state(state: dict) -> None:
    import numpy as np
    import torch

    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, gauss_next = state["numpy"]
    np.random.set_state((kind, keys.numpy(), pos, has_gauss, gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _gather_rng_states(world: World) -> list[dict]:
    """Each rank's generators, in rank order (a collective when there are several ranks).

    Sent as torch.save bytes over the CPU (gloo) group and read back with weights_only=True: the same
    plain data as in state.pt. (`dist.gather_object` fails on these ByteTensors with torch 2.13 and gloo.)
    """
    mine = read_rng_state(world.device)
    if world.size == 1:
        return [mine]
    import io

    import torch
    import torch.distributed as dist

    buf = io.BytesIO()
    torch.save(mine, buf)
    data = torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(world.size)]
    dist.all_gather(sizes, torch.tensor([data.numel()]))
    longest = max(int(n) for n in sizes)
    padded = torch.zeros(longest, dtype=torch.uint8)
    padded[: data.numel()] = data
    every = [torch.empty(longest, dtype=torch.uint8) for _ in range(world.size)]
    dist.all_gather(every, padded)
    return [
        torch.load(io.BytesIO(t[: int(n)].numpy().tobytes()), weights_only=True)
        for t, n in zip(every, sizes, strict=True)
    ]


# -- the run's progress, carried over a resume ------------------------------------------------------------
@dataclass
class Progress:
    """What summary.json counts over the whole run, not only over the part since the last resume, and the
    losses of the steps a log line after the checkpoint averages in."""

    train_s: float = 0.0
    train_tokens: int = 0
    wall_s: float = 0.0
    history: list[dict] = field(default_factory=list)  # evaluations so far
    resumed_at: list[int] = field(default_factory=list)  # steps this run was resumed from
    unlogged_losses: list[float] = field(default_factory=list)  # steps since the last log line (its mean)


@dataclass
class ResumeState:
    step: int  # 0: from the beginning
    folder: Path | None
    progress: Progress


# -- comparing the config of a resumed run with its checkpoint's -----------------------------------------------
# Keys a resumed run may change; any other change is refused. Each changes what happens from the next step on.
# -- finding a complete checkpoint ----------------------------------------------------------------------------
def _read_state(folder: Path) -> dict:
    """state.pt as tensors and plain data; ChattuneError when it holds anything else, ValueError when damaged."""
    import pickle

    import torch
    from safetensors import safe_open

    path = folder / "state.pt"
    if not path.is_file():
        raise ValueError("state.pt is missing")
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as e:
        if "Unsupported global" in str(e):  # names a function or class: unpickling it could run code
            raise ChattuneError(
                f"--resume: {path} holds Python objects other than tensors and plain data, which chattune "
                "never writes; it was not loaded (loading could run code). Delete that folder unless you "
                "know where it came from"
            ) from None
        raise ValueError(f"state.pt is damaged ({e})") from None
    except Exception as e:  # truncated or empty file: torch raises several kinds
        raise ValueError(
            f"state.pt is damaged ({type(e).__name__}: {' '.join(str(e).split())[:120]})"
        ) from None
    if not isinstance(state, dict) or not all(k in state for k in STATE_KEYS):
        raise ValueError("state.pt lacks the optimizer, scheduler or step")
    check_state(folder, state)
    # LoRA: the adapter's weights; full fine-tuning: the model directory's (one file or shards).
    files = sorted((folder / "adapter").glob("*.safetensors"))
    if not files:
        raise ValueError("adapter/adapter_model.safetensors is missing")
    for weights in files:
        try:
            with safe_open(str(weights), framework="pt") as f:
                list(f.keys())
        except Exception as e:
            raise ValueError(f"adapter/{weights.name} is damaged ({e})") from None
    return state


def find_checkpoint(ckpt_dir: Path) -> tuple[Path, dict] | None:
    """The newest complete checkpoint and its state, skipping damaged ones (saying so); None when there is none.

    Raises ChattuneError when every checkpoint is damaged, naming the folders to delete.
    """
    found = sorted(ckpt_dir.glob("step-*"), reverse=True) if ckpt_dir.is_dir() else []
    damaged = []
    for folder in found:
        try:
            state = _read_state(folder)
        except ValueError as e:
            damaged.append(folder)
            say(f"warning: --resume: {folder} is damaged ({e}); skipping it")
            continue
        return folder, state
    if damaged:
        raise ChattuneError(
            f"--resume: no complete checkpoint in {ckpt_dir}: "
            + ", ".join(str(d) for d in damaged)
            + " damaged (see above). Delete "
            + ("it" if len(damaged) == 1 else "them")
            + " and run with --resume again to start from the beginning"
        )
    return None


def tidy_run_dir(out_dir: Path, step: int) -> None:
    """Before a resumed run writes: remove what an interrupted one left half-done (rank 0).

    Temporary folders of an interrupted save go; metrics.jsonl and predictions.jsonl keep only the records
    up to `step` (the steps after the checkpoint are run again), all of them going when `step` is 0.
    """
    ckpts = out_dir / "checkpoints"  # files.atomic_path names its temporary folders .<target>-*
    for tmp in [*out_dir.glob(".adapter-*"), *ckpts.glob(".step-*"), *ckpts.glob(".ckpt-*")]:
        shutil.rmtree(tmp, ignore_errors=True)
    for name in ("metrics.jsonl", "predictions.jsonl"):
        path = out_dir / name
        if not path.is_file():
            continue
        kept = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by the kill
                continue
            if (
                isinstance(record, dict)
                and isinstance(record.get("step"), int)
                and 0 < record["step"] <= step
            ):
                kept.append(line)
            elif isinstance(record, dict) and record.get("step") == 0 and step > 0:  # the baseline
                kept.append(line)
        path.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")


def find_resume_point(
    out_dir: Path, cfg: Config, fingerprint: str, total_steps: int, sharded: bool, is_main: bool
) -> tuple[Path, dict] | None:
    """`--resume`: the checkpoint to continue (folder, state), or None to start from the beginning.

    Runs before the model loads. A config change that would make the run one no uninterrupted run is
    raises ChattuneError naming the keys; the changes that are taken are said (`is_main`: rank 0 speaks).
    """
    ckpt_dir = out_dir / "checkpoints"
    found = find_checkpoint(ckpt_dir)
    if found is None:
        if (out_dir / "summary.json").is_file():
            raise ChattuneError(
                f"--resume: {out_dir} holds a finished run and no checkpoint to continue from; "
                "train into a new train.output_dir (train.save_steps writes checkpoints)"
            )
        if is_main:
            say(f"--resume: no checkpoint in {ckpt_dir}: starting from the beginning")
        return None
    folder, state = found
    step, where = int(state["step"]), f"--resume: {folder}"
    finished = _finished_steps(out_dir)
    if finished is not None and finished >= total_steps:  # resuming would train its last steps again
        raise ChattuneError(
            f"--resume: {out_dir} holds a finished run ({finished} steps; this config ends at step "
            f"{total_steps}): nothing left to train; use {out_dir / 'adapter'}, raise train.epochs or "
            "train.max_steps to train on, or train into a new train.output_dir"
        )
    if sharded != ("sharded_lora" in state):
        raise ConfigError(
            "train.distributed",
            f"{where} was written by a run {'with' if not sharded else 'without'} train.distributed: "
            "fsdp over several processes; resume it the same way",
        )
    if "config" not in state:  # written before chattune saved it
        if is_main:
            say(f"note: {where} does not record its config: the new config is taken as it is")
        return found
    same = state.get("examples_sha256") == fingerprint
    refused, accepted = compare_configs(state["config"], config_to_dict(cfg), same)
    if refused:
        raise ChattuneError(
            f"{where} cannot continue with this config; changed: {'; '.join(refused)}. These decide the "
            f"weights a step produces: set them back (the checkpoint's config is "
            f"{folder / 'adapter' / 'chattune.yaml'}), or start a new run in a new train.output_dir"
        )
    if step >= total_steps:
        raise ChattuneError(
            f"{where} is at step {step}, and this config ends at step {total_steps}: nothing left to "
            "train; raise train.epochs or train.max_steps, or use the checkpoint's adapter as it is"
        )
    if accepted and is_main:
        say(f"note: changed since {folder.name}, in effect from step {step + 1}: {'; '.join(accepted)}")
    return found


def _finished_steps(out_dir: Path) -> int | None:
    """The steps of the finished run in `out_dir` (its summary.json), or None when it has not finished."""
    try:
        steps = json.loads((out_dir / "summary.json").read_text(encoding="utf-8")).get("steps")
    except (OSError, ValueError, AttributeError):
        return None
    return steps if isinstance(steps, int) else None


# -- saving and restoring ---------------------------------------------------------------------------------------
class Checkpointer:
    """Saves and restores one run's resumable state in `<output_dir>/checkpoints/step-NNNNNNN/`.

    Every rank calls `save` and `restore` at the same point (sharded weights are gathered with collectives).
    """

    def __init__(
        self,
        ckpt_dir: Path,
        model,
        optimizer,
        scheduler,
        world: World,
        sharded: bool,
        facts: AdapterFacts,
        fingerprint: str,
    ) -> None:
        self.ckpt_dir = ckpt_dir
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.world, self.sharded, self.device = world, sharded, world.device
        self.facts, self.fingerprint = facts, fingerprint
        self._host, self.writer = HostCopies(), BackgroundWriter()
        if world.is_main and not sharded and facts.cfg.lora.enabled and facts.cfg.train.save_steps:
            self._host.reserve(pinned_bytes(model, optimizer))  # ready by the first checkpoint

    def save(self, step: int, progress: Progress) -> None:
        """Checkpoint this step: the adapter folder (as the final one) and state.pt, in `step-NNNNNNN`.

        Every rank takes part (sharded weights are gathered with collectives, here, at the step boundary).
        Rank 0 copies what it writes to host memory now (`HostCopies`), and a background thread writes it:
        the folder appears complete, atomically, and the older ones go after it. Returns before the write
        ends (full fine-tuning: after it, writing from the model itself); `wait` ends it.
        Raises ChattuneError when the previous checkpoint could not be written.
        """
        self.wait()  # one write at a time; its buffers are reused below
        t0 = time.perf_counter()
        lora = optim = None
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            lora = gather_trainable(self.model)
            whole = StateDictOptions(full_state_dict=True, cpu_offload=True)
            optim = get_optimizer_state_dict(self.model, self.optimizer, options=whole)
        rng = _gather_rng_states(self.world)
        if not self.world.is_main:
            return
        folder = self.ckpt_dir / f"step-{step:07d}"
        state = {
            "optimizer": optim if self.sharded else self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "step": step,
            "rng": rng,  # one entry per rank
            "config": config_to_dict(self.facts.cfg),
            "examples_sha256": self.fingerprint,
            "progress": dataclasses.asdict(progress),
        }
        if self.sharded:
            state["sharded_lora"] = lora
        if not self.facts.cfg.lora.enabled:  # the whole model: written from the model, before the next step
            self._write(folder, lora, state)
        else:
            adapter = lora if self.sharded else adapter_tensors(self.model)
            # Gathered shards too: their CPU entries (the step counts) can be the live tensors.
            adapter, state = self._host.take((adapter, state))
            self.writer.start(folder, lambda: self._write(folder, adapter, state))
        self.writer.blocked_s += time.perf_counter() - t0

    def _write(self, folder: Path, adapter: dict | None, state: dict) -> None:
        import torch

        with atomic_path(folder, directory=True) as tmp:
            write_adapter(self.model, self.facts, tmp / "adapter", state_dict=adapter)
            torch.save(state, tmp / "state.pt")
        for old in sorted(self.ckpt_dir.glob("step-*"))[:-1]:
            shutil.rmtree(old, ignore_errors=True)

    def wait(self, *, quiet: bool = False) -> None:
        """Return once the checkpoint being written (if any) is on disk (`BackgroundWriter.wait`)."""
        self.writer.wait(quiet=quiet)

    def restore(self, point: tuple[Path, dict] | None, cfg: Config, total_steps: int) -> ResumeState:
        """The checkpoint `find_resume_point` chose into model, optimizer, scheduler and generators (every rank).

        `point` None: nothing to restore, the run starts from the beginning.
        """
        if point is None:
            return ResumeState(step=0, folder=None, progress=Progress())
        folder, state = point
        self._restore(folder, state)
        self._apply_schedule(cfg.train.lr, total_steps)
        self._restore_rng(folder, state.get("rng"))
        saved = state.get("progress") or {}
        progress = Progress(**{k: v for k, v in saved.items() if k in Progress.__dataclass_fields__})
        progress.resumed_at.append(int(state["step"]))
        return ResumeState(step=int(state["step"]), folder=folder, progress=progress)

    def _restore(self, folder: Path, state: dict) -> None:
        from chattune.train.save import load_trained_weights

        if self.sharded:  # whole tensors in, each rank keeps its shard
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_model_state_dict,
                set_optimizer_state_dict,
            )

            whole = StateDictOptions(full_state_dict=True, strict=False)
            set_model_state_dict(self.model, state["sharded_lora"], options=whole)
            set_optimizer_state_dict(
                self.model, self.optimizer, optim_state_dict=state["optimizer"], options=whole
            )
        else:
            try:
                load_trained_weights(self.model, folder / "adapter")  # the adapter, or a full fine-tune's
            except (RuntimeError, ValueError, KeyError) as e:  # peft's size mismatch, a damaged tensor
                raise ChattuneError(
                    f"--resume: {folder}/adapter does not fit this model ({' '.join(str(e).split())[:200]}): delete that "
                    "checkpoint folder and run with --resume again"
                ) from None
            check_moments(folder, self.optimizer, state["optimizer"])
            self.optimizer.load_state_dict(state["optimizer"])
        try:
            self.scheduler.load_state_dict(state["scheduler"])
        except (TypeError, KeyError, ValueError) as e:
            raise ChattuneError(f"--resume: {folder}/state.pt's scheduler state is damaged ({e})") from None

    def _apply_schedule(self, lr: float, total_steps: int) -> None:
        """The next step's learning rate under this run's plan (`train.lr`, and the schedule over this run's
        steps), said when it differs from the checkpoint's plan. Unchanged, it is the very same number."""
        s = self.scheduler
        before = self.optimizer.param_groups[0]["lr"]
        s.base_lrs = [lr] * len(s.base_lrs)
        for group, fn in zip(self.optimizer.param_groups, s.lr_lambdas, strict=True):
            group["initial_lr"] = lr
            group["lr"] = lr * fn(s.last_epoch)
        s._last_lr = [g["lr"] for g in self.optimizer.param_groups]
        if s._last_lr[0] != before and self.world.is_main:
            say(
                f"note: train.lr {lr:g} over this run's {total_steps} steps: the next step's learning rate "
                f"is {s._last_lr[0]:.3e} (the checkpoint's plan had {before:.3e}), following this plan from here on"
            )

    def _restore_rng(self, folder: Path, rngs: list[dict] | None) -> None:
        if rngs and len(rngs) == self.world.size:
            set_rng_state(rngs[self.world.rank])
            return
        import torch

        # Drawn afresh, but not the masks of step 1 again.
        torch.manual_seed(self.facts.cfg.train.seed + self.world.rank + 1_000_003 * (1 + len(rngs or [])))
        if self.world.is_main:
            why = (
                f"it was written by {len(rngs)} processes and this run has {self.world.size}"
                if rngs
                else "it holds no random generator state (an older chattune)"
            )
            say(f"note: {folder}: {why}, so dropout masks differ from those of an uninterrupted run")
