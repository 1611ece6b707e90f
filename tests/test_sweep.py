"""`chattune sweep` end to end on the 2-layer tiny Qwen2, each variant a real `chattune train` process:
two LoRA ranks give two runs, one SwanLab group and one compare page; a failing variant does not stop
the others; --resume skips the finished variant and resumes the interrupted one from its checkpoint.
How variations are parsed and named is checked without training."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import write_huanhuan_slice

from chattune.cli.parser import main
from chattune.config.load import load_config
from chattune.errors import ConfigError
from chattune.sweep import build_variants, is_finished, parse_vary, slug_of, split_values

REPO = Path(__file__).resolve().parents[1]


# -- variations, without training ----------------------------------------------------------------------
def test_values_split_on_top_level_commas_only():
    assert split_values("4, 8,16") == ["4", "8", "16"]
    assert split_values('[q_proj,v_proj],all-linear,"a,b"') == ["[q_proj,v_proj]", "all-linear", '"a,b"']


def test_parse_vary_keeps_text_and_refuses_what_it_cannot_run():
    assert parse_vary(["lora.r=8,16", "train.lr=1e-4,2e-4"], "--vary") == {
        "lora.r": ["8", "16"],
        "train.lr": ["1e-4", "2e-4"],
    }
    for bad, match in [
        ("lora.r", "looks like section.key=V1,V2"),
        ("lora.r=", "looks like"),
        ("lora.r=8,,16", "non-empty and distinct"),
        ("lora.r=8,8", "non-empty and distinct"),
        ("train.output_dir=a,b", "a sweep sets this itself"),
        ("sweep.name=a,b", "a sweep sets this itself"),
    ]:
        with pytest.raises(ConfigError, match=match):
            parse_vary([bad], "--vary")


def test_variants_are_every_combination_with_readable_unique_folders(tmp_path):
    assert slug_of([("model.name_or_path", "Qwen/Qwen2.5-7B-Instruct")]) == "Qwen2.5-7B-Instruct"
    assert slug_of([("lora.r", "16"), ("train.lr", "2e-4")]) == "r16_lr2e-4"
    assert slug_of([("lora.target_modules", "[q_proj, v_proj]")]) == "target_modules-q_proj-v_proj"
    assert slug_of([("data.train_path", "data/legal.json"), ("train.packing", "true")]) == (
        "train_path-legal.json_packing-true"
    )
    variants = build_variants({"lora.r": ["8", "16"], "train.lr": ["1e-4", "2e-4"]}, tmp_path)
    assert [v.slug for v in variants] == ["r8_lr1e-4", "r8_lr2e-4", "r16_lr1e-4", "r16_lr2e-4"]
    assert variants[1].overrides == ["lora.r=8", "train.lr=2e-4"]
    assert variants[1].run_dir == tmp_path / "r8_lr2e-4"
    # Two local models both called `model`: the folders still differ.
    same = build_variants({"model.name_or_path": ["/a/model", "/b/model"]}, tmp_path)
    assert len({v.slug for v in same}) == 2 and all(v.slug.startswith("model-") for v in same)


# -- real runs ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sweep_env(tmp_path_factory):
    """SwanLab offline into a folder of this module's own, with no key or settings from the machine."""
    root = tmp_path_factory.mktemp("sweep-env")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("SWANLAB_MODE", raising=False)
        mp.setenv("SWANLAB_LOG_DIR", str(root / "swanlog"))
        mp.setenv("SWANLAB_ROOT", str(root / "swanlab-root"))
        mp.setenv("OMP_NUM_THREADS", "1")  # the variants' processes: tiny models gain nothing from threads
        for name in ("WANDB_API_KEY", "WANDB_MODE", "MLFLOW_TRACKING_URI"):
            mp.delenv(name, raising=False)
        (root / "netrc").write_text("")
        mp.setenv("NETRC", str(root / "netrc"))  # no `wandb login` key: W&B offline
        yield root


