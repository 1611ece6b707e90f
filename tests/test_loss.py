"""loss + attention: packed == one-by-one (losses and LoRA grads), lm_loss_sum == model loss.

Everything runs in fp32 on the CPU with a tiny Qwen2, where the `chattune_varlen` attention
goes through its per-document reference kernel: the plumbing (cu_seq_lens, GQA layout, mask
hand-off to SDPA) is the same code the GPU path runs.
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from chattune.model.attention import (
    VARLEN,
    cu_seq_lens_from_position_ids,
    pick_attn_implementation,
    register_attention,
)
from chattune.model.loss import (
    activation_bytes_per_token,
    add_target_index,
    checkpointing_needed,
    lm_loss_sum,
)
from chattune.render.packing import IGNORE_INDEX, collate_packed, collate_padded

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _docs(n=4, seed=0):
    """Random documents: a prompt (ignored) then a response (trained)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        p, r = rng.randint(2, 9), rng.randint(1, 12)
        ids = [rng.randrange(100, 150000) for _ in range(p + r)]
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * p + ids[p:]})
    return out


def _load(model_dir, attn, lora=True):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    register_attention()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=attn)
    if lora:
        # init_lora_weights=False makes lora_B non-zero, so gradients reach lora_A too.
        cfg = LoraConfig(
            r=4, lora_alpha=8, lora_dropout=0.0, target_modules=LORA_TARGETS, init_lora_weights=False
        )
        model = get_peft_model(model, cfg)
    model.train()
    return model


def _lora_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _assert_grad_close(got: torch.Tensor, want: torch.Tensor) -> None:
    """Relative to the tensor's norm: fp32 reordering noise stays under 1e-5, a real bug is ~1e-1."""
    assert want.abs().sum() > 0
    err = ((got - want).norm() / want.norm()).item()
    assert err < 1e-4, err


def _token_losses(logits, labels):
    """Per-position CE of a (1, T, V) forward, for positions with a target after the shift."""
    t = labels[0, 1:]
    keep = t != IGNORE_INDEX
    return F.cross_entropy(logits[0, :-1][keep].float(), t[keep], reduction="none")


@pytest.mark.parametrize("attn", ["sdpa", VARLEN])
def test_packed_equals_one_by_one(tiny_model_dir, attn):
    model = _load(tiny_model_dir, attn)
    docs = _docs()
    packed = collate_packed(docs)

    # Per-token losses: one packed forward vs each document alone.
    with torch.no_grad():
        logits = model(**{k: v for k, v in packed.items() if k != "labels"}, use_cache=False).logits
        got = _token_losses(logits, packed["labels"])
        want = torch.cat(
            [
                _token_losses(model(input_ids=one["input_ids"], use_cache=False).logits, one["labels"])
                for one in (collate_packed([d]) for d in docs)
            ]
        )
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    # LoRA gradients of the summed loss: one packed backward vs one backward per document.
    loss, n = lm_loss_sum(model, packed, chunk_rows=7)
    loss.backward()
    g_packed = _lora_grads(model)
    model.zero_grad()
    total = 0
    for d in docs:
        one = collate_padded([d], pad_id=0)
        l1, n1 = lm_loss_sum(model, one)
        l1.backward()
        total += n1
    assert n == total == sum(len([x for x in d["labels"][1:] if x != IGNORE_INDEX]) for d in docs)
    g_single = _lora_grads(model)
    assert g_packed.keys() == g_single.keys() and len(g_packed) == 2 * 7 * 2
    for name in g_packed:
        assert g_packed[name].abs().sum() > 0, name
        _assert_grad_close(g_packed[name], g_single[name])


@pytest.mark.parametrize("attn", ["sdpa", VARLEN])
def test_fixed_shape_pack_equals_unpadded_pack(tiny_model_dir, attn):
    """A pack padded to the run's fixed shape (compiled training): same loss, same LoRA gradients."""
    model = _load(tiny_model_dir, attn)
    docs = _docs()
    plain = collate_packed(docs)
    t = plain["input_ids"].shape[1]
    padded = collate_packed(
        docs, pad_to=t + 29, pad_id=0, max_doc_tokens=max(len(d["input_ids"]) for d in docs)
    )
    assert padded["input_ids"].shape[1] == t + 29 and len(padded["cu_seq_lens_q"]) > len(
        plain["cu_seq_lens_q"]
    )
    want, n_want = lm_loss_sum(model, plain)
    want.backward()
    g_want = _lora_grads(model)
    model.zero_grad()
    got, n_got = lm_loss_sum(model, add_target_index(padded), chunk_rows=7)
    got.backward()
    assert n_got == n_want
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for name, g in _lora_grads(model).items():
        _assert_grad_close(g, g_want[name])


