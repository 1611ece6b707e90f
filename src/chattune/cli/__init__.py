"""The `chattune` command: the parser (`parser.py`), one function per command (`commands.py`), and the
`chattune data` group (`data.py`). The last stage: it may import every other."""

from chattune.cli.parser import main

__all__ = ["main"]
