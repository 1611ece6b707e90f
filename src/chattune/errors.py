"""User-facing errors: everything a user can get wrong raises one of these.

The CLI prints `error: <message>` and exits non-zero; no traceback. Each message names the
file, line or key at fault and what to do about it.
"""

from __future__ import annotations


class ChattuneError(Exception):
    """A problem with the user's input (config, data, path, model id) or environment."""


class ConfigError(ChattuneError):
    def __init__(self, key: str, reason: str, path: str | None = None):
        where = f"{path}: " if path else ""
        super().__init__(f"{where}config key '{key}': {reason}")
        self.key, self.reason, self.path = key, reason, path


class DataError(ChattuneError):
    def __init__(self, path: str, line: int | None, reason: str):
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {reason}")
        self.path, self.line, self.reason = path, line, reason


class ModelError(ChattuneError):
    """A model id or directory that cannot be resolved or loaded."""