def test_varlen_attention_computes_in_the_autocast_dtype_like_sdpa():
    """fp32 q/k (RoPE with fp32 weights) and bf16 v under autocast: attention runs in bf16, as SDPA would."""
    from chattune.model.attention import varlen_attention_forward

    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 4, 9, 8, generator=gen), torch.randn(1, 2, 9, 8, generator=gen)
    v = torch.randn(1, 2, 9, 8, generator=gen).bfloat16()
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, _ = varlen_attention_forward(None, q, k, v, None, cu_seq_lens_q=cu, max_length_q=5)
        want = torch.cat(
            [
                F.scaled_dot_product_attention(
                    q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], is_causal=True, enable_gqa=True
                )
                for s, e in ((0, 4), (4, 9))
            ],
            dim=2,
        ).transpose(1, 2)
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-3)  # bf16 rounding


def test_packed_varlen_skips_transformers_mask_building(tiny_model_dir, monkeypatch):
    """Packed + chattune_varlen: no packed-sequence detection (a GPU sync), and the same loss and grads."""
    import transformers.masking_utils as mu

    import chattune.model.loss as loss_mod

    model = _load(tiny_model_dir, VARLEN)
    packed = collate_packed(_docs())
    want, _ = lm_loss_sum(model, packed)  # through the mapping
    want.backward()
    g_want = _lora_grads(model)
    model.zero_grad()

    def detection_called(*a, **k):
        raise AssertionError("transformers looked for packed sequences (a host sync on the GPU)")

    monkeypatch.setattr(mu, "find_packed_sequence_indices", detection_called)
    with pytest.raises(AssertionError, match="looked for packed"):  # the check bites without the skip
        with monkeypatch.context() as m:
            m.setattr(loss_mod, "_skips_mask_building", lambda config: False)
            lm_loss_sum(model, packed)
    got, _ = lm_loss_sum(model, packed)
    got.backward()
    torch.testing.assert_close(got, want)
    for name, g in _lora_grads(model).items():
        _assert_grad_close(g, g_want[name])
    # And without the skip (detection allowed again), the loss is the same.
    monkeypatch.undo()
    monkeypatch.setattr(loss_mod, "_skips_mask_building", lambda config: False)
    torch.testing.assert_close(lm_loss_sum(model, packed)[0], want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("attn", ["sdpa", VARLEN])
def test_lm_loss_sum_matches_model_loss_on_padded_batch(tiny_model_dir, attn):
    model = _load(tiny_model_dir, attn)
    batch = collate_padded(_docs(3, seed=1), pad_id=0)
    loss, n = lm_loss_sum(model, batch, chunk_rows=5)
    assert n == int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    ref = model(**batch, use_cache=False).loss * n  # peft forward: proves the backbone ran LoRA
    torch.testing.assert_close(loss, ref.float(), rtol=1e-5, atol=1e-5)
    loss.backward()
    mine = _lora_grads(model)
    model.zero_grad()
    ref.backward()
    for name, g in _lora_grads(model).items():
        _assert_grad_close(mine[name], g)


def test_backbone_call_runs_lora(tiny_model_dir):
    model = _load(tiny_model_dir, "sdpa")
    batch = collate_packed(_docs(2))
    with torch.no_grad():
        with_lora, _ = lm_loss_sum(model, batch)
        with model.disable_adapter():
            without, _ = lm_loss_sum(model, batch)
    assert abs(with_lora.item() - without.item()) > 1e-3


@pytest.mark.parametrize("tied", [True, False])
def test_trained_head_gradients(tiny_model_dir, tied):
    """Fused head path when the head itself trains (tied: the embedding gets both gradients)."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    if tied:
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    else:
        cfg = Qwen2Config.from_pretrained(
            tiny_model_dir, tie_word_embeddings=False, vocab_size=1000, pad_token_id=0, eos_token_id=1
        )
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    docs = _docs(3, seed=2)
    for d in docs:
        d["input_ids"] = [x % model.config.vocab_size for x in d["input_ids"]]
        d["labels"] = [x if x == IGNORE_INDEX else x % model.config.vocab_size for x in d["labels"]]
    batch = collate_padded(docs, pad_id=0)
    loss, n = lm_loss_sum(model, batch, chunk_rows=4)
    loss.backward()
    mine = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    (model(**batch, use_cache=False).loss * n).backward()
    for k, p in model.named_parameters():
        _assert_grad_close(mine[k], p.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ce_chunk_and_grad_equals_autograd(dtype):
    """The GPU's fused per-chunk math (run eagerly here) = F.cross_entropy and its autograd gradient."""
    from chattune.model.loss import ce_chunk_and_grad

    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(37, 1000, generator=g) * 4).to(dtype)
    targets = torch.randint(0, 1000, (37,), generator=g)
    loss, grad = ce_chunk_and_grad(logits, targets)
    ref_in = logits.float().requires_grad_()
    ref = F.cross_entropy(ref_in, targets, reduction="sum")
    ref.backward()
    assert grad.dtype == dtype and loss.dtype == torch.float32
    assert abs(loss.item() - ref.item()) < 1e-4 * ref.item()
    tol = 1e-6 if dtype == torch.float32 else 1e-2  # bf16: the gradient is rounded once, at the end
    _assert_grad_close_tol(grad.float(), ref_in.grad, tol)


