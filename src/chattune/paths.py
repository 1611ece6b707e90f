"""Where chattune keeps things on disk, and whether a remote host answers: a leaf every stage may use.

`cache_dir()` holds converted built-in models, GGUF conversions, the render cache and the compile cache
(`CHATTUNE_CACHE`, else ~/.cache/chattune); `tokenizer_asset_dir()` is the vendored Qwen2.5 tokenizer.
"""

from __future__ import annotations

import os
import socket
from importlib import resources
from pathlib import Path


def tokenizer_asset_dir() -> Path:
    """The vendored real Qwen2.5-Instruct tokenizer (vocab, merges, chat template; Apache-2.0)."""
    return Path(str(resources.files("chattune") / "assets" / "tokenizers" / "qwen2.5-instruct"))


def cache_dir() -> Path:
    return Path(os.environ.get("CHATTUNE_CACHE", Path.home() / ".cache" / "chattune"))


def host_reachable(host: str, timeout_s: float = 3.0) -> bool:
    """One TCP connect, so an offline machine fails in seconds instead of a minute of HTTP retries."""
    try:
        with socket.create_connection((host, 443), timeout=timeout_s):
            return True
    except OSError:
        return False
