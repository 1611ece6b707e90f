"""Run tracking: where `train.run` sends its metrics and sample predictions, the last stage of a run.

`build_tracker(cfg.track, run_dir, hparams)` always appends `metrics.jsonl` and `predictions.jsonl` in
the run dir and mirrors them to every backend in `track.backend` (SwanLab, TensorBoard, MLflow, W&B,
Trackio; one module each here). This package is the only place that imports a tracker library. A backend
that cannot start stops the run before training (`TrackerError`), unless `track.required: false`; one that
fails later warns once and is dropped, so a running training is never stopped by its tracker.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shlex
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol, TextIO

from chattune.config.schema import TrackConfig
from chattune.console import say_once
from chattune.errors import ChattuneError
from chattune.files import write_text_atomic
from chattune.track.mlflow_run import start_mlflow
from chattune.track.rows import PREDICTION_KEY, format_prediction
from chattune.track.swanlab_run import resolve_swanlab_mode, start_swanlab
from chattune.track.tensorboard_run import TensorBoardBackend as _TensorBoardBackend
from chattune.track.trackio_run import start_trackio
from chattune.track.wandb_run import start_wandb

__all__ = [
    "PREDICTION_KEY",
    "RUN_IDS_FILE",
    "Tracker",
    "TrackerError",
    "build_tracker",
    "format_prediction",
    "held_run_links",
    "resolve_swanlab_mode",
]

logger = logging.getLogger(__name__)

RUN_IDS_FILE = "tracker_runs.json"
"""In the run dir: {backend: its run id}, so that `--resume` continues the same tracker runs."""
NAMES = {
    "swanlab": "SwanLab",
    "tensorboard": "TensorBoard",
    "mlflow": "MLflow",
    "wandb": "W&B",
    "trackio": "Trackio",
}


class Tracker(Protocol):
    def log(self, metrics: dict[str, float | str], step: int) -> None:
        """Record namespaced scalars (`train/loss`, `eval/loss`, ...) at optimizer step `step`.

        A string value (e.g. `tag: "epoch 1"`) labels the row in metrics.jsonl; backends get numbers only.
        """
        ...

    def log_predictions(self, rows: list[dict], step: int, tag: str) -> None:
        """Record generated samples: rows of {prompt, prediction, reference[, epoch]}; `tag` e.g. "epoch 1"."""
        ...

    def log_summary(self, summary: dict[str, Any], step: int) -> None:
        """The run's final numbers (summary.json's top-level numbers: wall_s, tokens_per_s, ...)."""
        ...

    def finish(self) -> None:
        """Flush and close everything; safe to call twice."""
        ...


# -- the tracker ----------------------------------------------------------------------------------------
class _Backend(Protocol):
    name: str
    run_id: str | None

    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def log_predictions(self, rows: list[dict], step: int, tag: str) -> None: ...

    def log_summary(self, summary: dict[str, float], step: int) -> None: ...

    def finish(self, error: BaseException | None) -> None: ...


class TrackerError(ChattuneError):
    """The tracker the config asks for (`track.backend`, with `track.required`) could not start."""


def build_tracker(cfg: TrackConfig, run_dir: Path, hparams: dict, resume: bool = False) -> Tracker:
    """JSONL files in `run_dir` plus every backend in `cfg.backends`; `hparams` is shown as the config.

    `resume`: continue the tracker runs named in `run_dir/tracker_runs.json` where the tracker allows it,
    else start new ones whose config names the old run (`resumed_from`), and say which.
    Raises `TrackerError` when a backend cannot start and `cfg.required` (removing `run_dir` again if
    this call created it, so the failed start leaves nothing behind)."""
    run_dir = Path(run_dir)
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    # Backends want JSON-like values; a Path or tuple in hparams must not cost us the whole backend.
    hparams = json.loads(json.dumps(hparams, default=str))
    earlier = _read_run_ids(run_dir) if resume else {}
    backends: list[_Backend] = []
    try:
        for name in cfg.backends:
            backend = _start(
                NAMES[name], _starter(name, cfg, run_dir, hparams, earlier.get(name)), cfg.required
            )
            if backend is not None:
                backends.append(backend)
                _say_resumed(backend, earlier.get(name))
    except TrackerError:
        for backend in backends:
            _close_quietly(backend)
        if created:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    ids = {n: b.run_id for n in cfg.backends for b in backends if b.name == NAMES[n] and b.run_id}
    if ids:
        write_text_atomic(run_dir / RUN_IDS_FILE, json.dumps({**earlier, **ids}, indent=2) + "\n")
    return RunTracker(run_dir, backends)


def _starter(
    name: str, cfg: TrackConfig, run_dir: Path, hparams: dict, resume_id: str | None
) -> Callable[[], _Backend | None]:
    if name == "tensorboard":
        return lambda: _TensorBoardBackend(run_dir / "tensorboard", hparams)
    start = {
        "swanlab": start_swanlab,
        "mlflow": start_mlflow,
        "wandb": start_wandb,
        "trackio": start_trackio,
    }[name]
    if not resume_id:
        return lambda: start(cfg, run_dir, hparams)

    def continue_or_link() -> _Backend | None:
        try:
            return start(cfg, run_dir, hparams, resume_id)
        except (Exception, SystemExit) as e:
            logger.warning(
                "%s could not continue run %s (%s: %s); starting a new run that names it (resumed_from).",
                NAMES[name],
                resume_id,
                type(e).__name__,
                e,
            )
            return start(cfg, run_dir, {**hparams, "resumed_from": resume_id})

    return continue_or_link


def _say_resumed(backend: _Backend, earlier_id: str | None) -> None:
    if not earlier_id:
        return
    if backend.run_id == earlier_id:
        say_once(f"{backend.name}: continuing run {earlier_id}")
    else:
        say_once(f"{backend.name}: new run {backend.run_id} (continues run {earlier_id}, which it names)")


def _read_run_ids(run_dir: Path) -> dict[str, str]:
    try:
        ids = json.loads((run_dir / RUN_IDS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return (
        {k: v for k, v in ids.items() if isinstance(k, str) and isinstance(v, str)}
        if isinstance(ids, dict)
        else {}
    )


class RunTracker:
    """Writes metrics.jsonl / predictions.jsonl (flushed per line) and forwards to each backend."""

    def __init__(self, run_dir: Path, backends: list[_Backend] | None = None):
        self.run_dir = Path(run_dir)
        # Appended, not truncated: a resumed run keeps one history; a fresh run gets a fresh run_dir.
        self._metrics: TextIO = open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8")
        self._predictions: TextIO = open(self.run_dir / "predictions.jsonl", "a", encoding="utf-8")
        self._backends = list(backends or [])
        self._finished = False
        self._last_step = 0

    def log(self, metrics: dict[str, float | str], step: int) -> None:
        self._check_open()
        step = self._last_step = int(
            step
        )  # SwanLab ignores a log whose step is not a Python int (e.g. numpy.int64)
        values = {key: _as_float(value) for key, value in metrics.items()}
        # Strict JSON has no NaN/Infinity; null keeps the file readable by jq and JavaScript. Labels such
        # as the evaluation's tag stay text: the report names its rows "baseline", "epoch 1" by them.
        row = {
            k: metrics[k] if isinstance(metrics[k], str) else _finite_or_none(v) for k, v in values.items()
        }
        _write_line(self._metrics, {"step": step, **row})
        # Backends get NaN/inf as they are (a diverging loss should show), but nothing that is not a number.
        numbers = {k: v for k, v in values.items() if v is not None}
        if numbers:
            self._forward("log", lambda b: b.log(numbers, step))

    def log_predictions(self, rows: list[dict], step: int, tag: str) -> None:
        self._check_open()
        step = int(step)
        for row in rows:
            extra = {k: v for k, v in row.items() if k not in ("prompt", "prediction", "reference")}
            record = {
                "step": step,
                "tag": tag,
                "prompt": row.get("prompt"),
                "prediction": row.get("prediction"),
                "reference": row.get("reference"),
                **extra,  # e.g. "epoch"
            }
            _write_line(self._predictions, record)
        if rows:
            self._forward("log_predictions", lambda b: b.log_predictions(rows, step, tag))

    def log_summary(self, summary: dict[str, Any], step: int | None = None) -> None:
        self._check_open()
        numbers = {f"summary/{k}": float(v) for k, v in summary.items() if _is_number(v)}
        step = self._last_step if step is None else int(step)
        if numbers:
            self._forward("log_summary", lambda b: b.log_summary(numbers, step))

    def finish(self) -> None:
        if self._finished:
            return
        self._finished = True
        # Called from a `finally:` while an exception propagates, this sees it: SwanLab then marks
        # the run crashed (or aborted on Ctrl+C) instead of finished.
        error = sys.exc_info()[1]
        backends = list(self._backends)
        self._forward("finish", lambda b: b.finish(error))
        self._backends = []
        for backend in backends:
            _say_where(backend)
        self._metrics.close()
        self._predictions.close()

    def _check_open(self) -> None:
        if self._finished:
            raise RuntimeError("the tracker is finished; build a new one for another run")

    def _forward(self, what: str, call: Callable[[_Backend], None]) -> None:
        for backend in list(self._backends):
            try:
                call(backend)
            except Exception as e:  # a tracker must never end a training run
                self._backends.remove(backend)
                self._warn(backend, what, e)

    def _warn(self, backend: _Backend, what: str, e: Exception) -> None:
        logger.warning(
            "%s failed in %s (%s: %s); it is turned off for the rest of this run. "
            "Metrics are still written to %s.",
            backend.name,
            what,
            type(e).__name__,
            e,
            self.run_dir / "metrics.jsonl",
        )
        if what != "finish":
            _close_quietly(backend)


def _say_where(backend: _Backend) -> None:
    """One line per local record a user can act on: where to view it or the command that uploads it.
    (SwanLab's and W&B's own banners are held back, so the line is ours, printed once.)"""
    from chattune.track.mlflow_run import sqlite_path

    if getattr(backend, "sync_line", None):
        _tell(backend.sync_line)
    if getattr(backend, "offline", False) and getattr(backend, "sync_dirs", None):
        folders = " ".join(shlex.quote(str(d)) for d in backend.sync_dirs)
        _tell(f"W&B (offline) run: upload it later with `wandb sync {folders}`")
    uri = getattr(backend, "uri", None)
    if uri and sqlite_path(uri) is not None:
        _tell(f"MLflow run {backend.run_id}: view with `mlflow ui --backend-store-uri {uri}`")


_held: list[str] | None = None  # while `held_run_links` is open: the lines it collects


@contextlib.contextmanager
def held_run_links() -> Iterator[list[str]]:
    """Within: the lines a finishing tracker prints about where its runs are (`swanlab sync ...`,
    `wandb sync ...`, `mlflow ui ...`) are collected into the yielded list instead of printed, so that a
    command which ends with its own summary (`chattune demo`) prints them there, last and once."""
    global _held
    outer, _held = _held, []
    held = _held
    try:
        yield held
    except BaseException:  # the command won't reach its summary (Ctrl-C, an error): say them now
        _held = outer
        for line in held:
            _tell(line)
        raise
    finally:
        _held = outer


def _tell(line: str) -> None:
    if _held is not None:
        _held.append(line)
    else:
        say_once(line)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _start(name: str, build: Callable[[], _Backend | None], required: bool = False) -> _Backend | None:
    try:
        return build()
    # SystemExit too: swanlab's login prompt can sys.exit, and that must not end the run either.
    except (Exception, SystemExit) as e:
        if required:
            raise TrackerError(
                f"{name} could not start ({type(e).__name__}: {e}); the run stops before training so that it "
                "does not end without the record asked for. Fix the cause, or set track.required: false to "
                "train with metrics.jsonl only (track.backend: none turns the tracker off)"
            ) from None
        logger.warning(
            "%s could not start (%s: %s); this run is tracked in metrics.jsonl only.",
            name,
            type(e).__name__,
            e,
        )
        return None


def _close_quietly(backend: _Backend) -> None:
    # Best effort after a failure: free the writer and swanlab's exit hooks; we already warned once.
    try:
        backend.finish(None)
    except Exception:
        pass


def _write_line(fp: TextIO, record: dict[str, Any]) -> None:
    fp.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")
    fp.flush()  # a crashed or still-running run can be read up to its last step


def _as_float(value: Any) -> float | None:
    if isinstance(value, (str, bytes)) or value is None:
        return None
    try:
        return float(value)  # also 0-d tensors and numpy scalars
    except (TypeError, ValueError):
        return None


def _finite_or_none(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None