@pytest.mark.parametrize("tied", [True, False])
def test_fused_ce_branch_equals_eager(tiny_model_dir, monkeypatch, tied):
    """The branch the GPU takes (fused chunk math) gives the eager loop's loss and gradients."""
    from transformers import AutoModelForCausalLM

    import chattune.model.loss as loss_mod

    def run(fused):
        monkeypatch.setattr(loss_mod, "_fused_ce_chunk", lambda device_type: fused)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        if not tied:
            model.lm_head.weight.requires_grad_(False)
            model.model.embed_tokens.weight.requires_grad_(True)
        batch = collate_packed(_docs(4, seed=3))
        loss, n = lm_loss_sum(model, batch, chunk_rows=5)
        loss.backward()
        return loss.item(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}

    eager_loss, eager_grads = run(None)
    fused_loss, fused_grads = run(loss_mod.ce_chunk_and_grad)
    assert abs(eager_loss - fused_loss) < 1e-5 * eager_loss
    assert eager_grads.keys() == fused_grads.keys() and eager_grads
    for k in eager_grads:
        _assert_grad_close(fused_grads[k], eager_grads[k])


def _assert_grad_close_tol(got: torch.Tensor, want: torch.Tensor, tol: float) -> None:
    err = ((got - want).norm() / want.norm()).item()
    assert err < tol, err


def test_wrapped_head_and_checkpointing(tiny_model_dir):
    """A head peft wraps (modules_to_save) takes the generic chunked path; checkpointing agrees."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Qwen2Config

    cfg = Qwen2Config.from_pretrained(
        tiny_model_dir, tie_word_embeddings=False, vocab_size=1000, pad_token_id=0, eos_token_id=1
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    lcfg = LoraConfig(r=4, target_modules=LORA_TARGETS, modules_to_save=["lm_head"], init_lora_weights=False)
    model = get_peft_model(model, lcfg)
    model.train()
    docs = _docs(3, seed=3)
    for d in docs:
        d["input_ids"] = [x % 1000 for x in d["input_ids"]]
        d["labels"] = [x if x == IGNORE_INDEX else x % 1000 for x in d["labels"]]
    batch = collate_packed(docs)
    loss, n = lm_loss_sum(model, batch, chunk_rows=6)
    loss.backward()
    mine = _lora_grads(model)
    assert any("lm_head" in k for k in mine)
    model.zero_grad()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ref = model(**batch, use_cache=False).loss * n
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    ref.backward()
    for k, g in _lora_grads(model).items():
        _assert_grad_close(mine[k], g)


def test_varlen_model_generates_like_sdpa(tiny_model_dir):
    """Outside packed training (KV cache, padding) chattune_varlen hands over to SDPA unchanged."""
    a = _load(tiny_model_dir, "sdpa", lora=False).eval()
    b = _load(tiny_model_dir, VARLEN, lora=False).eval()
    batch = collate_padded(_docs(2, seed=4), pad_id=0)
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        ids = batch["input_ids"][:1]
        assert torch.equal(a.generate(input_ids=ids, **kw), b.generate(input_ids=ids, **kw))
        la = a(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        lb = b(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(la, lb)


def test_cu_seq_lens_from_position_ids():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 0, 1, 2]])
    cu, longest = cu_seq_lens_from_position_ids(pos)
    assert cu.tolist() == [0, 3, 5, 9, 15, 18] and longest == 6
    assert cu.dtype == torch.int32


def test_pick_attn_implementation_on_cpu():
    assert pick_attn_implementation("cpu", packing=True) == "sdpa"
    assert pick_attn_implementation("cuda", packing=False) == "sdpa"


def test_checkpointing_heuristic_qwen7b():
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Qwen2Config

    cfg = Qwen2Config(
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=152064,
    )
    per_layer = activation_bytes_per_token(cfg, checkpointing=False) / 28
    assert 200e3 < per_layer < 240e3  # ~218 kB a token a layer, see the docstring
    assert activation_bytes_per_token(cfg, checkpointing=True) < per_layer * 2
    # The real 7B shape on the meta device: no memory, but peft still counts 161M LoRA params.
    with torch.device("meta"):
        model = get_peft_model(
            AutoModelForCausalLM.from_config(cfg),
            LoraConfig(r=64, lora_alpha=16, target_modules=LORA_TARGETS),
        )
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 161_480_704
    free = 63 * 2**30  # an 80 GB H100 after loading the 7B weights (measured)
    assert not checkpointing_needed(model, budget_tokens=4096, free_bytes=free)
    assert checkpointing_needed(model, budget_tokens=16384, free_bytes=free)
    assert not checkpointing_needed(model, budget_tokens=16384, free_bytes=None) or torch.cuda.is_available()
