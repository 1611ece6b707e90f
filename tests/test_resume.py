"""`--resume`: bit for bit with LoRA dropout, after a crash or a SIGKILL at any point; checkpoint adapters
usable as they are; config changes refused or said; damaged checkpoints, no checkpoint, stale temporary
folders and the run's records (metrics.jsonl, summary.json) handled without a traceback."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import write_huanhuan_slice
from safetensors.torch import load_file

from chattune.cli.parser import main
from chattune.config.load import config_from_dict
from chattune.errors import ChattuneError
from chattune.train.job import run

REPO = Path(__file__).resolve().parents[1]
PROMPT = "现在你要扮演皇帝身边的女人--甄嬛"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """40 huanhuan records: 5 optimizer steps an epoch of 4 x 2."""
    return write_huanhuan_slice(tmp_path_factory.mktemp("data"), 40)


def tree(model_dir: Path, data: Path, out: Path, **train) -> dict:
    return {
        "model": {"name_or_path": str(model_dir)},
        "data": {"train_path": str(data), "system_prompt": PROMPT, "max_len": 96},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.1},  # the default dropout: resume must replay its masks
        "train": {
            "output_dir": str(out),
            "micro_batch_size": 4,
            "grad_accum_steps": 2,
            "epochs": 2,
            "lr": 1e-2,
            "logging_steps": 1,
            "save_steps": 4,
            "progress": False,
            **train,
        },
        "eval": {"samples": 0, "loss": False},
    }


def cfg_of(model_dir, data, out, lora=None, **train):
    t = tree(model_dir, data, out, **train)
    t["lora"].update(lora or {})
    return config_from_dict(t)


def train_records(out: Path) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [r for r in map(json.loads, lines) if "train/loss" in r]


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def assert_same_run(a: Path, b: Path) -> None:
    """Bit for bit: every adapter tensor and every logged loss, lr and grad norm; each step logged once."""
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, different
    ra, rb = train_records(a), train_records(b)
    assert [r["step"] for r in rb] == [r["step"] for r in ra]
    for x, y in zip(ra, rb, strict=True):
        for key in ("train/loss", "train/lr", "train/grad_norm"):
            assert x[key] == y[key], (x["step"], key, x[key], y[key])


@pytest.fixture(scope="module")
def full(tiny_model_dir, data, tmp_path_factory) -> Path:
    """The uninterrupted run: 10 steps, its last checkpoint at step 8."""
    out = tmp_path_factory.mktemp("full") / "run"
    run(cfg_of(tiny_model_dir, data, out))
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-0000008"]
    return out


def crashed_copy(full: Path, dest: Path) -> Path:
    """What a crash after the last log line but before the adapter would leave: all metrics, no adapter."""
    shutil.copytree(full, dest)
    shutil.rmtree(dest / "adapter")
    (dest / "summary.json").unlink()
    return dest


# -- exact continuation -----------------------------------------------------------------------------------
def test_resume_with_dropout_is_bit_identical(full, tiny_model_dir, data, tmp_path):
    out = crashed_copy(full, tmp_path / "run")
    # The steps 9 and 10 the crashed run had logged are logged again, once.
    run(cfg_of(tiny_model_dir, data, out), resume=True)
    assert_same_run(full, out)
    # summary.json counts the whole run, not only the two resumed steps.
    s_full = json.loads((full / "summary.json").read_text())
    s_res = json.loads((out / "summary.json").read_text())
    assert s_res["steps"] == 10 and s_res["train_tokens"] == s_full["train_tokens"]
    assert s_res["resumed_at_steps"] == [8]


def test_a_log_line_across_the_checkpoint_averages_every_step(tiny_model_dir, data, tmp_path):
    """Logged every 3 steps, checkpoint at 8: the resumed run's line at step 9 averages steps 7, 8 and 9."""
    full = tmp_path / "full"
    run(cfg_of(tiny_model_dir, data, full, logging_steps=3))
    out = crashed_copy(full, tmp_path / "run")
    run(cfg_of(tiny_model_dir, data, out, logging_steps=3), resume=True)
    assert [r["step"] for r in train_records(out)] == [3, 6, 9, 10]
    assert_same_run(full, out)


