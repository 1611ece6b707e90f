"""Generate with a loaded adapter or model (`loading.Loaded`): prompts, completions, streams, prediction files.

adapter/ --loading.load_for_inference--> Loaded{model, tokenizer, system prompt, stop ids}
   --build_prompt (the tokenizer's own chat template, as in training)--> generate / stream / predict_file.
chat, serve, predict and the trainer's sample predictions all format prompts through `build_prompt`.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from chattune.console import say
from chattune.errors import ChattuneError
from chattune.infer.load import Loaded

# Only the trainer's answer (the last assistant turn) is predicted; this fills a missing one so the record
# goes through exactly the training conversion (data.to_messages) and is then dropped.
NO_ANSWER = "\x00no answer\x00"


@dataclass
class Completion:
    text: str
    finish_reason: str  # "stop" (end of turn, eos or a stop string) or "length"
    prompt_tokens: int
    completion_tokens: int


def build_prompt(
    loaded: Loaded,
    messages: list[dict],
    system_prompt: str | None = None,
    template_kwargs: dict | None = None,
) -> str:
    """The generation prompt: the stored system prompt unless the conversation has one, then the template
    with the training run's template arguments (attached to the tokenizer), updated by `template_kwargs`
    (a request's `chat_template_kwargs`)."""
    from chattune.render.template import build_generation_prompt

    if not isinstance(messages, list) or not messages:
        raise ChattuneError("a conversation must be a non-empty list of {role, content} messages")
    for k, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise ChattuneError(f"message {k} must be an object with string 'role' and 'content'")
    system = system_prompt if system_prompt is not None else loaded.system_prompt
    return build_generation_prompt(loaded.tokenizer, messages, system, template_kwargs)


def default_sampling(loaded: Loaded) -> tuple[float, float]:
    """(temperature, top_p) when the caller gives none: the model's generation_config.json, like vLLM."""
    gc = getattr(loaded.model, "generation_config", None)
    if gc is not None and gc.do_sample:
        return float(gc.temperature or 1.0), float(gc.top_p or 1.0)
    return 0.0, 1.0


class _StopOnText(StoppingCriteria):
    """Ends a row once its new text contains a stop string.

    transformers' StopStringCriteria preprocesses the whole vocabulary (~2 s for Qwen's 151k tokens) on
    every construction, too slow per request; decoding the last few tokens of each row is cheap.
    """

    def __init__(self, tokenizer, stop: list[str], prompt_len: int):
        self.tokenizer, self.stop, self.prompt_len = tokenizer, stop, prompt_len
        self.tail = max(len(s) for s in stop) + 8  # tokens; every token decodes to at least one character

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        texts = self.tokenizer.batch_decode(
            input_ids[:, self.prompt_len :][:, -self.tail :], skip_special_tokens=True
        )
        return torch.tensor([any(s in t for s in self.stop) for t in texts], device=input_ids.device)


class _Cancelled(StoppingCriteria):
    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), device=input_ids.device)


class _CancelledRows(StoppingCriteria):
    """Ends the rows of each conversation whose event is set (a served request whose client left)."""

    def __init__(self, events: list[threading.Event], rows_each: int):
        self.events, self.rows_each = events, rows_each

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        flags = [e.is_set() for e in self.events for _ in range(self.rows_each)]
        return torch.tensor(flags, device=input_ids.device)


def _check(max_new_tokens: int, temperature: float, top_p: float, n: int) -> None:
    if max_new_tokens < 1:
        raise ChattuneError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if temperature < 0:
        raise ChattuneError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ChattuneError(f"top_p must be in (0, 1], got {top_p}")
    if n < 1:
        raise ChattuneError(f"n must be at least 1, got {n}")


def _generation_config(loaded: Loaded, max_new_tokens: int, temperature: float, top_p: float, n: int):
    # Unset fields (top_k, repetition_penalty, ...) are filled from the model's generation_config.json.
    sample = temperature > 0
    kw: dict[str, Any] = dict(
        max_new_tokens=max_new_tokens,
        do_sample=sample,
        eos_token_id=loaded.stop_token_ids,
        pad_token_id=loaded.tokenizer.pad_token_id,
        num_return_sequences=n if sample else 1,
    )
    if sample:
        kw.update(temperature=temperature, top_p=top_p)
    else:  # neutral values, so the model's sampling defaults do not warn about being ignored
        kw.update(temperature=1.0, top_p=1.0, top_k=50)
    return GenerationConfig(**kw)


