"""The config surface grows only by decision: every key a YAML file may set is listed here (as torchtitan
freezes its options), and every key and section carries a docstring that `config.schema` shows the user.

Adding a key means adding it to ALLOWED_KEYS in the same change, documented, so a review sees it.
"""

from __future__ import annotations

import ast
import dataclasses
import typing
from pathlib import Path

from chattune.config.schema import Config

SCHEMA = Path(__file__).resolve().parents[1] / "src" / "chattune" / "config" / "schema.py"

ALLOWED_KEYS = [
    "model.name_or_path",
    "model.source",
    "model.revision",
    "model.dtype",
    "model.trust_remote_code",
    "model.attn_implementation",
    "model.chat_template",
    "model.quantization",
    "data.train_path",
    "data.train_samples",
    "data.eval_path",
    "data.eval_ratio",
    "data.format",
    "data.columns.prompt",
    "data.columns.query",
    "data.columns.response",
    "data.columns.system",
    "data.columns.history",
    "data.columns.messages",
    "data.columns.role",
    "data.columns.content",
    "data.converter",
    "data.eval_converter",
    "data.identity_name",
    "data.identity_author",
    "data.system_prompt",
    "data.max_len",
    "data.truncation",
    "data.train_on",
    "data.max_samples",
    "data.on_bad_row",
    "data.dedup",
    "data.cache",
    "data.template_kwargs",
    "lora.enabled",
    "lora.r",
    "lora.alpha",
    "lora.dropout",
    "lora.target_modules",
    "lora.use_dora",
    "lora.use_rslora",
    "lora.init",
    "lora.loraplus_lr_ratio",
    "lora.layers_to_transform",
    "lora.modules_to_save",
    "train.output_dir",
    "train.micro_batch_size",
    "train.grad_accum_steps",
    "train.epochs",
    "train.max_steps",
    "train.lr",
    "train.lr_schedule",
    "train.warmup_ratio",
    "train.weight_decay",
    "train.max_grad_norm",
    "train.logging_steps",
    "train.save_steps",
    "train.eval_steps",
    "train.seed",
    "train.checkpointing",
    "train.offload",
    "train.packing",
    "train.pack_tokens",
    "train.compile",
    "train.device",
    "train.precision",
    "train.progress",
    "train.distributed",
    "train.fsdp_reshard_after_forward",
    "eval.samples",
    "eval.samples_path",
    "eval.max_new_tokens",
    "eval.batch_size",
    "eval.loss",
    "eval.max_eval_examples",
    "eval.metrics",
    "eval.task",
    # A list of config.schema.BenchmarkConfig: task, data, subjects, max_questions, shots, split, dev,
    # scoring, name, per_epoch (each documented there).
    "eval.benchmarks",
    "track.backend",
    "track.mode",
    "track.project",
    "track.experiment",
    "track.description",
    "track.tags",
    "track.required",
    "track.group",
    "track.uri",
    "sweep.vary",
    "sweep.name",
]


def _keys(cls: type, prefix: str = "") -> list[str]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out += _keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            out.append(f"{prefix}{f.name}")
    return out


def test_the_config_keys_are_exactly_the_allowed_ones():
    keys = _keys(Config)
    assert sorted(set(keys) - set(ALLOWED_KEYS)) == [], "new key: add it to ALLOWED_KEYS with a docstring"
    assert sorted(set(ALLOWED_KEYS) - set(keys)) == [], "removed key: take it out of ALLOWED_KEYS"


def test_every_config_field_has_a_docstring():
    undocumented = []
    for cls in ast.parse(SCHEMA.read_text(encoding="utf-8")).body:
        if not isinstance(cls, ast.ClassDef):
            continue
        for i, node in enumerate(cls.body):
            if isinstance(node, ast.AnnAssign):
                after = cls.body[i + 1] if i + 1 < len(cls.body) else None
                documented = isinstance(after, ast.Expr) and isinstance(
                    getattr(after, "value", None), ast.Constant
                )
                if not documented:
                    undocumented.append(f"{cls.name}.{node.target.id}")
    assert undocumented == []
