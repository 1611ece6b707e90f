"""Qwen3 with `data.template_kwargs: {enable_thinking: false}` from training to use: the tokenizer loaded for
inference from a folder applies the kwargs recorded in its inference.json, so `chat`'s prompt builder and
`serve`'s request path give the same prompt ids training gave the last answer; `chattune data check|stats`
render with the configured kwargs and say how many examples had reasoning dropped from history."""

import json

import yaml
from test_qwen3 import _qwen3

from chattune.adapter import InferenceInfo, write_inference_info
from chattune.cli.parser import main
from chattune.render.examples import IGNORE_INDEX, render

CONV = [
    {"role": "system", "content": "现在你要扮演皇帝身边的女人--甄嬛"},
    {"role": "user", "content": "你是谁？"},
    {"role": "assistant", "content": "臣妾甄嬛。", "reasoning_content": "皇上在问我的名字。"},
    {"role": "user", "content": "几岁了？"},
    {"role": "assistant", "content": "十七。"},
]


def _model_dir(tmp_path):
    """A folder as `merge` writes it (tokenizer, config.json, inference.json), without weights: reading
    its tokenizer needs none."""
    d = tmp_path / "model"
    _qwen3().save_pretrained(d)  # the template saved without kwargs: they come from inference.json only
    cfg = {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "vocab_size": 151669}
    (d / "config.json").write_text(json.dumps(cfg), encoding="utf-8")
    info = InferenceInfo(
        base_model="b", end_of_turn_token="<|im_end|>", template_kwargs={"enable_thinking": False}
    )
    write_inference_info(d, info)
    return d


def test_chat_and_serve_prompts_equal_the_training_prompt(tmp_path):
    from chattune.infer.generation import build_prompt
    from chattune.infer.load import Loaded, load_source_tokenizer, read_model_source
    from chattune.infer.requests import prepare_request
    from chattune.render.template import template_kwargs

    train_tok = _qwen3(enable_thinking=False)  # as train/job.py sets it from data.template_kwargs
    r = render(train_tok, CONV, max_len=10**6)
    # the start of the last answer's labels: everything before it is the prompt training conditioned on
    start = max(
        i for i in range(len(r.labels)) if r.labels[i] != IGNORE_INDEX and r.labels[i - 1] == IGNORE_INDEX
    )
    trained_prompt = r.input_ids[:start]
    ref = train_tok.apply_chat_template(
        CONV[:-1], tokenize=True, return_dict=True, add_generation_prompt=True, enable_thinking=False
    )["input_ids"]
    assert trained_prompt == ref
    assert train_tok.decode(trained_prompt).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")

    tok = load_source_tokenizer(read_model_source(_model_dir(tmp_path)))
    assert template_kwargs(tok) == {"enable_thinking": False}
    loaded = Loaded(None, tok, None, "<|im_end|>", "m", [])  # prompts only: no weights are needed
    chat_ids = tok(build_prompt(loaded, CONV[:-1]), add_special_tokens=False)["input_ids"]
    assert chat_ids == trained_prompt

    body = json.dumps({"model": "m", "messages": CONV[:-1], "max_tokens": 4}).encode()
    _, messages, n_prompt, _, req = prepare_request(body, {"m": loaded}, 8)
    serve_prompt = build_prompt(loaded, messages, template_kwargs=req.chat_template_kwargs)
    assert tok(serve_prompt, add_special_tokens=False)["input_ids"] == trained_prompt
    assert n_prompt == len(trained_prompt)
    # a client's chat_template_kwargs still overrides what training recorded
    body = json.dumps({"messages": CONV[:-1], "chat_template_kwargs": {"enable_thinking": True}}).encode()
    _, _, n_think, _, _ = prepare_request(body, {"m": loaded}, 8)
    assert n_think < n_prompt  # no empty think block appended


def test_data_check_and_stats_on_qwen3_two_turn_huanhuan(tmp_path, capsys):
    tok_dir = tmp_path / "tok"
    _qwen3().save_pretrained(tok_dir)
    rows = [{"messages": CONV}, {"messages": [CONV[1], {"role": "assistant", "content": "臣妾在。"}]}]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in rows * 10), encoding="utf-8")
    tree = {
        "model": {"name_or_path": str(tok_dir), "chat_template": "qwen3"},
        "data": {
            "train_path": str(data),
            "eval_ratio": 0,
            "max_len": 256,
            "template_kwargs": {"enable_thinking": False},
        },
    }
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(tree, allow_unicode=True), encoding="utf-8")
    assert main(["data", "check", str(cfg)]) == 0, capsys.readouterr().err
    assert main(["data", "stats", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "10 multi-turn examples had reasoning dropped from earlier turns" in out, out
