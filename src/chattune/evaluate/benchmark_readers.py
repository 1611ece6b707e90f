"""Multiple-choice benchmarks read from disk, in each benchmark's own published layout.

    ceval   PATH/{val,dev,test}/<subject>_<split>.csv   header id,question,A,B,C,D,answer[,explanation]
    cmmlu   PATH/{test,dev}/<subject>.csv               header ,Question,A,B,C,D,Answer (1st column: row no.)
    mmlu    PATH/{dev,val,test}/<subject>_<split>.csv   no header: question,A,B,C,D,answer
    mcq     FILE.jsonl of {"question", "choices": [...], "answer": "B" or 1, "subject"?, "category"?}

PATH may also be the folder above a `data/` folder holding these (MMLU's tarball, CMMLU's repository).
-> `Benchmark(subjects=[Subject(questions, shots)])`, where shots are the first k dev questions of the
subject. A file not in its layout raises DataError(file, line, what was expected). No torch here.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import string
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path

from chattune.errors import ChattuneError, DataError

LETTERS = string.ascii_uppercase
TASKS = ("ceval", "cmmlu", "mmlu", "mcq")


@dataclass(frozen=True)
class Question:
    question: str
    choices: tuple[str, ...]  # choice i is answered by the letter LETTERS[i]
    answer: int  # index into choices
    where: str  # "file:line", for messages and predictions.jsonl

    @property
    def answer_letter(self) -> str:
        return LETTERS[self.answer]


@dataclass(frozen=True)
class Subject:
    name: str  # as in the file name: "high_school_physics"
    title: str  # as the prompt names it: "高中物理", "high school physics"
    categories: tuple[str, ...]  # the benchmark's own grouping (CMMLU puts some subjects in two)
    questions: tuple[Question, ...]
    shots: tuple[Question, ...]  # the k-shot examples, in dev-file order


@dataclass(frozen=True)
class Benchmark:
    task: str
    lang: str  # "zh" or "en": the wording of the prompt (`benchmarks.PROMPTS`)
    split: str
    path: str
    shots: int
    subjects: tuple[Subject, ...]

    @property
    def n_questions(self) -> int:
        return sum(len(s.questions) for s in self.subjects)


@dataclass(frozen=True)
class _Layout:
    title: str
    splits: tuple[str, ...]
    default_split: str
    dev_split: str
    pattern: str  # file name of a subject's split
    header: tuple[str, ...] | None  # required header (None: the file has none)
    optional: tuple[str, ...]  # columns that may follow the required ones
    lang: str
    unlabelled: dict[str, str]  # split -> why it cannot be scored


LAYOUTS = {
    "ceval": _Layout(
        "C-Eval",
        ("val", "dev", "test"),
        "val",
        "dev",
        "{subject}_{split}.csv",
        ("id", "question", "A", "B", "C", "D", "answer"),
        ("explanation",),
        "zh",
        {
            "test": "C-Eval's test split has no answers (they are kept for cevalbenchmark.com's "
            "leaderboard); score the val split (--split val)"
        },
    ),
    "cmmlu": _Layout(
        "CMMLU",
        ("test", "dev"),
        "test",
        "dev",
        "{subject}.csv",
        ("", "Question", "A", "B", "C", "D", "Answer"),
        (),
        "zh",
        {},
    ),
    "mmlu": _Layout(
        "MMLU",
        ("dev", "val", "test"),
        "test",
        "dev",
        "{subject}_{split}.csv",
        None,
        (),
        "en",
        {},
    ),
}


@cache
def subject_table(task: str) -> dict[str, dict]:
    """Subject -> {name, categories} as the benchmark's authors publish it (assets/benchmarks/subjects.json,
    whose `_source` says where each table comes from); {} for `mcq`."""
    path = resources.files("chattune") / "assets" / "benchmarks" / "subjects.json"
    return json.loads(path.read_text(encoding="utf-8")).get(task, {})


# ---- one file --------------------------------------------------------------------------------------


def decode_text(path: Path) -> str:
    """A data file's text: UTF-8, with Excel's UTF-8 byte-order mark dropped (else the first header
    reads "\\ufeffid"). Raises DataError naming the line of the first undecodable byte, and saying so
    when the file is GBK/GB18030 (what Excel on Chinese Windows saves)."""
    raw = path.read_bytes()
    if raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8) :]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        hint = "save it as UTF-8"
        try:
            raw.decode("gb18030")
            hint = (
                "it reads as GBK/GB18030 (what Excel on Chinese Windows saves); convert it to UTF-8, "
                f"e.g. iconv -f GB18030 -t UTF-8 '{path}' > fixed.csv"
            )
        except UnicodeDecodeError:
            pass
        raise DataError(str(path), line, f"not UTF-8 (byte 0x{raw[e.start]:02x}); {hint}") from None


def _csv_rows(path: Path) -> list[tuple[int, list[str]]]:
    """(first line of the record, fields) for every non-blank record; quoted fields may span lines."""
    reader = csv.reader(io.StringIO(decode_text(path), newline=""))
    rows, line = [], 1
    try:
        for fields in reader:
            if any(f.strip() for f in fields):
                rows.append((line, fields))
            line = reader.line_num + 1
    except csv.Error as e:
        raise DataError(str(path), reader.line_num, f"not a readable CSV record ({e})") from None
    return rows


def _question(path: Path, line: int, text: str, choices: list[str], answer: str) -> Question:
    where = f"{path}:{line}"
    if not text.strip():
        raise DataError(str(path), line, "the question is empty")
    letters = list(LETTERS[: len(choices)])
    if answer.strip() not in letters:
        raise DataError(
            str(path), line, f"answer {answer!r} is not one of the choices' letters {', '.join(letters)}"
        )
    return Question(text, tuple(choices), letters.index(answer.strip()), where)


def read_csv_questions(path: Path, task: str) -> list[Question]:
    """The questions of one C-Eval / CMMLU / MMLU csv file. Raises DataError(file, line, expected)."""
    lay = LAYOUTS[task]
    rows = _csv_rows(path)
    if lay.header is not None:
        if not rows:
            raise DataError(str(path), None, f"empty file; expected the header {','.join(lay.header)}")
        line, header = rows[0]
        if tuple(header[: len(lay.header)]) != lay.header or any(
            h not in lay.optional for h in header[len(lay.header) :]
        ):
            extra = "".join(f"[,{o}]" for o in lay.optional)
            raise DataError(
                str(path),
                line,
                f"header is {','.join(header)}; expected {','.join(lay.header)}{extra} ({lay.title}'s layout)",
            )
        rows, width, first = rows[1:], len(header), 1  # question at column 1 (after id / row number)
    else:
        width, first = 6, 0
    if not rows:
        raise DataError(str(path), None, "no questions (an empty subject); remove the file or fill it")
    out = []
    for line, fields in rows:
        if len(fields) != width:
            cols = ",".join(lay.header + lay.optional[: width - len(lay.header)]) if lay.header else ""
            shape = f" ({cols})" if cols else " (question,A,B,C,D,answer; MMLU's files have no header)"
            raise DataError(str(path), line, f"{len(fields)} fields, expected {width}{shape}")
        q, choices, answer = fields[first], fields[first + 1 : first + 5], fields[first + 5]
        if lay.header is None and line == 1 and answer.strip().lower() == "answer":
            raise DataError(str(path), line, "this looks like a header row; MMLU's files have none")
        out.append(_question(path, line, q, choices, answer))
    return out


def read_mcq_file(path: Path) -> list[tuple[str, str | None, Question]]:
    """(subject, category, question) for every line of a `mcq` JSONL file: {"question": str,
    "choices": [2..26 str], "answer": a letter ("B") or a 0-based index (1), "subject"?, "category"?}.
    Raises DataError naming the line and the field."""
    if not path.is_file():
        raise DataError(str(path), None, "file not found (mcq reads a .jsonl file)")
    out = []
    for line, text in enumerate(decode_text(path).splitlines(), 1):
        if not text.strip():
            continue
        try:
            rec = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(str(path), line, f"not JSON ({e.msg}); expected one object per line") from None
        if not isinstance(rec, dict):
            raise DataError(str(path), line, 'expected an object {"question", "choices", "answer"}')
        missing = [k for k in ("question", "choices", "answer") if k not in rec]
        if missing:
            raise DataError(
                str(path), line, f"missing {', '.join(missing)}; expected question, choices, answer"
            )
        q, choices, answer = rec["question"], rec["choices"], rec["answer"]
        if not isinstance(q, str):
            raise DataError(str(path), line, "question must be a string")
        if not (
            isinstance(choices, list)
            and 2 <= len(choices) <= len(LETTERS)
            and all(isinstance(c, str) for c in choices)
        ):
            raise DataError(str(path), line, f"choices must be a list of 2 to {len(LETTERS)} strings")
        if isinstance(answer, int) and not isinstance(answer, bool):
            if not 0 <= answer < len(choices):
                raise DataError(
                    str(path), line, f"answer {answer} is not a choice index (0..{len(choices) - 1})"
                )
            answer = LETTERS[answer]
        elif not isinstance(answer, str):
            raise DataError(str(path), line, 'answer must be a letter ("B") or a 0-based index (1)')
        subject, category = rec.get("subject", path.stem), rec.get("category")
        if not isinstance(subject, str) or not subject or not isinstance(category, str | None):
            raise DataError(str(path), line, "subject and category must be non-empty strings")
        out.append((subject, category, _question(path, line, q, choices, answer)))
    if not out:
        raise DataError(str(path), None, "no questions")
    return out


# ---- a whole benchmark -----------------------------------------------------------------------------


def _root(path: Path, task: str, split: str) -> Path:
    lay = LAYOUTS[task]
    for root in (path, path / "data"):
        if (root / split).is_dir():
            return root
    example = lay.pattern.format(subject="<subject>", split=split)
    raise DataError(
        str(path),
        None,
        f"not in {lay.title}'s layout: expected the folder {path}/{split}/ holding {example} "
        f"(and {lay.dev_split}/ for few-shot examples); see the README's Benchmarks section for where "
        "to download the files",
    )


def _files(folder: Path, task: str, split: str) -> dict[str, Path]:
    pattern = LAYOUTS[task].pattern
    prefix, suffix = pattern.split("{subject}")
    suffix = suffix.format(split=split)
    return {
        p.name[len(prefix) : len(p.name) - len(suffix)]: p
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name.endswith(suffix) and len(p.name) > len(suffix)
    }


def _pick_subjects(available: list[str], wanted: list[str] | None, where: str) -> list[str]:
    if not wanted:
        return available
    unknown = [s for s in wanted if s not in available]
    if unknown:
        shown = ", ".join(available[:20]) + (", ..." if len(available) > 20 else "")
        raise ChattuneError(f"{where}: no subject {', '.join(unknown)} (found: {shown})")
    return list(dict.fromkeys(wanted))


def _shots(pool: list[Question], k: int, subject: str, where: str) -> tuple[Question, ...]:
    if len(pool) < k:
        raise ChattuneError(f"{where}: {len(pool)} dev example(s) for '{subject}', fewer than --shots {k}")
    return tuple(pool[:k])


def read_benchmark(
    task: str,
    data: str | Path,
    *,
    split: str | None = None,
    subjects: list[str] | None = None,
    shots: int = 0,
    max_questions: int | None = None,
    dev: str | Path | None = None,
) -> Benchmark:
    """Read a benchmark's questions and its k-shot examples from disk.

    `split`: the scored split (default: C-Eval val, CMMLU test, MMLU test); `subjects`: file stems to
    keep (default: every file of the split); `max_questions`: the first N questions of each subject;
    `dev`: for `mcq`, the JSONL file the shots come from (same subject when it has one). Raises DataError
    for a file not in its layout (file, line, what was expected), ChattuneError for bad arguments.
    """
    if task not in TASKS:
        raise ChattuneError(f"unknown benchmark task '{task}': use one of {', '.join(TASKS)}")
    if shots < 0:
        raise ChattuneError(f"--shots must be 0 or more, got {shots}")
    if max_questions is not None and max_questions < 1:
        raise ChattuneError(f"--max-questions must be at least 1, got {max_questions}")
    path = Path(data).expanduser()
    if task == "mcq":
        return _read_mcq(path, subjects, shots, max_questions, dev)
    lay = LAYOUTS[task]
    split = split or lay.default_split
    if split not in lay.splits:
        raise ChattuneError(f"{lay.title} has the splits {', '.join(lay.splits)}; got --split {split}")
    if split in lay.unlabelled:
        raise ChattuneError(lay.unlabelled[split])
    if dev is not None:
        raise ChattuneError(f"--dev is for mcq; {lay.title}'s shots come from its {lay.dev_split}/ folder")
    root = _root(path, task, split)
    found = _files(root / split, task, split)
    if not found:
        example = lay.pattern.format(subject="<subject>", split=split)
        raise DataError(str(root / split), None, f"no {example} files ({lay.title}'s layout)")
    table = subject_table(task)
    out = []
    for name in _pick_subjects(list(found), subjects, str(root / split)):
        pool: list[Question] = []
        if shots:
            dev_file = root / lay.dev_split / lay.pattern.format(subject=name, split=lay.dev_split)
            if not dev_file.is_file():
                raise DataError(str(dev_file), None, f"not found: --shots {shots} takes its examples from it")
            pool = read_csv_questions(dev_file, task)
        questions = read_csv_questions(found[name], task)[:max_questions]
        info = table.get(name, {})
        out.append(
            Subject(
                name=name,
                title=info.get("name", name.replace("_", " ")),
                categories=tuple(info.get("categories", ["uncategorised"])),
                questions=tuple(questions),
                shots=_shots(pool, shots, name, str(root / lay.dev_split)),
            )
        )
    return Benchmark(task, lay.lang, split, str(path), shots, tuple(out))


def _read_mcq(
    path: Path, subjects: list[str] | None, shots: int, max_questions: int | None, dev: str | Path | None
) -> Benchmark:
    rows = read_mcq_file(path)
    by_subject: dict[str, list[Question]] = {}
    category: dict[str, str | None] = {}
    for subject, cat, q in rows:
        by_subject.setdefault(subject, []).append(q)
        category.setdefault(subject, cat)
    pools: dict[str, list[Question]] = {}
    if shots:
        if dev is None:
            raise ChattuneError(f"mcq takes its {shots}-shot examples from a dev file: pass --dev FILE.jsonl")
        for subject, _, q in read_mcq_file(Path(dev).expanduser()):
            pools.setdefault(subject, []).append(q)
    every_dev = [q for pool in pools.values() for q in pool]
    out = []
    for name in _pick_subjects(list(by_subject), subjects, str(path)):
        pool = pools.get(name, every_dev)  # a dev file without this subject: its first questions
        out.append(
            Subject(
                name=name,
                title=name.replace("_", " "),
                categories=(category[name],) if category[name] else (),
                questions=tuple(by_subject[name][:max_questions]),
                shots=_shots(pool, shots, name, str(dev)),
            )
        )
    # The prompt's wording follows the questions' script: Chinese when any has CJK characters.
    text = "".join(q.question for s in out for q in s.questions)
    lang = "zh" if any("\u4e00" <= ch <= "\u9fff" for ch in text) else "en"
    return Benchmark("mcq", lang, "all", str(path), shots, tuple(out))
