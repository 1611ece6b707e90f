"""The render stage: the chat template's facts (`template`), Conversation -> Example (`examples`), the
cached parallel rendering (`cache`), the pre-flight (`preflight`), packing (`packing`) and statistics.
"""

from __future__ import annotations

from chattune import lazy_exports

# Public entry points, imported on first use: importing one stage never loads another's libraries.
_EXPORTS = {
    "template_facts": "chattune.render.template",
    "end_of_turn_token": "chattune.render.template",
    "chat_template_path": "chattune.render.template",
    "build_generation_prompt": "chattune.render.template",
    "template_default_system": "chattune.render.template",
    "TemplateError": "chattune.render.template",
    "IGNORE_INDEX": "chattune.render.examples",
    "Example": "chattune.render.examples",
    "RenderReport": "chattune.render.examples",
    "render": "chattune.render.examples",
    "render_many": "chattune.render.examples",
    "render_all": "chattune.render.cache",
    "preflight": "chattune.render.preflight",
    "check_parity": "chattune.render.preflight",
    "require_examples": "chattune.render.preflight",
    "build_batches": "chattune.render.packing",
    "collate_packed": "chattune.render.packing",
    "collate_padded": "chattune.render.packing",
    "pack_bins": "chattune.render.packing",
}
__all__ = list(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
