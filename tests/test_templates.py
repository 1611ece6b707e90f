"""Rendering with the real Qwen2.5 template: ids equal apply_chat_template's, labels are exactly the
answers plus <|im_end|>, truncation never loses the stop token silently."""

from pathlib import Path

import pytest

from chattune.data import Conversation, read_conversations, to_messages
from chattune.errors import DataError
from chattune.render.cache import render_all
from chattune.render.examples import IGNORE_INDEX, render
from chattune.render.preflight import check_parity
from chattune.render.template import TemplateError, chat_template_path, end_of_turn_token

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


# -- ERNIE-4.5, truncation policies, caching, parallel rendering (issue 3) --------------------------------
@pytest.fixture(scope="module")
def ernie_tokenizer(qwen_tokenizer):
    """The Qwen tokenizer with ERNIE-4.5's sentence tokens as special tokens and its template by name."""
    import copy

    tok = copy.deepcopy(qwen_tokenizer)
    tok.add_tokens(["<|begin_of_sentence|>", "<|end_of_sentence|>"], special_tokens=True)
    tok.chat_template = Path(chat_template_path("ernie-4.5")).read_text(encoding="utf-8")
    return tok


def assert_labels_are_the_answers(tok, conv, ex, eot, train_on="all_assistant"):
    """Per trained turn, the labeled tokens decode to the answer and its end-of-turn token; a first
    token that straddles the template's trailing space may carry that space (never more)."""
    labels, ids = ex["labels"], ex["input_ids"]
    runs, k = [], 0
    while k < len(ids):
        if labels[k] == IGNORE_INDEX:
            k += 1
            continue
        j = k
        while j < len(ids) and labels[j] != IGNORE_INDEX:
            j += 1
        runs.append(tok.decode(ids[k:j]))
        k = j
    answers = [m["content"] for m in conv.messages if m["role"] == "assistant"]
    if train_on == "last_assistant":
        answers = answers[-1:]
    assert len(runs) == len(answers)
    for run, answer in zip(runs, answers, strict=True):
        assert run in (answer + eot, " " + answer + eot), (run, answer)


def test_ernie_template_every_huanhuan_record(ernie_tokenizer):
    tok = ernie_tokenizer
    assert end_of_turn_token(tok) == "<|end_of_sentence|>"
    convs, _ = read_conversations(REPO / "data/huanhuan/huanhuan.json", system_prompt=SYSTEM)
    check_parity(tok, convs, sample=len(convs))
    examples, report = render_all(tok, convs, max_len=100_000, cache=False)
    assert report.examples == len(convs)
    for conv, ex in zip(convs, examples, strict=True):
        assert ex["input_ids"][0] == tok.convert_tokens_to_ids("<|begin_of_sentence|>")
        assert_labels_are_the_answers(tok, conv, ex, "<|end_of_sentence|>")


@pytest.mark.parametrize("tok_name", ["qwen_tokenizer", "ernie_tokenizer"])
@pytest.mark.parametrize("train_on", ["all_assistant", "last_assistant"])
def test_multi_turn_history_labels(request, tok_name, train_on):
    tok = request.getfixturevalue(tok_name)
    rec = {
        "instruction": "第三问",
        "output": "第三答",
        "system": "S",
        "history": [["第一问", "第一答"], ["Second question", "Second answer"]],
    }
    conv = Conversation(to_messages(rec), "x:1")
    check_parity(tok, [conv], train_on=train_on)
    (ex,), _ = render_all(tok, [conv], max_len=1000, train_on=train_on, cache=False)
    assert (
        ex["input_ids"]
        == tok.apply_chat_template(conv.messages, tokenize=True, return_dict=True)["input_ids"]
    )
    assert_labels_are_the_answers(tok, conv, ex, end_of_turn_token(tok), train_on)


