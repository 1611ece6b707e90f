"""What a new user meets in the first hour (issue 25): every command takes what `train` takes as a model,
config and column mistakes say what was meant, classification answers get a short budget, partial epochs
are labelled by step, and Ctrl-C / SIGTERM stop at a step boundary with a checkpoint and the resume command.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from chattune.config.load import config_from_dict, load_config
from chattune.errors import ChattuneError, ConfigError, ModelError
from tests.conftest import REPO, write_huanhuan_slice


# -- one resolver for every command that takes a model --------------------------------------------------
def test_a_builtin_id_is_a_model_for_every_command():
    from chattune.infer.load import read_model_source

    src = read_model_source("builtin:tiny-qwen2")
    assert (src.base_dir / "config.json").is_file() and src.adapter_dir is None
    assert src.name == src.base_model == "builtin:tiny-qwen2"


def test_a_hub_id_offline_gets_trains_download_message_fast():
    from chattune.infer.load import read_model_source

    t0 = time.time()
    with pytest.raises(ModelError, match=r"hf download Qwen/Qwen2.5-0.5B-Instruct --local-dir DIR"):
        read_model_source("Qwen/Qwen2.5-0.5B-Instruct")
    assert time.time() - t0 < 30


def test_a_missing_path_names_what_is_accepted(tmp_path):
    from chattune.infer.load import read_model_source

    with pytest.raises(ModelError, match=r"does not exist; pass an adapter folder .*builtin:"):
        read_model_source(str(tmp_path / "nope"))


def test_cli_eval_takes_a_builtin_model_and_columns(tmp_path, capsys):
    from chattune.cli.parser import main

    data = tmp_path / "eval.json"
    data.write_text(json.dumps([{"question": "hi", "answer": "hello"}]), encoding="utf-8")
    args = ["eval", "builtin:tiny-qwen2", "--data", str(data), "--max-new-tokens", "2"]
    assert main(args) == 2  # the hint names the option eval does take
    assert "`eval --columns`" in capsys.readouterr().err
    assert main([*args, "--columns", "instruction=question", "response=answer"]) == 0
    assert "eval of builtin:tiny-qwen2" in capsys.readouterr().out


# -- config and columns ---------------------------------------------------------------------------------
def test_a_missing_config_file_names_the_nearest_one(tmp_path):
    (tmp_path / "qwen2-0.5b-news.yaml").write_text("{}\n", encoding="utf-8")
    with pytest.raises(ChattuneError, match=r"no such config file; did you mean .*qwen2-0.5b-news.yaml\?"):
        load_config(tmp_path / "qwen2-0.5b-new.yml")


def test_an_unknown_key_suggests_the_near_miss():
    with pytest.raises(ConfigError, match=r"'train.max_step': unknown key; did you mean 'max_steps'\?"):
        config_from_dict({"train": {"max_step": 3}}, "test")


def test_llama_factory_column_names_are_aliases():
    cfg = config_from_dict(
        {"data": {"columns": {"instruction": "question", "input": "context", "output": "answer"}}}, "t"
    )
    assert (cfg.data.columns.prompt, cfg.data.columns.query, cfg.data.columns.response) == (
        "question",
        "context",
        "answer",
    )


# -- task-aware defaults --------------------------------------------------------------------------------
def test_classification_answers_get_a_short_budget(qwen_tokenizer):
    from chattune.evaluate.command import _default_max_new_tokens
    from chattune.evaluate.judge import Sample

    labels = [Sample(messages=[{"role": "user", "content": "q"}], reference=r) for r in ("体育", "科技")]
    assert _default_max_new_tokens("classification", labels, qwen_tokenizer) <= 12
    assert _default_max_new_tokens("generation", labels, qwen_tokenizer) == 256


# -- training: partial epochs, Ctrl-C / SIGTERM -----------------------------------------------------------
def _tree(model_dir: Path, data: Path, out: Path, **train) -> dict:
    return {
        "model": {"name_or_path": str(model_dir)},
        "data": {"train_path": str(data), "max_len": 128, "eval_ratio": 0.2},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "train": {"output_dir": str(out), "micro_batch_size": 2, "lr": 1e-3, "progress": False, **train},
        "eval": {"samples": 0, "loss": True, "max_eval_examples": 4},
    }


def test_an_epoch_cut_short_is_labelled_by_step_and_fraction(tiny_model_dir, tmp_path, capsys):
    from chattune.train.job import run

    data = write_huanhuan_slice(tmp_path, 40)
    out = run(config_from_dict(_tree(tiny_model_dir, data, tmp_path / "run", max_steps=2), "test"))
    evals = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if "eval/loss" in r]
    assert [r["tag"] for r in evals] == ["baseline", "step 2"]
    assert 0 < evals[-1]["epoch"] < 1
    printed = capsys.readouterr()
    said = printed.out + printed.err
    assert "eval [step 2] step 2 (epoch 0." in said
    assert "{'eval/loss'" not in said  # a table of columns, not a Python dict
    header, values = said.split("eval [step 2] step 2 (epoch 0.")[1].splitlines()[1:3]
    assert header.split() == ["loss"] and float(values) == pytest.approx(evals[-1]["eval/loss"], abs=1e-4)


def test_sigterm_stops_at_a_step_boundary_and_prints_the_resume_command(tiny_model_dir, tmp_path):
    data = write_huanhuan_slice(tmp_path, 40)
    out = tmp_path / "run"
    config = tmp_path / "run.yaml"
    tree = _tree(tiny_model_dir, data, out, epochs=200, logging_steps=1)
    config.write_text(yaml.safe_dump(tree), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    cmd = [sys.executable, "-m", "chattune", "train", str(config)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.is_file() and '"train/loss"' in metrics.read_text()) and time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "SIGTERM: stopped after step" in err and "error:" not in err
    resume = err.split("Continue with: ")[1].strip().splitlines()[0]
    assert resume == f"chattune train {config} --resume"
    step = int(err.split("stopped after step ")[1].split()[0])
    saved = out / "checkpoints" / f"step-{step:07d}"
    assert (saved / "adapter" / "adapter_model.safetensors").is_file()
    assert not (out / "adapter").exists()  # no half-finished final adapter


def test_a_line_said_under_a_progress_bar_is_not_glued_to_it(capsys):
    from tqdm import tqdm

    from chattune.console import say

    bar = tqdm(total=2, file=sys.stderr, desc="train")
    bar.update(1)
    say("  [step 1] Q: 'hi'")
    bar.close()
    err = capsys.readouterr().err
    assert "\r  [step 1] Q: 'hi'\n" in err  # the bar's line was cleared first
