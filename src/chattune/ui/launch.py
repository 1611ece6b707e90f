"""Start, stop and resume runs as `chattune train` processes: the UI is a client of the CLI.

Start writes the YAML into the UI's launch folder and spawns `chattune train CONFIG` in its own
session (closing the page or stopping the UI leaves it running), its output in train.log beside
the YAML; Stop sends SIGTERM, which `chattune train` turns into a clean stop (run_state.json says
interrupted); Resume runs the run's own config.yaml with `--resume` and lets the resume rules speak.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from chattune.config.checks import check_output_dir
from chattune.config.load import _resolve_relative, config_from_dict
from chattune.errors import ChattuneError, ConfigError
from chattune.files import write_text_atomic
from chattune.ui.runs import UI_DIR, check_run_id, launch_dir, pid_is_training, read_launch, run_state

UI_DATA_DIR = f"{UI_DIR}/data"  # the configs the Data panel's commands ran on
# Children this UI process started, by run id: polled so that a finished one is reaped, not a zombie.
_CHILDREN: dict[str, subprocess.Popen] = {}


class Refused(ChattuneError):
    """A start, stop or resume that cannot be done now (409), with the reason."""


def reap() -> None:
    for run_id, child in list(_CHILDREN.items()):
        if child.poll() is not None:
            del _CHILDREN[run_id]


def cli_argv(*args: str) -> list[str]:
    """`chattune ARGS...` as a process of this Python (so the UI's environment trains), through
    `python -m chattune` where the package has a __main__, else the cli module."""
    module = "chattune" if importlib.util.find_spec("chattune.__main__") else "chattune.cli"
    return [sys.executable, "-m", module, *args]


def train_argv(config_path: Path, *extra: str) -> tuple[list[str], str]:
    """The process to spawn and the command as the user would type it in a shell."""
    argv = cli_argv("train", str(config_path), *extra)
    return argv, shlex.join(["chattune", "train", str(config_path), *extra])


def check_tree(tree: dict, runs_dir: Path) -> tuple[str, Path]:
    """Validate a config tree as `chattune train` would (config_from_dict + check_output_dir) and
    require train.output_dir inside the runs directory; return (YAML text, output directory).
    Relative paths are taken from the UI's working directory and written out absolute.
    Raises ConfigError naming the key."""
    tree = _resolve_relative(tree, Path.cwd())
    train = tree.setdefault("train", {})
    if not isinstance(train, dict):
        raise ConfigError("train", "must be a section (a mapping of keys)")
    cfg = config_from_dict(tree, "form")
    out = Path(cfg.train.output_dir).expanduser()
    out = (out if out.is_absolute() else Path.cwd() / out).resolve()
    root = runs_dir.resolve()
    if not out.is_relative_to(root) or out == root:
        raise ConfigError(
            "train.output_dir",
            f"must be a folder inside the runs directory {root} (the UI lists runs there)",
            "form",
        )
    check_run_id(runs_dir, out.relative_to(root).as_posix())
    train["output_dir"] = str(out)
    check_output_dir(config_from_dict(tree, "form").train, "form")
    return yaml.safe_dump(tree, allow_unicode=True, sort_keys=False), out


def start_run(tree: dict, runs_dir: Path) -> dict:
    """Write the YAML and spawn `chattune train` on it. Refused (409) when the output directory already
    holds a run (running or not: a new run needs an empty folder; Resume continues one)."""
    text, out = check_tree(tree, runs_dir)
    run_id = out.relative_to(runs_dir.resolve()).as_posix()
    folder = launch_dir(runs_dir, run_id)
    state, _ = run_state(out, read_launch(runs_dir, run_id))
    if state in ("starting", "running"):
        raise Refused(f"train.output_dir {out} is {state}: stop it first, or choose a new directory")
    if out.exists() and any(out.iterdir()):
        raise Refused(
            f"train.output_dir {out} already holds a run ({state}); choose a new directory, or open it and Resume"
        )
    folder.mkdir(parents=True, exist_ok=True)
    config_path = folder / "config.yaml"
    write_text_atomic(config_path, text)
    return _spawn(runs_dir, run_id, config_path, resume=False)


def resume_run(runs_dir: Path, run_id: str) -> dict:
    """`chattune train <run>/config.yaml train.output_dir=<run> --resume`; what the resume rules accept
    or refuse appears in the log."""
    out = check_run_id(runs_dir, run_id)
    state, _ = run_state(out, read_launch(runs_dir, run_id))
    if state in ("starting", "running"):
        raise Refused(f"run {run_id} is {state}; stop it before resuming")
    if state == "finished":
        raise Refused(f"run {run_id} has finished; there is nothing to resume")
    if not (out / "config.yaml").is_file():
        raise Refused(f"run {run_id} has no config.yaml to resume from")
    return _spawn(runs_dir, run_id, out / "config.yaml", resume=True, output_dir=out)


def _spawn(
    runs_dir: Path, run_id: str, config_path: Path, *, resume: bool, output_dir: Path | None = None
) -> dict:
    reap()
    folder = launch_dir(runs_dir, run_id)
    folder.mkdir(parents=True, exist_ok=True)
    extra = [f"train.output_dir={output_dir}"] if output_dir else []
    argv, shown = train_argv(config_path, *extra, *(["--resume"] if resume else []))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(folder / "train.log", "ab" if resume else "wb") as log:
        log.write(f"$ {shown}\n".encode())
        log.flush()
        child = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # not in the UI's process group: Ctrl-C on the UI leaves it training
        )
    _CHILDREN[run_id] = child
    record = {
        "pid": child.pid,
        "argv": argv,
        "command": shown,
        "config_path": str(config_path),
        "time": time.time(),
        "resume": resume,
    }
    write_text_atomic(folder / "launch.json", json.dumps(record, ensure_ascii=False))
    return {"id": run_id, "pid": child.pid, "command": shown}


DATA_COMMANDS = {  # the Data panel's buttons: `chattune data ...` on the form's config
    "check": ["check"],
    "stats": ["stats"],
    "preview": ["preview", "-n", "5", "--color", "never"],
}


def run_data_command(tree: dict, runs_dir: Path, command: str, timeout_s: float = 600) -> dict:
    """Run `chattune data check|stats|preview` on the form's config (written to the UI's folder) and
    return its command line, exit code and output (stdout and stderr, in order). The data commands need
    only the tokenizer. Raises ConfigError for a bad form and Refused for an unknown command."""
    if command not in DATA_COMMANDS:
        raise ConfigError("command", f"use one of {', '.join(DATA_COMMANDS)}")
    text, _ = check_tree(tree, runs_dir)
    folder = runs_dir / UI_DATA_DIR
    folder.mkdir(parents=True, exist_ok=True)
    config_path = folder / f"data-{hashlib.sha256(text.encode()).hexdigest()[:16]}.yaml"
    config_path.write_text(text, encoding="utf-8")
    extra = DATA_COMMANDS[command]
    argv = cli_argv("data", extra[0], str(config_path), *extra[1:])
    shown = shlex.join(["chattune", "data", extra[0], str(config_path), *extra[1:]])
    try:
        done = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            timeout=timeout_s,
        )
    except subprocess.TimeoutExpired:
        raise Refused(f"`{shown}` took longer than {timeout_s:.0f} s; run it in a shell") from None
    return {
        "command": shown,
        "exit_code": done.returncode,
        "output": done.stdout.decode("utf-8", errors="replace"),
    }


def stop_run(runs_dir: Path, run_id: str) -> dict:
    """SIGTERM to the run's `chattune train` process (found from run_state.json, else the launch);
    it stops at once and records `interrupted`. Refused when nothing of this run is training."""
    from chattune.train.rundir import read_run_state

    out = check_run_id(runs_dir, run_id)
    launch = read_launch(runs_dir, run_id)
    state, _ = run_state(out, launch)
    recorded = read_run_state(out) or {}
    pids = [p for p in (recorded.get("pid"), (launch or {}).get("pid")) if pid_is_training(p)]
    if state not in ("starting", "running") or not pids:
        raise Refused(f"run {run_id} is {state}: there is no training process to stop")
    if launch is not None:
        launch["stop_requested"] = time.time()
        write_text_atomic(
            launch_dir(runs_dir, run_id) / "launch.json", json.dumps(launch, ensure_ascii=False)
        )
    os.kill(pids[0], signal.SIGTERM)
    return {"id": run_id, "pid": pids[0], "signal": "SIGTERM"}