# SwanLab always; MLflow and W&B where installed (the test extra has them): one group for all variants.
TRACKERS = ["swanlab"] + [n for n in ("mlflow", "wandb") if importlib.util.find_spec(n) is not None]


def write_config(path: Path, model_dir: Path, data: Path, out: Path, sweep: dict | None = None) -> Path:
    tree = {
        "model": {"name_or_path": str(model_dir)},
        "data": {"train_path": str(data), "eval_ratio": 0.1, "max_len": 64, "system_prompt": "你是甄嬛"},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "train": {
            "output_dir": str(out),
            "micro_batch_size": 4,
            "grad_accum_steps": 1,
            "max_steps": 2,
            "save_steps": 1,  # a checkpoint at step 1: what --resume continues from
            "lr": 1e-2,
            "logging_steps": 1,
            "progress": False,
        },
        "eval": {"samples": 2, "max_new_tokens": 4, "metrics": ["rouge1_char"]},  # no jieba to load
        "track": {"backend": TRACKERS, "mode": "offline", "project": "chattune-sweep-test"},
    }
    if sweep:
        tree["sweep"] = sweep
    path.write_text(yaml.safe_dump(tree, allow_unicode=True), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def data_slice(tmp_path_factory) -> Path:
    return write_huanhuan_slice(tmp_path_factory.mktemp("data"), 24)


@pytest.fixture(scope="module")
def rank_sweep(tiny_model_dir, data_slice, sweep_env, tmp_path_factory) -> tuple[int, Path, Path]:
    home = tmp_path_factory.mktemp("rank-sweep")
    config = write_config(
        home / "ranks.yaml", tiny_model_dir, data_slice, home / "runs", {"name": "tiny-rank"}
    )
    rc = main(["sweep", str(config), "--vary", "lora.r=4,8"])
    return rc, config, home / "runs"


def read_manifest(base: Path) -> dict[str, str]:
    record = json.loads((base / "sweep.json").read_text(encoding="utf-8"))
    return {v["slug"]: v["status"] for v in record["variants"]}


def test_two_ranks_give_two_runs_and_one_compare_page(rank_sweep, sweep_env):
    rc, _, base = rank_sweep
    assert rc == 0
    assert read_manifest(base) == {"r4": "done", "r8": "done"}
    for r in (4, 8):
        run_dir = base / f"r{r}"
        assert is_finished(run_dir)
        assert json.loads((run_dir / "adapter" / "adapter_config.json").read_text())["r"] == r
        saved = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
        assert saved["track"]["group"] == "tiny-rank" and saved["track"]["tags"] == ["tiny-rank"]
    html = (base / "compare.html").read_text(encoding="utf-8")
    assert "They differ in lora.r (4, 8)." in html
    chart = re.search(r'<svg [^>]*aria-label="train/loss by step".*?</svg>', html, re.S).group(0)
    lines = dict(re.findall(r'<polyline data-run="([^"]+)" points="([^"]+)"', chart))
    assert sorted(lines) == ["r4", "r8"] and all(len(p.split()) == 2 for p in lines.values())  # 2 steps each
    assert "⚠" not in html  # same data, same prompts


def test_variants_share_one_swanlab_group(rank_sweep, sweep_env):
    from swanlab.proto.swanlab.record.v1.record_pb2 import Record
    from swanlab.sdk.internal.core_python.store import DataStoreReader

    starts = []
    for record_file in sorted((sweep_env / "swanlog").glob("run-*/*.swanlab")):
        reader = DataStoreReader()
        reader.open(record_file)
        while (data := reader.scan()) is not None:
            record = Record()
            record.ParseFromString(data)
            if record.WhichOneof("record_type") == "start":
                starts.append(record.start)
        reader.close()
    assert sorted(s.name for s in starts) == ["r4", "r8"]
    assert {(s.project, s.group, tuple(s.tags)) for s in starts} == {
        ("chattune-sweep-test", "tiny-rank", ("tiny-rank",))
    }


def test_variants_share_one_mlflow_experiment_and_wandb_group(rank_sweep, sweep_env):
    """Each variant's MLflow run and W&B offline run hold what its metrics.jsonl and predictions.jsonl
    say (scalars at the same steps, the sample answers), all in one experiment / group."""
    if TRACKERS != ["swanlab", "mlflow", "wandb"]:
        pytest.skip("needs mlflow and wandb (pip install -e '.[test]')")
    from mlflow.tracking import MlflowClient
    from tracker_stores import read_mlflow_run, read_wandb

    _, _, base = rank_sweep
    client = MlflowClient(tracking_uri=f"sqlite:///{base / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tiny-rank")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert sorted(runs) == ["r4", "r8"]
    for r in (4, 8):
        run_dir = base / f"r{r}"
        metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        preds = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]
        series = {
            key: [(m["step"], pytest.approx(m[key])) for m in metrics if m.get(key) is not None]
            for key in ("train/loss", "train/lr", "eval/loss", "eval/rouge1_char")
        }
        samples = [{k: p[k] for k in ("step", "tag", "prompt", "prediction", "reference")} for p in preds]
        assert [s for s, _ in series["train/loss"]] == [1, 2] and len(samples) == 4  # baseline + end

        ml = read_mlflow_run(client, runs[f"r{r}"])
        (folder,) = (run_dir / "wandb").glob("offline-run-*")
        wb = read_wandb(folder)
        assert wb["run"].run_group == "tiny-rank" and wb["run"].display_name == f"r{r}"
        for key, expected in series.items():
            assert ml["metrics"][key] == expected, key
            assert wb["history"][key] == expected, key
        assert ml["samples"] == samples and wb["samples"] == samples
        assert ml["params"]["lora.r"] == str(r) and wb["config"]["lora"]["r"] == r
        assert ml["metrics"]["summary/steps"] == [(2, 2.0)] and wb["summary"]["summary/steps"] == 2


