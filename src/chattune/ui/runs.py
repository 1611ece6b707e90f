"""The runs directory as the UI sees it: every run, its state and what it has written so far.

Everything here is read from the files a run writes (config.yaml, metrics.jsonl, predictions.jsonl,
summary.json, run_state.json), plus the UI's own launch folder (`<runs>/.chattune-ui/<run>/`: the
YAML it wrote, the command it ran and that command's output), so a run started from the shell shows
up as one started here, only without a log.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from chattune.errors import ChattuneError
from chattune.train.rundir import read_run_state

UI_DIR = ".chattune-ui"  # the UI's launch folders, inside the runs directory
_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+-]{0,127}")  # one folder name of a run id


class PathRefused(ChattuneError):
    """A run id or file name that names something outside the runs directory, or nothing."""


def check_run_id(runs_dir: Path, run_id: str) -> Path:
    """The run directory named by `run_id` ("name", or "sweep/variant"), which must lie inside
    `runs_dir`: plain folder names only (no "..", no leading dot, no absolute path, no symlink out).
    Raises PathRefused."""
    parts = run_id.split("/")
    if not 1 <= len(parts) <= 2 or not all(_PART.fullmatch(p) for p in parts):
        raise PathRefused(
            f"run id {run_id[:100]!r}: use folder names inside the runs directory (letters, digits, . _ + -)"
        )
    root = runs_dir.resolve()
    path = (root / run_id).resolve()
    if not path.is_relative_to(root) or path == root:
        raise PathRefused(f"run id {run_id[:100]!r} leads outside the runs directory")
    return path


def launch_dir(runs_dir: Path, run_id: str) -> Path:
    """The UI's folder for one run: the YAML it wrote, launch.json and train.log."""
    return runs_dir / UI_DIR / run_id


def _is_run(path: Path) -> bool:
    return any((path / name).exists() for name in ("config.yaml", "metrics.jsonl", "run_state.json"))


def list_run_ids(runs_dir: Path) -> list[str]:
    """Run directories under `runs_dir` (and one level deeper, for a sweep's variants), and runs the UI
    launched that have not yet written anything; newest first."""
    found: dict[str, float] = {}
    if runs_dir.is_dir():
        for child in runs_dir.iterdir():
            if child.is_symlink() or not child.is_dir() or not _PART.fullmatch(child.name):
                continue  # a link may lead out of the runs directory: not listed, not served
            if _is_run(child):
                found[child.name] = child.stat().st_mtime
            for grand in child.iterdir() if not _is_run(child) else []:
                if (
                    not grand.is_symlink()
                    and grand.is_dir()
                    and _PART.fullmatch(grand.name)
                    and _is_run(grand)
                ):
                    found[f"{child.name}/{grand.name}"] = grand.stat().st_mtime
    ui = runs_dir / UI_DIR
    for launch in ui.glob("**/launch.json") if ui.is_dir() else []:
        run_id = launch.parent.relative_to(ui).as_posix()
        found.setdefault(run_id, launch.stat().st_mtime)
    return sorted(found, key=lambda r: -found[r])


