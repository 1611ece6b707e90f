"""chattune: LoRA fine-tuning of chat models from one config file.

The pipeline: data (read, validate) -> templates (render with the model's own chat template,
label the assistant turns) -> packing (batches) -> train (transformers + peft) -> adapter folder
that chat / predict / eval / merge / serve read back.
"""

__version__ = "0.1.0"


def lazy_exports(package: str, exports: dict[str, str]):
    """`(__getattr__, __dir__)` for a stage's `__init__` (PEP 562): `exports` maps a public name to the module
    that defines it, imported on first use, so `import chattune.render` loads no model library."""
    import importlib

    def __getattr__(name: str):
        if name in exports:
            return getattr(importlib.import_module(exports[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted([*exports, "__doc__", "__name__"])

    return __getattr__, __dir__
