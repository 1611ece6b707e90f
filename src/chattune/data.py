"""Read dataset files into conversations, and validate every row first.

file (.json array / .jsonl) --read--> records --to_messages--> [{role, content}, ...]
Formats: alpaca-style {instruction, input, output[, system, history]} (the tutorials' shape),
chat {messages: [{role, content}, ...]}, ShareGPT {conversations: [{from, value}, ...]}.
A bad row raises `DataError(path, line, reason)`, or with `on_bad_row: skip` is counted by reason.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chattune.errors import DataError

ROLES = ("system", "user", "assistant")
_SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}


@dataclass
class Conversation:
    messages: list[dict[str, str]]
    where: str  # "path:line", for messages about this record later in the pipeline


@dataclass
class ReadReport:
    """What reading did to the user's rows: nothing is dropped without being counted here."""

    rows: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> count (on_bad_row: skip)

    def as_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "kept": self.kept, "skipped": dict(self.skipped)}


class _BadRow(Exception):
    pass


# -- file -> (line, record) ----------------------------------------------------------------------------
def _read_text(path: Path) -> str:
    if not path.is_file():
        raise DataError(str(path), None, "file not found; check data.train_path / data.eval_path")
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(
            str(path), line, f"not valid UTF-8 (byte {e.start}); re-save the file as UTF-8"
        ) from None


def _iter_jsonl(path: Path, text: str):
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as e:
            yield n, _BadRow(f"malformed JSON: {e.msg} (column {e.colno})")


def _iter_json_array(path: Path, text: str):
    """Decode a JSON array element by element so each record keeps the line it starts on."""
    dec = json.JSONDecoder()
    i = len(text) - len(text.lstrip())
    if not text[i:].startswith("["):
        raise DataError(str(path), 1, "a .json data file must hold one JSON array of records (or use .jsonl)")
    i += 1
    while True:
        while i < len(text) and text[i] in " \t\r\n":
            i += 1
        if i < len(text) and text[i] == "]":
            return
        line = text.count("\n", 0, i) + 1
        try:
            obj, i = dec.raw_decode(text, i)
        except json.JSONDecodeError as e:
            # A broken array cannot be resynchronised reliably: stop here whatever on_bad_row says.
            raise DataError(str(path), e.lineno, f"malformed JSON: {e.msg} (column {e.colno})") from None
        yield line, obj
        while i < len(text) and text[i] in " \t\r\n":
            i += 1
        if i < len(text) and text[i] == ",":
            i += 1
        elif i < len(text) and text[i] == "]":
            return
        else:
            raise DataError(str(path), text.count("\n", 0, i) + 1, "malformed JSON: expected ',' or ']'")


def read_records(path: str | Path):
    """Yield (line, record-or-_BadRow) from a .json array or .jsonl file."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in (".json", ".jsonl"):
        raise DataError(str(p), None, f"unsupported file type '{suffix}'; use .json (an array) or .jsonl")
    text = _read_text(p)
    if suffix == ".jsonl":
        yield from _iter_jsonl(p, text)
    else:
        yield from _iter_json_array(p, text)


# -- record -> messages --------------------------------------------------------------------------------
def _text(rec: dict, key: str, *, required: bool) -> str:
    if key not in rec or rec[key] is None:
        if required:
            raise _BadRow(f"missing field '{key}'")
        return ""
    value = rec[key]
    if not isinstance(value, str):
        raise _BadRow(f"field '{key}' must be a string, got {type(value).__name__}")
    return value


def detect_format(rec: Any) -> str:
    if isinstance(rec, dict):
        if "messages" in rec:
            return "messages"
        if "conversations" in rec:
            return "sharegpt"
        if "instruction" in rec or "output" in rec:
            return "alpaca"
    raise _BadRow(
        "unknown record shape: expected {instruction, input, output}, {messages: [...]} or {conversations: [...]}"
    )


def _alpaca(rec: dict) -> list[dict[str, str]]:
    instruction = _text(rec, "instruction", required=False)
    inp = _text(rec, "input", required=False)
    if "instruction" not in rec and "input" not in rec:
        raise _BadRow("missing field 'instruction' (or 'input')")
    output = _text(rec, "output", required=True)
    system = _text(rec, "system", required=False)
    msgs = [{"role": "system", "content": system}] if system else []
    history = rec.get("history") or []
    if not isinstance(history, list):
        raise _BadRow("field 'history' must be a list of [question, answer] pairs")
    for k, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise _BadRow(f"history[{k}] must be a [question, answer] pair of strings")
        msgs += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    # The tutorials' rule: the user turn is instruction and input joined by a newline when both exist.
    user = "\n".join(x for x in (instruction, inp) if x)
    msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    return msgs


def _chat(
    rec: dict, key: str, role_key: str, content_key: str, roles: dict[str, str]
) -> list[dict[str, str]]:
    turns = rec[key]
    if not isinstance(turns, list):
        raise _BadRow(f"field '{key}' must be a list of turns")
    msgs = []
    for k, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise _BadRow(f"{key}[{k}] must be an object with '{role_key}' and '{content_key}'")
        role = turn.get(role_key)
        if role not in roles:
            raise _BadRow(f"{key}[{k}] has unknown role {role!r} (expected one of {', '.join(roles)})")
        content = turn.get(content_key)
        if not isinstance(content, str):
            raise _BadRow(f"{key}[{k}].{content_key} must be a string")
        msgs.append({"role": roles[role], "content": content})
    return msgs


def validate_messages(msgs: list[dict[str, str]]) -> None:
    """Roles in order (optional system, then user/assistant alternating, ending with an answer)."""
    if not msgs:
        raise _BadRow("empty conversation")
    body = msgs[1:] if msgs[0]["role"] == "system" else msgs
    if not body:
        raise _BadRow("conversation has only a system message")
    for k, m in enumerate(body):
        expected = "user" if k % 2 == 0 else "assistant"
        if m["role"] != expected:
            raise _BadRow(
                f"turn {k + 1} is '{m['role']}' but '{expected}' was expected (user and assistant alternate)"
            )
    if body[-1]["role"] != "assistant":
        raise _BadRow("conversation must end with an assistant answer")
    for m in body:
        if m["role"] == "assistant" and not m["content"].strip():
            raise _BadRow("empty assistant answer")
        if m["role"] == "user" and not m["content"].strip():
            raise _BadRow("empty user turn")


# -- the tutorials' raw formats -> alpaca records --------------------------------------------------------
NEWS_CLS_SYSTEM = (
    "你是一个文本分类领域的专家，你会接收到一段文本和几个潜在的分类选项列表，请输出文本内容的正确分类"
)
LEGAL_SYSTEM = "你是一个法律专家，请根据用户的问题给出专业的回答"


def _convert_news_cls(rec: dict) -> dict:
    """SwanLab's Qwen2 news-classification tutorial: {text, category, output} -> its prompt."""
    text, category = _text(rec, "text", required=True), _text(rec, "category", required=True)
    return {
        "system": NEWS_CLS_SYSTEM,
        "input": f"文本:{text},分类选项列表:{category}",
        "output": _text(rec, "output", required=True),
    }