def test_sigkill_at_any_point_then_resume_is_bit_identical(full, tiny_model_dir, data, tmp_path):
    """A real `chattune train` killed with SIGKILL while it trains (possibly inside a checkpoint save)."""
    out = tmp_path / "run"
    cfg = tree(tiny_model_dir, data, out, save_steps=3)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.Popen([sys.executable, "-m", "chattune", "train", str(path)], env=env)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:  # kill once step 4 is logged
            metrics = out / "metrics.jsonl"
            if metrics.is_file() and any(r["step"] >= 4 for r in train_records_tolerant(metrics)):
                break
            time.sleep(0.005)
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert not (out / "adapter").exists()
    run(config_from_dict(cfg), resume=True)
    assert_same_run(full, out)  # the save step does not change what is trained


def train_records_tolerant(path: Path) -> list[dict]:
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # being written
            continue
        if "train/loss" in row:
            rows.append(row)
    return rows


def test_no_checkpoint_resume_starts_from_the_beginning(full, tiny_model_dir, data, tmp_path, capsys):
    """Killed before its first checkpoint: a plain rerun says what to do, --resume starts over in place."""
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / ".step-0000004-abc123").mkdir()  # a save the kill interrupted
    (out / "config.yaml").write_text("x: 1\n")
    (out / "metrics.jsonl").write_text('{"step": 1, "train/loss": 9.0}\n{"step": 2, "tra')
    cfg = cfg_of(tiny_model_dir, data, out)
    with pytest.raises(ChattuneError, match="--resume to train it again from the beginning"):
        run(cfg)
    run(cfg, resume=True)
    assert "no checkpoint" in capsys.readouterr().err
    assert not list((out / "checkpoints").glob(".step-*"))
    assert_same_run(full, out)


# -- checkpoint adapters ------------------------------------------------------------------------------------
def test_checkpoint_adapter_carries_what_the_final_one_does(full):
    from chattune.infer.generation import build_prompt
    from chattune.infer.load import load_for_inference

    adapter = full / "checkpoints" / "step-0000008" / "adapter"
    final = {p.name for p in (full / "adapter").iterdir()}
    assert {p.name for p in adapter.iterdir()} == final
    loaded = load_for_inference(adapter, device="cpu")
    assert loaded.system_prompt == PROMPT and loaded.end_of_turn_token == "<|im_end|>"
    assert PROMPT in build_prompt(loaded, [{"role": "user", "content": "你是谁？"}])


# -- config changes ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "change, keys",
    [
        ({"lora": {"r": 4}}, ["lora.r"]),
        ({"lora": {"target_modules": ["q_proj", "v_proj"]}}, ["lora.target_modules"]),
        ({"train": {"seed": 7, "micro_batch_size": 2}}, ["train.micro_batch_size", "train.seed"]),
        ({"data": {"system_prompt": "你是助手"}}, ["training examples differ", "data.system_prompt"]),
        ({"train": {"weight_decay": 0.1}}, ["train.weight_decay"]),
    ],
)
def test_resume_refuses_a_config_it_cannot_continue(
    full, tiny_model_dir, data, tmp_path, capsys, change, keys
):
    out = crashed_copy(full, tmp_path / "run")
    t = tree(tiny_model_dir, data, out)
    for sec, values in change.items():
        t[sec].update(values)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(t, allow_unicode=True), encoding="utf-8")
    before = (out / "metrics.jsonl").read_text()
    assert main(["train", str(path), "--resume"]) == 2  # one line, no traceback
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: --resume:") and "new train.output_dir" in err
    for key in keys:
        assert key in err
    assert (out / "metrics.jsonl").read_text() == before and not (out / "adapter").exists()


def test_resume_refuses_changed_data_under_the_same_name(full, tiny_model_dir, data, tmp_path, capsys):
    out = crashed_copy(full, tmp_path / "run")
    original = data.read_text(encoding="utf-8")
    try:  # the same file name, its records in another order
        data.write_text(json.dumps(json.loads(original)[::-1], ensure_ascii=False), encoding="utf-8")
        with pytest.raises(ChattuneError, match="training examples differ .*the data's content"):
            run(cfg_of(tiny_model_dir, data, out), resume=True)
    finally:
        data.write_text(original, encoding="utf-8")
    # The same records under another name resume (a moved file), and the move is said.
    moved = tmp_path / "moved.json"
    shutil.copy(data, moved)
    run(cfg_of(tiny_model_dir, moved, out), resume=True)
    assert "data.train_path" in capsys.readouterr().err
    assert_same_run(full, out)


