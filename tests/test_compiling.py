"""compiling: the compile cache's place, the fixed packs' document bound, eager evaluation."""

from __future__ import annotations

import torch

from chattune.train.compiling import (
    compile_cache_dir,
    doc_bound,
    eager,
    mark_doc_count_dynamic,
    use_compile_cache,
)


def test_compile_cache_lives_under_chattune_cache(monkeypatch, tmp_path):
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    monkeypatch.setenv("CHATTUNE_CACHE", str(tmp_path))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())  # what importing transformers does
    path = use_compile_cache()
    assert path == compile_cache_dir() == tmp_path / "torch-compile" / f"torch-{torch.__version__}"
    assert path.is_dir() and torch._inductor.runtime.cache_dir_utils.cache_dir() == str(path)
    # A folder the user chose wins.
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert use_compile_cache() == tmp_path / "mine"


def test_doc_bound_rounds_the_longest_document_up_to_128_within_the_pack():
    assert doc_bound([5, 384, 200], 4096) == 384
    assert doc_bound([5, 385], 4096) == 512
    assert doc_bound([1], 4096) == 128
    assert doc_bound([3000], 3000) == 3000


def test_eager_runs_compiled_code_without_compiling():
    calls = []

    def f(x):
        calls.append(1)  # a Python side effect: runs on every eager call, only while tracing otherwise
        return x * 2

    compiled = torch.compile(f, backend="eager")
    with eager():
        for _ in range(3):
            assert compiled(torch.ones(2)).tolist() == [2.0, 2.0]
    assert len(calls) == 3


def test_mark_doc_count_dynamic_marks_the_boundaries_only():
    batch = {"cu_seq_lens_q": torch.tensor([0, 3]), "input_ids": torch.zeros(1, 3), "max_length_q": 3}
    mark_doc_count_dynamic(batch)
    assert getattr(batch["cu_seq_lens_q"], "_dynamo_weak_dynamic_indices", set()) == {0}
    assert not hasattr(batch["input_ids"], "_dynamo_weak_dynamic_indices")


def _tiny_lora_layer(dropout: float):
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=100,
    )  # fmt: skip
    model = get_peft_model(
        Qwen2ForCausalLM(cfg),
        LoraConfig(
            r=8, lora_alpha=16, lora_dropout=dropout, target_modules="all-linear", init_lora_weights=False
        ),
    )
    return model


def _run_layer(model, backend):
    from torch._dynamo import reset

    reset()
    ids = torch.arange(24).reshape(1, 24) % 100
    model.zero_grad()
    hidden = model.get_base_model().model.embed_tokens(ids).detach().requires_grad_(True)
    layer = model.get_base_model().model.layers[0]
    pos = torch.arange(24)[None]
    rope = model.get_base_model().model.rotary_emb(hidden, pos)
    fn = torch.compile(layer, backend=backend) if backend else layer
    out = fn(hidden, position_embeddings=rope, attention_mask=None, position_ids=pos)
    out = out[0] if isinstance(out, tuple) else out
    out.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    return out.detach(), hidden.grad.clone(), grads


def test_lora_a_projections_sharing_an_input_run_as_one_matmul():
    from chattune.train.compiling import fuse_lora_inputs

    seen: list[int] = []

    def backend(gm, example_inputs):  # the pass on dynamo's graph, then run that graph eagerly
        seen.append(fuse_lora_inputs(gm.graph))
        gm.recompile()
        linears = [n for n in gm.graph.nodes if n.target in (torch._C._nn.linear, torch.nn.functional.linear)]
        seen.append(len(linears))
        return gm.forward

    model = _tiny_lora_layer(dropout=0.0)
    want_out, want_dx, want_grads = _run_layer(model, None)
    out, dx, grads = _run_layer(model, backend)
    # q/k/v's three A projections and gate/up's two: 2 groups, so 21 linears (7 base, 7 A, 7 B)
    # become 18 (5 A projections become 2).
    assert seen[0] == 2
    assert seen[1] == 21 - 3
    torch.testing.assert_close(out, want_out)
    torch.testing.assert_close(dx, want_dx)
    assert grads.keys() == want_grads.keys() and len(grads) == 14  # every LoRA A and B got its gradient
    for name in grads:
        torch.testing.assert_close(grads[name], want_grads[name], msg=name)


def test_lora_dropout_leaves_the_projections_apart():
    from chattune.train.compiling import fuse_lora_inputs

    fused: list[int] = []

    def backend(gm, example_inputs):
        fused.append(fuse_lora_inputs(gm.graph))
        return gm.forward

    model = _tiny_lora_layer(dropout=0.1)
    model.eval()  # dropout modules stay in the graph as calls; each module's A reads its own output
    _run_layer(model, backend)
    assert fused == [0]
