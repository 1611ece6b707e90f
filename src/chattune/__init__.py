"""chattune: LoRA fine-tuning of chat models from one config file.

The pipeline: data (read, validate) -> templates (render with the model's own chat template,
label the assistant turns) -> packing (batches) -> train (transformers + peft) -> adapter folder
that chat / predict / eval / merge / serve read back.
"""

__version__ = "0.1.0"
