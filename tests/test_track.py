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

from chattune.config.schema import TrackConfig
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
    tracker.log({"eval/loss": 1.75, "tag": "epoch 1"}, step=40)  # the tag is for metrics.jsonl only
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
    assert sorted(run["scalars"]) == ["eval/loss", "train/epoch", "train/loss", "train/lr"]  # no "tag"
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
    tracker.log({"train/loss": float("nan"), "train/grad_norm": 3, "note": None}, step=5)
    tracker.log({"tag": "step 5", "eval/loss": 2.0}, step=5)  # a label stays text
    _simulate_run(tracker)
    tracker.finish()  # twice is fine

    metrics = _read_jsonl(tmp_path / "metrics.jsonl")
    # strict JSON: NaN -> null
    assert metrics.pop(0) == {"step": 5, "train/loss": None, "train/grad_norm": 3.0, "note": None}
    assert metrics.pop(0) == {"step": 5, "tag": "step 5", "eval/loss": 2.0}
    assert [m["train/loss"] for m in metrics[:4]] == LOSSES
    assert metrics[-1] == {"step": 40, "eval/loss": 1.75, "tag": "epoch 1"}
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
    # One line to act on, ours, at the end: SwanLab's own banner (version, folder, the same advice at
    # start and end, wrapped) is held back.
    printed = proc.stdout + proc.stderr
    assert printed.count("swanlab sync") == 1, printed
    assert "Tracking run with swanlab version" not in printed
    (line,) = [line for line in printed.splitlines() if "swanlab sync" in line]
    assert Path(line.split("swanlab sync ")[1].strip("`")).parent == run_dir / "swanlog"
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


def test_swanlab_warnings_still_print_while_its_banner_is_held(tmp_path, swanlab_env, capfd) -> None:
    from chattune.track.swanlab_run import start_swanlab

    backend = start_swanlab(TrackConfig(backend="swanlab", mode="offline"), tmp_path, HPARAMS)
    backend.finish(None)
    backend.finish(None)  # SwanLab warns that the run has already finished
    printed = "".join(capfd.readouterr())
    assert "already finished" in printed and "WARNING" in printed
    assert "swanlab sync" not in printed  # the backend prints no advice; the tracker's line says it once
    assert backend.sync_line and str(tmp_path / "swanlog") in backend.sync_line


def test_held_run_links_are_said_when_the_command_stops_early(tmp_path, swanlab_env, capsys) -> None:
    """`chattune demo` holds the `swanlab sync` line for its summary; stopped before it, the line is not lost."""
    from chattune.track import held_run_links

    with pytest.raises(KeyboardInterrupt):
        with held_run_links() as links:
            _simulate_run(build_tracker(TrackConfig(backend="swanlab", mode="offline"), tmp_path, HPARAMS))
            assert len(links) == 1 and "swanlab sync" not in capsys.readouterr().err  # held, not said
            raise KeyboardInterrupt
    err = capsys.readouterr().err
    assert err.count("swanlab sync") == 1 and err.strip().splitlines()[-1] == links[0]


def test_swanlab_init_failure_is_one_warning(tmp_path, swanlab_env, monkeypatch, caplog) -> None:
    import swanlab

    def init(**kwargs):
        raise RuntimeError("boom at init")

    monkeypatch.setattr(swanlab, "init", init)
    with caplog.at_level(logging.WARNING, logger="chattune.track"):
        cfg = TrackConfig(backend="swanlab", mode="offline", required=False)
        tracker = build_tracker(cfg, tmp_path, HPARAMS)
        _simulate_run(tracker)
    assert [r.getMessage() for r in caplog.records if "boom at init" in r.getMessage()] != []
    assert len(caplog.records) == 1
    assert [m["train/loss"] for m in _read_jsonl(tmp_path / "metrics.jsonl")[:4]] == LOSSES


