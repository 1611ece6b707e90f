"""What trains and how it is written: LoRA variants, QLoRA, full fine-tuning, between `models` and `train`.

`models.add_lora` builds the adapter (peft's DoRA, rsLoRA, init, modules_to_save) and `models.load_model`
the (quantized) base; this module holds the rest of each method's story:
- the weights' dtype: full fine-tuning keeps fp32 master weights (`training_model_config`);
- the optimizer: AdamW over the trainable weights, peft's LoRA+ groups, or memory mode's host AdamW;
- saving: a PiSSA/OLoRA adapter converted to a plain LoRA for the original base (`save_adapter`), or a
  complete model directory for full fine-tuning (`save_full_model`), and reading either back on resume.
Which combinations work is checked at config load (`config._check_methods`), not here.
"""

from __future__ import annotations

import copy
import json
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from chattune.adapter import InferenceInfo, write_inference_info
from chattune.config.load import dump_config
from chattune.config.schema import Config
from chattune.files import atomic_path
from chattune.render.template import save_default_system


def save_adapter(model, folder: Path, state_dict: dict | None = None, initial: dict | None = None) -> None:
    """peft's `save_pretrained` into `folder`; with `initial` (see `initial_adapter_state`), converted by
    peft (`path_initial_model_for_weight_conversion`) to a rank-2r LoRA for the original base weights."""
    if initial is None:
        model.save_pretrained(folder, state_dict=state_dict)
        return
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory(prefix="chattune-init-") as tmp:
        init_dir = Path(tmp) / "initial"
        config = copy.deepcopy(model.peft_config["default"])
        config.init_lora_weights = True  # loaded as it is, not decomposed again from the residual base
        config.save_pretrained(str(init_dir))
        save_file(
            {k: v.contiguous() for k, v in initial.items()}, str(init_dir / "adapter_model.safetensors")
        )
        with warnings.catch_warnings():  # peft's advice to convert PiSSA to LoRA: this is the conversion
            warnings.filterwarnings("ignore", message=".*changes the base weights of the model")
            model.save_pretrained(
                folder, state_dict=state_dict, path_initial_model_for_weight_conversion=str(init_dir)
            )


def checkpoint_dtype(model_dir: Path) -> torch.dtype | None:
    """The dtype the base checkpoint was stored in (config.json), which a full fine-tune is saved in."""

    try:
        config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    name = config.get("dtype") or config.get("torch_dtype") or (config.get("text_config") or {}).get("dtype")
    value = getattr(torch, str(name), None) if name else None
    return value if isinstance(value, torch.dtype) else None


def save_full_model(
    model: nn.Module, tokenizer, folder: Path, dtype: torch.dtype | None, stop_ids: list[int]
):
    """A complete model directory (safetensors weights in `dtype`, config, and a generation config that
    stops at the end of the turn) that any transformers code loads; the caller adds the tokenizer."""
    from transformers import GenerationConfig

    state_dict = None
    if dtype is not None and dtype != next(model.parameters()).dtype:
        # A copy in the base's dtype: checkpoints are written mid-run, where the fp32 masters must stay.
        state_dict = {k: v.detach().to(dtype) for k, v in model.state_dict().items()}
    gen = model.generation_config if model.generation_config is not None else GenerationConfig()
    gen.eos_token_id = stop_ids
    if gen.pad_token_id is None:
        gen.pad_token_id = tokenizer.pad_token_id
    model.generation_config = gen
    model.save_pretrained(folder, state_dict=state_dict)


def load_trained_weights(model: nn.Module, folder: Path) -> None:
    """A checkpoint's weights back into `model`: the adapter of a peft model, or every weight of a full
    fine-tune (a model directory; a tied output head is stored once, under the input embedding)."""
    from safetensors.torch import load_file

    if hasattr(model, "peft_config"):
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(str(folder / "adapter_model.safetensors")))
        return
    state: dict = {}
    for f in sorted(folder.glob("*.safetensors")):
        state.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {k for k in missing if model.get_output_embeddings() is not None and k.endswith("lm_head.weight")}
    if unexpected or set(missing) - tied:
        from chattune.errors import ChattuneError

        raise ChattuneError(
            f"--resume: {folder} does not hold this model's weights (missing {sorted(set(missing) - tied)[:3]}, "
            f"unexpected {unexpected[:3]})"
        )


# -- adapter folders ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AdapterFacts:
    """What every adapter folder of a run carries besides its weights."""

    tokenizer: Any  # saved with its chat template
    cfg: Config  # saved as chattune.yaml; its system prompt and max_len go to inference.json
    model_dir: Path  # the base model the weights apply to
    eot: str  # the end-of-turn token of the template (render.template.end_of_turn_token)
    stop_token_ids: list[int]  # adapter.stop_ids: what the run's sample answers stop on, and every later use


def write_adapter(
    model, facts: AdapterFacts, target: Path, state_dict: dict | None = None, initial: dict | None = None
) -> None:
    """Save adapter + tokenizer (with its chat template) + run config + inference facts, atomically.

    `state_dict`: the LoRA weights gathered whole, when the model holds only shards of them (FSDP).
    `initial`: a PiSSA/OLoRA adapter as initialised, to save the adapter as a plain LoRA (methods.save_adapter).
    Full fine-tuning (`lora.enabled: false`) writes a complete model directory instead.
    """
    from chattune.model.gguf import read_gguf_origin

    cfg, tokenizer = facts.cfg, facts.tokenizer
    origin = read_gguf_origin(
        facts.model_dir
    )  # weights converted from a GGUF file: which file, hash, quantization
    info = InferenceInfo(
        base_model=cfg.model.name_or_path,
        base_model_path=str(facts.model_dir),
        system_prompt=cfg.data.system_prompt,
        end_of_turn_token=facts.eot,
        template_kwargs=dict(cfg.data.template_kwargs) or None,
        stop_token_ids=list(facts.stop_token_ids),
        max_len=cfg.data.max_len,
        # What the training config said; loaders never act on it (only the user's own flag runs code).
        trust_remote_code=cfg.model.trust_remote_code,
        method="lora" if cfg.lora.enabled else "full",
        base_model_origin=origin or None,
        # merge notes it: the adapter learned on a rounded copy of the base
        trained_on_quantized_base=None if cfg.model.quantization == "none" else cfg.model.quantization,
    )
    with atomic_path(target, directory=True) as tmp:
        if cfg.lora.enabled:
            save_adapter(model, tmp, state_dict, initial)
        else:
            save_full_model(model, tokenizer, tmp, checkpoint_dtype(facts.model_dir), facts.stop_token_ids)
        tokenizer.save_pretrained(tmp)
        save_default_system(tmp, cfg.data.system_prompt)  # plain apply_chat_template renders as trained
        (tmp / "chattune.yaml").write_text(dump_config(cfg), encoding="utf-8")
        write_inference_info(tmp, info)
