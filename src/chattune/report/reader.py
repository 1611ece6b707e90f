"""Read a run directory as the pages show it: config.yaml, metrics.jsonl, predictions.jsonl, summary.json.

Shared by the run report (`report.run_report`) and the compare page (`report.compare`); a torn or missing
file becomes a note on the page, never a traceback.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chattune.adapter import read_inference_info
from chattune.errors import ChattuneError

NOT_RECORDED = "not recorded"


BASELINE_TAG = "baseline"


# ---- reading the run directory ---------------------------------------------------------------


@dataclass
class RunRecord:
    config_text: str | None = None
    train_rows: list[dict[str, Any]] = field(default_factory=list)
    eval_rows: list[dict[str, Any]] = field(default_factory=list)  # one per evaluation, merged
    predictions: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # what could not be read, shown at the end


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def read_jsonl(path: Path, notes: list[str]) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows, bad = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            bad += 1  # e.g. the last line of a run killed mid-write
            continue
        if isinstance(row, dict):
            rows.append(row)
        else:
            bad += 1
    if bad:
        notes.append(f"{path.name}: {bad} unreadable line(s) skipped")
    return rows


RUN_FILES = ("config.yaml", "metrics.jsonl", "summary.json", "predictions.jsonl")


def check_run_dir(run_dir: Path) -> None:
    """Refuse a folder that is not a training run's output folder (none of `RUN_FILES` in it), before a
    report or a comparison is written into or about it. Raises ChattuneError naming the folder."""
    if not run_dir.is_dir():
        raise ChattuneError(f"{run_dir}: not a directory (expected a training run's output folder)")
    if not any((run_dir / name).is_file() for name in RUN_FILES):
        raise ChattuneError(
            f"{run_dir}: holds none of {', '.join(RUN_FILES)}; is it a run's train.output_dir?"
        )


def read_run(run_dir: Path) -> RunRecord:
    run = RunRecord()
    config = run_dir / "config.yaml"
    if config.is_file():
        # Shown as written rather than re-dumped: it is the exact file a rerun would load.
        run.config_text = config.read_text(encoding="utf-8", errors="replace")

    summary = run_dir / "summary.json"
    if summary.is_file():
        try:
            loaded = json.loads(summary.read_text(encoding="utf-8"))
            run.summary = loaded if isinstance(loaded, dict) else {}
        except json.JSONDecodeError as e:
            run.notes.append(f"summary.json: unreadable ({e})")
    run.predictions = read_jsonl(run_dir / "predictions.jsonl", run.notes)

    # An evaluation's name by step, for metrics rows that carry no tag (runs written before tags were
    # kept in metrics.jsonl): summary.json's evaluations, else the predictions made at that step.
    evaluations = run.summary.get("evaluations")
    named = run.predictions + (evaluations if isinstance(evaluations, list) else [])
    tag_of = {r.get("step"): r["tag"] for r in named if isinstance(r, dict) and isinstance(r.get("tag"), str)}

    evals: dict[tuple[str, Any], dict[str, Any]] = {}
    for row in read_jsonl(run_dir / "metrics.jsonl", run.notes):
        step = row.get("step") if is_number(row.get("step")) else None
        if step is not None and any(k.startswith("train/") for k in row):
            run.train_rows.append(row)
        if "tag" in row or any(k.startswith("eval/") for k in row):
            tag = row.get("tag") if isinstance(row.get("tag"), str) else tag_of.get(step)
            tag = tag or (f"step {step}" if step is not None else "?")
            # The trainer may log eval loss and generation metrics of one evaluation as two rows.
            evals.setdefault((tag, step), {"tag": tag, "step": step}).update(row, tag=tag, step=step)
    run.eval_rows = sorted(evals.values(), key=lambda r: (r["step"] is None, r["step"] or 0))
    return run


def last_non_baseline(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    others = [r for r in rows if r["tag"] != BASELINE_TAG]
    # rows are sorted by step; max() keeps the later row on ties, which is the later evaluation.
    return max(reversed(others), key=lambda r: r["step"] or 0) if others else None


def safetensors_numel(path: Path) -> int | None:
    """Number of values stored in a .safetensors file, read from its JSON header (no weights are loaded)."""
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > 100 * 2**20:  # a header is kilobytes; anything else is not a safetensors file
                return None
            header = json.loads(f.read(size))
        return sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")
    except (OSError, ValueError, KeyError, TypeError, struct.error):
        return None


def param_counts(run_dir: Path) -> tuple[int | None, int | None]:
    """(trainable, base model) parameters: the adapter's saved LoRA weights, the base model's files."""
    trainable = safetensors_numel(run_dir / "adapter" / "adapter_model.safetensors")
    total = None
    try:
        info = read_inference_info(run_dir / "adapter")
        files = sorted(Path(info.base_model_path).glob("*.safetensors"))
        counts = [safetensors_numel(f) for f in files]
        total = sum(c for c in counts if c is not None) if files and None not in counts else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError, ChattuneError):
        pass
    return trainable, total
