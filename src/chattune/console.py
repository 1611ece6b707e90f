"""The one printer for progress lines: stderr, flushed, and on rank 0 only when several processes run.

Every stage prints through `say` / `say_once` (ruff's T20 forbids a bare `print` outside the CLI and the demo),
so a multi-GPU run prints each line once and stdout stays free for what a command outputs. Work through many
records reports as `progress_line` says (`ProgressLines` when updates come faster than a line is worth).
"""

from __future__ import annotations

import os
import sys
import time


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


def tally(counts: dict[str, int]) -> str:
    """ "2 empty user turn, 1 too long": a count per reason, largest first (for rows skipped or dropped)."""
    return ", ".join(f"{n} {reason}" for reason, n in sorted(counts.items(), key=lambda kv: -kv[1]))


def progress_line(done: int, total: int, t0: float, what: str = "answered") -> str:
    """ "12/40 answered (30 s, 0.40/s, about 70 s left)": work done, elapsed since `t0` (time.monotonic),
    rate (records per second) and estimated time left at that rate; `what` names the records' state."""
    elapsed = time.monotonic() - t0
    rate = done / elapsed if elapsed > 0 else 0.0
    left = f", about {_duration((total - done) / rate)} left" if rate and done < total else ""
    per_s = f"{rate:.2f}" if rate < 100 else f"{rate:,.0f}"
    return f"{done}/{total} {what} ({_duration(elapsed)}, {per_s}/s{left})"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 120 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class ProgressLines:
    """`progress_line`s for work updated faster than a line is worth (a benchmark's batches, tokenising):
    "<label>: 256/3000 <what> (...)" after the first update (the rate and time left, early), then at most
    one every `every_s` seconds, and the final count at `close`. Through `say_once`, so it never fights a
    progress bar and a run of several processes prints it once. Shaped like tqdm: `update(n)`, `close()`;
    `enabled=False` prints nothing."""

    def __init__(
        self, total: int, label: str, what: str = "answered", *, every_s: float = 10.0, enabled: bool = True
    ):
        self.total, self.label, self.what, self.every_s, self.enabled = total, label, what, every_s, enabled
        self.done = 0
        self._t0 = time.monotonic()
        self._said_at: float | None = None  # when the last line was printed
        self._said_done = -1  # the count it showed

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._said_at is None or time.monotonic() - self._said_at >= self.every_s:
            self._say()

    def close(self) -> None:
        """The final count, unless the last line said it or an error is on its way out (it says enough)."""
        if self._said_done != self.done and sys.exc_info()[0] is None:
            self._say()

    def _say(self) -> None:
        if not self.enabled:
            return
        say_once(f"{self.label}: {progress_line(self.done, self.total, self._t0, self.what)}")
        self._said_at, self._said_done = time.monotonic(), self.done
