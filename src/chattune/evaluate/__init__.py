"""Judging a model: eval loss, sample answers and metrics (`judge`, `metrics`), and the `eval` command."""

from __future__ import annotations

from chattune import lazy_exports

# Public entry points, imported on first use: importing one stage never loads another's libraries.
_EXPORTS = {
    "eval_loss": "chattune.evaluate.judge",
    "predict_samples": "chattune.evaluate.judge",
    "score_predictions": "chattune.evaluate.judge",
    "build_samples": "chattune.evaluate.judge",
    "read_samples": "chattune.evaluate.judge",
    "compute_metrics": "chattune.evaluate.metrics",
    "resolve_metrics": "chattune.evaluate.metrics",
    "default_metrics": "chattune.evaluate.metrics",
    "run_eval": "chattune.evaluate.command",
}
__all__ = list(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