@pytest.mark.parametrize("backend", ["swanlab", "tensorboard"])
def test_a_required_tracker_that_cannot_start_stops_the_run(
    tmp_path, swanlab_env, monkeypatch, backend
) -> None:
    import swanlab

    import chattune.track as track

    def init(**kwargs):
        raise SystemExit("asked for a key")  # what swanlab's login prompt does without a terminal

    def writer(*a, **k):
        raise OSError("read-only file system")

    monkeypatch.setattr(swanlab, "init", init)
    monkeypatch.setattr(track, "_TensorBoardBackend", writer)
    run_dir = tmp_path / "run"
    with pytest.raises(track.TrackerError, match="track.required: false") as e:
        build_tracker(TrackConfig(backend=backend, mode="offline"), run_dir, HPARAMS)
    assert ("asked for a key" if backend == "swanlab" else "read-only") in str(e.value)
    assert not run_dir.exists()  # the failed start leaves nothing behind


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


# -- end to end: a real training run, read back from SwanLab's own files ---------------------------------
HUANHUAN = Path(__file__).resolve().parents[1] / "data" / "huanhuan" / "huanhuan.json"


def test_train_run_with_swanlab_offline(
    tmp_path, swanlab_env, monkeypatch, tiny_model_dir, caplog, capfd
) -> None:
    """`train.run` with `track.backend: swanlab, mode: offline`, as CI runs it (CI=true, stdin closed,
    no key): SwanLab's record log holds the hyper-parameters, the train/loss series, the eval metrics
    and the prediction texts at step 0 and after each epoch, equal to what metrics.jsonl and
    predictions.jsonl say; the run's output names the `swanlab sync` command once."""
    import io

    import torch

    from chattune.config.load import config_from_dict
    from chattune.files import file_sha256
    from chattune.train.job import run

    monkeypatch.setenv("CI", "true")
    closed = io.StringIO()
    closed.close()  # any prompt would raise instead of waiting for a key
    monkeypatch.setattr(sys, "stdin", closed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: intra-op threads only spin on a busy 2-core machine

    records = json.loads(HUANHUAN.read_text(encoding="utf-8"))[:14]
    data = tmp_path / "huanhuan.json"
    data.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    run_dir = tmp_path / "run"
    cfg = config_from_dict(
        {
            "model": {"name_or_path": str(tiny_model_dir)},
            "data": {"train_path": str(data), "eval_ratio": 0.15, "system_prompt": "你是甄嬛", "max_len": 64},
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
            "train": {
                "output_dir": str(run_dir),
                "micro_batch_size": 4,
                "grad_accum_steps": 1,
                "epochs": 2,
                "lr": 1e-2,
                "logging_steps": 1,
                "progress": False,
                "device": "cpu",
            },
            "eval": {"samples": 2, "max_new_tokens": 6, "batch_size": 2},
            "track": {
                "backend": "swanlab",
                "mode": "offline",
                "project": "chattune-e2e",
                "experiment": "huanhuan-tiny",
                "description": "end-to-end test",
                "tags": ["lora", "tiny"],
            },
        }
    )
    try:
        with caplog.at_level(logging.WARNING, logger="chattune.track"):
            run(cfg)
    finally:
        torch.set_num_threads(threads)
    assert caplog.records == []  # SwanLab started and never failed (no prompt, no fallback)
    printed = "".join(capfd.readouterr())
    assert printed.count("swanlab sync") == 1, printed  # ours; SwanLab's start and end banners held back

    swan = _read_swanlab_run(run_dir / "swanlog")
    metrics = _read_jsonl(run_dir / "metrics.jsonl")
    preds = _read_jsonl(run_dir / "predictions.jsonl")
    assert swan["state"] == "RUN_STATE_FINISHED"
    start = swan["start"]
    assert (start.project, start.name, start.description) == (
        "chattune-e2e",
        "huanhuan-tiny",
        "end-to-end test",
    )
    assert list(start.tags) == ["lora", "tiny"]

    # Hyper-parameters: the resolved config, the model, the dataset and its hash.
    config = swan["config"]
    assert config["train"]["lr"] == 1e-2 and config["lora"]["r"] == 4
    assert config["model"]["name_or_path"] == str(tiny_model_dir)
    assert config["track"]["backend"] == "swanlab"
    assert config["dataset"]["train_path"] == str(data)
    assert config["dataset"]["train_sha256"] == file_sha256(data)
    assert config["params"]["trainable"] > 0

    # 12 train / 2 eval records, micro-batch 4 -> 3 optimizer steps per epoch, logged at every step.
    train_rows = [m for m in metrics if "train/loss" in m]
    assert [m["step"] for m in train_rows] == [1, 2, 3, 4, 5, 6]
    for key in ["train/loss", "train/lr", "train/grad_norm", "train/epoch", "train/tokens_per_s"]:
        assert swan["scalars"][key] == [(m["step"], pytest.approx(m[key])) for m in train_rows], key
    assert [v for _, v in swan["scalars"]["train/epoch"]] == pytest.approx([1 / 3, 2 / 3, 1, 4 / 3, 5 / 3, 2])

    # Evaluations: the baseline at step 0, then after each epoch; eval loss and the default metrics.
    eval_steps = [0, 3, 6]
    assert [(m["step"], m["tag"]) for m in metrics if "tag" in m] == [
        (0, "baseline"),
        (3, "epoch 1"),
        (6, "epoch 2"),
    ]
    assert [s for s, _ in swan["scalars"]["eval/loss"]] == eval_steps
    for key in ["eval/bleu4", "eval/rouge1", "eval/rouge2", "eval/rougeL", "eval/rougeL_char"]:
        assert [s for s, _ in swan["scalars"][key]] == eval_steps, key

    # Prediction texts in the tutorials' shape, the same in SwanLab and predictions.jsonl.
    tags = ["baseline", "epoch 1", "epoch 2"]
    assert [(p["step"], p["tag"]) for p in preds] == [
        (s, t) for s, t in zip(eval_steps, tags, strict=True) for _ in range(2)
    ]
    assert swan["media"][PREDICTION_KEY] == [(p["step"], p["tag"], format_prediction(p)) for p in preds]
    by_prompt = {r["instruction"]: r["output"] for r in records}
    for p, (_, _, text) in zip(preds, swan["media"][PREDICTION_KEY], strict=True):
        assert by_prompt[p["prompt"]] == p["reference"]  # held-out records, with their own answers
        assert text == f"问题：{p['prompt']}\n\n模型回答：{p['prediction']}\n\n参考答案：{p['reference']}"

    # The run ends with its report: curves, the metrics table baseline vs each epoch, before/after answers.
    from test_report import _structure

    doc = _structure((run_dir / "report.html").read_text(encoding="utf-8"))
    assert len(doc.images) == 4  # train/loss, train/lr, train/grad_norm, eval/loss
    result, _cost, predictions_table, metrics_table = doc.tables[:4]  # the result leads (issue 25)
    assert result[0] == ["metric", "baseline", "epoch 2 (final)", "change"]
    assert [r[0] for r in metrics_table[1:]] == [*tags, "epoch 2 − baseline"]
    assert predictions_table[0] == ["prompt", "baseline answer", "final answer (epoch 2)", "reference"]
    first = [p for p in preds if p["prompt"] == predictions_table[1][0]]
    assert predictions_table[1][1:] == [
        first[0]["prediction"],
        first[-1]["prediction"],
        first[0]["reference"],
    ]
    assert (run_dir / "report.md").is_file()


def test_train_run_stops_before_training_when_swanlab_cannot_start(
    tmp_path, swanlab_env, monkeypatch, tiny_model_dir
) -> None:
    import swanlab

    from chattune.cli.parser import main

    calls = []

    def init(**kwargs):
        calls.append(kwargs["project"])
        raise ConnectionError("swanlab.cn unreachable")

    monkeypatch.setattr(swanlab, "init", init)
    data = tmp_path / "huanhuan.json"
    data.write_text(json.dumps(json.loads(HUANHUAN.read_text(encoding="utf-8"))[:8], ensure_ascii=False))
    run_dir = tmp_path / "run"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"model: {{name_or_path: {tiny_model_dir}}}\ndata: {{train_path: {data}, max_len: 128, system_prompt: 你是甄嬛}}\n"
        f"train: {{output_dir: {run_dir}, max_steps: 1, device: cpu, progress: false}}\n"
        "eval: {samples: 0}\ntrack: {backend: swanlab, mode: cloud, project: ok-name}\n"
    )
    assert main(["train", str(cfg)]) == 2
    assert calls == ["ok-name", "ok-name"]  # cloud, then the offline fallback: both failed
    assert not run_dir.exists()
    # A name SwanLab refuses is found at config load, before the model is read.
    calls.clear()
    assert main(["train", str(cfg), "track.project=法律问答微调"]) == 2 and calls == []
