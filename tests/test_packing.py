"""packing: best-fit-decreasing bins, collation of packs and padded batches, epoch plans."""

from __future__ import annotations

import random

import pytest
import torch

from chattune.errors import ChattuneError
from chattune.render.packing import (
    IGNORE_INDEX,
    build_batches,
    collate_packed,
    collate_padded,
    count_label_tokens,
    pack_bins,
)


def _naive_bfd(lengths: list[int], budget: int) -> list[list[int]]:
    """Textbook best-fit decreasing, O(n^2): the spec pack_bins must reproduce."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        fits = [b for b in range(len(bins)) if room[b] >= lengths[i]]
        if not fits:
            bins.append([i])
            room.append(budget - lengths[i])
            continue
        best = min(fits, key=lambda b: (room[b], b))
        bins[best].append(i)
        room[best] -= lengths[i]
    return bins


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pack_bins_is_best_fit_decreasing_within_budget(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(1, 384) for _ in range(500)]
    bins = pack_bins(lengths, 1024)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 1024 for b in bins)
    assert bins == _naive_bfd(lengths, 1024)
    # BFD is near-optimal here: within one bin of the volume lower bound plus a little slack.
    assert len(bins) <= -(-sum(lengths) // 1024) + 3


def test_pack_bins_rejects_examples_over_budget():
    with pytest.raises(ChattuneError, match="example 1 has 9 tokens"):
        pack_bins([3, 9], 8)
    with pytest.raises(ChattuneError, match="empty"):
        pack_bins([3, 0], 8)


def _ex(ids, n_prompt):
    return {"input_ids": list(ids), "labels": [IGNORE_INDEX] * n_prompt + list(ids[n_prompt:])}


def test_collate_packed_positions_labels_and_boundaries():
    docs = [_ex([11, 12, 13], 1), _ex([21, 22], 1), _ex([31, 32, 33, 34], 2)]
    # A document whose first token carries a label still gets it masked (cross-document target).
    docs[1]["labels"][0] = 21
    out = collate_packed(docs)
    assert out["input_ids"].tolist() == [[11, 12, 13, 21, 22, 31, 32, 33, 34]]
    assert out["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3]]
    m = IGNORE_INDEX
    assert out["labels"].tolist() == [[m, 12, 13, m, 22, m, m, 33, 34]]
    assert out["cu_seq_lens_q"].tolist() == [0, 3, 5, 9]
    assert out["cu_seq_lens_q"].dtype == torch.int32
    assert out["max_length_q"] == out["max_length_k"] == 4
    assert "attention_mask" not in out
    assert count_label_tokens(out) == 5


def test_collate_packed_pads_to_a_fixed_shape():
    """Padding documents of at most `max_doc_tokens`, never targets; max_length is the fixed bound."""
    docs = [_ex([11, 12, 13], 1), _ex([21, 22], 1)]
    out = collate_packed(docs, pad_to=12, pad_id=0, max_doc_tokens=4)
    m = IGNORE_INDEX
    assert out["input_ids"].tolist() == [[11, 12, 13, 21, 22, 0, 0, 0, 0, 0, 0, 0]]
    assert out["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3, 0, 1, 2]]
    assert out["labels"].tolist() == [[m, 12, 13, m, 22, m, m, m, m, m, m, m]]
    assert out["cu_seq_lens_q"].tolist() == [0, 3, 5, 9, 12]
    assert out["max_length_q"] == out["max_length_k"] == 4
    assert count_label_tokens(out) == count_label_tokens(collate_packed(docs)) == 3
    # Every pack of a run gets the same shape and max_length, whatever it holds.
    other = collate_packed([_ex([1, 2], 1)], pad_to=12, pad_id=0, max_doc_tokens=4)
    assert other["input_ids"].shape == out["input_ids"].shape and other["max_length_q"] == 4
    # A full pack gets no padding; without a bound, max_length covers the padding document too.
    assert collate_packed(docs, pad_to=5)["cu_seq_lens_q"].tolist() == [0, 3, 5]
    assert collate_packed(docs, pad_to=12)["max_length_q"] == 7


def test_collate_packed_refuses_what_does_not_fit():
    docs = [_ex([11, 12, 13], 1), _ex([21, 22], 1)]
    with pytest.raises(ChattuneError, match="5 tokens, more than pad_to=4"):
        collate_packed(docs, pad_to=4)
    with pytest.raises(ChattuneError, match="document of 3 tokens is longer than max_doc_tokens=2"):
        collate_packed(docs, pad_to=8, max_doc_tokens=2)


def test_collate_padded_masks_padding():
    out = collate_padded([_ex([1, 2, 3], 1), _ex([4, 5], 1)], pad_id=0, pad_to_multiple_of=4)
    m = IGNORE_INDEX
    assert out["input_ids"].tolist() == [[1, 2, 3, 0], [4, 5, 0, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 0, 0]]
    assert out["labels"].tolist() == [[m, 2, 3, m], [m, 5, m, m]]
    assert count_label_tokens(out) == 3


def test_build_batches_deterministic_and_complete():
    rng = random.Random(0)
    lengths = [rng.randint(1, 200) for _ in range(300)]
    for packing in (True, False):
        kw = dict(packing=packing, budget_tokens=512, micro_batch_size=4, seed=3)
        a = build_batches(lengths, epoch=0, **kw)
        assert a == build_batches(lengths, epoch=0, **kw)
        assert a != build_batches(lengths, epoch=1, **kw)
        assert sorted(i for b in a for i in b) == list(range(len(lengths)))
        if packing:
            assert all(sum(lengths[i] for i in b) <= 512 for b in a)
        else:
            assert all(len(b) <= 4 for b in a)


def test_length_grouping_cuts_padding():
    rng = random.Random(1)
    lengths = [rng.randint(1, 400) for _ in range(1024)]

    def padded_tokens(batches):
        return sum(len(b) * max(lengths[i] for i in b) for b in batches)

    kw = dict(packing=False, budget_tokens=512, micro_batch_size=8, seed=0, epoch=0)
    grouped = build_batches(lengths, group_by_length=True, **kw)
    plain = build_batches(lengths, group_by_length=False, **kw)
    assert padded_tokens(grouped) < 0.8 * padded_tokens(plain)
