"""Using a fine-tune: load an adapter or model for inference, generate (CUDA-graph greedy decoding too),
predict, chat, serve (OpenAI-compatible), merge, and export to GGUF.
"""

from __future__ import annotations

from chattune import lazy_exports

# Public entry points, imported on first use: importing one stage never loads another's libraries.
_EXPORTS = {
    "Loaded": "chattune.infer.load",
    "load_for_inference": "chattune.infer.load",
    "load_many_for_inference": "chattune.infer.load",
    "read_model_source": "chattune.infer.load",
    "generate": "chattune.infer.generation",
    "stream": "chattune.infer.generation",
    "generate_completions": "chattune.infer.generation",
    "predict_file": "chattune.infer.predict",
    "read_prompts": "chattune.infer.predict",
    "run_chat": "chattune.infer.chat",
    "build_app": "chattune.infer.serve",
    "run_server": "chattune.infer.serve",
    "merge_adapter": "chattune.infer.merge",
    "load_merged": "chattune.infer.merge",
    "export_gguf": "chattune.infer.export_gguf",
}
__all__ = list(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
