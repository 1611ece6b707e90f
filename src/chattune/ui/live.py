"""The live run stream: server-sent events of what a run directory gains, and of a chat answer.

metrics.jsonl / predictions.jsonl --runs.Tail (new complete lines)--> `event: run` {snapshot | update}
   ... --the run ended (and its report was written)--> `event: end`. Nothing is kept per page: a reload or
a second tab gets its own snapshot of everything so far, so it re-attaches.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

from fastapi import Request

from chattune.errors import ChattuneError
from chattune.ui import runs

POLL_S = 0.5  # how often the files are looked at


def first_or_error(pieces):
    """The first event of a chat stream (in a worker thread: it loads the model and checks the
    conversation, so a bad one is a 4xx before the stream starts), or None."""
    return next(pieces, None)


async def sse_pieces(first, pieces):
    """A chat answer's events as server-sent events; each next piece is waited for in a worker thread."""

    def send(event: dict) -> str:
        return f"data: {json.dumps(event, ensure_ascii=False)}\n\n"

    sentinel = object()
    event = first
    try:
        while event is not None:
            yield send(event)
            event = await asyncio.to_thread(next, pieces, sentinel)
            if event is sentinel:
                break
    except ChattuneError as e:
        yield send({"error": str(e)})
    finally:
        pieces.close()


def _sse(event: str, data: Any) -> str:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False, allow_nan=False, default=str)}\n\n"


def _clean(rows: list[dict]) -> list[dict]:
    # JSON has no NaN / Infinity: a diverged loss is sent as null (the page shows a gap, the files keep it).
    def fix(v):
        return None if isinstance(v, float) and (v != v or v in (float("inf"), float("-inf"))) else v

    return [{k: fix(v) for k, v in row.items()} for row in rows]


async def event_stream(runs_dir: Path, run_id: str, run_dir: Path, request: Request):
    """A snapshot of the run (everything written so far), then updates as files grow; ends a little after
    the run does. A reload or a second tab gets its own snapshot: nothing is kept per page."""
    metrics, preds = runs.Tail(run_dir / "metrics.jsonl"), runs.Tail(run_dir / "predictions.jsonl")
    log_path = runs.launch_dir(runs_dir, run_id) / "train.log"
    train_rows: list[dict] = []
    kind, last_log, last_overview, ended_at = "snapshot", None, None, None
    yield "retry: 1000\n\n"
    while not await request.is_disconnected():
        new_m, new_p = metrics.read(), preds.read()
        if metrics.reset or preds.reset:  # a resume rewrote the files: start the page over
            metrics.offset = preds.offset = 0
            new_m, new_p, train_rows, kind = metrics.read(), preds.read(), [], "snapshot"
        train_rows += [r for r in new_m if any(k.startswith("train/") for k in r)]
        overview = runs.run_overview(runs_dir, run_id)
        log = runs.read_log_tail(log_path)
        if kind == "snapshot" or new_m or new_p or log != last_log or overview != last_overview:
            config = runs.read_config_tree(run_dir)
            started = _started(run_dir)
            payload = {
                "kind": kind,
                "metrics": _clean(new_m),
                "predictions": new_p,
                "overview": overview,
                "log": log,
                "progress": runs.progress(config, train_rows, started),
                "tracker": runs.tracker_location(config, run_dir),
            }
            if kind == "snapshot":
                launch_record = runs.read_launch(runs_dir, run_id) or {}
                payload["command"] = launch_record.get("command")
                payload["config_yaml"] = (
                    (run_dir / "config.yaml").read_text(encoding="utf-8")
                    if (run_dir / "config.yaml").is_file()
                    else None
                )
            yield _sse("run", payload)
            kind, last_log, last_overview = "update", log, overview
        if overview["state"] in ("finished", "interrupted", "failed"):
            ended_at = ended_at or time.monotonic()
            if time.monotonic() - ended_at > 2.0:  # the report is written just after the state
                yield _sse("end", {"state": overview["state"]})
                return
        await asyncio.sleep(POLL_S)


def _started(run_dir: Path) -> float | None:
    from chattune.train.rundir import read_run_state

    recorded = read_run_state(run_dir)
    return recorded.get("time") if recorded and recorded["state"] == "running" else None
