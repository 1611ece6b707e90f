"""Scores for generated answers: BLEU/ROUGE on Chinese text, accuracy/macro-F1 for labels.

Sits after generation in evaluation: `evaluate` produces (prediction, reference) strings, this module
turns them into `eval/<name>` numbers for the tracker and the report. Pure functions on strings: no
torch, no network. BLEU comes from sacrebleu, ROUGE from rouge-score, word segmentation from jieba.
"""

from __future__ import annotations

import importlib.util
import logging
import unicodedata
from collections.abc import Callable
from functools import cache

from chattune.config.schema import (
    CHAR_METRICS,
    CLASSIFICATION_METRICS,
    GENERATION_METRICS,
    METRIC_NAMES,
    TASKS,
)
from chattune.errors import ChattuneError

"""What `eval.metrics` accepts; the config checks names against this, so a typo fails before training."""


def default_metrics(task: str) -> list[str]:
    """The metrics a task reports unless the config names others."""
    if task == "generation":
        return GENERATION_METRICS + CHAR_METRICS
    if task == "classification":
        return list(CLASSIFICATION_METRICS)
    raise ChattuneError(f"unknown eval task '{task}': use one of {', '.join(TASKS)}")


def resolve_metrics(task: str, names: list[str] | None) -> list[str]:
    """The metrics to compute: `names` when given (checked, duplicates dropped), else the task's defaults."""
    if not names:
        return default_metrics(task)
    if task not in TASKS:
        raise ChattuneError(f"unknown eval task '{task}': use one of {', '.join(TASKS)}")
    names = list(dict.fromkeys(n.strip() for n in names))
    unknown = [n for n in names if n not in METRIC_NAMES]
    if unknown:
        raise ChattuneError(f"unknown metric(s) {', '.join(unknown)}: use any of {', '.join(METRIC_NAMES)}")
    return names


def compute_metrics(predictions: list[str], references: list[str], names: list[str]) -> dict[str, float]:
    """Score `predictions` against `references` (one reference each); every score is in 0..100.

    Text metrics (`bleu4`, `rouge*`: words from jieba; `*_char`: single characters). Text is
    casefolded and whitespace is dropped before splitting, punctuation is kept as tokens.
    - `bleu4*`: corpus-level BLEU-4 (sacrebleu, uniform weights, brevity penalty over the corpus),
      smoothing "exp": an n-gram order with no match counts as 1 / (2^k * total n-grams), k = 1, 2, ...
      for each such order, so one missing order does not zero the whole score.
    - `rouge1*`, `rouge2*`, `rougeL*`: ROUGE F1 (rouge-score; n-gram counts are clipped, L is the
      longest common subsequence) for each example, then averaged over examples. An empty prediction
      or reference scores 0.

    Labels (`accuracy`, `macro_f1`): both sides are normalised (NFKC, casefold, whitespace and
    punctuation removed). A prediction means label L when it equals L; otherwise it means the known
    label (from the set of references) that occurs earliest in it, the longer one on a tie; otherwise
    it means no label and is counted wrong (an "other" class). `macro_f1` averages the F1 of each
    reference label, so "other" predictions lower recall but have no class of their own.
    """
    if len(predictions) != len(references):
        raise ChattuneError(
            f"metrics: {len(predictions)} predictions but {len(references)} references; need one each"
        )
    if not predictions:
        raise ChattuneError("metrics: no examples to score; the eval set is empty")
    unknown = [n for n in names if n not in METRIC_NAMES]
    if unknown:
        raise ChattuneError(f"unknown metric(s) {', '.join(unknown)}: use any of {', '.join(METRIC_NAMES)}")

    scores: dict[str, float] = {}
    for name in names:
        if name in CLASSIFICATION_METRICS:
            scores.update(_score_labels(predictions, references))
            continue
        split = _split_chars if name.endswith("_char") else _split_words
        base = name.removesuffix("_char")
        if base == "bleu4":
            scores[name] = _corpus_bleu4(predictions, references, split)
        else:
            scores[name] = _mean_rouge(predictions, references, split, base)
    return {n: scores[n] for n in names}


# The Python packages each text metric imports (pip names): words are split with jieba, characters not.
_PACKAGES = {"bleu4": ("sacrebleu",), "rouge": ("rouge-score", "nltk")}


