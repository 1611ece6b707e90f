"""Compare runs: one self-contained HTML page (and Markdown) that puts several run directories side by side.

Reads each run as `report.py` does (metrics.jsonl, predictions.jsonl, summary.json, config.yaml) and shows
the metrics per run, the loss curves overlaid (inline SVG, by step and by tokens seen), the same prompts'
answers in one row, and the run facts. Runs trained or evaluated on different data or prompts are flagged
at the top. `chattune sweep` writes this page for its variants; `chattune compare` for any runs.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from chattune.config.load import flatten_keys
from chattune.errors import ChattuneError
from chattune.report.blocks import (
    Block,
    Figure,
    Table,
    Text,
    fmt_entry,
    fmt_seconds,
    fmt_value,
    render_html,
    render_md,
)
from chattune.report.charts import PALETTE, svg_chart
from chattune.report.reader import (
    BASELINE_TAG,
    NOT_RECORDED,
    RunRecord,
    check_run_dir,
    is_number,
    last_non_baseline,
    param_counts,
    read_run,
)

# Keys that differ between any two runs by construction, not settings worth listing.
_IGNORED_KEYS = {"train.output_dir", "track.experiment", "sweep.vary", "sweep.name", "train.progress"}


_CURVES = [  # (key, x axis)
    ("train/loss", "step"),
    ("train/loss", "tokens"),
    ("eval/loss", "step"),
    ("eval/loss", "tokens"),
    ("train/lr", "step"),
]


@dataclass
class _Compared:
    """One run as the page needs it: report.py's reading plus its label, colour, config and facts."""

    label: str
    color: str
    run_dir: Path
    run: RunRecord
    config: dict[str, Any]  # flattened `section.key` -> value, from config.yaml
    tokens_per_step: float | None  # mean real tokens of one optimizer step (summary.json)
    finished: bool


def write_compare(
    run_dirs: list[Path], output_dir: Path, *, title: str | None = None, max_prompts: int = 50
) -> tuple[Path, Path]:
    """Write `<output_dir>/compare.html` and `compare.md` (+ SVGs in `compare_files/`); return both paths.

    Each run dir is a training run's output folder, finished or not (a crashed run shows what it
    logged). Raises ChattuneError when a path is not a directory or holds nothing a run writes.
    """
    runs = [_load(Path(d), i) for i, d in enumerate(run_dirs)]
    if not runs:
        raise ChattuneError("compare: give at least one run directory")
    _label_runs(runs, [Path(d) for d in run_dirs])
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    title = title or "chattune compare: " + ", ".join(r.label for r in runs)
    sections = [
        ("Runs", [Text(_overview(runs)), *[Text(flag) for flag in compare_flags(runs)]]),
        ("Metrics", _metric_blocks(runs)),
        ("Curves", _curve_blocks(runs)),
        ("Answers side by side", _answer_blocks(runs, max_prompts)),
        ("Run facts", [Table(["", *[r.label for r in runs]], _facts_rows(runs))]),
    ]
    notes = [f"{r.label}: {note}" for r in runs for note in r.run.notes]
    if notes:
        sections.append(("Notes", [Text(n) for n in notes]))
    sections = [(h, b) for h, b in sections if b]
    html_path, md_path = output_dir / "compare.html", output_dir / "compare.md"
    html_path.write_text(render_html(title, sections), encoding="utf-8")
    md_path.write_text(render_md(title, sections, output_dir / "compare_files"), encoding="utf-8")
    return html_path, md_path


# ---- reading ------------------------------------------------------------------------------------


def _load(run_dir: Path, index: int) -> _Compared:
    check_run_dir(run_dir)
    run = read_run(run_dir)
    config: dict[str, Any] = {}
    if run.config_text is not None:
        try:
            tree = yaml.safe_load(run.config_text)
            config = flatten_keys(tree) if isinstance(tree, dict) else {}
        except yaml.YAMLError as e:
            run.notes.append(f"config.yaml: unreadable ({e})")
    tokens, steps = run.summary.get("train_tokens"), run.summary.get("steps")
    per_step = tokens / steps if is_number(tokens) and is_number(steps) and steps > 0 else None
    finished = (run_dir / "summary.json").is_file() and (run_dir / "adapter").is_dir()
    return _Compared(run_dir.name, PALETTE[index % len(PALETTE)], run_dir, run, config, per_step, finished)


def _label_runs(runs: list[_Compared], dirs: list[Path]) -> None:
    """Run dir names, made unique with their parent folder (two `.../run` dirs) and then a number."""
    names = [d.name for d in dirs]
    labels = [f"{d.resolve().parent.name}/{d.name}" if names.count(d.name) > 1 else d.name for d in dirs]
    for i, label in enumerate(labels):
        if labels.count(label) > 1:
            labels[i] = f"{label} #{i + 1}"
    for run, label in zip(runs, labels, strict=True):
        run.label = label


