"""Sources -> conversations -> the train and eval splits of one run, with every row accounted for.

for each train source: read (bad rows: stop, or skip and count) -> drop or count duplicates
    -> hold out `eval_ratio` of it (seeded) -> draw `train_samples` from the rest (seeded)
train = the sources' rest, in order; eval = the held-out parts, or the `eval_path` sources.
Splitting each source before sampling it keeps repeated (up-sampled) copies out of the eval split.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from chattune.console import tally
from chattune.data.formats import BadRow, Conversation, to_messages
from chattune.data.sources import Source, read_records, source_kind
from chattune.errors import ConfigError, DataError


@dataclass
class ReadReport:
    """What reading did to the user's rows: nothing is dropped without being counted here."""

    rows: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> count (on_bad_row: skip)
    duplicates: int = 0  # conversations identical to an earlier one (across sources)
    dropped_duplicates: int = 0  # of those, dropped (data.dedup)
    sources: list[dict] = field(default_factory=list)  # per source: path, fingerprint, rows, kept, used

    def add(self, other: ReadReport) -> None:
        self.rows += other.rows
        self.kept += other.kept
        self.skipped.update(other.skipped)
        self.duplicates += other.duplicates
        self.dropped_duplicates += other.dropped_duplicates
        self.sources += other.sources

    def as_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "kept": self.kept,
            "skipped": dict(self.skipped),
            "duplicates": self.duplicates,
            "dropped_duplicates": self.dropped_duplicates,
            "sources": self.sources,
        }


def _reason_key(reason: str) -> str:
    """Group skip reasons by kind: positions inside a row are in the error, not in the tally."""
    reason = re.sub(r"\s*\((column|byte) [^)]*\)", "", reason)
    return re.sub(r"\[\d+\]", "[i]", reason)


def read_conversations(
    path: str | Source,
    *,
    fmt: str = "auto",
    system_prompt: str | None = None,
    on_bad_row: str = "error",
    max_samples: int | None = None,
    converter: str | None = None,
    columns: Any = None,
    placeholders: dict | None = None,
) -> tuple[list[Conversation], ReadReport]:
    """Every record of one source as a validated conversation, or a `DataError` naming file and line."""
    source = path if isinstance(path, Source) else Source(str(path))
    report = ReadReport()
    convs: list[Conversation] = []
    for line, rec in read_records(source):
        if max_samples is not None and report.rows >= max_samples:
            break
        report.rows += 1
        try:
            if isinstance(rec, BadRow):
                raise rec
            msgs = to_messages(rec, fmt, system_prompt, converter, columns=columns, placeholders=placeholders)
        except BadRow as e:
            if on_bad_row == "error":
                hint = " (set data.on_bad_row: skip to skip bad rows and count them)"
                raise DataError(source.spec, line, str(e) + hint) from None
            report.skipped[_reason_key(str(e))] += 1
            continue
        convs.append(Conversation(msgs, f"{source.spec}:{line}"))
    report.kept = len(convs)
    report.sources.append(
        {
            "path": source.spec,
            "fingerprint": source.fingerprint,
            "rows": report.rows,
            "kept": report.kept,
            "skipped": dict(report.skipped),
        }
    )
    if not convs:
        if report.rows == 0:
            what = "the source is empty: check the path, or that the file was written completely"
        else:  # every row was skipped (data.on_bad_row: skip), each for the reason counted here
            what = (
                f"all {report.rows} rows were skipped ({tally(report.skipped)}); fix those rows, or check "
                "data.format / data.converter match the file's fields"
            )
        raise DataError(source.spec, None, f"no usable records: {what}")
    return convs, report


def conversation_key(conv: Conversation) -> tuple:
    """What makes two conversations the same training example."""
    return tuple((m["role"], m["content"]) for m in conv.messages)


def mark_duplicates(convs: list[Conversation], seen: set, *, drop: bool) -> tuple[list[Conversation], int]:
    """(conversations, how many repeat one already in `seen`); with `drop`, the repeats are left out."""
    out, dups = [], 0
    for c in convs:
        key = conversation_key(c)
        if key in seen:
            dups += 1
            if drop:
                continue
        seen.add(key)
        out.append(c)
    return out, dups


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