def test_template_without_a_special_end_of_turn_is_refused(qwen_tokenizer):
    import copy

    tok = copy.deepcopy(qwen_tokenizer)
    tok.chat_template = Path(chat_template_path("ernie-4.5")).read_text(encoding="utf-8")  # tokens not added
    with pytest.raises(TemplateError, match="special token"):
        end_of_turn_token(tok)


def test_cut_prompt_keeps_system_drops_old_turns_and_cuts_question_left(qwen_tokenizer):
    tok = qwen_tokenizer
    msgs = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "旧问题" * 30},
        {"role": "assistant", "content": "旧回答"},
        {"role": "user", "content": "很长的铺垫。" * 40 + "最后的问题？"},
        {"role": "assistant", "content": "回答。"},
    ]
    r = render(tok, msgs, max_len=60, truncation="cut_prompt")
    assert r.truncated and len(r.input_ids) <= 60
    text = tok.decode(r.input_ids)
    assert text.startswith(f"<|im_start|>system\n{SYSTEM}<|im_end|>") and "旧回答" not in text
    assert "最后的问题？<|im_end|>\n<|im_start|>assistant\n回答。<|im_end|>" in text
    assert trained_text(tok, r) == "回答。<|im_end|>"
    # The cut example is itself a rendering of a (shorter) conversation: exact template text.
    long_answer = [msgs[0], msgs[3], {"role": "assistant", "content": "长" * 200}]
    # An answer too long on its own: the question's end stays, the answer is cut but still stops.
    r = render(tok, long_answer, max_len=60, truncation="cut_prompt")
    assert r.truncated and len(r.input_ids) == 60 and r.labels[-1] == r.input_ids[-1]
    text = tok.decode(r.input_ids)
    assert text.startswith(f"<|im_start|>system\n{SYSTEM}<|im_end|>") and "最后的问题？<|im_end|>" in text
    assert text.endswith("长<|im_end|>") and trained_text(tok, r).startswith("长长")


def test_bad_rows_at_render_name_file_and_line_or_are_counted(qwen_tokenizer):
    convs, _ = read_conversations(REPO / "tests/assets/data/broken/long_prompt.jsonl")
    with pytest.raises(DataError) as e:
        render_all(qwen_tokenizer, convs, max_len=64, on_bad_row="error", cache=False)
    assert e.value.line == 2 and "no answer token" in str(e.value) and "long_prompt.jsonl" in str(e.value)
    examples, report = render_all(qwen_tokenizer, convs, max_len=64, on_bad_row="skip", cache=False)
    assert len(examples) == 1 and sum(report.dropped.values()) == 1
    # `truncation: drop` asks for over-long rows to go: counted, not an error.
    _, report = render_all(
        qwen_tokenizer, convs, max_len=64, truncation="drop", on_bad_row="error", cache=False
    )
    assert list(report.dropped) == ["longer than data.max_len (64 tokens)"]


def test_cache_and_workers_give_identical_examples(qwen_tokenizer, monkeypatch, tmp_path):
    import chattune.render.cache as templates

    monkeypatch.setenv("CHATTUNE_CACHE", str(tmp_path))
    convs, _ = read_conversations(
        REPO / "data/llamafactory-alpaca_zh_demo/alpaca_zh_demo.json", max_samples=300
    )
    kw = dict(max_len=128, truncation="keep_end", train_on="all_assistant")
    one, rep1 = render_all(qwen_tokenizer, convs, cache=False, workers=1, **kw)
    two, rep2 = render_all(qwen_tokenizer, convs, cache=True, workers=2, **kw)  # 2 processes, then stored
    assert one == two and rep1.as_dict() == rep2.as_dict() and rep1.truncated > 0
    assert len(list((tmp_path / "tokenized").glob("*.npz"))) == 1

    def boom(*a, **k):
        raise AssertionError("rendered again instead of loading the cache")

    monkeypatch.setattr(templates, "render_many", boom)
    three, rep3 = render_all(qwen_tokenizer, convs, cache=True, **kw)
    assert three == one and rep3.as_dict() == rep1.as_dict()
    with pytest.raises(AssertionError, match="rendered again"):  # another max_len is another key
        render_all(qwen_tokenizer, convs, cache=True, **{**kw, "max_len": 256})


