"""Judge a model during and after training: eval loss, sample predictions, metrics.

The same held-out prompts are answered before training (the baseline) and after every epoch,
with batched generation through `infer.generate` — the code `chattune predict` and the server use,
so training-time samples are formatted exactly as inference will be. `run_eval` (`chattune eval`)
does the same for any model or adapter on a data file, so a base model and its fine-tune can be
compared on identical prompts, decoding and metrics.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from chattune.data import Conversation, read_conversations
from chattune.data.sources import FILE_SUFFIXES
from chattune.errors import ChattuneError, DataError


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
    columns=None,
) -> list[Sample]:
    """Every record of a data file (the first `limit`) as a prompt and its reference answer.
    `columns`: a `ColumnsConfig` naming the user's columns (`eval --columns`), as `data.columns` does.

    No system prompt is added here: the model's own (stored with the adapter) or `--system` applies at
    generation, exactly as in `chattune chat` and `predict`. A record without an answer is an error
    naming its line, since there would be nothing to score it against.
    """
    from chattune.data import CONVERTERS, BadRow, read_records, to_messages

    if converter is not None and converter not in CONVERTERS:
        raise ChattuneError(f"unknown converter '{converter}': use one of {', '.join(sorted(CONVERTERS))}")
    samples: list[Sample] = []
    for line, rec in read_records(path):
        if limit is not None and len(samples) >= limit:
            break
        try:
            if isinstance(rec, BadRow):
                raise rec
            msgs = to_messages(rec, "auto", None, converter, columns=columns, placeholders=placeholders)
        except BadRow as e:
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

    from chattune.model.loss import lm_loss_sum
    from chattune.render.packing import collate_padded

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
    from chattune.console import ProgressLines
    from chattune.infer.generation import generate

    if batch_size < 1:
        raise ChattuneError(f"batch_size must be at least 1, got {batch_size}")
    order = sorted(range(len(samples)), key=lambda i: -sum(len(m["content"]) for m in samples[i].messages))
    answers: dict[int, str] = {}
    bar = ProgressLines(len(samples), "eval", enabled=progress)  # `chattune eval`; the trainer says its own
    model = loaded.model
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            msgs = [samples[i].messages for i in chunk]
            outs = generate(loaded, msgs, max_new_tokens=max_new_tokens, temperature=0.0, cuda_graph=True)
            answers.update(zip(chunk, outs, strict=True))
            bar.update(len(chunk))
        bar.close()
    finally:
        model.train(was_training)
    return [
        {"prompt": s.prompt, "prediction": answers[i], "reference": s.reference}
        for i, s in enumerate(samples)
    ]


def score_predictions(rows: list[dict], metric_names: list[str]) -> dict[str, float]:
    from chattune.evaluate.metrics import compute_metrics

    if not rows or not metric_names:
        return {}
    preds = [r["prediction"] for r in rows]
    refs = [r["reference"] for r in rows]
    return compute_metrics(preds, refs, metric_names)
