"""What every folder chattune writes for use carries besides its weights: one contract, one reader, one writer.

An adapter (`<run>/adapter`), a checkpoint's adapter, a merged model and a fully fine-tuned model each hold
`inference.json` (this module's `InferenceInfo`) next to the tokenizer and its chat template, so that chat,
predict, eval, serve, merge and export answer with the template, system prompt and end-of-turn token the
weights were trained with. `stop_ids` is the one rule for the token ids that end an answer.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
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
    template_kwargs: dict | None = (
        None  # data.template_kwargs: chat template arguments (enable_thinking, ...)
    )


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
    "template_kwargs": (dict,),
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


# -- checking a folder from elsewhere before any weight is read -------------------------------------------------
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit on the JSON header
_DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4,
    "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
}  # fmt: skip
_REDO = "re-download or retrain it"


def read_safetensors_header(path: Path) -> dict[str, tuple[str, list[int]]]:
    """The tensors a .safetensors file says it holds, {name: (dtype, shape)}, read from its header only.

    The header is checked against the file's size before anything trusts it: a header length past the end
    (a header "of 2**62 bytes"), data offsets past the end or overlapping the header, or a tensor whose bytes
    do not match its dtype and shape (a truncated download) raise ModelError naming the file.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise ModelError(f"{path} is {size} bytes, too short to be a safetensors file; {_REDO}")
            n = int.from_bytes(head, "little")
            if n > size - 8 or n > _MAX_HEADER_BYTES:
                raise ModelError(
                    f"{path}: its header claims {n} bytes but the file has {size}: damaged or truncated; {_REDO}"
                )
            header = json.loads(f.read(n))
    except OSError as e:
        raise ModelError(f"cannot read {path}: {e}") from None
    except (ValueError, RecursionError):
        raise ModelError(f"{path}: its header is not valid JSON: damaged; {_REDO}") from None
    if not isinstance(header, dict):
        raise ModelError(f"{path}: its header is not a JSON object: damaged; {_REDO}")
    data_bytes = size - 8 - n
    out: dict[str, tuple[str, list[int]]] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        shown = name[:80]
        ok = (
            isinstance(entry, dict)
            and isinstance(entry.get("dtype"), str)
            and isinstance(entry.get("shape"), list)
            and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in entry["shape"])
            and isinstance(entry.get("data_offsets"), list)
            and len(entry["data_offsets"]) == 2
            and all(isinstance(d, int) and not isinstance(d, bool) for d in entry["data_offsets"])
        )
        if not ok:
            raise ModelError(f"{path}: tensor '{shown}' has a malformed header entry: damaged; {_REDO}")
        start, end = entry["data_offsets"]
        if not 0 <= start <= end <= data_bytes:
            raise ModelError(
                f"{path}: tensor '{shown}' lies at bytes {start}-{end} of a {data_bytes}-byte data section: "
                f"truncated or damaged; {_REDO}"
            )
        width = _DTYPE_BYTES.get(entry["dtype"])
        if width is not None and end - start != math.prod(entry["shape"]) * width:
            raise ModelError(
                f"{path}: tensor '{shown}' ({entry['dtype']} {entry['shape']}) should take "
                f"{math.prod(entry['shape']) * width} bytes, its offsets give {end - start}: damaged; {_REDO}"
            )
        out[name] = (entry["dtype"], entry["shape"])
    return out


def check_model_weights(folder: Path) -> None:
    """Check the header of every .safetensors file of a model directory (`read_safetensors_header`)."""
    for weights in sorted(Path(folder).glob("*.safetensors")):
        read_safetensors_header(weights)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


# adapter_config.json field -> (check, what it must be); a missing or null field is left to peft's default
_ADAPTER_FIELDS: dict[str, tuple[Any, str]] = {
    "r": (lambda v: _is_int(v) and 0 < v <= 1 << 16, "a positive integer"),
    "lora_alpha": (lambda v: _is_number(v) and v > 0, "a positive number"),
    "lora_dropout": (lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "target_modules": (
        lambda v: isinstance(v, str) or (isinstance(v, list) and all(isinstance(x, str) for x in v)),
        "a module name pattern or a list of module names",
    ),
    "modules_to_save": (
        lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
        "a list of module names",
    ),
    "base_model_name_or_path": (lambda v: isinstance(v, str), "a string"),
    "task_type": (lambda v: isinstance(v, str), "a string"),
    "bias": (lambda v: v in ("none", "all", "lora_only"), "one of none, all, lora_only"),
    "fan_in_fan_out": (lambda v: isinstance(v, bool), "true or false"),
    "use_dora": (lambda v: isinstance(v, bool), "true or false"),
    "use_rslora": (lambda v: isinstance(v, bool), "true or false"),
    "rank_pattern": (
        lambda v: isinstance(v, dict) and all(_is_int(x) and x > 0 for x in v.values()),
        "{module: rank}",
    ),
    "alpha_pattern": (
        lambda v: isinstance(v, dict) and all(_is_number(x) for x in v.values()),
        "{module: alpha}",
    ),
}


def read_adapter_config(folder: Path) -> dict:
    """`folder/adapter_config.json`, checked: a JSON object, `peft_type` one peft knows, and the fields peft
    reads of the right types and ranges (`_ADAPTER_FIELDS`). The weights are `check_adapter_weights`'.

    Raises ModelError naming the file and the field, and what to do.
    """
    from peft import PeftType

    folder = Path(folder)
    path = folder / ADAPTER_CONFIG
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ModelError(f"cannot read {path}: {str(e)[:200]}; {_REDO}") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path} must hold a JSON object; {_REDO}")
    kind = data.get("peft_type")
    known = [t.value for t in PeftType]
    if kind is not None and kind not in known:
        shown = repr(kind)[:60] if isinstance(kind, str) else f"a {type(kind).__name__}"
        raise ModelError(f"{path}: 'peft_type' is {shown}, not one peft knows (e.g. LORA); {_REDO}")
    for key, (ok, want) in _ADAPTER_FIELDS.items():
        value = data.get(key)
        if value is not None and not ok(value):
            raise ModelError(f"{path}: '{key}' must be {want}, got {repr(value)[:60]}; {_REDO}")
    return data


def check_adapter_weights(folder: Path) -> None:
    """`folder/adapter_model.safetensors` is there with a sound header (`read_safetensors_header`); a pickle
    `adapter_model.bin` is refused, never opened. Raises ModelError naming the folder and what to do."""
    folder = Path(folder)
    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file():
        pickled = " (adapter_model.bin, a pickle, is never loaded: it could run code)"
        has_bin = (folder / "adapter_model.bin").exists()
        raise ModelError(f"{folder} has no {ADAPTER_WEIGHTS}{pickled if has_bin else ''}; {_REDO}")
    read_safetensors_header(weights)
