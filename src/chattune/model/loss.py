"""The training loss and the memory a forward/backward costs: model + packed batch -> summed CE.

Sits between `packing` (batches) and `train` (which divides the sum by the label tokens of the
whole accumulated step, so how documents were packed or split into micro-batches never changes
the loss). Also answers `train.checkpointing: auto`: do the activations fit without it?

Why not `model(**batch).loss`: the model's head turns every position into a full-vocabulary row
of logits (T x 152k floats for Qwen2.5, fp32-upcast for the loss), although prompts and
document starts are never targets. Here the backbone runs alone, only the hidden states of
positions with a target go through the head, and they go in chunks whose logits are freed as
soon as their gradient is known.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from chattune.errors import ChattuneError
from chattune.render.packing import IGNORE_INDEX

# fp32 logits of one chunk stay under this many bytes (1536 rows for Qwen2.5's 152k vocab).
_CHUNK_LOGIT_BYTES = 1 << 30


# Compile the cross-entropy's per-chunk math on CUDA (`ce_chunk_and_grad`); bench/ turns it off to compare.
FUSED_CE = True


def _unwrap(model: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(causal-LM model, backbone, output head) of a transformers model, peft-wrapped or not.

    peft injects LoRA layers into the transformers modules in place, so the backbone found
    through `get_base_model()` still runs every adapter (tests/test_loss.py checks this).
    """
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone = getattr(hf, "base_model", None)
    head = hf.get_output_embeddings() if hasattr(hf, "get_output_embeddings") else None
    if backbone is None or backbone is hf or head is None:
        raise ChattuneError(f"{type(hf).__name__} is not a causal LM with a separate backbone and head")
    return hf, backbone, head


class _LinearCrossEntropySum(torch.autograd.Function):
    """sum_i CE(hidden_i @ W^T + b, target_i), with the gradients computed chunk by chunk.

    Forward computes each chunk's logits once, in the weight's dtype then fp32 for the softmax,
    and immediately turns them into d(loss)/d(hidden) (and d/dW when W trains, e.g. tied
    embeddings being trained); only those are kept. Backward just scales them by the incoming
    gradient. Peak extra memory is one chunk of logits instead of all of them, and no logit is
    computed twice (unlike checkpointing the head).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_rows):  # type: ignore[override]
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if need_b else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        fused = _fused_ce_chunk(hidden.device.type) if (need_h or need_w or need_b) else None
        with torch.autocast(hidden.device.type, enabled=False):
            for s in range(0, hidden.shape[0], chunk_rows):
                h = hidden[s : s + chunk_rows].to(weight.dtype)
                t = targets[s : s + chunk_rows]
                logits = F.linear(h, weight, bias)  # (rows, V) in the weight's dtype
                if fused is not None:  # one pass for the log-sum-exp, one for the gradient
                    loss, grad = fused(logits, t)
                    total += loss
                    if need_b:
                        grad_b += grad.float().sum(0)
                else:
                    logits = logits.float()
                    lse = torch.logsumexp(logits, dim=-1)
                    total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
                    if not (need_h or need_w or need_b):
                        continue
                    # d(sum CE)/d(logits) = softmax - one_hot, built in place over the logits.
                    grad = logits.sub_(lse[:, None]).exp_()
                    grad[torch.arange(t.shape[0], device=t.device), t] -= 1.0
                    if need_b:
                        grad_b += grad.sum(0)
                    grad = grad.to(weight.dtype)
                if need_h:
                    grad_h[s : s + chunk_rows] = (grad @ weight).to(hidden.dtype)
                if need_w:
                    grad_w += (grad.t() @ h).float()
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        grad_h, grad_w, grad_b = ctx.saved_tensors
        w_dtype, b_dtype = ctx.dtypes
        dh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        dw = (grad_w * grad_out).to(w_dtype) if grad_w is not None else None
        db = (grad_b * grad_out).to(b_dtype) if grad_b is not None else None
        return dh, dw, db, None, None


def ce_chunk_and_grad(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of CE over the rows in fp32, d(sum)/d(logits) in the logits' dtype) for one chunk.

    The same math as the eager loop in `_LinearCrossEntropySum`, written as pure functions so that
    `torch.compile` fuses it into two passes over the (rows, V) logits (the log-sum-exp, then the
    gradient written once in bf16) instead of the eager loop's seven full-width fp32 passes
    (upcast, logsumexp, subtract, exp, index, downcast...): ~8 bytes of memory traffic per logit
    instead of ~34. On GPUs only; the CPU keeps the eager, in-place loop (tests compare the two).
    """
    lf = logits.float()
    lse = torch.logsumexp(lf, dim=-1, keepdim=True)  # (rows, 1)
    picked = lf.gather(1, targets[:, None])
    loss = (lse - picked).sum()
    cols = torch.arange(lf.shape[1], device=lf.device)[None, :]
    grad = torch.exp(lf - lse) - (cols == targets[:, None]).to(lf.dtype)
    return loss, grad.to(logits.dtype)


