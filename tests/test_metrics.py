"""metrics: every expected number below is worked out by hand in the comment beside it."""

from __future__ import annotations

import math
import typing

import pytest

from chattune.config.load import config_from_dict
from chattune.config.schema import CHAR_METRICS, GENERATION_METRICS, METRIC_NAMES, MetricName
from chattune.errors import ChattuneError, ConfigError
from chattune.evaluate.metrics import compute_metrics, default_metrics, resolve_metrics

TEXT_METRICS = GENERATION_METRICS + CHAR_METRICS


def test_identical_text_scores_100() -> None:
    texts = ["今天天气很好，我们去公园散步吧。", "嬛嬛，朕的心里只有你一个人。"]
    scores = compute_metrics(texts, list(texts), TEXT_METRICS)
    assert scores == pytest.approx(dict.fromkeys(TEXT_METRICS, 100.0))


def test_char_level_by_hand() -> None:
    # pred 猫坐在垫子上 (6 chars) vs ref 猫在垫子上 (5 chars)
    # unigrams: 5 shared -> P 5/6, R 5/5, F1 = 10/11
    # bigrams: pred 猫坐 坐在 在垫 垫子 子上, ref 猫在 在垫 垫子 子上 -> 3 shared, P 3/5, R 3/4, F1 = 2/3
    # LCS 猫在垫子上 = 5 -> same as ROUGE-1
    # BLEU: p1 5/6, p2 3/5, p3 2/4 (在垫子 垫子上), p4 1/3 (在垫子上), BP 1 (pred is longer)
    #       -> (5/6 * 3/5 * 1/2 * 1/3) ** (1/4) = (1/12) ** 0.25
    scores = compute_metrics(["猫坐在垫子上"], ["猫在垫子上"], CHAR_METRICS)
    assert scores["rouge1_char"] == pytest.approx(100 * 10 / 11)
    assert scores["rouge2_char"] == pytest.approx(100 * 2 / 3)
    assert scores["rougeL_char"] == pytest.approx(100 * 10 / 11)
    assert scores["bleu4_char"] == pytest.approx(100 * (1 / 12) ** 0.25)


def test_word_level_with_repeated_words_and_smoothing() -> None:
    # pred: the cat sat on the mat / ref: the cat is on the mat (jieba splits at the spaces)
    # unigrams: the x2 clipped to 2, cat, on, mat -> 5 of 6 both ways -> F1 5/6
    # bigrams: "the cat", "on the", "the mat" shared of 5 -> 3/5
    # LCS "the cat on the mat" = 5 -> 5/6
    # BLEU: p1 5/6, p2 3/5, p3 1/4 ("on the mat"), p4 has no match: exp smoothing 1/(2 * 3 4-grams)
    #       -> (5/6 * 3/5 * 1/4 * 1/6) ** (1/4) = (1/48) ** 0.25, BP 1 (same length)
    scores = compute_metrics(["the cat sat on the mat"], ["the cat is on the mat"], GENERATION_METRICS)
    assert scores["rouge1"] == pytest.approx(100 * 5 / 6)
    assert scores["rouge2"] == pytest.approx(100 * 3 / 5)
    assert scores["rougeL"] == pytest.approx(100 * 5 / 6)
    assert scores["bleu4"] == pytest.approx(100 * (1 / 48) ** 0.25)


def test_word_order_rouge_l_and_smoothing_of_several_orders() -> None:
    # pred DCBA vs ref ABCD, casefolded to dcba / abcd, scored per character.
    # unigrams: all 4 shared -> ROUGE-1 F1 1; bigrams dc cb ba vs ab bc cd: none -> ROUGE-2 0
    # LCS: one character (order reversed) -> P 1/4, R 1/4 -> ROUGE-L 1/4
    # BLEU: p1 4/4; p2, p3, p4 have no match: exp smoothing gives the k-th such order 1 / (2^k * total)
    #       -> p2 1/(2*3), p3 1/(4*2), p4 1/(8*1) -> (1 * 1/6 * 1/8 * 1/8) ** (1/4) = (1/384) ** 0.25, BP 1
    scores = compute_metrics(["DCBA"], ["ABCD"], CHAR_METRICS)
    assert scores["rouge1_char"] == pytest.approx(100.0)
    assert scores["rouge2_char"] == pytest.approx(0.0)
    assert scores["rougeL_char"] == pytest.approx(25.0)
    assert scores["bleu4_char"] == pytest.approx(100 * (1 / 384) ** 0.25)


def test_brevity_penalty() -> None:
    # pred abcd is the first half of ref abcdefgh: every n-gram precision is 1 (4/4, 3/3, 2/2, 1/1),
    # BP = exp(1 - ref_len / pred_len) = exp(1 - 8/4) = e^-1 -> BLEU 100/e = 36.79
    # ROUGE-1 and ROUGE-L: P 1, R 4/8 -> F1 2/3
    scores = compute_metrics(["abcd"], ["abcdefgh"], ["bleu4_char", "rouge1_char", "rougeL_char"])
    assert scores["bleu4_char"] == pytest.approx(100 * math.exp(-1))
    assert scores["rouge1_char"] == pytest.approx(100 * 2 / 3)
    assert scores["rougeL_char"] == pytest.approx(100 * 2 / 3)


def test_chinese_is_scored_on_jieba_words_not_characters() -> None:
    # words: 我 爱 北京 vs 我 爱 北京 天安门 -> P 1, R 3/4, F1 6/7
    # chars: 4 chars vs 7 chars, all 4 shared -> P 1, R 4/7, F1 8/11
    scores = compute_metrics(["我爱北京"], ["我爱北京天安门"], ["rouge1", "rouge1_char"])
    assert scores["rouge1"] == pytest.approx(100 * 6 / 7)
    assert scores["rouge1_char"] == pytest.approx(100 * 8 / 11)


