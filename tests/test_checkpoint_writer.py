"""Checkpoints written in the background: what is written is the state at `save()` (weights and Adam
moments changed right after it do not reach the files), the adapter folder is byte for byte the one
written from the live model, and a write that fails is raised at the next wait, naming the folder, with
no step folder or temporary folder left and the earlier checkpoint kept."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import chattune.train.checkpoints as checkpoints
from chattune.config.load import config_from_dict
from chattune.errors import ChattuneError
from chattune.train.checkpoints import Checkpointer, Progress
from chattune.train.save import AdapterFacts, write_adapter
from chattune.train.world import World

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _checkpointer(model_dir: Path, tokenizer, out: Path) -> Checkpointer:
    """A Checkpointer over a tiny LoRA model, one AdamW step taken (so that Adam moments exist)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    cfg = config_from_dict(
        {
            "model": {"name_or_path": str(model_dir)},
            "data": {"train_path": str(out / "unused.jsonl")},
            "train": {"output_dir": str(out)},
        }
    )
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(str(model_dir))
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    model(input_ids=torch.tensor([[1, 2, 3, 4]]), labels=torch.tensor([[1, 2, 3, 4]])).loss.backward()
    opt.step(), sched.step()
    eot = "<|im_end|>"
    facts = AdapterFacts(tokenizer, cfg, model_dir, eot, [tokenizer.convert_tokens_to_ids(eot)])
    return Checkpointer(out / "checkpoints", model, opt, sched, World(), False, facts, "sha")


def _held_writes(monkeypatch) -> threading.Event:
    """Writes wait for the returned event before they start (the real write_adapter, run later)."""
    go = threading.Event()
    real = checkpoints.write_adapter

    def held(*args, **kwargs):
        assert go.wait(60)
        real(*args, **kwargs)

    monkeypatch.setattr(checkpoints, "write_adapter", held)
    return go


def test_what_is_written_is_the_state_at_save(tiny_model_dir, qwen_tokenizer, tmp_path, monkeypatch):
    ckpt = _checkpointer(tiny_model_dir, qwen_tokenizer, tmp_path)
    write_adapter(ckpt.model, ckpt.facts, tmp_path / "live")  # today's way: from the live model
    params = {n: p.detach().clone() for n, p in ckpt.model.named_parameters() if p.requires_grad}
    moments = [s["exp_avg"].clone() for s in ckpt.optimizer.state.values()]
    go = _held_writes(monkeypatch)
    ckpt.save(1, Progress())
    assert ckpt.writer.busy  # save() returned with the write still to do
    with torch.no_grad():  # the next step changes everything in place
        for p in params:
            dict(ckpt.model.named_parameters())[p].add_(1.0)
        for s in ckpt.optimizer.state.values():
            s["exp_avg"].add_(1.0)
    go.set()
    ckpt.wait()
    folder = tmp_path / "checkpoints" / "step-0000001"
    live, saved = tmp_path / "live", folder / "adapter"
    assert sorted(p.name for p in saved.iterdir()) == sorted(p.name for p in live.iterdir())
    for f in live.iterdir():  # the same bytes as the adapter written from the model before the change
        assert (saved / f.name).read_bytes() == f.read_bytes(), f.name
    weights = load_file(str(saved / "adapter_model.safetensors"))
    assert len(weights) == len(params) == 8
    state = torch.load(folder / "state.pt", weights_only=True)
    for before, after in zip(moments, state["optimizer"]["state"].values(), strict=True):
        assert torch.equal(before, after["exp_avg"])


def test_a_failed_write_is_raised_at_the_next_wait_and_leaves_nothing(
    tiny_model_dir, qwen_tokenizer, tmp_path, monkeypatch
):
    ckpt = _checkpointer(tiny_model_dir, qwen_tokenizer, tmp_path)
    ckpt.save(1, Progress())
    ckpt.wait()
    real = checkpoints.write_adapter

    def disk_full(model, facts, target, **kwargs):
        real(model, facts, target, **kwargs)  # half of the folder written, then the disk is full
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoints, "write_adapter", disk_full)
    ckpt.save(2, Progress())  # returns: the failure is the writer's
    with pytest.raises(
        ChattuneError, match=r"checkpoint .*step-0000002 could not be written \(OSError.*No space"
    ):
        ckpt.save(3, Progress())  # the next save waits first
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-0000001"]
    ckpt.wait()  # reported once
