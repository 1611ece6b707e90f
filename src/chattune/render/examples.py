"""Conversation -> Example(input_ids, labels): labels are IGNORE_INDEX outside the assistant turns, the
end-of-turn token labelled; truncation to `data.max_len` (keep_end, cut_prompt or drop), with a report of
what was truncated or dropped and why.
"""

from __future__ import annotations

import bisect
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from chattune.render.template import TemplateError, layout, template_facts

IGNORE_INDEX = -100


DROP_REASON = "longer than data.max_len"


_NO_ANSWER_REASON = "no answer token left within data.max_len"


# -- text -> ids and labels ---------------------------------------------------------------------------------
@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False


@dataclass
class RenderReport:
    examples: int = 0
    truncated: int = 0
    dropped: Counter = field(default_factory=Counter)  # reason -> count
    tokens: int = 0
    trained_tokens: int = 0
    first_bad: tuple[int, str] | None = None  # (conversation index, reason) of the first unusable one

    def add(self, other: RenderReport) -> None:
        self.first_bad = self.first_bad or other.first_bad
        self.examples += other.examples
        self.truncated += other.truncated
        self.dropped.update(other.dropped)
        self.tokens += other.tokens
        self.trained_tokens += other.trained_tokens

    def as_dict(self) -> dict[str, Any]:
        return {
            "examples": self.examples,
            "truncated": self.truncated,
            "dropped": dict(self.dropped),
            "tokens": self.tokens,
            "trained_tokens": self.trained_tokens,
        }


def label_ids(ids: list[int], offsets: list, spans: list[tuple[int, int]]) -> list[int]:
    """Labels: a token is trained when it overlaps a trained span (a token that straddles the
    template/answer boundary carries the answer's first characters, as in transformers' assistant masks)."""
    labels = [IGNORE_INDEX] * len(ids)
    starts = [a for a, _ in offsets]
    ends = [b for _, b in offsets]
    for s, e in spans:
        j0, j1 = bisect.bisect_right(ends, s), bisect.bisect_left(starts, e)
        labels[j0:j1] = ids[j0:j1]
    return labels


def encode(tokenizer, conversations: list[list[dict]], *, train_on: str = "all_assistant") -> list[Example]:
    """Untruncated ids and labels of each conversation (batched through the fast tokenizer)."""
    if not getattr(tokenizer, "is_fast", False):
        raise TemplateError("labels need token offsets, which only a fast (tokenizers) tokenizer gives")
    texts, spans = [], []
    for msgs in conversations:
        text, turn_spans = layout(tokenizer, msgs)
        texts.append(text)
        spans.append(turn_spans[-1:] if train_on == "last_assistant" else turn_spans)
    out = []
    for b in range(0, len(texts), 512):
        enc = tokenizer(texts[b : b + 512], add_special_tokens=False, return_offsets_mapping=True)
        for ids, offsets, sp in zip(enc["input_ids"], enc["offset_mapping"], spans[b : b + 512], strict=True):
            out.append(Example(ids, label_ids(ids, offsets, sp)))
    return out


def _drops_estimate(tokenizer, messages: list[dict], first: int, max_len: int) -> int:
    """Exchanges to drop after the system prompt so that the rest fits, estimated from one rendering.

    Dropping exchanges first..first+k removes about the tokens between the content starts of messages
    `first` and `first + 2k` (their contents and the template text between them). The estimate is then
    checked against real renderings, so it only decides where the search starts.
    """
    text, _ = layout(tokenizer, messages)
    starts, pos = [], 0
    for m in messages:
        k = text.find(m["content"], pos)
        if k < 0:  # the template rewrites a content: no estimate, start the search at the oldest
            return 1
        starts.append(k)
        pos = k + len(m["content"])
    ends = [
        b for _, b in tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    ]
    at = [bisect.bisect_right(ends, s) for s in starts]  # token index where each content starts
    n_exchanges = (len(messages) - first) // 2
    for k in range(1, n_exchanges):
        if len(ends) - (at[first + 2 * k] - at[first]) <= max_len:
            return k
    return n_exchanges - 1