def test_bleu_is_corpus_level_and_rouge_is_averaged() -> None:
    # Example 1 identical (8 chars), example 2 shares nothing (3 chars each).
    # Corpus counts: 1-grams 8/11, 2-grams 7/9, 3-grams 6/7, 4-grams 5/5; lengths 11 = 11 -> BP 1.
    # BLEU = (8/11 * 7/9 * 6/7 * 1) ** (1/4) = (48/99) ** 0.25 = 83.4; averaging sentence BLEUs would
    # give 50 (100 and 0: sacrebleu scores 0 when no unigram matches, whatever the smoothing).
    preds, refs = ["abcdefgh", "xyz"], ["abcdefgh", "uvw"]
    scores = compute_metrics(preds, refs, ["bleu4_char", "rouge1_char"])
    assert scores["bleu4_char"] == pytest.approx(100 * (48 / 99) ** 0.25)
    assert scores["rouge1_char"] == pytest.approx(50.0)


def test_empty_prediction_scores_zero() -> None:
    scores = compute_metrics([""], ["有内容的参考答案"], TEXT_METRICS)
    assert scores == dict.fromkeys(TEXT_METRICS, 0.0)


def test_classification_by_hand() -> None:
    refs = ["正面", "正面", "负面", "中性", "负面"]
    preds = [
        "正面",  # exact -> 正面, right
        "我觉得是负面。",  # contains 负面 -> 负面, wrong
        "负面！",  # punctuation stripped -> 负面, right
        "不知道",  # no label -> other, wrong
        " 负面 \n",  # whitespace stripped -> 负面, right
    ]
    # accuracy 3/5
    # 正面: tp 1, fp 0, fn 1 -> 2/3;  负面: tp 2, fp 1, fn 0 -> 4/5;  中性: tp 0, fn 1 -> 0
    # macro-F1 = (2/3 + 4/5 + 0) / 3 = 22/45
    scores = compute_metrics(preds, refs, ["accuracy", "macro_f1"])
    assert scores["accuracy"] == pytest.approx(60.0)
    assert scores["macro_f1"] == pytest.approx(100 * 22 / 45)


def test_label_matching_earliest_then_longest_and_case() -> None:
    refs = ["negative", "positive", "负", "负面"]
    preds = [
        "Negative, not positive.",  # both occur; earliest wins -> negative
        "POSITIVE!",  # casefold + punctuation -> positive
        "负",  # exact beats containment
        "是负面的",  # 负 and 负面 both start at 1; the longer wins -> 负面
    ]
    assert compute_metrics(preds, refs, ["accuracy"]) == {"accuracy": 100.0}


def test_resolve_metrics() -> None:
    assert resolve_metrics("classification", None) == ["accuracy", "macro_f1"]
    assert resolve_metrics("generation", []) == TEXT_METRICS
    assert resolve_metrics("classification", ["rougeL", " accuracy", "rougeL"]) == ["rougeL", "accuracy"]
    with pytest.raises(ChattuneError, match="unknown metric.*bleu5"):
        resolve_metrics("generation", ["bleu5"])
    with pytest.raises(ChattuneError, match="unknown eval task 'qa'"):
        resolve_metrics("qa", ["bleu4"])
    # The config accepts exactly these names: a typo in eval.metrics fails when the config loads.
    assert list(typing.get_args(MetricName)) == METRIC_NAMES
    with pytest.raises(
        ConfigError, match=r"config key 'eval.metrics\[1\]': expected one of 'bleu4'.*got 'bleu'"
    ):
        config_from_dict({"eval": {"metrics": ["rougeL", "bleu"]}})


def test_default_metrics_are_known_names() -> None:
    assert default_metrics("generation") == TEXT_METRICS
    assert default_metrics("classification") == ["accuracy", "macro_f1"]
    for task in ("generation", "classification"):
        assert set(default_metrics(task)) <= set(METRIC_NAMES)
    with pytest.raises(ChattuneError, match="unknown eval task 'qa'"):
        default_metrics("qa")


def test_bad_input_raises_chattune_error() -> None:
    with pytest.raises(ChattuneError, match="2 predictions but 1 references"):
        compute_metrics(["a", "b"], ["a"], ["bleu4"])
    with pytest.raises(ChattuneError, match="eval set is empty"):
        compute_metrics([], [], ["bleu4"])
    with pytest.raises(ChattuneError, match="unknown metric.*bleu"):
        compute_metrics(["a"], ["a"], ["bleu"])


def test_jieba_is_quiet(capfd: pytest.CaptureFixture[str]) -> None:
    from chattune.evaluate import metrics

    metrics._jieba.cache_clear()
    compute_metrics(["我爱北京"], ["我爱北京"], ["rouge1"])
    assert "prefix dict" not in capfd.readouterr().err


def test_metrics_whose_packages_are_missing_are_refused_by_name(monkeypatch):
    import importlib.util

    from chattune.errors import ChattuneError
    from chattune.evaluate.metrics import require_metric_packages

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "jieba" else real(name, *a)
    )
    require_metric_packages(["bleu4_char", "rougeL_char", "accuracy"])  # characters: no jieba needed
    with pytest.raises(ChattuneError) as e:
        require_metric_packages(["bleu4", "rougeL_char", "rouge1"])
    assert "jieba (for bleu4, rouge1)" in str(e.value) and "pip install jieba" in str(e.value)
