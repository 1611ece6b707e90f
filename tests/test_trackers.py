"""track: MLflow, W&B (offline) and Trackio beside SwanLab, each read back from its own store by its own client.

MLflow through `MlflowClient` on the run dir's SQLite file and `mlflow.artifacts` for the sample tables;
W&B from its offline record log `wandb/offline-run-*/run-<id>.wandb` parsed into W&B's own `Record`
protobufs (wandb 0.31 dropped its Python reader of that file: the framing is LevelDB's log, read here in
a dozen lines) and the table files it names; Trackio through its `SQLiteStorage`. The logging runs with
the network namespace cut (`unshare -n`) where the machine allows it, else behind a socket guard that
refuses every connection off the machine. Also: `--resume` continues each tracker's run, and a bad name,
a missing package or an unreachable tracking URI each stop the run with one message before training.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
from tracker_stores import read_mlflow, read_trackio, read_wandb

from chattune.config.schema import TrackConfig
from chattune.errors import ConfigError

# Trackio reads TRACKIO_DIR once, when it is first imported: set it before any test imports it.
os.environ.setdefault("TRACKIO_DIR", tempfile.mkdtemp(prefix="chattune-trackio-"))
pytest.importorskip("mlflow")
pytest.importorskip("wandb")
pytest.importorskip("trackio")

SRC = Path(__file__).resolve().parents[1] / "src"
HPARAMS = {"train": {"lr": 0.001, "epochs": 2}, "lora": {"r": 8, "target_modules": ["q_proj", "v_proj"]}}
SAMPLES = [
    {"prompt": "1+1等于几？", "prediction": "不知道", "reference": "2"},
    {"prompt": "天空是什么颜色？", "prediction": "绿色 | <b>", "reference": "蓝色"},
]


@pytest.fixture
def offline_env(tmp_path, monkeypatch) -> None:
    """No W&B or MLflow settings from this machine: no key, no mode, no tracking URI."""
    for name in list(os.environ):
        if name.startswith(("WANDB_", "MLFLOW_")):
            monkeypatch.delenv(name)
    empty = tmp_path / "netrc"
    empty.write_text("")
    monkeypatch.setenv("NETRC", str(empty))  # no `wandb login` key
    monkeypatch.setenv("CI", "true")


# -- logging with no network --------------------------------------------------------------------------
_GUARD = """
import socket
_connect = socket.socket.connect
def _local_only(self, address):
    # Unix sockets and loopback (W&B's own service) only; anything else is a network connection.
    if self.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in ("127.0.0.1", "::1", "localhost"):
        raise OSError(f"network connection attempted in offline mode: {address}")
    return _connect(self, address)
socket.socket.connect = _local_only
"""


def _network_cut() -> list[str]:
    """`unshare -n` (no network at all, subprocesses included) where this machine allows it."""
    unshare = shutil.which("unshare")
    if unshare and subprocess.run([unshare, "-n", "true"], capture_output=True).returncode == 0:
        return [unshare, "-n"]
    return []


def _log_offline(script: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    prefix = _network_cut()
    code = ("" if prefix else _GUARD) + textwrap.dedent(script)
    return subprocess.run(
        [*prefix, sys.executable, "-c", code],
        env={**env, "PYTHONPATH": str(SRC)},
        capture_output=True,
        text=True,
        timeout=300,
    )


SIMULATED_RUN = """
import json, sys
from chattune.config.schema import TrackConfig
from chattune.track import build_tracker

cfg = TrackConfig(backend=["mlflow", "wandb", "trackio"], mode="auto", project="chattune-test",
                  experiment="tiny", group="g1", tags=["lora"], description="three trackers")
tracker = build_tracker(cfg, RUN_DIR, HPARAMS, resume=RESUME)
for step, loss in STEPS:
    tracker.log({"train/loss": loss, "train/lr": 0.001 * step}, step=step)
