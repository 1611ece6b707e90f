"""`chattune data check|stats|preview|convert` and the pre-flight: the real Qwen2.5 tokenizer, bundled
data and deliberately broken files; every failure is one readable line and a non-zero exit."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from chattune.cli.parser import main
from chattune.data import Conversation, read_conversations
from chattune.render.examples import IGNORE_INDEX
from chattune.render.preflight import preflight
from chattune.render.stats import histogram, length_table

REPO = Path(__file__).resolve().parents[1]
BROKEN = REPO / "tests" / "assets" / "data" / "broken"
HUANHUAN = REPO / "data" / "huanhuan" / "huanhuan.json"


def write_config(tmp_path, data: dict, model: dict | None = None) -> Path:
    tree = {"model": model or {"name_or_path": "builtin:tiny-qwen2"}, "data": data}
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(tree, allow_unicode=True), encoding="utf-8")
    return p


# file, (line, reason) of the first bad row, skipped rows with `skip` (None: stops even then)
BROKEN_FILES = [
    ("bad_json.jsonl", 2, "malformed JSON", 1),
    ("bad_array.json", 3, "malformed JSON", None),
    ("wrong_types.jsonl", 2, "field 'instruction' must be a string, got list", 2),
    ("missing_fields.jsonl", 2, "missing field 'output'", 2),
    ("empty_answer.json", 3, "empty assistant answer", 1),
    ("unknown_role.jsonl", 2, "unknown role 'bot'", 1),
    ("role_order.jsonl", 2, "turn 2 is 'user' but 'assistant' was expected", 2),
    ("long_prompt.jsonl", 2, "no answer token left within data.max_len (64 tokens)", 1),
    ("not_utf8.jsonl", 2, "not valid UTF-8", 1),
]


@pytest.mark.parametrize("name, line, reason, n_skipped", BROKEN_FILES, ids=[b[0] for b in BROKEN_FILES])
def test_broken_files_stop_with_file_line_reason_or_are_counted(
    tmp_path, capsys, name, line, reason, n_skipped
):
    path = BROKEN / name
    cfg = write_config(tmp_path, {"train_path": str(path), "max_len": 64})
    assert main(["data", "check", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {path}:{line}: ") and reason in err and "\n" not in err
    code = main(["data", "check", str(cfg), "data.on_bad_row=skip"])
    out, err = capsys.readouterr()
    if n_skipped is None:
        assert code == 2 and "stops even with data.on_bad_row: skip" in err
        return
    assert code == 0, err
    read_skipped = int(out.split(" kept, ")[1].split(" skipped")[0])
    render_dropped = sum(
        int(x.split(":")[0].split()[-1]) for x in out.splitlines() if x.startswith("  dropped ")
    )
    assert read_skipped + render_dropped == n_skipped, out


def test_check_passes_on_bundled_data_and_names_the_end_of_turn(tmp_path, capsys):
    cfg = write_config(tmp_path, {"train_path": str(HUANHUAN), "eval_ratio": 0.05, "max_len": 384})
    assert main(["data", "check", str(cfg), "data.system_prompt=现在你要扮演皇帝身边的女人--甄嬛"]) == 0
    out = capsys.readouterr().out
    assert (
        "end-of-turn '<|im_end|>'" in out
        and "3353 train / 176 eval" in out
        and out.endswith("ok: the data can be trained on\n")
    )


def test_preview_json_checked_by_an_outside_script(tmp_path, qwen_tokenizer):
    """What an outside script does: parse stdout, compare with apply_chat_template, decode the labels."""
    cfg = write_config(
        tmp_path,
        {"train_path": str(REPO / "data/news-cls/news_cls.jsonl"), "converter": "news_cls", "max_len": 384},
    )
    proc = subprocess.run(
        [sys.executable, "-m", "chattune", "data", "preview", str(cfg), "--json", "-n", "25"],
        capture_output=True,
        text=True,
        check=True,
    )
    rows = [json.loads(x) for x in proc.stdout.splitlines()]
    assert len(rows) == 25
    for row in rows:
        want = qwen_tokenizer.apply_chat_template(row["messages"], tokenize=True, return_dict=True)[
            "input_ids"
        ]
        assert row["input_ids"] == list(want)
        trained = [i for i, lab in zip(row["input_ids"], row["labels"], strict=True) if lab != IGNORE_INDEX]
        assert qwen_tokenizer.decode(trained) == row["messages"][-1]["content"] + "<|im_end|>"


def test_preview_highlights_trained_tokens(tmp_path, capsys):
    cfg = write_config(tmp_path, {"train_path": str(HUANHUAN), "max_len": 384})
    assert main(["data", "preview", str(cfg), "-n", "1", "--color", "always"]) == 0
    out = capsys.readouterr().out
    assert "\033[1;32m你放心，本宫到任何时候都不会自轻自贱委屈了这孩子。<|im_end|>\033[0m" in out
    assert main(["data", "preview", str(cfg), "-n", "1", "--color", "never"]) == 0
    assert "[[你放心，本宫到任何时候都不会自轻自贱委屈了这孩子。<|im_end|>]]" in capsys.readouterr().out


def test_stats_table_histogram_and_png(tmp_path, capsys):
    cfg = write_config(tmp_path, {"train_path": str(HUANHUAN), "max_len": 64})
    png = tmp_path / "lengths.png"
    assert main(["data", "stats", str(cfg), "--png", str(png)]) == 0
    out = capsys.readouterr().out
    assert "duplicated: 112 conversations repeat an earlier one" in out
    for row in ("prompt", "answer", "total"):
        assert f"\n  {row} " in out
    assert "truncated to 64 tokens (keep_end)" in out and "█" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_stats_on_a_large_file_reports_rate_and_time_left(tmp_path, capsys):
    """From PARALLEL_MIN conversations on, each tokenising pass says done/total, rate and time left as it
    goes (throttled: a line after the first chunk, then at most one every 10 s, then the final count)."""
    import re

    from chattune.render.cache import PARALLEL_MIN

    n = PARALLEL_MIN + 100
    data = tmp_path / "big.jsonl"
    rows = [{"instruction": f"What is {i} + 1?", "output": f"{i + 1}"} for i in range(n)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    cfg = write_config(tmp_path, {"train_path": str(data), "max_len": 64, "cache": False})
    assert main(["data", "stats", str(cfg)]) == 0
    err = capsys.readouterr().err
    for label in ("tokenising at full length", "tokenising at max_len 64"):
        lines = [line for line in err.splitlines() if line.startswith(f"{label}: ")]
        assert re.fullmatch(
            rf"{label}: \d+/{n} conversations \(\d+ s, [\d.,]+/s, about \d+ s left\)", lines[0]
        )
        assert lines[-1].startswith(f"{label}: {n}/{n} conversations (") and "left" not in lines[-1]
        assert len(lines) < 10  # not a line per chunk of 256


def test_length_table_and_histogram():
    ex = [
        {"input_ids": [0] * n, "labels": [IGNORE_INDEX] * (n - a) + [1] * a}
        for n, a in [(10, 4), (20, 5), (30, 6)]
    ]
    table = length_table(ex)
    assert table["total"] == {"mean": 20.0, "p50": 20, "p90": 30, "max": 30}
    assert table["answer"]["max"] == 6 and table["prompt"]["p50"] == 15
    assert histogram([0, 4, 5, 9, 10], bins=2) == [(0, 4, 2), (5, 9, 2), (10, 14, 1)]


def test_convert_writes_the_converted_records(tmp_path, capsys):
    out = tmp_path / "law.jsonl"
    src = REPO / "tests/assets/data/tutorials/disc_law_pair_qa.jsonl"
    assert main(["data", "convert", str(src), str(out), "--converter", "disc_law"]) == 0
    assert "wrote 2 records" in capsys.readouterr().err
    again, _ = read_conversations(out)
    assert [c.messages for c in again] == [
        c.messages for c in read_conversations(src, converter="disc_law")[0]
    ]
    out = tmp_path / "identity.json"
    src = REPO / "tests/assets/data/tutorials/identity.json"
    assert main(["data", "convert", str(src), str(out), "--converter", "identity"]) == 2
    assert "--name and --author" in capsys.readouterr().err
    args = ["--converter", "identity", "--name", "小智", "--author", "甄嬛团队", "--to", "alpaca"]
    assert main(["data", "convert", str(src), str(out), *args]) == 0
    records = json.loads(out.read_text(encoding="utf-8"))
    assert records[0] == {"instruction": "hi", "input": "", "output": records[0]["output"]}
    assert "小智" in records[0]["output"] and "{{" not in out.read_text(encoding="utf-8")


def test_preflight_warnings(qwen_tokenizer, tmp_path):
    import copy

    conv = Conversation(
        [{"role": "user", "content": "你是谁？"}, {"role": "assistant", "content": "我是 {{name}}"}], "x:1"
    )
    assert (
        preflight(
            qwen_tokenizer,
            [Conversation(conv.messages[:1] + [{"role": "assistant", "content": "甄嬛"}], "y")],
        )
        == []
    )
    tok = copy.deepcopy(qwen_tokenizer)
    tok.pad_token = "<|im_end|>"
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 151643}))
    warnings = preflight(tok, [conv], model_dir=tmp_path)
    assert len(warnings) == 2  # pad == end-of-turn is handled (padding masked by position): no warning
    assert "stops on token ids [151643]" in warnings[0] and "<|im_end|>" in warnings[0]
    assert "data.converter: identity" in warnings[1]


def test_named_ernie_template_on_a_tokenizer_only_directory(tmp_path, qwen_tokenizer, capsys):
    import copy

    tok = copy.deepcopy(qwen_tokenizer)
    tok.add_tokens(["<|begin_of_sentence|>", "<|end_of_sentence|>"], special_tokens=True)
    tok_dir = tmp_path / "ernie-tokenizer"
    tok.save_pretrained(tok_dir)  # tokenizer files only, no config.json and no weights
    cfg = write_config(
        tmp_path,
        {"train_path": str(REPO / "tests/assets/data/tutorials/huanhuan.json"), "converter": "huanhuan"},
        model={"name_or_path": str(tok_dir), "chat_template": "ernie-4.5"},
    )
    assert main(["data", "check", str(cfg), "--all"]) == 0
    captured = capsys.readouterr()
    assert "end-of-turn '<|end_of_sentence|>'" in captured.out
    assert "first trained token also holds template text" in captured.err  # ' 皇' joins 'Assistant: '


@pytest.mark.parametrize("overrides", [["data.truncation=drop"], ["data.max_len=8", "data.on_bad_row=skip"]])
def test_check_and_train_refuse_data_whose_every_row_is_dropped(tmp_path, capsys, overrides):
    data = tmp_path / "long.jsonl"
    rows = [{"instruction": "很长的问题" * 40, "output": "回答" * 40} for _ in range(3)]
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    cfg = write_config(tmp_path, {"train_path": str(data), "max_len": 64})
    assert main(["data", "check", str(cfg), *overrides]) == 2
    out, err = capsys.readouterr()
    assert "ok:" not in out
    assert err.startswith(f"error: {data}: no example left to train on: all 3 conversations were dropped (3 ")
    assert "{" not in err and "\n" not in err.strip() and "data.max_len" in err
    run_dir = tmp_path / "run"
    assert main(["train", str(cfg), *overrides, f"train.output_dir={run_dir}", "eval.samples=0"]) == 2
    # (the first use of the built-in model writes it to the cache, with progress output, before the error)
    assert capsys.readouterr().err.strip().endswith(err.strip()) and not run_dir.exists()
