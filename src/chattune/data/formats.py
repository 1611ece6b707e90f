"""One record -> one conversation: the record shapes, the tutorials' raw formats, and validation.

record --rename columns--> --converter (a tutorial's raw shape)--> alpaca / messages / ShareGPT
       --to_messages--> [{role, content}, ...] --validate_messages--> ok, or BadRow(reason)
Every function here is pure: no files, no tokenizer. The reader turns a `BadRow` into a
`DataError(path, line, reason)`, or counts it by reason with `on_bad_row: skip`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

ROLES = ("system", "user", "assistant")
_SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}
# Standard field -> the name `data.columns.<field>` overrides (ColumnsConfig field names).
_COLUMN_FIELDS = {
    "prompt": "instruction",
    "query": "input",
    "response": "output",
    "system": "system",
    "history": "history",
}


@dataclass
class Conversation:
    messages: list[dict[str, str]]
    where: str  # "path:line", for messages about this record later in the pipeline


class BadRow(Exception):
    """A record that cannot be trained on; the message is the reason (reported with file and line)."""


# -- the tutorials' raw formats -> alpaca records ------------------------------------------------------
NEWS_CLS_SYSTEM = (
    "你是一个文本分类领域的专家，你会接收到一段文本和几个潜在的分类选项列表，请输出文本内容的正确分类"
)
LEGAL_SYSTEM = "你是一个法律专家，请根据用户的问题给出专业的回答"
HUANHUAN_SYSTEM = "现在你要扮演皇帝身边的女人--甄嬛"


def _text(rec: dict, key: str, *, required: bool) -> str:
    if key not in rec or rec[key] is None:
        if required:
            raise BadRow(f"missing field '{key}'")
        return ""
    value = rec[key]
    if not isinstance(value, str):
        raise BadRow(f"field '{key}' must be a string, got {type(value).__name__}")
    return value


def _convert_news_cls(rec: dict, placeholders: dict | None = None) -> dict:
    """SwanLab's Qwen2 news-classification tutorial: {text, category, output} -> its prompt.

    The tutorial formats `category` with an f-string, so a list prints as Python shows it."""
    text = _text(rec, "text", required=True)
    category = rec.get("category")
    if isinstance(category, list) and all(isinstance(c, str) for c in category):
        category = str(category)
    elif not isinstance(category, str):
        raise BadRow("field 'category' must be a string or a list of strings")
    return {
        "system": NEWS_CLS_SYSTEM,
        "instruction": f"文本:{text},分类选项列表:{category}",
        "output": _text(rec, "output", required=True),
    }


def _convert_disc_law(rec: dict, placeholders: dict | None = None) -> dict:
    """self-llm's DISC-Law-SFT Pair QA tutorial: {input, output} under the fixed legal-expert system prompt."""
    return {
        "system": LEGAL_SYSTEM,
        "instruction": _text(rec, "input", required=True),
        "output": _text(rec, "output", required=True),
    }


def _convert_huanhuan(rec: dict, placeholders: dict | None = None) -> dict:
    """self-llm's Chat-甄嬛 tutorials: user turn `instruction + input` (joined as is), 甄嬛's system prompt."""
    return {
        "system": HUANHUAN_SYSTEM,
        "instruction": _text(rec, "instruction", required=True) + _text(rec, "input", required=False),
        "output": _text(rec, "output", required=True),
    }


def _convert_identity(rec: dict, placeholders: dict | None = None) -> dict:
    """LLaMA-Factory's identity.json: alpaca records whose texts say `{{name}}` and `{{author}}`."""
    if not placeholders or not all(placeholders.get(k) for k in ("name", "author")):
        raise BadRow("the identity converter needs a name and an author (data.identity_name/identity_author)")
    out = dict(rec)
    for key, value in rec.items():
        if isinstance(value, str):
            out[key] = value.replace("{{name}}", placeholders["name"]).replace(
                "{{author}}", placeholders["author"]
            )
    return out


CONVERTERS: dict[str, Callable[..., dict]] = {
    "news_cls": _convert_news_cls,
    "disc_law": _convert_disc_law,
    "huanhuan": _convert_huanhuan,
    "identity": _convert_identity,
}


