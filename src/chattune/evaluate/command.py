"""`chattune eval MODEL_OR_ADAPTER --data FILE`: eval loss, answers and metrics for a base model or an adapter,
written to predictions and metrics files (the same judging `train` runs after every epoch, `evaluate.judge`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from chattune.errors import ChattuneError
from chattune.evaluate.judge import predict_samples, read_eval_samples, score_predictions
from chattune.files import check_output_path, file_sha256, write_text_atomic

# ---- chattune eval -------------------------------------------------------------------------------------


def run_eval(
    model: str | Path,
    data: str | Path,
    *,
    output_dir: str | Path | None = None,
    samples: int | None = None,
    task: str = "generation",
    metrics: list[str] | None = None,
    max_new_tokens: int | None = None,
    batch_size: int = 8,
    system_prompt: str | None = None,
    converter: str | None = None,
    device: str = "auto",
    placeholders: dict | None = None,
    trust_remote_code: bool = False,
    columns: list[str] | None = None,
) -> dict:
    """Answer every record of `data` with `model` (an adapter folder or a model directory), score the
    answers, print a metrics table; with `output_dir`, write predictions.jsonl and metrics.json there.

    Decoding is greedy and the prompts are rendered by the model's own chat template with its stored
    system prompt (or `system_prompt`), so two models evaluated on one file differ only in their
    weights. `columns`: `field=column` items (`prompt=question`), the keys `data.columns` takes.
    `max_new_tokens` None: 256 for generation; for classification the longest reference label
    in tokens plus 8 (a label is a few tokens: decoding 256 per headline took minutes for nothing).
    Returns what metrics.json holds.
    """
    from chattune.evaluate.metrics import resolve_metrics
    from chattune.infer.load import load_for_inference, read_model_source
    from chattune.render.template import template_default_system

    # Everything the user typed is checked before the (slow) model load.
    names = resolve_metrics(task, metrics)
    if samples is not None and samples < 1:
        raise ChattuneError(f"--samples must be at least 1, got {samples}")
    if batch_size < 1:
        raise ChattuneError(f"--batch-size must be at least 1, got {batch_size}")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise ChattuneError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if output_dir is not None:
        check_output_path(output_dir, "--output", directory=True)
    mapped = _read_columns(columns) if columns else None
    eval_set = read_eval_samples(
        data, limit=samples, converter=converter, placeholders=placeholders, columns=mapped
    )
    if converter != "identity" and any(
        "{{name}}" in s.reference or "{{author}}" in s.reference for s in eval_set
    ):
        raise ChattuneError(
            f"{data}: reference answers still say {{{{name}}}} / {{{{author}}}} (LLaMA-Factory's identity "
            "placeholders), so they would be scored as written; pass --converter identity --identity-name N "
            "--identity-author A"
        )
    src = read_model_source(model, trust_remote_code=True)  # names only: the load below warns and decides

    loaded = load_for_inference(model, device=device, trust_remote_code=trust_remote_code)
    if system_prompt is not None:
        loaded.system_prompt = system_prompt
    if max_new_tokens is None:
        max_new_tokens = _default_max_new_tokens(task, eval_set, loaded.tokenizer)
    t0 = time.time()
    rows = predict_samples(
        loaded, eval_set, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=True
    )
    gen_s = time.time() - t0
    scores = score_predictions(rows, names)

    result = {
        "model": str(model),
        "name": loaded.name,
        "base_model": src.base_model,
        "adapter": str(src.adapter_dir) if src.adapter_dir is not None else None,
        "data": str(data),
        # Two evaluations are on the same data when this matches (null for a directory or hub dataset).
        "data_sha256": file_sha256(data) if Path(data).is_file() else None,
        "examples": len(rows),
        "task": task,
        "metrics": scores,
        "generation": {"decoding": "greedy", "max_new_tokens": max_new_tokens, "batch_size": batch_size},
        "system_prompt": loaded.system_prompt,
        "template_default_system": template_default_system(loaded.tokenizer),
        "generation_s": round(gen_s, 3),
    }
    if output_dir is not None:
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        preds = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        write_text_atomic(out / "predictions.jsonl", preds)
        # metrics.json last: its presence means the folder is complete.
        write_text_atomic(out / "metrics.json", json.dumps(result, ensure_ascii=False, indent=2) + "\n")
    return result


def _read_columns(items: list[str]):
    """`["prompt=question", "response=answer"]` -> the ColumnsConfig that `data.columns` would give."""
    from chattune.config.load import config_from_dict

    pairs = [item.partition("=") for item in items]
    bad = [item for item, (k, eq, v) in zip(items, pairs, strict=True) if not (k and eq and v)]
    if bad:
        raise ChattuneError(f"--columns {bad[0]!r}: give field=column, e.g. --columns prompt=question")
    return config_from_dict({"data": {"columns": {k: v for k, _, v in pairs}}}, "--columns").data.columns


def _default_max_new_tokens(task: str, eval_set: list, tokenizer) -> int:
    """Task-aware answer budget (tokens): a class label is short, a generated answer is not."""
    if task != "classification" or not eval_set:
        return 256
    longest = max(len(tokenizer(s.reference, add_special_tokens=False)["input_ids"]) for s in eval_set)
    return min(256, longest + 8)


def format_metrics_table(result: dict) -> str:
    """The metrics of one `run_eval` as an aligned text table (scores 0..100)."""
    system = result["system_prompt"]
    default = result.get("template_default_system")
    shown = json.dumps(system, ensure_ascii=False) if system is not None else "none"
    if system is None and default:
        shown = f"none set; the template's default {json.dumps(default, ensure_ascii=False)}"
    lines = [
        f"eval of {result['name']} on {result['data']}: {result['examples']} examples, task {result['task']}, "
        f"greedy, at most {result['generation']['max_new_tokens']} new tokens, "
        f"system prompt {shown}",
    ]
    width = max([len("metric"), *(len(k) for k in result["metrics"])])
    lines.append(f"  {'metric':<{width}}  {'score':>7}")
    lines += [f"  {k:<{width}}  {v:>7.2f}" for k, v in result["metrics"].items()]
    return "\n".join(lines)
