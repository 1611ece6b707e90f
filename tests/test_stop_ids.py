"""One rule for the ids that end an answer (`adapter.stop_ids`), seen from every place that stops generating.

For the Qwen2.5-Instruct, SmolLM2 and ERNIE-4.5 templates a tiny model is trained one step; then the ids the
training run's sample answers stopped on (recorded in the adapter's inference.json from the same list), those
`chat` / `predict` / `eval` / `serve` load (`load_for_inference`), the merged model's generation_config and the
GGUF export's eos and stop metadata (and its Ollama Modelfile) are the same ids, the end-of-turn token first.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from conftest import build_tiny_model_dir, write_huanhuan_slice

EOT = {"qwen2.5": "<|im_end|>", "smollm2": "<|im_end|>", "ernie-4.5": "<|end_of_sentence|>"}


def _smollm2_tiny(out: Path) -> Path:
    """A 2-layer random Llama with SmolLM2-135M-Instruct's own tokenizer, chat template and generation config."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaConfig

    from chattune.model.resolve import resolve_model_dir

    real = resolve_model_dir("builtin:smollm2-135m-instruct")
    tok = AutoTokenizer.from_pretrained(real)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = AutoModelForCausalLM.from_config(cfg)
    model.generation_config = GenerationConfig.from_pretrained(real)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module", params=sorted(EOT))
def template_run(request, tmp_path_factory, qwen_tokenizer, one_torch_thread):
    """(template name, the stop ids each training-time sample decoding used, run dir) after one training
    step with sample answers before and after it."""
    import chattune.train.loop as loop
    from chattune.config.load import config_from_dict
    from chattune.render.template import chat_template_path
    from chattune.train.job import run

    root = tmp_path_factory.mktemp(request.param)
    if request.param == "qwen2.5":
        model_dir = build_tiny_model_dir(root / "model", qwen_tokenizer)
    elif request.param == "ernie-4.5":
        tok = copy.deepcopy(qwen_tokenizer)
        tok.add_tokens(["<|begin_of_sentence|>", "<|end_of_sentence|>"], special_tokens=True)
        tok.chat_template = Path(chat_template_path("ernie-4.5")).read_text(encoding="utf-8")
        model_dir = build_tiny_model_dir(root / "model", tok)  # its generation_config stops on <|im_end|>
    else:
        model_dir = _smollm2_tiny(root / "model")
    tree = {
        "model": {"name_or_path": str(model_dir)},
        "data": {
            "train_path": str(write_huanhuan_slice(root, 8)),
            "converter": "huanhuan",
            "max_len": 256,
            "eval_ratio": 0.25,
        },
        "lora": {"r": 4, "alpha": 8},
        "train": {
            "output_dir": str(root / "run"),
            "max_steps": 1,
            "micro_batch_size": 4,
            "grad_accum_steps": 1,
        },
        "eval": {"samples": 1, "max_new_tokens": 2, "loss": False},
    }
    used = []
    real = loop.predict_samples

    def watched(loaded, *args, **kwargs):  # the real decoding, with the ids it stops on written down
        used.append(list(loaded.stop_token_ids))
        return real(loaded, *args, **kwargs)

    loop.predict_samples = watched
    try:
        run(config_from_dict(tree))
    finally:
        loop.predict_samples = real
    return request.param, used, root / "run"


def test_every_use_of_a_trained_folder_stops_on_the_same_ids(template_run, tmp_path):
    import gguf
    from transformers import AutoTokenizer

    from chattune.infer.export_gguf import export_gguf
    from chattune.infer.load import load_for_inference
    from chattune.infer.merge import merge_adapter

    name, _, run_dir = template_run
    adapter = run_dir / "adapter"
    tok = AutoTokenizer.from_pretrained(adapter)
    trained = json.loads((adapter / "inference.json").read_text(encoding="utf-8"))["stop_token_ids"]
    assert trained[0] == tok.convert_tokens_to_ids(EOT[name])  # the end-of-turn token first
    assert tok.eos_token_id in trained

    assert load_for_inference(adapter, device="cpu").stop_token_ids == trained  # chat, predict, eval, serve

    merged = merge_adapter(adapter, tmp_path / "merged")
    gen = json.loads((merged / "generation_config.json").read_text(encoding="utf-8"))
    assert gen["eos_token_id"] == trained
    assert json.loads((merged / "inference.json").read_text(encoding="utf-8"))["stop_token_ids"] == trained
    assert load_for_inference(merged, device="cpu").stop_token_ids == trained

    gguf_path, modelfile = export_gguf(adapter, tmp_path / "model.gguf")
    fields = gguf.GGUFReader(str(gguf_path)).fields
    assert fields["tokenizer.ggml.eos_token_id"].contents() == trained[0]
    assert fields["chattune.stop_token_ids"].contents() == ",".join(map(str, trained))
    stops = [
        json.loads(line.split(" ", 2)[2]) for line in modelfile.read_text().splitlines() if "stop" in line
    ]
    assert stops == list(dict.fromkeys(tok.convert_ids_to_tokens(trained)))


def test_the_training_samples_stopped_on_the_recorded_ids(template_run):
    name, used, run_dir = template_run
    recorded = json.loads((run_dir / "adapter" / "inference.json").read_text(encoding="utf-8"))[
        "stop_token_ids"
    ]
    assert len(used) == 2 and all(ids == recorded for ids in used)  # the baseline and after the step
    tags = {json.loads(line)["tag"] for line in (run_dir / "predictions.jsonl").read_text().splitlines()}
    assert "baseline" in tags
