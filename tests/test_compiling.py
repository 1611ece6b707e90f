"""compiling: the compile cache's place, the fixed packs' document bound, eager evaluation."""

from __future__ import annotations

import torch

from chattune.compiling import compile_cache_dir, doc_bound, eager, mark_doc_count_dynamic, use_compile_cache


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