# ---- what differs between the runs ------------------------------------------------------------


def compare_flags(runs: list[_Compared]) -> list[str]:
    """One sentence per way the runs are not like for like: training data, eval data, sample prompts,
    unfinished runs. Empty when they compare cleanly."""
    flags = []
    checks = [
        ("training data", _train_data_id),
        ("evaluation data", _eval_data_id),
        ("sample prompts", lambda r: sorted({str(p.get("prompt")) for p in r.run.predictions}) or None),
    ]
    for what, identity in checks:
        groups: dict[str, list[str]] = {}
        for r in runs:
            groups.setdefault(json.dumps(identity(r), sort_keys=True, default=str), []).append(r.label)
        if len(groups) > 1:
            parts = "; ".join(", ".join(labels) for labels in groups.values())
            flags.append(
                f"⚠ Different {what}: the runs fall into {len(groups)} groups ({parts}). "
                f"Their {'losses and metrics' if what != 'sample prompts' else 'answers'} are not like for like."
            )
    unfinished = [r.label for r in runs if not r.finished]
    if unfinished:
        flags.append(
            f"⚠ Not finished (no adapter or summary.json): {', '.join(unfinished)}; they show what they logged."
        )
    return flags


def _train_data_id(r: _Compared) -> Any:
    data = r.run.summary.get("data") if isinstance(r.run.summary.get("data"), dict) else {}
    sources = [s.get("fingerprint") for s in data.get("sources") or [] if isinstance(s, dict)]
    # Without a recorded hash (a crashed run), the path stands in for the content.
    content = sources or data.get("train_sha256") or r.config.get("data.train_path")
    chosen = {k: r.config.get(k) for k in ("data.max_samples", "data.train_samples", "data.dedup")}
    return [content, chosen]


def _eval_data_id(r: _Compared) -> Any:
    data = r.run.summary.get("data") if isinstance(r.run.summary.get("data"), dict) else {}
    if r.config.get("data.eval_path"):
        eval_read = data.get("eval_read") if isinstance(data.get("eval_read"), dict) else {}
        sources = [s.get("fingerprint") for s in eval_read.get("sources") or [] if isinstance(s, dict)]
        return ["file", sources or r.config.get("data.eval_path"), r.config.get("eval.max_eval_examples")]
    # Split off the training data: the same data, ratio and seed give the same split.
    return [
        "split",
        _train_data_id(r),
        r.config.get("data.eval_ratio"),
        r.config.get("train.seed"),
        r.config.get("eval.max_eval_examples"),
    ]


def _overview(runs: list[_Compared]) -> str:
    keys = differing_keys(runs)
    varied = "; ".join(f"{k} ({', '.join(fmt_entry(r.config, k) for r in runs)})" for k in keys[:6])
    more = f" and {len(keys) - 6} more settings" if len(keys) > 6 else ""
    names = ", ".join(r.label for r in runs)
    return f"{len(runs)} runs: {names}. " + (f"They differ in {varied}{more}." if keys else "Same settings.")


def differing_keys(runs: list[_Compared]) -> list[str]:
    """Config keys whose value is not the same in every run (what a sweep varied), in config order."""
    keys: dict[str, None] = {}
    for r in runs:
        keys.update(dict.fromkeys(r.config))
    return [
        k
        for k in keys
        if k not in _IGNORED_KEYS
        and len({json.dumps(r.config.get(k, "∅"), sort_keys=True, default=str) for r in runs}) > 1
    ]


# ---- metrics ------------------------------------------------------------------------------------


def _tag_order(tag: str) -> tuple[int, float, str]:
    if tag == BASELINE_TAG:
        return (0, 0.0, tag)
    m = re.fullmatch(r"(epoch|step) (\d+(?:\.\d+)?)", tag)
    return (1 if m and m.group(1) == "epoch" else 2, float(m.group(2)) if m else math.inf, tag)


def _kept_table(runs: list[_Compared]) -> Table | None:
    """One row per run and benchmark: before, after, change (eval.benchmarks); None when no run has one."""
    from chattune.evaluate.benchmarks import knowledge_kept

    rows = []
    for r in runs:
        for k in knowledge_kept(r.run.eval_rows):
            b, a = k["before"], k["after"]
            change = f"{a - b:+.4g}" if is_number(a) and is_number(b) else ""
            rows.append([r.label, k["key"], fmt_value(b), fmt_value(a), change])
    return Table(["run", "benchmark", "before", "after", "change"], rows) if rows else None


