"""track: JSONL always, SwanLab 0.10 and TensorBoard read back with their own readers, failures contained.

SwanLab runs are read back the way `swanlab sync` replays an offline run: the record log
`<swanlog>/run-*/run-<id>.swanlab` (LevelDB log framing of `Record` protobufs) through swanlab's
`DataStoreReader`, the config from `files/config.yaml` through swanlab's `revert_config`, and text media
from `media/text/<filename>` named by the media records.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import textwrap
from collections import defaultdict
from pathlib import Path

import pytest

from chattune.config import TrackConfig
from chattune.track import PREDICTION_KEY, build_tracker, format_prediction, resolve_swanlab_mode

HPARAMS = {
    "config": {"train": {"lr": 0.0001, "epochs": 2.0}, "lora": {"r": 8}},
    "model": "builtin:tiny-qwen2",
    "dataset_path": "data/train.jsonl",
    "dataset_sha256": "ab12cd34",
}
LOSSES = [2.5, 2.0, 1.5, 1.25]  # logged at steps 10, 20, 30, 40
ROWS_BEFORE = [
    {"prompt": "1+1等于几？", "prediction": "不知道", "reference": "2", "epoch": 0},
    {"prompt": "天空是什么颜色？", "prediction": "绿色 | <b>", "reference": "蓝色", "epoch": 0},
]
ROWS_AFTER = [{**r, "prediction": r["reference"], "epoch": 1} for r in ROWS_BEFORE]


def _simulate_run(tracker) -> None:
    """What train.run does: samples before training, logging every 10 steps, samples after epoch 1."""
    tracker.log_predictions(ROWS_BEFORE, step=0, tag="epoch 0")
    for i, loss in enumerate(LOSSES):
        step = 10 * (i + 1)
        tracker.log({"train/loss": loss, "train/lr": 1e-4 * (1 - i / 4), "train/epoch": step / 40}, step=step)
    tracker.log({"eval/loss": 1.75}, step=40)
    tracker.log_predictions(ROWS_AFTER, step=40, tag="epoch 1")
    tracker.finish()


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _read_swanlab_run(log_dir: Path) -> dict:
    """One SwanLab 0.10 run read back with swanlab's own reader, record types and config helper."""
    import yaml
    from swanlab.proto.swanlab.record.v1.record_pb2 import Record
    from swanlab.proto.swanlab.run.v1.run_pb2 import RunState
    from swanlab.sdk.internal.core_python.store import DataStoreReader
    from swanlab.sdk.internal.pkg import adapter
    from swanlab.sdk.internal.run.components.config import revert_config

    (run_dir,) = log_dir.glob("run-*")
    (record_file,) = run_dir.glob("*.swanlab")
    scalars: dict[str, list[tuple[int, float]]] = defaultdict(list)
    media: dict[str, list[tuple[int, str, str]]] = defaultdict(list)
    start = finish = None
    reader = DataStoreReader()
    reader.open(record_file)
    while (data := reader.scan()) is not None:
        record = Record()
        record.ParseFromString(data)
        kind = record.WhichOneof("record_type")
        if kind == "start":
            start = record.start
        elif kind == "finish":
            finish = record.finish
        elif kind == "scalar":
            scalars[record.scalar.key].append((record.scalar.step, record.scalar.value.number))
        elif kind == "media":
            folder = run_dir / "media" / adapter.medium[record.media.type]
            for item in record.media.value.items:
                text = (folder / item.filename).read_text(encoding="utf-8")
                media[record.media.key].append((record.media.step, item.caption, text))
    reader.close()
    config = revert_config(yaml.safe_load((run_dir / "files" / "config.yaml").read_text(encoding="utf-8")))
    state = RunState.Name(finish.state) if finish is not None else None
    return {"start": start, "state": state, "scalars": scalars, "media": media, "config": config}