def read_launch(runs_dir: Path, run_id: str) -> dict | None:
    try:
        record = json.loads((launch_dir(runs_dir, run_id) / "launch.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def pid_is_training(pid: Any) -> bool:
    """Whether `pid` is a live (not zombie) chattune process that trains (`chattune train`, `demo` or
    `sweep`): a pid read from a file is never trusted to be ours (it may have been reused)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    if "\nState:\tZ" in status:
        return False
    return any(b"chattune" in part for part in cmdline) and any(
        c in cmdline for c in (b"train", b"demo", b"sweep")
    )


def run_state(run_dir: Path, launch: dict | None) -> tuple[str, str]:
    """(state, why): starting / running / finished / interrupted / failed / unknown."""
    recorded = read_run_state(run_dir)
    launched_at = launch.get("time", 0) if launch else 0
    if recorded is not None and recorded.get("time", 0) >= launched_at - 1:
        state = recorded["state"]
        if state == "running" and not pid_is_training(recorded["pid"]):
            if launch and launch.get("stop_requested"):
                return "interrupted", "stopped from the UI"
            return "failed", "its process is gone without recording an end (killed?)"
        return state, str(recorded.get("error", ""))
    if launch is not None:  # launched, and the run has not written its state yet (or never will)
        if pid_is_training(launch.get("pid")):
            return "starting", "reading the data and loading the model"
        if launch.get("stop_requested"):
            return "interrupted", "stopped from the UI before training started"
        return "failed", "the command ended before training started: see the log"
    if (run_dir / "summary.json").is_file():
        return "finished", ""
    return "unknown", "no run_state.json (a run from an older chattune, or still running)"


@dataclass
class Tail:
    """New complete lines of a JSONL file since the last read; starts over when the file shrinks
    (a resumed run rewrites metrics.jsonl up to its checkpoint)."""

    path: Path
    offset: int = 0
    reset: bool = field(default=False)

    def read(self) -> list[dict]:
        try:
            size = self.path.stat().st_size
        except OSError:
            size = 0
        self.reset = size < self.offset
        if self.reset:
            self.offset = 0
        if size == self.offset:
            return []
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            chunk = f.read(size - self.offset)
        end = chunk.rfind(b"\n") + 1  # a last line still being written waits for the next read
        self.offset += end
        rows = []
        for line in chunk[:end].splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict):
                rows.append(row)
        return rows


def read_log_tail(path: Path, lines: int = 40, max_bytes: int = 64_000) -> str:
    """The last `lines` lines of a command's output; a progress bar's carriage-return updates are
    shown as their latest state."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, path.stat().st_size - max_bytes))
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    shown = [line.rstrip("\r").split("\r")[-1] for line in text.split("\n")]
    return "\n".join(shown[-lines:])


def _read_json(path: Path) -> dict:
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def read_config_tree(run_dir: Path) -> dict:
    try:
        tree = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    return tree if isinstance(tree, dict) else {}


def run_overview(runs_dir: Path, run_id: str) -> dict:
    """One row of the runs table: state, model, data, steps, best eval loss, time, report."""
    run_dir = check_run_id(runs_dir, run_id)
    launch = read_launch(runs_dir, run_id)
    state, why = run_state(run_dir, launch)
    tree = read_config_tree(run_dir)
    if not tree and launch:  # not started yet: the YAML the UI wrote
        try:
            tree = yaml.safe_load(Path(launch["config_path"]).read_text(encoding="utf-8")) or {}
        except (OSError, KeyError, TypeError, yaml.YAMLError):
            tree = {}
    summary = _read_json(run_dir / "summary.json")
    steps, best, last_time = None, None, None
    metrics = run_dir / "metrics.jsonl"
    for row in Tail(metrics).read() if metrics.is_file() else []:
        if isinstance(row.get("step"), int) and any(k.startswith("train/") for k in row):
            steps = row["step"]
        loss = row.get("eval/loss")
        if isinstance(loss, int | float) and (best is None or loss < best):
            best = loss
    if metrics.is_file():
        last_time = metrics.stat().st_mtime
    section = lambda name: tree.get(name) if isinstance(tree.get(name), dict) else {}  # noqa: E731
    return {
        "id": run_id,
        "path": str(run_dir),
        "state": state,
        "why": why,
        "model": section("model").get("name_or_path"),
        "data": section("data").get("train_path"),
        "steps": summary.get("steps", steps),
        "best_eval_loss": best,
        "wall_s": summary.get("wall_s"),
        "updated": last_time or (launch or {}).get("time"),
        "report": (run_dir / "report.html").is_file(),
        "adapter": (run_dir / "adapter" / "adapter_config.json").is_file(),
        "launched_here": launch is not None,
    }


def tracker_location(config: dict, run_dir: Path) -> str | None:
    """Where the run's trackers write, as `chattune.track` chose it: SwanLab's SWANLAB_LOG_DIR (this UI's
    environment, which the runs it starts inherit) or `<run>/swanlog`; TensorBoard's `<run>/tensorboard`;
    MLflow's `track.uri` or `<run>/mlflow.db`; W&B's `<run>/wandb`; Trackio's TRACKIO_DIR."""
    track = config.get("track") if isinstance(config.get("track"), dict) else {}
    backend = track.get("backend")
    names = backend if isinstance(backend, list) else [backend]
    places = []
    for name in names:
        if name == "swanlab":
            where = (
                os.environ.get("SWANLAB_LOG_DIR")
                or os.environ.get("SWANLAB_LOGDIR")
                or str(run_dir / "swanlog")
            )
            places.append(f"SwanLab ({track.get('mode', 'auto')}): {where}")
        elif name == "tensorboard":
            places.append(f"TensorBoard: {run_dir}")
        elif name == "mlflow":
            places.append(
                f"MLflow: {track.get('uri') or os.environ.get('MLFLOW_TRACKING_URI') or run_dir / 'mlflow.db'}"
            )
        elif name == "wandb":
            places.append(f"W&B: {run_dir / 'wandb'}")
        elif name == "trackio":
            places.append(f"Trackio: project {track.get('project', 'chattune')}")
    return "; ".join(places) or None


def progress(config: dict, train_rows: list[dict], started: float | None) -> dict:
    """Progress (0-1) and ETA (seconds) from the last train row: its step over train.max_steps, else its
    train/epoch over train.epochs; the ETA assumes the pace so far."""
    tc = config.get("train") if isinstance(config.get("train"), dict) else {}
    if not train_rows:
        return {"fraction": 0.0, "eta_s": None}
    last = train_rows[-1]
    fraction = None
    if isinstance(tc.get("max_steps"), int) and tc["max_steps"] > 0:
        fraction = last.get("step", 0) / tc["max_steps"]
    elif (
        isinstance(last.get("train/epoch"), int | float)
        and isinstance(tc.get("epochs"), int | float)
        and tc["epochs"] > 0
    ):
        fraction = last["train/epoch"] / tc["epochs"]
    if fraction is None:
        return {"fraction": None, "eta_s": None}
    fraction = min(max(fraction, 0.0), 1.0)
    eta = None
    if started and 0 < fraction < 1:
        elapsed = time.time() - started
        eta = elapsed * (1 - fraction) / fraction
    return {"fraction": fraction, "eta_s": eta}


def gguf_size_estimate(run_dir: Path, dtype: str) -> int | None:
    """Bytes of the weights `chattune export <run>/adapter --dtype DTYPE` writes: the base model's tensors
    (read from its safetensors headers; LoRA merges in place, shapes unchanged), each at the type export
    gives it (`export._tensor_type`: f32 norms, q8_0 only for rows of whole blocks). The tokenizer,
    metadata and the tensors' 32-byte alignment add the rest (6 MB for Qwen2.5's vocabulary).
    None when the base model's files cannot be read."""
    import struct

    import numpy as np
    from gguf.quants import quant_shape_to_byte_shape

    from chattune.infer.export_gguf import _tensor_type

    info = _read_json(run_dir / "adapter" / "inference.json")
    base = info.get("base_model_path")
    files = sorted(Path(base).glob("*.safetensors")) if isinstance(base, str) else []
    if not files:
        return None
    total = 0
    for path in files:
        try:
            with open(path, "rb") as f:
                (size,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(size)) if size < 100 * 2**20 else None
        except (OSError, ValueError, struct.error):
            return None
        if not isinstance(header, dict):
            return None
        for name, meta in header.items():
            if name != "__metadata__":
                shape = tuple(meta["shape"])
                total += int(np.prod(quant_shape_to_byte_shape(shape, _tensor_type(shape, dtype))))
    return total
