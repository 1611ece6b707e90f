"""Run report: one self-contained HTML page and one Markdown file from a run directory.

The last stage of a run: reads what the trainer left in out/<run>/ (config.yaml, metrics.jsonl,
predictions.jsonl, summary.json) and shows the config, training curves, a baseline-vs-evaluations
metrics table, baseline and final answers side by side, and throughput/hardware facts.
Anything missing or unreadable reads "not recorded"; a half-finished run still gets a report.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chattune.errors import ChattuneError

NOT_RECORDED = "not recorded"
CURVES = ["train/loss", "train/lr", "train/grad_norm", "eval/loss"]
BASELINE_TAG = "baseline"
# CJK-capable sans fonts to try, so a Chinese metric name or tag never renders as boxes.
CJK_FONTS = ["Noto Sans CJK SC", "Source Han Sans SC", "WenQuanYi Zen Hei", "Microsoft YaHei", "PingFang SC"]


def write_report(run_dir: Path, *, max_predictions: int = 50) -> tuple[Path, Path]:
    """Write `<run_dir>/report.html` and `<run_dir>/report.md` (+ PNGs in `report_files/`); return both paths.

    The HTML inlines its images and styles, so it opens offline and can be mailed as one file.
    `max_predictions` caps the side-by-side answers shown (the files keep them all).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ChattuneError(f"{run_dir}: not a run directory (expected the output folder of a training run)")
    run = _read_run(run_dir)
    sections = _build_sections(run, max_predictions)
    title = f"chattune report: {run_dir.name}"

    html_path, md_path = run_dir / "report.html", run_dir / "report.md"
    html_path.write_text(_render_html(title, sections), encoding="utf-8")
    md_path.write_text(_render_md(title, sections, run_dir / "report_files"), encoding="utf-8")
    return html_path, md_path


# ---- reading the run directory ---------------------------------------------------------------


@dataclass
class _Run:
    config_text: str | None = None
    train_rows: list[dict[str, Any]] = field(default_factory=list)
    eval_rows: list[dict[str, Any]] = field(default_factory=list)  # one per evaluation, merged
    predictions: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # what could not be read, shown at the end


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _read_jsonl(path: Path, notes: list[str]) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows, bad = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            bad += 1  # e.g. the last line of a run killed mid-write
            continue
        if isinstance(row, dict):
            rows.append(row)
        else:
            bad += 1
    if bad:
        notes.append(f"{path.name}: {bad} unreadable line(s) skipped")
    return rows


def _read_run(run_dir: Path) -> _Run:
    run = _Run()
    config = run_dir / "config.yaml"
    if config.is_file():
        # Shown as written rather than re-dumped: it is the exact file a rerun would load.
        run.config_text = config.read_text(encoding="utf-8", errors="replace")

    summary = run_dir / "summary.json"
    if summary.is_file():
        try:
            loaded = json.loads(summary.read_text(encoding="utf-8"))
            run.summary = loaded if isinstance(loaded, dict) else {}
        except json.JSONDecodeError as e:
            run.notes.append(f"summary.json: unreadable ({e})")
    run.predictions = _read_jsonl(run_dir / "predictions.jsonl", run.notes)

    # An evaluation's name by step, for metrics rows that carry no tag (runs written before tags were
    # kept in metrics.jsonl): summary.json's evaluations, else the predictions made at that step.
    evaluations = run.summary.get("evaluations")
    named = run.predictions + (evaluations if isinstance(evaluations, list) else [])
    tag_of = {r.get("step"): r["tag"] for r in named if isinstance(r, dict) and isinstance(r.get("tag"), str)}

    evals: dict[tuple[str, Any], dict[str, Any]] = {}
    for row in _read_jsonl(run_dir / "metrics.jsonl", run.notes):
        step = row.get("step") if _is_number(row.get("step")) else None
        if step is not None and any(k.startswith("train/") for k in row):
            run.train_rows.append(row)
        if "tag" in row or any(k.startswith("eval/") for k in row):
            tag = row.get("tag") if isinstance(row.get("tag"), str) else tag_of.get(step)
            tag = tag or (f"step {step}" if step is not None else "?")
            # The trainer may log eval loss and generation metrics of one evaluation as two rows.
            evals.setdefault((tag, step), {"tag": tag, "step": step}).update(row, tag=tag, step=step)
    run.eval_rows = sorted(evals.values(), key=lambda r: (r["step"] is None, r["step"] or 0))
    return run