def require_metric_packages(names: list[str]) -> None:
    """Refuse, before a run loads its model, metrics whose packages cannot be imported here.

    chattune's install brings them all; an environment assembled by hand (a GPU image, `--no-deps`)
    may not, and the first evaluation would otherwise fail after the model has loaded.
    Raises ChattuneError naming the metrics, the missing packages and the pip command.
    """
    missing: dict[str, list[str]] = {}
    for name in names:
        if name in CLASSIFICATION_METRICS:
            continue
        base = name.removesuffix("_char")
        packages = list(_PACKAGES["bleu4" if base == "bleu4" else "rouge"])
        if not name.endswith("_char"):
            packages.append("jieba")
        for package in packages:
            if importlib.util.find_spec(package.replace("-", "_")) is None:
                missing.setdefault(package, []).append(name)
    if missing:
        needed = ", ".join(f"{p} (for {', '.join(m)})" for p, m in missing.items())
        raise ChattuneError(
            f"eval.metrics: the package(s) {needed} are not installed: pip install {' '.join(missing)}; "
            "or list other eval.metrics (e.g. bleu4_char needs no jieba), or set eval.samples: 0"
        )


# ---- text metrics ----------------------------------------------------------------------------


@cache
def _jieba():
    """A private jieba tokenizer: other code adding words to jieba's global one cannot change our scores."""
    import jieba

    # jieba logs "Building prefix dict..." at DEBUG to stderr on first use; keep eval output clean.
    jieba.setLogLevel(logging.WARNING)
    tokenizer = jieba.Tokenizer()
    tokenizer.initialize()
    return tokenizer


def _split_words(text: str) -> list[str]:
    # Default mode (with HMM for unseen words), as the Chinese fine-tuning tutorials score with.
    return [t for t in _jieba().cut(text.casefold()) if not t.isspace()]


def _split_chars(text: str) -> list[str]:
    return [c for c in text.casefold() if not c.isspace()]


def _corpus_bleu4(predictions: list[str], references: list[str], split: Callable[[str], list[str]]) -> float:
    from sacrebleu.metrics import BLEU

    # We split ourselves (jieba or characters) and hand sacrebleu space-joined tokens, so its own
    # tokenizer must be off; tokens never contain spaces because whitespace tokens were dropped.
    bleu = BLEU(tokenize="none", smooth_method="exp", max_ngram_order=4)
    hyps = [" ".join(split(p)) for p in predictions]
    refs = [" ".join(split(r)) for r in references]
    return float(bleu.corpus_score(hyps, [refs]).score)


class _PreSplit:
    """rouge-score tokenizer for text that is already tokens joined by single spaces.

    Its default tokenizer keeps only [a-z0-9], which would delete every Chinese character.
    """

    def tokenize(self, text: str) -> list[str]:
        return text.split(" ") if text else []


def _mean_rouge(
    predictions: list[str], references: list[str], split: Callable[[str], list[str]], rouge_type: str
) -> float:
    from rouge_score.rouge_scorer import RougeScorer

    scorer = RougeScorer([rouge_type], tokenizer=_PreSplit())
    total = 0.0
    for pred, ref in zip(predictions, references, strict=True):
        # rouge-score's argument order is (target, prediction).
        total += scorer.score(" ".join(split(ref)), " ".join(split(pred)))[rouge_type].fmeasure
    return 100.0 * total / len(predictions)


# ---- label metrics ---------------------------------------------------------------------------


def _normalise_label(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).casefold()
    return "".join(c for c in text if not c.isspace() and not unicodedata.category(c).startswith("P"))


def _match_label(prediction: str, labels: list[str]) -> str | None:
    """The label a normalised prediction means, or None; see compute_metrics for the rule."""
    if prediction in labels:
        return prediction
    found = [(prediction.find(lab), -len(lab), lab) for lab in labels if lab and lab in prediction]
    return min(found)[2] if found else None


def _score_labels(predictions: list[str], references: list[str]) -> dict[str, float]:
    gold = [_normalise_label(r) for r in references]
    # Sorted so that results never depend on set iteration order.
    labels = sorted(set(gold))
    guessed = [_match_label(_normalise_label(p), labels) for p in predictions]

    correct = sum(g == p for g, p in zip(gold, guessed, strict=True))
    f1s = []
    for label in labels:
        tp = sum(g == label and p == label for g, p in zip(gold, guessed, strict=True))
        fp = sum(g != label and p == label for g, p in zip(gold, guessed, strict=True))
        fn = sum(g == label and p != label for g, p in zip(gold, guessed, strict=True))
        # label comes from the references, so tp + fn >= 1 and the denominator is never 0.
        f1s.append(2 * tp / (2 * tp + fp + fn))
    return {"accuracy": 100.0 * correct / len(gold), "macro_f1": 100.0 * sum(f1s) / len(f1s)}