def test_resume_skips_finished_and_continues_interrupted(rank_sweep, capfd):
    rc, config, base = rank_sweep
    assert rc == 0
    # Without --resume, a sweep never writes into runs it already made.
    assert main(["sweep", str(config), "--vary", "lora.r=4,8"]) == 2
    assert "already holds a run; pass --resume" in capfd.readouterr().err
    # r8 "was interrupted" after its step-1 checkpoint: no adapter, no summary, metrics up to step 1.
    r4_summary = (base / "r4" / "summary.json").stat().st_mtime_ns
    r8 = base / "r8"
    for name in ("adapter", "summary.json"):
        path = r8 / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    kept = [line for line in (r8 / "metrics.jsonl").read_text().splitlines() if json.loads(line)["step"] <= 1]
    (r8 / "metrics.jsonl").write_text("\n".join(kept) + "\n")
    assert any((r8 / "checkpoints").glob("step-*"))

    assert main(["sweep", str(config), "--vary", "lora.r=4,8", "--resume"]) == 0
    assert read_manifest(base) == {"r4": "skipped", "r8": "done"}
    assert (base / "r4" / "summary.json").stat().st_mtime_ns == r4_summary  # not run again
    assert is_finished(r8)
    rows = [json.loads(line) for line in (r8 / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2]  # continued at step 2, not restarted
    assert [r["tag"] for r in rows if "tag" in r] == ["baseline", "step 2"]  # max_steps=2 ends inside epoch 1
    assert "resuming from" in capfd.readouterr().err  # train's own --resume, in the variant's process


def test_a_failing_variant_does_not_stop_the_others(
    tiny_model_dir, data_slice, sweep_env, tmp_path, capfd, monkeypatch
):
    # Two "GPUs": the variants run side by side, each in its process with its own CUDA_VISIBLE_DEVICES
    # and log (on this CPU-only machine they train on the CPU). GPU discovery itself is checked below.
    monkeypatch.setattr("chattune.sweep._pick_gpus", lambda n: [0, 1])
    # The first variant names a model that does not exist: it fails in its own process, the second runs.
    vary = [f"model.name_or_path=/nonexistent/model,{tiny_model_dir}"]
    config = write_config(
        tmp_path / "models.yaml", tiny_model_dir, data_slice, tmp_path / "runs", {"vary": vary}
    )
    assert main(["sweep", str(config), "track.backend=none", "--gpus", "2"]) == 1
    err = capfd.readouterr().err
    logs = tmp_path / "runs" / "logs"
    assert f"model FAILED (exit code 2); its log: {logs / 'model.log'}" in err
    assert "1 variant(s) failed" in err
    assert "/nonexistent/model" in (logs / "model.log").read_text()  # the variant's own error, kept
    good = tiny_model_dir.name
    assert "done in" in (logs / f"{good}.log").read_text()
    assert read_manifest(tmp_path / "runs") == {"model": "failed", good: "done"}
    assert is_finished(tmp_path / "runs" / good)
    assert good in (tmp_path / "runs" / "compare.html").read_text(encoding="utf-8")


def test_gpus_without_cuda_run_one_after_another(capfd):
    import torch

    from chattune.sweep import _pick_gpus

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert _pick_gpus(None) is None and _pick_gpus(1) is None
    assert _pick_gpus(2) is None  # no CUDA here (the suite is CPU-only)
    assert "no CUDA GPU" in capfd.readouterr().err


def test_size_comparison_config_is_one_sweep_of_four_sizes(tmp_path):
    cfg = load_config(REPO / "configs" / "qwen2.5-size-comparison.yaml")
    variants = build_variants(parse_vary(list(cfg.sweep.vary), "config"), tmp_path)
    sizes = ["0.5B", "1.5B", "7B", "14B"]
    assert [v.slug for v in variants] == [f"Qwen2.5-{s}-Instruct" for s in sizes]
    assert cfg.sweep.name == "qwen2.5-sizes" and cfg.track.backend == "swanlab"


def test_a_bad_value_fails_before_anything_runs(tiny_model_dir, data_slice, tmp_path, capsys):
    config = write_config(tmp_path / "c.yaml", tiny_model_dir, data_slice, tmp_path / "runs")
    assert main(["sweep", str(config), "--vary", "lora.r=4,0"]) == 2
    assert "lora.r" in capsys.readouterr().err
    assert main(["sweep", str(config)]) == 2  # nothing to vary
    assert "nothing to vary" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_resume_restarts_a_variant_stopped_before_its_first_checkpoint(
    tiny_model_dir, data_slice, tmp_path, monkeypatch
):
    """No checkpoint to resume from: its files are moved aside and it starts again (no training here:
    the variant's process is replaced by one that records its command and writes a finished run)."""
    commands = []

    def fake_train(cmd, env, **kw):
        commands.append(cmd)
        run_dir = Path(next(a for a in cmd if a.startswith("train.output_dir=")).split("=", 1)[1])
        run_dir.mkdir()
        (run_dir / "config.yaml").write_text("lora: {r: 4}\n")
        (run_dir / "summary.json").write_text("{}")
        (run_dir / "adapter").mkdir()
        (run_dir / "adapter" / "adapter_model.safetensors").write_bytes(b"")
        return 0

    monkeypatch.setattr("chattune.sweep.subprocess.call", fake_train)
    config = write_config(tmp_path / "c.yaml", tiny_model_dir, data_slice, tmp_path / "runs")
    (tmp_path / "runs" / "r4").mkdir(parents=True)
    (tmp_path / "runs" / "r4" / "metrics.jsonl").write_text('{"step": 0}\n')  # stopped early
    assert main(["sweep", str(config), "track.backend=none", "--vary", "lora.r=4", "--resume"]) == 0
    (cmd,) = commands
    assert "--resume" not in cmd and cmd[cmd.index("train") + 1] == str(config)
    assert (tmp_path / "runs" / "r4.interrupted" / "metrics.jsonl").read_text() == '{"step": 0}\n'
    assert is_finished(tmp_path / "runs" / "r4")
