"""Run report: one self-contained HTML page and one Markdown file from a run directory.

The last stage of a run: reads what the trainer left in out/<run>/ (config.yaml, metrics.jsonl,
predictions.jsonl, summary.json) and shows the config, training curves, a baseline-vs-evaluations
metrics table, baseline and final answers side by side, and throughput/hardware facts.
Anything missing or unreadable reads "not recorded"; a half-finished run still gets a report.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from chattune.report.blocks import (
    CJK_FONTS,
    NOT_SET,
    Block,
    Code,
    Figure,
    Table,
    Text,
    fmt_entry,
    fmt_seconds,
    fmt_value,
    render_html,
    render_md,
)
from chattune.report.reader import (
    BASELINE_TAG,
    NOT_RECORDED,
    RunRecord,
    check_run_dir,
    is_number,
    last_non_baseline,
    read_run,
)

CURVES = ["train/loss", "train/lr", "train/grad_norm", "eval/loss"]


def write_report(run_dir: Path, *, max_predictions: int = 50) -> tuple[Path, Path]:
    """Write `<run_dir>/report.html` and `<run_dir>/report.md` (+ PNGs in `report_files/`); return both paths.

    The HTML inlines its images and styles, so it opens offline and can be mailed as one file.
    `max_predictions` caps the side-by-side answers shown (the files keep them all).
    """
    run_dir = Path(run_dir)
    check_run_dir(run_dir)
    run = read_run(run_dir)
    sections = _build_sections(run, max_predictions)
    title = f"chattune report: {run_dir.name}"

    html_path, md_path = run_dir / "report.html", run_dir / "report.md"
    html_path.write_text(render_html(title, sections), encoding="utf-8")
    md_path.write_text(render_md(title, sections, run_dir / "report_files"), encoding="utf-8")
    return html_path, md_path


def _build_sections(run: RunRecord, max_predictions: int) -> list[tuple[str, list[Block]]]:
    """The result first (what moved, time, cost), then the answers, curves and every evaluation; the run's
    facts as a table; the resolved config last, folded."""
    config: list[Block] = [
        Code(run.config_text, folded=f"resolved config ({len(run.config_text.splitlines())} lines)")
        if run.config_text is not None
        else Text(NOT_RECORDED)
    ]
    kept = _kept_blocks(run)
    sections = [("Result", _result_blocks(run))]  # the result leads
    sections += [("Knowledge kept", kept)] if kept else []
    sections += [
        ("Predictions", _prediction_blocks(run, max_predictions)),
        ("Curves", [Figure(key, _plot_curve(key, _curve_points(run, key))) for key in CURVES]),
        ("Metrics", _metrics_blocks(run)),
        ("Run facts", [Table(["", "value"], _facts_rows(run))]),
    ]
    if run.notes:
        sections.append(("Notes", [Text(note) for note in run.notes]))
    sections.append(("Config", config))
    return sections


def _kept_blocks(run: RunRecord) -> list[Block]:
    """Benchmark accuracy before -> after (eval.benchmarks), beside the task metrics that moved."""
    from chattune.evaluate.benchmarks import knowledge_kept

    kept = knowledge_kept(run.eval_rows)
    if not kept:
        return []
    rows = [
        [k["key"], fmt_value(k["before"]), fmt_value(k["after"]), _delta(k["before"], k["after"])]
        for k in kept
    ]
    base = next((r for r in run.eval_rows if r["tag"] == BASELINE_TAG), None)
    final = last_non_baseline(run.eval_rows)
    for key in _metric_keys(run) if base and final else []:
        b, a = base.get(key), final.get(key)
        rows.append([f"task: {key}", fmt_value(b), fmt_value(a), _delta(b, a)])
    said = [
        f"knowledge kept: {k['key']} {fmt_value(k['before'])} -> {fmt_value(k['after'])} "
        f"({_delta(k['before'], k['after'])})"
        for k in kept
    ]
    return [
        Text(
            "; ".join(said)
            + ". Benchmark accuracy is 0..100; before = baseline, after = the last evaluation."
        ),
        Table(["", "before", "after", "change"], rows),
    ]


def _delta(before: Any, after: Any) -> str:
    return f"{after - before:+.4g}" if is_number(before) and is_number(after) else NOT_RECORDED


def _result_blocks(run: RunRecord) -> list[Block]:
    """Each metric from the baseline to the final evaluation, then time, tokens/s and memory."""
    base = next((r for r in run.eval_rows if r["tag"] == BASELINE_TAG), None)
    final = last_non_baseline(run.eval_rows)
    rows: list[list[str]] = []
    if base is not None and final is not None:
        for key in _metric_keys(run):
            if is_number(base.get(key)) and is_number(final.get(key)):
                change = f"{final[key] - base[key]:+.4g}"
                rows.append([key, fmt_value(base[key]), fmt_value(final[key]), change])
    blocks: list[Block] = []
    if rows:
        headers = ["metric", "baseline", f"{final['tag']} (final)" if final else "final", "change"]
        blocks.append(Table(headers, rows, "result"))
    else:
        blocks.append(Text(f"No baseline and final evaluation to compare: {NOT_RECORDED}."))
    s = run.summary
    wall = s.get("wall_s")
    cost = [
        ["wall time", fmt_seconds(wall) if is_number(wall) else fmt_entry(s, "wall_s")],
        ["optimizer steps", fmt_entry(s, "steps")],
        ["tokens/s", fmt_entry(s, "tokens_per_s")],
        ["peak memory (GiB)", fmt_entry(s, "peak_mem_gib")],
        ["hardware", fmt_entry(s, "hardware")],
    ]
    blocks.append(Table(["", "value"], cost, "result"))
    return blocks


def _curve_points(run: RunRecord, key: str) -> list[tuple[float, float]]:
    rows = run.eval_rows if key.startswith("eval/") else run.train_rows
    return [(r["step"], r[key]) for r in rows if r["step"] is not None and is_number(r.get(key))]


def _metric_keys(run: RunRecord) -> list[str]:
    keys: dict[str, None] = {"eval/loss": None} if any("eval/loss" in r for r in run.eval_rows) else {}
    for row in run.eval_rows:
        keys.update((k, None) for k in row if k.startswith("eval/"))
    return list(keys)


def _metrics_blocks(run: RunRecord) -> list[Block]:
    keys = _metric_keys(run)
    if not run.eval_rows:
        return [Text(NOT_RECORDED)]
    headers = ["evaluation", "step", "epoch"] + [k.removeprefix("eval/") for k in keys]
    rows = [
        [r["tag"], fmt_value(r["step"]), fmt_value(r.get("epoch"))] + [fmt_value(r.get(k)) for k in keys]
        for r in run.eval_rows
    ]
    base = next((r for r in run.eval_rows if r["tag"] == BASELINE_TAG), None)
    final = last_non_baseline(run.eval_rows)
    if base is not None and final is not None:
        delta = [
            f"{final[k] - base[k]:+.4g}" if is_number(final.get(k)) and is_number(base.get(k)) else ""
            for k in keys
        ]
        rows.append([f"{final['tag']} − baseline", "", ""] + delta)
    return [
        Text("Scores are 0..100 (loss is per token). One row per evaluation, by step."),
        Table(headers, rows),
    ]


def _prediction_blocks(run: RunRecord, max_predictions: int) -> list[Block]:
    by_tag: dict[str, list[dict[str, Any]]] = {}
    for row in run.predictions:
        row = {
            **row,
            "tag": str(row.get("tag") or "?"),
            "step": row.get("step") if is_number(row.get("step")) else None,
        }
        by_tag.setdefault(row["tag"], []).append(row)
    if not by_tag:
        return [Text(NOT_RECORDED)]
    final = last_non_baseline([rows[0] for rows in by_tag.values()])
    base_rows = by_tag.get(BASELINE_TAG, [])
    final_rows = by_tag[final["tag"]] if final else []

    # Pair answers by prompt (and occurrence, for repeated prompts), not by position, in case the
    # two evaluations wrote their rows in different orders.
    pairs: dict[tuple[str, int], list[dict[str, Any] | None]] = {}
    for slot, rows in enumerate([base_rows, final_rows]):
        seen: dict[str, int] = {}
        for row in rows:
            prompt = str(row.get("prompt", ""))
            seen[prompt] = seen.get(prompt, -1) + 1
            pairs.setdefault((prompt, seen[prompt]), [None, None])[slot] = row

    def text(row: dict[str, Any] | None, key: str) -> str:
        return NOT_RECORDED if row is None or key not in row else str(row[key])

    table_rows = []
    for (prompt, _), (base, fin) in list(pairs.items())[:max_predictions]:
        reference = text(fin, "reference") if fin is not None else text(base, "reference")
        table_rows.append([prompt, text(base, "prediction"), text(fin, "prediction"), reference])
    final_name = f"final answer ({final['tag']})" if final else "final answer"
    blocks: list[Block] = [
        Table(["prompt", "baseline answer", final_name, "reference"], table_rows, "predictions")
    ]
    if len(pairs) > max_predictions:
        blocks.append(
            Text(f"Showing {max_predictions} of {len(pairs)} prompts; all are in predictions.jsonl.")
        )
    return blocks


def _facts_rows(run: RunRecord) -> list[list[str]]:
    s = dict(run.summary)
    rows: list[list[str]] = []

    def mean(key: str) -> float | None:
        values = [r[key] for r in run.train_rows if is_number(r.get(key))]
        return sum(values) / len(values) if values else None

    wall, train_s = s.pop("wall_s", None), s.pop("train_s", None)
    rows.append(["wall time", fmt_seconds(wall) if is_number(wall) else fmt_value(wall)])
    if train_s is not None:
        rows.append(
            [
                "train time (optimizer steps only)",
                fmt_seconds(train_s) if is_number(train_s) else fmt_value(train_s),
            ]
        )
    rows.append(["train tokens", fmt_value(s.pop("train_tokens", None))])
    # Fall back to the per-step rows when summary.json is missing, e.g. a run that crashed.
    tps = s.pop("tokens_per_s", None)
    if tps is None and mean("train/tokens_per_s") is not None:
        tps = f"{fmt_value(mean('train/tokens_per_s'))} (mean of train/tokens_per_s)"
    rows.append(["tokens/s", fmt_value(tps)])
    peak = s.pop("peak_mem_gib", None)
    peaks = [r["train/peak_mem_gib"] for r in run.train_rows if is_number(r.get("train/peak_mem_gib"))]
    rows.append(["peak memory (GiB)", fmt_value(peak if peak is not None or not peaks else max(peaks))])
    if mean("train/mfu") is not None:
        rows.append(["MFU (mean of train/mfu)", fmt_value(mean("train/mfu"))])
    steps = s.pop("steps", None)
    rows.append(
        [
            "optimizer steps",
            fmt_value(steps if steps is not None or not run.train_rows else run.train_rows[-1]["step"]),
        ]
    )
    rows.append(["hardware", fmt_value(s.pop("hardware", None))])
    s.pop("evaluations", None)  # the Metrics table above shows them
    # Then everything else the trainer recorded (a new summary key shows up without a code change),
    # nested records one row per leaf instead of raw JSON.
    for key, value in s.items():
        rows.extend(_leaf_rows(key, value))
    return rows


def _leaf_rows(name: str, value: Any) -> list[list[str]]:
    """`data: {train: {examples: 9}}` -> [["data › train › examples", "9"]]; null reads "not set"."""
    if isinstance(value, dict) and value:
        return [row for k, v in value.items() for row in _leaf_rows(f"{name} › {k}", v)]
    if isinstance(value, list) and value and all(not isinstance(v, (dict, list)) for v in value):
        return [[name, ", ".join(NOT_SET if v is None else fmt_value(v) for v in value)]]
    if isinstance(value, list) and value:
        return [row for i, v in enumerate(value) for row in _leaf_rows(f"{name} [{i}]", v)]
    return [[name, NOT_SET if value is None else fmt_value(value)]]


# ---- plots -----------------------------------------------------------------------------------


def _plot_curve(key: str, points: list[tuple[float, float]]) -> bytes | None:
    if not points:
        return None
    # Figure + Agg canvas directly, not pyplot: no global backend switch, no figure registry to leak.
    from matplotlib import font_manager, rc_context
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    installed = {f.name for f in font_manager.fontManager.ttflist}
    fonts = [f for f in CJK_FONTS if f in installed] + ["DejaVu Sans"]
    with rc_context({"font.family": "sans-serif", "font.sans-serif": fonts, "axes.unicode_minus": False}):
        fig = Figure(figsize=(6, 3.2), dpi=100, layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        steps, values = zip(*points, strict=True)
        ax.plot(steps, values, marker="o" if len(points) <= 30 else None, markersize=3, linewidth=1.2)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
        if max(steps) - min(steps) < 2:
            # One or two points: matplotlib would zoom to +-0.05 and tick fractional steps.
            ax.set_xlim(min(steps) - 1, max(steps) + 1)
        ax.grid(alpha=0.3)
        if key == "train/lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        buf = io.BytesIO()
        # No metadata: the same run gives byte-identical images.
        fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()
