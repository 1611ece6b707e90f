"""Judge a model during and after training: eval loss, sample predictions, metrics.

The same held-out prompts are answered before training (the baseline) and after every epoch,
with batched generation through `infer.generate` — the code `chattune predict` and the server use,
so training-time samples are formatted exactly as inference will be.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from chattune.data import Conversation, read_conversations


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
    convs, _ = read_conversations(path, max_samples=n, **read_kw)
    return build_samples(convs, n)


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


def predict_samples(loaded, samples: list[Sample], *, max_new_tokens: int, batch_size: int) -> list[dict]:
    """Answer every sample (greedy); rows of {prompt, prediction, reference}."""
    from chattune.infer import generate

    rows = []
    model = loaded.model
    was_training = model.training
    model.eval()
    for i in range(0, len(samples), batch_size):
        chunk = samples[i : i + batch_size]
        outs = generate(loaded, [s.messages for s in chunk], max_new_tokens=max_new_tokens, temperature=0.0)
        rows += [
            {"prompt": s.prompt, "prediction": o, "reference": s.reference}
            for s, o in zip(chunk, outs, strict=False)
        ]
    model.train(was_training)
    return rows


def score_predictions(rows: list[dict], metric_names: list[str]) -> dict[str, float]:
    from chattune.metrics import compute_metrics

    if not rows or not metric_names:
        return {}
    preds = [r["prediction"] for r in rows]
    refs = [r["reference"] for r in rows]
    return compute_metrics(preds, refs, metric_names)
