"""Pages from run directories: the run report (`run_report`), the compare page (`compare`), their shared
reader and blocks, and inline SVG charts.
"""

from __future__ import annotations

from chattune import lazy_exports

# Public entry points, imported on first use: importing one stage never loads another's libraries.
_EXPORTS = {
    "write_report": "chattune.report.run_report",
    "write_compare": "chattune.report.compare",
    "RunRecord": "chattune.report.reader",
    "read_run": "chattune.report.reader",
    "render_html": "chattune.report.blocks",
    "render_md": "chattune.report.blocks",
    "esc": "chattune.report.blocks",
    "svg_chart": "chattune.report.charts",
}
__all__ = list(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