# -- record shapes -------------------------------------------------------------------------------------
def rename_columns(rec: dict, columns: Any) -> dict:
    """Apply `data.columns`: the user's column names -> the standard ones (only columns present move)."""
    if columns is None:
        return rec
    out = dict(rec)
    for field, std in _COLUMN_FIELDS.items():
        src = getattr(columns, field, None)
        if src and src != std and src in out:
            out[std] = out.pop(src)
    src = getattr(columns, "messages", None)
    if src and src in out and src not in ("messages", "conversations"):
        out["messages"] = out.pop(src)
    return out


def detect_format(rec: Any) -> str:
    if isinstance(rec, dict):
        if "messages" in rec:
            return "messages"
        if "conversations" in rec:
            return "sharegpt"
        if "instruction" in rec or "output" in rec:
            return "alpaca"
    shown = ", ".join(sorted(rec)[:8]) if isinstance(rec, dict) else type(rec).__name__
    raise BadRow(
        f"unknown record shape (fields: {shown}): expected {{instruction, input, output}}, {{messages: [...]}} "
        "or {conversations: [...]}; map other column names with data.columns (`eval --columns`) or use data.converter"
    )


def _maybe_json(value: Any, key: str) -> Any:
    """CSV and parquet cells hold lists as JSON text; accept them."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            return json.loads(value)
        except json.JSONDecodeError as e:
            raise BadRow(f"field '{key}' is not valid JSON: {e.msg}") from None
        except RecursionError:
            raise BadRow(f"field '{key}' is JSON nested too deeply to be a list of turns") from None
    return value


def _alpaca(rec: dict) -> list[dict[str, str]]:
    instruction = _text(rec, "instruction", required=False)
    inp = _text(rec, "input", required=False)
    if "instruction" not in rec and "input" not in rec:
        raise BadRow("missing field 'instruction' (or 'input')")
    output = _text(rec, "output", required=True)
    system = _text(rec, "system", required=False)
    msgs = [{"role": "system", "content": system}] if system else []
    history = _maybe_json(rec.get("history"), "history") or []
    if not isinstance(history, list):
        raise BadRow("field 'history' must be a list of [question, answer] pairs")
    for k, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise BadRow(f"history[{k}] must be a [question, answer] pair of strings")
        msgs += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    # The tutorials' rule: the user turn is instruction and input joined by a newline when both exist.
    user = "\n".join(x for x in (instruction, inp) if x)
    msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    return msgs


def _chat(
    rec: dict, key: str, role_key: str, content_key: str, roles: dict[str, str]
) -> list[dict[str, str]]:
    if key not in rec:
        raise BadRow(f"missing field '{key}'")
    turns = _maybe_json(rec[key], key)
    if not isinstance(turns, list):
        raise BadRow(f"field '{key}' must be a list of turns")
    msgs = []
    system = _text(rec, "system", required=False)  # ShareGPT (LLaMA-Factory) keeps it beside the turns
    if system:
        msgs.append({"role": "system", "content": system})
    for k, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise BadRow(f"{key}[{k}] must be an object with '{role_key}' and '{content_key}'")
        role = turn.get(role_key)
        if not isinstance(role, str) or role not in roles:  # a list or object as role is not hashable
            shown = repr(role) if isinstance(role, str | None) else f"a {type(role).__name__}"
            raise BadRow(f"{key}[{k}] has unknown role {shown[:60]} (expected one of {', '.join(roles)})")
        content = turn.get(content_key)
        if not isinstance(content, str):
            raise BadRow(f"{key}[{k}].{content_key} must be a string")
        msg = {"role": roles[role], "content": content}
        if roles[role] == "assistant" or turn.get("reasoning_content") is not None:
            _add_reasoning(msg, turn.get("reasoning_content"), f"{key}[{k}]")
        msgs.append(msg)
    return msgs


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _add_reasoning(msg: dict, reasoning: Any, where: str) -> None:
    """An assistant answer's reasoning: its `reasoning_content` field, or a leading `<think>...</think>`
    block of its content (as Qwen3 and DeepSeek-R1 write it), kept as `reasoning_content` (newlines around
    it stripped, as Qwen3's template strips them); the content keeps the answer only. Empty reasoning is none."""
    if reasoning is not None and msg["role"] != "assistant":
        raise BadRow(f"{where}.reasoning_content: only an assistant answer carries reasoning")
    if reasoning is not None and not isinstance(reasoning, str):
        raise BadRow(f"{where}.reasoning_content must be a string")
    content = msg["content"]
    head = content.lstrip()
    if reasoning is None and head.startswith("<think>") and "</think>" in head:
        reasoning, content = head[len("<think>") :].split("</think>", 1)
        msg["content"] = content.lstrip("\n")
    if reasoning is not None and reasoning.strip("\n"):
        msg["reasoning_content"] = reasoning.strip("\n")


def validate_messages(msgs: list[dict[str, str]]) -> None:
    """Roles in order (optional system, then user/assistant alternating, ending with an answer)."""
    if not msgs:
        raise BadRow("empty conversation")
    body = msgs[1:] if msgs[0]["role"] == "system" else msgs
    if not body:
        raise BadRow("conversation has only a system message")
    for k, m in enumerate(body):
        expected = "user" if k % 2 == 0 else "assistant"
        if m["role"] != expected:
            raise BadRow(
                f"turn {k + 1} is '{m['role']}' but '{expected}' was expected (user and assistant alternate)"
            )
    if body[-1]["role"] != "assistant":
        raise BadRow("conversation must end with an assistant answer")
    for m in msgs:  # legal JSON ("\\ud800") that no tokenizer can encode
        if _LONE_SURROGATE.search(m["content"]):
            raise BadRow(f"a {m['role']} turn holds a lone UTF-16 surrogate (not a character); fix the text")
    for m in body:
        if m["role"] == "assistant" and not m["content"].strip():
            raise BadRow("empty assistant answer")
        if m["role"] == "user" and not m["content"].strip():
            raise BadRow("empty user turn")


def to_messages(
    rec: Any,
    fmt: str = "auto",
    system_prompt: str | None = None,
    converter: str | None = None,
    *,
    columns: Any = None,
    placeholders: dict | None = None,
) -> list[dict[str, str]]:
    """One record -> validated messages. `system_prompt` goes first when the record brings none."""
    if not isinstance(rec, dict):
        raise BadRow("a record must be a JSON object")
    rec = rename_columns(rec, columns)
    if converter:
        rec = CONVERTERS[converter](rec, placeholders)
    kind = detect_format(rec) if fmt == "auto" else fmt
    role_key = getattr(columns, "role", None)
    content_key = getattr(columns, "content", None)
    if kind == "alpaca":
        msgs = _alpaca(rec)
        for m in msgs:
            if m["role"] == "assistant":
                _add_reasoning(m, None, "output")
    elif kind == "messages":
        key = "messages" if "messages" in rec else "conversations"
        msgs = _chat(rec, key, role_key or "role", content_key or "content", {r: r for r in ROLES})
    elif kind == "sharegpt":
        key = "conversations" if "conversations" in rec else "messages"
        msgs = _chat(rec, key, role_key or "from", content_key or "value", _SHAREGPT_ROLES)
    else:  # pragma: no cover - config validation limits fmt
        raise BadRow(f"unknown format {kind}")
    if system_prompt and msgs and msgs[0]["role"] != "system":
        msgs = [{"role": "system", "content": system_prompt}] + msgs
    validate_messages(msgs)
    return msgs


def to_record(msgs: list[dict[str, str]], shape: str = "messages") -> dict:
    """Messages -> a record in `shape` (`messages` or alpaca with `system`/`history`), for `data convert`."""
    if shape == "messages":
        return {"messages": msgs}
    system = msgs[0]["content"] if msgs[0]["role"] == "system" else None
    body = msgs[1:] if system is not None else msgs
    pairs = [[body[k]["content"], body[k + 1]["content"]] for k in range(0, len(body) - 2, 2)]
    rec: dict = {"instruction": body[-2]["content"], "input": "", "output": body[-1]["content"]}
    if system is not None:
        rec["system"] = system
    if pairs:
        rec["history"] = pairs
    return rec
