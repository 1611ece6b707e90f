"""infer: an adapter folder built by hand (as the trainer writes it) loads and generates correctly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from chattune.errors import DataError, ModelError

SYSTEM = "You are a test assistant."
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread(one_torch_thread):
    yield


def make_adapter_dir(
    base_dir: Path, out: Path, tokenizer, *, system_prompt: str | None = SYSTEM, seed: int = 1
) -> Path:
    """The trainer's adapter folder contract, by hand: LoRA with non-zero B so the adapter changes logits.

    Shared with test_merge.py and test_serve.py (imported from here).
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # peft starts B at zero (a no-op adapter); make it matter
    out.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(out)
    tokenizer.save_pretrained(out)  # loading the 151k-token tokenizer again costs ~2 s
    (out / "chattune.yaml").write_text("model:\n  name_or_path: tiny\n", encoding="utf-8")
    info = {
        "base_model": str(base_dir),
        "base_model_path": str(base_dir),
        "system_prompt": system_prompt,
        "end_of_turn_token": "<|im_end|>",
        "max_len": 128,
    }
    (out / "inference.json").write_text(json.dumps(info), encoding="utf-8")
    return out


@pytest.fixture(scope="session")
def adapter_dir(tiny_model_dir, tmp_path_factory, qwen_tokenizer) -> Path:
    return make_adapter_dir(tiny_model_dir, tmp_path_factory.mktemp("run") / "adapter", qwen_tokenizer)


@pytest.fixture(scope="session")
def loaded(adapter_dir):
    from chattune.infer.load import load_for_inference

    return load_for_inference(adapter_dir, device="cpu")


QUESTIONS = [
    [{"role": "user", "content": "你好"}],
    [{"role": "user", "content": "What is the capital of France? Answer in one long sentence please."}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "2+2?"}],
]


