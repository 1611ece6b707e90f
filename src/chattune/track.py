"""Run tracking: where `train.run` sends its metrics and sample predictions, the last stage of a run.

`build_tracker(cfg.track, run_dir, hparams)` always appends `metrics.jsonl` and `predictions.jsonl` in
the run dir and mirrors them to SwanLab or TensorBoard. This is the only module that imports swanlab or
tensorboard. A backend that cannot start stops the run before training (`TrackerError`), unless
`track.required: false`; one that fails later warns once and is dropped, so a running training is never
stopped by its tracker.
"""

from __future__ import annotations

import html
import importlib.util
import json
import logging
import math
import os
import shutil
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, Protocol, TextIO

from chattune.config.schema import TrackConfig
from chattune.errors import ChattuneError

logger = logging.getLogger(__name__)

SwanLabMode = Literal["online", "local", "offline", "disabled"]
PREDICTION_KEY = "Prediction"
"""Media key of the sample predictions in SwanLab and TensorBoard (the tutorials' name)."""


class Tracker(Protocol):
    def log(self, metrics: dict[str, float | str], step: int) -> None:
        """Record namespaced scalars (`train/loss`, `eval/loss`, ...) at optimizer step `step`.

        A string value (e.g. `tag: "epoch 1"`) labels the row in metrics.jsonl; backends get numbers only.
        """
        ...

    def log_predictions(self, rows: list[dict], step: int, tag: str) -> None:
        """Record generated samples: rows of {prompt, prediction, reference[, epoch]}; `tag` e.g. "epoch 1"."""
        ...

    def finish(self) -> None:
        """Flush and close everything; safe to call twice."""
        ...


# -- the tracker ----------------------------------------------------------------------------------------
class _Backend(Protocol):
    name: str

    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def log_predictions(self, rows: list[dict], step: int, tag: str) -> None: ...

    def finish(self, error: BaseException | None) -> None: ...


class TrackerError(ChattuneError):
    """The tracker the config asks for (`track.backend`, with `track.required`) could not start."""


def build_tracker(cfg: TrackConfig, run_dir: Path, hparams: dict) -> Tracker:
    """JSONL files in `run_dir` plus the backend `cfg.backend`; `hparams` is shown as the run's config.

    Raises `TrackerError` when the backend cannot start and `cfg.required` (removing `run_dir` again if
    this call created it, so the failed start leaves nothing behind)."""
    run_dir = Path(run_dir)
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    # Backends want JSON-like values; a Path or tuple in hparams must not cost us the whole backend.
    hparams = json.loads(json.dumps(hparams, default=str))
    backend: _Backend | None = None
    try:
        if cfg.backend == "swanlab":
            backend = _start("SwanLab", lambda: _start_swanlab(cfg, run_dir, hparams), cfg.required)
        elif cfg.backend == "tensorboard":
            build = lambda: _TensorBoardBackend(run_dir / "tensorboard", hparams)  # noqa: E731
            backend = _start("TensorBoard", build, cfg.required)
    except TrackerError:
        if created:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    return RunTracker(run_dir, backend)


class RunTracker:
    """Writes metrics.jsonl / predictions.jsonl (flushed per line) and forwards to at most one backend."""

    def __init__(self, run_dir: Path, backend: _Backend | None = None):
        self.run_dir = Path(run_dir)
        # Appended, not truncated: a resumed run keeps one history; a fresh run gets a fresh run_dir.
        self._metrics: TextIO = open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8")
        self._predictions: TextIO = open(self.run_dir / "predictions.jsonl", "a", encoding="utf-8")
        self._backend = backend
        self._finished = False

    def log(self, metrics: dict[str, float | str], step: int) -> None:
        self._check_open()
        step = int(step)  # SwanLab ignores a log whose step is not a Python int (e.g. numpy.int64)
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

    def finish(self) -> None:
        if self._finished:
            return
        self._finished = True
        # Called from a `finally:` while an exception propagates, this sees it: SwanLab then marks
        # the run crashed (or aborted on Ctrl+C) instead of finished.
        error = sys.exc_info()[1]
        self._forward("finish", lambda b: b.finish(error))
        self._backend = None
        self._metrics.close()
        self._predictions.close()

    def _check_open(self) -> None:
        if self._finished:
            raise RuntimeError("the tracker is finished; build a new one for another run")

    def _forward(self, what: str, call: Callable[[_Backend], None]) -> None:
        backend = self._backend
        if backend is None:
            return
        try:
            call(backend)
        except Exception as e:  # a tracker must never end a training run
            self._backend = None
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


# -- SwanLab ----------------------------------------------------------------------------------------------
def resolve_swanlab_mode(mode: str) -> SwanLabMode:
    """Our `track.mode` -> the mode passed to `swanlab.init` (always explicit: without one, swanlab prompts).

    `auto`: whatever swanlab's own settings name (SWANLAB_MODE, swanlab.yaml, .env), else `online` when an
    API key is configured (SWANLAB_API_KEY, or the ~/.swanlab/.netrc that `swanlab login` writes), else
    `offline`. `auto` never resolves to `online` without a key, so it never prompts. `local` needs the
    swanboard dashboard package; without it we log `offline`, which writes the same files.
    """
    import swanlab

    chosen: SwanLabMode
    if mode == "cloud":
        chosen = "online"
    elif mode in ("local", "offline", "disabled"):
        chosen = mode  # type: ignore[assignment]
    elif mode == "auto":
        # swanlab.Settings reads every place swanlab keeps a key or a mode: env vars, .env, secrets,
        # swanlab.yaml, ~/.swanlab/config.yaml, and the netrc files in ./.swanlab and ~/.swanlab ($SWANLAB_ROOT).
        settings = swanlab.Settings()
        has_key = bool(settings.api_key)
        if "mode" in settings.model_fields_set and (settings.mode != "online" or has_key):
            chosen = settings.mode
        else:
            chosen = "online" if has_key else "offline"
    else:
        raise ValueError(f"unknown track.mode {mode!r}")
    if chosen == "local" and importlib.util.find_spec("swanboard") is None:
        logger.warning(
            "SwanLab local mode needs the dashboard (pip install 'swanlab[dashboard]'); logging offline "
            "instead. The files are the same; upload them later with `swanlab sync`."
        )
        chosen = "offline"
    return chosen


