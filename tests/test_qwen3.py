"""Qwen3's hybrid-thinking template (vendored, `model.chat_template: qwen3`) on a Qwen3-faithful tokenizer
(the vendored Qwen2.5 vocabulary plus Qwen3's four added tokens): ids equal `apply_chat_template`'s, labels
are what the model generates for each turn (reasoning where the template keeps it) through <|im_end|>, with
`enable_thinking` true and false; a template that moves the system turn; thinking data in the readers."""

from pathlib import Path

import pytest
from conftest import TOKENIZER_DIR

from chattune.data import Conversation, to_messages
from chattune.render.cache import _code_version
from chattune.render.examples import IGNORE_INDEX, render
from chattune.render.preflight import check_parity
from chattune.render.template import (
    build_generation_prompt,
    chat_template_path,
    dropped_reasoning,
    set_template_kwargs,
)


def _qwen3(**kwargs):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    tok.add_tokens(["<tool_response>", "</tool_response>", "<think>", "</think>"])
    tok.chat_template = Path(chat_template_path("qwen3")).read_text(encoding="utf-8")
    set_template_kwargs(tok, kwargs)
    return tok


@pytest.fixture(scope="module")
def qwen3():
    return _qwen3()


@pytest.fixture(scope="module")
def qwen3_nothink():
    return _qwen3(enable_thinking=False)


def trained_pieces(tok, r):
    """The labelled runs of tokens, decoded, one string per run."""
    runs, cur = [], []
    for i, lab in zip(r.input_ids, r.labels, strict=True):
        if lab != IGNORE_INDEX:
            cur.append(i)
        elif cur:
            runs, cur = [*runs, tok.decode(cur)], []
    return runs + ([tok.decode(cur)] if cur else [])


def ref_ids(tok, msgs, **kw):
    return tok.apply_chat_template(msgs, tokenize=True, return_dict=True, **kw)["input_ids"]


TWO_TURNS = [
    {"role": "system", "content": "你是甄嬛。"},
    {"role": "user", "content": "你是谁？"},
    {"role": "assistant", "content": "臣妾甄嬛。", "reasoning_content": "皇上在问我的名字。"},
    {"role": "user", "content": "几岁了？"},
    {"role": "assistant", "content": "十七。", "reasoning_content": "要如实回答。"},
]


def test_added_tokens_have_qwen3_ids(qwen3):
    ids = qwen3.convert_tokens_to_ids(["<tool_response>", "</tool_response>", "<think>", "</think>"])
    assert ids == [151665, 151666, 151667, 151668]


def test_one_turn_with_and_without_reasoning(qwen3):
    msgs = TWO_TURNS[:3]
    r = render(qwen3, msgs, max_len=512)
    assert r.input_ids == ref_ids(qwen3, msgs)
    # Everything after the generation prompt '<|im_start|>assistant\n' is what the model generates.
    assert trained_pieces(qwen3, r) == ["<think>\n皇上在问我的名字。\n</think>\n\n臣妾甄嬛。<|im_end|>"]
    plain = [*TWO_TURNS[:2], {"role": "assistant", "content": "臣妾甄嬛。"}]
    r = render(qwen3, plain, max_len=512)
    assert r.input_ids == ref_ids(qwen3, plain)
    # Thinking mode, no reasoning: the model generates the empty block itself, so it is labelled.
    assert trained_pieces(qwen3, r) == ["<think>\n\n</think>\n\n臣妾甄嬛。<|im_end|>"]


def test_multi_turn_reasoning_kept_only_after_last_user(qwen3):
    r = render(qwen3, TWO_TURNS, max_len=512)
    assert r.input_ids == ref_ids(qwen3, TWO_TURNS)
    assert trained_pieces(qwen3, r) == [
        "臣妾甄嬛。<|im_end|>",
        "<think>\n要如实回答。\n</think>\n\n十七。<|im_end|>",
    ]
    assert dropped_reasoning(qwen3, TWO_TURNS) == [2]
    r = render(qwen3, TWO_TURNS, max_len=512, train_on="last_assistant")
    assert trained_pieces(qwen3, r) == ["<think>\n要如实回答。\n</think>\n\n十七。<|im_end|>"]