def test_tutorial_inference_code_works_on_the_adapter(adapter_dir, tiny_model_dir, loaded):
    """What the tutorials do after training: plain transformers + PeftModel + apply_chat_template."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(adapter_dir)
    base = AutoModelForCausalLM.from_pretrained(
        json.loads((adapter_dir / "inference.json").read_text())["base_model"]
    )
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "你好"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = tok([text], return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    theirs = tok.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    # Ours: the stored system prompt is added, so the same text and the same greedy answer come out.
    from chattune.infer.generation import build_prompt, generate

    assert build_prompt(loaded, messages[1:]) == text
    assert generate(loaded, [messages[1:]], max_new_tokens=6) == [theirs]
    # And the adapter changes the model: the base alone answers differently.
    base_logits = AutoModelForCausalLM.from_pretrained(tiny_model_dir)(**inputs).logits
    assert not torch.allclose(base_logits, model(**inputs).logits)


def test_loaded_facts(loaded):
    tok = loaded.tokenizer
    assert loaded.name == "run0"  # the run folder's name, not "adapter"
    assert loaded.system_prompt == SYSTEM
    assert loaded.end_of_turn_token == "<|im_end|>"
    assert tok.convert_tokens_to_ids("<|im_end|>") in loaded.stop_token_ids
    assert tok.padding_side == "left" and tok.pad_token_id is not None
    assert not loaded.model.training
    assert loaded.max_context == 512


def test_build_prompt_system_handling(loaded):
    from chattune.infer.generation import build_prompt

    user = [{"role": "user", "content": "hi"}]
    assert build_prompt(loaded, user).startswith(f"<|im_start|>system\n{SYSTEM}<|im_end|>")
    assert build_prompt(loaded, user).endswith("<|im_start|>assistant\n")
    own = [{"role": "system", "content": "Mine."}, *user]
    assert build_prompt(loaded, own).startswith("<|im_start|>system\nMine.<|im_end|>")
    assert build_prompt(loaded, user, system_prompt="Override.").startswith("<|im_start|>system\nOverride.")


def test_batched_generation_equals_one_at_a_time(loaded):
    from chattune.infer.generation import generate

    batched = generate(loaded, QUESTIONS, max_new_tokens=8)
    single = [generate(loaded, [q], max_new_tokens=8)[0] for q in QUESTIONS]
    assert batched == single
    assert all(batched)  # a random model still produces text
    # The trainer's tokenizer pads on the right (for training); generation must still pad on the left.
    loaded.tokenizer.padding_side = "right"
    try:
        assert generate(loaded, QUESTIONS, max_new_tokens=8) == single
    finally:
        loaded.tokenizer.padding_side = "left"


def test_completion_reasons_and_stops(loaded):
    from dataclasses import replace

    from chattune.infer.generation import generate, generate_completions

    [free] = generate_completions(loaded, QUESTIONS[:1], max_new_tokens=6)
    assert free.finish_reason == "length" and free.completion_tokens == 6 and free.prompt_tokens > 0
    # Stop strings: cut before the stop string, and the answer finishes with reason "stop".
    stop = free.text[2:4]
    [cut] = generate_completions(loaded, QUESTIONS[:1], max_new_tokens=6, stop=[stop])
    assert cut.text == free.text[: free.text.find(stop)] and cut.finish_reason == "stop"
    # End-of-turn: pretend the token the model emits third is the end-of-turn token.
    ids = _greedy_ids(loaded, QUESTIONS[0], 6)
    k = next(i for i in range(1, 6) if ids[i] not in ids[:i])
    eot = replace(loaded, stop_token_ids=[*loaded.stop_token_ids, ids[k]])
    [short] = generate_completions(eot, QUESTIONS[:1], max_new_tokens=6)
    assert short.finish_reason == "stop" and short.completion_tokens == k + 1  # the end token counts
    assert short.text == loaded.tokenizer.decode(ids[:k])
    # n answers per conversation, conversation-major; sampling with a seed is reproducible.
    one, two = (generate(loaded, [q], max_new_tokens=3)[0] for q in QUESTIONS[:2])
    assert generate(loaded, QUESTIONS[:2], max_new_tokens=3, n=2) == [one, one, two, two]
    a = generate(loaded, QUESTIONS[:1], max_new_tokens=5, temperature=1.0, seed=7, n=3)
    b = generate(loaded, QUESTIONS[:1], max_new_tokens=5, temperature=1.0, seed=7, n=3)
    assert a == b and len(a) == 3


def _greedy_ids(loaded, messages: list[dict], k: int) -> list[int]:
    """The ids the model itself generates, through plain transformers."""
    from chattune.infer.generation import build_prompt

    enc = loaded.tokenizer([build_prompt(loaded, messages)], return_tensors="pt", add_special_tokens=False)
    out = loaded.model.generate(**enc, max_new_tokens=k, do_sample=False, eos_token_id=None)
    return out[0, enc["input_ids"].shape[1] :].tolist()


def test_stream_matches_generate(loaded):
    from chattune.infer.generation import Completion, generate, stream, stream_events

    expected = generate(loaded, [QUESTIONS[1]], max_new_tokens=10)[0]
    pieces = list(stream(loaded, QUESTIONS[1], max_new_tokens=10))
    assert "".join(pieces) == expected
    *texts, final = list(stream_events(loaded, QUESTIONS[1], max_new_tokens=10, stop=[expected[3:5]]))
    assert isinstance(final, Completion) and final.finish_reason == "stop"
    assert "".join(texts) == final.text == expected[: expected.find(expected[3:5])]


def test_stream_closed_early_stops_generation(loaded):
    import threading

    from chattune.infer.generation import stream

    it = stream(loaded, QUESTIONS[0], max_new_tokens=200)
    next(it)
    it.close()  # the generation thread must end, not run on to 200 tokens in the background
    assert not [t for t in threading.enumerate() if t.name == "chattune-generate"]


def test_missing_paths_are_model_errors(tmp_path, adapter_dir):
    from chattune.infer.load import load_for_inference

    with pytest.raises(ModelError, match="nope"):
        load_for_inference(tmp_path / "nope")
    with pytest.raises(ModelError, match="neither an adapter"):
        load_for_inference(tmp_path)
    moved = tmp_path / "moved"
    moved.mkdir()
    for f in adapter_dir.iterdir():
        (moved / f.name).write_bytes(f.read_bytes())
    info = json.loads((moved / "inference.json").read_text())
    info.update(base_model="/gone/base", base_model_path="/gone/base")
    (moved / "inference.json").write_text(json.dumps(info))
    with pytest.raises(ModelError, match="/gone/base"):
        load_for_inference(moved)


def test_builtin_base_is_rebuilt_when_its_directory_is_gone(tmp_path, monkeypatch, tiny_model_dir):
    import chattune.model.resolve
    from chattune.infer.load import read_model_source

    calls = []

    def fake_materialize(name: str) -> Path:
        calls.append(name)
        return tiny_model_dir

    monkeypatch.setattr(chattune.model.resolve, "materialize_builtin", fake_materialize)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/gone"}))
    info = {"base_model": "builtin:tiny-qwen2", "base_model_path": "/gone/cache/tiny", "system_prompt": None}
    (adapter / "inference.json").write_text(json.dumps(info))
    src = read_model_source(adapter)
    assert calls == ["tiny-qwen2"] and src.base_dir == tiny_model_dir


def test_plain_model_dir_loads(tiny_model_dir):
    from chattune.infer.generation import generate
    from chattune.infer.load import load_for_inference

    plain = load_for_inference(tiny_model_dir, device="cpu")
    assert plain.system_prompt is None and plain.end_of_turn_token == "<|im_end|>"
    assert len(generate(plain, QUESTIONS[:2], max_new_tokens=3)) == 2


def test_predict_file(loaded, tmp_path, capsys):
    from chattune.infer.generation import generate
    from chattune.infer.predict import predict_file

    src = tmp_path / "in.jsonl"
    records = [
        {"instruction": "Translate", "input": "你好", "output": "hello"},
        {"messages": [{"role": "user", "content": "What is 2+2?"}]},
        {"instruction": "Say hi"},
    ]
    src.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n", encoding="utf-8")
    out = tmp_path / "sub" / "pred.jsonl"
    assert predict_file(loaded, src, out, batch_size=2, max_new_tokens=4) == 3
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["prompt"] for r in rows] == ["Translate\n你好", "What is 2+2?", "Say hi"]
    assert [r["reference"] for r in rows] == ["hello", None, None]
    single = generate(loaded, [[{"role": "user", "content": "What is 2+2?"}]], max_new_tokens=4)[0]
    assert rows[1]["prediction"] == single
    assert [p.name for p in out.parent.iterdir()] == ["pred.jsonl"]  # no temp file left behind
    assert "predict: 2/3 answered" in capsys.readouterr().err  # progress after every batch

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "ok"}\n{not json\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.jsonl:2"):
        predict_file(loaded, bad, tmp_path / "never.jsonl")
    assert not (tmp_path / "never.jsonl").exists()
    bad.write_text('{"foo": 1}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.jsonl:1: unknown record shape"):
        predict_file(loaded, bad, tmp_path / "never.jsonl")


def _feed(lines: list[str]):
    """An input() stand-in: the given lines, then end of input (Ctrl-D)."""
    it = iter(lines)

    def read(prompt: str) -> str:
        try:
            return next(it)
        except StopIteration:
            raise EOFError from None

    return read, it


def test_chat_commands(loaded, monkeypatch):
    import io

    import chattune.infer.chat
    from chattune.infer.chat import run_chat

    seen: list[list[dict]] = []

    def fake_stream(loaded, messages, **kw):
        seen.append([dict(m) for m in messages])
        yield from ["ok", "!"]

    monkeypatch.setattr(chattune.infer.chat, "stream", fake_stream)
    read, rest = _feed(
        [
            "hello",
            "  ",
            "/system Be brief.",
            "second",
            "/system",
            "/reset",
            "third",
            "/bogus",
            "/exit",
            "never",
        ]
    )
    out = io.StringIO()
    history = run_chat(loaded, input_fn=read, output=out)

    user = lambda text: {"role": "user", "content": text}  # noqa: E731
    answer = {"role": "assistant", "content": "ok!"}
    assert seen == [
        [{"role": "system", "content": SYSTEM}, user("hello")],  # the adapter's system prompt by default
        [{"role": "system", "content": "Be brief."}, user("hello"), answer, user("second")],
        [{"role": "system", "content": "Be brief."}, user("third")],  # after /reset
    ]
    assert history == [user("third"), answer]
    text = out.getvalue()
    assert "ok!\n" in text and "(conversation cleared)" in text and "(system prompt: Be brief.)" in text
    assert "unknown command /bogus" in text
    assert list(rest) == ["never"]  # /exit stopped reading


def test_chat_streams_the_real_answer(loaded):
    import io

    from chattune.infer.chat import run_chat
    from chattune.infer.generation import generate

    read, _ = _feed(["你好"])
    out = io.StringIO()
    history = run_chat(loaded, input_fn=read, output=out, max_new_tokens=5, temperature=0.0)
    want = generate(loaded, [[{"role": "user", "content": "你好"}]], max_new_tokens=5)[0]
    assert history[-1] == {"role": "assistant", "content": want}
    assert f"{want}\n" in out.getvalue()


def test_predict_command(adapter_dir, loaded, tmp_path, capsys):
    """`chattune predict` through the CLI: the same answers as `generate` (the server's code path)."""
    from chattune.cli.parser import main
    from chattune.infer.generation import generate

    src = tmp_path / "in.jsonl"
    records = [
        {"instruction": "Translate", "input": "你好", "output": "hello"},
        {"messages": [{"role": "user", "content": "What is 2+2?"}]},
        {"messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "2+2?"}]},
    ]
    src.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n", encoding="utf-8")
    out = tmp_path / "pred.jsonl"
    argv = ["predict", str(adapter_dir), "--input", str(src), "--output", str(out), "--device", "cpu"]
    assert main([*argv, "--batch-size", "2", "--max-new-tokens", "5"]) == 0
    assert "wrote 3 predictions" in capsys.readouterr().err
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    conversations = [
        [{"role": "user", "content": "Translate\n你好"}],
        records[1]["messages"],
        records[2]["messages"],
    ]
    assert [r["prediction"] for r in rows] == generate(loaded, conversations, max_new_tokens=5)
    assert [r["reference"] for r in rows] == ["hello", None, None]

    src.write_text('{"instruction": "ok"}\n{not json\n', encoding="utf-8")
    assert main([*argv, "--max-new-tokens", "2"]) == 2  # one readable line naming file and line
    err = capsys.readouterr().err
    assert "in.jsonl:2" in err and "Traceback" not in err


def test_chat_command_with_piped_stdin(adapter_dir, loaded):
    """`chattune chat` as a user runs it (a subprocess reading stdin): commands, streaming, system prompt."""
    import os
    import subprocess
    import sys

    from chattune.infer.generation import generate

    lines = ["你好", "/system Be brief.", "second", "/reset", "third", "/exit", "never"]
    cmd = [sys.executable, "-m", "chattune", "chat", str(adapter_dir), "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONIOENCODING": "utf-8"}
    done = subprocess.run(
        [*cmd, "--max-new-tokens", "4"],
        input="\n".join(lines) + "\n",
        capture_output=True,
        text=True,
        encoding="utf-8",
        env=env,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr
    brief = {"role": "system", "content": "Be brief."}
    first = [{"role": "user", "content": "你好"}]  # the adapter's stored system prompt applies
    a1 = generate(loaded, [first], max_new_tokens=4)[0]
    second = [brief, *first, {"role": "assistant", "content": a1}, {"role": "user", "content": "second"}]
    a2 = generate(loaded, [second], max_new_tokens=4)[0]
    a3 = generate(loaded, [[brief, {"role": "user", "content": "third"}]], max_new_tokens=4)[0]
    out = done.stdout
    expected_in_order = [
        f"(system prompt: {SYSTEM})",
        f">>> {a1}\n",
        "(system prompt: Be brief.)",
        f">>> {a2}\n",
        "(conversation cleared)",
        f">>> {a3}\n",
    ]
    at = 0
    for piece in expected_in_order:
        found = out.find(piece, at)
        assert found >= 0, f"{piece!r} missing after position {at} of:\n{out}"
        at = found + len(piece)
    assert out.count(">>> ") == 6  # /exit ended the session: "never" was not read


def test_chat_writes_to_the_current_stdout(loaded, monkeypatch):
    """Output goes to sys.stdout as it is when chat runs (redirected by a caller), not as it was at import."""
    import contextlib
    import io

    import chattune.infer.chat
    from chattune.infer.chat import run_chat

    monkeypatch.setattr(chattune.infer.chat, "stream", lambda loaded, messages, **kw: iter(["streamed"]))
    read, _ = _feed(["hi"])
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        run_chat(loaded, input_fn=read)
    assert "streamed\n" in buf.getvalue()


def test_chat_names_the_templates_default_system_prompt(loaded):
    """No stored system prompt, but the template inserts one (Qwen's, SmolLM2's): chat says which."""
    import io

    from chattune.infer.chat import run_chat

    saved = loaded.system_prompt
    loaded.system_prompt = None
    try:
        out = io.StringIO()
        read, _ = _feed(["/system", "/exit"])
        run_chat(loaded, input_fn=read, output=out)
    finally:
        loaded.system_prompt = saved
    assert (
        "the chat template puts its default first: You are Qwen, created by Alibaba Cloud" in out.getvalue()
    )