# ---- turning the run into sections -----------------------------------------------------------


@dataclass
class _Table:
    headers: list[str]
    rows: list[list[str]]
    css: str = ""


@dataclass
class _Figure:
    key: str
    png: bytes | None
    svg: str | None = None  # an inline chart (compare.py draws them), shown instead of a PNG


@dataclass
class _Code:
    text: str


@dataclass
class _Text:
    text: str


_Block = _Table | _Figure | _Code | _Text


def _fmt(value: Any) -> str:
    if value is None:
        return NOT_RECORDED
    if isinstance(value, bool) or not _is_number(value):
        return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    if isinstance(value, int):
        return f"{value:,}"
    if not math.isfinite(value):
        return str(value)
    return f"{value:,.0f}" if abs(value) >= 1e4 else f"{value:.4g}"


def _fmt_seconds(seconds: float) -> str:
    whole = int(seconds)
    return f"{whole // 3600}h {whole % 3600 // 60:02d}m {whole % 60:02d}s ({seconds:,.1f} s)"


def _build_sections(run: _Run, max_predictions: int) -> list[tuple[str, list[_Block]]]:
    config: list[_Block] = [_Code(run.config_text) if run.config_text is not None else _Text(NOT_RECORDED)]
    kept = _kept_blocks(run)
    sections = [("Knowledge kept", kept)] if kept else []  # the result leads
    sections += [
        ("Config", config),
        ("Curves", [_Figure(key, _plot_curve(key, _curve_points(run, key))) for key in CURVES]),
        ("Metrics", _metrics_blocks(run)),
        ("Predictions", _prediction_blocks(run, max_predictions)),
        ("Run facts", [_Table(["", "value"], _facts_rows(run))]),
    ]
    if run.notes:
        sections.append(("Notes", [_Text(note) for note in run.notes]))
    return sections


def _curve_points(run: _Run, key: str) -> list[tuple[float, float]]:
    rows = run.eval_rows if key.startswith("eval/") else run.train_rows
    return [(r["step"], r[key]) for r in rows if r["step"] is not None and _is_number(r.get(key))]


def _metric_keys(run: _Run) -> list[str]:
    keys: dict[str, None] = {"eval/loss": None} if any("eval/loss" in r for r in run.eval_rows) else {}
    for row in run.eval_rows:
        keys.update((k, None) for k in row if k.startswith("eval/"))
    return list(keys)


def _metrics_blocks(run: _Run) -> list[_Block]:
    keys = _metric_keys(run)
    if not run.eval_rows:
        return [_Text(NOT_RECORDED)]
    headers = ["evaluation", "step", "epoch"] + [k.removeprefix("eval/") for k in keys]
    rows = [
        [r["tag"], _fmt(r["step"]), _fmt(r.get("epoch"))] + [_fmt(r.get(k)) for k in keys]
        for r in run.eval_rows
    ]
    base = next((r for r in run.eval_rows if r["tag"] == BASELINE_TAG), None)
    final = _last_non_baseline(run.eval_rows)
    if base is not None and final is not None:
        delta = [
            f"{final[k] - base[k]:+.4g}" if _is_number(final.get(k)) and _is_number(base.get(k)) else ""
            for k in keys
        ]
        rows.append([f"{final['tag']} − baseline", "", ""] + delta)
    return [
        _Text("Scores are 0..100 (loss is per token). One row per evaluation, by step."),
        _Table(headers, rows),
    ]


def _kept_blocks(run: _Run) -> list[_Block]:
    """Benchmark accuracy before -> after (eval.benchmarks), beside the task metrics that moved."""
    from chattune.benchmarks import knowledge_kept

    kept = knowledge_kept(run.eval_rows)
    if not kept:
        return []
    rows = [[k["key"], _fmt(k["before"]), _fmt(k["after"]), _delta(k["before"], k["after"])] for k in kept]
    base = next((r for r in run.eval_rows if r["tag"] == BASELINE_TAG), None)
    final = _last_non_baseline(run.eval_rows)
    for key in _metric_keys(run) if base and final else []:
        rows.append(
            [f"task: {key}", _fmt(base.get(key)), _fmt(final.get(key)), _delta(base.get(key), final.get(key))]
        )
    lines = [
        f"knowledge kept: {k['key']} {_fmt(k['before'])} -> {_fmt(k['after'])} ({_delta(k['before'], k['after'])})"
        for k in kept
    ]
    return [
        _Text(
            "; ".join(lines)
            + ". Benchmark accuracy is 0..100; before = baseline, after = the last evaluation."
        ),
        _Table(["", "before", "after", "change"], rows),
    ]


