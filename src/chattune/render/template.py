"""Render conversations with the model's own chat template and label exactly the assistant turns.

messages --layout--> text + trained character spans --tokenize (batched)--> Example{input_ids, labels}
The ids are those of `tokenizer.apply_chat_template(messages, **template_kwargs)` (checked by
`check_parity`); labels are IGNORE_INDEX everywhere except what the model generates for each trained
assistant turn, through the end-of-turn token that closes it (`<|im_end|>` for Qwen, `<|end_of_sentence|>`
for ERNIE-4.5: read from the template, never assumed to be eos or pad).

Every conversation is labelled from the template's rendering of the *whole* conversation, because some
templates render a turn differently depending on what follows it (Qwen3 keeps `<think>` reasoning only
after the last user message; others drop or move the system turn). The conversation is rendered once with
marker strings in place of its contents (`content`, `reasoning_content`): the text between markers is
pure template text, so each assistant turn's start is found there without confusing it with an answer
that happens to contain template words. A turn's labels start where that turn's generation prompt ends
(what `apply_chat_template(messages[:i], add_generation_prompt=True)` hands the model at inference) and
end after the first end-of-turn token after its content. The marker rendering is probed once per *shape*
(roles, and which turns carry reasoning) and its result is checked, for every conversation, by putting
the real contents between the pieces and comparing with the real rendering (one render): a conversation
that differs gets its own marker rendering, then prefix-by-prefix rendering as the last resort.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from importlib import resources

from chattune.errors import ChattuneError

NAMED_TEMPLATES = ("chatml", "ernie-4.5", "qwen3")


class TemplateError(ChattuneError):
    pass


def chat_template_path(value: str | None) -> str | None:
    """`model.chat_template` -> a file: a template shipped with chattune by name, or the path as given."""
    if value in NAMED_TEMPLATES:
        return str(resources.files("chattune") / "assets" / "templates" / f"{value}.jinja")
    return value


def set_template_kwargs(tokenizer, kwargs: dict | None) -> None:
    """Attach `data.template_kwargs` (e.g. {"enable_thinking": False}) to the tokenizer, so that every
    rendering chattune does with it (labels, pre-flight, sample answers, prompts) passes them to the template."""
    tokenizer._chattune_template_kwargs = dict(kwargs or {})


def template_kwargs(tokenizer) -> dict:
    """The template arguments attached by `set_template_kwargs` ({} when none)."""
    return dict(getattr(tokenizer, "_chattune_template_kwargs", None) or {})


def _chat_text(tokenizer, messages, *, add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt, **template_kwargs(tokenizer)
    )


# -- what the template does, probed once per tokenizer and template --------------------------------------
_MARK = "\ue000{}\ue001"  # private-use characters: no template or text treats them specially
_SLOT = re.compile("\ue000(\\d+)([cr])\ue001")  # a marker standing for message i's content / reasoning
_FIELDS = {"c": "content", "r": "reasoning_content"}


@dataclass
class _Shape:
    """A template's text around the contents of one conversation shape.

    text = pieces[0] + slot 0 + pieces[1] + ... + slot n-1 + pieces[n]; a slot is (message index, field)
    in rendered order. `spans`: per assistant turn, (piece, offset) where its labels start and (piece,
    offset) where they end. `dropped_reasoning`: assistant turns whose reasoning the template did not render.
    """

    pieces: list[str]
    slots: list[tuple[int, str]]
    spans: list[tuple[int, int, int, int]]
    dropped_reasoning: tuple[int, ...] = ()


@dataclass
class TemplateFacts:
    eot: str
    eot_id: int
    shapes: dict[tuple, _Shape | None] = field(default_factory=dict)


def _facts_key(tokenizer) -> str:
    return str(tokenizer.chat_template) + json.dumps(template_kwargs(tokenizer), sort_keys=True, default=str)


def template_facts(tokenizer) -> TemplateFacts:
    """The end-of-turn token the template closes answers with (and a cache of probed shapes)."""
    cached = getattr(tokenizer, "_chattune_facts", None)
    if cached is not None and cached[0] == _facts_key(tokenizer):
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
    tokenizer._chattune_facts = (_facts_key(tokenizer), facts)
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
    """Full text and the character span of every assistant turn (answer + end-of-turn), prefix by prefix.

    Only for templates that render every prefix as the start of the whole (Qwen2.5, SmolLM2, ERNIE):
    raises TemplateError for those that render history differently (Qwen3)."""
    text = _chat_text(tokenizer, messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            start, end, _ = _turn_span(tokenizer, messages, i, text, eot)
            spans.append((start, end))
    return text, spans


def _marked(messages: list[dict]) -> list[dict]:
    """The conversation with markers in place of every content and reasoning_content."""
    out = []
    for i, m in enumerate(messages):
        m = dict(m)
        for code, key in _FIELDS.items():
            if isinstance(m.get(key), str):
                m[key] = _MARK.format(f"{i}{code}")
        out.append(m)
    return out


def _generation_suffix(tokenizer, prefix: list[dict]) -> str:
    """What the generation prompt adds after `prefix` (Qwen: '<|im_start|>assistant\\n', plus an empty
    think block for Qwen3 with enable_thinking=False): the text the model is handed before it answers."""
    try:
        with_prompt = _chat_text(tokenizer, prefix, add_generation_prompt=True)
        plain = _chat_text(tokenizer, prefix)
    except Exception:  # a template that refuses this prefix (e.g. no user turn yet) has no prompt for it
        return ""
    return with_prompt[len(os.path.commonprefix([with_prompt, plain])) :]


def _probe(tokenizer, messages: list[dict], eot: str) -> _Shape | None:
    """The shape of `messages` from one marker rendering; None when markers do not survive once each.

    A turn's labels start where its generation prompt ends inside the template text before its first
    slot (reasoning or content): at inference the model generates everything after that prompt. Where the
    template renders the turn without that prompt's full text (a Qwen3 history turn after an
    enable_thinking=False prompt), they start at the turn's first slot. They end after the first
    end-of-turn token after the content.
    """
    marked = _marked(messages)
    try:
        text = _chat_text(tokenizer, marked)
    except Exception:
        return None
    found = list(_SLOT.finditer(text))
    slots = [(int(m[1]), _FIELDS[m[2]]) for m in found]
    if len(set(slots)) != len(slots) or any(i >= len(messages) for i, _ in slots):
        return None
    pieces, pos = [], 0
    for m in found:
        pieces.append(text[pos : m.start()])
        pos = m.end()
    pieces.append(text[pos:])
    where = {slot: k for k, slot in enumerate(slots)}
    spans, dropped = [], []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        c, r = where.get((i, "content")), where.get((i, "reasoning_content"))
        if c is None:
            return None
        if isinstance(m.get("reasoning_content"), str) and r is None:
            dropped.append(i)
        first = r if r is not None and r < c else c
        head, prompt = pieces[first], _generation_suffix(tokenizer, marked[:i])
        start = head.rindex(prompt) + len(prompt) if prompt and prompt in head else len(head)
        k = pieces[c + 1].find(eot)
        if k < 0:
            return None
        spans.append((first, start, c + 1, k + len(eot)))
    return _Shape(pieces, slots, spans, tuple(dropped))


def _place(shape: _Shape | None, messages: list[dict], text: str) -> list[tuple[int, int]] | None:
    """The trained spans of `messages` laid out in `shape`, or None unless that gives exactly `text`."""
    if shape is None:
        return None
    parts, starts, pos = [], [], 0
    for k, (i, key) in enumerate(shape.slots):
        value = messages[i].get(key)
        if not isinstance(value, str):
            return None
        starts.append(pos)
        parts += [shape.pieces[k], value]
        pos += len(shape.pieces[k]) + len(value)
    starts.append(pos)
    parts.append(shape.pieces[-1])
    if "".join(parts) != text:  # the check that makes the shortcut exact, for every conversation
        return None
    return [(starts[a] + b, starts[c] + d) for a, b, c, d in shape.spans]


def _shape_key(messages: list[dict]) -> tuple:
    return tuple((m["role"], isinstance(m.get("reasoning_content"), str)) for m in messages)


def layout(tokenizer, messages: list[dict], *, cached: bool = True) -> tuple[str, list[tuple[int, int]]]:
    """Text of `messages` as the template renders the whole conversation, and every assistant turn's
    trained span (character offsets). `cached=False` probes this conversation on its own (pre-flight)."""
    facts = template_facts(tokenizer)
    text = _chat_text(tokenizer, messages)
    if cached:
        key = _shape_key(messages)
        if key not in facts.shapes:
            facts.shapes[key] = _probe(tokenizer, messages, facts.eot)
        spans = _place(facts.shapes[key], messages, text)
        if spans is not None:
            return text, spans
    spans = _place(_probe(tokenizer, messages, facts.eot), messages, text)  # its own marker rendering
    if spans is not None:
        return text, spans
    return label_spans(tokenizer, messages, eot=facts.eot)  # a template that rewrites contents


def dropped_reasoning(tokenizer, messages: list[dict]) -> list[int]:
    """Assistant turns whose reasoning_content the template leaves out of the rendering (Qwen3 drops it
    from turns before the last user message): that reasoning is not trained."""
    facts = template_facts(tokenizer)
    key = _shape_key(messages)
    if key not in facts.shapes:
        facts.shapes[key] = _probe(tokenizer, messages, facts.eot)
    shape = facts.shapes[key]
    return list(shape.dropped_reasoning) if shape is not None else []


def build_generation_prompt(
    tokenizer, messages: list[dict], system_prompt: str | None = None, kwargs: dict | None = None
) -> str:
    """The prompt for generation, formatted exactly as in training (same template, same system prompt,
    same template arguments: those attached to the tokenizer, updated by `kwargs`, e.g. a request's
    `chat_template_kwargs`)."""
    if system_prompt and (not messages or messages[0]["role"] != "system"):
        messages = [{"role": "system", "content": system_prompt}] + list(messages)
    merged = {**template_kwargs(tokenizer), **(kwargs or {})}
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **merged)


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


def template_with_kwargs(template: str, kwargs: dict) -> str:
    """The Jinja chat template with the training run's template arguments (`data.template_kwargs`) set at
    its top, so llama.cpp and every other Jinja renderer format prompts as training did (Qwen3's
    enable_thinking=False puts an empty think block into the generation prompt)."""
    head = ""
    for name, value in kwargs.items():
        if not name.isidentifier():
            raise TemplateError(
                f"template argument {name!r} (inference.json) is not a template variable name"
            )
        literal = "none" if value is None else json.dumps(value, ensure_ascii=False)  # true/false/1.5/"s"
        head += f"{{%- set {name} = {literal} %}}"
    return head + "\n" + template if head else template


def template_with_system(template: str, system: str | None) -> str:
    """The Jinja chat template, made to start every conversation that has no system turn with `system`.

    One statement prepended, so the rest of the template (its tools, its generation prompt) is untouched;
    a template with a default system prompt of its own (Qwen's, SmolLM2's) takes ours instead.
    """
    if not system:
        return template
    literal = json.dumps(system, ensure_ascii=False)  # a valid Jinja string literal (\n, \", \\)
    return (
        "{%- if not (messages and messages[0]['role'] == 'system') %}"
        f"{{%- set messages = [{{'role': 'system', 'content': {literal}}}] + messages %}}"
        "{%- endif %}\n" + template
    )


def save_default_system(folder, system: str | None) -> None:
    """Make the chat template saved in `folder` (a tokenizer's `save_pretrained` output) start every
    conversation that has no system turn with `system`, the prompt the run trained under.

    So the tutorials' own inference code (`apply_chat_template` on the adapter folder's tokenizer, no system
    message) renders what training rendered, instead of a template default the run never saw (SmolLM2's
    "...named SmolLM, trained by Hugging Face"). transformers 5 writes the template to
    `chat_template.jinja`; older layouts keep it in `tokenizer_config.json` (both handled). A conversation
    that brings its own system turn renders unchanged. `system` None or empty: nothing changes.
    """
    from pathlib import Path

    if not system:
        return
    jinja, config = Path(folder) / "chat_template.jinja", Path(folder) / "tokenizer_config.json"
    if jinja.is_file():
        jinja.write_text(template_with_system(jinja.read_text(encoding="utf-8"), system), encoding="utf-8")
        return
    if config.is_file():
        tree = json.loads(config.read_text(encoding="utf-8"))
        if isinstance(tree.get("chat_template"), str):
            tree["chat_template"] = template_with_system(tree["chat_template"], system)
            config.write_text(json.dumps(tree, ensure_ascii=False, indent=2), encoding="utf-8")
