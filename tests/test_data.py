"""Data: the tutorials' record shapes become conversations; every bad row names file and line."""

import json
from pathlib import Path

import pytest

from chattune.config.schema import ColumnsConfig, DataConfig
from chattune.data import NEWS_CLS_SYSTEM, read_conversations, read_splits, split_conversations, to_messages
from chattune.errors import ConfigError, DataError


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


# -- formats, sources, mixing (issue 3) -------------------------------------------------------------------
ASSETS = Path(__file__).parent / "assets" / "data"
TUTORIALS = ASSETS / "tutorials"


def data_config(**kw) -> DataConfig:
    return DataConfig(**kw)


def test_sharegpt_system_and_column_mapping():
    rec = {"system": "S", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    assert [m["role"] for m in to_messages(rec)] == ["system", "user", "assistant"]
    cols = ColumnsConfig(prompt="question", query="context", response="answer", system="persona")
    rec = {"question": "翻译", "context": "hello", "answer": "你好", "persona": "P"}
    assert to_messages(rec, columns=cols) == [
        {"role": "system", "content": "P"},
        {"role": "user", "content": "翻译\nhello"},
        {"role": "assistant", "content": "你好"},
    ]
    chat = {"dialog": [{"speaker": "user", "text": "hi"}, {"speaker": "assistant", "text": "yo"}]}
    cols = ColumnsConfig(messages="dialog", role="speaker", content="text")
    assert to_messages(chat, columns=cols)[1] == {"role": "assistant", "content": "yo"}


def test_csv_parquet_and_saved_dataset_read_the_same_records(tmp_path):
    import datasets

    cols = ColumnsConfig(prompt="question", query="context", response="answer", system="persona")
    convs, report = read_conversations(ASSETS / "columns.csv", columns=cols)
    assert report.rows == 3 and [c.where.rsplit(":", 1)[1] for c in convs] == ["2", "3", "5"]
    assert convs[1].messages[0]["content"] == "把下面的话翻译成英文\n你好，\n世界"  # a quoted multi-line cell
    records = [{"instruction": "q1", "input": "", "output": "a1"}, {"instruction": "q2", "output": "a2"}]
    ds = datasets.Dataset.from_list(records)
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "saved_dict"))
    want = [to_messages(r) for r in records]
    for src in ("d.parquet", "saved", "saved_dict"):
        convs, _ = read_conversations(tmp_path / src)
        assert [c.messages for c in convs] == want, src
    with pytest.raises(DataError, match="save_to_disk"):
        read_conversations(tmp_path)  # a plain directory


@pytest.mark.parametrize(
    "spec", ["hf:ShengbinYue/DISC-Law-SFT", "ShengbinYue/DISC-Law-SFT", "ms:swift/zh_cls_fudan-news"]
)
def test_hub_dataset_ids_fail_fast_offline(spec, monkeypatch):
    import time

    import chattune.paths

    monkeypatch.setattr(chattune.paths, "host_reachable", lambda host, timeout_s=3.0: False)
    t0 = time.time()
    with pytest.raises(DataError, match="Download it where there is network") as e:
        read_conversations(spec)
    assert time.time() - t0 < 10 and "data.train_path" in str(e.value)


def test_json_lines_named_json_and_bad_utf8_lines_skip(tmp_path):
    p = tmp_path / "d.json"
    p.write_text(
        '{"instruction": "q", "output": "a"}\n{"instruction": "q2", "output": "a2"}\n', encoding="utf-8"
    )
    assert len(read_conversations(p)[0]) == 2
    convs, report = read_conversations(ASSETS / "broken" / "not_utf8.jsonl", on_bad_row="skip")
    assert len(convs) == 2 and dict(report.skipped) == {"not valid UTF-8; re-save the file as UTF-8": 1}


