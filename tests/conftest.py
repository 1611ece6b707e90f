"""Shared fixtures: offline, CPU, the real Qwen2.5 tokenizer, tiny models built from config."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# Everything runs offline and writes only into temp dirs; set before transformers is imported.
_TMP = Path(tempfile.mkdtemp(prefix="chattune-tests-"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ["HF_HOME"] = str(_TMP / "hf")
os.environ["MODELSCOPE_CACHE"] = str(_TMP / "modelscope")
os.environ["SWANLAB_LOG_DIR"] = str(_TMP / "swanlog")
os.environ["SWANLAB_MODE"] = "disabled"
os.environ.setdefault("CHATTUNE_CACHE", str(Path.home() / ".cache" / "chattune"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TOKENIZER_DIR = REPO / "src" / "chattune" / "assets" / "tokenizers" / "qwen2.5-instruct"


@pytest.fixture(scope="session")
def qwen_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, qwen_tokenizer) -> Path:
    """A 2-layer Qwen2 model with random (seeded) weights and the real tokenizer, saved as a model dir."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=len(qwen_tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        eos_token_id=qwen_tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=qwen_tokenizer.pad_token_id,
        bos_token_id=None,
    )
    model = AutoModelForCausalLM.from_config(cfg)
    out = tmp_path_factory.mktemp("tiny-qwen2")
    model.save_pretrained(out)
    qwen_tokenizer.save_pretrained(out)
    return out
