"""The Trackio backend of `build_tracker`: config, metrics, the sample answers as `trackio.Table`.

Trackio keeps every project in one local SQLite database per project under TRACKIO_DIR (default
`~/.cache/huggingface/trackio`); nothing leaves the machine unless a Space is configured, which chattune
never does. View: `trackio show --project <track.project>`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from chattune.config.schema import TrackConfig
from chattune.track.rows import PREDICTION_KEY, SAMPLE_COLUMNS, sample_table


def start_trackio(
    cfg: TrackConfig, run_dir: Path, hparams: dict, resume_id: str | None = None
) -> TrackioBackend:
    """A Trackio run named `track.experiment` (Trackio picks one if null); `resume_id` (a run name)
    continues that run."""
    import trackio

    run = trackio.init(
        project=cfg.project,
        name=resume_id or cfg.experiment,
        group=cfg.group,
        config=hparams,
        resume="allow" if resume_id else "never",
        embed=False,
        auto_log_cpu=False,  # no system-metrics thread competing with training
        auto_log_gpu=False,
    )
    return TrackioBackend(trackio, run)


class TrackioBackend:
    name = "Trackio"

    def __init__(self, trackio: Any, run: Any):
        self._trackio = trackio
        self._run = run
        self.run_id: str = run.name

    def log(self, metrics: dict[str, float], step: int) -> None:
        self._run.log(metrics, step=step)

    def log_predictions(self, rows: list[dict], step: int, tag: str) -> None:
        table = self._trackio.Table(columns=SAMPLE_COLUMNS, data=sample_table(rows, step, tag))
        self._run.log({PREDICTION_KEY: table}, step=step)

    def log_summary(self, summary: dict[str, float], step: int) -> None:
        self._run.log({f"summary/{k}": v for k, v in summary.items()}, step=step)

    def finish(self, error: BaseException | None) -> None:
        self._run.finish()
