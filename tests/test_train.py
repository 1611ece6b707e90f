"""train.run end to end on a tiny Qwen2 with the real tokenizer: the loss falls, only LoRA trains,
the adapter folder carries everything, resumes continue, every example config trains."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import write_huanhuan_slice

from chattune.config.load import config_from_dict, load_config
from chattune.errors import ChattuneError, ConfigError
from chattune.train.job import run

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def huanhuan_slice(tmp_path_factory) -> Path:
    """40 real huanhuan records: enough for a few optimizer steps, small enough for two CPU cores."""
    return write_huanhuan_slice(tmp_path_factory.mktemp("data"), 40)


def tiny_tree(model_dir: Path, data: Path, out: Path, **train) -> dict:
    return {
        "model": {"name_or_path": str(model_dir)},
        "data": {"train_path": str(data), "system_prompt": "现在你要扮演皇帝身边的女人--甄嬛", "max_len": 96},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "train": {
            "output_dir": str(out),
            "micro_batch_size": 4,
            "grad_accum_steps": 2,
            "epochs": 3,
            "lr": 1e-2,
            "logging_steps": 1,
            "progress": False,
            **train,
        },
        "eval": {"samples": 0, "loss": False},
    }


@pytest.fixture(scope="module")
def trained(tiny_model_dir, huanhuan_slice, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("train") / "run"
    return run(config_from_dict(tiny_tree(tiny_model_dir, huanhuan_slice, out)))


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_loss_falls(trained):
    losses = [r["train/loss"] for r in read_metrics(trained) if "train/loss" in r]
    assert len(losses) == 15  # 40 records / (4 x 2) = 5 steps an epoch, 3 epochs
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    # A random 32-wide model moves slowly, but steadily: well beyond step-to-step noise.
    assert last < first - 0.03, losses


def test_adapter_folder_carries_everything(trained, tiny_model_dir):
    adapter = trained / "adapter"
    for name in ("adapter_model.safetensors", "adapter_config.json", "chat_template.jinja", "chattune.yaml"):
        assert (adapter / name).is_file(), name
    info = json.loads((adapter / "inference.json").read_text(encoding="utf-8"))
    assert info["system_prompt"] == "现在你要扮演皇帝身边的女人--甄嬛"
    assert info["end_of_turn_token"] == "<|im_end|>" and info["max_len"] == 96
    saved = yaml.safe_load((adapter / "chattune.yaml").read_text(encoding="utf-8"))
    assert saved["data"]["system_prompt"] == info["system_prompt"] and saved["data"]["max_len"] == 96
    # The saved config is a valid config: the run can be repeated from it.
    assert config_from_dict(saved).lora.r == 8
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert Path(cfg["base_model_name_or_path"]) == Path(tiny_model_dir)
    # The folder's own template defaults to the trained system prompt (plain apply_chat_template, no
    # system turn, renders what training rendered); a conversation with its own system turn is unchanged.
    from transformers import AutoTokenizer

    tok, base = AutoTokenizer.from_pretrained(adapter), AutoTokenizer.from_pretrained(tiny_model_dir)
    user = [{"role": "user", "content": "你是谁？"}]
    own = [{"role": "system", "content": info["system_prompt"]}, *user]
    assert tok.apply_chat_template(user, tokenize=False) == base.apply_chat_template(own, tokenize=False)
    other = [{"role": "system", "content": "S"}, *user]
    assert tok.apply_chat_template(other, tokenize=False) == base.apply_chat_template(other, tokenize=False)


def test_only_lora_parameters_trained_and_every_one_changed(trained, tiny_model_dir):
    """The adapter holds LoRA tensors only, and each differs from its value at initialisation."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    saved = load_file(str(trained / "adapter" / "adapter_model.safetensors"))
    assert saved and all("lora_" in k for k in saved)
    # The trainer seeds torch with train.seed before loading and adding LoRA: rebuild that state.
    torch.manual_seed(42)
    init = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    before = get_peft_model_state_dict(init)
    assert set(before) == set(saved)
    unchanged = [k for k in saved if torch.equal(saved[k], before[k].to(saved[k].dtype))]
    assert not unchanged, unchanged
    assert all(not torch.all(saved[k] == 0) for k in saved if "lora_B" in k)  # B starts at zero