def _metric_blocks(runs: list[_Compared]) -> list[Block]:
    keys: dict[str, None] = {}
    tags: dict[str, None] = {}
    for r in runs:
        for row in r.run.eval_rows:
            tags[row["tag"]] = None
            keys.update((k, None) for k in row if k.startswith("eval/") and is_number(row[k]))
    kept = _kept_table(runs)
    if not keys and kept is None:
        return [Text(NOT_RECORDED)]
    ordered = sorted(tags, key=_tag_order)

    def delta(r: _Compared, key: str) -> str:
        base = next((row.get(key) for row in r.run.eval_rows if row["tag"] == BASELINE_TAG), None)
        final_row = last_non_baseline(r.run.eval_rows)
        final = final_row.get(key) if final_row else None
        return f"{final - base:+.4g}" if is_number(final) and is_number(base) else ""

    blocks: list[Block] = []
    if "eval/loss" in keys:  # the one number every run has: one row per run, one column per evaluation
        rows = []
        for r in runs:
            by_tag = {row["tag"]: row for row in r.run.eval_rows}
            rows.append(
                [
                    r.label,
                    *[fmt_value(by_tag.get(t, {}).get("eval/loss")) for t in ordered],
                    delta(r, "eval/loss"),
                ]
            )
        blocks += [
            Text("Eval loss (per token, held-out split) at each evaluation; baseline = before training."),
            Table(["eval loss", *ordered, "final − baseline"], rows),
        ]
    if kept is not None:
        blocks += [Text("Knowledge kept: benchmark accuracy (0..100) before training and after."), kept]
    scores = [k for k in keys if k != "eval/loss"]
    if scores:  # each run's evaluations stacked, then its change: the metrics as columns
        rows = []
        for r in runs:
            for row in sorted(r.run.eval_rows, key=lambda row: _tag_order(row["tag"])):
                rows.append([r.label, row["tag"], *[fmt_value(row.get(k)) for k in scores]])
            rows.append([r.label, "final − baseline", *[delta(r, k) for k in scores]])
        headers = ["run", "evaluation", *[k.removeprefix("eval/") for k in scores]]
        blocks += [Text("Scores of the sample answers (0..100):"), Table(headers, rows)]
    return blocks


# ---- curves (inline SVG) ------------------------------------------------------------------------


def _points(r: _Compared, key: str, x_axis: str) -> list[tuple[float, float]]:
    rows = r.run.eval_rows if key.startswith("eval/") else r.run.train_rows
    points = []
    for row in rows:
        step, value = row.get("step"), row.get(key)
        if not (is_number(step) and is_number(value) and math.isfinite(value)):
            continue
        if x_axis == "tokens" and r.tokens_per_step is None:
            continue
        x = step * r.tokens_per_step if x_axis == "tokens" else step
        points.append((float(x), float(value)))
    return points


def _curve_blocks(runs: list[_Compared]) -> list[Block]:
    blocks: list[Block] = []
    for key, x_axis in _CURVES:
        series = [(r.label, r.color, _points(r, key, x_axis)) for r in runs]
        name = f"{key} by {'tokens seen' if x_axis == 'tokens' else 'step'}"
        if not any(points for _, _, points in series):
            continue  # e.g. no eval loss was computed in any run
        blocks.append(
            Figure(name, None, svg_chart(name, "tokens seen" if x_axis == "tokens" else "step", series))
        )
    if not blocks:
        return [Text(NOT_RECORDED)]
    blocks.append(
        Text(
            "Tokens seen = optimizer step × the run's mean real (non-padding) tokens per step from summary.json; "
            "a run without summary.json has no tokens-seen curve."
        )
    )
    return blocks


# ---- answers side by side -------------------------------------------------------------------------


def _answers(r: _Compared, tag: str | None) -> dict[tuple[str, int], dict[str, Any]]:
    """The run's answers of evaluation `tag`, keyed by (prompt, occurrence) so repeats pair up in order."""
    out: dict[tuple[str, int], dict[str, Any]] = {}
    seen: dict[str, int] = {}
    for row in r.run.predictions:
        if str(row.get("tag") or "?") != tag:
            continue
        prompt = str(row.get("prompt", ""))
        seen[prompt] = seen.get(prompt, -1) + 1
        out[(prompt, seen[prompt])] = row
    return out


def _final_tag(r: _Compared) -> str | None:
    """The tag of the run's last evaluation with answers (e.g. `epoch 2`), as report.py picks it."""
    steps: dict[str, float | None] = {}
    for row in r.run.predictions:
        steps.setdefault(str(row.get("tag") or "?"), row["step"] if is_number(row.get("step")) else None)
    rows = sorted(
        ({"tag": t, "step": s} for t, s in steps.items()), key=lambda t: (t["step"] is None, t["step"] or 0)
    )
    final = last_non_baseline(rows)
    return final["tag"] if final else None


