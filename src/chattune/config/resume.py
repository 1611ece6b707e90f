"""What a resumed run may change: the rule `train.checkpoints.find_resume_point` applies to a checkpoint's
config and the new one (`chattune train --resume`). Keys that change what the weights see are refused.
"""

from __future__ import annotations

from chattune.config.load import flatten_keys

_MAY_CHANGE = {
    "train.epochs",
    "train.max_steps",
    "train.lr",
    "train.logging_steps",
    "train.save_steps",
    "train.eval_steps",
    "train.progress",
    "train.output_dir",  # a run folder copied elsewhere
    "train.device",
    "train.compile",
    "train.checkpointing",
    "train.distributed",  # checked against the checkpoint's layout by `resume`
    "data.cache",
}


_MAY_CHANGE_SECTIONS = ("eval.", "track.")  # evaluation and tracking never touch the weights


def compare_configs(old: dict, new: dict, same_examples: bool) -> tuple[list[str], list[str]]:
    """(refused, accepted) changes between a checkpoint's config and a resumed run's, as `key old -> new`.

    `data.*` keys may change only while the rendered training examples stay the same (`same_examples`):
    a moved data file may be resumed, a changed one may not. Keys only one side has are not compared.
    """
    a, b = flatten_keys(old), flatten_keys(new)
    refused, accepted, data = [], [], []
    for key in sorted(a.keys() & b.keys()):
        if a[key] == b[key]:
            continue
        change = f"{key} {a[key]!r} -> {b[key]!r}"
        if key.startswith("data.") and key not in _MAY_CHANGE:
            data.append(change)
        elif key in _MAY_CHANGE or key.startswith(_MAY_CHANGE_SECTIONS):
            accepted.append(change)
        else:
            refused.append(change)
    if same_examples:
        accepted += data
    else:
        why = "; ".join(data) or "the data's content, the tokenizer or its chat template changed"
        refused.insert(0, f"the training examples differ from the checkpoint's ({why})")
    return refused, accepted
