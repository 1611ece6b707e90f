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
- LoRA A projections that read the same tensor (q/k/v, gate/up) are fused into one matmul on the
  graph before inductor compiles it (`fuse_lora_inputs`; issue 14 item 2: 7 skinny matmuls a layer
  that each re-read the hidden states);
- torch's compile cache (inductor's FX graphs, AOT autograd entries, Triton kernels) lives under
  `$CHATTUNE_CACHE/torch-compile/`, so a second run on the same machine starts warm. Inductor keys
  each entry by the graph (architecture, shapes, dtypes), the GPU and the torch/Triton versions; the
  folder is per torch version so an upgrade leaves the old one to delete.
"""

from __future__ import annotations

import contextlib
import operator
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

# FlashAttention-2 works through query rows in blocks of 128 (head dim 128): a document bound rounded
# up to it launches the same blocks as the pack's own longest document would.
_DOC_BOUND_MULTIPLE = 128


def compile_cache_dir() -> Path:
    """Where torch's compile cache goes: `$CHATTUNE_CACHE/torch-compile/torch-<version>`."""
    import torch

    from chattune.paths import cache_dir

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


def start_compile_workers() -> None:
    """Start inductor's compile worker processes now, so they are up by the first compiled step.

    Torch's own `inductor` backend starts them at the first compile ("the subprocess pool can be slow
    to start, so warm it up as early as possible", torch/_dynamo/backends/inductor.py); our backend
    (`_inductor_with_lora_fusion`) calls `compile_fx` directly, which starts them only when the first
    kernel is submitted. Called when the model starts loading, their start overlaps the load and the
    baseline evaluation. Call after `use_compile_cache`: the workers inherit its cache folder. Without
    Triton (CPU builds) there are no workers and nothing happens.
    """
    try:
        from torch._inductor.async_compile import maybe_warm_pool
    except ImportError:  # a torch without inductor's process pool: compiling starts as before
        return
    maybe_warm_pool()


def doc_bound(lengths: Sequence[int], pack_tokens: int) -> int:
    """The `max_doc_tokens` of a run's fixed-shape packs: its longest document, rounded up to 128."""
    longest = max(lengths)
    return min(pack_tokens, -(-longest // _DOC_BOUND_MULTIPLE) * _DOC_BOUND_MULTIPLE)


def compile_layers(layers: Sequence, static_shapes: bool, fuse_lora: bool = True) -> None:
    """`torch.compile` each layer in place (regional compilation: the layers share one code object).

    `static_shapes`: inputs keep one shape from step to step (fixed-shape packs), so the graph is
    specialised to it, save the dimensions marked by `mark_doc_count_dynamic`; otherwise every
    dimension is symbolic (padded batches change width every step).
    `fuse_lora`: LoRA A projections that share an input run as one matmul (`fuse_lora_inputs`).
    """
    backend = _inductor_with_lora_fusion if fuse_lora else "inductor"
    for layer in layers:
        layer.compile(dynamic=None if static_shapes else True, backend=backend)


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


def _inductor_with_lora_fusion(gm, example_inputs):
    """A `torch.compile` backend: `fuse_lora_inputs` on dynamo's graph, then inductor as usual.

    The graph inductor sees is already fused, so its compile caches key on it as on any graph (set
    as inductor's `pre_grad_custom_pass` instead, torch 2.11 bypassed its FX-graph cache).
    """
    from torch._inductor.compile_fx import compile_fx

    if fuse_lora_inputs(gm.graph):
        gm.recompile()
    return compile_fx(gm, example_inputs)


# A LoRA A projection has `r` output rows; base layers have thousands. Trainable, bias-free linears
# no wider than this that read one tensor are fused; a full fine-tune's wide weights are left alone.
_MAX_FUSED_ROWS = 1024


def fuse_lora_inputs(graph) -> int:
    """Fuse the trainable LoRA A projections that read the same tensor into one matmul (an FX pass).

    In a decoder layer q/k/v read the same normed hidden states, and so do gate/up: peft runs one
    `linear(x, A)` per module, so x ([tokens, hidden], bf16) is read 3 (2) times in the forward and
    in the backward's A gradient, and 3 (2) input gradients of [tokens, hidden] are written and
    summed. Here each such group becomes `linear(x, cat([A_q, A_k, A_v]))` split along the last
    dimension: one read of x, one input gradient (autograd differentiates the fused graph). The
    products are the same dot products (results may differ in the last bits, by the matmul's tiling).

    Matches `torch.nn.functional.linear(x, w)` with no bias where `w` is a 2-D graph input that
    requires grad and has at most 1,024 rows, grouped by `x`; LoRA dropout > 0 gives each module its
    own input, so nothing is fused then. Returns the number of fused groups. The idea is inductor's
    own `batch_linear_lhs` pre-grad fusion, which needs 2-D inputs and fuses frozen weights too.
    """
    import torch

    groups: dict = {}
    for node in graph.nodes:
        if node.op != "call_function" or node.target not in (torch._C._nn.linear, torch.nn.functional.linear):
            continue
        args = list(node.args) + [None] * (3 - len(node.args))
        x, w, bias = args[0], node.kwargs.get("weight", args[1]), node.kwargs.get("bias", args[2])
        if bias is not None or not isinstance(w, torch.fx.Node) or w.op not in ("placeholder", "get_attr"):
            continue
        value = w.meta.get("example_value", w.meta.get("val"))
        if not isinstance(value, torch.Tensor) or value.dim() != 2 or not value.requires_grad:
            continue
        if value.shape[0] > _MAX_FUSED_ROWS:
            continue
        groups.setdefault(x, []).append((node, w, value))
    fused = 0
    for x, members in groups.items():
        kinds = {(v.dtype, v.device, v.shape[1]) for _, _, v in members}
        if len(members) < 2 or len(kinds) != 1:
            continue
        first = members[0][0]
        rows = [int(v.shape[0]) for _, _, v in members]
        with graph.inserting_before(first):
            weight = graph.call_function(torch.cat, ([w for _, w, _ in members],), {"dim": 0})
            out = graph.call_function(torch.nn.functional.linear, (x, weight))
            parts = graph.call_function(torch.split, (out, rows), {"dim": -1})
        for i, (node, _, _) in enumerate(members):
            with graph.inserting_after(parts):
                part = graph.call_function(operator.getitem, (parts, i))
            part.meta.update(node.meta)
            node.replace_all_uses_with(part)
            graph.erase_node(node)
        fused += 1
    if fused:
        graph.lint()
    return fused
