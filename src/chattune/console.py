"""The one printer for progress lines: stderr, flushed, and on rank 0 only when several processes run.

Every stage prints through `say` / `say_once` (ruff's T20 forbids a bare `print` outside the CLI and the demo),
so a multi-GPU run prints each line once and stdout stays free for what a command outputs.
"""

from __future__ import annotations

import os
import sys


def say(msg: str) -> None:
    """Print one progress or warning line to stderr, flushed (every process that calls it prints).

    Through tqdm.write: a progress bar on screen is cleared first and redrawn below the line, so the
    line is never glued to the bar."""
    from tqdm import tqdm

    tqdm.write(msg, file=sys.stderr)
    sys.stderr.flush()


def say_once(msg: str) -> None:
    """Print `msg` to stderr from rank 0 only (RANK unset or 0): one voice for a run of several processes."""
    if os.environ.get("RANK", "0") in ("", "0"):
        say(msg)
