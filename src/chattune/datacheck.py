"""`chattune data ...`: look at what will be trained before training it (convert, check, stats, preview).

Placeholder wiring; the subcommands are filled in by the data work (issue 3).
"""

from __future__ import annotations


def add_data_parser(sub) -> None:
    """Add the `data` subcommand group to the CLI's subparsers."""
    d = sub.add_parser("data", help="convert, check, inspect and preview training data")
    d.set_defaults(func=lambda args: (d.print_help(), 2)[1])
