"""Merge an adapter folder into its base model: one plain model directory any tool can load.

adapter/ + base model --peft merge_and_unload--> merged/{model.safetensors, config.json,
generation_config.json (stops at the end-of-turn token), tokenizer + chat template, inference.json}.
Written into a temporary directory and renamed, so a failed merge leaves nothing half-written.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

from chattune.adapter import (
    InferenceInfo,
    check_adapter_weights,
    read_inference_info,
    stop_ids,
    write_inference_info,
)
from chattune.console import say
from chattune.errors import ChattuneError
from chattune.files import atomic_path, check_output_path, remove_stale_temporaries


def _untie_embeddings(model) -> bool:
    """Give a tied output embedding its own copy of the matrix; True when it was tied.

    Merging LoRA into a tied `lm_head` (or `embed_tokens`) of Qwen2.5-0.5B/1.5B would otherwise write the
    update into the one shared matrix, changing the input embeddings too: logits no longer match the adapter.
    """
    import torch

    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    if out is None or inp.weight is not out.weight:
        return False
    out.weight = torch.nn.Parameter(out.weight.detach().clone(), requires_grad=False)
    return True


def _settle_tie(model, was_tied: bool) -> None:
    """Tie the embeddings again when the merge left them equal; otherwise save both, flagged untied.

    An adapter that trained `lm_head` or `embed_tokens` leaves two different matrices; saving them with the
    tie flag on would make loaders silently re-tie them (and drop one of the two trained matrices).
    """
    import torch

    if not was_tied:
        return
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    tied = torch.equal(inp.weight, out.weight)
    if tied:
        out.weight = inp.weight  # stored once again, as in the base checkpoint
    for config in (model.config, getattr(model.config, "text_config", None) or model.config):
        config.tie_word_embeddings = tied


def _trained_on_quantized_base(adapter_dir: Path) -> str | None:
    """`nf4` / `int8` when the adapter was trained on a quantized base (QLoRA), from its inference.json."""
    info = read_inference_info(adapter_dir)
    return info.trained_on_quantized_base if info is not None else None


def load_merged(src, dtype: str | None = None):
    """(model, tokenizer): the base with `src`'s adapter merged in, in memory on the CPU, and the tokenizer as
    saved. `src` is a `ModelSource` with an adapter; `dtype` (bfloat16 / float16 / float32) defaults to the
    base checkpoint's own. Shared by `merge_adapter` and `export` (GGUF)."""
    import torch

    from chattune.infer.load import attach_adapter, load_model_dir, load_source_tokenizer

    check_adapter_weights(src.adapter_dir)  # before the base model's minutes of loading
    # On the CPU: merging needs no GPU, and a 7B model fits in RAM where it may not fit beside a job.
    base = load_model_dir(src, getattr(torch, dtype) if dtype else "auto")
    was_tied = _untie_embeddings(base)
    with warnings.catch_warnings():  # peft warns that the embeddings we just untied are no longer tied
        warnings.filterwarnings("ignore", message="Input and output embeddings are no longer tied")
        model = attach_adapter(base, src.adapter_dir).merge_and_unload()
    _settle_tie(model, was_tied)
    tokenizer = load_source_tokenizer(src, for_generation=False)
    return model, tokenizer


def merge_adapter(
    adapter_dir: str | Path,
    output_dir: str | Path,
    dtype: str | None = None,
    *,
    trust_remote_code: bool = False,
) -> Path:
    """Write the base model with the adapter merged in to `output_dir` (which must be new or empty).

    `dtype` (bfloat16 / float16 / float32) defaults to the base checkpoint's own dtype.
    `trust_remote_code`: the user's own flag; nothing in the adapter folder can turn it on.
    """
    from transformers import GenerationConfig

    from chattune.infer.load import read_model_source
    from chattune.render.template import template_kwargs

    src = read_model_source(adapter_dir, trust_remote_code=trust_remote_code)
    if src.adapter_dir is None:
        raise ChattuneError(f"'{adapter_dir}' is a model directory, not an adapter folder: nothing to merge")
    out = check_output_path(output_dir, "--output", directory=True)  # not below a file, writable
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ChattuneError(f"output directory '{out}' already exists and is not empty; choose a new one")
    names = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
    dtype = names.get(dtype, dtype) if dtype else None
    if dtype not in (None, "bfloat16", "float16", "float32"):
        raise ChattuneError(f"dtype '{dtype}': use bfloat16, float16 or float32 (or leave it unset)")

    model, tokenizer = load_merged(src, dtype)
    for stale in remove_stale_temporaries(out):
        say(f"note: removed {stale}, left by a merge into {out} that did not finish")

    # Tools that only read generation_config.json (plain `generate`, vLLM, TGI) must stop at the end of
    # the assistant turn, not run on into a made-up next turn.
    gen = model.generation_config if model.generation_config is not None else GenerationConfig()
    gen.eos_token_id = stop_ids(tokenizer, src.end_of_turn_token, gen)
    if gen.pad_token_id is None:
        gen.pad_token_id = tokenizer.pad_token_id
    model.generation_config = gen

    quantized = _trained_on_quantized_base(src.adapter_dir)
    note = None
    if quantized:  # QLoRA: merged onto the full-precision base, which it was not trained against
        note = (
            f"the adapter was trained on a {quantized}-quantized copy of the base and merged onto the "
            "full-precision base; compare its answers with the adapter's (chattune eval) before shipping"
        )
        say(f"note: {note}")
    info = InferenceInfo(
        base_model=src.base_model,
        merged_from=str(src.adapter_dir.resolve()),
        system_prompt=src.system_prompt,
        end_of_turn_token=src.end_of_turn_token,
        stop_token_ids=list(gen.eos_token_id),
        trained_on_quantized_base=quantized,
        note=note,
        template_kwargs=template_kwargs(tokenizer) or None,  # as the adapter recorded them
    )
    with atomic_path(out, directory=True) as tmp:  # `out` is new or empty (checked above)
        model.save_pretrained(tmp)  # safetensors; a tied lm_head is stored once
        tokenizer.save_pretrained(tmp)  # writes chat_template.jinja
        write_inference_info(tmp, info)
        if (src.adapter_dir / "chattune.yaml").is_file():  # provenance: the run that trained it
            shutil.copy2(src.adapter_dir / "chattune.yaml", tmp / "chattune.yaml")
    return out
