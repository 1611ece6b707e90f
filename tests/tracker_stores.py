"""Readers of the trackers' own stores, for the tests: MLflow, W&B offline runs, Trackio.

MLflow through `MlflowClient` and `mlflow.artifacts`; W&B's offline record log parsed into W&B's own
`Record` protobufs (wandb 0.31 dropped its Python reader of that file; the framing is LevelDB's log);
Trackio through its `SQLiteStorage`. Imported by test_trackers.py and test_sweep.py.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

PREDICTION = "Prediction"  # chattune.track.PREDICTION_KEY


# -- the trackers' own stores, read back ----------------------------------------------------------------
def read_mlflow(db: Path) -> dict:
    """{experiment, run, metrics: {key: [(step, value)]}, params, samples: [rows]} of the one run in `db`."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert len(runs) == 1, runs
    return read_mlflow_run(client, runs[0])


def read_mlflow_run(client, run) -> dict:
    """One MLflow run as plain data: its experiment's name, metric histories, params, sample-table rows."""
    import mlflow.artifacts

    metrics = {
        key: [
            (m.step, m.value) for m in sorted(client.get_metric_history(run.info.run_id, key), key=_by_step)
        ]
        for key in run.data.metrics
    }
    samples = []
    for item in client.list_artifacts(run.info.run_id, "samples"):
        table = mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/{item.path}")
        samples += [dict(zip(table["columns"], row, strict=True)) for row in table["data"]]
    name = client.get_experiment(run.info.experiment_id).name
    return {"experiment": name, "run": run, "metrics": metrics, "params": run.data.params, "samples": samples}


def _by_step(metric):
    return (metric.step, metric.timestamp)


def wandb_records(path: Path):
    """W&B's `Record` protobufs from an offline `.wandb` file: a 7-byte header (`:W&B`, magic, version),
    then LevelDB log framing: 32 KiB blocks of chunks (crc32 4, length 2, type 1: full/first/middle/last)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, chunks = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pos += 7
        if kind == 0 and length == 0:
            pos += left - 7
            continue
        chunks += data[pos : pos + length]
        pos += length
        if kind in (1, 4):  # full, last
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            chunks = b""
            yield record


def read_wandb(run_folder: Path) -> dict:
    """{run, config, history: {key: [(step, value)]}, samples: [rows], summary} of one offline run."""
    (log,) = run_folder.glob("run-*.wandb")
    run, history, summary, samples = None, {}, {}, []
    for record in wandb_records(log):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
        elif kind == "history":
            row = {
                item.key or "/".join(item.nested_key): json.loads(item.value_json)
                for item in record.history.item
            }
            step = row["_step"]
            for key, value in row.items():
                if not key.startswith(("_", f"{PREDICTION}/")):  # W&B's own (_step, ...) and the table
                    history.setdefault(key, []).append((step, value))
            if f"{PREDICTION}/path" in row:
                table = json.loads(
                    (run_folder / "files" / row["Prediction/path"]).read_text(encoding="utf-8")
                )
                samples += [dict(zip(table["columns"], r, strict=True)) for r in table["data"]]
        elif kind == "summary":
            summary.update(
                {item.key: json.loads(item.value_json) for item in record.summary.update if item.key}
            )
    assert run is not None
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    return {"run": run, "config": config, "history": history, "samples": samples, "summary": summary}


def read_trackio(project: str, name: str) -> dict:
    """{config, metrics: {key: [(step, value)]}, samples: [rows]} through Trackio's own storage."""
    from trackio.sqlite_storage import SQLiteStorage

    metrics, samples = {}, []
    for log in SQLiteStorage.get_logs(project, name):
        for key, value in log.items():
            if key.startswith(("train/", "eval/", "summary/")):
                metrics.setdefault(key, []).append((log["step"], value))
            elif key == "Prediction":
                samples += value["_value"]
    return {"config": SQLiteStorage.get_run_config(project, name), "metrics": metrics, "samples": samples}
