"""Render conversations with the model's own chat template and label exactly the assistant turns.

messages --layout--> text + trained character spans --tokenize (batched)--> Example{input_ids, labels}
The ids are those of `tokenizer.apply_chat_template(messages)` (checked by `check_parity`); labels are
IGNORE_INDEX everywhere except each trained answer and the end-of-turn token that closes it (`<|im_end|>`
for Qwen, `<|end_of_sentence|>` for ERNIE-4.5: read from the template, never assumed to be eos or pad).

Templates without generation markers (Qwen's) are handled by rendering prefix by prefix: the text the
template emits for turn i is the difference between the renderings of messages[:i] (+ generation
prompt) and messages[:i+1]. That costs 2 renders a turn, so it is done once per *shape* (the sequence of
roles) on a skeleton whose contents are marker strings; a real conversation is then laid out by putting
its contents between the skeleton's pieces, and that text is checked against `apply_chat_template`'s for
every conversation (one render). A conversation that differs is rendered prefix by prefix instead.
"""

from __future__ import annotations

import bisect
from collections import Counter
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from chattune.errors import ChattuneError, DataError

IGNORE_INDEX = -100
_DROP_REASON = "longer than data.max_len"
_NO_ANSWER_REASON = "no answer token left within data.max_len"
NAMED_TEMPLATES = ("chatml", "ernie-4.5")


class TemplateError(ChattuneError):
    pass


def chat_template_path(value: str | None) -> str | None:
    """`model.chat_template` -> a file: a template shipped with chattune by name, or the path as given."""
    if value in NAMED_TEMPLATES:
        return str(resources.files("chattune") / "assets" / "templates" / f"{value}.jinja")
    return value


