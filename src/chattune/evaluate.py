"""Judge a model during and after training: eval loss, sample predictions, metrics.

The same held-out prompts are answered before training (the baseline) and after every epoch,
with batched generation through `infer.generate` — the code `chattune predict` and the server use,
so training-time samples are formatted exactly as inference will be. `run_eval` (`chattune eval`)
does the same for any model or adapter on a data file, so a base model and its fine-tune can be
compared on identical prompts, decoding and metrics.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from chattune.data import Conversation, read_conversations
from chattune.data.sources import FILE_SUFFIXES
from chattune.errors import ChattuneError, DataError
from chattune.files import check_output_path, file_sha256, publish


@dataclass
class Sample:
    messages: list[dict]  # the conversation up to (not including) the reference answer
    reference: str

    @property
    def prompt(self) -> str:
        return self.messages[-1]["content"]


def build_samples(conversations: list[Conversation], n: int) -> list[Sample]:
    """The first `n` held-out conversations, split into prompt turns and the reference answer."""
    return [Sample(c.messages[:-1], c.messages[-1]["content"]) for c in conversations[:n]]


def read_samples(path: str | Path, n: int, **read_kw) -> list[Sample]:
    """The first `n` records of `eval.samples_path` as sample prompts. Raises DataError naming the file
    (and eval.samples_path when it is missing: the reader's own hint names the training data's keys)."""
    spec = str(path)
    local = Path(spec).expanduser()
    if not spec.startswith(("hf:", "ms:", "modelscope:")) and local.suffix.lower() in FILE_SUFFIXES:
        if not local.is_file():
            raise DataError(spec, None, "file not found; check eval.samples_path")
    convs, _ = read_conversations(path, max_samples=n, **read_kw)
    return build_samples(convs, n)


def read_eval_samples(
    path: str | Path,
    *,
    limit: int | None = None,
    converter: str | None = None,
    placeholders: dict | None = None,
) -> list[Sample]:
    """Every record of a data file (the first `limit`) as a prompt and its reference answer.

    No system prompt is added here: the model's own (stored with the adapter) or `--system` applies at
    generation, exactly as in `chattune chat` and `predict`. A record without an answer is an error
    naming its line, since there would be nothing to score it against.
    """
    from chattune.data import CONVERTERS, _BadRow, read_records, to_messages

    if converter is not None and converter not in CONVERTERS:
        raise ChattuneError(f"unknown converter '{converter}': use one of {', '.join(sorted(CONVERTERS))}")
    samples: list[Sample] = []
    for line, rec in read_records(path):
        if limit is not None and len(samples) >= limit:
            break
        try:
            if isinstance(rec, _BadRow):
                raise rec
            msgs = to_messages(rec, "auto", None, converter, placeholders=placeholders)
        except _BadRow as e:
            raise DataError(
                str(path), line, f"{e} (eval scores every record against its reference: the last answer)"
            ) from None
        samples += build_samples([Conversation(msgs, f"{path}:{line}")], 1)
    if not samples:
        raise DataError(str(path), None, "no records to evaluate")
    return samples


def eval_loss(model, examples: list[dict], pad_id: int, batch_size: int) -> float:
    """Mean per-token loss over `examples`, batch by batch: no logits are kept across batches."""
    import torch

    from chattune.loss import lm_loss_sum
    from chattune.packing import collate_padded

    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            batch = collate_padded(examples[i : i + batch_size], pad_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            loss_sum, n = lm_loss_sum(model, batch)
            total += float(loss_sum)
            count += int(n)
    model.train(was_training)
    return total / max(count, 1)


def predict_samples(
    loaded, samples: list[Sample], *, max_new_tokens: int, batch_size: int, progress: bool = False
) -> list[dict]:
    """Answer every sample greedily, in batches; rows of {prompt, prediction, reference} in sample order.

    Batches group prompts of similar length (less left padding to compute); `infer.generate` sets the
    attention mask and pad id, and stops each row at the end-of-turn token or `max_new_tokens`. On a
    GPU, rows are decoded by replaying one CUDA graph per token (`decoding.greedy_decode`).
    """
    from chattune.infer import generate, progress_line

    if batch_size < 1:
        raise ChattuneError(f"batch_size must be at least 1, got {batch_size}")
    order = sorted(range(len(samples)), key=lambda i: -sum(len(m["content"]) for m in samples[i].messages))
    answers: dict[int, str] = {}
    t0 = time.monotonic()
    model = loaded.model
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            msgs = [samples[i].messages for i in chunk]
            outs = generate(loaded, msgs, max_new_tokens=max_new_tokens, temperature=0.0, cuda_graph=True)
            answers.update(zip(chunk, outs, strict=True))
            if progress:  # `chattune eval` (not the trainer's evaluations, which print their own line)
                print(f"eval: {progress_line(len(answers), len(samples), t0)}", file=sys.stderr, flush=True)
    finally:
        model.train(was_training)
    return [
        {"prompt": s.prompt, "prediction": answers[i], "reference": s.reference}
        for i, s in enumerate(samples)
    ]


def score_predictions(rows: list[dict], metric_names: list[str]) -> dict[str, float]:
    from chattune.metrics import compute_metrics

    if not rows or not metric_names:
        return {}
    preds = [r["prediction"] for r in rows]
    refs = [r["reference"] for r in rows]
    return compute_metrics(preds, refs, metric_names)


# ---- chattune eval -------------------------------------------------------------------------------------


def run_eval(
    model: str | Path,
    data: str | Path,
    *,
    output_dir: str | Path | None = None,
    samples: int | None = None,
    task: str = "generation",
    metrics: list[str] | None = None,
    max_new_tokens: int = 256,
    batch_size: int = 8,
    system_prompt: str | None = None,
    converter: str | None = None,
    device: str = "auto",
    placeholders: dict | None = None,
    trust_remote_code: bool = False,
) -> dict:
    """Answer every record of `data` with `model` (an adapter folder or a model directory), score the
    answers, print a metrics table; with `output_dir`, write predictions.jsonl and metrics.json there.

    Decoding is greedy and the prompts are rendered by the model's own chat template with its stored
    system prompt (or `system_prompt`), so two models evaluated on one file differ only in their
    weights. Returns what metrics.json holds.
    """
    from chattune.loading import load_for_inference, read_model_source
    from chattune.metrics import resolve_metrics
    from chattune.templates import template_default_system

    # Everything the user typed is checked before the (slow) model load.
    names = resolve_metrics(task, metrics)
    if samples is not None and samples < 1:
        raise ChattuneError(f"--samples must be at least 1, got {samples}")
    if batch_size < 1:
        raise ChattuneError(f"--batch-size must be at least 1, got {batch_size}")
    if max_new_tokens < 1:
        raise ChattuneError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if output_dir is not None:
        check_output_path(output_dir, "--output", directory=True)
    eval_set = read_eval_samples(data, limit=samples, converter=converter, placeholders=placeholders)
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
    print(format_metrics_table(result))
    if output_dir is not None:
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        preds = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        _write_atomic(out / "predictions.jsonl", preds)
        # metrics.json last: its presence means the folder is complete.
        _write_atomic(out / "metrics.json", json.dumps(result, ensure_ascii=False, indent=2) + "\n")
        print(f"wrote {out / 'predictions.jsonl'} and {out / 'metrics.json'}")
    return result


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


def _write_atomic(path: Path, text: str) -> None:
    # A temp file in the same folder, then rename: a reader never sees half a file, even after a crash.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        publish(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
