"""evaluate: `chattune eval` on an adapter and on its base model, on the same data, comparably.

The adapter is built by hand as the trainer writes it (test_infer.make_adapter_dir, LoRA B non-zero so
it changes the answers); the base is the tiny random Qwen2 with the real Qwen2.5 tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_infer import SYSTEM, make_adapter_dir

from chattune.errors import ChattuneError, DataError
from chattune.evaluate.metrics import compute_metrics, default_metrics

RECORDS = [
    {"instruction": "你是谁？", "input": "", "output": "我是甄嬛，家父是大理寺少卿甄远道。"},
    {"instruction": "皇上驾到！", "input": "", "output": "皇上万福金安。"},
    {"instruction": "翻译成英文", "input": "今天天气很好", "output": "The weather is nice today."},
    {
        "messages": [
            {"role": "user", "content": "你好"},
            {"role": "assistant", "content": "你好呀"},
            {"role": "user", "content": "你叫什么名字？"},
            {"role": "assistant", "content": "嬛嬛"},
        ]
    },
]
PROMPTS = ["你是谁？", "皇上驾到！", "翻译成英文\n今天天气很好", "你叫什么名字？"]


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread(one_torch_thread):
    yield


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory, qwen_tokenizer) -> Path:
    return make_adapter_dir(tiny_model_dir, tmp_path_factory.mktemp("eval-run") / "adapter", qwen_tokenizer)


@pytest.fixture
def data(tmp_path) -> Path:
    path = tmp_path / "eval.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in RECORDS), encoding="utf-8")
    return path


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_adapter_and_base_model_on_the_same_data(adapter_dir, tiny_model_dir, data, tmp_path, capsys) -> None:
    from chattune.cli import main
    from chattune.evaluate.command import format_metrics_table, run_eval
    from chattune.infer.generation import generate
    from chattune.infer.load import load_for_inference

    kw = dict(max_new_tokens=5, batch_size=3, device="cpu")
    tuned = run_eval(adapter_dir, data, output_dir=tmp_path / "tuned", **kw)
    capsys.readouterr()
    flags = ["--max-new-tokens", "5", "--batch-size", "3", "--device", "cpu"]  # the `chattune eval` command
    assert (
        main(["eval", str(tiny_model_dir), "--data", str(data), "--output", str(tmp_path / "base"), *flags])
        == 0
    )
    base = json.loads((tmp_path / "base" / "metrics.json").read_text())
    printed = format_metrics_table(tuned) + "\n" + capsys.readouterr().out

    rows = {name: _read_jsonl(tmp_path / name / "predictions.jsonl") for name in ("tuned", "base")}
    saved = {name: json.loads((tmp_path / name / "metrics.json").read_text()) for name in ("tuned", "base")}
    assert saved == {"tuned": tuned, "base": base}
    for name in ("tuned", "base"):
        assert sorted(p.name for p in (tmp_path / name).iterdir()) == ["metrics.json", "predictions.jsonl"]
        # One row per record, in file order, the reference being the record's last answer.
        assert [r["prompt"] for r in rows[name]] == PROMPTS
        assert [r["reference"] for r in rows[name]] == [
            "我是甄嬛，家父是大理寺少卿甄远道。",
            "皇上万福金安。",
            "The weather is nice today.",
            "嬛嬛",
        ]
        # The stored scores are the metrics of the stored predictions, the generation defaults.
        preds, refs = [r["prediction"] for r in rows[name]], [r["reference"] for r in rows[name]]
        assert list(saved[name]["metrics"]) == default_metrics("generation")
        assert saved[name]["metrics"] == pytest.approx(
            compute_metrics(preds, refs, default_metrics("generation"))
        )

    # Comparable: same data (by hash), examples, decoding and metric names; only the weights differ.
    for key in ("data", "data_sha256", "examples", "task", "generation"):
        assert tuned[key] == base[key], key
    assert tuned["examples"] == 4 and tuned["generation"]["decoding"] == "greedy"
    assert tuned["adapter"] == str(adapter_dir) and base["adapter"] is None
    assert tuned["base_model"] == base["base_model"] == str(tiny_model_dir)
    assert tuned["system_prompt"] == SYSTEM and base["system_prompt"] is None
    assert [r["prediction"] for r in rows["tuned"]] != [r["prediction"] for r in rows["base"]]

    # Batched, length-sorted generation gives each record the answer it gets alone (mask and pad id right).
    loaded = load_for_inference(adapter_dir, device="cpu")
    convs = [
        [{"role": "user", "content": "你是谁？"}],
        [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好呀"},
         {"role": "user", "content": "你叫什么名字？"}],
    ]  # fmt: skip
    alone = [generate(loaded, [c], max_new_tokens=5)[0] for c in convs]
    assert [rows["tuned"][0]["prediction"], rows["tuned"][3]["prediction"]] == alone

    # The printed table: a header naming model, data and settings, then one line per metric.
    assert f"eval of {adapter_dir.parent.name} on {data}: 4 examples, task generation, greedy" in printed
    assert f"system prompt {json.dumps(SYSTEM)}" in printed and "system prompt none" in printed
    for name in default_metrics("generation"):
        assert f"  {name}" in printed
    assert f"wrote {tmp_path / 'base' / 'predictions.jsonl'}" in printed


def test_samples_system_prompt_and_classification(tiny_model_dir, data) -> None:
    from chattune.evaluate.command import format_metrics_table, run_eval
    from chattune.infer.generation import generate
    from chattune.infer.load import load_for_inference

    result = run_eval(
        tiny_model_dir,
        data,
        samples=2,
        task="classification",
        system_prompt="只回答一个词",
        max_new_tokens=4,
        device="cpu",
    )
    assert result["examples"] == 2 and result["system_prompt"] == "只回答一个词"
    assert list(result["metrics"]) == ["accuracy", "macro_f1"]
    loaded = load_for_inference(tiny_model_dir, device="cpu")
    system = {"role": "system", "content": "只回答一个词"}
    answers = [
        generate(loaded, [[system, {"role": "user", "content": q}]], max_new_tokens=4)[0] for q in PROMPTS[:2]
    ]
    refs = ["我是甄嬛，家父是大理寺少卿甄远道。", "皇上万福金安。"]
    assert result["metrics"] == pytest.approx(compute_metrics(answers, refs, ["accuracy", "macro_f1"]))
    assert "accuracy" in format_metrics_table(result)


def test_user_mistakes_fail_before_the_model_loads(data, tmp_path) -> None:
    from chattune.evaluate.command import run_eval

    missing_model = tmp_path / "no-such-model"  # reaching the model would raise ModelError instead
    with pytest.raises(ChattuneError, match="unknown metric.*bleu5"):
        run_eval(missing_model, data, metrics=["bleu4", "bleu5"])
    with pytest.raises(ChattuneError, match="unknown eval task 'qa'"):
        run_eval(missing_model, data, task="qa")
    with pytest.raises(ChattuneError, match="--samples must be at least 1"):
        run_eval(missing_model, data, samples=0)
    with pytest.raises(ChattuneError, match="unknown converter 'nope'"):
        run_eval(missing_model, data, converter="nope")
    no_answer = tmp_path / "q.jsonl"
    no_answer.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "only a question"}\n')
    with pytest.raises(DataError, match=r"q.jsonl:2: missing field 'output'.*reference"):
        run_eval(missing_model, no_answer)
    with pytest.raises(DataError, match=r"nothing.json: file not found"):
        run_eval(missing_model, tmp_path / "nothing.json")
    assert not list(tmp_path.glob("**/metrics.json"))


def test_cli_eval_and_its_errors(adapter_dir, data, tmp_path, capsys) -> None:
    from chattune.cli.parser import main

    out = tmp_path / "out"
    argv = ["eval", str(adapter_dir), "--data", str(data), "--output", str(out), "--samples", "1"]
    assert main(argv + ["--max-new-tokens", "3", "--device", "cpu", "--metrics", "rouge1,rougeL_char"]) == 0
    assert list(json.loads((out / "metrics.json").read_text())["metrics"]) == ["rouge1", "rougeL_char"]
    assert len(_read_jsonl(out / "predictions.jsonl")) == 1
    capsys.readouterr()
    assert main(["eval", str(adapter_dir), "--data", str(data), "--metrics", "bleu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown metric(s) bleu") and "Traceback" not in err


def test_eval_loss_is_the_per_token_mean_whatever_the_batching(tiny_model_dir) -> None:
    """Eval loss = summed token losses / label tokens over the split (not a mean of batch means), the
    same for any batch size, computed without the model's full-vocabulary logits; train mode is kept."""
    from transformers import AutoModelForCausalLM

    from chattune.evaluate.judge import eval_loss

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).train()
    g = torch.Generator().manual_seed(0)
    examples = []
    for n, n_prompt in [(9, 4), (5, 1), (12, 10)]:  # different lengths and label counts
        ids = torch.randint(0, 1000, (n,), generator=g).tolist()
        examples.append({"input_ids": ids, "labels": [-100] * n_prompt + ids[n_prompt:]})

    # Reference: the model's own loss per example (a mean over its shifted targets), re-weighted by count.
    total, count = 0.0, 0
    with torch.no_grad():
        for ex in examples:
            out = model.eval()(input_ids=torch.tensor([ex["input_ids"]]), labels=torch.tensor([ex["labels"]]))
            targets = sum(label != -100 for label in ex["labels"][1:])
            total, count = total + float(out.loss) * targets, count + targets
    model.train()
    for batch_size in (1, 2, 3):
        assert eval_loss(model, examples, pad_id=0, batch_size=batch_size) == pytest.approx(
            total / count, rel=1e-5
        )
    assert model.training


def test_missing_samples_file_names_eval_samples_path(tmp_path):
    # The reader's own hint named data.train_path / data.eval_path, which a user had not got wrong.
    from chattune.evaluate.judge import read_samples

    with pytest.raises(DataError, match=r"nope\.jsonl: file not found; check eval\.samples_path$"):
        read_samples(tmp_path / "nope.jsonl", 2)
    rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(3)]
    (tmp_path / "s.jsonl").write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    assert [s.prompt for s in read_samples(tmp_path / "s.jsonl", 2)] == ["q0", "q1"]