def _answer_blocks(runs: list[_Compared], max_prompts: int) -> list[Block]:
    finals = [_answers(r, _final_tag(r)) for r in runs]
    bases = [_answers(r, BASELINE_TAG) for r in runs]
    keys: dict[tuple[str, int], None] = {}
    for answers in finals + bases:
        keys.update(dict.fromkeys(answers))
    if not keys:
        return [Text(NOT_RECORDED)]
    shown = list(keys)[:max_prompts]

    def text(answers: dict, key: tuple[str, int], field: str = "prediction") -> str:
        row = answers.get(key)
        return NOT_RECORDED if row is None or row.get(field) is None else str(row[field])

    def reference(key: tuple[str, int]) -> str:
        return next((text(a, key, "reference") for a in finals + bases if key in a), NOT_RECORDED)

    # One base model (a rank or lr sweep) answers the same before training: one baseline column.
    same_base = all(
        {k: text(b, k) for k in shown} == {k: text(bases[0], k) for k in shown} for b in bases[1:]
    ) and any(bases)
    headers = ["prompt", "reference"]
    headers += ["baseline (every run)"] if same_base else []
    headers += [f"{r.label} ({_final_tag(r) or 'final'})" for r in runs]
    rows = []
    for key in shown:
        row = [key[0], reference(key)] + ([text(bases[0], key)] if same_base else [])
        rows.append(row + [text(a, key) for a in finals])
    blocks: list[Block] = [Table(headers, rows, "predictions")]
    if not same_base and any(bases):
        headers = ["prompt", *[f"{r.label} (baseline)" for r in runs]]
        base_rows = [[key[0], *[text(b, key) for b in bases]] for key in shown]
        blocks += [
            Text("Before training (each run's base model):"),
            Table(headers, base_rows, "predictions"),
        ]
    if len(keys) > max_prompts:
        blocks.append(
            Text(f"Showing {max_prompts} of {len(keys)} prompts; all are in each predictions.jsonl.")
        )
    return blocks


# ---- run facts ------------------------------------------------------------------------------------


def _facts_rows(runs: list[_Compared]) -> list[list[str]]:
    def mean(r: _Compared, key: str) -> float | None:
        values = [row[key] for row in r.run.train_rows if is_number(row.get(key))]
        return sum(values) / len(values) if values else None

    def seconds(value: Any) -> str:
        return fmt_seconds(value) if is_number(value) else fmt_value(value)

    def data_hash(r: _Compared) -> str:
        data = r.run.summary.get("data") if isinstance(r.run.summary.get("data"), dict) else {}
        prints = [s.get("fingerprint") for s in data.get("sources") or [] if isinstance(s, dict)]
        prints = [p for p in prints if p] or ([data["train_sha256"]] if data.get("train_sha256") else [])
        return ", ".join(str(p)[:12] for p in prints) if prints else NOT_RECORDED

    def peak_mem(r: _Compared) -> float | None:  # a crashed run has no summary: its log lines' largest
        peaks = [
            row["train/peak_mem_gib"] for row in r.run.train_rows if is_number(row.get("train/peak_mem_gib"))
        ]
        return r.run.summary.get("peak_mem_gib", max(peaks, default=None))

    params = [param_counts(r.run_dir) for r in runs]
    rows = [
        ["status", *["finished" if r.finished else "not finished" for r in runs]],
        ["model", *[fmt_entry(r.config, "model.name_or_path") for r in runs]],
        ["base model parameters", *[fmt_value(total) for _, total in params]],
        ["trainable (LoRA) parameters", *[fmt_value(trainable) for trainable, _ in params]],
    ]
    # What the runs differ in (a sweep's varied keys), next to what it cost.
    rows += [
        [k, *[fmt_entry(r.config, k) for r in runs]]
        for k in differing_keys(runs)
        if k != "model.name_or_path"
    ]
    rows += [
        [
            "tokens/s",
            *[fmt_value(r.run.summary.get("tokens_per_s", mean(r, "train/tokens_per_s"))) for r in runs],
        ],
        ["MFU (mean of train/mfu)", *[fmt_value(mean(r, "train/mfu")) for r in runs]],
        ["peak memory (GiB)", *[fmt_value(peak_mem(r)) for r in runs]],
        ["wall time", *[seconds(r.run.summary.get("wall_s")) for r in runs]],
        ["train time (optimizer steps only)", *[seconds(r.run.summary.get("train_s")) for r in runs]],
        ["train tokens", *[fmt_value(r.run.summary.get("train_tokens")) for r in runs]],
        ["optimizer steps", *[fmt_value(r.run.summary.get("steps")) for r in runs]],
        ["hardware", *[fmt_value(r.run.summary.get("hardware")) for r in runs]],
        ["data (sha256 / fingerprint)", *[data_hash(r) for r in runs]],
    ]
    return rows
