"""Helpers of the UI tests (test_ui_api.py, test_ui_browser.py): real training runs on builtin:tiny-qwen2
with a few real 甄嬛 records, started as `chattune train` processes, and waits on what they write."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

from conftest import REPO, write_huanhuan_slice

from chattune.ui.launch import cli_argv

SRC = REPO / "src"


def child_env() -> dict:
    """This test process's environment for the `chattune train` children (the checkout's code)."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}


def form_values(data: Path, output_dir: Path, *, max_steps: int) -> dict:
    """The run form's values for a small CPU run: one loss point a step, one sample answer."""
    return {
        "data.train_path": str(data),
        "data.eval_ratio": "0.2",
        "data.max_len": "96",
        "train.output_dir": str(output_dir),
        "train.max_steps": str(max_steps),
        "train.micro_batch_size": "2",
        "train.grad_accum_steps": "1",
        "train.logging_steps": "1",
        "train.save_steps": "2",
        "eval.samples": "1",
        "eval.max_new_tokens": "4",
        "eval.max_eval_examples": "4",
    }


def shell_run(runs_dir: Path, name: str, *, max_steps: int = 2) -> Path:
    """A finished run started from the shell (`chattune train CONFIG`), as a user would: the UI must show
    it like one of its own. Returns the run directory."""
    data = write_huanhuan_slice(runs_dir.parent, 20)
    out = runs_dir / name
    tree = {}
    for key, text in form_values(data, out, max_steps=max_steps).items():
        sec, leaf = key.split(".")
        tree.setdefault(sec, {})[leaf] = text if leaf in ("train_path", "output_dir") else json.loads(text)
    config = runs_dir.parent / f"{name}.yaml"
    config.write_text(json.dumps(tree), encoding="utf-8")  # JSON is YAML
    subprocess.run(
        cli_argv("train", str(config)),
        env=child_env(),
        check=True,
        capture_output=True,
        timeout=600,
    )
    return out


def train_rows(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return 0
    return sum('"train/loss"' in line for line in path.read_text(encoding="utf-8").splitlines())


def wait_for(condition, timeout: float, what: str, every: float = 0.3):
    """Poll `condition()` until it is truthy; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
