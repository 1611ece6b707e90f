"""Fine-tuning methods: DoRA, rsLoRA, PiSSA/OLoRA, LoRA+, QLoRA's CPU refusal and full fine-tuning.

Each asserts what the method means (peft's definitions), then `train.run` shows its loss falls and its
output loads in chattune's own loader and plain transformers/peft.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import write_huanhuan_slice

from chattune.config.load import config_from_dict
from chattune.config.schema import LoraConfig, ModelConfig, TrainConfig
from chattune.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
SYSTEM = "现在你要扮演皇帝身边的女人--甄嬛"


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread(one_torch_thread):
    yield


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    return write_huanhuan_slice(tmp_path_factory.mktemp("data"), 24)


def tree(model_dir: Path, data: Path, out: Path, lora: dict | None = None, **train) -> dict:
    return {
        "model": {"name_or_path": str(model_dir)},
        "data": {"train_path": str(data), "system_prompt": SYSTEM, "max_len": 64, "on_bad_row": "skip"},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, **(lora or {})},
        "train": {
            "output_dir": str(out),
            "micro_batch_size": 4,
            "grad_accum_steps": 1,
            "max_steps": 8,
            "lr": 1e-2,
            "logging_steps": 1,
            "progress": False,
            **train,
        },
        "eval": {"samples": 0, "loss": False},
    }


def _base(model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir).eval()


def _ids(tokenizer) -> dict:
    text = tokenizer.apply_chat_template(
        [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "你是谁？"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    return tokenizer([text], return_tensors="pt")


def _logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


# -- config: each key validated, combinations that cannot work refused at load ---------------------------
@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"lora": {"init": "loftq"}}, "lora.init"),
        ({"lora": {"init": "pissa_niter_x"}}, "lora.init"),
        ({"lora": {"loraplus_lr_ratio": 0.5}}, "lora.loraplus_lr_ratio"),
        ({"lora": {"init": "pissa", "use_dora": True}}, "lora.use_dora"),
        ({"lora": {"init": "olora", "modules_to_save": ["lm_head"]}}, "lora.modules_to_save"),
        ({"lora": {"enabled": False, "use_dora": True}}, "lora.use_dora"),
        ({"lora": {"enabled": False}, "model": {"quantization": "nf4"}}, "model.quantization"),
        ({"lora": {"enabled": False}, "train": {"distributed": "fsdp"}}, "lora.enabled"),
        ({"model": {"quantization": "nf4"}, "train": {"device": "cpu"}}, "model.quantization"),
        ({"model": {"quantization": "int8"}, "lora": {"init": "pissa"}}, "lora.init"),
        (
            {"lora": {"modules_to_save": ["lm_head"]}, "train": {"distributed": "fsdp"}},
            "lora.modules_to_save",
        ),
        ({"lora": {"loraplus_lr_ratio": 16}, "train": {"offload": True}}, "lora.loraplus_lr_ratio"),
    ],
)
def test_config_refuses_what_cannot_work_naming_the_key(overrides, key):
    t = {"data": {"train_path": "x.json"}}
    for section, values in overrides.items():
        t.setdefault(section, {}).update(values)
    with pytest.raises(ConfigError) as e:
        config_from_dict(t, "c.yaml")
    assert e.value.key == key and "c.yaml" in str(e.value)


def test_method_keys_load():
    cfg = config_from_dict(
        {
            "data": {"train_path": "x.json"},
            "lora": {"use_rslora": True, "init": "pissa_niter_4", "loraplus_lr_ratio": 16},
        }
    )
    assert cfg.lora.init == "pissa_niter_4" and cfg.lora.loraplus_lr_ratio == 16.0
    assert config_from_dict({"data": {"train_path": "x"}, "lora": {"enabled": False}}).lora.enabled is False


def test_qlora_on_cpu_is_one_clear_error_before_any_weight_is_read(tiny_model_dir, monkeypatch):
    from transformers import AutoModelForCausalLM

    from chattune.model.load import load_model

    def never(*a, **k):
        raise AssertionError("weights were read")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", never)
    with pytest.raises(ConfigError, match="model.quantization.: nf4 needs a CUDA GPU"):
        load_model(tiny_model_dir, ModelConfig(quantization="nf4"), "cpu")


def test_qlora_through_train_on_a_cpu_machine_writes_nothing(tiny_model_dir, data_file, tmp_path):
    from chattune.train.job import run

    out = tmp_path / "run"
    cfg = config_from_dict(
        tree(tiny_model_dir, data_file, out)
        | {"model": {"name_or_path": str(tiny_model_dir), "quantization": "int8"}}
    )
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ConfigError, match="int8 needs a CUDA GPU"):
        run(cfg)
    assert not out.exists()


# -- LoRA variants at init: what peft defines ------------------------------------------------------------
@pytest.mark.parametrize(
    "lora",
    [
        dict(use_dora=True),
        dict(use_rslora=True),
        dict(init="pissa"),
        dict(init="pissa_niter_2"),
        dict(init="olora"),
        dict(init="gaussian"),
    ],
    ids=["dora", "rslora", "pissa", "pissa_niter", "olora", "gaussian"],
)
def test_variants_keep_the_logits_at_init(lora, tiny_model_dir, qwen_tokenizer):
    """Every offered init starts where the base model is: B = 0 (default, gaussian, DoRA's magnitude =
    the weight's norm), or the base's own top singular directions moved into A B (PiSSA, OLoRA)."""
    from chattune.model.lora import add_lora

    inputs = _ids(qwen_tokenizer)
    want = _logits(_base(tiny_model_dir), inputs)
    torch.manual_seed(0)
    model = add_lora(_base(tiny_model_dir), LoraConfig(r=4, alpha=8, dropout=0.0, **lora)).eval()
    torch.testing.assert_close(_logits(model, inputs), want, atol=1e-4, rtol=1e-4)


def test_pissa_residual_plus_adapter_is_the_original_weight(tiny_model_dir):
    from chattune.model.lora import add_lora

    original = dict(_base(tiny_model_dir).named_parameters())
    model = add_lora(_base(tiny_model_dir), LoraConfig(r=4, alpha=8, dropout=0.0, init="pissa"))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    w0 = original["model.layers.0.self_attn.q_proj.weight"]
    residual = layer.base_layer.weight
    update = layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    assert not torch.allclose(residual, w0, atol=1e-3)  # the base really was changed...
    torch.testing.assert_close(residual + update, w0, atol=1e-5, rtol=1e-5)  # ...into residual + A B


def test_rslora_scales_by_alpha_over_sqrt_r(tiny_model_dir):
    from chattune.model.lora import add_lora

    for rs, want in [(True, 16 / math.sqrt(8)), (False, 16 / 8)]:
        model = add_lora(_base(tiny_model_dir), LoraConfig(r=8, alpha=16, use_rslora=rs))
        q = model.base_model.model.model.layers[0].self_attn.q_proj
        assert q.scaling["default"] == pytest.approx(want)


def test_loraplus_puts_b_at_ratio_times_the_lr_of_a(tiny_model_dir):
    from transformers import get_scheduler

    from chattune.model.lora import add_lora
    from chattune.train.optim import build_optimizer

    lora = LoraConfig(r=4, alpha=8, loraplus_lr_ratio=16)
    model = add_lora(_base(tiny_model_dir), lora)
    optimizer = build_optimizer(model, lora, TrainConfig(lr=1e-4), "cpu", offload=False)
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    a = [lr_of[id(p)] for n, p in named.items() if "lora_A" in n]
    b = [lr_of[id(p)] for n, p in named.items() if "lora_B" in n]
    assert a and b and set(a) == {1e-4} and all(lr == pytest.approx(16e-4) for lr in b)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == sum(
        p.requires_grad for p in named.values()
    )
    # The schedule scales every group alike, so the ratio holds all along the run.
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=2, num_training_steps=10)
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    lrs = sorted({round(g["lr"] / scheduler.get_last_lr()[0], 6) for g in optimizer.param_groups})
    assert lrs == [1.0, 16.0]


def test_pissa_adapter_is_saved_as_a_plain_lora_for_the_original_base(
    tiny_model_dir, qwen_tokenizer, tmp_path
):
    """After (simulated) training, the saved adapter over the unchanged base computes what the trained
    PiSSA model computes, through the tutorials' `PeftModel.from_pretrained`."""
    from peft import PeftModel

    from chattune.model.lora import add_lora, initial_adapter_state
    from chattune.train.save import save_adapter

    lora = LoraConfig(r=4, alpha=8, dropout=0.0, init="pissa")
    model = add_lora(_base(tiny_model_dir), lora)
    initial = initial_adapter_state(model, lora)
    with torch.no_grad():  # what training does: move A and B
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn_like(p) * 0.05)
    inputs = _ids(qwen_tokenizer)
    trained = _logits(model.eval(), inputs)
    save_adapter(model, tmp_path / "adapter", initial=initial)
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["init_lora_weights"] is True  # rank 2r, an ordinary LoRA
    reloaded = PeftModel.from_pretrained(_base(tiny_model_dir), tmp_path / "adapter").eval()
    torch.testing.assert_close(_logits(reloaded, inputs), trained, atol=1e-4, rtol=1e-4)


