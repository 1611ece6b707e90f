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

from dataclasses import dataclass, field
from importlib import resources

from chattune.errors import ChattuneError

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
