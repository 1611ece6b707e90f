"""`chattune ui`: the whole job in a browser, a client of the CLI and the run directory.

schema (the form, from the config dataclasses) -> launch (`chattune train` processes) -> runs (what the
run directories hold) -> live (server-sent events) -> app (FastAPI: page, JSON API); chat (the Chat tab).
Importing this package is light: the web app loads only when the command runs.
"""

from __future__ import annotations

import argparse
import os


def add_ui_parser(sub: argparse._SubParsersAction) -> None:
    """The `chattune ui` subcommand."""
    u = sub.add_parser("ui", help="the local web UI: start, watch, stop and compare runs, chat with them")
    u.add_argument("--host", default="127.0.0.1", help="default loopback; any other host needs --api-key")
    u.add_argument("--port", type=int, default=7860)
    u.add_argument("--runs-dir", default="runs", help="where runs are listed and started (default: runs)")
    u.add_argument("--api-key", default=None, help="required on every request (or CHATTUNE_API_KEY)")
    u.set_defaults(func=cmd_ui)


def cmd_ui(args) -> int:
    from chattune.ui.app import run_ui

    run_ui(
        args.runs_dir,
        host=args.host,
        port=args.port,
        api_key=args.api_key or os.environ.get("CHATTUNE_API_KEY"),
    )
    return 0
