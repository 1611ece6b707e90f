"""Render conversations with the model's own chat template and label exactly the assistant turns.

messages --render--> Example{input_ids, labels}: the ids are those of
`tokenizer.apply_chat_template(messages)` (checked by `check_parity`), and labels are IGNORE_INDEX
everywhere except the assistant contents and the end-of-turn token that closes each of them
(`<|im_end|>` for Qwen, never the pad token). Templates without generation markers (Qwen's) are
handled by rendering the conversation prefix by prefix: the text the template emits for turn i
is the difference between the renderings of messages[:i] (+ generation prompt) and messages[:i+1].
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from chattune.errors import ChattuneError

IGNORE_INDEX = -100


class TemplateError(ChattuneError):
    pass


@dataclass
class RenderReport:
    examples: int = 0
    truncated: int = 0
    dropped: Counter = field(default_factory=Counter)  # reason -> count
    tokens: int = 0
    trained_tokens: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "examples": self.examples,
            "truncated": self.truncated,
            "dropped": dict(self.dropped),
            "tokens": self.tokens,
            "trained_tokens": self.trained_tokens,
        }


def end_of_turn_token(tokenizer) -> str:
    """The token that closes an assistant turn: the tokenizer's eos for chat models (Qwen: <|im_end|>)."""
    eos = tokenizer.eos_token
    if not eos:
        raise TemplateError("the tokenizer has no eos token, so the end of an answer cannot be trained")
    return eos


def _chat_text(tokenizer, messages, *, add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def label_spans(tokenizer, messages: list[dict], *, eot: str, train_on: str = "all_assistant"):
    """Full rendered text and the character spans to train (assistant content + its end-of-turn)."""
    text = _chat_text(tokenizer, messages)
    assistant_idx = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if train_on == "last_assistant":
        assistant_idx = assistant_idx[-1:]
    spans = []
    for i in assistant_idx:
        prefix = _chat_text(tokenizer, messages[:i], add_generation_prompt=True)
        upto = _chat_text(tokenizer, messages[: i + 1])
        if not (text.startswith(prefix) and text.startswith(upto) and len(upto) > len(prefix)):
            raise TemplateError(
                "the chat template does not render conversations prefix by prefix, so assistant turns "
                "cannot be located; give a template that does with model.chat_template"
            )
        segment = text[len(prefix) : len(upto)]
        k = segment.rfind(eot)
        if k < 0:
            raise TemplateError(f"the chat template does not end assistant turns with {eot!r}")
        spans.append((len(prefix), len(prefix) + k + len(eot)))
    return text, spans


@dataclass
class Rendered:
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False


def render(
    tokenizer,
    messages: list[dict],
    *,
    max_len: int,
    truncation: str = "keep_end",
    train_on: str = "all_assistant",
) -> Rendered | str:
    """Render one conversation; returns a Rendered example, or a reason string when it is dropped."""
    eot = end_of_turn_token(tokenizer)
    eot_id = tokenizer.convert_tokens_to_ids(eot)
    text, spans = label_spans(tokenizer, messages, eot=eot, train_on=train_on)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    labels = [IGNORE_INDEX] * len(ids)
    s = 0
    for j, (a, b) in enumerate(offsets):
        while s < len(spans) and spans[s][1] <= a:
            s += 1
        # A token is trained when it lies wholly inside an assistant span (a token that straddles the
        # prompt/answer boundary would teach the prompt; templates put a newline there, so none do).
        if s < len(spans) and b > a and spans[s][0] <= a and b <= spans[s][1]:
            labels[j] = ids[j]
    truncated = False
    if len(ids) > max_len:
        if truncation == "drop":
            return f"longer than data.max_len ({max_len} tokens)"
        truncated = True
        cut_inside_answer = labels[max_len - 1] != IGNORE_INDEX and ids[max_len - 1] != eot_id
        ids, labels = ids[:max_len], labels[:max_len]
        if cut_inside_answer:
            # Keep the answer's stop token: a model trained on cut answers must still learn to stop.
            ids[-1] = labels[-1] = eot_id
    if all(label == IGNORE_INDEX for label in labels):
        return f"no answer token left within data.max_len ({max_len} tokens)"
    return Rendered(ids, labels, truncated)


def render_all(tokenizer, conversations, *, max_len: int, truncation: str, train_on: str):
    """Render conversations; returns (examples as dicts, RenderReport). Dropped ones are counted by reason."""
    report = RenderReport()
    examples = []
    for conv in conversations:
        out = render(tokenizer, conv.messages, max_len=max_len, truncation=truncation, train_on=train_on)
        if isinstance(out, str):
            report.dropped[out] += 1
            continue
        report.truncated += out.truncated
        report.tokens += len(out.input_ids)
        report.trained_tokens += sum(label != IGNORE_INDEX for label in out.labels)
        examples.append({"input_ids": out.input_ids, "labels": out.labels})
    report.examples = len(examples)
    return examples, report


def check_parity(tokenizer, conversations, *, sample: int = 32) -> None:
    """Pre-flight: the training path must give the same ids as `apply_chat_template`, and every
    kept example must have its end-of-turn token labeled. Refuse to train otherwise."""
    eot = end_of_turn_token(tokenizer)
    eot_id = tokenizer.convert_tokens_to_ids(eot)
    step = max(1, len(conversations) // sample)
    for conv in conversations[::step][:sample]:
        out = render(tokenizer, conv.messages, max_len=10**9)
        if isinstance(out, str):
            continue
        ref = tokenizer.apply_chat_template(conv.messages, tokenize=True, return_dict=True)["input_ids"]
        if list(ref) != out.input_ids:
            raise TemplateError(f"{conv.where}: rendered ids differ from tokenizer.apply_chat_template's")
        n_turns = sum(m["role"] == "assistant" for m in conv.messages)
        trained_eot = sum(
            1 for i, label in zip(out.input_ids, out.labels, strict=False) if label == eot_id and i == eot_id
        )
        if trained_eot < n_turns:
            raise TemplateError(f"{conv.where}: an assistant turn's end-of-turn token {eot!r} is not labeled")


def build_generation_prompt(tokenizer, messages: list[dict], system_prompt: str | None = None) -> str:
    """The prompt for generation, formatted exactly as in training (same template, same system prompt)."""
    if system_prompt and (not messages or messages[0]["role"] != "system"):
        messages = [{"role": "system", "content": system_prompt}] + list(messages)
    return _chat_text(tokenizer, messages, add_generation_prompt=True)