def format_prediction(row: dict) -> str:
    """One sample in the tutorials' shape: question, model answer, reference answer."""
    parts = [f"问题：{row.get('prompt', '')}", f"模型回答：{row.get('prediction', '')}"]
    if row.get("reference") is not None:
        parts.append(f"参考答案：{row['reference']}")
    return "\n\n".join(parts)


def _start_swanlab(cfg: TrackConfig, run_dir: Path, hparams: dict) -> _SwanLabBackend | None:
    import swanlab

    mode = resolve_swanlab_mode(cfg.mode)
    if mode == "disabled":
        return None  # don't even init: swanlab installs exit and signal hooks
    # SWANLAB_LOG_DIR (or the older SWANLAB_LOGDIR) wins; swanlab reads it itself when log_dir is None.
    env_dir = os.environ.get("SWANLAB_LOG_DIR") or os.environ.get("SWANLAB_LOGDIR")
    log_dir = None if env_dir else str(run_dir / "swanlog")

    def init(mode: SwanLabMode) -> Any:
        return swanlab.init(
            mode=mode,
            log_dir=log_dir,
            project=cfg.project,
            name=cfg.experiment,
            description=cfg.description,
            tags=list(cfg.tags) or None,
            group=cfg.group,
            config=hparams,
            # Only an explicit `cloud` run on a real terminal may ask for a key; CI has no stdin.
            settings=swanlab.Settings(interactive=mode == "online" and cfg.mode == "cloud" and _can_prompt()),
        )

    try:
        run = init(mode)
    except Exception as e:
        if mode != "online":
            raise
        # No network, no key or a bad one: keep the run's data locally rather than losing it.
        try:
            run = init("offline")
        except Exception as offline_error:
            raise RuntimeError(f"cloud: {e}; offline: {offline_error}") from offline_error
        logger.warning(
            "SwanLab cloud could not start (%s: %s); logging offline instead to %s. Upload it later with "
            "`swanlab sync %s`.",
            type(e).__name__,
            e,
            run.dir,
            run.dir,
        )
    return _SwanLabBackend(swanlab, run)


def _can_prompt() -> bool:
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        return False
    try:
        return sys.stdin is not None and sys.stdin.isatty()
    except (ValueError, OSError):  # stdin closed
        return False


class _SwanLabBackend:
    name = "SwanLab"

    def __init__(self, swanlab: Any, run: Any):
        self._swanlab = swanlab
        # Log through our Run object, not the module-level `swanlab.log`, so another run can't steal our data.
        self._run = run

    def log(self, metrics: dict[str, float], step: int) -> None:
        self._run.log(metrics, step=step)

    def log_predictions(self, rows: list[dict], step: int, tag: str) -> None:
        texts = [self._swanlab.Text(format_prediction(row), caption=tag) for row in rows]
        self._run.log({PREDICTION_KEY: texts}, step=step)

    def finish(self, error: BaseException | None) -> None:
        if error is None:
            self._run.finish()
            return
        state = "aborted" if isinstance(error, KeyboardInterrupt) else "crashed"
        self._run.finish(state=state, error="".join(traceback.format_exception(error)))


# -- TensorBoard ------------------------------------------------------------------------------------------
class _TensorBoardBackend:
    name = "TensorBoard"

    def __init__(self, log_dir: Path, hparams: dict):
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(log_dir=str(log_dir))
        # add_hparams would start a second run dir; the config as text sits beside the scalars instead.
        config = json.dumps(hparams, indent=2, ensure_ascii=False)
        self._writer.add_text("hparams", f"```json\n{config}\n```", global_step=0)

    def log(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self._writer.add_scalar(key, value, global_step=step)

    def log_predictions(self, rows: list[dict], step: int, tag: str) -> None:
        self._writer.add_text(PREDICTION_KEY, _markdown_table(rows, f"{tag} (step {step})"), global_step=step)

    def finish(self, error: BaseException | None) -> None:
        self._writer.close()


def _markdown_table(rows: list[dict], title: str) -> str:
    """Predictions as a markdown table for TensorBoard's text tab (which renders markdown, not raw HTML)."""
    lines = [f"**{_cell(title)}**", "", "| prompt | prediction | reference |", "| --- | --- | --- |"]
    for row in rows:
        lines.append(
            "| " + " | ".join(_cell(row.get(k)) for k in ("prompt", "prediction", "reference")) + " |"
        )
    return "\n".join(lines)


def _cell(value: Any) -> str:
    # A newline or `|` would end the table row; `<` would be read as a tag and stripped by TensorBoard.
    text = "" if value is None else str(value)
    return html.escape(text, quote=False).replace("|", "\\|").replace("\r\n", "\n").replace("\n", "<br>")