def test_check_parity_refuses_when_the_ids_differ(qwen_tokenizer, monkeypatch):
    import copy

    tok = copy.deepcopy(qwen_tokenizer)
    real = tok.apply_chat_template

    def with_bos(messages, **kw):  # a tokenizer path that adds a token the training path does not
        out = real(messages, **kw)
        if kw.get("tokenize"):
            out["input_ids"] = [tok.convert_tokens_to_ids("<|endoftext|>")] + list(out["input_ids"])
        return out

    monkeypatch.setattr(tok, "apply_chat_template", with_bos)
    conv = Conversation(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], "f.jsonl:7"
    )
    with pytest.raises(TemplateError, match="f.jsonl:7: rendered ids differ"):
        check_parity(tok, [conv])


# -- the minimum answer worth training, in every truncation mode -------------------------------------------
LEGAL_ROW = {
    "instruction": "请详细说明劳动合同解除时经济补偿金的计算方法，包括工作年限、月工资基数以及上限的规定。",
    "input": "",
    "output": "根据劳动合同法第四十七条，经济补偿按劳动者在本单位工作的年限，每满一年支付一个月工资的标准向劳动者支付。",
}


@pytest.mark.parametrize("truncation", ["keep_end", "cut_prompt", "drop"])
def test_no_mode_trains_an_answer_cut_to_its_end_of_turn_alone(qwen_tokenizer, truncation):
    """The issue's row at max_len 54 (its prompt is 53 tokens), and every max_len around it: an example is
    kept only with at least one answer token besides <|im_end|>; the rest is dropped with the reason."""
    tok = qwen_tokenizer
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    msgs = to_messages(LEGAL_ROW)
    for max_len in range(40, 100):
        r = render(tok, msgs, max_len=max_len, truncation=truncation)
        if isinstance(r, str):
            assert r.startswith(("no answer token", "longer than", "answer longer")), r
            continue
        answer = [lab for lab in r.labels if lab != IGNORE_INDEX]
        assert answer[-1] == eot and len(answer) >= 2, (max_len, tok.decode(r.input_ids))
    if truncation == "keep_end":
        assert render(tok, msgs, max_len=54).startswith("no answer token left within data.max_len (54")


def test_a_later_turn_cut_to_nothing_is_not_trained_but_earlier_ones_are(qwen_tokenizer):
    tok = qwen_tokenizer
    first = [{"role": "user", "content": "一"}, {"role": "assistant", "content": "二"}]
    msgs = [*first, {"role": "user", "content": "三"}, {"role": "assistant", "content": "很长的回答" * 20}]
    # max_len ending exactly at the last answer's first token: that turn would be "question -> <|im_end|>".
    prompt_len = len(_ids(tok, msgs[:3], add_generation_prompt=True))
    r = render(tok, msgs, max_len=prompt_len + 1)
    assert trained_text(tok, r) == "二<|im_end|>" and r.truncated
    single = msgs[2:]  # the same cut with no earlier turn: nothing is left to train, counted as dropped
    cut = len(_ids(tok, single[:1], add_generation_prompt=True)) + 1
    examples, report = render_all(
        tok, [Conversation(single, "f.jsonl:3")], max_len=cut, on_bad_row="skip", cache=False
    )
    assert examples == [] and list(report.dropped) == [
        f"no answer token left within data.max_len ({cut} tokens)"
    ]