def _chat_text(tokenizer, messages, *, add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


# -- what the template does, probed once per tokenizer and template --------------------------------------
_MARK = "\ue000{}\ue001"  # private-use characters: no template or text treats them specially


@dataclass
class _Shape:
    """A template's text around the contents of one sequence of roles."""

    pieces: list[str]  # len(roles) + 1 literal strings; contents go between them
    lead: dict[int, int]  # assistant index -> template characters before its content that are trained
    tail: dict[int, int]  # assistant index -> characters after its content up to the end-of-turn token's end


@dataclass
class TemplateFacts:
    eot: str
    eot_id: int
    shapes: dict[tuple, _Shape | None] = field(default_factory=dict)


def template_facts(tokenizer) -> TemplateFacts:
    """The end-of-turn token the template closes answers with (and a cache of probed shapes)."""
    cached = getattr(tokenizer, "_chattune_facts", None)
    if cached is not None and cached[0] == str(tokenizer.chat_template):
        return cached[1]
    answer = _MARK.format("a")
    probe = [{"role": "user", "content": _MARK.format("q")}, {"role": "assistant", "content": answer}]
    text = _chat_text(tokenizer, probe)
    k = text.find(answer)
    if k < 0:
        raise TemplateError("the chat template drops or rewrites assistant answers; give another one")
    after = text[k + len(answer) :].lstrip(" \t\r\n")
    specials = set(tokenizer.get_added_vocab()) | set(tokenizer.all_special_tokens)
    eot = next((t for t in sorted(specials, key=len, reverse=True) if after.startswith(t)), None)
    if eot is None:
        raise TemplateError(
            f"the chat template ends an assistant answer with {after[:30]!r}, which does not start with a "
            "special token of this tokenizer, so the model could not learn to stop; add the end-of-turn "
            "token as a special token or give a template that ends answers with one (model.chat_template)"
        )
    facts = TemplateFacts(eot, tokenizer.convert_tokens_to_ids(eot))
    tokenizer._chattune_facts = (str(tokenizer.chat_template), facts)
    return facts


def end_of_turn_token(tokenizer) -> str:
    """The token that closes an assistant turn in the template (Qwen: <|im_end|>; ERNIE: <|end_of_sentence|>)."""
    return template_facts(tokenizer).eot


def _turn_span(tokenizer, messages: list[dict], i: int, text: str, eot: str) -> tuple[int, int, int]:
    """(prompt end, answer end incl. end-of-turn, turn end) of assistant turn i, from prefix renderings."""
    prefix = _chat_text(tokenizer, messages[:i], add_generation_prompt=True)
    upto = _chat_text(tokenizer, messages[: i + 1])
    if not (text.startswith(prefix) and text.startswith(upto) and len(upto) > len(prefix)):
        raise TemplateError(
            "the chat template does not render conversations prefix by prefix, so assistant turns "
            "cannot be located; give a template that does with model.chat_template"
        )
    k = text.rfind(eot, len(prefix), len(upto))
    if k < 0:
        raise TemplateError(f"the chat template does not end assistant turns with {eot!r}")
    return len(prefix), k + len(eot), len(upto)


def label_spans(tokenizer, messages: list[dict], *, eot: str) -> tuple[str, list[tuple[int, int]]]:
    """Full text and the character span of every assistant turn (answer + end-of-turn), prefix by prefix."""
    text = _chat_text(tokenizer, messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            start, end, _ = _turn_span(tokenizer, messages, i, text, eot)
            spans.append((start, end))
    return text, spans


def _probe_shape(tokenizer, roles: tuple, eot: str) -> _Shape | None:
    """Lay out a skeleton of `roles` with marker contents; None when markers do not survive in order."""
    skeleton = [{"role": r, "content": _MARK.format(k)} for k, r in enumerate(roles)]
    try:
        text = _chat_text(tokenizer, skeleton)
        pieces, pos, where = [], 0, []
        for m in skeleton:
            k = text.find(m["content"], pos)
            if k < 0 or text.count(m["content"]) != 1:
                return None
            pieces.append(text[pos:k])
            where.append(k)
            pos = k + len(m["content"])
        pieces.append(text[pos:])
        lead, tail = {}, {}
        for i, r in enumerate(roles):
            if r == "assistant":
                start, end, _ = _turn_span(tokenizer, skeleton, i, text, eot)
                content_end = where[i] + len(skeleton[i]["content"])
                if not start <= where[i] or end < content_end:
                    return None
                lead[i], tail[i] = where[i] - start, end - content_end
        return _Shape(pieces, lead, tail)
    except TemplateError:
        return None  # the prefix-by-prefix path reports it with the conversation's own text


def layout(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """Text of `messages` as the template renders it, and every assistant turn's trained span."""
    facts = template_facts(tokenizer)
    roles = tuple(m["role"] for m in messages)
    if roles not in facts.shapes:
        facts.shapes[roles] = _probe_shape(tokenizer, roles, facts.eot)
    shape = facts.shapes[roles]
    text = _chat_text(tokenizer, messages)
    if shape is not None:
        parts, spans, pos = [], [], 0
        for i, m in enumerate(messages):
            parts += [shape.pieces[i], m["content"]]
            start = pos + len(shape.pieces[i])
            pos = start + len(m["content"])
            if i in shape.lead:
                spans.append((start - shape.lead[i], pos + shape.tail[i]))
        parts.append(shape.pieces[-1])
        if "".join(parts) == text:  # the check that makes the shortcut exact, for every conversation
            return text, spans
    return label_spans(tokenizer, messages, eot=facts.eot)


# -- text -> ids and labels ---------------------------------------------------------------------------------
@dataclass
class Rendered:
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


def _label(ids: list[int], offsets: list, spans: list[tuple[int, int]]) -> list[int]:
    """Labels: a token is trained when it overlaps a trained span (a token that straddles the
    template/answer boundary carries the answer's first characters, as in transformers' assistant masks)."""
    labels = [IGNORE_INDEX] * len(ids)
    starts = [a for a, _ in offsets]
    ends = [b for _, b in offsets]
    for s, e in spans:
        j0, j1 = bisect.bisect_right(ends, s), bisect.bisect_left(starts, e)
        labels[j0:j1] = ids[j0:j1]
    return labels


def encode(tokenizer, conversations: list[list[dict]], *, train_on: str = "all_assistant") -> list[Rendered]:
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
            out.append(Rendered(ids, _label(ids, offsets, sp)))
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


def _cut_prompt(tokenizer, messages: list[dict], max_len: int, train_on: str) -> Rendered | str:
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

    def rendered(k: int) -> Rendered:
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


def _fit(out: Rendered, max_len: int, truncation: str, eot_id: int) -> Rendered | str:
    """Apply the truncation policy to one untruncated example (`cut_prompt` is handled by the caller)."""
    ids, labels = out.input_ids, out.labels
    if len(ids) > max_len:
        if truncation == "drop":
            return f"{_DROP_REASON} ({max_len} tokens)"
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
        out = Rendered(ids, labels, truncated=True)
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
) -> list[Rendered | str]:
    """Each conversation as a training example within `max_len`, or the reason it was dropped."""
    eot_id = template_facts(tokenizer).eot_id
    results: list[Rendered | str] = []
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
) -> Rendered | str:
    """Render one conversation; returns a Rendered example, or a reason string when it is dropped."""
    return render_many(tokenizer, [messages], max_len=max_len, truncation=truncation, train_on=train_on)[0]


# -- whole datasets: cached, in parallel when large -----------------------------------------------------
PARALLEL_MIN = 2_000  # conversations; below this, starting worker processes costs more than it saves
_worker_state: dict = {}


def _render_chunk(job: tuple[int, list[list[dict]]]) -> tuple[list[dict], RenderReport]:
    offset, chunk = job
    tokenizer, opts = _worker_state["tokenizer"], _worker_state["opts"]
    report, examples = RenderReport(), []
    for k, out in enumerate(render_many(tokenizer, chunk, **opts)):
        if isinstance(out, str):
            report.dropped[out] += 1
            # Dropping over-long examples is what `truncation: drop` asks for; anything else is a bad row.
            if not out.startswith(_DROP_REASON) and report.first_bad is None:
                report.first_bad = (offset + k, out)
            continue
        report.truncated += out.truncated
        report.tokens += len(out.input_ids)
        report.trained_tokens += sum(label != IGNORE_INDEX for label in out.labels)
        examples.append({"input_ids": out.input_ids, "labels": out.labels})
    report.examples = len(examples)
    return examples, report


def _tokenizer_fingerprint(tokenizer) -> str:
    import hashlib

    fp = getattr(tokenizer, "_chattune_fingerprint", None)
    if fp is None:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        state = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
        fp = hashlib.sha256(state.encode("utf-8")).hexdigest()
        tokenizer._chattune_fingerprint = fp
    return fp


def render_all(
    tokenizer,
    conversations,
    *,
    max_len: int,
    truncation: str = "keep_end",
    train_on: str = "all_assistant",
    on_bad_row: str = "skip",
    cache: bool = True,
    workers: int | None = None,
    progress: bool | None = None,
) -> tuple[list[dict], RenderReport]:
    """Render conversations; returns (examples as dicts, RenderReport). Dropped ones are counted by reason.

    A conversation with no answer token left within `max_len` is a bad row: with `on_bad_row: error`
    it stops the run naming its file and line. With `cache`, the result is stored under
    $CHATTUNE_CACHE/tokenized keyed by everything it depends on (tokenizer, template, options, data, this
    code), so a second run loads it at once. Large sets are split over `workers` processes (default: one
    per core, up to 8) with a progress bar."""
    import os

    from chattune.data.cache import cache_key, load_examples, store_examples

    opts = dict(max_len=max_len, truncation=truncation, train_on=train_on)
    msgs = [c.messages for c in conversations]
    key, hit = None, None
    if cache:
        parts = [_tokenizer_fingerprint(tokenizer), str(tokenizer.chat_template), opts, _code_version()]
        key = cache_key(parts, msgs)
        hit = load_examples(key)
    if hit is not None:
        examples, saved = hit
        report = RenderReport(**{**saved, "dropped": Counter(saved["dropped"])})
        report.first_bad = tuple(saved["first_bad"]) if saved.get("first_bad") else None
    else:
        if workers is None:
            workers = min(os.cpu_count() or 1, 8) if len(msgs) >= PARALLEL_MIN else 1
        size = max(256, min(4096, len(msgs) // (4 * workers) + 1))
        jobs = [(i, msgs[i : i + size]) for i in range(0, len(msgs), size)]
        show = progress if progress is not None else len(msgs) >= PARALLEL_MIN
        from tqdm import tqdm

        examples, report = [], RenderReport()
        bar = tqdm(total=len(msgs), desc="tokenising", unit="conv", disable=not show, leave=False)
        _worker_state.update(tokenizer=tokenizer, opts=opts)
        try:
            if workers > 1 and len(jobs) > 1:
                import multiprocessing as mp

                # fork: workers inherit the tokenizer (and its probed template shapes), nothing is pickled.
                with mp.get_context("fork").Pool(workers) as pool:
                    results = zip(jobs, pool.imap(_render_chunk, jobs), strict=True)
                    for (_, chunk), (ex, rep) in results:
                        examples += ex
                        report.add(rep)
                        bar.update(len(chunk))
            else:
                for job in jobs:
                    ex, rep = _render_chunk(job)
                    examples += ex
                    report.add(rep)
                    bar.update(len(job[1]))
        finally:
            bar.close()
            _worker_state.clear()
        if key is not None:
            store_examples(key, examples, {**report.as_dict(), "first_bad": report.first_bad})
    if on_bad_row == "error" and report.first_bad is not None:
        index, reason = report.first_bad
        path, _, line = conversations[index].where.rpartition(":")
        raise DataError(
            path,
            int(line) if line.isdigit() else None,
            f"{reason}; raise data.max_len, choose another data.truncation, or set data.on_bad_row: skip "
            "to drop such rows and count them",
        )
    return examples, report


def _code_version() -> str:
    """This file's hash: a cache made by different rendering code is never reused."""
    import hashlib
    from pathlib import Path

    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]


def check_parity(tokenizer, conversations, *, sample: int = 32, train_on: str = "all_assistant") -> None:
    """Pre-flight: for a sample spread over the data, the training path must give the ids of
    `tokenizer.apply_chat_template`, labels equal to those found prefix by prefix, and every trained
    assistant turn its end-of-turn token labeled. Refuse to train otherwise."""
    facts = template_facts(tokenizer)
    step = max(1, len(conversations) // max(sample, 1))
    picked = conversations[::step][:sample]
    for conv, out in zip(
        picked, encode(tokenizer, [c.messages for c in picked], train_on=train_on), strict=True
    ):
        ref = tokenizer.apply_chat_template(conv.messages, tokenize=True, return_dict=True)["input_ids"]
        if list(ref) != out.input_ids:
            k = next(
                (i for i, (a, b) in enumerate(zip(ref, out.input_ids, strict=False)) if a != b),
                min(len(ref), len(out.input_ids)),
            )
            raise TemplateError(
                f"{conv.where}: rendered ids differ from tokenizer.apply_chat_template's from token {k} "
                f"({tokenizer.decode(out.input_ids[k : k + 8])!r} vs {tokenizer.decode(list(ref)[k : k + 8])!r})"
            )
        text, spans = label_spans(tokenizer, conv.messages, eot=facts.eot)  # the independent, slow way
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        want = _label(
            enc["input_ids"], enc["offset_mapping"], spans[-1:] if train_on == "last_assistant" else spans
        )
        if want != out.labels:
            raise TemplateError(f"{conv.where}: assistant labels differ from those found prefix by prefix")
        n_turns = 1 if train_on == "last_assistant" else sum(m["role"] == "assistant" for m in conv.messages)
        if sum(1 for label in out.labels if label == facts.eot_id) < n_turns:
            raise TemplateError(
                f"{conv.where}: an assistant turn's end-of-turn token {facts.eot!r} is not labeled"
            )


def build_generation_prompt(tokenizer, messages: list[dict], system_prompt: str | None = None) -> str:
    """The prompt for generation, formatted exactly as in training (same template, same system prompt)."""
    if system_prompt and (not messages or messages[0]["role"] != "system"):
        messages = [{"role": "system", "content": system_prompt}] + list(messages)
    return _chat_text(tokenizer, messages, add_generation_prompt=True)


def template_default_system(tokenizer) -> str | None:
    """The system prompt the chat template inserts by itself when a conversation has none, or None.

    SmolLM2's template, for one, starts every conversation without a system turn with "You are a
    helpful AI assistant named SmolLM, trained by Hugging Face". Found by rendering one user turn with
    and without an explicit system turn and reading what the template put in the system slot.
    """
    user = [{"role": "user", "content": _MARK.format("u")}]
    try:
        plain = _chat_text(tokenizer, user)
        with_sys = _chat_text(tokenizer, [{"role": "system", "content": _MARK.format("s")}, *user])
    except Exception:  # a template that refuses system turns inserts none either
        return None
    if plain == with_sys.replace(_MARK.format("s"), "", 1) or _MARK.format("s") not in with_sys:
        return None
    before, after = with_sys.split(_MARK.format("s"), 1)
    head = plain.split(_MARK.format("u"), 1)[0]
    sys_after = after.split(_MARK.format("u"), 1)[0]
    if head.startswith(before) and head.endswith(sys_after) and len(head) > len(before) + len(sys_after):
        return head[len(before) : len(head) - len(sys_after)] or None
    return None