def test_adapter_reloads_with_plain_peft(trained, tiny_model_dir):
    """The tutorials' own inference code on our adapter: same logits as chattune's loader."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from chattune.infer.generation import build_prompt
    from chattune.infer.load import load_for_inference

    adapter = trained / "adapter"
    tok = AutoTokenizer.from_pretrained(adapter)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter).eval()
    messages = [
        {"role": "system", "content": "现在你要扮演皇帝身边的女人--甄嬛"},
        {"role": "user", "content": "你是谁？"},
    ]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = tok([text], return_tensors="pt")
    loaded = load_for_inference(adapter, device="cpu")
    assert build_prompt(loaded, messages[1:]) == text  # the stored system prompt is applied
    with torch.no_grad():
        theirs = model(**inputs).logits
        ours = loaded.model(**inputs).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)(**inputs).logits
    torch.testing.assert_close(ours, theirs)
    assert not torch.allclose(base, theirs, atol=1e-4)  # and the adapter does change the model


def test_resume_continues_from_the_last_checkpoint(tiny_model_dir, huanhuan_slice, tmp_path):
    """A run that crashed after its step-8 checkpoint, resumed, logs what the uninterrupted run logged."""
    import shutil

    out = tmp_path / "run"
    cfg = config_from_dict(tiny_tree(tiny_model_dir, huanhuan_slice, out, epochs=2, save_steps=4))
    run(cfg)
    full = [r for r in read_metrics(out) if "train/loss" in r]
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-0000008"]  # only the last is kept
    # What a crash right after step 8 would have left: no adapter, no summary, metrics up to step 8.
    shutil.rmtree(out / "adapter")
    (out / "summary.json").unlink()
    kept = [
        line for line in (out / "metrics.jsonl").read_text().splitlines() if json.loads(line)["step"] <= 8
    ]
    (out / "metrics.jsonl").write_text("\n".join(kept) + "\n")
    with pytest.raises(Exception, match="already exists"):
        run(cfg)  # no silent overwrite without --resume
    run(cfg, resume=True)
    resumed = [r for r in read_metrics(out) if "train/loss" in r]
    assert [r["step"] for r in resumed] == list(range(1, 11))
    for a, b in zip(full[8:], resumed[8:], strict=True):
        assert b["train/loss"] == pytest.approx(a["train/loss"], rel=1e-5), a["step"]
        assert b["train/lr"] == pytest.approx(a["train/lr"], rel=1e-6)
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("config", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.stem)
def test_example_configs_load_and_train(config, tiny_model_dir, tmp_path):
    """Every tutorial config loads as written, then trains 2 steps with the model swapped for a tiny one."""
    cfg = load_config(config)
    assert cfg.model.name_or_path and cfg.data.train_path and Path(cfg.data.train_path).is_file()
    cfg = load_config(
        config,
        [
            f"model.name_or_path={tiny_model_dir}",
            "model.source=local",
            "model.trust_remote_code=false",
            "lora.layers_to_transform=null",  # the tiny model has 2 layers
            f"train.output_dir={tmp_path / 'run'}",
            "train.max_steps=2",
            "train.micro_batch_size=2",
            "train.grad_accum_steps=1",
            "train.save_steps=null",
            "train.progress=false",
            "data.max_samples=24",
            "data.max_len=128",
            "data.on_bad_row=skip",  # 128 tokens is our cut, not the config's: rows may not fit
            "eval.samples=1",
            "eval.max_new_tokens=4",
            "track.backend=none",
        ],
    )
    out = run(cfg)
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert len([r for r in read_metrics(out) if "train/loss" in r]) >= 1


def test_diverging_run_stops_before_writing_an_adapter(tiny_model_dir, huanhuan_slice, tmp_path):
    """A rate that sends the weights to 1e30 after one step: step 2's loss is NaN. The run stops with advice,
    writes no adapter and no checkpoint after the last finite step."""
    out = tmp_path / "run"
    cfg = config_from_dict(
        tiny_tree(tiny_model_dir, huanhuan_slice, out, lr=1e30, save_steps=1, logging_steps=5)
    )
    with pytest.raises(
        ChattuneError, match=r"step 2: the loss is nan.*diverged.*Lower train.lr.*step-0000001"
    ):
        run(cfg)
    assert not (out / "adapter").exists() and not (out / "summary.json").exists()
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-0000001"]
    losses = [r["train/loss"] for r in read_metrics(out) if "train/loss" in r]
    assert losses == []  # the log line of steps 1-5 would have averaged in the NaN


@pytest.mark.parametrize("key", ["train.lr", "train.max_grad_norm", "train.weight_decay"])
@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_non_finite_numbers_are_refused_before_anything_loads(tiny_model_dir, tmp_path, key, value):
    tree = tiny_tree(tiny_model_dir, tmp_path / "missing.json", tmp_path / "run")
    sec, name = key.split(".")
    tree[sec][name] = value
    with pytest.raises(ConfigError, match=f"'{key}': must be a finite number"):
        run(config_from_dict(tree))
    assert not (tmp_path / "run").exists()


def test_identity_sample_prompts_and_silence_when_evaluation_is_off(tiny_model_dir, tmp_path, capsys):
    """eval.samples_path goes through the identity converter with the configured name and author; a run
    with evaluation off prints no empty evaluation line."""
    data = tmp_path / "identity.json"
    rows = [
        {"instruction": f"Who are you {i}?", "input": "", "output": "I am {{name}} by {{author}}."}
        for i in range(8)
    ]
    data.write_text(json.dumps(rows), encoding="utf-8")
    tree = tiny_tree(tiny_model_dir, data, tmp_path / "run", max_steps=1, epochs=1)
    tree["data"].update(converter="identity", identity_name="Juniper", identity_author="Acme Lab")
    tree["eval"] = {"samples": 1, "samples_path": str(data), "max_new_tokens": 2, "loss": False}
    out = run(config_from_dict(tree))
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert preds[0]["reference"] == "I am Juniper by Acme Lab."
    capsys.readouterr()
    tree["train"]["output_dir"] = str(tmp_path / "silent")
    tree["eval"] = {"samples": 0, "loss": False}
    run(config_from_dict(tree))
    assert "eval [" not in capsys.readouterr().err


def test_existing_output_dir_message_offers_resume_only_when_it_can(tmp_path):
    # A finished run without checkpoints was told "pass --resume", which --resume then refused.
    from chattune.config.checks import check_run_dir_unused
    from chattune.errors import ChattuneError

    finished = tmp_path / "finished"
    finished.mkdir()
    (finished / "summary.json").write_text("{}")
    with pytest.raises(ChattuneError, match="delete it \\(it holds a finished run with no checkpoint") as e:
        check_run_dir_unused(finished, resume=False)
    assert "--resume" not in str(e.value)
    (finished / "checkpoints" / "step-0000004").mkdir(parents=True)
    with pytest.raises(ChattuneError, match="pass --resume to continue its last checkpoint"):
        check_run_dir_unused(finished, resume=False)
    killed = tmp_path / "killed"  # killed before its first checkpoint
    killed.mkdir()
    (killed / "config.yaml").write_text("")
    with pytest.raises(ChattuneError, match="pass --resume to train it again from the beginning"):
        check_run_dir_unused(killed, resume=False)
    check_run_dir_unused(killed, resume=True)


def test_model_loads_while_the_data_renders(tiny_model_dir, huanhuan_slice, tmp_path, monkeypatch):
    """Issue 28 item 3: in one process the base model loads in its own thread during the data stage; a
    data error then still comes first, names its file, and leaves no thread loading behind."""
    import threading
    import time

    import chattune.train.job as job
    import chattune.train.preload as preload

    seen: dict = {}
    real_load, real_render = preload.load_model, job.render_all

    def load(*a, **kw):
        seen["load_thread"] = threading.current_thread().name
        seen["load_start"] = time.monotonic()
        return real_load(*a, **kw)

    def render(*a, **kw):
        out = real_render(*a, **kw)
        seen.setdefault("render_end", time.monotonic())
        return out

    monkeypatch.setattr(preload, "load_model", load)
    monkeypatch.setattr(job, "render_all", render)
    run(config_from_dict(tiny_tree(tiny_model_dir, huanhuan_slice, tmp_path / "run", max_steps=1)))
    assert seen["load_thread"] == "chattune-model-load" != threading.current_thread().name
    assert seen["load_start"] < seen["render_end"]  # started before the data was rendered
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "hi", "output": "ok"}\nnot json\n', encoding="utf-8")
    tree = tiny_tree(tiny_model_dir, bad, tmp_path / "bad-run")
    tree["data"]["on_bad_row"] = "error"
    with pytest.raises(ChattuneError, match="bad.jsonl"):
        run(config_from_dict(tree))
    assert not any(t.name == "chattune-model-load" for t in threading.enumerate())
    assert not (tmp_path / "bad-run").exists()
