"""offload (memory mode): the host-side AdamW steps exactly like torch's AdamW; the embedding hooks
change where the table lives, not what the model computes. CPU only: the GPU run is in bench/."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from chattune.model.loss import lm_loss_sum
from chattune.render.packing import IGNORE_INDEX, collate_packed
from chattune.train.offload import HostAdamW, embeddings_on_device, offload_input_embeddings


def _params(seed: int) -> list[nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(5, 3, generator=g)), nn.Parameter(torch.randn(7, generator=g))]


def _fake_grads(params, step: int) -> None:
    g = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)


def test_host_adamw_equals_adamw_and_resumes():
    ref, mine = _params(0), _params(0)
    ref_opt = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.1)
    opt = HostAdamW(mine, lr=1e-2, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))  # schedulers drive it too
    ref_sched = torch.optim.lr_scheduler.LambdaLR(ref_opt, lambda s: 1.0 / (1 + s))
    for step in range(3):
        _fake_grads(ref, step)
        _fake_grads(mine, step)
        ref_opt.step(), opt.step(), sched.step(), ref_sched.step()
        ref_opt.zero_grad(), opt.zero_grad()
        assert all(p.grad is None for p in mine)
        for a, b in zip(ref, mine, strict=True):
            torch.testing.assert_close(b.detach(), a.detach(), rtol=1e-6, atol=1e-7)
    # A checkpoint restored into a fresh optimizer whose weights came back from the adapter file.
    state = opt.state_dict()
    resumed_params = [nn.Parameter(p.detach().clone()) for p in mine]
    resumed = HostAdamW(_params(1), lr=1e-2, weight_decay=0.1)  # built on other (initial) weights
    resumed.device_params = resumed_params
    resumed.load_state_dict(state)
    for step in range(3, 5):
        _fake_grads(ref, step)
        _fake_grads(resumed_params, step)
        ref_opt.step(), resumed.step()
    for a, b in zip(ref, resumed_params, strict=True):
        torch.testing.assert_close(b.detach(), a.detach(), rtol=1e-6, atol=1e-7)


def _batch(vocab: int) -> dict:
    g = torch.Generator().manual_seed(3)
    docs = []
    for n in (9, 14, 6):
        ids = torch.randint(3, vocab, (n,), generator=g).tolist()
        docs.append({"input_ids": ids, "labels": [IGNORE_INDEX] * 3 + ids[3:]})
    return collate_packed(docs)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_offloaded_embeddings_change_nothing(tiny_model_dir, checkpointing):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Qwen2Config

    cfg = Qwen2Config.from_pretrained(
        tiny_model_dir,
        tie_word_embeddings=False,
        vocab_size=512,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=1,
    )

    def build():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="sdpa")
        lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        model = get_peft_model(model, lora)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        return model

    def loss_and_grads(model):
        loss, _ = lm_loss_sum(model, _batch(512))
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        return loss.item(), grads

    want_loss, want = loss_and_grads(build())
    model = build()
    assert offload_input_embeddings(model, "cpu")
    got_loss, got = loss_and_grads(model)
    assert got_loss == pytest.approx(want_loss, rel=1e-6)
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-7)
    with embeddings_on_device(model):  # generation places inputs by the first parameter's device
        out = model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 6)


def test_tied_embeddings_stay(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    assert model.config.tie_word_embeddings
    assert not offload_input_embeddings(model, "cpu")
    assert not hasattr(model.get_input_embeddings(), "_chattune_offloaded")
