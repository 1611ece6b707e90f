"""Greedy decoding on a static KV cache, each step replayed as one CUDA graph (training-time samples).

The sample answers a training run prints before training and after every epoch are greedy. Decoded by
`generate` in eager mode, a token of a 7B model costs one Python call per module, thousands of kernel
launches whose host time dwarfs the GPU's (79 ms a step for 5 rows of the 7B on an H200 host, issue
14). Here the prompt is run once (prefill) into a `transformers.StaticCache`, then one decoding step (all
layers and the LM head, for every row) is captured as a CUDA graph and replayed for each new token:
one launch per token. Torch's recipe for this is "CUDA Graphs" in the CUDA semantics notes
(https://pytorch.org/docs/stable/notes/cuda.html#cuda-graphs): static input tensors updated in place,
warm-up, capture, replay. The warm-up is the first two real steps, run eagerly: the cache keeps its
own write position, so a step run only to warm up would move it.

What makes a step capturable: every input has one shape and address (the cache is allocated for
prompt + `max_new_tokens`), nothing in the forward reads a value back to the host (the cache position
and the positions are passed in, and the attention mask is a ready 4-D mask, which transformers uses
as given), and the attention is SDPA. The tokens are the ones `generate` picks (same prompt, positions
and masking; `tests/test_decoding.py` checks the ids are equal), up to the rounding of a
different kernel order.
"""

from __future__ import annotations

import torch

_CHECK_EVERY = 16  # steps between host reads of "has every row stopped" (each read waits for the GPU)


_EAGER_STEPS = 2  # decoding steps run eagerly before the capture (torch's warm-up before capturing)


# Generation settings under which `generate(do_sample=False)` does more than take the argmax (a logits
# processor, or beam search), with their neutral values. `generate` fills the fields its caller leaves unset
# from the model's generation_config.json. `repetition_penalty` (Qwen2.5-Instruct's file sets 1.05) is
# applied by `greedy_decode` itself (`_RepetitionPenalty`).
_GREEDY_NEUTRAL = {
    "num_beams": 1,
    "no_repeat_ngram_size": 0,
    "min_length": 0,
    "min_new_tokens": 0,
    "guidance_scale": 1,
    **dict.fromkeys(
        ("bad_words_ids", "sequence_bias", "suppress_tokens", "begin_suppress_tokens", "forced_bos_token_id",
         "forced_eos_token_id", "exponential_decay_length_penalty", "watermarking_config", "penalty_alpha",
         "dola_layers"),
    ),
}  # fmt: skip


def can_decode_static(model) -> bool:
    """Whether `greedy_decode` supports `model`: SDPA attention (or chattune's packed attention, which
    is SDPA outside packed batches), a cache transformers can make static, and whole weights (FSDP's
    sharded ones are gathered by hooks and collectives a replayed graph would not repeat), and a generation
    config under which `generate`'s greedy picks are the plain argmax (`_GREEDY_NEUTRAL`)."""
    from chattune.model.attention import VARLEN

    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) not in ("sdpa", VARLEN):
        return False
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed support has no sharded weights either
        DTensor = None
    if DTensor is not None and any(isinstance(p, DTensor) for p in model.parameters()):
        return False
    gen = generation_config_of(model)
    if any(getattr(gen, k, None) not in (None, v) for k, v in _GREEDY_NEUTRAL.items()):
        return False
    text = config.get_text_config(decoder=True)
    return all(t == "full_attention" for t in getattr(text, "layer_types", None) or ["full_attention"])


def generation_config_of(model):
    """The generation config `generate` reads: the transformers model's (a peft wrapper's `generate`
    calls its base model's), or None."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base, "generation_config", None)


def cache_argument(model) -> str:
    """The name `model.forward` takes its KV cache under: `cache` from transformers 5.24 on, `past_key_values`
    before (a peft wrapper is looked through). Returns the keyword, a str."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(type(base).forward).parameters else "past_key_values"