@contextlib.contextmanager
def _seeded(seed: int | None, device: torch.device):
    if seed is None:
        yield
        return
    # Fork the RNG so a seeded request does not change what later unseeded requests sample.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def _encode(tokenizer, prompts: list[str]) -> dict[str, torch.Tensor]:
    # Left padding whatever the tokenizer's default (the trainer's pads right): generation appends on the
    # right. Every call uses the same padding/truncation settings, because a Rust tokenizer whose settings
    # change needs exclusive access and fails ("Already borrowed") if another thread is encoding.
    return tokenizer(
        prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False
    )


def count_tokens(loaded: Loaded, prompt: str) -> int:
    """Tokens in a rendered prompt (safe to call while another thread generates)."""
    return int(_encode(loaded.tokenizer, [prompt])["attention_mask"].sum())


def _prepare(loaded: Loaded, prompts: list[str]):
    if loaded.adapter_name is not None:
        loaded.model.set_adapter(loaded.adapter_name)
    device = loaded.model.device
    return {k: v.to(device) for k, v in _encode(loaded.tokenizer, prompts).items()}, device


def _cut_at_stop(text: str, stop: list[str] | None) -> tuple[str, bool]:
    hits = [i for i in (text.find(s) for s in stop or []) if i >= 0]
    return (text[: min(hits)], True) if hits else (text, False)


def _completion(loaded: Loaded, ids: list[int], prompt_tokens: int, max_new_tokens: int, stop) -> Completion:
    # A row that ended early is padded up to the batch's longest; the pad id also ends the answer.
    ends = set(loaded.stop_token_ids) | {loaded.tokenizer.pad_token_id}
    cut = next((i for i, t in enumerate(ids) if t in ends), None)
    body = ids if cut is None else ids[:cut]
    text = loaded.tokenizer.decode(body, skip_special_tokens=True)
    if cut is None:  # cut by the token bound, maybe inside a character's bytes: no U+FFFD at the end
        text = text.rstrip("\ufffd")
    text, hit = _cut_at_stop(text, stop)
    reason = "length" if cut is None and not hit and len(ids) >= max_new_tokens else "stop"
    generated = len(body) + (cut is not None and ids[cut] in loaded.stop_token_ids)  # the eos was generated
    return Completion(text, reason, prompt_tokens, int(generated))