def _fused_ce_chunk(device_type: str):
    """`ce_chunk_and_grad` compiled for CUDA (dynamic rows), or None: use the eager loop."""
    if device_type != "cuda" or not FUSED_CE:
        return None
    return _compiled_ce_chunk()


@functools.cache
def _compiled_ce_chunk():
    return torch.compile(ce_chunk_and_grad, dynamic=True)


def _chunked_head_ce_sum(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, chunk_rows: int):
    """Any head module (e.g. one peft wrapped): checkpointed chunks, so only one chunk's logits live."""

    def chunk_loss(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(head(h).float(), t, reduction="sum")

    total = hidden.new_zeros((), dtype=torch.float32)
    for s in range(0, hidden.shape[0], chunk_rows):
        h, t = hidden[s : s + chunk_rows], targets[s : s + chunk_rows]
        total = total + torch.utils.checkpoint.checkpoint(chunk_loss, h, t, use_reentrant=False)
    return total


def add_target_index(batch: dict) -> dict:
    """`batch` plus `target_index`: the flat (B * (T-1)) positions whose next label is a target.

    Computed where the labels are, on the host, before the batch goes to the GPU, so that
    `lm_loss_sum` never waits on the device to learn how many rows the head will see.
    """
    targets = batch["labels"][:, 1:].reshape(-1)
    return {**batch, "target_index": (targets != IGNORE_INDEX).nonzero().squeeze(1)}


# transformers 5.x backbones whose forward takes a ready {layer type: mask} mapping as `attention_mask`
# (`isinstance(causal_mask_mapping := attention_mask, dict)` in their forward). Llama and ERNIE-4.5 do not.
_MASK_MAPPING_MODELS = frozenset({"qwen2", "qwen3", "qwen2_moe"})


def _skips_mask_building(config) -> bool:
    """Whether a packed batch can hand this model "no mask for any layer type" (see lm_loss_sum)."""
    from chattune.model.attention import VARLEN

    return (
        getattr(config, "_attn_implementation", None) == VARLEN
        and config.model_type in _MASK_MAPPING_MODELS
        and bool(getattr(config, "layer_types", None))
    )


def lm_loss_sum(model: nn.Module, batch: dict, chunk_rows: int | None = None) -> tuple[torch.Tensor, int]:
    """(summed next-token cross-entropy over targeted positions as a 0-d fp32 tensor, their count).

    `batch` is a collate_packed/collate_padded dict (already on the model's device), optionally with
    `target_index` from `add_target_index`; every key but those two goes to the backbone, with `use_cache=False` (packing needs it). `inputs_embeds`
    may replace `input_ids`. Works for plain and peft-wrapped transformers causal LMs, tied or
    untied heads. The trainer calls `(loss_sum / step_label_tokens).backward()`.
    """
    hf, backbone, head = _unwrap(model)
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "target_index")}
    if "cu_seq_lens_q" in inputs and inputs.get("attention_mask") is None and _skips_mask_building(hf.config):
        # A packed row under chattune_varlen needs no mask. Left to build one, transformers first looks for
        # packed documents in position_ids, and its `.all()` makes the host wait for the GPU at every
        # forward (bench/trace_gaps.py: `aten::is_nonzero > aten::item`, then ~1.5 ms of GPU idle).
        inputs["attention_mask"] = {kind: None for kind in set(hf.config.layer_types)}
    hidden = backbone(**inputs, use_cache=False).last_hidden_state  # (B, T, H)
    # Position t predicts label t+1; keep only positions whose next label is a target.
    targets = labels[:, 1:].reshape(-1)
    keep = batch.get("target_index")
    if keep is None:  # found on the device: a host sync, since the count sizes the tensors below
        keep = (targets != IGNORE_INDEX).nonzero().squeeze(1)
    n = int(keep.numel())
    if n == 0:
        return hidden.sum() * 0.0, 0  # keeps the graph, so backward still runs
    rows = hidden[:, :-1].reshape(-1, hidden.shape[-1]).index_select(0, keep)
    targets = targets.index_select(0, keep)
    vocab = head.weight.shape[0] if hasattr(head, "weight") else hf.config.vocab_size
    chunk = chunk_rows or max(256, _CHUNK_LOGIT_BYTES // (4 * vocab) // 256 * 256)
    if isinstance(head, nn.Linear):  # plain head (peft wraps trained heads in other classes)
        loss = _LinearCrossEntropySum.apply(rows, head.weight, head.bias, targets, chunk)
    else:
        loss = _chunked_head_ce_sum(head, rows, targets, chunk)
    return loss, n


# --- train.checkpointing: auto ---------------------------------------------------------------


def activation_bytes_per_token(config, checkpointing: bool, dtype_bytes: int = 2) -> int:
    """Bytes autograd keeps per token for a LoRA'd decoder stack (transformers' eager layers).

    Per layer, without checkpointing: two RMSNorm inputs kept in fp32 (2 x 4h), the normed inputs
    to the LoRA'd q/k/v and gate/up projections (2 x 2h), q, k, v and the attention output
    (2(2h + 2kv)), o_proj's input (2h), SiLU's input, its output and `up` (3 x 2i) and
    down_proj's input (2i): 18h + 4kv + 8i bytes in bf16, i.e. about 218 kB a layer for
    Qwen2.5-7B. With checkpointing only each layer's input (2h) stays, plus one layer's worth
    during its recomputation (added once).
    """
    h, i, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    kv = config.num_key_value_heads * head_dim
    per_layer = (9 * h + 2 * kv + 4 * i) * dtype_bytes  # = 18h + 4kv + 8i for bf16
    if checkpointing:
        return layers * h * dtype_bytes + per_layer
    return layers * per_layer


def checkpointing_needed(
    model: nn.Module,
    budget_tokens: int,
    free_bytes: int | None = None,
    headroom: float = 0.85,
) -> bool:
    """`train.checkpointing: auto`: True when one micro-batch's activations would not fit.

    Call after the model and LoRA are on the GPU (plain or peft-wrapped), with the tokens of the
    largest micro-batch (packing: the budget; padded: micro_batch_size x max_len). Counts the
    eager activations for those tokens, the trainable parameters' fp32 gradients and AdamW
    moments (12 bytes each), and one chunk of head logits (fp32 plus bf16 copies), against
    `headroom` of the free memory (default: `torch.cuda.mem_get_info()`), which leaves room for
    fragmentation and cuBLAS workspaces. False off CUDA. Checkpointing costs about a third more
    compute, so it is switched on only when needed. On an H100 the estimate matched measured 7B
    peaks within 1 GiB (bench/RESULTS.md); compiled layers keep ~25 % less than it assumes.
    """
    if free_bytes is None:
        if not torch.cuda.is_available():
            return False
        free_bytes = torch.cuda.mem_get_info()[0]
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = hf.config
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    chunk_rows = max(256, _CHUNK_LOGIT_BYTES // (4 * config.vocab_size) // 256 * 256)
    need = (
        activation_bytes_per_token(config, checkpointing=False) * budget_tokens
        + 12 * trainable
        + 8 * chunk_rows * config.vocab_size
    )
    return need > headroom * free_bytes
