"""The MLflow backend of `build_tracker`: params, metrics, the sample answers as an MLflow table.

Offline by default: a SQLite store at `<run dir>/mlflow.db` (MLflow's file store is deprecated), artifacts
in `<run dir>/mlartifacts/`, unless `track.uri` or MLFLOW_TRACKING_URI names another store or a server.
Uses `MlflowClient` with the run id (no fluent global state), so nothing else in the process logs into
our run. View: `mlflow ui --backend-store-uri sqlite:///<run dir>/mlflow.db`.
"""

from __future__ import annotations

import logging
import os
import re
import time
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from chattune.config.schema import TrackConfig
from chattune.track.rows import SAMPLE_COLUMNS, flatten_config, sample_table

SAMPLES_DIR = "samples"
"""Artifact folder of the sample-answer tables: `samples/step_<step>.json`, one MLflow table per evaluation
(one file each: appending to one table would make `log_table` download it again every time)."""
_MAX_PARAM_CHARS = 6000  # MLflow's limit on a parameter value (3.x); longer values are cut with a note
_BAD_KEY_CHARS = re.compile(r"[^0-9A-Za-z_\-. /]")  # MLflow's allowed characters in param/metric keys


def tracking_uri(cfg: TrackConfig, run_dir: Path) -> str:
    """`track.uri`, else MLFLOW_TRACKING_URI, else `sqlite:///<run dir>/mlflow.db` (absolute)."""
    if cfg.uri:
        return cfg.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{(Path(run_dir) / 'mlflow.db').resolve()}"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///...` URI, else None."""
    parsed = urlparse(uri)
    if parsed.scheme != "sqlite":
        return None
    return Path(unquote(parsed.path))


def start_mlflow(
    cfg: TrackConfig, run_dir: Path, hparams: dict, resume_id: str | None = None
) -> MlflowBackend:
    """Open (or continue, `resume_id`) a run in experiment `track.group` or else `track.project`.

    An unreachable server fails here, in seconds (one try, 10 s timeout unless MLflow's own
    MLFLOW_HTTP_REQUEST_* variables say otherwise), so the run stops before training."""
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(cfg, run_dir)
    db = sqlite_path(uri)
    artifacts = None
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
        artifacts = (db.parent / "mlartifacts").resolve().as_uri()
    # "Creating initial MLflow database tables..." is news to nobody: a new store is made in every run dir.
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    with _quick_http():
        client = MlflowClient(tracking_uri=uri)
        name = cfg.group or cfg.project
        experiment = client.get_experiment_by_name(name)
        experiment_id = (
            experiment.experiment_id
            if experiment is not None
            else client.create_experiment(name, artifact_location=artifacts)
        )
        run, resumed = None, False
        if resume_id:
            try:
                run = client.get_run(resume_id)
                client.update_run(resume_id, status="RUNNING")
                resumed = True
            except Exception:  # the old run is gone (another store): a new one that names it
                run = None
        if run is None:
            tags = {tag: "" for tag in cfg.tags}
            if cfg.description:
                tags["mlflow.note.content"] = cfg.description
            if cfg.group:
                tags["chattune.group"] = cfg.group
            if resume_id:
                tags["chattune.resumed_from"] = resume_id
            run = client.create_run(experiment_id, run_name=cfg.experiment, tags=tags)
        backend = MlflowBackend(client, run.info.run_id, uri)
        backend.log_params(hparams, skip_existing=resumed)
    return backend


class _quick_http:
    """One HTTP try with a 10 s timeout while starting, unless the user set MLflow's own variables."""

    _VARS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}

    def __enter__(self) -> None:
        self._set = [k for k in self._VARS if k not in os.environ]
        for k in self._set:
            os.environ[k] = self._VARS[k]

    def __exit__(self, *exc: Any) -> None:
        for k in self._set:
            os.environ.pop(k, None)


class MlflowBackend:
    name = "MLflow"

    def __init__(self, client: Any, run_id: str, uri: str):
        self._client = client
        self.run_id = run_id
        self.uri = uri

    def log_params(self, hparams: dict, skip_existing: bool = False) -> None:
        from mlflow.entities import Param

        params = {}
        for key, value in flatten_config(hparams).items():
            text = "null" if value is None else str(value)
            if len(text) > _MAX_PARAM_CHARS:
                text = text[: _MAX_PARAM_CHARS - 40] + f"... ({len(text)} characters, cut)"
            params[_key(key)] = text
        if skip_existing:  # MLflow params are immutable: a resumed run keeps the values it started with
            have = self._client.get_run(self.run_id).data.params
            params = {k: v for k, v in params.items() if k not in have}
        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self._client.log_batch(self.run_id, params=items[i : i + 100])

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(_key(k), float(v), now, step) for k, v in metrics.items()]
        self._client.log_batch(self.run_id, metrics=batch)

    def log_predictions(self, rows: list[dict], step: int, tag: str) -> None:
        table = sample_table(rows, step, tag)
        data = {col: [row[i] for row in table] for i, col in enumerate(SAMPLE_COLUMNS)}
        self._client.log_table(self.run_id, data=data, artifact_file=f"{SAMPLES_DIR}/step_{step:07d}.json")

    def log_summary(self, summary: dict[str, float], step: int) -> None:
        self.log(summary, step)

    def finish(self, error: BaseException | None) -> None:
        status = (
            "FINISHED" if error is None else "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
        )
        self._client.set_terminated(self.run_id, status=status)


def _key(key: str) -> str:
    return _BAD_KEY_CHARS.sub("_", key)[:250]
