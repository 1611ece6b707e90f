"""Regional compilation for training: one graph for every step, and a cache that outlives the process.

`train.run` compiles each decoder layer (`torch.compile`, reused by every layer). This module holds
what keeps that cheap (bench/RESULTS.md, issue 14: the first steps of a 7B run spent ~89 s compiling):
- packs of one fixed shape (`packing.collate_packed(pad_to=..., max_doc_tokens=...)`) compiled with
  static shapes, the document count alone left dynamic (only the attention kernel reads it), so one
  graph serves every step instead of a symbolic-shape graph (where attention is torch's varlen kernel
  in half precision; `train.run` keeps every dimension symbolic elsewhere);
- every layer's input requires grad (`train.run` asks the model), so layer 0 shares the graph of the
  others instead of compiling its own (~1 % more backward work for the first layer);
- evaluation and sample generation run eagerly: their shapes change with every batch and they run
  a few times a run, so compiling them costs more than it saves;
- torch's compile cache (inductor's FX graphs, AOT autograd entries, Triton kernels) lives under
  `$CHATTUNE_CACHE/torch-compile/`, so a second run on the same machine starts warm. Inductor keys
  each entry by the graph (architecture, shapes, dtypes), the GPU and the torch/Triton versions; the
  folder is per torch version so an upgrade leaves the old one to delete.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

# FlashAttention-2 works through query rows in blocks of 128 (head dim 128): a document bound rounded
# up to it launches the same blocks as the pack's own longest document would.
_DOC_BOUND_MULTIPLE = 128


def compile_cache_dir() -> Path:
    """Where torch's compile cache goes: `$CHATTUNE_CACHE/torch-compile/torch-<version>`."""
    import torch

    from chattune.models import cache_dir

    return cache_dir() / "torch-compile" / f"torch-{torch.__version__}"


def use_compile_cache() -> Path:
    """Point inductor's on-disk cache (and Triton's, inside it) at `compile_cache_dir()`; returns it.

    A `TORCHINDUCTOR_CACHE_DIR` the user set wins. Importing transformers already sets the variable to
    inductor's default (`/tmp/torchinductor_<user>`, lost on reboot), so only that value is replaced.
    Call before the first compiled call.
    """
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    chosen = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if chosen and os.path.abspath(chosen) != os.path.abspath(default_cache_dir()):
        return Path(chosen)
    path = compile_cache_dir()
    path.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    try:  # paths inductor memoised from the old value (what torch's own temporary_cache_dir does)
        from torch._inductor.utils import clear_caches

        clear_caches()
    except ImportError:
        pass
    return path


def doc_bound(lengths: Sequence[int], pack_tokens: int) -> int:
    """The `max_doc_tokens` of a run's fixed-shape packs: its longest document, rounded up to 128."""
    longest = max(lengths)
    return min(pack_tokens, -(-longest // _DOC_BOUND_MULTIPLE) * _DOC_BOUND_MULTIPLE)


def compile_layers(layers: Sequence, static_shapes: bool) -> None:
    """`torch.compile` each layer in place (regional compilation: the layers share one code object).

    `static_shapes`: inputs keep one shape from step to step (fixed-shape packs), so the graph is
    specialised to it, save the dimensions marked by `mark_doc_count_dynamic`; otherwise every
    dimension is symbolic (padded batches change width every step).
    """
    for layer in layers:
        layer.compile(dynamic=None if static_shapes else True)


def mark_doc_count_dynamic(batch: dict) -> dict:
    """Let a pack's document count vary without a recompile (the one dimension that changes)."""
    import torch

    for key in ("cu_seq_lens_q", "cu_seq_lens_k"):
        if isinstance(batch.get(key), torch.Tensor):
            torch._dynamo.maybe_mark_dynamic(batch[key], 0)
    return batch


@contextlib.contextmanager
def eager() -> Iterator[None]:
    """Run compiled modules as plain eager code for a while (evaluation, sample generation)."""
    import torch

    with torch.compiler.set_stance("force_eager"):
        yield
