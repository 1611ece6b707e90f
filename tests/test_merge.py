"""merge: the merged model computes what base + adapter computes, and loads anywhere on its own."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_model_dir
from test_infer import LORA_TARGETS, SYSTEM, make_adapter_dir

from chattune.errors import ChattuneError


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread(one_torch_thread):
    yield


@pytest.fixture(scope="module")
def untied_model_dir(tmp_path_factory, qwen_tokenizer) -> Path:
    """Like conftest's tiny model, but with a separate lm_head (as in Qwen2.5-7B)."""
    return build_tiny_model_dir(
        tmp_path_factory.mktemp("tiny-untied"), qwen_tokenizer, tie_word_embeddings=False
    )


def _inputs(tokenizer):
    text = tokenizer.apply_chat_template(
        [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "你好, merge me"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    return tokenizer([text], return_tensors="pt")


def _adapter_logits(base_dir: Path, adapter: Path, inputs) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter).eval()
    with torch.no_grad():
        return model(**inputs).logits


@pytest.fixture(scope="module")
def merged_case(tiny_model_dir, untied_model_dir, qwen_tokenizer, tmp_path_factory):
    """tied -> (base dir, adapter dir, merged dir); each merge is done once for the module."""
    from chattune.infer.merge import merge_adapter

    cases = {}

    def get(tied: bool) -> tuple[Path, Path, Path]:
        if tied not in cases:
            base = tiny_model_dir if tied else untied_model_dir
            root = tmp_path_factory.mktemp("tied" if tied else "untied")
            adapter = make_adapter_dir(base, root / "run" / "adapter", qwen_tokenizer)
            cases[tied] = (base, adapter, merge_adapter(adapter, root / "merged"))
        return cases[tied]

    return get


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_merged_model_equals_adapter(tied, merged_case):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    base, adapter, merged = merged_case(tied)
    assert merged == adapter.parent.parent / "merged"

    # Plain transformers, no peft, no chattune: the tutorials' loading code.
    tok = AutoTokenizer.from_pretrained(merged)
    model = AutoModelForCausalLM.from_pretrained(merged).eval()
    inputs = _inputs(tok)
    with torch.no_grad():
        got = model(**inputs).logits
    want = _adapter_logits(base, adapter, inputs)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    with torch.no_grad():  # and the adapter did change the model, so the comparison means something
        plain = AutoModelForCausalLM.from_pretrained(base)(**inputs).logits
    assert not torch.allclose(plain, want, atol=1e-3)

    assert model.config.tie_word_embeddings is tied
    assert (model.lm_head.weight is model.model.embed_tokens.weight) is tied
    assert sorted(p.name for p in merged.glob("*.safetensors")) == ["model.safetensors"]
    assert not list(merged.glob("adapter_*"))

    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    gen = GenerationConfig.from_pretrained(merged)
    assert gen.eos_token_id[0] == im_end and gen.pad_token_id is not None
    template = (merged / "chat_template.jinja").read_text(encoding="utf-8")
    assert template == (adapter / "chat_template.jinja").read_text(encoding="utf-8") == tok.chat_template
    assert json.loads((merged / "inference.json").read_text())["system_prompt"] == SYSTEM
    assert (merged / "chattune.yaml").is_file()
    assert [p.name for p in merged.parent.iterdir() if p.name.startswith(".")] == []  # no temp dir left


def test_merged_dir_answers_like_the_adapter(merged_case):
    from chattune.infer.generation import generate
    from chattune.infer.load import load_for_inference

    _, adapter, merged = merged_case(True)
    a, m = load_for_inference(adapter, device="cpu"), load_for_inference(merged, device="cpu")
    assert m.system_prompt == SYSTEM and m.end_of_turn_token == "<|im_end|>"
    question = [[{"role": "user", "content": "Who are you?"}]]
    assert generate(m, question, max_new_tokens=8) == generate(a, question, max_new_tokens=8)


def _randomize(peft_model) -> None:
    """Non-zero LoRA B (peft starts it, or A for embeddings, at zero) and a changed modules_to_save copy:
    the adapter matters."""
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if any(k in name for k in ("modules_to_save", "lora_B", "lora_embedding_")):
                p.add_(torch.randn_like(p) * 0.1)


@pytest.mark.parametrize(
    "lora",
    [
        dict(target_modules=["q_proj"], modules_to_save=["lm_head"]),  # a trained copy of lm_head
        dict(target_modules=["q_proj", "lm_head"]),  # LoRA on the tied output matrix itself
        dict(target_modules=["q_proj", "embed_tokens"]),  # LoRA on the tied input matrix
    ],
    ids=["modules_to_save", "lora_lm_head", "lora_embed_tokens"],
)
def test_trained_embeddings_on_a_tied_model_are_untied(lora, tiny_model_dir, qwen_tokenizer, tmp_path):
    """Qwen2.5-0.5B/1.5B tie lm_head to embed_tokens: an adapter that trains either must not leak into
    the other through the shared matrix when merged, and the merged model keeps both."""
    from peft import LoraConfig, get_peft_model
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from chattune.infer.merge import merge_adapter

    adapter = make_adapter_dir(tiny_model_dir, tmp_path / "run" / "adapter", qwen_tokenizer)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraConfig(r=2, **lora))
    _randomize(model)
    model.save_pretrained(adapter)  # overwrite the adapter weights and config, keep the rest of the folder
    merged = merge_adapter(adapter, tmp_path / "merged")

    reloaded = AutoModelForCausalLM.from_pretrained(merged).eval()
    assert reloaded.config.tie_word_embeddings is False
    with safe_open(merged / "model.safetensors", "pt") as f:
        assert {"lm_head.weight", "model.embed_tokens.weight"} <= set(f.keys())
    inputs = _inputs(qwen_tokenizer)
    with torch.no_grad():
        got = reloaded(**inputs).logits
    want = _adapter_logits(tiny_model_dir, adapter, inputs)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def test_tied_model_stays_tied_and_stored_once(merged_case):
    from safetensors import safe_open

    _, _, merged = merged_case(True)
    with safe_open(merged / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys() and "model.embed_tokens.weight" in f.keys()


def _greedy(model, inputs, k: int, **kw) -> list[int]:
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=k, do_sample=False, **kw)
    return out[0, inputs["input_ids"].shape[1] :].tolist()


