"""What every tracker backend shows the same way: the sample answers as rows and text, the config flattened.

Pure functions on plain data; the backends (`swanlab_run`, `tensorboard_run`, `mlflow_run`, `wandb_run`,
`trackio_run`) turn these into each tracker's own table or text type.
"""

from __future__ import annotations

import html
import json
from typing import Any

PREDICTION_KEY = "Prediction"
"""Media key of the sample predictions in every tracker (the tutorials' name in SwanLab)."""
SAMPLE_COLUMNS = ["step", "tag", "prompt", "prediction", "reference"]
"""Columns of the sample-answer tables (MLflow, W&B, Trackio), one row per sample."""


def format_prediction(row: dict) -> str:
    """One sample in the tutorials' shape: question, model answer, reference answer."""
    parts = [f"问题：{row.get('prompt', '')}", f"模型回答：{row.get('prediction', '')}"]
    if row.get("reference") is not None:
        parts.append(f"参考答案：{row['reference']}")
    return "\n\n".join(parts)


def sample_table(rows: list[dict], step: int, tag: str) -> list[list[Any]]:
    """Rows of {prompt, prediction, reference} -> table rows in `SAMPLE_COLUMNS` order."""
    return [[step, tag, r.get("prompt"), r.get("prediction"), r.get("reference")] for r in rows]


def flatten_config(tree: dict, prefix: str = "") -> dict[str, str | int | float | bool | None]:
    """{"train": {"lr": 1e-4}} -> {"train.lr": 1e-4}; lists become JSON text (trackers with flat
    parameters, MLflow, take strings)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten_config(value, f"{name}."))
        elif isinstance(value, (list, dict)):
            flat[name] = json.dumps(value, ensure_ascii=False, default=str)
        else:
            flat[name] = value
    return flat


def markdown_table(rows: list[dict], title: str) -> str:
    """Predictions as a markdown table for TensorBoard's text tab (which renders markdown, not raw HTML)."""
    lines = [f"**{_cell(title)}**", "", "| prompt | prediction | reference |", "| --- | --- | --- |"]
    for row in rows:
        lines.append(
            "| " + " | ".join(_cell(row.get(k)) for k in ("prompt", "prediction", "reference")) + " |"
        )
    return "\n".join(lines)


def _cell(value: Any) -> str:
    # A newline or `|` would end the table row; `<` would be read as a tag and stripped by TensorBoard.
    text = "" if value is None else str(value)
    return html.escape(text, quote=False).replace("|", "\\|").replace("\r\n", "\n").replace("\n", "<br>")
