"""Models: resolving ids (offline, fast, never sending a local path to a hub), the built-in model, LoRA."""

import time

import pytest

from chattune.config.schema import LoraConfig, ModelConfig
from chattune.errors import ModelError
from chattune.model.builtin import materialize_builtin
from chattune.model.load import load_model, load_tokenizer
from chattune.model.lora import add_lora
from chattune.model.resolve import resolve_model_dir


def test_builtin_is_an_ordinary_model_dir():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = materialize_builtin("tiny-qwen2")
    assert path == resolve_model_dir("builtin:tiny-qwen2")  # built once, then reused
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert tok.chat_template and tok.eos_token == "<|im_end|>"
    assert model.config.vocab_size == len(tok) == 151665


@pytest.mark.parametrize("source", ["auto", "huggingface", "modelscope"])
def test_hub_ids_fail_fast_offline(source):
    t = time.time()
    with pytest.raises(ModelError) as e:
        resolve_model_dir("Qwen/Qwen2.5-7B-Instruct", source)
    assert time.time() - t < 15
    assert "Qwen/Qwen2.5-7B-Instruct" in str(e.value) and "name_or_path" in str(e.value)


def test_missing_local_path_is_not_sent_to_a_hub(tmp_path):
    for p in [str(tmp_path / "missing"), "./models/missing", "../x/y"]:
        with pytest.raises(ModelError, match="does not exist"):
            resolve_model_dir(p)
    with pytest.raises(ModelError, match="unknown built-in"):
        resolve_model_dir("builtin:nope")


def test_adapter_folder_or_empty_folder_as_model_is_refused(tmp_path):
    # An adapter folder loads through transformers with its LoRA attached, then training put a fresh LoRA
    # in its place: the adapter given was silently dropped. Refused naming the base model instead.
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"base_model_name_or_path": "/models/base"}')
    with pytest.raises(
        ModelError, match=r"is a LoRA adapter folder, not a model.*\(/models/base\).*chattune merge"
    ):
        resolve_model_dir(str(adapter))
    (adapter / "inference.json").write_text('{"base_model": "builtin:tiny-qwen2"}')  # the id trained from
    with pytest.raises(ModelError, match=r"base model \(builtin:tiny-qwen2\)"):
        resolve_model_dir(str(adapter))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelError, match="holds no model \\(no config.json\\)"):
        resolve_model_dir(str(empty))
    (empty / "tokenizer_config.json").write_text("{}")  # a tokenizer alone still resolves (data checks)
    assert resolve_model_dir(str(empty)) == empty.resolve()


def test_lora_starts_as_identity_and_trains_only_lora(tiny_model_dir, qwen_tokenizer):
    import torch

    model = load_model(tiny_model_dir, ModelConfig(), "cpu")
    ids = torch.tensor([qwen_tokenizer("皇上万福金安。")["input_ids"]])
    before = model(input_ids=ids).logits
    peft_model = add_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0, target_modules="all-linear"))
    after = peft_model(input_ids=ids).logits
    torch.testing.assert_close(before, after)  # lora_B is zero at init
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    targeted = {n.split(".lora_A")[0].split(".")[-1] for n in trainable if "lora_A" in n}
    assert targeted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_tokenizer_without_template_needs_one(tmp_path, tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir, ModelConfig())
    assert tok.chat_template
    with pytest.raises(ModelError, match="chat_template"):
        load_tokenizer(tiny_model_dir, ModelConfig(chat_template=str(tmp_path / "missing.jinja")))


def test_lora_on_chosen_layers_only(tiny_model_dir):
    """`lora.layers_to_transform` with `all-linear`: every linear layer of layer 1 and none of layer 0."""
    from chattune.errors import ConfigError

    model = load_model(tiny_model_dir, ModelConfig(), "cpu")
    peft_model = add_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0, layers_to_transform=[1]))
    lora_names = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    layers = {n.split(".layers.")[1].split(".")[0] for n in lora_names}
    assert layers == {"1"}
    kinds = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in lora_names}
    assert kinds == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    with pytest.raises(ConfigError, match="lora.layers_to_transform.*has 2"):
        add_lora(load_model(tiny_model_dir, ModelConfig(), "cpu"), LoraConfig(layers_to_transform=[2]))
    with pytest.raises(ConfigError, match="lora.layers_to_transform"):
        LoraConfig(layers_to_transform=[-1])