# -- each method trains: the loss falls on the tiny model -----------------------------------------------
def _losses(out: Path) -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["train/loss"] for r in rows if "train/loss" in r]


@pytest.mark.parametrize(
    "lora",
    [
        dict(use_dora=True),
        dict(use_rslora=True),
        dict(init="pissa"),
        dict(loraplus_lr_ratio=4),
        dict(modules_to_save=["lm_head"]),
    ],
    ids=["dora", "rslora", "pissa", "loraplus", "modules_to_save"],
)
def test_each_lora_variant_trains_and_its_adapter_loads(lora, tiny_model_dir, data_file, tmp_path):
    from chattune.infer.load import load_for_inference
    from chattune.train.job import run

    out = run(
        config_from_dict(
            tree(tiny_model_dir, data_file, tmp_path / "run", lora, packing=True, pack_tokens=256)
        )
    )
    losses = _losses(out)
    assert len(losses) == 8 and sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.02, losses
    loaded = load_for_inference(out / "adapter", device="cpu")
    assert loaded.system_prompt == SYSTEM


# -- full fine-tuning -------------------------------------------------------------------------------------
def test_full_finetune_changes_every_weight_and_reloads_to_the_same_logits(
    tiny_model_dir, qwen_tokenizer, tmp_path
):
    from transformers import AutoModelForCausalLM

    from chattune.train.optim import build_optimizer
    from chattune.train.save import save_full_model

    torch.manual_seed(0)
    model = _base(tiny_model_dir).train()
    model.requires_grad_(True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    lora = LoraConfig(enabled=False)
    optimizer = build_optimizer(model, lora, TrainConfig(lr=1e-3), "cpu", offload=False)
    inputs = _ids(qwen_tokenizer)
    for _ in range(2):
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    unchanged = [n for n, p in model.named_parameters() if torch.equal(p, before[n])]
    assert not unchanged, unchanged
    model.eval()
    want = _logits(model, inputs)
    save_full_model(model, qwen_tokenizer, tmp_path / "model", torch.float32, [151645])
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    torch.testing.assert_close(_logits(reloaded, inputs), want)
    assert reloaded.generation_config.eos_token_id == [151645]


def test_full_finetune_run_writes_a_complete_model_directory(tiny_model_dir, data_file, tmp_path):
    from chattune.infer.generation import build_prompt
    from chattune.infer.load import load_for_inference, read_model_source
    from chattune.train.job import run

    out = run(
        config_from_dict(tree(tiny_model_dir, data_file, tmp_path / "run", {"enabled": False}, lr=1e-3))
    )
    losses = _losses(out)
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.02, losses
    model_dir = out / "model"
    assert not (out / "adapter").exists()
    for name in (
        "model.safetensors",
        "config.json",
        "generation_config.json",
        "chat_template.jinja",
        "chattune.yaml",
        "inference.json",
    ):
        assert (model_dir / name).is_file(), name
    info = json.loads((model_dir / "inference.json").read_text(encoding="utf-8"))
    assert info["method"] == "full" and info["system_prompt"] == SYSTEM
    src = read_model_source(model_dir)
    assert src.adapter_dir is None and src.name == "run"  # a model directory, named after its run
    loaded = load_for_inference(model_dir, device="cpu")
    assert build_prompt(loaded, [{"role": "user", "content": "你是谁？"}]).startswith(
        f"<|im_start|>system\n{SYSTEM}<|im_end|>"
    )  # the stored system prompt is used
    base = dict(_base(tiny_model_dir).named_parameters())
    assert all(not torch.equal(p, base[n]) for n, p in loaded.model.named_parameters())


def test_full_finetune_resumes_from_its_checkpoint(tiny_model_dir, data_file, tmp_path):
    import shutil

    from chattune.train.job import run

    out = tmp_path / "run"
    cfg = config_from_dict(tree(tiny_model_dir, data_file, out, {"enabled": False}, lr=1e-3, save_steps=4))
    run(cfg)
    full = _losses(out)
    shutil.rmtree(out / "model")  # a crash after step 4: no model, no summary
    (out / "summary.json").unlink()
    kept = [
        line for line in (out / "metrics.jsonl").read_text().splitlines() if json.loads(line)["step"] <= 4
    ]
    (out / "metrics.jsonl").write_text("\n".join(kept) + "\n")
    run(cfg, resume=True)
    resumed = _losses(out)
    assert resumed[4:] == pytest.approx(full[4:], rel=1e-5)