def _convert_disc_law(rec: dict) -> dict:
    """self-llm's DISC-Law-SFT tutorial: {input, output} under the fixed legal-expert system prompt."""
    return {
        "system": LEGAL_SYSTEM,
        "input": _text(rec, "input", required=True),
        "output": _text(rec, "output", required=True),
    }


CONVERTERS = {"news_cls": _convert_news_cls, "disc_law": _convert_disc_law}


def to_messages(
    rec: Any, fmt: str = "auto", system_prompt: str | None = None, converter: str | None = None
) -> list[dict[str, str]]:
    if not isinstance(rec, dict):
        raise _BadRow("a record must be a JSON object")
    if converter:
        rec = CONVERTERS[converter](rec)
    kind = detect_format(rec) if fmt == "auto" else fmt
    if kind == "alpaca":
        msgs = _alpaca(rec)
    elif kind == "messages":
        msgs = _chat(rec, "messages", "role", "content", {r: r for r in ROLES})
    elif kind == "sharegpt":
        msgs = _chat(rec, "conversations", "from", "value", _SHAREGPT_ROLES)
    else:  # pragma: no cover - config validation limits fmt
        raise _BadRow(f"unknown format {kind}")
    if system_prompt and msgs and msgs[0]["role"] != "system":
        msgs = [{"role": "system", "content": system_prompt}] + msgs
    validate_messages(msgs)
    return msgs


def read_conversations(
    path: str | Path,
    *,
    fmt: str = "auto",
    system_prompt: str | None = None,
    on_bad_row: str = "error",
    max_samples: int | None = None,
    converter: str | None = None,
) -> tuple[list[Conversation], ReadReport]:
    report = ReadReport()
    convs: list[Conversation] = []
    for line, rec in read_records(path):
        if max_samples is not None and report.rows >= max_samples:
            break
        report.rows += 1
        try:
            if isinstance(rec, _BadRow):
                raise rec
            msgs = to_messages(rec, fmt, system_prompt, converter)
        except _BadRow as e:
            if on_bad_row == "error":
                hint = " (set data.on_bad_row: skip to skip bad rows and count them)"
                raise DataError(str(path), line, str(e) + hint) from None
            report.skipped[str(e).split(" (")[0] if "malformed JSON" in str(e) else str(e)] += 1
            continue
        convs.append(Conversation(msgs, f"{path}:{line}"))
    report.kept = len(convs)
    if not convs:
        raise DataError(
            str(path), None, f"no usable records (read {report.rows}, skipped {dict(report.skipped)})"
        )
    return convs, report


def split_conversations(convs: list, ratio: float, seed: int) -> tuple[list, list]:
    """Deterministic train/eval split: the same seed and data give the same split."""
    if ratio <= 0:
        return convs, []
    order = list(range(len(convs)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(len(convs) * ratio))
    eval_idx = set(order[:n_eval])
    train = [c for i, c in enumerate(convs) if i not in eval_idx]
    held = [c for i, c in enumerate(convs) if i in eval_idx]
    return train, held


def read_splits(
    dc, seed: int
) -> tuple[list[Conversation], list[Conversation], ReadReport, ReadReport | None]:
    """Train and eval conversations for a `DataConfig`: eval from its own file or split off by ratio."""
    read_kw = dict(
        fmt=dc.format, system_prompt=dc.system_prompt, on_bad_row=dc.on_bad_row, converter=dc.converter
    )
    if not dc.train_path:
        raise DataError("data.train_path", None, "empty: give a .json or .jsonl dataset file")
    train, report = read_conversations(dc.train_path, max_samples=dc.max_samples, **read_kw)
    if dc.eval_path:
        held, eval_report = read_conversations(dc.eval_path, **read_kw)
        return train, held, report, eval_report
    train, held = split_conversations(train, dc.eval_ratio, seed)
    return train, held, report, None