def _delta(before: Any, after: Any) -> str:
    return f"{after - before:+.4g}" if _is_number(before) and _is_number(after) else NOT_RECORDED


def _last_non_baseline(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    others = [r for r in rows if r["tag"] != BASELINE_TAG]
    # rows are sorted by step; max() keeps the later row on ties, which is the later evaluation.
    return max(reversed(others), key=lambda r: r["step"] or 0) if others else None


def _prediction_blocks(run: _Run, max_predictions: int) -> list[_Block]:
    by_tag: dict[str, list[dict[str, Any]]] = {}
    for row in run.predictions:
        row = {
            **row,
            "tag": str(row.get("tag") or "?"),
            "step": row.get("step") if _is_number(row.get("step")) else None,
        }
        by_tag.setdefault(row["tag"], []).append(row)
    if not by_tag:
        return [_Text(NOT_RECORDED)]
    final = _last_non_baseline([rows[0] for rows in by_tag.values()])
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
    blocks: list[_Block] = [
        _Table(["prompt", "baseline answer", final_name, "reference"], table_rows, "predictions")
    ]
    if len(pairs) > max_predictions:
        blocks.append(
            _Text(f"Showing {max_predictions} of {len(pairs)} prompts; all are in predictions.jsonl.")
        )
    return blocks


def _facts_rows(run: _Run) -> list[list[str]]:
    s = dict(run.summary)
    rows: list[list[str]] = []

    def mean(key: str) -> float | None:
        values = [r[key] for r in run.train_rows if _is_number(r.get(key))]
        return sum(values) / len(values) if values else None

    wall, train_s = s.pop("wall_s", None), s.pop("train_s", None)
    rows.append(["wall time", _fmt_seconds(wall) if _is_number(wall) else _fmt(wall)])
    if train_s is not None:
        rows.append(
            [
                "train time (optimizer steps only)",
                _fmt_seconds(train_s) if _is_number(train_s) else _fmt(train_s),
            ]
        )
    rows.append(["train tokens", _fmt(s.pop("train_tokens", None))])
    # Fall back to the per-step rows when summary.json is missing, e.g. a run that crashed.
    tps = s.pop("tokens_per_s", None)
    if tps is None and mean("train/tokens_per_s") is not None:
        tps = f"{_fmt(mean('train/tokens_per_s'))} (mean of train/tokens_per_s)"
    rows.append(["tokens/s", _fmt(tps)])
    peak = s.pop("peak_mem_gib", None)
    peaks = [r["train/peak_mem_gib"] for r in run.train_rows if _is_number(r.get("train/peak_mem_gib"))]
    rows.append(["peak memory (GiB)", _fmt(peak if peak is not None or not peaks else max(peaks))])
    if mean("train/mfu") is not None:
        rows.append(["MFU (mean of train/mfu)", _fmt(mean("train/mfu"))])
    steps = s.pop("steps", None)
    rows.append(
        [
            "optimizer steps",
            _fmt(steps if steps is not None or not run.train_rows else run.train_rows[-1]["step"]),
        ]
    )
    rows.append(["hardware", _fmt(s.pop("hardware", None))])
    for group in ("versions", "data"):
        value = s.pop(group, None)
        if isinstance(value, dict) and value:
            rows.extend([f"{group}: {k}", _fmt(v)] for k, v in value.items())
        else:
            rows.append([group, _fmt(value or None)])
    s.pop("evaluations", None)  # the Metrics table above shows them
    # Whatever else the trainer recorded, so a new summary key shows up without a code change.
    rows.extend([key, _fmt(value)] for key, value in s.items())
    return rows


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


def _png_name(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", key) + ".png"


# ---- rendering -------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,"Noto Sans CJK SC","PingFang SC","Microsoft YaHei",sans-serif;margin:24px auto;
max-width:1200px;padding:0 16px;color:#1f2328;line-height:1.45}
h1{font-size:22px}h2{font-size:18px;border-bottom:1px solid #d0d7de;padding-bottom:4px;margin-top:28px}
pre{background:#f6f8fa;padding:12px;border-radius:6px;white-space:pre-wrap;overflow-wrap:anywhere;font-size:12px}
.scroll{overflow-x:auto}table{border-collapse:collapse;font-size:13px;margin:8px 0}
th,td{border:1px solid #d0d7de;padding:4px 8px;text-align:left;vertical-align:top}th{background:#f6f8fa}
table.predictions{table-layout:fixed;width:100%}
table.predictions td{white-space:pre-wrap;overflow-wrap:anywhere}
.figures{display:grid;grid-template-columns:repeat(auto-fill,minmax(540px,1fr));gap:12px}
.figures img,.figures svg{width:100%;height:auto;border:1px solid #d0d7de}
.missing{border:1px dashed #d0d7de;padding:24px;color:#656d76;display:flex;align-items:center;
justify-content:center}
"""


def _esc(text: str) -> str:
    return html.escape(text, quote=True)


def _render_html(title: str, sections: list[tuple[str, list[_Block]]]) -> str:
    out = [f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{_esc(title)}</title>']
    out.append(f"<style>{_CSS}</style></head><body><h1>{_esc(title)}</h1>")
    for heading, blocks in sections:
        out.append(f"<h2>{_esc(heading)}</h2>")
        figures = [b for b in blocks if isinstance(b, _Figure)]
        if figures:
            out.append('<div class="figures">')
            for fig in figures:
                if fig.svg is not None:
                    out.append(fig.svg)
                elif fig.png is None:
                    out.append(f'<div class="missing">{_esc(fig.key)}: {NOT_RECORDED}</div>')
                else:
                    data = base64.b64encode(fig.png).decode("ascii")
                    out.append(f'<img alt="{_esc(fig.key)}" src="data:image/png;base64,{data}">')
            out.append("</div>")
        for block in blocks:
            if isinstance(block, _Text):
                out.append(f"<p>{_esc(block.text)}</p>")
            elif isinstance(block, _Code):
                out.append(f"<pre>{_esc(block.text)}</pre>")
            elif isinstance(block, _Table):
                css = f' class="{block.css}"' if block.css else ""
                out.append(f'<div class="scroll"><table{css}><tr>')
                out.extend(f"<th>{_esc(h)}</th>" for h in block.headers)
                out.append("</tr>")
                for row in block.rows:
                    out.append("<tr>" + "".join(f"<td>{_esc(cell)}</td>" for cell in row) + "</tr>")
                out.append("</table></div>")
    out.append("</body></html>\n")
    return "\n".join(out)


def _md_escape(text: str) -> str:
    # Markdown renders raw HTML, so user text is HTML-escaped first; then markdown's own specials.
    text = html.escape(text, quote=False)
    text = re.sub(r"([\\`*_\[\]|~#])", r"\\\1", text)
    return text.replace("\r\n", "\n").replace("\n", "<br>")


def _render_md(title: str, sections: list[tuple[str, list[_Block]]], files_dir: Path) -> str:
    out = [f"# {_md_escape(title)}", ""]
    for heading, blocks in sections:
        out += [f"## {heading}", ""]
        for block in blocks:
            if isinstance(block, _Figure):
                path = files_dir / _png_name(block.key)
                if block.svg is not None:
                    files_dir.mkdir(exist_ok=True)
                    path = path.with_suffix(".svg")
                    path.write_text(block.svg, encoding="utf-8")
                    out.append(f"![{_md_escape(block.key)}]({files_dir.name}/{path.name})")
                elif block.png is None:
                    path.unlink(missing_ok=True)  # a stale image from an earlier report would mislead
                    out.append(f"{_md_escape(block.key)}: {NOT_RECORDED}")
                else:
                    files_dir.mkdir(exist_ok=True)
                    path.write_bytes(block.png)
                    out.append(f"![{_md_escape(block.key)}]({files_dir.name}/{path.name})")
            elif isinstance(block, _Text):
                out.append(_md_escape(block.text))
            elif isinstance(block, _Code):
                # A fence longer than any backtick run inside, so the config cannot close it early.
                longest = max((len(m) for m in re.findall(r"`+", block.text)), default=0)
                fence = "`" * max(3, longest + 1)
                out += [f"{fence}yaml", block.text.rstrip("\n"), fence]
            elif isinstance(block, _Table):
                out.append("| " + " | ".join(_md_escape(h) for h in block.headers) + " |")
                out.append("|" + "---|" * len(block.headers))
                out.extend("| " + " | ".join(_md_escape(c) for c in row) + " |" for row in block.rows)
            out.append("")
    return "\n".join(out)
