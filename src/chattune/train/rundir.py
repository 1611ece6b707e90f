"""The run directory of `train.run`: what it restores from a checkpoint, and what it writes.

RunDir after every check on the user's config and data (`open_run_dir`: the tracker and config.yaml,
the first writes, by rank 0), and closed by `save`: the adapter folder, summary.json and report.html.
Ranks other than 0 take part in restoring and gathering, and write nothing.
"""

from __future__ import annotations

import json
import os
import platform
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from chattune.adapter import stop_ids
from chattune.config.load import config_to_dict, dump_config
from chattune.config.schema import Config
from chattune.console import say_once
from chattune.files import file_sha256, write_text_atomic
from chattune.render.template import end_of_turn_token
from chattune.track import Tracker, build_tracker
from chattune.train.checkpoints import Checkpointer, tidy_run_dir
from chattune.train.loop import Interrupted, progress_so_far
from chattune.train.records import LoopResult, Optim, RunDir
from chattune.train.save import AdapterFacts, write_adapter
from chattune.train.strategies import Strategy
from chattune.train.throughput import peak_mem_gib
from chattune.train.world import World

if TYPE_CHECKING:
    from chattune.train.records import ModelSetup, Plan, TrainingData


def open_run_dir(
    cfg: Config,
    data: TrainingData,
    built: ModelSetup,
    optim: Optim,
    strategy: Strategy,
    plan: Plan,
    world: World,
    resume: bool,
) -> RunDir:
    """Restore the checkpoint to continue (every rank), then the first writes (rank 0): the tracker and
    config.yaml. A tracker that cannot start stops the run here and leaves nothing."""
    dc, out_dir = cfg.data, Path(cfg.train.output_dir)
    eot = end_of_turn_token(data.tokenizer)
    # One computation of the ids that end an answer: the samples during training and the saved folder agree.
    stops = stop_ids(data.tokenizer, eot, getattr(built.model, "generation_config", None))
    facts = AdapterFacts(data.tokenizer, cfg, data.model_dir, eot, stops)
    ckpt = Checkpointer(
        out_dir / "checkpoints",
        built.model,
        optim.optimizer,
        optim.scheduler,
        world,
        strategy.sharded,
        facts,
        plan.fingerprint,
    )
    done = ckpt.restore(plan.resume_point, cfg, plan.total_steps)  # on every rank
    if done.folder is not None:
        say_once(f"resuming from {done.folder} (step {done.step})")
    data_info: dict = {}
    tracker: Tracker = _SilentTracker()  # ranks other than 0 write nothing
    if world.is_main:
        if resume:  # no half-saved folders, and no record of the steps about to be run again
            tidy_run_dir(out_dir, done.step)
        data_info = {
            "train_path": dc.train_path,
            "train_sha256": file_sha256(dc.train_path) if _is_file(dc.train_path) else None,
            # Each source's sha256 (a file) or `datasets` fingerprint, as the reader found it.
            "sources": data.read_report.as_dict().get("sources"),
            "read": data.read_report.as_dict(),
            "eval_read": data.eval_read.as_dict() if data.eval_read else None,
            "train": data.train_report.as_dict(),
            "eval": data.eval_report.as_dict(),
        }
        hparams = {**config_to_dict(cfg), "model_dir": str(data.model_dir), "dataset": data_info}
        hparams["params"] = {"trainable": built.n_trainable, "total": built.n_total}
        # The first write: a tracker asked for that cannot start stops the run here and leaves nothing.
        tracker = build_tracker(cfg.track, out_dir, hparams, resume=resume)
        (out_dir / "config.yaml").write_text(dump_config(cfg), encoding="utf-8")
        write_run_state(out_dir, "running")
    return RunDir(facts, ckpt, done, done.progress.history, tracker, data_info)


