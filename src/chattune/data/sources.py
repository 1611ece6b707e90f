"""Sources -> (line, record) pairs: files, saved `datasets` directories, and hub dataset ids.

.json (one array; a file of JSON lines named .json works too) / .jsonl / .csv / .parquet,
a directory written by `datasets.save_to_disk`, `hf:owner/name` (or a bare `owner/name`) on the
Hugging Face Hub, `ms:owner/name` on ModelScope. Each record keeps the line (or row) it came from, so
every later complaint names it. A row that cannot be read is yielded as a `BadRow` for the caller
to stop on or count; damage that loses the reader's place (a broken JSON array) stops at once.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chattune.data.formats import BadRow
from chattune.errors import DataError

FILE_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_TOO_DEEP = "JSON nested too deeply to be a record (lists or objects inside each other ~1,000 levels deep)"


@dataclass
class Source:
    """Where records come from, and a fingerprint of their content (for the run record and the cache)."""

    spec: str
    fingerprint: str | None = None  # set once read: sha256 of a file, the `datasets` fingerprint else


# -- files ----------------------------------------------------------------------------------------------
def _decode(path: Path, raw: bytes, *, per_line: bool) -> str | list[str | BadRow]:
    """UTF-8 text; with `per_line`, a list of lines where undecodable ones are `BadRow`s."""
    try:
        text = raw.decode("utf-8-sig")
        return text.split("\n") if per_line else text  # "\n" only: JSON strings may hold U+2028
    except UnicodeDecodeError as e:
        if not per_line:
            line = raw[: e.start].count(b"\n") + 1
            raise DataError(
                str(path), line, f"not valid UTF-8 (byte {e.start}); re-save the file as UTF-8"
            ) from None
    lines: list[str | BadRow] = []
    for chunk in raw.removeprefix(b"\xef\xbb\xbf").split(b"\n"):
        try:
            lines.append(chunk.decode("utf-8"))
        except UnicodeDecodeError as e:
            lines.append(BadRow(f"not valid UTF-8 (byte {e.start} of the line); re-save the file as UTF-8"))
    return lines


def _iter_jsonl(lines: list[str | BadRow]) -> Iterator[tuple[int, Any]]:
    for n, line in enumerate(lines, start=1):
        if isinstance(line, BadRow):
            yield n, line
            continue
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as e:
            yield n, BadRow(f"malformed JSON: {e.msg} (column {e.colno})")
        except RecursionError:  # json's decoder recurses per level: a line nested ~1,000 deep ends it
            yield n, BadRow(_TOO_DEEP)


def _iter_json_array(path: Path, text: str) -> Iterator[tuple[int, Any]]:
    """Decode a JSON array element by element so each record keeps the line it starts on."""
    dec = json.JSONDecoder()
    i = len(text) - len(text.lstrip())
    i += 1  # the opening '['
    line, counted = 1, 0  # newlines are counted from where the last count stopped: linear in the file
    while True:
        while i < len(text) and text[i] in " \t\r\n":
            i += 1
        if i < len(text) and text[i] == "]":
            return
        line, counted = line + text.count("\n", counted, i), i
        try:
            obj, i = dec.raw_decode(text, i)
        except RecursionError:
            raise DataError(str(path), line, _TOO_DEEP + "; the rest of the array cannot be read") from None
        except json.JSONDecodeError as e:
            # A broken array cannot be resynchronised reliably: stop here whatever on_bad_row says.
            raise DataError(
                str(path),
                e.lineno,
                f"malformed JSON: {e.msg} (column {e.colno}); the rest of the array "
                "cannot be read, so this stops even with data.on_bad_row: skip",
            ) from None
        yield line, obj
        while i < len(text) and text[i] in " \t\r\n":
            i += 1
        if i < len(text) and text[i] == ",":
            i += 1
        elif i < len(text) and text[i] == "]":
            return
        else:
            raise DataError(str(path), text.count("\n", 0, i) + 1, "malformed JSON: expected ',' or ']'")


def _iter_csv(path: Path, text: str) -> Iterator[tuple[int, Any]]:
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        return
    except csv.Error as e:
        raise DataError(str(path), 1, f"malformed CSV header: {e}") from None
    start = reader.line_num + 1
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise DataError(str(path), start, f"malformed CSV: {e}") from None
        if row:  # blank lines are no records
            if len(row) != len(header):
                yield start, BadRow(f"{len(row)} cells but the header has {len(header)} columns")
            else:
                yield start, dict(zip(header, row, strict=True))
        start = reader.line_num + 1


def _iter_parquet(path: Path) -> Iterator[tuple[int, Any]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
        n = 0
        for batch in pf.iter_batches(batch_size=4096):
            for rec in batch.to_pylist():
                n += 1
                yield n, rec
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise DataError(str(path), None, f"cannot read parquet: {e}") from None


def _read_file(path: Path, source: Source) -> Iterator[tuple[int, Any]]:
    suffix = path.suffix.lower()
    if suffix not in FILE_SUFFIXES:
        raise DataError(
            str(path),
            None,
            f"unsupported file type '{suffix}'; use {', '.join(FILE_SUFFIXES)} or a saved dataset",
        )
    raw = path.read_bytes()
    source.fingerprint = hashlib.sha256(raw).hexdigest()
    if suffix == ".parquet":
        yield from _iter_parquet(path)
        return
    if suffix == ".csv":
        yield from _iter_csv(path, _decode(path, raw, per_line=False))
        return
    head = raw.lstrip(b"\xef\xbb\xbf \t\r\n")[:1]
    if suffix == ".json" and head == b"[":
        yield from _iter_json_array(path, _decode(path, raw, per_line=False))
    elif head in (b"{", b""):  # JSON lines (many ".json" datasets are JSON lines too)
        yield from _iter_jsonl(_decode(path, raw, per_line=True))
    else:
        raise DataError(
            str(path), 1, "a .json data file must hold one JSON array of records, or one JSON object per line"
        )


# -- datasets directories and hub ids -------------------------------------------------------------------
def _iter_dataset(ds: Any, where: str, source: Source) -> Iterator[tuple[int, Any]]:
    from datasets import DatasetDict

    if isinstance(ds, DatasetDict):
        splits = list(ds)
        if "train" in ds or len(splits) == 1:
            ds = ds["train" if "train" in ds else splits[0]]
        else:
            raise DataError(where, None, f"has splits {splits} and none is 'train'; save the one to use")
    source.fingerprint = getattr(ds, "_fingerprint", None)
    yield from enumerate(ds, start=1)


def _read_saved_dataset(path: Path, source: Source) -> Iterator[tuple[int, Any]]:
    if not any((path / f).is_file() for f in ("dataset_info.json", "state.json", "dataset_dict.json")):
        raise DataError(
            str(path),
            None,
            "is a directory but not a dataset saved with `datasets.save_to_disk`; "
            "give a data file inside it instead",
        )
    from datasets import load_from_disk

    try:
        ds = load_from_disk(str(path))
    except Exception as e:
        raise DataError(str(path), None, f"cannot load the saved dataset: {e}") from None
    yield from _iter_dataset(ds, str(path), source)


def _offline() -> bool:
    return any(
        os.environ.get(v, "0").lower() in ("1", "true", "yes")
        for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    )


def _read_hub(hub: str, dataset_id: str, source: Source) -> Iterator[tuple[int, Any]]:
    from chattune.paths import host_reachable

    spec = source.spec
    if hub == "modelscope":
        if not host_reachable("www.modelscope.cn"):
            raise DataError(
                spec,
                None,
                f"ModelScope dataset '{dataset_id}' cannot be fetched: www.modelscope.cn cannot be "
                f"reached. Download it where there is network (`modelscope download --dataset {dataset_id} "
                "--local_dir DIR`) and set data.train_path to a data file in DIR",
            )
        try:
            from modelscope.msdatasets import MsDataset

            ds = MsDataset.load(dataset_id, split="train").to_hf_dataset()
        except Exception as e:
            raise DataError(spec, None, f"could not load ModelScope dataset '{dataset_id}': {e}") from None
        yield from _iter_dataset(ds, spec, source)
        return
    from datasets import load_dataset

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("//")[-1].split("/")[0]
    offline = _offline()
    if offline:  # a copy in the local datasets cache needs no network (offline mode answers in a second)
        try:
            ds = load_dataset(dataset_id, split="train")
        except Exception:
            ds = None
        if ds is not None:
            yield from _iter_dataset(ds, spec, source)
            return
    if offline or not host_reachable(endpoint):
        why = "HF_HUB_OFFLINE is set" if offline else f"{endpoint} cannot be reached"
        raise DataError(
            spec,
            None,
            f"'{dataset_id}' is not a local file or directory, and as a Hugging Face Hub dataset it "
            f"cannot be fetched: {why}. Download it where there is network (`hf download {dataset_id} "
            "--repo-type dataset --local-dir DIR`) and set data.train_path to a data file in DIR "
            "(or `ms:ID` for ModelScope)",
        )
    try:
        ds = load_dataset(dataset_id, split="train")
    except Exception as e:
        raise DataError(spec, None, f"could not load Hugging Face dataset '{dataset_id}': {e}") from None
    yield from _iter_dataset(ds, spec, source)


_HUB_PREFIXES = (("hf:", "huggingface"), ("ms:", "modelscope"), ("modelscope:", "modelscope"))


def source_kind(spec: str) -> str:
    """What a data source names: "file", "dir" (a saved dataset) or "hub" (a dataset id, fetched when
    read). Raises DataError naming it when it is none of them (a local path that does not exist): the
    check `chattune train` makes before the model loads, and the one `read_records` makes."""
    if any(spec.startswith(prefix) for prefix, _ in _HUB_PREFIXES):
        return "hub"
    path = Path(spec).expanduser()
    if path.is_file():
        return "file"
    if path.is_dir():
        return "dir"
    if _HUB_ID.match(spec) and path.suffix.lower() not in FILE_SUFFIXES:
        return "hub"
    raise DataError(spec, None, "file not found; check data.train_path / data.eval_path")


def read_records(source: str | Path | Source) -> Iterator[tuple[int, Any]]:
    """Yield (line or row, record-or-BadRow) from any supported source."""
    src = source if isinstance(source, Source) else Source(str(source))
    spec = src.spec
    for prefix, hub in _HUB_PREFIXES:
        if spec.startswith(prefix):
            yield from _read_hub(hub, spec[len(prefix) :], src)
            return
    kind = source_kind(spec)
    if kind == "file":
        yield from _read_file(Path(spec).expanduser(), src)
    elif kind == "dir":
        yield from _read_saved_dataset(Path(spec).expanduser(), src)
    else:
        yield from _read_hub("huggingface", spec, src)
