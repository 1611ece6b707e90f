"""Rendering with the real Qwen2.5 template: ids equal apply_chat_template's, labels are exactly the
answers plus <|im_end|>, truncation never loses the stop token silently."""

from pathlib import Path

import pytest

from chattune.data import read_conversations
from chattune.templates import IGNORE_INDEX, check_parity, render, render_all

REPO = Path(__file__).resolve().parents[1]
SYSTEM = "现在你要扮演皇帝身边的女人--甄嬛"


def trained_text(tok, r):
    return tok.decode([i for i, lab in zip(r.input_ids, r.labels, strict=False) if lab != IGNORE_INDEX])


def test_single_turn_ids_and_labels(qwen_tokenizer):
    tok = qwen_tokenizer
    msgs = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "皇上驾到！"},
        {"role": "assistant", "content": "皇上万福金安。"},
    ]
    r = render(tok, msgs, max_len=384)
    assert r.input_ids == tok.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"]
    assert trained_text(tok, r) == "皇上万福金安。<|im_end|>"
    # The token after <|im_end|> (the template's newline) and the pad token are never trained.
    assert r.labels[-1] == IGNORE_INDEX and tok.pad_token_id not in [x for x in r.labels if x != IGNORE_INDEX]


def test_multi_turn_all_and_last(qwen_tokenizer):
    tok = qwen_tokenizer
    msgs = [
        {"role": "user", "content": "一"},
        {"role": "assistant", "content": "二"},
        {"role": "user", "content": "三"},
        {"role": "assistant", "content": "四"},
    ]
    r = render(tok, msgs, max_len=384)
    assert trained_text(tok, r) == "二<|im_end|>四<|im_end|>"
    r = render(tok, msgs, max_len=384, train_on="last_assistant")
    assert trained_text(tok, r) == "四<|im_end|>"


def test_truncation_keeps_end_of_turn(qwen_tokenizer):
    tok = qwen_tokenizer
    msgs = [{"role": "user", "content": "讲"}, {"role": "assistant", "content": "很长的回答。" * 50}]
    full = render(tok, msgs, max_len=10_000)
    r = render(tok, msgs, max_len=40)
    assert len(r.input_ids) == 40 and r.truncated
    assert r.input_ids[-1] == r.labels[-1] == tok.convert_tokens_to_ids("<|im_end|>")
    assert r.input_ids[:39] == full.input_ids[:39]
    assert render(tok, msgs, max_len=40, truncation="drop").startswith("longer than")
    # A prompt longer than max_len leaves no answer token: dropped with a reason, never an all-masked row.
    assert "no answer token" in render(tok, [{"role": "user", "content": "长" * 100}, msgs[1]], max_len=20)


@pytest.mark.parametrize(
    "path, kw",
    [
        ("data/huanhuan/huanhuan.json", {"system_prompt": SYSTEM}),
        ("data/llamafactory-alpaca_zh_demo/alpaca_zh_demo.json", {}),
        ("data/llamafactory-identity/identity.json", {}),
        ("data/news-cls/news_cls.jsonl", {"converter": "news_cls"}),
        ("data/disc-law-eval-subjective/qa_short_answer.json", {"converter": "disc_law"}),
    ],
)
def test_every_bundled_record_matches_the_template(qwen_tokenizer, path, kw):
    """For every record: ids equal apply_chat_template's; the labels are exactly answer + <|im_end|>."""
    tok = qwen_tokenizer
    convs, _ = read_conversations(REPO / path, **kw)
    check_parity(tok, convs, sample=len(convs))
    examples, report = render_all(
        tok, convs, max_len=100_000, truncation="keep_end", train_on="all_assistant"
    )
    assert report.examples == len(convs) and not report.dropped
    for conv, ex in zip(convs, examples, strict=False):
        labeled = [i for i, lab in zip(ex["input_ids"], ex["labels"], strict=False) if lab != IGNORE_INDEX]
        want = "".join(m["content"] + "<|im_end|>" for m in conv.messages if m["role"] == "assistant")
        assert tok.decode(labeled) == want