class _RepetitionPenalty:
    """transformers' own `RepetitionPenaltyLogitsProcessor`, built as `generate` builds it, applied to the
    last-position logits in float32 (as `generate` applies its processors) outside the graph, where the
    ids seen so far may grow. Left padding is left out as `generate` leaves it out: newer transformers
    pass each row's padding length as a tensor `prompt_ignore_length`; 5.17's processor takes only an
    int there, and its `generate` penalises the padding too."""

    def __init__(self, penalty: float, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

        padding = (attention_mask != 0).int().argmax(dim=1)  # what newer `generate` passes
        try:
            self.processor = RepetitionPenaltyLogitsProcessor(float(penalty), prompt_ignore_length=padding)
        except (TypeError, ValueError):  # per-row lengths unsupported: `generate` passes none either
            self.processor = RepetitionPenaltyLogitsProcessor(float(penalty))
        self.ids = input_ids

    def pick(self, logits: torch.Tensor) -> torch.Tensor:
        """The greedy token of each row (B,) after the penalty, from last-position logits (B, vocab)."""
        token = self.processor(self.ids, logits.float()).argmax(-1)
        self.ids = torch.cat([self.ids, token[:, None]], dim=1)
        return token


def greedy_decode(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    stop_ids: list[int],
    pad_id: int,
    cuda_graph: bool = True,
    repetition_penalty: float = 1.0,
) -> torch.Tensor:
    """New token ids (B, n <= max_new_tokens) after left-padded prompts `input_ids` (B, P) with
    `attention_mask` (B, P; 0 on padding), as `generate(do_sample=False)` returns them after the prompt:
    a row that produced a stop id then holds `pad_id`, and decoding ends when every row has stopped.

    `cuda_graph`: capture one decoding step and replay it (CUDA only); False steps eagerly through the
    same static cache (the reference the graph is tested against). `repetition_penalty` != 1: as
    `generate` applies the model's `generation_config.repetition_penalty` (`_RepetitionPenalty`).
    Raises RuntimeError from torch when
    the model's forward cannot be captured (a host read inside it): the caller falls back to `generate`.
    """
    from transformers import StaticCache

    cache_arg = cache_argument(model)
    batch, prompt_len = input_ids.shape
    device = input_ids.device
    total = prompt_len + max_new_tokens
    cache = StaticCache(config=model.config, max_cache_len=total)
    # Positions as `generate` gives them to left-padded rows: 0 at each row's first real token.
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    stops = torch.tensor(sorted(set(stop_ids)), device=device)
    with torch.inference_mode():
        logits = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=positions,
            cache_position=torch.arange(prompt_len, device=device),
            use_cache=True,
            **{cache_arg: cache},
            logits_to_keep=1,
        ).logits[:, -1]
        penalty = None
        if repetition_penalty != 1.0:
            penalty = _RepetitionPenalty(repetition_penalty, input_ids, attention_mask)
        token = penalty.pick(logits) if penalty is not None else logits.argmax(-1)
        finished = torch.isin(token, stops)
        out = [token]
        if max_new_tokens == 1 or bool(finished.all()):  # every row stopped at once: nothing to decode
            return torch.stack(out, dim=1)

        # The static inputs of one step; each step writes them in place.
        step_ids = token[:, None].clone()
        step_pos = positions[:, -1:] + 1
        step_cache_pos = torch.tensor([prompt_len], device=device)
        seen = torch.zeros(batch, total, dtype=torch.bool, device=device)
        seen[:, :prompt_len] = attention_mask.bool()
        seen[:, prompt_len] = True
        step_mask = seen[:, None, None, :]  # (B, 1, 1, total): a ready mask, used as given

        def step() -> torch.Tensor:
            return model(
                input_ids=step_ids,
                attention_mask=step_mask,
                position_ids=step_pos,
                cache_position=step_cache_pos,
                use_cache=True,
                **{cache_arg: cache},
            ).logits[:, -1]

        graph = None
        for t in range(1, max_new_tokens):
            if cuda_graph and graph is None and t == _EAGER_STEPS + 1:
                # Captured after real eager steps warmed up the kernels: a warm-up that repeated a step
                # would advance the cache's own write position (transformers' StaticLayer counts its
                # updates), and capture itself runs nothing.
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                    step_logits = step()
            if graph is not None:
                graph.replay()
                logits = step_logits
            else:
                logits = step()
            token = torch.where(
                finished, pad_id, penalty.pick(logits) if penalty is not None else logits.argmax(-1)
            )
            finished |= torch.isin(token, stops)
            out.append(token)
            if t == max_new_tokens - 1 or (t % _CHECK_EVERY == 0 and bool(finished.all())):
                break
            step_ids.copy_(token[:, None])
            step_pos += 1
            step_cache_pos += 1
            seen[:, prompt_len + t] = True
        del graph
    return torch.stack(out, dim=1)
