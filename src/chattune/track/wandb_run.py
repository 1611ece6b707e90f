"""The Weights & Biases backend of `build_tracker`: config, history, the sample answers as `wandb.Table`.

Never prompts and never goes online by itself: `track.mode: auto` is offline unless WANDB_MODE says
otherwise or an API key is configured (WANDB_API_KEY, or the netrc entry `wandb login` writes);
`cloud` is online. Offline runs land in `<run dir>/wandb/offline-run-*`; `wandb sync <that folder>`
uploads one later (printed once when the run ends).
"""

from __future__ import annotations

import logging
import netrc
import os
import traceback
from pathlib import Path
from typing import Any

from chattune.config.schema import TrackConfig
from chattune.track.rows import PREDICTION_KEY, SAMPLE_COLUMNS, sample_table

logger = logging.getLogger("chattune.track")


def resolve_wandb_mode(mode: str) -> str:
    """Our `track.mode` -> W&B's mode: `online`, `offline` or `disabled` (see the module docstring)."""
    if mode == "cloud":
        return "online"
    if mode in ("local", "offline"):
        return "offline"
    if mode == "disabled":
        return "disabled"
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if env in ("online", "offline", "disabled"):
        return env if env != "online" or _has_key() else "offline"
    if env == "dryrun":
        return "offline"
    return "online" if _has_key() else "offline"


def _has_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        auth = netrc.netrc(os.environ.get("NETRC") or None)
    except (OSError, netrc.NetrcParseError):
        return False
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].rstrip("/")
    return auth.authenticators(host) is not None


def start_wandb(
    cfg: TrackConfig, run_dir: Path, hparams: dict, resume_id: str | None = None
) -> WandbBackend | None:
    """A W&B run in `run_dir/wandb/`; `resume_id` continues that run (same id)."""
    import wandb

    mode = resolve_wandb_mode(cfg.mode)
    if mode == "disabled":
        return None
    settings = wandb.Settings(
        console="off",  # chattune's own log lines stay on the terminal, not in W&B's capture
        silent=True,  # W&B's banners; chattune prints the one line that matters (`wandb sync`)
        disable_git=True,
        x_disable_stats=True,  # no system-metrics thread competing with training on a small CPU
    )

    def init(mode: str) -> Any:
        return wandb.init(
            mode=mode,
            dir=str(run_dir),
            project=cfg.project,
            name=cfg.experiment,
            notes=cfg.description,
            tags=list(cfg.tags) or None,
            group=cfg.group,
            config=hparams,
            id=resume_id,
            resume="allow" if resume_id else None,
            reinit="create_new",
            settings=settings,
        )

    try:
        run = init(mode)
    except Exception as e:
        if mode != "online":
            raise
        run = init("offline")  # no network or a bad key: keep the data locally
        logger.warning("W&B online could not start (%s: %s); logging offline instead.", type(e).__name__, e)
        mode = "offline"
    return WandbBackend(wandb, run, offline=mode == "offline")


class WandbBackend:
    name = "W&B"

    def __init__(self, wandb: Any, run: Any, offline: bool):
        self._wandb = wandb
        self._run = run  # our Run object, not the module-level wandb.log
        self.run_id: str = run.id
        self.offline = offline
        # files/ sits inside the run's folder (offline-run-<time>-<id>), the one `wandb sync` takes; a
        # resumed run writes a second such folder with the same id, and `wandb sync` needs every one.
        here = Path(run.dir).parent
        self.sync_dirs = (sorted(here.parent.glob(f"offline-run-*-{run.id}")) or [here]) if offline else []

    def log(self, metrics: dict[str, float], step: int) -> None:
        self._run.log(metrics, step=step)

    def log_predictions(self, rows: list[dict], step: int, tag: str) -> None:
        table = self._wandb.Table(columns=SAMPLE_COLUMNS, data=sample_table(rows, step, tag))
        self._run.log({PREDICTION_KEY: table}, step=step)

    def log_summary(self, summary: dict[str, float], step: int) -> None:
        self._run.summary.update(summary)

    def finish(self, error: BaseException | None) -> None:
        if error is not None:
            self._run.summary["error"] = "".join(traceback.format_exception_only(error)).strip()
        self._run.finish(exit_code=0 if error is None else 1)