def test_converters_give_the_records_each_tutorial_trained_on():
    """The tutorials' own conversion code, written out, against ours on samples of their raw files."""
    law = [
        json.loads(x) for x in (TUTORIALS / "disc_law_pair_qa.jsonl").read_text(encoding="utf-8").splitlines()
    ]
    for rec in (
        law
    ):  # self-llm: {"instruction": <legal expert>, "input": input, "output": output}, instruction as system
        assert to_messages(rec, converter="disc_law") == [
            {"role": "system", "content": "你是一个法律专家，请根据用户的问题给出专业的回答"},
            {"role": "user", "content": rec["input"]},
            {"role": "assistant", "content": rec["output"]},
        ]
    news = [json.loads(x) for x in (TUTORIALS / "news_cls.jsonl").read_text(encoding="utf-8").splitlines()]
    for (
        rec
    ) in news:  # SwanLab: input = f"文本:{context},分类选项列表:{catagory}" under the expert system prompt
        msgs = to_messages(rec, converter="news_cls")
        assert msgs[0]["content"] == NEWS_CLS_SYSTEM and msgs[2]["content"] == rec["output"]
        assert msgs[1]["content"] == f"文本:{rec['text']},分类选项列表:{rec['category']}"
    assert "['科技', '时政'" in to_messages(news[1], converter="news_cls")[1]["content"]
    for rec in json.loads((TUTORIALS / "huanhuan.json").read_text(encoding="utf-8")):
        # self-llm: user = instruction + input, system 「现在你要扮演皇帝身边的女人--甄嬛」
        assert to_messages(rec, converter="huanhuan") == [
            {"role": "system", "content": "现在你要扮演皇帝身边的女人--甄嬛"},
            {"role": "user", "content": rec["instruction"] + rec["input"]},
            {"role": "assistant", "content": rec["output"]},
        ]
    ident = json.loads((TUTORIALS / "identity.json").read_text(encoding="utf-8"))
    msgs = to_messages(ident[0], converter="identity", placeholders={"name": "小智", "author": "甄嬛团队"})
    assert msgs[-1]["content"] == ident[0]["output"].replace("{{name}}", "小智").replace(
        "{{author}}", "甄嬛团队"
    )
    assert "{{" not in msgs[-1]["content"]
    with pytest.raises(ConfigError, match="data.identity_name"):
        data_config(train_path="x.json", converter="identity")


def test_mixing_sampling_dedup_and_split_are_deterministic(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps({"instruction": f"a{i}", "output": "x"}) + "\n" for i in range(20)))
    b.write_text("".join(json.dumps({"instruction": f"b{i % 5}", "output": "y"}) + "\n" for i in range(10)))
    dc = data_config(train_path=[str(a), str(b)], train_samples=[8, 30], eval_ratio=0.1, dedup=True)
    train, held, report, eval_report = read_splits(dc, seed=3)
    assert (train, held) == read_splits(dc, seed=3)[:2]
    assert report.duplicates == report.dropped_duplicates == 5 and eval_report is None
    assert len(held) == 2 + 1  # 10% of each source (at least one)
    from_a = [c for c in train if c.messages[0]["content"].startswith("a")]
    from_b = [c for c in train if c.messages[0]["content"].startswith("b")]
    assert len(from_a) == 8 and len(from_b) == 30  # b: 4 left after dedup and split, repeated to 30
    held_keys = {c.messages[0]["content"] for c in held}
    assert not held_keys & {c.messages[0]["content"] for c in train}  # no up-sampled copy leaks into eval
    assert [s["train"] for s in report.sources] == [8, 30]
    # By file: eval from its own source; its conversations that also occur in training are counted.
    dc = data_config(train_path=str(a), eval_path=str(a))
    train, held, _, eval_report = read_splits(dc, seed=0)
    assert len(held) == 20 and eval_report.duplicates == 20
    with pytest.raises(ConfigError, match="data.train_samples"):
        data_config(train_path=[str(a), str(b)], train_samples=[3])


