"""The `chattune` command as a user meets it: one clear line and exit 2 for each mistake, nothing written;
`--help` at once; the demo end to end (shortened)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from chattune.cli.parser import main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def good_config(tmp_path, tiny_model_dir) -> Path:
    data = tmp_path / "data.jsonl"
    rows = [{"instruction": f"问题{i}", "input": "", "output": f"回答{i}"} for i in range(8)]
    data.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        f"model:\n  name_or_path: {tiny_model_dir}\n"
        f"data:\n  train_path: {data}\n  max_len: 64\n"
        f"train:\n  output_dir: {tmp_path / 'out'}\n  max_steps: 1\n  progress: false\n"
        "eval:\n  samples: 0\n",
        encoding="utf-8",
    )
    return cfg


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("error:")]
    assert len(errors) == 1, err
    assert "Traceback" not in "\n".join(err)
    return errors[0]


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.lrr=1e-4", "config key 'train.lrr': unknown key"),
        ("train.lr=fast", "config key 'train.lr': expected float"),
        ("lora.r=0", "config key 'lora.r': must be a positive number"),
        ("data.truncation=middle", "config key 'data.truncation'"),
    ],
)
def test_bad_config_is_one_line_exit_2_and_nothing_written(good_config, tmp_path, capsys, override, expected):
    assert main(["train", str(good_config), override]) == 2
    assert expected in one_error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_unknown_key_in_the_file_names_file_and_key(good_config, tmp_path, capsys):
    good_config.write_text(good_config.read_text() + "lora:\n  rank: 8\n", encoding="utf-8")
    assert main(["train", str(good_config)]) == 2
    line = one_error_line(capsys)
    assert str(good_config) in line and "'lora.rank'" in line
    assert not (tmp_path / "out").exists()


def test_missing_data_file(good_config, tmp_path, capsys, monkeypatch):
    """Said before the model loads (a 7B takes minutes) and before "writing the run to"."""
    import chattune.train.job as job

    monkeypatch.setattr(job, "start_base_load", lambda *a, **k: pytest.fail("the model began to load"))
    assert main(["train", str(good_config), f"data.train_path={tmp_path / 'nope.json'}"]) == 2
    err = capsys.readouterr().err
    assert "writing the run" not in err
    (line,) = [x for x in err.splitlines() if x.startswith("error:")]
    assert "nope.json" in line and "not found" in line
    assert not (tmp_path / "out").exists()
    assert main(["train", str(good_config), f"data.eval_path={tmp_path / 'nope-eval.json'}"]) == 2
    assert "nope-eval.json" in one_error_line(capsys)


def test_overrides_may_follow_a_flag_and_a_typo_shows_the_command_usage(good_config, tmp_path, capsys):
    assert main(["train", str(good_config), "--gpus", "1", "lora.r=0"]) == 2  # the override was read
    assert "config key 'lora.r'" in one_error_line(capsys)
    with pytest.raises(SystemExit) as e:
        main(["train", str(good_config), "--resme"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "usage: chattune train " in err and "unrecognized arguments: --resme" in err


def test_malformed_data_line_names_file_and_line(good_config, tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    lines = data.read_text(encoding="utf-8").splitlines()
    lines[4] = '{"instruction": "broken", "output": '
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert main(["train", str(good_config)]) == 2
    line = one_error_line(capsys)
    assert f"{data}:5" in line and "malformed JSON" in line
    assert not (tmp_path / "out").exists()


def test_empty_answer_names_file_and_line(good_config, tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    lines = data.read_text(encoding="utf-8").splitlines()
    lines[2] = json.dumps({"instruction": "问题", "input": "", "output": "  "}, ensure_ascii=False)
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert main(["train", str(good_config)]) == 2
    assert f"{data}:3" in one_error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_missing_config_file_and_missing_model_dir(tmp_path, good_config, capsys):
    assert main(["train", str(tmp_path / "none.yaml")]) == 2
    assert "none.yaml" in one_error_line(capsys)
    assert main(["train", str(good_config), f"model.name_or_path={tmp_path / 'no-model'}"]) == 2
    assert "no-model" in one_error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_hub_id_fails_fast_offline(good_config, tmp_path, capsys, monkeypatch):
    """No network and no cache: a clear message in seconds, not a minute of retries."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t = time.monotonic()
    assert main(["train", str(good_config), "model.name_or_path=Qwen/Qwen2.5-7B-Instruct"]) == 2
    assert time.monotonic() - t < 15
    line = one_error_line(capsys)
    assert "Qwen/Qwen2.5-7B-Instruct" in line and "model.name_or_path" in line


