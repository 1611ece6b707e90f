"""Packing and collation: rendered Examples -> micro-batch plans -> model-ready tensors.

Sits between `templates` (which renders Example dicts of `input_ids`/`labels`) and `train`
(which feeds the tensors to the model). Pure data transforms: no torch.distributed, no trainer.

A pack is several documents laid end to end in ONE row, so no compute is spent on padding.
Three documents A (3 tokens), B (2) and C (4) become::

    tokens         a0  a1  a2  b0  b1  c0  c1  c2  c3
    position_ids    0   1   2   0   1   0   1   2   3     restart per document: RoPE sees each
                                                          document at its own positions
    labels          -  a1  a2   -  b1   -  c1  c2  c3     '-' = IGNORE_INDEX; a document's first
                                                          token is never a target, so no loss
                                                          predicts B's first token from A
    cu_seq_lens    [0, 3, 5, 9]                           document boundaries for varlen kernels

    block-causal mask (row = query attends to column = key where '#'):

              a0 a1 a2 b0 b1 c0 c1 c2 c3
          a0   #
          a1   #  #
          a2   #  #  #
          b0            #
          b1            #  #
          c0                  #
          c1                  #  #
          c2                  #  #  #
          c3                  #  #  #  #

No attention_mask is returned for a pack: transformers 5 derives the block-causal mask from
the restarting position_ids (and our varlen kernel reads `cu_seq_lens_q/k` directly), which
holds only without a KV cache, so packed forwards must run with `use_cache=False`.

For compiled layers every pack can take one fixed shape (`collate_packed(..., pad_to=12,
max_doc_tokens=4)` on the pack above): the rest of the row is filled with padding documents
of at most `max_doc_tokens` tokens, which attend only to themselves and are never targets, and
`max_length` is that bound, not the pack's own longest document::

    tokens         a0  a1  a2  b0  b1  c0  c1  c2  c3   p   p   p
    position_ids    0   1   2   0   1   0   1   2   3   0   1   2
    labels          -  a1  a2   -  b1   -  c1  c2  c3   -   -   -
    cu_seq_lens    [0, 3, 5, 9, 12]            max_length 4 in every pack

So one compiled graph serves every step (only the document count varies, and only the attention
kernel reads it); the real documents' losses and gradients are those of the unpadded pack.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Sequence

import torch

from chattune.errors import ChattuneError
from chattune.render.examples import IGNORE_INDEX

"""Label of a position that is not trained on (HF's cross-entropy `ignore_index`)."""

# Unpacked mode sorts this many micro-batches' worth of examples by length before cutting them
# into micro-batches: similar lengths share a batch (little padding) while order stays random.
_LENGTH_GROUP_MEGABATCHES = 64


def pack_bins(lengths: Sequence[int], budget_tokens: int) -> list[list[int]]:
    """Best-fit-decreasing bin packing of example indices into rows of <= `budget_tokens` tokens.

    Longest examples are placed first, each into the open bin with the least room that still
    fits it (a new bin when none does). Deterministic: ties keep index order. Returns bins in
    the order they were opened, each listing example indices in placement order.
    """
    if budget_tokens < 1:
        raise ChattuneError(f"packing budget must be at least 1 token, got {budget_tokens}")
    for i, n in enumerate(lengths):
        if n < 1:
            raise ChattuneError(f"example {i} is empty; drop empty examples before packing")
        if n > budget_tokens:
            raise ChattuneError(
                f"example {i} has {n} tokens, more than the packing budget of {budget_tokens}; "
                "truncate examples to max_len <= budget_tokens before packing"
            )
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    # Sorted (free_tokens, bin_id): bisect finds the tightest bin that still fits in O(log n).
    free: list[tuple[int, int]] = []
    for i in order:
        n = lengths[i]
        at = bisect.bisect_left(free, (n, -1))
        if at == len(free):
            bins.append([i])
            bisect.insort(free, (budget_tokens - n, len(bins) - 1))
        else:
            room, b = free.pop(at)
            bins[b].append(i)
            bisect.insort(free, (room - n, b))
    return bins


def collate_packed(
    examples: Sequence[dict],
    *,
    pad_to: int | None = None,
    pad_id: int = 0,
    max_doc_tokens: int | None = None,
) -> dict[str, torch.Tensor | int]:
    """Lay `examples` end to end in one (1, T) row; see the module docstring for the pictures.

    Returns `input_ids`, `labels`, `position_ids` (all int64, shape (1, T)), plus the keys that
    transformers forwards to the attention function: `cu_seq_lens_q`/`cu_seq_lens_k` (int32,
    (docs + 1,)) and `max_length_q`/`max_length_k` (python ints), computed here on the CPU so
    the attention kernel never has to sync the GPU to find document boundaries.

    `pad_to`: T is exactly this many tokens, the rest filled with `pad_id` documents of at most
    `max_doc_tokens` tokens (default `pad_to`). `max_doc_tokens`: the `max_length` reported for
    every pack, a bound on each document's length (a fixed number keeps compiled graphs static).
    Raises ChattuneError when the documents exceed `pad_to` or a document exceeds `max_doc_tokens`.
    """
    if not examples:
        raise ChattuneError("cannot collate an empty pack")
    if max_doc_tokens is not None and max_doc_tokens < 1:
        raise ChattuneError(f"max_doc_tokens must be at least 1, got {max_doc_tokens}")
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    cu = [0]
    for ex in examples:
        doc_ids, doc_labels = ex["input_ids"], ex["labels"]
        if len(doc_ids) != len(doc_labels) or not doc_ids:
            raise ChattuneError(
                f"example has {len(doc_ids)} input_ids and {len(doc_labels)} labels; "
                "they must be equal and non-zero"
            )
        ids.extend(doc_ids)
        # The first token would be predicted from the previous document's last token.
        labels.append(IGNORE_INDEX)
        labels.extend(doc_labels[1:])
        positions.extend(range(len(doc_ids)))
        cu.append(cu[-1] + len(doc_ids))
    max_len = max(b - a for a, b in zip(cu[:-1], cu[1:], strict=True))
    if max_doc_tokens is not None:
        if max_len > max_doc_tokens:
            raise ChattuneError(
                f"a document of {max_len} tokens is longer than max_doc_tokens={max_doc_tokens}"
            )
        max_len = max_doc_tokens
    if pad_to is not None:
        if cu[-1] > pad_to:
            raise ChattuneError(f"the pack holds {cu[-1]} tokens, more than pad_to={pad_to}")
        chunk = max_doc_tokens or pad_to
        while cu[-1] < pad_to:  # padding documents: attend to themselves only, never a target
            n = min(chunk, pad_to - cu[-1])
            ids.extend([pad_id] * n)
            labels.extend([IGNORE_INDEX] * n)
            positions.extend(range(n))
            cu.append(cu[-1] + n)
            max_len = max(max_len, n)  # the kernel must see every token of every document
    cu_t = torch.tensor(cu, dtype=torch.int32)
    return {
        "input_ids": torch.tensor([ids], dtype=torch.long),
        "labels": torch.tensor([labels], dtype=torch.long),
        "position_ids": torch.tensor([positions], dtype=torch.long),
        "cu_seq_lens_q": cu_t,
        "cu_seq_lens_k": cu_t,
        "max_length_q": max_len,
        "max_length_k": max_len,
    }


def collate_padded(examples: Sequence[dict], pad_id: int, pad_to_multiple_of: int = 1) -> dict:
    """Right-pad `examples` into a (B, L) batch with `attention_mask`; padding is never a target.

    `pad_to_multiple_of` rounds L up (8 keeps tensor-core tiles whole on GPUs).
    """
    if not examples:
        raise ChattuneError("cannot collate an empty batch")
    longest = max(len(ex["input_ids"]) for ex in examples)
    width = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, ex in enumerate(examples):
        n = len(ex["input_ids"])
        if len(ex["labels"]) != n:
            raise ChattuneError(
                f"example has {n} input_ids and {len(ex['labels'])} labels; they must be equal"
            )
        ids[row, :n] = torch.tensor(ex["input_ids"], dtype=torch.long)
        labels[row, :n] = torch.tensor(ex["labels"], dtype=torch.long)
        mask[row, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def count_label_tokens(batch: dict) -> int:
    """Number of positions that contribute to the loss (a target after the causal shift).

    The trainer sums this over every micro-batch of an optimizer step and divides the summed
    loss by it, so a token weighs the same whatever pack or micro-batch it landed in.
    """
    return int((batch["labels"][..., 1:] != IGNORE_INDEX).sum())


def build_batches(
    lengths: Sequence[int],
    *,
    packing: bool,
    budget_tokens: int,
    micro_batch_size: int,
    seed: int,
    epoch: int,
    group_by_length: bool = True,
) -> list[list[int]]:
    """The micro-batch plan for one epoch: a list of example-index lists, in training order.

    Packing: one micro-batch per best-fit-decreasing bin of <= `budget_tokens` tokens
    (`micro_batch_size` is unused; the budget sets the size). Unpacked: `micro_batch_size`
    examples per micro-batch, length-grouped within random mega-batches when `group_by_length`
    so padding stays small. Either way the order of micro-batches is shuffled, and the whole
    plan is a pure function of (lengths, settings, seed, epoch).
    """
    if micro_batch_size < 1:
        raise ChattuneError(f"micro_batch_size must be at least 1, got {micro_batch_size}")
    # A string seed is hashed deterministically (unlike hash(), it ignores PYTHONHASHSEED).
    rng = random.Random(f"chattune:{seed}:{epoch}")
    if packing:
        batches = pack_bins(lengths, budget_tokens)
    else:
        order = list(range(len(lengths)))
        rng.shuffle(order)
        if group_by_length:
            group = micro_batch_size * _LENGTH_GROUP_MEGABATCHES
            order = [
                i
                for start in range(0, len(order), group)
                for i in sorted(order[start : start + group], key=lambda i: -lengths[i])
            ]
        batches = [order[s : s + micro_batch_size] for s in range(0, len(order), micro_batch_size)]
    rng.shuffle(batches)
    return batches
