"""The on-disk cache of tokenised examples: $CHATTUNE_CACHE/tokenized/<key>.npz.

The key hashes everything the examples depend on (the caller's parts: tokenizer, template, options,
code version; and every conversation's text), so a hit is always the examples a fresh render would
give. One file per key: the ids of all examples end to end, a trained-token mask, the lengths, and the
render report as JSON. Written to a temporary name and renamed, so a crash never leaves half a file.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

IGNORE_INDEX = -100


def _dir() -> Path:
    from chattune.models import cache_dir

    return cache_dir() / "tokenized"


def cache_key(parts: list[Any], conversations: list[list[dict]]) -> str:
    h = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode("utf-8"))
    for msgs in conversations:
        h.update(json.dumps(msgs, ensure_ascii=False).encode("utf-8"))
        h.update(b"\x00")
    return h.hexdigest()[:32]


def load_examples(key: str) -> tuple[list[dict], dict] | None:
    """(examples, report) stored under `key`, or None (absent or unreadable: then it is rebuilt)."""
    import numpy as np

    path = _dir() / f"{key}.npz"
    if not path.is_file():
        return None
    try:
        with np.load(path) as z:
            ids, mask, lengths = z["ids"], z["mask"], z["lengths"]
            report = json.loads(str(z["report"]))
    except (OSError, ValueError, KeyError):
        return None
    labels = np.where(mask, ids, IGNORE_INDEX).tolist()
    ids = ids.tolist()
    examples, pos = [], 0
    for n in lengths.tolist():
        examples.append({"input_ids": ids[pos : pos + n], "labels": labels[pos : pos + n]})
        pos += n
    return examples, report


def store_examples(key: str, examples: list[dict], report: dict) -> None:
    import numpy as np

    target = _dir()
    try:
        target.mkdir(parents=True, exist_ok=True)
        ids = np.fromiter((t for e in examples for t in e["input_ids"]), dtype=np.int32)
        mask = np.fromiter((t != IGNORE_INDEX for e in examples for t in e["labels"]), dtype=bool)
        lengths = np.array([len(e["input_ids"]) for e in examples], dtype=np.int64)
        fd, tmp = tempfile.mkstemp(prefix=f".{key}-", suffix=".npz", dir=target)
        with os.fdopen(fd, "wb") as f:
            np.savez(f, ids=ids, mask=mask, lengths=lengths, report=np.array(json.dumps(report)))
        os.replace(tmp, target / f"{key}.npz")
    except OSError:  # a read-only or full cache disk costs speed, never the run
        return