def _cut_prompt(tokenizer, messages: list[dict], max_len: int, train_on: str) -> Example | str:
    """Drop the oldest exchanges, then cut the last question from the left; the system prompt stays.

    The result is the rendering of the fewest-exchanges-dropped conversation that fits (ids exactly
    `apply_chat_template`'s). The number to drop is estimated from one rendering of the whole
    conversation and then settled by rendering its neighbours, so a conversation of N turns costs a few
    renderings of what fits in `max_len`, not N renderings of the whole (which was cubic in N).
    An answer too long on its own keeps a quarter of `max_len` of its question and is then cut as
    `keep_end` cuts it: the end-of-turn token stays labeled.
    """
    first = 1 if messages[0]["role"] == "system" else 0
    n_exchanges = (len(messages) - first) // 2

    def without(k: int) -> list[dict]:  # the conversation with its k oldest exchanges dropped
        return [dict(m) for m in messages[:first] + messages[first + 2 * k :]]

    def rendered(k: int) -> Example:
        return encode(tokenizer, [without(k)], train_on=train_on)[0]

    # Dropping nothing does not fit (the caller checked): find the fewest drops that fit.
    k = max(1, _drops_estimate(tokenizer, messages, first, max_len)) if n_exchanges > 1 else 0
    out = rendered(k)
    if len(out.input_ids) <= max_len:
        while k > 1:  # the estimate may drop one exchange too many
            prev = rendered(k - 1)
            if len(prev.input_ids) > max_len:
                break
            k, out = k - 1, prev
        out.truncated = True
        return out
    while k < n_exchanges - 1:
        k += 1
        out = rendered(k)
        if len(out.input_ids) <= max_len:
            out.truncated = True
            return out
    msgs = without(n_exchanges - 1)  # one exchange left and still too long: cut its question
    for _ in range(10):  # every pass removes at least one token
        out = encode(tokenizer, [msgs], train_on=train_on)[0]
        excess = len(out.input_ids) - max_len
        if excess <= 0:
            out.truncated = True
            return out
        question = msgs[first]["content"]
        offsets = tokenizer(question, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        if excess >= len(offsets):
            # The answer does not fit on its own: keep the question's last quarter of the budget, then
            # cut the answer as keep_end does (its end-of-turn token stays labeled).
            keep = max(1, min(len(offsets), max_len // 4))
            if len(offsets) > keep:
                msgs[first]["content"] = question[offsets[len(offsets) - keep - 1][1] :]
            out = encode(tokenizer, [msgs], train_on=train_on)[0]
            return _fit(out, max_len, "keep_end", template_facts(tokenizer).eot_id)
        msgs[first]["content"] = question[offsets[excess - 1][1] :]
    return f"answer longer than data.max_len ({max_len} tokens) on its own"


def _fit(out: Example, max_len: int, truncation: str, eot_id: int) -> Example | str:
    """Apply the truncation policy to one untruncated example (`cut_prompt` is handled by the caller)."""
    ids, labels = out.input_ids, out.labels
    if len(ids) > max_len:
        if truncation == "drop":
            return f"{DROP_REASON} ({max_len} tokens)"
        cut_inside_answer = labels[max_len - 1] != IGNORE_INDEX and ids[max_len - 1] != eot_id
        ids, labels = ids[:max_len], labels[:max_len]
        if cut_inside_answer:
            if max_len >= 2 and labels[-2] != IGNORE_INDEX:
                # Keep the answer's stop token: a model trained on cut answers must still learn to stop.
                ids[-1] = labels[-1] = eot_id
            else:
                # Not one answer token would stay before the stop token: "prompt -> end of turn" teaches
                # the model to answer nothing, the same empty answer the reader refuses in the data.
                labels[-1] = IGNORE_INDEX
        out = Example(ids, labels, truncated=True)
    if not _has_answer_token(labels, eot_id):
        return f"{_NO_ANSWER_REASON} ({max_len} tokens)"
    return out


def _has_answer_token(labels: list[int], eot_id: int) -> bool:
    """The minimum worth training: at least one labeled answer token besides the end-of-turn token."""
    return any(label != IGNORE_INDEX and label != eot_id for label in labels)


def render_many(
    tokenizer,
    conversations: list[list[dict]],
    *,
    max_len: int,
    truncation: str = "keep_end",
    train_on: str = "all_assistant",
) -> list[Example | str]:
    """Each conversation as a training example within `max_len`, or the reason it was dropped."""
    eot_id = template_facts(tokenizer).eot_id
    results: list[Example | str] = []
    for msgs, out in zip(conversations, encode(tokenizer, conversations, train_on=train_on), strict=True):
        if len(out.input_ids) > max_len and truncation == "cut_prompt":
            res = _cut_prompt(tokenizer, msgs, max_len, train_on)
        else:
            res = _fit(out, max_len, truncation, eot_id)
        # Every mode keeps only examples with an answer token besides the end of turn (`keep_end` cuts are
        # checked in `_fit`; this also holds `cut_prompt`'s re-renderings to it).
        if not isinstance(res, str) and not _has_answer_token(res.labels, eot_id):
            res = f"{_NO_ANSWER_REASON} ({max_len} tokens)"
        # Every kept example teaches the model to stop: its end-of-turn token is labeled.
        if not isinstance(res, str) and eot_id not in res.labels:
            raise TemplateError(f"no labeled end-of-turn token in {tokenizer.decode(res.input_ids)[:200]!r}")
        results.append(res)
    return results


def render(
    tokenizer,
    messages: list[dict],
    *,
    max_len: int,
    truncation: str = "keep_end",
    train_on: str = "all_assistant",
) -> Example | str:
    """Render one conversation; returns a Example example, or a reason string when it is dropped."""
    return render_many(tokenizer, [messages], max_len=max_len, truncation=truncation, train_on=train_on)[0]
