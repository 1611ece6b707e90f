"""`chattune bench MODEL_OR_ADAPTER --task ceval|cmmlu|mmlu|mcq --data PATH`: multiple-choice accuracy of a
base model or an adapter on a benchmark read from disk (`benchmark_readers`), scored by `benchmarks` (or by
lm-evaluation-harness, `benchmark_lmeval`), written to predictions.jsonl and metrics.json.
"""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

from chattune.errors import ChattuneError
from chattune.evaluate.benchmark_readers import read_benchmark
from chattune.evaluate.benchmarks import SCORINGS, score_benchmark


def _model_path(model: str) -> str:
    """A folder as given; `builtin:...`, a .gguf file or a hub id resolved to its model directory."""
    p = Path(model).expanduser()
    if p.is_dir():
        return str(p)
    from chattune.model.resolve import resolve_model_dir

    return str(resolve_model_dir(str(model)))


def run_bench(
    model: str,
    task: str,
    data: str,
    *,
    split: str | None = None,
    subjects: list[str] | None = None,
    shots: int = 0,
    max_questions: int | None = None,
    dev: str | None = None,
    scoring: str = "letter",
    backend: str = "chattune",
    batch_size: int = 8,
    output_dir: str | None = None,
    device: str = "auto",
    system_prompt: str | None = None,
    trust_remote_code: bool = False,
) -> dict:
    """Score `model` (adapter folder, model directory, .gguf, builtin id) on a benchmark read from disk
    (`format_bench_table` shows the result); with `output_dir`, write predictions.jsonl and metrics.json there (metrics
    last: its presence means the folder is complete). Returns what metrics.json holds."""
    from chattune.files import check_output_path, write_text_atomic
    from chattune.infer.load import load_for_inference

    if batch_size < 1:
        raise ChattuneError(f"--batch-size must be at least 1, got {batch_size}")
    if scoring not in SCORINGS:
        raise ChattuneError(f"--scoring {scoring}: use one of {', '.join(SCORINGS)}")
    if backend not in ("chattune", "lm-eval"):
        raise ChattuneError(f"--backend {backend}: use chattune or lm-eval")
    if backend == "lm-eval" and scoring != "letter":
        raise ChattuneError(
            "--backend lm-eval scores letters only; drop --scoring choice or use --backend chattune"
        )
    if backend == "lm-eval" and importlib.util.find_spec("lm_eval") is None:  # said before the model loads
        raise ChattuneError("--backend lm-eval needs lm-evaluation-harness: pip install 'chattune[lm-eval]'")
    if output_dir is not None:
        check_output_path(output_dir, "--output", directory=True)
    # The files are read (and any mistake in them reported) before the slow model load.
    bench = read_benchmark(
        task, data, split=split, subjects=subjects, shots=shots, max_questions=max_questions, dev=dev
    )
    loaded = load_for_inference(_model_path(model), device=device, trust_remote_code=trust_remote_code)
    if not Path(model).expanduser().is_dir():  # builtin:..., a .gguf file: named as the user wrote it
        loaded.name = str(model)
    if system_prompt is not None:
        loaded.system_prompt = system_prompt
    t0 = time.time()
    if backend == "lm-eval":
        from chattune.evaluate.benchmark_lmeval import score_with_lm_eval

        summary, rows = score_with_lm_eval(loaded, bench, batch_size=batch_size)
    else:
        summary, rows = score_benchmark(loaded, bench, batch_size=batch_size, scoring=scoring)
    result = {
        "model": str(model),
        "name": loaded.name,
        "system_prompt": loaded.system_prompt,
        **summary,
        "seconds": round(time.time() - t0, 3),
    }
    if output_dir is not None:
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        preds = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        write_text_atomic(out / "predictions.jsonl", preds)
        # metrics.json last: its presence means the folder is complete.
        write_text_atomic(out / "metrics.json", json.dumps(result, ensure_ascii=False, indent=2) + "\n")
    return result
