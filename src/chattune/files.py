"""Atomic writes, the one way chattune writes what a user points a command at: a leaf every stage may use.

`atomic_path(target)` hands out a temporary file or folder beside `target` and moves it into place only when
the block finishes, so a crash or Ctrl-C never leaves a half-written adapter, checkpoint, merged model, GGUF
file, cache entry or predictions file that looks complete. What is written ends with the modes a plain
`open` would have given (`publish`):

`tempfile.mkdtemp`/`mkstemp` create owner-only (0700/0600) entries, which is right while a write is
under way and wrong once it is renamed into place: another user or a serving process of the same
machine could not read the adapter. `publish(path)` sets 0666/0777 minus the umask before the rename.
"""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal


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


def check_not_input(output: str | Path, inputs: list[str | Path], what: str) -> None:
    """Refuse an output that is one of the inputs: the same resolved path, or the same file reached another
    way (a hard link, a symbolic link, a bind mount: the same device and inode). Writing it would replace
    the user's data with the command's output. A path that does not exist yet is no input.

    Raises ChattuneError naming `what` (e.g. "--output") and both paths.
    """
    from chattune.errors import ChattuneError

    out = Path(output).expanduser()
    for given in inputs:
        src = Path(given).expanduser()
        same = out.resolve() == src.resolve()
        if not same and out.exists() and src.exists():
            a, b = out.stat(), src.stat()
            same = (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)
        if same:
            raise ChattuneError(
                f"{what} '{out}' is the input '{src}': writing it would replace the input; "
                "give another output path"
            )


def remove_stale_temporaries(target: str | Path) -> list[Path]:
    """Remove what a killed `atomic_path` write of `target` left beside it (hidden `.<name>-*` entries, as
    large as a whole model for a merge); return them. Called by a command about to write `target` again:
    a second command writing the same target at the same moment would race with it anyway."""
    target = Path(target).expanduser()
    if not target.parent.is_dir():
        return []
    found = sorted(target.parent.glob(f".{glob.escape(target.name)}-*"))
    for tmp in found:
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
    return found


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks (data files' and GGUF files' identity)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@contextmanager
def atomic_path(
    target: str | Path,
    *,
    directory: bool = False,
    suffix: str = "",
    if_exists: Literal["replace", "keep"] = "replace",
) -> Iterator[Path]:
    """Yield a temporary file (or, with `directory`, a folder) in `target`'s folder; when the block ends
    normally, give it the umask's modes (`publish`) and rename it to `target`; when it raises, remove it.

    `if_exists`: "replace" puts the new entry in place of an existing one (a folder is moved aside first and
    removed after the rename, so `target` is never half of either); "keep" leaves an existing folder alone
    and drops the new one (another process built the same thing first). `suffix` ends the temporary name
    (libraries that pick a format from it, e.g. numpy's `.npz`). Parent folders are created.
    Raises what the filesystem raises (OSError).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if directory:
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", suffix=suffix, dir=target.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=f".{target.name}-", suffix=suffix, dir=target.parent)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        publish(tmp)
        if not directory:
            os.replace(tmp, target)
            return
        if target.exists() and if_exists == "keep":
            shutil.rmtree(tmp, ignore_errors=True)
            return
        aside = None
        if target.is_dir() and not any(target.iterdir()):
            target.rmdir()  # an empty folder the user made: rename cannot replace it on every platform
        elif target.exists():
            aside = Path(tempfile.mkdtemp(prefix=f".{target.name}-old-", dir=target.parent))
            os.replace(target, aside / target.name)
        try:
            tmp.rename(target)
        except OSError:
            if aside is not None:  # put the old one back: the target is never lost
                os.replace(aside / target.name, target)
                shutil.rmtree(aside, ignore_errors=True)
            if if_exists == "keep" and target.exists():  # another process finished first; theirs is identical
                shutil.rmtree(tmp, ignore_errors=True)
                return
            raise
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write `text` (UTF-8) to `path` through `atomic_path`: a reader sees the old file or the new one."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