def test_resume_applies_a_changed_lr_and_more_epochs_and_says_so(
    full, tiny_model_dir, data, tmp_path, capsys
):
    out = crashed_copy(full, tmp_path / "run")
    run(cfg_of(tiny_model_dir, data, out, lr=5e-3, epochs=3), resume=True)
    err = capsys.readouterr().err
    assert (
        "train.lr 0.01 -> 0.005" in err
        and "train.epochs 2.0 -> 3.0" in err
        and "next step's learning rate" in err
    )
    saved = yaml.safe_load((out / "config.yaml").read_text(encoding="utf-8"))
    assert saved["train"]["lr"] == 5e-3  # what config.yaml records is what was trained
    rows = train_records(out)
    assert [r["step"] for r in rows] == list(range(1, 16))
    # The rate logged at step 9 (set after it) follows the new plan: 5e-3, cosine over 15 steps, no warmup.
    import math

    assert rows[8]["train/lr"] == pytest.approx(5e-3 * 0.5 * (1 + math.cos(math.pi * 9 / 15)), rel=1e-6)


def test_resume_past_the_end_is_refused(full, tiny_model_dir, data, tmp_path):
    out = crashed_copy(full, tmp_path / "run")
    with pytest.raises(ChattuneError, match="ends at step 6"):
        run(cfg_of(tiny_model_dir, data, out, max_steps=6), resume=True)


def test_resume_of_a_finished_run_trains_nothing_again(full, tiny_model_dir, data, tmp_path):
    """Its last checkpoint (step 8 of 10) is no reason to train steps 9-10 again over the finished adapter."""
    out = tmp_path / "run"
    shutil.copytree(full, out)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    with pytest.raises(ChattuneError, match=r"holds a finished run \(10 steps; .* nothing left to train"):
        run(cfg_of(tiny_model_dir, data, out), resume=True)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


# -- damaged checkpoints ------------------------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["empty", "truncated", "no_weights"])
def test_damaged_checkpoint_falls_back_to_the_previous_one(
    full, tiny_model_dir, data, tmp_path, capsys, damage
):
    out = crashed_copy(full, tmp_path / "run")
    newest = out / "checkpoints" / "step-0000009"
    shutil.copytree(out / "checkpoints" / "step-0000008", newest)
    state = newest / "state.pt"
    if damage == "empty":
        state.write_bytes(b"")
    elif damage == "truncated":
        state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    else:
        (newest / "adapter" / "adapter_model.safetensors").unlink()
    (out / ".adapter-x1y2").mkdir()  # the final adapter's save, interrupted
    run(cfg_of(tiny_model_dir, data, out), resume=True)
    assert f"{newest} is damaged" in capsys.readouterr().err
    assert not list(out.glob(".adapter-*"))
    assert_same_run(full, out)


def test_only_checkpoint_damaged_names_the_folder_to_delete(full, tmp_path, capsys, tiny_model_dir, data):
    out = crashed_copy(full, tmp_path / "run")
    (out / "checkpoints" / "step-0000008" / "state.pt").write_bytes(b"\x80\x02garbage")
    t = tree(tiny_model_dir, data, out)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(t, allow_unicode=True), encoding="utf-8")
    assert main(["train", str(path), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"{out / 'checkpoints' / 'step-0000008'} damaged" in err and "Delete it" in err


def test_a_finished_run_without_checkpoints_is_not_restarted_by_resume(tiny_model_dir, data, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "summary.json").write_text("{}")
    with pytest.raises(ChattuneError, match="holds a finished run and no checkpoint"):
        run(cfg_of(tiny_model_dir, data, out, save_steps=None), resume=True)
    assert sorted(p.name for p in out.iterdir()) == ["summary.json"]
