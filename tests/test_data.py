"""Data: the tutorials' record shapes become conversations; every bad row names file and line."""

import json

import pytest

from chattune.data import read_conversations, split_conversations, to_messages
from chattune.errors import DataError


def test_alpaca_user_turn_joins_instruction_and_input():
    msgs = to_messages({"instruction": "翻译", "input": "hello", "output": "你好"}, system_prompt="S")
    assert msgs == [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "翻译\nhello"},
        {"role": "assistant", "content": "你好"},
    ]
    assert to_messages({"instruction": "q", "input": "", "output": "a"})[0] == {
        "role": "user",
        "content": "q",
    }


def test_alpaca_history_and_record_system():
    rec = {"instruction": "q2", "output": "a2", "system": "SYS", "history": [["q1", "a1"]]}
    roles = [m["role"] for m in to_messages(rec, system_prompt="ignored: the record has one")]
    assert roles == ["system", "user", "assistant", "user", "assistant"]
    assert to_messages(rec)[0]["content"] == "SYS"


def test_messages_and_sharegpt():
    m = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    assert to_messages(m)[1]["content"] == "yo"
    s = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}
    assert to_messages(s) == to_messages(m)


def test_converters():
    news = {"text": "证监会紧箍咒", "category": "科技, 财经", "output": "财经"}
    msgs = to_messages(news, converter="news_cls")
    assert msgs[1]["content"] == "文本:证监会紧箍咒,分类选项列表:科技, 财经" and msgs[2]["content"] == "财经"
    assert "文本分类" in msgs[0]["content"]
    law = to_messages({"id": "1", "input": "问", "output": "答"}, converter="disc_law")
    assert law[0]["content"] == "你是一个法律专家，请根据用户的问题给出专业的回答"


BAD_ROWS = [
    ('{"instruction": "q", "output": "a"}\n{"instruction": "q", "output": \n', 2, "malformed JSON"),
    ('{"instruction": "q"}\n', 1, "missing field 'output'"),
    ('{"instruction": "q", "output": "  "}\n', 1, "empty assistant answer"),
    ('{"instruction": 3, "output": "a"}\n', 1, "must be a string"),
    ('{"messages": [{"role": "bot", "content": "x"}]}\n', 1, "unknown role"),
    ('{"messages": [{"role": "assistant", "content": "x"}]}\n', 1, "'user' was expected"),
    ('{"messages": [{"role": "user", "content": "x"}]}\n', 1, "must end with an assistant"),
    ("[1, 2]\n", 1, "must be a JSON object"),
    ('{"foo": 1}\n', 1, "unknown record shape"),
]


@pytest.mark.parametrize("text, line, reason", BAD_ROWS)
def test_bad_rows_name_file_and_line(tmp_path, text, line, reason):
    p = tmp_path / "d.jsonl"
    p.write_text('{"instruction": "ok", "output": "ok"}\n' + text, encoding="utf-8")
    with pytest.raises(DataError) as e:
        read_conversations(p)
    assert e.value.line == line + 1 and reason in str(e.value) and str(p) in str(e.value)


def test_skip_counts_bad_rows(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(
        "".join(['{"instruction": "ok", "output": "ok"}\n'] + [t for t, _, _ in BAD_ROWS]), encoding="utf-8"
    )
    convs, report = read_conversations(p, on_bad_row="skip")
    assert len(convs) == 2  # the good row, and the first good row of the malformed-JSON case
    assert report.rows == 11 and sum(report.skipped.values()) == 9


def test_json_array_line_numbers_and_bad_bytes(tmp_path):
    p = tmp_path / "d.json"
    recs = [{"instruction": "q", "output": "a"}, {"instruction": "q", "output": ""}]
    p.write_text(json.dumps(recs, indent=2), encoding="utf-8")
    with pytest.raises(DataError) as e:
        read_conversations(p)
    assert e.value.line == 6  # the second record's opening brace
    b = tmp_path / "b.jsonl"
    b.write_bytes(b'{"instruction": "q", "output": "a"}\n{"instruction": "\xff", "output": "a"}\n')
    with pytest.raises(DataError, match="UTF-8") as e:
        read_conversations(b)
    assert e.value.line == 2
    with pytest.raises(DataError, match="not found"):
        read_conversations(tmp_path / "nope.json")


def test_split_is_deterministic():
    items = list(range(100))
    a = split_conversations(items, 0.1, seed=1)
    assert a == split_conversations(items, 0.1, seed=1)
    assert len(a[1]) == 10 and sorted(a[0] + a[1]) == items
    assert a != split_conversations(items, 0.1, seed=2)
