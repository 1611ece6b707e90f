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
from collections import Counter
from pathlib import Path
from typing import Any

from chattune.errors import DataError
from chattune.files import atomic_path
from chattune.render.examples import DROP_REASON, RenderReport, render_many
from chattune.render.template import template_kwargs

IGNORE_INDEX = -100


def _dir() -> Path:
    from chattune.paths import cache_dir

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
        with atomic_path(target / f"{key}.npz", suffix=".npz") as tmp:
            np.savez(tmp, ids=ids, mask=mask, lengths=lengths, report=np.array(json.dumps(report)))
    except OSError:  # a read-only or full cache disk costs speed, never the run
        return


_worker_state: dict = {}  # set in each worker process by the pool's initializer

# -- whole datasets: cached, in parallel when large -----------------------------------------------------
PARALLEL_MIN = 2_000  # conversations; below this, starting worker processes costs more than it saves


def _render_chunk(job: tuple[int, list[list[dict]]]) -> tuple[list[dict], RenderReport]:
    offset, chunk = job
    tokenizer, opts = _worker_state["tokenizer"], _worker_state["opts"]
    report, examples = RenderReport(), []
    for k, out in enumerate(render_many(tokenizer, chunk, **opts)):
        if isinstance(out, str):
            report.dropped[out] += 1
            # Dropping over-long examples is what `truncation: drop` asks for; anything else is a bad row.
            if not out.startswith(DROP_REASON) and report.first_bad is None:
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
    desc: str = "tokenising",
) -> tuple[list[dict], RenderReport]:
    """Render conversations; returns (examples as dicts, RenderReport). Dropped ones are counted by reason.

    A conversation with no answer token left within `max_len` is a bad row: with `on_bad_row: error`
    it stops the run naming its file and line. With `cache`, the result is stored under
    $CHATTUNE_CACHE/tokenized keyed by everything it depends on (tokenizer, template, options, data, this
    code), so a second run loads it at once. Large sets are split over `workers` processes (default: one
    per core, up to 8), with progress lines (`desc`: what they say is being done) from PARALLEL_MIN
    conversations on, or as `progress` says."""

    opts = dict(max_len=max_len, truncation=truncation, train_on=train_on)
    msgs = [c.messages for c in conversations]
    key, hit = None, None
    if cache:
        parts = [
            _tokenizer_fingerprint(tokenizer),
            str(tokenizer.chat_template),
            template_kwargs(tokenizer),
            opts,
            _code_version(),
        ]
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
        from chattune.console import ProgressLines

        examples, report = [], RenderReport()
        bar = ProgressLines(len(msgs), desc, "conversations", enabled=show)
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
    """The hash of the rendering and labelling code (this file, template.py, examples.py): a cache made by
    different code is never reused."""
    import hashlib
    from pathlib import Path

    h = hashlib.sha256()
    for name in ("cache.py", "template.py", "examples.py"):
        h.update(Path(__file__).with_name(name).read_bytes())
    return h.hexdigest()[:16]