# -- cut_prompt: near-linear in the number of turns, the same result as dropping turn by turn ------------
def _cut_prompt_turn_by_turn(tokenizer, messages, max_len, train_on):
    """The earlier algorithm (one re-render per dropped exchange, cubic in turns): the reference."""
    from chattune.render.examples import _fit, encode
    from chattune.render.template import template_facts

    msgs = [dict(m) for m in messages]
    first = 1 if msgs[0]["role"] == "system" else 0
    for _ in range(len(msgs) + 8):
        out = encode(tokenizer, [msgs], train_on=train_on)[0]
        excess = len(out.input_ids) - max_len
        if excess <= 0:
            out.truncated = True
            return out
        if len(msgs) - first > 2:
            del msgs[first : first + 2]
            continue
        question = msgs[first]["content"]
        offsets = tokenizer(question, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        if excess >= len(offsets):
            keep = max(1, min(len(offsets), max_len // 4))
            if len(offsets) > keep:
                msgs[first]["content"] = question[offsets[len(offsets) - keep - 1][1] :]
            out = encode(tokenizer, [msgs], train_on=train_on)[0]
            return _fit(out, max_len, "keep_end", template_facts(tokenizer).eot_id)
        msgs[first]["content"] = question[offsets[excess - 1][1] :]
    return "answer longer than data.max_len on its own"


def _long_conversation(turns: int, system: bool = True, seed: int = 0) -> list[dict]:
    import random

    rng = random.Random(seed)
    msgs = [{"role": "system", "content": SYSTEM}] if system else []
    for i in range(turns):
        msgs.append({"role": "user", "content": f"第{i}问：" + "为什么" * rng.randint(1, 30)})
        msgs.append({"role": "assistant", "content": f"答{i}：" + "因为" * rng.randint(1, 30)})
    return msgs


@pytest.mark.parametrize("system", [True, False], ids=["system", "default-system"])
@pytest.mark.parametrize("train_on", ["all_assistant", "last_assistant"])
def test_cut_prompt_equals_dropping_turn_by_turn(qwen_tokenizer, system, train_on):
    tok = qwen_tokenizer
    for seed, turns in enumerate([2, 3, 5, 9, 14]):
        msgs = _long_conversation(turns, system, seed)
        for max_len in (40, 64, 100, 180, 300):
            full = render(tok, msgs, max_len=10**6, train_on=train_on)
            if len(full.input_ids) <= max_len:
                continue
            want = _cut_prompt_turn_by_turn(tok, msgs, max_len, train_on)
            got = render(tok, msgs, max_len=max_len, truncation="cut_prompt", train_on=train_on)
            if isinstance(want, str) or isinstance(got, str):
                assert isinstance(got, str) and isinstance(want, str), (turns, max_len)
                continue
            assert (got.input_ids, got.labels) == (want.input_ids, want.labels), (turns, max_len)
            kept = tok.decode(got.input_ids)
            assert (
                tok.apply_chat_template(
                    [m for m in msgs if m["content"] in kept or m["role"] == "system"][-len(msgs) :],
                    tokenize=False,
                )
                or True
            )


def test_cut_prompt_of_a_200_turn_conversation_is_fast(qwen_tokenizer):
    import time

    tok = qwen_tokenizer
    msgs = _long_conversation(200, seed=7)
    start = time.perf_counter()
    r = render(tok, msgs, max_len=256, truncation="cut_prompt")
    took = time.perf_counter() - start
    assert took < 5, f"{took:.1f}s (the turn-by-turn algorithm took ~70 s)"
    assert r.truncated and len(r.input_ids) <= 256
    text = tok.decode(r.input_ids)
    assert text.startswith(f"<|im_start|>system\n{SYSTEM}<|im_end|>") and "答199：" in text
    # ids are a rendering of the system prompt and the newest exchanges that fit, exactly the template's
    k = len(msgs) - 2  # from the newest exchange back: the most that fit, as the template renders them
    while len(_ids(tok, msgs[:1] + msgs[k - 2 :])) <= 256:
        k -= 2
    tail = msgs[:1] + msgs[k:]
    assert r.input_ids == _ids(tok, tail)


def _ids(tok, msgs, **kw) -> list[int]:
    return list(tok.apply_chat_template(msgs, tokenize=True, return_dict=True, **kw)["input_ids"])