def generate_completions(
    loaded: Loaded,
    conversations: list[list[dict]],
    *,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop: list[str] | None = None,
    n: int = 1,
    seed: int | None = None,
    cancelled: list[threading.Event] | None = None,
    cuda_graph: bool = False,
) -> list[Completion]:
    """One batched `generate` call; `n` completions per conversation, conversation-major.

    `cancelled`: one event per conversation; once set, that conversation's rows stop at the next token.
    `cuda_graph`: greedy answers on a GPU are decoded by `decoding.greedy_decode` (a static cache, one
    CUDA graph replay per token) when the model supports it; `generate` otherwise, or if capture fails."""
    _check(max_new_tokens, temperature, top_p, n)
    enc, device = _prepare(loaded, [build_prompt(loaded, c) for c in conversations])
    prompt_len = enc["input_ids"].shape[1]
    prompt_tokens = enc["attention_mask"].sum(dim=1).tolist()
    if (
        cuda_graph
        and device.type == "cuda"
        and temperature == 0
        and n == 1
        and not stop
        and cancelled is None
    ):
        new = _decode_with_graph(loaded, enc, max_new_tokens)
        if new is not None:
            return [
                _completion(loaded, ids, prompt_tokens[i], max_new_tokens, None) for i, ids in enumerate(new)
            ]
    criteria = StoppingCriteriaList([_StopOnText(loaded.tokenizer, stop, prompt_len)] if stop else [])
    if cancelled is not None:
        criteria.append(_CancelledRows(cancelled, n if temperature > 0 else 1))
    config = _generation_config(loaded, max_new_tokens, temperature, top_p, n)
    with _seeded(seed, device), torch.inference_mode():
        out = loaded.model.generate(**enc, generation_config=config, stopping_criteria=criteria)
    new = out[:, prompt_len:].tolist()
    if temperature == 0 and n > 1:  # greedy answers are identical: generate once, repeat
        new = [row for row in new for _ in range(n)]
    return [
        _completion(loaded, ids, prompt_tokens[i // n], max_new_tokens, stop) for i, ids in enumerate(new)
    ]


def _decode_with_graph(loaded: Loaded, enc: dict, max_new_tokens: int) -> list[list[int]] | None:
    """`decoding.greedy_decode`'s new ids, or None (then `generate` decodes): a model it does not support,
    or a forward that cannot be captured, which is said once and not tried again for this model."""
    from chattune.infer.graph_decode import can_decode_static, generation_config_of, greedy_decode

    model = loaded.model
    if getattr(model, "_chattune_no_graph", False) or not can_decode_static(model):
        return None
    tokenizer = loaded.tokenizer
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else loaded.stop_token_ids[0]
    try:
        ids = greedy_decode(
            model,
            enc["input_ids"],
            enc["attention_mask"],
            max_new_tokens=max_new_tokens,
            stop_ids=loaded.stop_token_ids,
            pad_id=pad,
            repetition_penalty=float(getattr(generation_config_of(model), "repetition_penalty", None) or 1.0),
        )
    except RuntimeError as e:
        model._chattune_no_graph = True
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        say(f"note: sample answers are decoded without CUDA graphs ({first[:200]})")
        return None
    return ids.tolist()


def generate(
    loaded: Loaded,
    conversations: list[list[dict]],
    *,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop: list[str] | None = None,
    n: int = 1,
    seed: int | None = None,
    cuda_graph: bool = False,
) -> list[str]:
    """Answer each conversation (greedy when temperature == 0); `n` answers each, conversation-major.
    `cuda_graph`: see `generate_completions`."""
    kw = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, stop=stop, n=n, seed=seed)
    return [c.text for c in generate_completions(loaded, conversations, cuda_graph=cuda_graph, **kw)]


def _held_back(text: str, stop: list[str]) -> int:
    """Length of the longest end of `text` that could still grow into a stop string."""
    return max((k for s in stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)


def stream_events(
    loaded: Loaded,
    messages: list[dict],
    *,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop: list[str] | None = None,
    seed: int | None = None,
) -> Iterator[str | Completion]:
    """Text pieces as they are generated, then one final Completion (full text, finish reason, counts).

    Closing the iterator early (client gone, Ctrl-C) stops the generation thread at the next token.
    """
    _check(max_new_tokens, temperature, top_p, 1)
    enc, device = _prepare(loaded, [build_prompt(loaded, messages)])
    streamer = TextIteratorStreamer(loaded.tokenizer, skip_prompt=True, skip_special_tokens=True)
    cancel = threading.Event()
    config = _generation_config(loaded, max_new_tokens, temperature, top_p, 1)
    result: dict[str, Any] = {}

    def work() -> None:
        try:
            with _seeded(seed, device), torch.inference_mode():
                result["ids"] = loaded.model.generate(
                    **enc,
                    generation_config=config,
                    streamer=streamer,
                    stopping_criteria=StoppingCriteriaList([_Cancelled(cancel)]),
                )
        except BaseException as e:  # re-raised in the consumer's thread below
            result["error"] = e
            streamer.end()  # wake the consumer, which would otherwise wait forever

    thread = threading.Thread(target=work, name="chattune-generate", daemon=True)
    thread.start()
    text, pending, hit = "", "", False
    try:
        for piece in streamer:
            pending += piece
            cut, hit = _cut_at_stop(pending, stop)
            keep = 0 if hit or not stop else _held_back(cut, stop)
            out, pending = cut[: len(cut) - keep], cut[len(cut) - keep :]
            if out:
                text += out
                yield out
            if hit:
                break
        if pending and "error" not in result:
            text += pending
            yield pending
    finally:
        cancel.set()
        thread.join()
    if "error" in result:
        raise result["error"]
    prompt_len = enc["input_ids"].shape[1]
    done = _completion(loaded, result["ids"][0, prompt_len:].tolist(), prompt_len, max_new_tokens, stop)
    yield Completion(text, "stop" if hit else done.finish_reason, prompt_len, done.completion_tokens)


def stream(
    loaded: Loaded,
    messages: list[dict],
    *,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop: list[str] | None = None,
    seed: int | None = None,
) -> Iterator[str]:
    """Text pieces of one answer as they are generated."""
    kw = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, stop=stop, seed=seed)
    events = stream_events(loaded, messages, **kw)
    try:
        for event in events:
            if isinstance(event, str):
                yield event
    finally:
        events.close()