def sample_conversations(convs: list, n: int, seed: int) -> list:
    """`n` conversations drawn with the seed, in source order; more than there are repeats them whole."""
    whole, rest = divmod(n, len(convs))
    picked = sorted(random.Random(seed).sample(range(len(convs)), rest))
    return convs * whole + [convs[i] for i in picked]


def _as_list(value: Any) -> list:
    return list(value) if isinstance(value, list) else [value]


def _converters_for(dc, n_sources: int, key: str) -> list:
    if not isinstance(dc.converter, list):
        return [dc.converter] * n_sources
    if len(dc.converter) == n_sources:
        return list(dc.converter)
    if len(set(dc.converter)) == 1:
        return [dc.converter[0]] * n_sources
    raise ConfigError(
        key,
        f"data.converter is a list aligned with data.train_path; give {key} as a list of "
        f"the same length ({len(dc.converter)} sources)",
    )


def check_sources(dc) -> None:
    """Before anything slow (the model's load): every `data.train_path` / `data.eval_path` source is given
    and names a file, a saved dataset or a dataset id (`sources.source_kind`). Raises DataError naming the
    key or the path; a dataset id is only fetched, and so only checked, when the data is read."""
    sources = _as_list(dc.train_path)
    if not sources or not all(sources):
        raise DataError("data.train_path", None, "empty: give a data file, a saved dataset or a dataset id")
    for spec in [*sources, *_as_list(dc.eval_path or [])]:
        source_kind(str(spec))


def read_splits(
    dc, seed: int
) -> tuple[list[Conversation], list[Conversation], ReadReport, ReadReport | None]:
    """Train and eval conversations for a `DataConfig`: eval from its own sources or split off by ratio."""
    check_sources(dc)
    sources = _as_list(dc.train_path)
    placeholders = {"name": dc.identity_name, "author": dc.identity_author}
    read_kw = dict(
        fmt=dc.format,
        system_prompt=dc.system_prompt,
        on_bad_row=dc.on_bad_row,
        columns=dc.columns,
        placeholders=placeholders,
    )
    samples = dc.train_samples or [None] * len(sources)
    train: list[Conversation] = []
    held: list[Conversation] = []
    report, seen = ReadReport(), set()
    for i, (src, conv_name) in enumerate(
        zip(sources, _converters_for(dc, len(sources), "data.train_path"), strict=True)
    ):
        convs, rep = read_conversations(src, converter=conv_name, max_samples=dc.max_samples, **read_kw)
        convs, rep.duplicates = mark_duplicates(convs, seen, drop=dc.dedup)
        rep.dropped_duplicates = rep.duplicates if dc.dedup else 0
        part_train, part_held = (
            (convs, []) if dc.eval_path else split_conversations(convs, dc.eval_ratio, seed + i)
        )
        if samples[i] is not None:
            part_train = sample_conversations(part_train, samples[i], seed + i)
        rep.sources[0].update(duplicates=rep.duplicates, train=len(part_train), eval=len(part_held))
        train += part_train
        held += part_held
        report.add(rep)
    if not dc.eval_path:
        return train, held, report, None
    eval_sources = _as_list(dc.eval_path)
    eval_report = ReadReport()
    train_keys = {conversation_key(c) for c in train}
    eval_converters = (
        [dc.eval_converter] * len(eval_sources)
        if dc.eval_converter
        else _converters_for(dc, len(eval_sources), "data.eval_path")
    )
    for src, conv_name in zip(eval_sources, eval_converters, strict=True):
        convs, rep = read_conversations(src, converter=conv_name, **read_kw)
        # Counted, not dropped: an eval example seen in training makes the eval loss look better.
        rep.duplicates = sum(conversation_key(c) in train_keys for c in convs)
        rep.sources[0].update(in_train=rep.duplicates)
        held += convs
        eval_report.add(rep)
    return train, held, report, eval_report