def test_help_is_instant():
    t = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-m", "chattune", "--help"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0 and "demo" in out.stdout
    assert time.monotonic() - t < 10  # no torch/transformers import for --help


def test_demo_end_to_end_shortened(tmp_path, capsys):
    """The README's main job on the built-in real model, cut to two steps: trains, saves, shows before/after."""
    pytest.importorskip("gguf")
    out = tmp_path / "demo"
    code = main(
        [
            "demo",
            "--output-dir",
            str(out),
            "train.max_steps=2",
            "train.progress=false",
            "eval.samples=2",
            "eval.max_new_tokens=4",
            "eval.max_eval_examples=2",
            "eval.benchmarks=[]",  # scored in the real-model tier's full demo run
        ]
    )
    assert code == 0
    for name in ("adapter/adapter_model.safetensors", "metrics.jsonl", "report.html", "summary.json"):
        assert (out / name).is_file(), name
    captured = capsys.readouterr()
    printed = captured.out
    assert "Unseen identity questions answered as Juniper" in printed and "before" in printed
    # SwanLab offline mode: the upload command once, ours, last (SwanLab's own banner is held back).
    assert (captured.out + captured.err).count("swanlab sync") == 1, captured.out + captured.err
    last = printed.rstrip().splitlines()[-1]
    assert "swanlab sync" in last and Path(last.split("swanlab sync ")[1].strip("`")).is_dir()


def test_outputs_that_cannot_be_written_are_refused_before_any_work(tmp_path, capsys):
    """predict / eval / export: an output where a directory or file is in the way is one line, exit 2."""
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    a_dir = tmp_path / "a_dir"
    a_dir.mkdir()
    data = tmp_path / "q.jsonl"
    data.write_text('{"instruction": "hi", "output": "hello"}\n')
    missing_model = str(tmp_path / "no-such-adapter")  # never reached: the output is checked first
    cases = [
        (["predict", missing_model, "--input", str(data), "--output", str(a_dir)], "is a directory"),
        (["predict", missing_model, "--input", str(data), "--output", str(a_file / "o.jsonl")], "is a file"),
        (["eval", missing_model, "--data", str(data), "--output", str(a_file / "e")], "is a file"),
        (["eval", missing_model, "--data", str(data), "--output", str(a_file)], "is a file"),
        (["export", missing_model, "--format", "gguf", "--output", str(a_file / "x.gguf")], "is a file"),
    ]
    for argv, why in cases:
        assert main(argv) == 2, argv
        assert why in one_error_line(capsys), argv
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_dir", "a_file", "q.jsonl"]


def test_eval_refuses_identity_placeholders_without_the_converter(tmp_path, capsys):
    data = tmp_path / "held.json"
    data.write_text(json.dumps([{"instruction": "Your name?", "input": "", "output": "I am {{name}}."}]))
    assert main(["eval", str(tmp_path / "unused"), "--data", str(data)]) == 2
    assert "--converter identity" in one_error_line(capsys)


def test_data_check_resolves_builtin_names(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "hi", "output": "hello"}\n')
    cfg.write_text(f"model:\n  name_or_path: builtin:nope\ndata:\n  train_path: {data}\n")
    assert main(["data", "check", str(cfg)]) == 2
    assert "unknown built-in model 'builtin:nope'" in one_error_line(capsys)


def test_written_files_follow_the_umask(tmp_path):
    """Atomic writes go through owner-only temp names; what lands is readable as the umask allows."""
    from chattune.files import publish

    folder = tmp_path / "tmpdir"
    folder.mkdir(mode=0o700)
    (folder / "w.safetensors").write_bytes(b"x")
    (folder / "w.safetensors").chmod(0o600)
    old = os.umask(0o022)
    try:
        publish(folder)
    finally:
        os.umask(old)
    assert folder.stat().st_mode & 0o777 == 0o755
    assert (folder / "w.safetensors").stat().st_mode & 0o777 == 0o644
