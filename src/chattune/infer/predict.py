"""`chattune predict`: a file of prompts (JSONL/JSON/CSV, the training formats) -> answers, one JSON line each,
written atomically; rows without a prompt are counted and named, never dropped silently.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from chattune.console import ProgressLines
from chattune.errors import ChattuneError, DataError
from chattune.files import atomic_path
from chattune.infer.generation import NO_ANSWER, generate
from chattune.infer.load import Loaded


# -- batch prediction -------------------------------------------------------------------------------------
def _with_placeholder(rec: Any) -> Any | None:
    """The record with a stand-in answer appended, or None when its shape is not one we know."""
    if not isinstance(rec, dict):
        return None
    if isinstance(rec.get("messages"), list):
        return {**rec, "messages": rec["messages"] + [{"role": "assistant", "content": NO_ANSWER}]}
    if isinstance(rec.get("conversations"), list):
        return {**rec, "conversations": rec["conversations"] + [{"from": "gpt", "value": NO_ANSWER}]}
    if "instruction" in rec or "input" in rec:
        return {**rec, "output": NO_ANSWER}
    return None


def read_prompts(
    path: str | Path, fmt: str = "auto", converter: str | None = None
) -> list[tuple[list, str | None]]:
    """(conversation up to the answer, reference answer or None) per record, converted as in training."""
    from chattune.data import BadRow, read_records, to_messages

    rows = []
    for line, rec in read_records(path):
        try:
            if isinstance(rec, BadRow):
                raise rec
            try:
                msgs = to_messages(rec, fmt, None, converter)
            except BadRow:
                # A record without an answer (nothing to compare with) is still a prompt to answer.
                if (filled := _with_placeholder(rec)) is None:
                    raise
                msgs = to_messages(filled, fmt, None, converter)
        except BadRow as e:
            raise DataError(str(path), line, str(e)) from None
        ref = msgs[-1]["content"]
        rows.append((msgs[:-1], None if ref == NO_ANSWER else ref))
    if not rows:
        raise DataError(str(path), None, "no records to predict")
    return rows


def predict_file(
    loaded: Loaded,
    input_path: str | Path,
    output_path: str | Path,
    batch_size: int = 8,
    *,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop: list[str] | None = None,
    seed: int | None = None,
    fmt: str = "auto",
    converter: str | None = None,
    progress: bool = True,
) -> int:
    """Answer every record of a .jsonl/.json file; write {prompt, prediction, reference} lines atomically.

    `prompt` is the last user turn (as in the trainer's sample predictions). Returns the number written.
    """
    if batch_size < 1:
        raise ChattuneError(f"batch_size must be at least 1, got {batch_size}")
    rows = read_prompts(input_path, fmt, converter)
    out = Path(output_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Longest prompts first, batched by length: less padding, and an out-of-memory error shows up at once.
    order = sorted(range(len(rows)), key=lambda i: -sum(len(m["content"]) for m in rows[i][0]))
    answers: dict[int, str] = {}
    kw = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, stop=stop, seed=seed)
    # CPU generation of a few hundred answers takes minutes: show that it moves (a line every 10 s at most)
    bar = ProgressLines(len(rows), "predict", enabled=progress)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        for i, text in zip(chunk, generate(loaded, [rows[i][0] for i in chunk], **kw), strict=True):
            answers[i] = text
        bar.update(len(chunk))
    bar.close()
    with atomic_path(out) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for i, (msgs, ref) in enumerate(rows):
            prompt = next((m["content"] for m in reversed(msgs) if m["role"] == "user"), "")
            row = {"prompt": prompt, "prediction": answers[i], "reference": ref}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return len(rows)
