"""FP8 base matmuls (`train.precision: fp8`, `chattune.model.fp8`): what a CPU can show.

The config refuses the combinations that cannot work, naming `train.precision`, and a machine without
a Hopper GPU is refused before anything is written. `Fp8Linear` computes x @ W^T and the input gradient
within e4m3's rounding of the bf16 result and never a weight gradient (torch's `_scaled_mm` runs on
the CPU too). On a real peft LoRA model the swap replaces only frozen base linears, keeps every LoRA
parameter (the same tensors, still trained), trains like bf16, and the adapter it saves is an ordinary
peft adapter (only `lora_` tensors) that loads onto the bf16 base with exactly the trained weights.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from chattune.config import LoraConfig, config_from_dict
from chattune.errors import ConfigError


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread(one_torch_thread):
    yield


# -- config ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides",
    [
        {"train": {"device": "cpu"}},
        {"lora": {"enabled": False}},
        {"model": {"quantization": "nf4"}},
        {"lora": {"use_dora": True}},
        {"train": {"distributed": "fsdp"}},
    ],
    ids=["cpu", "full-finetune", "qlora", "dora", "fsdp"],
)
def test_config_refuses_fp8_where_it_cannot_work_naming_the_key(overrides):
    t = {"data": {"train_path": "x.json"}, "train": {"precision": "fp8"}}
    for section, values in overrides.items():
        t.setdefault(section, {}).update(values)
    with pytest.raises(ConfigError) as e:
        config_from_dict(t, "c.yaml")
    assert e.value.key == "train.precision" and "c.yaml" in str(e.value)


def test_precision_defaults_to_bf16_and_refuses_other_names():
    assert config_from_dict({"data": {"train_path": "x"}}).train.precision == "bf16"
    assert (
        config_from_dict({"data": {"train_path": "x"}, "train": {"precision": "fp8"}}).train.precision
        == "fp8"
    )
    with pytest.raises(ConfigError) as e:
        config_from_dict({"data": {"train_path": "x"}, "train": {"precision": "fp16"}})
    assert e.value.key == "train.precision"


def test_fp8_without_a_hopper_gpu_is_refused_before_anything_is_written(tiny_model_dir, tmp_path):
    from conftest import write_huanhuan_slice

    from chattune.train.job import run

    if torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0):
        pytest.skip("this machine has FP8 tensor cores")
    out = tmp_path / "run"
    cfg = config_from_dict(
        {
            "model": {"name_or_path": str(tiny_model_dir)},
            "data": {"train_path": str(write_huanhuan_slice(tmp_path, 4)), "max_len": 64},
            "train": {"output_dir": str(out), "precision": "fp8", "max_steps": 1, "progress": False},
            "eval": {"samples": 0, "loss": False},
        }
    )
    with pytest.raises(ConfigError) as e:
        run(cfg)
    assert e.value.key == "train.precision" and "bf16" in str(e.value)
    assert not out.exists()


# -- the module --------------------------------------------------------------------------------------------
def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_fp8_linear_is_the_bf16_matmul_within_e4m3_rounding_and_gives_no_weight_gradient():
    from chattune.model.fp8 import fp8_linear_class

    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 48, bias=True, dtype=torch.bfloat16).requires_grad_(False)
    w, b = linear.weight.float().clone(), linear.bias.float().clone()
    fp8 = fp8_linear_class()(linear)
    assert fp8.weight_fp8.dtype == torch.float8_e4m3fn and fp8.weight_t_fp8.shape == (96, 48)
    assert not any(p.requires_grad for p in fp8.parameters())
    # The stored weight is W rounded to e4m3 with one scale per row: 3 mantissa bits, ~2-4 % error.
    assert 0.005 < _rel(fp8.dequantized_weight(), w) < 0.05
    x = torch.randn(3, 7, 96, dtype=torch.bfloat16, requires_grad=True)
    y = fp8(x)
    assert y.shape == (3, 7, 48) and y.dtype == torch.bfloat16
    assert _rel(y, x.detach().float() @ w.t() + b) < 0.06
    dy = torch.randn_like(y)
    y.backward(dy)
    assert _rel(x.grad, dy.float() @ w) < 0.06
    assert fp8.weight_fp8.grad is None and fp8.bias.grad is None


def _tiny_lora(model_dir: Path):
    from transformers import AutoModelForCausalLM

    from chattune.model.lora import add_lora

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    model = add_lora(model, LoraConfig(r=8, alpha=16, dropout=0.0, target_modules="all-linear"))
    for name, p in model.named_parameters():  # B is zero at init: draw it so A's gradient is not zero
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    return model


def test_swap_replaces_only_frozen_base_linears_and_keeps_every_lora_parameter(tiny_model_dir):
    from chattune.model.fp8 import convert_to_fp8, fp8_linear_class
    from chattune.train.strategies import decoder_layers
    from chattune.train.throughput import matmul_params

    model = _tiny_lora(tiny_model_dir)
    lora_before = {n: p for n, p in model.named_parameters() if p.requires_grad}
    n_matmul, head = matmul_params(model), model.get_output_embeddings()
    swapped = convert_to_fp8(decoder_layers(model))
    assert swapped == 2 * 7  # q, k, v, o, gate, up, down in each of the 2 layers
    lora_after = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert lora_after.keys() == lora_before.keys() and all(
        lora_after[n] is lora_before[n] for n in lora_after
    )
    assert all("lora_" in n for n in lora_after)
    fp8_modules = [n for n, m in model.named_modules() if isinstance(m, fp8_linear_class())]
    assert len(fp8_modules) == swapped and all(n.endswith("base_layer") for n in fp8_modules)
    assert model.get_output_embeddings() is head and type(head) is torch.nn.Linear  # the LM head stays bf16
    assert matmul_params(model) == n_matmul  # FLOP counts (MFU) still see the base weights


def test_fp8_lora_trains_like_bf16_and_saves_an_ordinary_adapter(tiny_model_dir, qwen_tokenizer, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from chattune.model.fp8 import convert_to_fp8
    from chattune.train.strategies import decoder_layers

    ids = qwen_tokenizer(["你好，我是甄嬛。皇上万福金安，臣妾告退。"] * 2, return_tensors="pt").input_ids
    losses = {}
    models = {}
    for precision in ("bf16", "fp8"):
        model = _tiny_lora(tiny_model_dir)
        if precision == "fp8":
            convert_to_fp8(decoder_layers(model))
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-2)
        losses[precision] = []
        for _ in range(6):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses[precision].append(loss.item())
        models[precision] = model
    bf16, fp8 = losses["bf16"], losses["fp8"]
    assert fp8[-1] < fp8[0] - 0.05, fp8  # it trains
    assert all(abs(a - b) / b < 0.03 for a, b in zip(fp8, bf16, strict=True)), (fp8, bf16)

    model = models["fp8"]
    model.save_pretrained(tmp_path / "adapter")
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert saved and all("lora_" in k for k in saved)
    assert all(v.dtype in (torch.float32, torch.bfloat16) for v in saved.values())
    trained = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    loaded = PeftModel.from_pretrained(base, tmp_path / "adapter")
    again = {n.replace(".default", ""): p for n, p in loaded.named_parameters() if "lora_" in n}
    assert all(torch.equal(again[n.replace(".default", "")], p) for n, p in trained.items())
    with torch.no_grad():  # the bf16 base with the fp8-trained adapter answers as the fp8 model did
        assert _rel(loaded(input_ids=ids).logits, model(input_ids=ids).logits) < 0.1
