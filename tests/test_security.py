"""Files from elsewhere are data, never code: a crafted checkpoint or adapter folder runs nothing.

Each attack writes a marker file if its code runs; the marker must never appear. Only the user's own
--trust-remote-code runs code a folder ships."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from chattune.cli.parser import main
from chattune.errors import ModelError
from chattune.infer.load import load_for_inference

REPO = Path(__file__).resolve().parents[1]
HUANHUAN = REPO / "data" / "huanhuan" / "huanhuan.json"


class _Payload:
    """Unpickled, it runs `code`: what a malicious state.pt would do."""

    def __init__(self, code: str):
        self.code = code

    def __reduce__(self):
        return (exec, (self.code,))


def write_marker_code(marker: Path) -> str:
    return f"open({str(marker)!r}, 'w').write('code ran')"


# -- checkpoints -------------------------------------------------------------------------------------------
def test_crafted_state_pt_is_refused_and_runs_nothing(tiny_model_dir, tmp_path, capsys):
    from safetensors.torch import save_file

    marker = tmp_path / "marker"
    data = tmp_path / "data.json"
    data.write_text(json.dumps(json.loads(HUANHUAN.read_text("utf-8"))[:8], ensure_ascii=False), "utf-8")
    out = tmp_path / "run"
    ckpt = out / "checkpoints" / "step-0000001"
    (ckpt / "adapter").mkdir(parents=True)
    save_file({"x": torch.zeros(1)}, str(ckpt / "adapter" / "adapter_model.safetensors"))
    # Every key a checkpoint has, one of them a payload.
    state = {"optimizer": {}, "scheduler": {}, "step": 1, "rng": _Payload(write_marker_code(marker))}
    torch.save(state, ckpt / "state.pt")
    train = {"output_dir": str(out), "micro_batch_size": 4, "grad_accum_steps": 1, "max_steps": 4}
    config = {
        "model": {"name_or_path": str(tiny_model_dir)},
        "data": {"train_path": str(data), "max_len": 64, "on_bad_row": "skip"},
        "train": {**train, "save_steps": 1, "progress": False},
        "eval": {"samples": 0, "loss": False},
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config, allow_unicode=True), encoding="utf-8")
    assert main(["train", str(path), "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "state.pt holds Python objects" in err and "not loaded" in err
    assert not marker.exists()


# -- adapter folders ---------------------------------------------------------------------------------------
@pytest.fixture
def adapter(tiny_model_dir, qwen_tokenizer, tmp_path) -> Path:
    """A plain LoRA adapter over the tiny model, as a download would hold it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "downloaded"
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraConfig(r=2, task_type="CAUSAL_LM")
    )
    model.save_pretrained(folder)
    qwen_tokenizer.save_pretrained(folder)
    return folder


def poison_tokenizer(folder: Path, marker: Path) -> None:
    """inference.json and chattune.yaml ask for remote code; the tokenizer maps to a .py in the folder."""
    info = {
        "base_model_path": str(
            json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"]
        )
    }
    info.update(system_prompt="hi", trust_remote_code=True)
    (folder / "inference.json").write_text(json.dumps(info), encoding="utf-8")
    (folder / "chattune.yaml").write_text("model:\n  trust_remote_code: true\n", encoding="utf-8")
    cfg = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    cfg["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", "evil.EvilTokenizer"]}
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg), encoding="utf-8")
    (folder / "evil.py").write_text(
        write_marker_code(marker)
        + "\nfrom transformers import Qwen2Tokenizer\n\nclass EvilTokenizer(Qwen2Tokenizer):\n    pass\n",
        encoding="utf-8",
    )


def test_adapter_folder_cannot_turn_on_remote_code(adapter, tmp_path, capsys, one_torch_thread):
    marker = tmp_path / "marker"
    poison_tokenizer(adapter, marker)
    loaded = load_for_inference(adapter, device="cpu")
    assert not marker.exists()
    assert type(loaded.tokenizer).__name__ != "EvilTokenizer" and loaded.system_prompt == "hi"
    err = capsys.readouterr().err
    for name in ("inference.json", "chattune.yaml", "tokenizer_config.json"):
        assert f"{adapter / name}" in err, name
    # The CLI the same way (predict, merge); only the user's own flag runs the folder's code.
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"instruction": "你好"}, ensure_ascii=False) + "\n", encoding="utf-8")
    predict = ["predict", str(adapter), "--input", str(questions), "--output", str(tmp_path / "p.jsonl")]
    assert main([*predict, "--max-new-tokens", "2", "--device", "cpu"]) == 0
    assert main(["merge", str(adapter), "--output", str(tmp_path / "merged")]) == 0
    assert not marker.exists()
    assert main([*predict, "--max-new-tokens", "2", "--device", "cpu", "--trust-remote-code"]) == 0
    assert marker.exists()  # the flag works: the user chose to run it


def test_adapter_shipping_its_own_base_model_code_runs_nothing(adapter, tiny_model_dir, tmp_path, capsys):
    """inference.json points the base model at a folder inside the adapter whose config maps to its own code."""
    marker = tmp_path / "marker"
    base = adapter / "base"
    shutil.copytree(tiny_model_dir, base)
    config = json.loads((base / "config.json").read_text(encoding="utf-8"))
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    config["model_type"] = "evil-qwen"
    (base / "config.json").write_text(json.dumps(config), encoding="utf-8")
    (base / "evil.py").write_text(write_marker_code(marker) + "\n", encoding="utf-8")
    info = {"base_model_path": "base", "trust_remote_code": True}
    (adapter / "inference.json").write_text(json.dumps(info), encoding="utf-8")
    with pytest.raises(ModelError, match="pass --trust-remote-code if you trust it"):
        load_for_inference(adapter, device="cpu")
    assert not marker.exists()
    assert f"{base / 'config.json'} maps classes to code" in capsys.readouterr().err
