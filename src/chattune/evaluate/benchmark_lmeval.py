"""`chattune bench --backend lm-eval`: the same questions and prompts, scored by lm-evaluation-harness.

A cross-check of `benchmarks.score_letters`, not another prompt: each subject becomes an lm-eval task
YAML over a local JSONL (`dataset_path: json`, `data_files`; no hub) whose documents hold the prompt
rendered by the model's chat template, the letters as choices and the answer's index, scored with
`output_type: multiple_choice` by lm-eval's own `HFLM.loglikelihood` on the loaded model. lm-eval moves
the prompt's trailing newline into every continuation, which adds the same log p("\\n") to each letter:
the predicted letter, hence the accuracy, is the same as chattune's own. Letter scoring only (with
`choice` scoring that shared term would be divided by each choice's length). Needs `pip install lm-eval`.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from chattune.errors import ChattuneError
from chattune.evaluate.benchmark_readers import LETTERS, Benchmark


def score_with_lm_eval(loaded, bench: Benchmark, *, batch_size: int = 8) -> tuple[dict, list]:
    """(summary, rows) as `benchmarks.score_benchmark` returns them, computed by lm-evaluation-harness.

    Raises ChattuneError when lm-eval is not installed."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ChattuneError("--backend lm-eval needs lm-evaluation-harness: pip install lm-eval") from None
    from chattune.evaluate.benchmarks import build_prompt_text, summarize

    if loaded.adapter_name is not None:
        loaded.model.set_adapter(loaded.adapter_name)
    with tempfile.TemporaryDirectory(prefix="chattune-lm-eval-") as tmp:
        names = []
        for k, subject in enumerate(bench.subjects):
            docs = Path(tmp) / f"{k}.jsonl"
            with open(docs, "w", encoding="utf-8") as f:
                for q in subject.questions:
                    doc = {
                        "prompt": build_prompt_text(loaded, subject, q, bench.lang, "letter"),
                        "choices": list(LETTERS[: len(q.choices)]),
                        "gold": q.answer,
                        "where": q.where,
                    }
                    f.write(json.dumps(doc, ensure_ascii=False) + "\n")
            name = f"chattune_bench_{k}"
            task = {
                "task": name,
                "dataset_path": "json",
                "dataset_kwargs": {"data_files": {"test": str(docs)}},
                "test_split": "test",
                "output_type": "multiple_choice",
                "doc_to_text": "prompt",
                "doc_to_choice": "choices",
                "doc_to_target": "gold",
                "target_delimiter": "",
                "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
            }
            (Path(tmp) / f"{name}.yaml").write_text(json.dumps(task), encoding="utf-8")  # JSON is YAML
            names.append(name)
        lm = HFLM(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=batch_size)
        out = lm_eval.simple_evaluate(
            model=lm,
            tasks=names,
            task_manager=TaskManager(include_path=tmp),
            num_fewshot=0,  # the k shots are already turns of the rendered prompt
            log_samples=True,
        )
    rows = []
    for k, subject in enumerate(bench.subjects):
        samples = sorted(out["samples"][f"chattune_bench_{k}"], key=lambda s: s["doc_id"])
        for s in samples:
            lls = [float(r[0]) for r in s["filtered_resps"]]
            pred = max(range(len(lls)), key=lls.__getitem__)
            gold = s["doc"]["gold"]
            rows.append(
                {
                    "subject": subject.name,
                    "where": s["doc"]["where"],
                    "answer": LETTERS[gold],
                    "prediction": LETTERS[pred],
                    "correct": pred == gold,
                    "scores": {LETTERS[i]: round(v, 4) for i, v in enumerate(lls)},
                }
            )
    summary = summarize(bench, rows)
    summary.update(scoring="letter", backend="lm-eval")
    return summary, rows
