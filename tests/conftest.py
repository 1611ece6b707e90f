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
HUANHUAN = REPO / "data" / "huanhuan" / "huanhuan.json"


def write_huanhuan_slice(folder: Path, n: int) -> Path:
    """The first `n` real 甄嬛 records as `folder/huanhuan<n>.json`: a few optimizer steps of real data."""
    import json

    records = json.loads(HUANHUAN.read_text(encoding="utf-8"))[:n]
    path = folder / f"huanhuan{n}.json"
    path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def qwen_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))


def build_tiny_model_dir(out: Path, tokenizer, *, tie_word_embeddings: bool = True) -> Path:
    """A 2-layer Qwen2 with random (seeded) weights and the real tokenizer, saved as a model directory."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=tie_word_embeddings,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, qwen_tokenizer) -> Path:
    """The tied-embedding tiny model (as in Qwen2.5-0.5B/1.5B)."""
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny-qwen2"), qwen_tokenizer)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine their spin-waits
    make generation ~30x slower; restored afterwards so other modules keep their setting."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
