"""The model stage: id -> local directory (`resolve`, `builtin`, `gguf`), `load`, LoRA (`lora`), attention for
packed batches (`attention`), the training loss (`loss`) and FP8 base matmuls (`fp8`).
"""

from __future__ import annotations

from chattune import lazy_exports

# Public entry points, imported on first use: importing one stage never loads another's libraries.
_EXPORTS = {
    "resolve_model_dir": "chattune.model.resolve",
    "materialize_builtin": "chattune.model.builtin",
    "BUILTIN_PREFIX": "chattune.model.builtin",
    "materialize_gguf": "chattune.model.gguf",
    "load_model": "chattune.model.load",
    "load_tokenizer": "chattune.model.load",
    "pick_device": "chattune.model.load",
    "pick_dtype": "chattune.model.load",
    "add_lora": "chattune.model.lora",
    "build_peft_config": "chattune.model.lora",
    "register_attention": "chattune.model.attention",
    "pick_attn_implementation": "chattune.model.attention",
    "lm_loss_sum": "chattune.model.loss",
    "convert_to_fp8": "chattune.model.fp8",
    "check_fp8_device": "chattune.model.fp8",
}
__all__ = list(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