def test_config_keys_round_trip_through_yaml():
    import yaml

    from chattune.config.load import config_from_dict, dump_config
    from chattune.config.schema import Config

    cfg = config_from_dict(
        {
            "data": {
                "train_path": ["a.json", "hf:x/y"],
                "train_samples": [100, None],
                "converter": ["identity", None],
                "identity_name": "小智",
                "identity_author": "我",
                "columns": {"prompt": "question"},
                "truncation": "cut_prompt",
                "dedup": True,
            },
            "model": {"chat_template": "ernie-4.5"},
        }
    )
    assert isinstance(cfg, Config) and cfg.data.columns.prompt == "question"
    assert config_from_dict(yaml.safe_load(dump_config(cfg))) == cfg
    with pytest.raises(ConfigError, match="data.columns.promt"):
        config_from_dict({"data": {"columns": {"promt": "q"}}})


def test_deeply_nested_json_is_a_bad_row_naming_file_and_line(tmp_path):
    deep = "[" * 200_000 + "]" * 200_000
    good = '{"instruction": "q", "output": "a"}'
    jsonl = tmp_path / "deep.jsonl"
    jsonl.write_text(f'{good}\n{{"instruction": "q", "output": {deep}}}\n{good}\n')
    with pytest.raises(DataError) as e:
        read_conversations(jsonl)
    assert (e.value.path, e.value.line) == (str(jsonl), 2) and "nested too deeply" in str(e.value)
    convs, report = read_conversations(jsonl, on_bad_row="skip")
    assert len(convs) == 2 and sum(report.skipped.values()) == 1
    array = tmp_path / "deep.json"
    array.write_text(f"[\n{good},\n{deep}\n]")
    with pytest.raises(DataError, match="nested too deeply") as e:
        read_conversations(array, on_bad_row="skip")  # the array cannot be read past it
    assert e.value.line == 3
    csv = tmp_path / "deep.csv"
    csv.write_text("messages\n" + "[" * 50_000 + "]" * 50_000 + "\n")  # under csv's field size limit
    with pytest.raises(DataError, match="nested too deeply") as e:
        read_conversations(csv)
    assert e.value.line == 2


def test_eval_converter_for_mixed_sources(tmp_path):
    """Training sources with different converters: the eval file's converter is named, or asked for."""
    ident = tmp_path / "identity.json"
    ident.write_text(
        json.dumps([{"instruction": "Who are you?", "input": "", "output": "I am {{name}} by {{author}}."}])
    )
    general = tmp_path / "general.json"
    general.write_text(json.dumps([{"instruction": "2+2?", "input": "", "output": "4"}]))
    held = tmp_path / "held.json"
    held.write_text(
        json.dumps([{"instruction": "Your name?", "input": "", "output": "{{name}}, made by {{author}}."}])
    )
    common = dict(
        train_path=[str(ident), str(general)],
        converter=["identity", None],
        identity_name="Juniper",
        identity_author="Acme Lab",
        eval_path=str(held),
    )
    with pytest.raises(ConfigError, match="data.eval_converter"):
        DataConfig(**common)
    train, held_convs, _, _ = read_splits(DataConfig(**common, eval_converter="identity"), seed=0)
    assert "Juniper" in train[0].messages[-1]["content"] and train[1].messages[-1]["content"] == "4"
    assert held_convs[0].messages[-1]["content"] == "Juniper, made by Acme Lab."


def test_eval_command_fills_identity_placeholders(tmp_path):
    from chattune.evaluate.judge import read_eval_samples

    held = tmp_path / "held.json"
    held.write_text(
        json.dumps([{"instruction": "Your name?", "input": "", "output": "{{name}} ({{author}})"}])
    )
    with pytest.raises(DataError, match="needs a name and an author"):
        read_eval_samples(held, converter="identity")
    (sample,) = read_eval_samples(
        held, converter="identity", placeholders={"name": "Juniper", "author": "Acme"}
    )
    assert sample.reference == "Juniper (Acme)"


def test_a_source_whose_every_row_is_skipped_says_why_each_was(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"instruction": "q"}\n{"instruction": "q2"}\n', encoding="utf-8")
    with pytest.raises(DataError) as e:
        read_conversations(p, on_bad_row="skip")
    msg = str(e.value)
    assert "no usable records: all 2 rows were skipped" in msg and "data.format" in msg
