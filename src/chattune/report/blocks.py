"""Page blocks (tables, figures, code, text) and their two renderings: one self-contained HTML page (inline
CSS, images embedded, text escaped) and Markdown with the figures beside it. Used by every page.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chattune.report.reader import NOT_RECORDED, is_number

# CJK-capable sans fonts to try, so a Chinese metric name or tag never renders as boxes.
CJK_FONTS = ["Noto Sans CJK SC", "Source Han Sans SC", "WenQuanYi Zen Hei", "Microsoft YaHei", "PingFang SC"]


# ---- turning the run into sections -----------------------------------------------------------


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]
    css: str = ""


@dataclass
class Figure:
    key: str
    png: bytes | None
    svg: str | None = None  # an inline chart (compare.py draws them), shown instead of a PNG


@dataclass
class Code:
    text: str
    folded: str | None = None  # HTML: shown folded under this summary line (the resolved config)


@dataclass
class Text:
    text: str


Block = Table | Figure | Code | Text


def fmt_value(value: Any) -> str:
    if value is None:
        return NOT_RECORDED
    if isinstance(value, bool) or not is_number(value):
        return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    if isinstance(value, int):
        return f"{value:,}"
    if not math.isfinite(value):
        return str(value)
    return f"{value:,.0f}" if abs(value) >= 1e4 else f"{value:.4g}"


NOT_SET = "not set"


def fmt_entry(mapping: dict, key: str) -> str:
    """`mapping[key]` for a page: "not recorded" when the run never wrote the key, "not set" when it wrote
    null (the user left it unset), else `fmt_value`."""
    if key not in mapping:
        return NOT_RECORDED
    return NOT_SET if mapping[key] is None else fmt_value(mapping[key])


def fmt_seconds(seconds: float) -> str:
    whole = int(seconds)
    return f"{whole // 3600}h {whole % 3600 // 60:02d}m {whole % 60:02d}s ({seconds:,.1f} s)"


# ---- rendering -------------------------------------------------------------------------------

CSS = """
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
summary{cursor:pointer;color:#0969da}.result td:first-child{font-weight:600}
"""


def esc(text: str) -> str:
    return html.escape(text, quote=True)


def render_html(title: str, sections: list[tuple[str, list[Block]]]) -> str:
    out = [f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{esc(title)}</title>']
    out.append(f"<style>{CSS}</style></head><body><h1>{esc(title)}</h1>")
    for heading, blocks in sections:
        out.append(f"<h2>{esc(heading)}</h2>")
        figures = [b for b in blocks if isinstance(b, Figure)]
        if figures:
            out.append('<div class="figures">')
            for fig in figures:
                if fig.svg is not None:
                    out.append(fig.svg)
                elif fig.png is None:
                    out.append(f'<div class="missing">{esc(fig.key)}: {NOT_RECORDED}</div>')
                else:
                    data = base64.b64encode(fig.png).decode("ascii")
                    out.append(f'<img alt="{esc(fig.key)}" src="data:image/png;base64,{data}">')
            out.append("</div>")
        for block in blocks:
            if isinstance(block, Text):
                out.append(f"<p>{esc(block.text)}</p>")
            elif isinstance(block, Code) and block.folded:
                out.append(
                    f"<details><summary>{esc(block.folded)}</summary><pre>{esc(block.text)}</pre></details>"
                )
            elif isinstance(block, Code):
                out.append(f"<pre>{esc(block.text)}</pre>")
            elif isinstance(block, Table):
                css = f' class="{block.css}"' if block.css else ""
                out.append(f'<div class="scroll"><table{css}><tr>')
                out.extend(f"<th>{esc(h)}</th>" for h in block.headers)
                out.append("</tr>")
                for row in block.rows:
                    out.append("<tr>" + "".join(f"<td>{esc(cell)}</td>" for cell in row) + "</tr>")
                out.append("</table></div>")
    out.append("</body></html>\n")
    return "\n".join(out)


def md_escape(text: str) -> str:
    # Markdown renders raw HTML, so user text is HTML-escaped first; then markdown's own specials.
    text = html.escape(text, quote=False)
    text = re.sub(r"([\\`*_\[\]|~#])", r"\\\1", text)
    return text.replace("\r\n", "\n").replace("\n", "<br>")


def render_md(title: str, sections: list[tuple[str, list[Block]]], files_dir: Path) -> str:
    out = [f"# {md_escape(title)}", ""]
    for heading, blocks in sections:
        out += [f"## {heading}", ""]
        for block in blocks:
            if isinstance(block, Figure):
                path = files_dir / png_name(block.key)
                if block.svg is not None:
                    files_dir.mkdir(exist_ok=True)
                    path = path.with_suffix(".svg")
                    path.write_text(block.svg, encoding="utf-8")
                    out.append(f"![{md_escape(block.key)}]({files_dir.name}/{path.name})")
                elif block.png is None:
                    path.unlink(missing_ok=True)  # a stale image from an earlier report would mislead
                    out.append(f"{md_escape(block.key)}: {NOT_RECORDED}")
                else:
                    files_dir.mkdir(exist_ok=True)
                    path.write_bytes(block.png)
                    out.append(f"![{md_escape(block.key)}]({files_dir.name}/{path.name})")
            elif isinstance(block, Text):
                out.append(md_escape(block.text))
            elif isinstance(block, Code):
                # A fence longer than any backtick run inside, so the config cannot close it early.
                longest = max((len(m) for m in re.findall(r"`+", block.text)), default=0)
                fence = "`" * max(3, longest + 1)
                out += [f"{fence}yaml", block.text.rstrip("\n"), fence]
            elif isinstance(block, Table):
                out.append("| " + " | ".join(md_escape(h) for h in block.headers) + " |")
                out.append("|" + "---|" * len(block.headers))
                out.extend("| " + " | ".join(md_escape(c) for c in row) + " |" for row in block.rows)
            out.append("")
    return "\n".join(out)


def png_name(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", key) + ".png"