def test_merge_command_output_loads_plainly_and_stops_at_end_of_turn(
    tiny_model_dir, qwen_tokenizer, tmp_path, capsys
):
    """`chattune merge`, then the tutorials' plain transformers code: generation ends at <|im_end|>
    because the merged generation_config.json says so, not because the caller passed eos ids."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from chattune.cli.parser import main

    im_end = qwen_tokenizer.convert_tokens_to_ids("<|im_end|>")
    inputs = _inputs(qwen_tokenizer)
    adapter = make_adapter_dir(tiny_model_dir, tmp_path / "run" / "adapter", qwen_tokenizer)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        LoraConfig(r=4, target_modules=LORA_TARGETS, modules_to_save=["lm_head"]),
    ).eval()
    _randomize(model)
    # A random model never ends its turn; train it to (in effect): <|im_end|> gets a slightly larger logit
    # than the token it would otherwise pick third, so the answer is two tokens and then the end of turn.
    third = _greedy(model, inputs, 3, eos_token_id=None)[2]
    head = model.base_model.model.lm_head.modules_to_save["default"].weight
    with torch.no_grad():
        head[im_end] = head[third] * 1.05
    free = _greedy(model, inputs, 8, eos_token_id=None)  # what it generates when nothing stops it
    k = free.index(im_end)
    assert k >= 1 and len(free) == 8  # a non-empty answer, then more tokens unless generation stops
    model.save_pretrained(adapter)

    out = tmp_path / "merged"
    assert main(["merge", str(adapter), "--output", str(out), "--dtype", "float32"]) == 0
    assert str(out) in capsys.readouterr().err

    tok = AutoTokenizer.from_pretrained(out)
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    text = tok.apply_chat_template(
        [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "你好, merge me"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    plain = tok([text], return_tensors="pt")
    assert _greedy(merged, plain, 8, eos_token_id=None) == free  # merged == adapter, token for token
    got = _greedy(merged, plain, 8)  # only the merged generation_config.json decides where to stop
    assert got == free[: k + 1] and got[-1] == im_end
    assert tok.decode(got, skip_special_tokens=True) == tok.decode(free[:k])

    assert main(["merge", str(adapter), "--output", str(out)]) == 2  # a one-line error, not a traceback
    err = capsys.readouterr().err
    assert "not empty" in err and "Traceback" not in err


def test_refuses_to_overwrite(merged_case, tiny_model_dir, tmp_path):
    from chattune.infer.merge import merge_adapter

    _, adapter, _ = merged_case(True)
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    with pytest.raises(ChattuneError, match="not empty"):
        merge_adapter(adapter, taken)
    assert [p.name for p in taken.iterdir()] == ["keep.txt"]
    with pytest.raises(ChattuneError, match="not an adapter"):
        merge_adapter(tiny_model_dir, tmp_path / "x")
    with pytest.raises(ChattuneError, match="dtype"):
        merge_adapter(adapter, tmp_path / "y", dtype="int3")
    empty = tmp_path / "empty"
    empty.mkdir()  # an existing empty directory is fine
    assert (merge_adapter(adapter, empty, dtype="bf16") / "config.json").is_file()
    assert json.loads((empty / "config.json").read_text())["dtype"] == "bfloat16"


def test_merged_model_keeps_the_template_kwargs(tiny_model_dir, qwen_tokenizer, tmp_path):
    """An adapter trained with data.template_kwargs: the merged folder's inference.json carries them, so
    its prompts render as training did (issue 29)."""
    from chattune.adapter import read_inference_info
    from chattune.infer.load import load_source_tokenizer, read_model_source
    from chattune.infer.merge import merge_adapter
    from chattune.render.template import template_kwargs

    adapter = make_adapter_dir(tiny_model_dir, tmp_path / "run" / "adapter", qwen_tokenizer)
    info = json.loads((adapter / "inference.json").read_text(encoding="utf-8"))
    info["template_kwargs"] = {"enable_thinking": False}
    (adapter / "inference.json").write_text(json.dumps(info), encoding="utf-8")
    merged = merge_adapter(adapter, tmp_path / "merged")
    assert read_inference_info(merged).template_kwargs == {"enable_thinking": False}
    assert template_kwargs(load_source_tokenizer(read_model_source(merged))) == {"enable_thinking": False}