def test_enable_thinking_false_puts_the_empty_block_in_the_prompt(qwen3_nothink):
    tok = qwen3_nothink
    msgs = [{k: v for k, v in m.items() if k != "reasoning_content"} for m in TWO_TURNS]
    r = render(tok, msgs, max_len=512)
    assert r.input_ids == ref_ids(tok, msgs, enable_thinking=False)
    # The empty block is part of the generation prompt at inference, so it is not labelled.
    assert trained_pieces(tok, r) == ["臣妾甄嬛。<|im_end|>", "十七。<|im_end|>"]
    prompt = build_generation_prompt(tok, msgs[:4])
    assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    # The training text of the last turn starts with exactly that prompt: same ids at inference.
    text = tok.apply_chat_template(msgs, tokenize=False, enable_thinking=False)
    assert text.startswith(prompt)
    assert build_generation_prompt(tok, msgs[:4], kwargs={"enable_thinking": True}).endswith("assistant\n")


def test_preflight_passes_on_qwen3(qwen3, qwen3_nothink):
    convs = [Conversation(TWO_TURNS, "a:1"), Conversation(TWO_TURNS[:3], "a:2")]
    check_parity(qwen3, convs)
    check_parity(qwen3_nothink, convs)


MOVES_SYSTEM = (  # Llama-2 / Mistral style: the system text goes into the last user turn
    "{%- set sys = messages[0].content if messages[0].role == 'system' else '' -%}"
    "{%- set ns = namespace(last=-1) -%}"
    "{%- for m in messages -%}{%- if m.role == 'user' -%}{%- set ns.last = loop.index0 -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- for m in messages -%}"
    "{%- if m.role == 'user' -%}{{ '<|im_start|>user\\n' }}"
    "{%- if loop.index0 == ns.last and sys %}{{ sys + '\\n\\n' }}{% endif %}{{ m.content + '<|im_end|>\\n' }}"
    "{%- elif m.role == 'assistant' -%}{{ '<|im_start|>assistant\\n' + m.content + '<|im_end|>\\n' }}"
    "{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


def test_template_that_moves_the_system_turn_into_the_last_user_turn():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    tok.chat_template = MOVES_SYSTEM
    msgs = [{k: v for k, v in m.items() if k != "reasoning_content"} for m in TWO_TURNS]
    r = render(tok, msgs, max_len=512)
    assert r.input_ids == ref_ids(tok, msgs)
    assert trained_pieces(tok, r) == ["臣妾甄嬛。<|im_end|>", "十七。<|im_end|>"]
    assert "甄嬛。<|im_end|>\n<|im_start|>user\n你是甄嬛。\n\n几岁了" in tok.decode(
        r.input_ids
    )  # it did move
    check_parity(tok, [Conversation(msgs, "a:1")])


def test_readers_take_reasoning_content_and_think_blocks():
    rec = {
        "messages": [
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": "<think>\nwhy\n</think>\n\nanswer"},
            {"role": "user", "content": "q2"},
            {"role": "assistant", "content": "a2", "reasoning_content": "r2"},
        ]
    }
    msgs = to_messages(rec)
    assert msgs[1] == {"role": "assistant", "content": "answer", "reasoning_content": "why"}
    assert msgs[3] == {"role": "assistant", "content": "a2", "reasoning_content": "r2"}
    alpaca = to_messages({"instruction": "q", "input": "", "output": "<think>x</think>y"})
    assert alpaca[-1] == {"role": "assistant", "content": "y", "reasoning_content": "x"}
    from chattune.data.formats import BadRow

    with pytest.raises(BadRow, match="only an assistant"):
        to_messages({"messages": [{"role": "user", "content": "q", "reasoning_content": "r"}]})


def test_cache_key_covers_the_labelling_code():
    src = Path(_code_version.__code__.co_filename).parent
    # The key hashes the files that decide labels, not only the cache module.
    assert {"template.py", "examples.py", "cache.py"} <= {p.name for p in src.iterdir()}
    import hashlib

    h = hashlib.sha256()
    for name in ("cache.py", "template.py", "examples.py"):
        h.update((src / name).read_bytes())
    assert _code_version() == h.hexdigest()[:16]


def test_consumers_format_as_training_did(tmp_path):
    """inference.json carries the kwargs; the GGUF's Jinja template and Ollama's have them baked in;
    serve takes chat_template_kwargs / reasoning_content and returns reasoning separately."""
    from chattune.adapter import InferenceInfo, read_inference_info, write_inference_info
    from chattune.infer.export_gguf import ollama_template
    from chattune.infer.requests import answer_message, parse_request
    from chattune.render.template import template_with_kwargs

    write_inference_info(tmp_path, InferenceInfo(base_model="b", template_kwargs={"enable_thinking": False}))
    assert read_inference_info(tmp_path).template_kwargs == {"enable_thinking": False}

    nothink, think = _qwen3(enable_thinking=False), _qwen3()
    msgs = [{"role": "user", "content": "你好"}]
    baked = _qwen3()
    baked.chat_template = template_with_kwargs(think.chat_template, {"enable_thinking": False})
    assert build_generation_prompt(baked, msgs) == build_generation_prompt(nothink, msgs)
    assert ollama_template(nothink).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert ollama_template(think).endswith("<|im_start|>assistant\n")

    req = parse_request(
        b'{"messages": [{"role": "assistant", "content": "a", "reasoning_content": "r"}],'
        b' "chat_template_kwargs": {"enable_thinking": false}}'
    )
    assert req.chat_template_kwargs == {"enable_thinking": False}
    assert req.messages[0].reasoning_content == "r"
    assert answer_message("<think>\n想想\n</think>\n\n好。") == {
        "role": "assistant",
        "content": "好。",
        "reasoning_content": "想想",
    }
    assert answer_message("好。") == {"role": "assistant", "content": "好。"}


def test_streamed_reasoning_splits_as_the_whole_answer_does():
    """`chattune serve`'s stream gives `reasoning_content` deltas, then `content` deltas; cut anywhere, the
    pieces join to exactly the non-streamed message (tags split across pieces, newlines at the seams)."""
    from chattune.infer.requests import ReasoningSplitter, answer_message

    texts = [
        "<think>\n想想\n\n再想\n</think>\n\n好。\n",
        "\n<think>\nwhy</think>answer",
        "<think>\n\n</think>\n\n空想之后的回答",
        "<think>\ncut off by max_tokens\n",  # a thought never closed: all reasoning, no answer
        "plain answer, <think> later is text",
        "  <thin is not a tag",
        "",
    ]
    for text in texts:
        whole = answer_message(text)
        for cuts in [[], list(range(1, len(text))), [1, 3, 7], [len(text) // 2]]:
            pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
            splitter = ReasoningSplitter()
            deltas = [d for p in pieces for d in splitter.feed(p)] + splitter.finish()
            assert all(len(d) == 1 and next(iter(d.values())) for d in deltas), deltas
            kinds = [next(iter(d)) for d in deltas]
            assert kinds == sorted(kinds, key=lambda k: k != "reasoning_content"), (text, kinds)
            streamed = {"role": "assistant", "content": "".join(d.get("content", "") for d in deltas)}
            if "reasoning_content" in whole:
                streamed["reasoning_content"] = "".join(d.get("reasoning_content", "") for d in deltas)
            assert streamed == whole, (text, cuts)
    assert answer_message("<think>\ncut off\n") == {
        "role": "assistant",
        "content": "",
        "reasoning_content": "cut off",
    }
    assert answer_message("  <thin is not a tag") == {"role": "assistant", "content": "  <thin is not a tag"}