tracker.log({"eval/loss": 1.5, "tag": "epoch 1"}, step=STEPS[-1][0])
tracker.log_predictions(SAMPLES, step=STEPS[-1][0], tag="epoch 1")
tracker.log_summary({"wall_s": 12.5, "steps": STEPS[-1][0], "hardware": "CPU"})
tracker.finish()
"""


def _simulate(run_dir: Path, steps: list[tuple[int, float]], resume: bool = False) -> str:
    script = (
        f"RUN_DIR = {str(run_dir)!r}\nRESUME = {resume!r}\nSTEPS = {steps!r}\n"
        f"HPARAMS = {HPARAMS!r}\nSAMPLES = {SAMPLES!r}\n" + SIMULATED_RUN
    )
    done = _log_offline(script, dict(os.environ))
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stderr + done.stdout


def test_three_trackers_offline_read_back(tmp_path, offline_env) -> None:
    run_dir = tmp_path / "run"
    out = _simulate(run_dir, [(1, 2.5), (2, 2.0), (3, 1.5)])
    ids = json.loads((run_dir / "tracker_runs.json").read_text())
    expected_samples = [{"step": 3, "tag": "epoch 1", **s} for s in SAMPLES]

    ml = read_mlflow(run_dir / "mlflow.db")
    assert ml["experiment"] == "g1" and ml["run"].info.run_name == "tiny"
    assert ml["run"].info.run_id == ids["mlflow"] and ml["run"].info.status == "FINISHED"
    assert ml["metrics"]["train/loss"] == [(1, 2.5), (2, 2.0), (3, 1.5)]
    assert ml["metrics"]["eval/loss"] == [(3, 1.5)]
    assert ml["metrics"]["summary/wall_s"] == [(3, 12.5)]
    assert ml["params"]["train.lr"] == "0.001" and ml["params"]["lora.r"] == "8"
    assert json.loads(ml["params"]["lora.target_modules"]) == ["q_proj", "v_proj"]
    assert (
        ml["run"].data.tags["lora"] == "" and ml["run"].data.tags["mlflow.note.content"] == "three trackers"
    )
    assert ml["samples"] == expected_samples
    assert (run_dir / "mlartifacts").is_dir()  # artifacts stay in the run dir, not in ./mlruns

    (folder,) = (run_dir / "wandb").glob("offline-run-*")
    wb = read_wandb(folder)
    assert wb["run"].run_id == ids["wandb"] and wb["run"].project == "chattune-test"
    assert (wb["run"].display_name, wb["run"].run_group, list(wb["run"].tags)) == ("tiny", "g1", ["lora"])
    assert wb["config"]["train"] == {"lr": 0.001, "epochs": 2}
    assert wb["history"]["train/loss"] == [(1, 2.5), (2, 2.0), (3, 1.5)]
    assert wb["history"]["eval/loss"] == [(3, 1.5)]
    assert wb["samples"] == expected_samples
    assert wb["summary"]["summary/wall_s"] == 12.5
    assert out.count("wandb sync") == 1 and f"wandb sync {folder}" in out

    tr = read_trackio("chattune-test", ids["trackio"])
    assert ids["trackio"] == "tiny" and tr["config"]["train"] == {"lr": 0.001, "epochs": 2}
    assert tr["metrics"]["train/loss"] == [(1, 2.5), (2, 2.0), (3, 1.5)]
    assert tr["samples"] == expected_samples


def test_resume_continues_each_trackers_run(tmp_path, offline_env) -> None:
    """A resumed run logs into the same MLflow run, W&B run id, Trackio run and SwanLab run id."""
    run_dir = tmp_path / "run"
    script = SIMULATED_RUN.replace('"trackio"]', '"trackio", "swanlab"]').replace(
        "chattune-test", "resume-test"
    )
    env = {**os.environ, "SWANLAB_MODE": "offline", "SWANLAB_LOG_DIR": str(tmp_path / "swanlog")}
    for steps, resume in [([(1, 2.5), (2, 2.0)], False), ([(3, 1.5), (4, 1.0)], True)]:
        code = (
            f"RUN_DIR = {str(run_dir)!r}\nRESUME = {resume!r}\nSTEPS = {steps!r}\n"
            f"HPARAMS = {HPARAMS!r}\nSAMPLES = {SAMPLES!r}\n" + script
        )
        done = _log_offline(code, env)
        assert done.returncode == 0, done.stderr[-3000:]
        if not resume:
            first = json.loads((run_dir / "tracker_runs.json").read_text())
    out = done.stderr + done.stdout
    assert json.loads((run_dir / "tracker_runs.json").read_text()) == first
    for name in ["MLflow", "W&B", "Trackio", "SwanLab"]:
        assert f"{name}: continuing run" in out, out[-2000:]

    ml = read_mlflow(run_dir / "mlflow.db")  # still one run, holding both halves
    assert ml["metrics"]["train/loss"] == [(1, 2.5), (2, 2.0), (3, 1.5), (4, 1.0)]
    folders = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(folders) == 2 and all(f.name.endswith(first["wandb"]) for f in folders)
    assert [read_wandb(f)["run"].run_id for f in folders] == [first["wandb"]] * 2
    tr = read_trackio("resume-test", first["trackio"])
    assert tr["metrics"]["train/loss"] == [(1, 2.5), (2, 2.0), (3, 1.5), (4, 1.0)]
    swan = sorted((tmp_path / "swanlog").glob("run-*"))
    assert len(swan) == 2 and all(f.name.endswith(first["swanlab"]) for f in swan)
    # the upload commands name both halves' folders (each tool's sync takes several)
    assert f"`wandb sync {folders[0]} {folders[1]}`" in out, out[-2000:]
    assert f"`swanlab sync {swan[0]} {swan[1]}`" in out, out[-2000:]


# -- what stops a run before training ------------------------------------------------------------------
def test_bad_tracker_name_is_a_config_error() -> None:
    from chattune.config.load import config_from_dict

    with pytest.raises(ConfigError, match="track.backend"):
        config_from_dict({"track": {"backend": ["swanlab", "comet"]}})
    with pytest.raises(ConfigError, match="cannot be combined"):
        config_from_dict({"track": {"backend": ["none", "mlflow"]}})
    assert config_from_dict({"track": {"backend": "mlflow"}}).track.backends == ("mlflow",)
    assert config_from_dict({"track": {"backend": []}}).track.backends == ()


def test_missing_tracker_package_names_the_install_line(monkeypatch) -> None:
    """`sys.modules[name] = None` is Python's own way of making a package unimportable."""
    from chattune.config.checks import check_track
    from chattune.config.load import config_from_dict

    assert check_track(TrackConfig(backend=["mlflow", "wandb", "trackio"])) == []
    for name in ["mlflow", "wandb", "trackio"]:
        monkeypatch.setitem(sys.modules, name, None)
        with pytest.raises(ConfigError, match=rf"{name} is not installed: pip install 'chattune\[{name}\]'"):
            config_from_dict({"track": {"backend": ["swanlab", name]}})


def test_unreachable_tracking_uri_stops_before_training(tmp_path, offline_env) -> None:
    from chattune.track import TrackerError, build_tracker

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run_dir = tmp_path / "run"
    cfg = TrackConfig(backend=["mlflow"], uri=f"http://127.0.0.1:{port}")
    start = time.monotonic()
    with pytest.raises(TrackerError, match=f"MLflow could not start.*127.0.0.1:{port}"):
        build_tracker(cfg, run_dir, HPARAMS)
    assert time.monotonic() - start < 60  # one try, not MLflow's default minutes of retries
    assert not run_dir.exists()