def save(
    cfg: Config,
    built: ModelSetup,
    strategy: Strategy,
    opened: RunDir,
    trained: LoopResult,
    world: World,
    t_start: float,
) -> None:
    """The adapter folder (`model/` for full fine-tuning), summary.json and report.html, written by rank 0
    (every rank takes part in gathering shards). A report that fails is a warning, not a lost run."""
    device = world.device
    lora_state = strategy.trainable_state()  # a collective for shards: every rank takes part
    out_dir = Path(cfg.train.output_dir)
    saved = out_dir / ("adapter" if cfg.lora.enabled else "model")
    if not world.is_main:
        return
    import torch

    write_adapter(built.model, opened.facts, saved, lora_state, initial=built.initial_lora)
    # The whole run, over its resumes.
    total = progress_so_far(opened.done.progress, trained.meter, t_start, opened.history)
    hardware = (
        torch.cuda.get_device_name()
        if device == "cuda"
        else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    )
    summary = {
        "wall_s": total.wall_s,
        "train_s": total.train_s,
        "train_tokens": total.train_tokens,
        "tokens_per_s": total.train_tokens / max(total.train_s, 1e-9),
        # Training seconds to the end of the first / tenth step: compilation shows here.
        "first_step_s": trained.meter.marks.get(1),
        "first_10_steps_s": trained.meter.marks.get(10),
        "steps": trained.step,
        "resumed_at_steps": total.resumed_at,
        "peak_mem_gib": peak_mem_gib(device),
        "hardware": hardware if world.size == 1 else f"{world.size} processes x {hardware}",
        "versions": _versions(),
        "data": opened.data_info,
        "evaluations": opened.history,
    }
    if world.size > 1:
        summary["distributed"] = {"processes": world.size, "mode": cfg.train.distributed}
    (out_dir / "summary.json").write_text(json.dumps(summary, ensure_ascii=False, indent=2), encoding="utf-8")
    opened.tracker.log_summary(summary, step=trained.step)
    opened.tracker.finish()
    write_run_state(out_dir, "finished")
    try:
        from chattune.report.run_report import write_report

        write_report(out_dir)
    except Exception as e:  # a report problem must not lose a finished run
        say_once(f"warning: could not write the run report: {e}")
    say_once(
        f"done in {summary['wall_s']:.1f}s ({summary['tokens_per_s']:,.0f} tokens/s); {saved.name}: {saved}"
    )


class _SilentTracker:
    """The tracker of ranks other than 0: they train and evaluate like rank 0 but record nothing."""

    def log(self, metrics: dict, step: int) -> None:
        pass

    def log_predictions(self, rows: list[dict], step: int, tag: str) -> None:
        pass

    def log_summary(self, summary: dict, step: int) -> None:
        pass

    def finish(self) -> None:
        pass


def _is_file(path) -> bool:
    return isinstance(path, str) and Path(path).is_file()


def _versions() -> dict[str, str]:
    import peft
    import torch
    import transformers

    import chattune

    return {
        "chattune": chattune.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
    }


# ---- run_state.json: whether a run is running, finished, interrupted or failed -------------------
# Written by the run itself (rank 0), so `chattune ui` shows a run started from the shell as one it
# started. A state of "running" whose process is gone means the process was killed (SIGKILL, power).
RUN_STATE = "run_state.json"
RUN_STATES = ("running", "finished", "interrupted", "failed")


def write_run_state(out_dir: Path, state: str, **extra) -> None:
    """Record `state` (one of RUN_STATES) with this process's id and the time (unix seconds) in
    `out_dir/run_state.json`, atomically (a reader never sees half a file)."""
    if state not in RUN_STATES:
        raise ValueError(f"run state {state!r} is not one of {RUN_STATES}")
    record = {"state": state, "pid": os.getpid(), "time": time.time(), **extra}
    write_text_atomic(out_dir / RUN_STATE, json.dumps(record, ensure_ascii=False))


def read_run_state(run_dir: Path) -> dict | None:
    """`run_dir/run_state.json` as written by `write_run_state`, or None when absent or unreadable."""
    try:
        record = json.loads((Path(run_dir) / RUN_STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    ok = isinstance(record, dict) and record.get("state") in RUN_STATES and isinstance(record.get("pid"), int)
    return record if ok else None


@contextmanager
def recording_end_state(out_dir: str | Path) -> Iterator[None]:
    """Around `train.run` in `chattune train`: SIGTERM (what `chattune ui`'s Stop sends) stops the run
    as Ctrl-C does, and a run that this process opened and that ends without finishing is marked
    `interrupted` (SIGTERM, Ctrl-C) or `failed` (with the error's message)."""
    out = Path(out_dir)

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    main = threading.current_thread() is threading.main_thread()  # signal handlers live there only
    previous = signal.signal(signal.SIGTERM, interrupt) if main else None
    try:
        yield
    except BaseException as e:
        state = read_run_state(out)
        if state is not None and state["pid"] == os.getpid() and state["state"] == "running":
            # Ctrl-C now, or the loop's stop at a step boundary
            if isinstance(e, (KeyboardInterrupt, Interrupted)):
                write_run_state(out, "interrupted")
            else:
                write_run_state(out, "failed", error=f"{type(e).__name__}: {e}"[:2000])
        raise
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)
