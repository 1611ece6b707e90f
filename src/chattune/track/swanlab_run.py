"""The SwanLab backend of `build_tracker` (the tutorials' tracker): scalars, the config, sample answers as
`swanlab.Text`. Never prompts: the mode is always explicit (`resolve_swanlab_mode`), and a cloud run that
cannot start falls back to offline. Offline runs land in `<run dir>/swanlog/` (or SWANLAB_LOG_DIR); their
`swanlab sync` command is printed once, by the tracker at the end (SwanLab's own offline banner is held back).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import shlex
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from chattune.config.schema import TrackConfig
from chattune.track.rows import PREDICTION_KEY, format_prediction

logger = logging.getLogger("chattune.track")

SwanLabMode = Literal["online", "local", "offline", "disabled"]


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
            "instead. The files are the same; the command that uploads them is printed at the end."
        )
        chosen = "offline"
    return chosen


def start_swanlab(
    cfg: TrackConfig, run_dir: Path, hparams: dict, resume_id: str | None = None
) -> SwanLabBackend | None:
    """A SwanLab run in `cfg.mode` (resolved by `resolve_swanlab_mode`); `resume_id` continues that run."""
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
            # A resumed chattune run continues its SwanLab run: same id, the new steps appended.
            id=resume_id,
            resume="allow" if resume_id else None,
            # Only an explicit `cloud` run on a real terminal may ask for a key; CI has no stdin.
            settings=swanlab.Settings(interactive=mode == "online" and cfg.mode == "cloud" and _can_prompt()),
        )

    try:
        with _offline_banner_held(mode):
            run = init(mode)
    except Exception as e:
        if mode != "online":
            raise
        # No network, no key or a bad one: keep the run's data locally rather than losing it.
        try:
            with _offline_banner_held("offline"):
                run = init("offline")
        except Exception as offline_error:
            raise RuntimeError(f"cloud: {e}; offline: {offline_error}") from offline_error
        mode = "offline"
        logger.warning(
            "SwanLab cloud could not start (%s: %s); logging offline instead to %s (the command that "
            "uploads it is printed at the end).",
            type(e).__name__,
            e,
            run.dir,
        )
    return SwanLabBackend(swanlab, run, mode)


_OFFLINE_BANNER = ("Tracking run with swanlab version", "Run data saved at", "`swanlab sync ")
"""What SwanLab 0.10 prints when an offline run starts (all three) and ends (the last): the version, the
folder and the `swanlab sync` advice, each wrapped at 80 columns off a terminal. The tracker's one line
(`sync_line`) says the folder and the command instead."""


@contextlib.contextmanager
def _offline_banner_held(mode: SwanLabMode) -> Iterator[None]:
    """Within: SwanLab's offline banner lines (`_OFFLINE_BANNER`) are not printed; everything else it
    prints (warnings, errors, other notes) is, unchanged. Other modes are left alone: their lines (the run's
    URL, `swanlab watch`) are the ones a user acts on.

    SwanLab 0.10 has no public setting that quiets its console (no env var, `Settings` field or log
    level; only SWANLAB_DEBUG, which adds output), so this reaches its private console object
    `swanlab.sdk.internal.pkg.console.c` (a rich Console) and filters through rich's public render-hook API,
    for the duration of our own `init` / `finish` call only: nothing is patched, and a SwanLab without that
    object prints its banner as before."""
    try:
        from rich.console import RenderHook
        from swanlab.sdk.internal.pkg.console import c as swanlab_console
    except ImportError:
        swanlab_console = None
    if mode != "offline" or swanlab_console is None:
        yield
        return

    class DropBanner(RenderHook):
        def process_renderables(self, renderables: list) -> list:
            def banner(r: Any) -> bool:
                plain = getattr(r, "plain", "")
                return plain.startswith("swanlab:") and any(m in plain for m in _OFFLINE_BANNER)

            return [r for r in renderables if not banner(r)]

    swanlab_console.push_render_hook(DropBanner())
    try:
        yield
    finally:
        swanlab_console.pop_render_hook()


def _can_prompt() -> bool:
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        return False
    try:
        return sys.stdin is not None and sys.stdin.isatty()
    except (ValueError, OSError):  # stdin closed
        return False


class SwanLabBackend:
    name = "SwanLab"

    def __init__(self, swanlab: Any, run: Any, mode: SwanLabMode):
        self._swanlab = swanlab
        # Log through our Run object, not the module-level `swanlab.log`, so another run can't steal our data.
        self._run = run
        self._mode = mode
        self.run_id: str | None = getattr(run, "id", None)

    @property
    def sync_line(self) -> str | None:
        """For an offline run, the one line that says how to upload it (`swanlab sync <its folder>`)."""
        run_dir = getattr(self._run, "dir", None)
        if self._mode != "offline" or not run_dir:
            return None
        # A resumed run logs into a second folder with the same id (run-<time>-<id>): sync needs both.
        here = Path(run_dir)
        folders = (sorted(here.parent.glob(f"run-*{self.run_id}")) if self.run_id else []) or [here]
        return f"SwanLab (offline) run: upload it later with `swanlab sync {' '.join(shlex.quote(str(f)) for f in folders)}`"

    def log(self, metrics: dict[str, float], step: int) -> None:
        self._run.log(metrics, step=step)

    def log_predictions(self, rows: list[dict], step: int, tag: str) -> None:
        texts = [self._swanlab.Text(format_prediction(row), caption=tag) for row in rows]
        self._run.log({PREDICTION_KEY: texts}, step=step)

    def log_summary(self, summary: dict[str, float], step: int) -> None:
        self.log(summary, step)

    def finish(self, error: BaseException | None) -> None:
        with _offline_banner_held(self._mode):
            if error is None:
                self._run.finish()
                return
            state = "aborted" if isinstance(error, KeyboardInterrupt) else "crashed"
            self._run.finish(state=state, error="".join(traceback.format_exception(error)))
