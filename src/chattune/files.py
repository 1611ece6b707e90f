"""Atomic writes keep the user's permissions: what chattune writes through a temporary name (adapters,
checkpoints, merged models, GGUF files, predictions) ends with the modes a plain `open` would have given.

`tempfile.mkdtemp`/`mkstemp` create owner-only (0700/0600) entries, which is right while a write is
under way and wrong once it is renamed into place: another user or a serving process of the same
machine could not read the adapter. `publish(path)` sets 0666/0777 minus the umask before the rename.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


def publish(path: str | Path) -> None:
    """Give `path` (a file, or a directory and everything in it) the modes the umask allows: files
    0o666 & ~umask, directories 0o777 & ~umask. Symbolic links are left alone."""
    mask = _umask()
    root = Path(path)
    if root.is_file():
        os.chmod(root, 0o666 & ~mask)
        return
    for dirpath, _, filenames in os.walk(root):
        os.chmod(dirpath, 0o777 & ~mask)
        for name in filenames:
            f = os.path.join(dirpath, name)
            if not os.path.islink(f):
                os.chmod(f, 0o666 & ~mask)


def _first_existing(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_output_path(path: str | Path, what: str, *, directory: bool) -> Path:
    """Refuse, before any work, an output that cannot be written: a file where a directory is wanted or
    the reverse, a file in the way of a parent folder, or an unwritable folder. Returns the path.

    Raises ChattuneError naming `what` (e.g. "--output") and the path.
    """
    from chattune.errors import ChattuneError

    p = Path(path).expanduser()
    if p.exists() and directory and not p.is_dir():
        raise ChattuneError(f"{what} '{p}' is a file; give a directory")
    if p.exists() and not directory and p.is_dir():
        raise ChattuneError(f"{what} '{p}' is a directory; give a file name")
    anchor = _first_existing(p if directory else p.parent)
    if not anchor.is_dir():
        raise ChattuneError(f"{what} '{p}': '{anchor}' is a file, so nothing can be written below it")
    if not os.access(anchor, os.W_OK | os.X_OK):
        raise ChattuneError(f"{what} '{p}': '{anchor}' is not writable")
    return p


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks (data files' and GGUF files' identity)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