def _assert_swanlab_run(run: dict, cfg: TrackConfig) -> None:
    assert run["config"] == HPARAMS
    assert run["start"].project == cfg.project and run["start"].name == cfg.experiment
    assert list(run["start"].tags) == cfg.tags
    assert run["scalars"]["train/loss"] == [(10, 2.5), (20, 2.0), (30, 1.5), (40, 1.25)]
    assert run["scalars"]["eval/loss"] == [(40, 1.75)]
    assert [s for s, _ in run["scalars"]["train/lr"]] == [10, 20, 30, 40]
    expected = [(0, "epoch 0", format_prediction(r)) for r in ROWS_BEFORE]
    expected += [(40, "epoch 1", format_prediction(r)) for r in ROWS_AFTER]
    assert run["media"][PREDICTION_KEY] == expected
    assert expected[0][2] == "问题：1+1等于几？\n\n模型回答：不知道\n\n参考答案：2"
    assert run["state"] == "RUN_STATE_FINISHED"


@pytest.fixture
def swanlab_env(tmp_path, monkeypatch) -> Path:
    """No saved key, no SWANLAB_* settings, a clean cwd: swanlab sees nothing from this machine."""
    for name in list(os.environ):
        if name.startswith("SWANLAB_"):
            monkeypatch.delenv(name)
    root = tmp_path / "swanlab-root"  # where `swanlab login` would save ~/.swanlab/.netrc
    root.mkdir()
    monkeypatch.setenv("SWANLAB_ROOT", str(root))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return root


# -- JSONL ------------------------------------------------------------------------------------------------
def test_jsonl_files_without_a_backend(tmp_path) -> None:
    tracker = build_tracker(TrackConfig(backend="none"), tmp_path, HPARAMS)
    tracker.log({"train/loss": float("nan"), "train/grad_norm": 3}, step=5)
    _simulate_run(tracker)
    tracker.finish()  # twice is fine

    metrics = _read_jsonl(tmp_path / "metrics.jsonl")
    assert metrics[0] == {"step": 5, "train/loss": None, "train/grad_norm": 3.0}  # strict JSON: NaN -> null
    assert [m["train/loss"] for m in metrics[1:5]] == LOSSES
    assert metrics[-1] == {"step": 40, "eval/loss": 1.75}
    preds = _read_jsonl(tmp_path / "predictions.jsonl")
    assert len(preds) == 4
    assert preds[0] == {"step": 0, "tag": "epoch 0", **ROWS_BEFORE[0]}
    assert preds[3] == {"step": 40, "tag": "epoch 1", **ROWS_AFTER[1]}
    with pytest.raises(RuntimeError, match="finished"):
        tracker.log({"train/loss": 1.0}, step=50)


def test_jsonl_is_flushed_per_line(tmp_path) -> None:
    tracker = build_tracker(TrackConfig(backend="none"), tmp_path, {})
    tracker.log({"train/loss": 1.0}, step=1)
    # Readable while the run is still going (a crashed run keeps everything up to its last step).
    assert _read_jsonl(tmp_path / "metrics.jsonl") == [{"step": 1, "train/loss": 1.0}]
    tracker.finish()


# -- SwanLab ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["offline", "local"])
def test_swanlab_run_reads_back(tmp_path, swanlab_env, mode) -> None:
    cfg = TrackConfig(
        backend="swanlab", mode=mode, project="chattune-test", experiment="e1", tags=["lora", "qwen"]
    )
    run_dir = tmp_path / "run"
    _simulate_run(build_tracker(cfg, run_dir, HPARAMS))
    # Without SWANLAB_LOG_DIR, swanlab's files live inside our run dir.
    _assert_swanlab_run(_read_swanlab_run(run_dir / "swanlog"), cfg)
    assert len(_read_jsonl(run_dir / "metrics.jsonl")) == 5


def test_swanlab_log_dir_env_wins(tmp_path, swanlab_env, monkeypatch) -> None:
    monkeypatch.setenv("SWANLAB_LOG_DIR", str(tmp_path / "elsewhere"))
    cfg = TrackConfig(backend="swanlab", mode="offline", experiment="e2")
    _simulate_run(build_tracker(cfg, tmp_path / "run", HPARAMS))
    assert not (tmp_path / "run" / "swanlog").exists()
    _assert_swanlab_run(_read_swanlab_run(tmp_path / "elsewhere"), cfg)


