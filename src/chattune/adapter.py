"""What every folder chattune writes for use carries besides its weights: one contract, one reader, one writer.

An adapter (`<run>/adapter`), a checkpoint's adapter, a merged model and a fully fine-tuned model each hold
`inference.json` (this module's `InferenceInfo`) next to the tokenizer and its chat template, so that chat,
predict, eval, serve, merge and export answer with the template, system prompt and end-of-turn token the
weights were trained with. `stop_ids` is the one rule for the token ids that end an answer.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chattune.errors import ModelError
from chattune.files import write_text_atomic

INFERENCE_FILE = "inference.json"


@dataclass(frozen=True)
class InferenceInfo:
    """The facts in `inference.json`. Only `base_model` is always set; None fields are not written.

    `trust_remote_code` records what the training config said: loaders never act on it (only the user's own
    `--trust-remote-code` runs a folder's code). `stop_token_ids` are the ids training-time sample answers
    stopped on (`stop_ids`), so every later use of the folder can be checked against them.
    """

    base_model: str  # the id or path trained from (hub id, builtin:..., a directory)
    base_model_path: str | None = None  # the local directory the weights apply to, when trained here
    system_prompt: str | None = None
    end_of_turn_token: str | None = None  # the token the chat template closes an answer with
    stop_token_ids: list[int] | None = None
    max_len: int | None = None  # data.max_len of the training run, in tokens
    trust_remote_code: bool | None = None
    method: str | None = None  # "lora" | "full"
    base_model_origin: dict | None = None  # a base converted from GGUF: file, sha256, quantization
    trained_on_quantized_base: str | None = None  # "nf4" | "int8" (QLoRA)
    merged_from: str | None = None  # a merged model: the adapter folder it was merged from
    note: str | None = None


# field -> the JSON types it may hold (None is always allowed, except for base_model)
_TYPES: dict[str, tuple[type, ...]] = {
    "base_model": (str,),
    "base_model_path": (str,),
    "system_prompt": (str,),
    "end_of_turn_token": (str,),
    "stop_token_ids": (list,),
    "max_len": (int,),
    "trust_remote_code": (bool,),
    "method": (str,),
    "base_model_origin": (dict,),
    "trained_on_quantized_base": (str,),
    "merged_from": (str,),
    "note": (str,),
}
_ALWAYS_WRITTEN = ("base_model", "system_prompt", "end_of_turn_token")


def read_inference_info(folder: Path) -> InferenceInfo | None:
    """`folder/inference.json` as an `InferenceInfo`; None when the folder has none (a model from elsewhere).

    Raises ModelError naming the file and the key when the file is not a JSON object or a known key holds
    the wrong type (a tampered or hand-edited folder). Unknown keys are ignored: a newer chattune may add some.
    """
    path = Path(folder) / INFERENCE_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"cannot read {path}: {e}; restore it from the run that wrote the folder") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path} must hold a JSON object")
    values: dict[str, Any] = {}
    for key, types in _TYPES.items():
        value = data.get(key)
        if value is None:
            continue
        if not isinstance(value, types) or (int in types and isinstance(value, bool)):
            want = " or ".join(t.__name__ for t in types)
            raise ModelError(f"{path}: key '{key}' must be a {want}, got {type(value).__name__}")
        values[key] = value
    ids = values.get("stop_token_ids")
    if ids is not None and not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise ModelError(f"{path}: key 'stop_token_ids' must be a list of token ids (integers >= 0)")
    values.setdefault("base_model", "")
    return InferenceInfo(**values)


def write_inference_info(folder: Path, info: InferenceInfo) -> None:
    """Write `folder/inference.json` (atomically): the set fields, and the core ones even when None."""
    tree = {k: v for k, v in dataclasses.asdict(info).items() if v is not None or k in _ALWAYS_WRITTEN}
    write_text_atomic(Path(folder) / INFERENCE_FILE, json.dumps(tree, ensure_ascii=False, indent=2))


def stop_ids(tokenizer, eot: str | None, generation_config=None) -> list[int]:
    """The token ids that end an answer, in order: the end-of-turn token (as in Qwen's own generation_config),
    then the tokenizer's eos, then the model's `generation_config.eos_token_id` (an int or a list).

    The one rule for training-time sample answers, chat, predict, eval, serve, the merged model's
    generation_config and the GGUF export. `eot` is the template's end-of-turn token (`render.template.
    end_of_turn_token`, or the one stored in inference.json); a token missing from the vocabulary is skipped.
    """
    eos = getattr(generation_config, "eos_token_id", None) if generation_config is not None else None
    turn = tokenizer.convert_tokens_to_ids(eot) if eot else None
    if turn == tokenizer.unk_token_id:
        turn = None
    candidates = [turn, tokenizer.eos_token_id, *(eos if isinstance(eos, list) else [eos])]
    return list(dict.fromkeys(i for i in candidates if isinstance(i, int) and not isinstance(i, bool)))
