"""Attention for packed batches, plugged into transformers through its public `AttentionInterface`.

Sits between `packing` (which emits one row of documents plus `cu_seq_lens_q/k`) and the model:
`models` loads with `attn_implementation=pick_attn_implementation(...)`, and every attention
layer then calls `varlen_attention_forward` below, which never lets a document see another.

What is available, and why this order (investigated on torch 2.11/2.13, transformers 5.17/5.23):
1. `torch.nn.attention.varlen.varlen_attn`: PyTorch's own FlashAttention-2 variable-length
   kernel (`aten._flash_attention_forward` with cumulative sequence lengths), a
   `torch.library.custom_op` with autograd, so it also traces under `torch.compile`. Work is
   proportional to sum(len_i^2), never T^2, and no mask tensor exists. Its keyword arguments
   move between releases (2.11: causal is `window_size=(-1, 0)` and GQA just works; 2.13 also
   wants `enable_gqa=True`; earlier prototypes took `is_causal`), so we read its signature, and
   a one-off probe checks forward and backward against a per-document reference before we
   trust it. CUDA and fp16/bf16 only. On an H100 with torch 2.11 the probe passed and packed
   losses matched per-document losses (bench/RESULTS.md).
2. `flash_attention_2` from the flash-attn package, when installed: transformers' own varlen path.
3. `sdpa`: transformers detects packed documents from restarting position_ids and builds a dense
   (T x T) block-causal mask; correct, but the mask rules out SDPA's flash kernel, so it is the
   slow fallback on GPU and the default on CPU.
FlexAttention with a document `BlockMask` would also work but needs compiled kernels and a mask
rebuilt per batch; the varlen kernel does the same job with neither, so it is not used.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import logging

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from chattune.errors import ChattuneError

log = logging.getLogger(__name__)

VARLEN = "chattune_varlen"


"""The `attn_implementation` name registered by `register_attention`."""

# Set once, eagerly, by register_attention(): the forward only reads these plain globals, so
# torch.compile traces a constant instead of the probe.
_torch_varlen_ok = False


_varlen_kwargs: dict = {}


def cu_seq_lens_from_position_ids(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Document boundaries of a (B, T) position_ids tensor, flattened row after row.

    A document starts wherever a position is not the previous one plus 1 (the rule transformers
    uses) and at every row start. Returns (cu_seq_lens int32 (docs + 1,), longest document).
    Syncs with the device; collate_packed precomputes both so the hot path never calls this.
    """
    b, t = position_ids.shape
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    idx = starts.flatten().nonzero().flatten()
    cu = torch.cat([idx, idx.new_tensor([b * t])]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


def _reference_varlen(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, scale: float | None
) -> torch.Tensor:
    """Causal attention one document at a time with SDPA: the CPU path and the probe's truth.

    q (T, Hq, D), k/v (T, Hkv, D) -> (T, Hq, D).
    """
    out = torch.empty_like(q)
    bounds = cu.tolist()
    for s, e in zip(bounds[:-1], bounds[1:], strict=True):
        if e == s:
            continue
        o = F.scaled_dot_product_attention(
            q[s:e].transpose(0, 1),
            k[s:e].transpose(0, 1),
            v[s:e].transpose(0, 1),
            is_causal=True,
            scale=scale,
            enable_gqa=q.shape[1] != k.shape[1],
        )
        out[s:e] = o.transpose(0, 1)
    return out


@functools.cache
def _varlen_call_kwargs() -> dict | None:
    """Keyword arguments that make this torch's varlen_attn causal and GQA-aware, or None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    if "window_size" in params:  # torch 2.11+: causal is window (-1, 0)
        kwargs: dict = {"window_size": (-1, 0)}
    elif "is_causal" in params:  # earlier prototypes
        kwargs = {"is_causal": True}
    else:
        return None
    # FA2 handles Hkv < Hq natively; torch 2.13 only asks us to say so.
    if "enable_gqa" in params:
        kwargs["enable_gqa"] = True
    return kwargs


def _torch_varlen(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, max_len: int, scale: float | None
) -> torch.Tensor:
    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn(q, k, v, cu, cu, max_len, max_len, scale=scale, **_varlen_kwargs)


@functools.cache
def varlen_kernel_ready() -> bool:
    """Whether torch's varlen kernel exists here and matches the reference, forward and backward.

    Runs once per process on a tiny GQA case (3 documents, bf16, CUDA); False on CPU-only torch.
    """
    global _varlen_kwargs
    if _varlen_call_kwargs() is None or not torch.cuda.is_available():
        return False
    _varlen_kwargs = _varlen_call_kwargs()
    try:
        gen = torch.Generator(device="cuda").manual_seed(0)
        lens = [5, 67, 130]
        cu = torch.tensor([0, 5, 72, 202], dtype=torch.int32, device="cuda")

        def rand(h: int) -> torch.Tensor:
            x = torch.randn(sum(lens), h, 64, device="cuda", dtype=torch.bfloat16, generator=gen)
            return x.requires_grad_()

        q, k, v = rand(4), rand(2), rand(2)
        g = torch.randn(sum(lens), 4, 64, device="cuda", dtype=torch.bfloat16, generator=gen)
        got = _torch_varlen(q, k, v, cu, max(lens), None)
        got_grads = torch.autograd.grad(got, (q, k, v), g)
        ref = _reference_varlen(*(x.float() for x in (q, k, v)), cu, None)
        ref_grads = torch.autograd.grad(ref, (q, k, v), g.float())
        for a, b in zip((got, *got_grads), (ref, *ref_grads), strict=True):
            err = (a.float() - b.float()).norm() / b.float().norm()
            if not err < 2e-2:  # bf16 operands land near 4e-3
                log.warning("torch varlen_attn disagrees with the reference (rel err %.3g); not used", err)
                return False
        return True
    except Exception as exc:  # any failure means: do not use it
        log.warning("torch varlen_attn unusable here (%s); falling back", exc)
        return False


def varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The `chattune_varlen` attention function (transformers' AttentionInterface signature).

    query (B, Hq, T, D), key/value (B, Hkv, S, D) -> ((B, T, Hq, D), None). Packed training
    (no mask, S == T) runs block-causal over documents from `cu_seq_lens_q` (else derived from
    `position_ids`). Anything else, such as padded batches or decoding with a KV cache, gets a
    mask from `_mask_or_none` and goes to transformers' SDPA path unchanged.
    """
    b, hq, t, d = query.shape
    if attention_mask is not None or key.shape[2] != t:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if dropout:
        raise ChattuneError("chattune_varlen attention has no dropout; set attention_dropout=0")
    if sliding_window is not None:
        raise ChattuneError("chattune_varlen attention has no sliding window; use sdpa for this model")
    cu, max_len = kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q")
    if cu is None or max_len is None:
        position_ids = kwargs.get("position_ids")
        if position_ids is None:
            position_ids = torch.arange(t, device=query.device).expand(b, t)
        cu, max_len = cu_seq_lens_from_position_ids(position_ids.expand(b, t))
    cu = cu.to(device=query.device, dtype=torch.int32)
    # (B, H, T, D) -> (B*T, H, D): a view for B == 1, which is what packing produces.
    q = query.transpose(1, 2).reshape(b * t, hq, d)
    k = key.transpose(1, 2).reshape(b * t, key.shape[1], d)
    v = value.transpose(1, 2).reshape(b * t, value.shape[1], d)
    if torch.is_autocast_enabled(q.device.type):
        # What autocast does for SDPA. fp32 weights (full fine-tuning) give fp32 cos/sin, so RoPE turns
        # bf16 q/k into fp32, which sent them to the per-document reference loop (Qwen2.5-0.5B full
        # fine-tuning: 9,173 tokens/s on an H200) and broke the graph inside every compiled layer.
        half = torch.get_autocast_dtype(q.device.type)
        q, k, v = q.to(half), k.to(half), v.to(half)
    if _torch_varlen_ok and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        out = _torch_varlen(q, k, v, cu, int(max_len), scaling)
    else:
        out = _reference_varlen(q, k, v, cu, scaling)
    return out.view(b, t, hq, d), None


def _mask_or_none(*, attention_mask=None, q_length=None, kv_length=None, q_offset=0, kv_offset=0, **kwargs):
    """Mask builder paired with `chattune_varlen`: nothing to build for packed training.

    With no padding mask, no cache offset and as many keys as queries, the varlen kernel finds
    documents itself (None here also skips transformers' dense block mask). Otherwise build the
    SDPA mask, so padded batches and generation stay exactly as with `sdpa`.
    """
    plain = (
        attention_mask is None
        and isinstance(q_offset, int)
        and isinstance(kv_offset, int)
        and q_offset == 0
        and kv_offset == 0
        and q_length == kv_length
    )
    if plain:
        return None
    return sdpa_mask(
        attention_mask=attention_mask,
        q_length=q_length,
        kv_length=kv_length,
        q_offset=q_offset,
        kv_offset=kv_offset,
        **kwargs,
    )


def register_attention() -> None:
    """Register `chattune_varlen` with transformers (idempotent). Call before loading the model.

    On CUDA this also runs the one-off kernel probe, so call it before any `torch.compile`.
    """
    global _torch_varlen_ok
    _torch_varlen_ok = varlen_kernel_ready()
    AttentionInterface.register(VARLEN, varlen_attention_forward)
    AttentionMaskInterface.register(VARLEN, _mask_or_none)


def pick_attn_implementation(device_type: str, packing: bool) -> str:
    """The `attn_implementation` to load the model with, registering ours when it is chosen.

    Packed on CUDA: `chattune_varlen` when torch's varlen kernel passes its probe, else
    `flash_attention_2` when flash-attn is installed, else `sdpa` (dense block mask: correct,
    slower). Unpacked, or on CPU/MPS: `sdpa`. Packed forwards need `use_cache=False`.
    """
    if not packing or device_type != "cuda":
        return "sdpa"
    if varlen_kernel_ready():
        register_attention()
        return VARLEN
    if importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    log.warning("no variable-length attention kernel found; packed batches use sdpa with a dense mask")
    return "sdpa"