def test_swanlab_auto_without_key_never_prompts(tmp_path, swanlab_env) -> None:
    # A fresh process as CI runs it: CI=true, stdin closed, no key anywhere. It must log offline, not ask.
    run_dir = tmp_path / "run"
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from pathlib import Path
        from test_track import HPARAMS, _simulate_run
        from chattune.config import TrackConfig
        from chattune.track import build_tracker
        cfg = TrackConfig(backend="swanlab", mode="auto", project="chattune-test", experiment="ci")
        _simulate_run(build_tracker(cfg, Path({str(run_dir)!r}), HPARAMS))
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("SWANLAB_")}
    env.update(CI="true", SWANLAB_ROOT=str(swanlab_env), PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.run(
        [sys.executable, "-c", script],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=env,
        cwd=Path.cwd(),
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "could not start" not in proc.stderr and "Enter your choice" not in proc.stdout
    _assert_swanlab_run(
        _read_swanlab_run(run_dir / "swanlog"), TrackConfig(project="chattune-test", experiment="ci")
    )


def test_resolve_swanlab_mode(swanlab_env, monkeypatch) -> None:
    from swanlab.sdk.internal.pkg import nrc

    assert resolve_swanlab_mode("auto") == "offline"  # no key anywhere, no prompt
    assert resolve_swanlab_mode("cloud") == "online"
    assert resolve_swanlab_mode("offline") == "offline"
    assert resolve_swanlab_mode("disabled") == "disabled"
    # `swanlab login` saves the key to $SWANLAB_ROOT/.netrc (default ~/.swanlab/.netrc); auto finds it.
    netrc = swanlab_env / ".netrc"
    nrc.write(netrc, api_host="https://api.swanlab.cn", web_host="https://swanlab.cn", api_key="k" * 21)
    assert resolve_swanlab_mode("auto") == "online"
    netrc.unlink()
    monkeypatch.setenv("SWANLAB_API_KEY", "from-env")
    assert resolve_swanlab_mode("auto") == "online"
    # swanlab's own mode setting is honoured, except `online` without a key (that would prompt).
    monkeypatch.setenv("SWANLAB_MODE", "disabled")
    assert resolve_swanlab_mode("auto") == "disabled"
    monkeypatch.delenv("SWANLAB_API_KEY")
    monkeypatch.setenv("SWANLAB_MODE", "online")
    assert resolve_swanlab_mode("auto") == "offline"


def test_swanlab_disabled_starts_nothing(tmp_path, swanlab_env) -> None:
    import swanlab

    tracker = build_tracker(TrackConfig(backend="swanlab", mode="disabled"), tmp_path, HPARAMS)
    assert not swanlab.has_run()
    _simulate_run(tracker)
    assert not (tmp_path / "swanlog").exists()
    assert len(_read_jsonl(tmp_path / "metrics.jsonl")) == 5


def test_swanlab_cloud_failure_falls_back_to_offline(tmp_path, swanlab_env, monkeypatch, caplog) -> None:
    import swanlab

    real_init = swanlab.init

    def init(**kwargs):
        if kwargs["mode"] == "online":
            raise ConnectionError("no network")
        return real_init(**kwargs)

    monkeypatch.setattr(swanlab, "init", init)
    monkeypatch.setenv("SWANLAB_API_KEY", "k")
    cfg = TrackConfig(backend="swanlab", mode="cloud", experiment="fallback")
    with caplog.at_level(logging.WARNING, logger="chattune.track"):
        _simulate_run(build_tracker(cfg, tmp_path, HPARAMS))
    assert "logging offline instead" in caplog.text
    _assert_swanlab_run(_read_swanlab_run(tmp_path / "swanlog"), cfg)


def test_swanlab_marks_a_crashed_run(tmp_path, swanlab_env) -> None:
    tracker = build_tracker(TrackConfig(backend="swanlab", mode="offline"), tmp_path, HPARAMS)
    with pytest.raises(ZeroDivisionError):
        try:
            tracker.log({"train/loss": 1.0}, step=1)
            1 / 0  # noqa: B018 - the training step that blows up
        finally:
            tracker.finish()
    assert _read_swanlab_run(tmp_path / "swanlog")["state"] == "RUN_STATE_CRASHED"


def test_swanlab_init_failure_is_one_warning(tmp_path, swanlab_env, monkeypatch, caplog) -> None:
    import swanlab

    def init(**kwargs):
        raise RuntimeError("boom at init")

    monkeypatch.setattr(swanlab, "init", init)
    with caplog.at_level(logging.WARNING, logger="chattune.track"):
        tracker = build_tracker(TrackConfig(backend="swanlab", mode="offline"), tmp_path, HPARAMS)
        _simulate_run(tracker)
    assert [r.getMessage() for r in caplog.records if "boom at init" in r.getMessage()] != []
    assert len(caplog.records) == 1
    assert [m["train/loss"] for m in _read_jsonl(tmp_path / "metrics.jsonl")[:4]] == LOSSES


def test_swanlab_log_failure_is_contained(tmp_path, swanlab_env, monkeypatch, caplog) -> None:
    import swanlab

    calls = []

    def log(self, data, step=None):
        calls.append(step)
        raise OSError("disk full")

    monkeypatch.setattr(swanlab.Run, "log", log)
    with caplog.at_level(logging.WARNING, logger="chattune.track"):
        tracker = build_tracker(TrackConfig(backend="swanlab", mode="offline"), tmp_path, HPARAMS)
        _simulate_run(tracker)  # must not raise
    assert calls == [0]  # the first failure turns SwanLab off; nothing more is sent to it
    assert len(caplog.records) == 1 and "disk full" in caplog.records[0].getMessage()
    assert not swanlab.has_run()  # its run was closed, so no exit hooks linger
    assert [m["train/loss"] for m in _read_jsonl(tmp_path / "metrics.jsonl")[:4]] == LOSSES
    assert len(_read_jsonl(tmp_path / "predictions.jsonl")) == 4


# -- TensorBoard ------------------------------------------------------------------------------------------
def _read_tensorboard(log_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_tensorboard_scalars_and_predictions(tmp_path) -> None:
    from tensorboard import plugin_util

    _simulate_run(build_tracker(TrackConfig(backend="tensorboard"), tmp_path, HPARAMS))
    acc = _read_tensorboard(tmp_path / "tensorboard")
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == [10, 20, 30, 40]
    assert [e.value for e in loss] == pytest.approx(LOSSES)
    assert [e.value for e in acc.Scalars("eval/loss")] == pytest.approx([1.75])
    texts = {
        e.step: e.tensor_proto.string_val[0].decode() for e in acc.Tensors(f"{PREDICTION_KEY}/text_summary")
    }
    assert sorted(texts) == [0, 40]
    # Rendered as TensorBoard's text tab does: one table row per sample, `|` and `<` shown literally.
    page = plugin_util.markdown_to_safe_html(texts[0])
    assert page.count("<tr>") == 3
    assert "<td>天空是什么颜色？</td>\n<td>绿色 | &lt;b&gt;</td>\n<td>蓝色</td>" in page
    assert "**epoch 1 (step 40)**" in texts[40]
    hparams = acc.Tensors("hparams/text_summary")[0].tensor_proto.string_val[0].decode()
    assert json.loads(hparams.strip("`").removeprefix("json")) == HPARAMS


def test_tensorboard_log_failure_is_contained(tmp_path, monkeypatch, caplog) -> None:
    from torch.utils.tensorboard import SummaryWriter

    def add_scalar(self, *args, **kwargs):
        raise ValueError("bad event")

    monkeypatch.setattr(SummaryWriter, "add_scalar", add_scalar)
    with caplog.at_level(logging.WARNING, logger="chattune.track"):
        _simulate_run(build_tracker(TrackConfig(backend="tensorboard"), tmp_path, HPARAMS))
    assert len(caplog.records) == 1 and "TensorBoard failed in log" in caplog.records[0].getMessage()
    metrics = _read_jsonl(tmp_path / "metrics.jsonl")
    assert [m.get("train/loss") for m in metrics] == [*LOSSES, None]
    assert all(math.isfinite(m["step"]) for m in metrics)
