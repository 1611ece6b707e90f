"""The `chattune` command: one subcommand per job. Heavy libraries are imported inside commands so
`chattune --help` answers at once; a `ChattuneError` becomes one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import math
import os
import sys

from chattune.cli.args import positive_int
from chattune.cli.commands import (
    cmd_bench,
    cmd_chat,
    cmd_compare,
    cmd_demo,
    cmd_eval,
    cmd_export,
    cmd_merge,
    cmd_predict,
    cmd_report,
    cmd_serve,
    cmd_sweep,
    cmd_train,
)
from chattune.errors import ChattuneError
from chattune.ui import add_ui_parser  # light: the web app loads when `chattune ui` runs


def finite_float(text: str) -> float:
    """argparse type: a finite number >= 0. `float()` reads 'nan' and 'inf'; a NaN temperature decodes
    greedily and an infinite one samples noise, both exiting 0, and `--max-body-mb inf` overflows later."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text[:40]!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text[:40]!r}")
    return value


# What every command that takes a model accepts: the same as train's model.name_or_path, plus adapters.
MODEL_HELP = (
    "adapter folder (out/<run>/adapter), model directory, .gguf file, builtin:smollm2-135m-instruct "
    "or a Hugging Face id (offline: from its cache)"
)


def add_trust_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="run Python code shipped with the model or adapter (auto_map); a folder never turns this on itself",
    )


def build_parser() -> argparse.ArgumentParser:
    """The `chattune` parser: one sub-parser per command, each group added by its own function below."""
    p = argparse.ArgumentParser(
        prog="chattune", description="LoRA fine-tuning of chat models from one config file."
    )
    sub = p.add_subparsers(dest="command", required=True)
    for add in (
        _add_training,
        _add_data,
        _add_using,
        _add_evaluating,
        _add_runs,
        _add_shipping,
        _add_serving,
        add_ui_parser,  # chattune ui
    ):
        add(sub)
    return p


def _add_training(sub) -> None:
    """train and demo"""
    t = sub.add_parser("train", help="fine-tune from a YAML config (key.sub=value overrides)")
    t.add_argument("config", help="YAML config file (see configs/)")
    t.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.lr=2e-4")
    t.add_argument(
        "--resume", action="store_true", help="continue from the last checkpoint in train.output_dir"
    )
    t.add_argument(
        "--gpus",
        type=positive_int,
        default=None,
        metavar="N",
        help="train data-parallel in N processes, one per GPU of this machine (starts torchrun for you; "
        "see train.distributed)",
    )
    t.set_defaults(func=cmd_train)

    d = sub.add_parser(
        "demo", help="teach a real built-in chat model a new name, offline, in a few minutes on a CPU"
    )
    d.add_argument("--output-dir", default="runs/demo")
    d.add_argument("overrides", nargs="*", help="section.key=value applied to the demo config")
    d.set_defaults(func=cmd_demo)


def _add_data(sub) -> None:
    """chattune data ..."""
    from chattune.cli.data import add_data_parser

    add_data_parser(sub)


def _add_using(sub) -> None:
    """chat and predict"""
    for name, helptext in [("chat", "chat with a model or adapter"), ("predict", "batch predictions")]:
        c = sub.add_parser(name, help=helptext)
        c.add_argument("model", help=MODEL_HELP)
        c.add_argument("--device", default="auto")
        c.add_argument("--max-new-tokens", type=positive_int, default=256)
        default_t = "the model's generation_config (greedy when it does not sample)"
        c.add_argument(
            "--temperature",
            type=finite_float,
            default=None,
            help=f"default: {default_t if name == 'chat' else 'greedy (0)'}",
        )
        if name == "chat":
            c.add_argument("--system", default=None, help="system prompt (default: the adapter's)")
        if name == "predict":
            c.add_argument(
                "--input", required=True, help=".jsonl/.json of {messages} or {instruction, input}"
            )
            c.add_argument("--output", required=True, help="output .jsonl")
            c.add_argument("--batch-size", type=positive_int, default=8)
        add_trust_flag(c)
        c.set_defaults(func=cmd_chat if name == "chat" else cmd_predict)


def _add_evaluating(sub) -> None:
    """eval, bench and report"""
    e = sub.add_parser("eval", help="predictions + metrics of a model or adapter on a data file")
    e.add_argument("model", help=MODEL_HELP)
    e.add_argument("--data", required=True, help="data file (.json/.jsonl), records with reference answers")
    e.add_argument("--output", default=None, help="directory for predictions.jsonl and metrics.json")
    e.add_argument("--samples", type=positive_int, default=None, help="evaluate only the first N records")
    e.add_argument("--task", choices=["generation", "classification"], default="generation")
    e.add_argument("--metrics", default=None, help="comma-separated metric names (default: per task)")
    e.add_argument(
        "--max-new-tokens",
        type=positive_int,
        default=None,
        help="default: 256; with --task classification, the longest label's tokens + 8",
    )
    e.add_argument("--batch-size", type=positive_int, default=8)
    e.add_argument("--system", default=None, help="system prompt (default: the adapter's)")
    e.add_argument(
        "--columns",
        nargs="+",
        default=None,
        metavar="FIELD=COLUMN",
        help="where the fields live in your records, as data.columns: e.g. prompt=question response=answer",
    )
    e.add_argument("--converter", default=None, help="convert a tutorial's raw records first")
    e.add_argument("--identity-name", default=None, help="with --converter identity: fills {{name}}")
    e.add_argument("--identity-author", default=None, help="with --converter identity: fills {{author}}")
    e.add_argument("--device", default="auto")
    add_trust_flag(e)
    e.set_defaults(func=cmd_eval)

    b = sub.add_parser(
        "bench",
        help="multiple-choice accuracy (C-Eval, CMMLU, MMLU, your own) of a model or adapter, offline",
    )
    b.add_argument("model", help="adapter folder, model directory, .gguf file or builtin:... id")
    b.add_argument(
        "--task", required=True, choices=["ceval", "cmmlu", "mmlu", "mcq"], help="the files' layout"
    )
    b.add_argument(
        "--data", required=True, help="the benchmark's folder (val/ dev/ test/), or the mcq .jsonl"
    )
    b.add_argument("--subjects", default=None, help="comma-separated subjects (default: all)")
    b.add_argument("--shots", type=int, default=0, help="dev examples before each question (k-shot)")
    b.add_argument("--split", default=None, help="default: C-Eval val, CMMLU test, MMLU test")
    b.add_argument(
        "--max-questions", type=positive_int, default=None, help="the first N questions of each subject"
    )
    b.add_argument("--dev", default=None, help="mcq with --shots: the .jsonl the examples come from")
    b.add_argument(
        "--scoring",
        choices=["letter", "choice"],
        default="letter",
        help="letter: log-likelihood of the answer letter (standard); choice: of each choice's text (cloze)",
    )
    b.add_argument(
        "--backend",
        choices=["chattune", "lm-eval"],
        default="chattune",
        help="lm-eval: the same prompts scored by lm-evaluation-harness (pip install lm-eval)",
    )
    b.add_argument("--batch-size", type=positive_int, default=8)
    b.add_argument("--output", default=None, help="directory for predictions.jsonl and metrics.json")
    b.add_argument("--system", default=None, help="system prompt (default: the adapter's)")
    b.add_argument("--device", default="auto")
    add_trust_flag(b)
    b.set_defaults(func=cmd_bench)

    r = sub.add_parser("report", help="(re)write report.html and report.md of a run directory")
    r.add_argument("run_dir", help="a training run's output directory")
    r.set_defaults(func=cmd_report)


def _add_runs(sub) -> None:
    """sweep and compare"""
    w = sub.add_parser(
        "sweep", help="run one config several times (--vary key=V1,V2), then write one compare page"
    )
    w.add_argument("config", help="YAML config file; its sweep.vary list is used too")
    w.add_argument("overrides", nargs="*", help="section.key=value for every variant (before --vary)")
    w.add_argument(
        "--vary",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="values to try for one key, e.g. lora.r=8,16; repeat for every combination",
    )
    w.add_argument("--resume", action="store_true", help="skip finished variants, resume the interrupted one")
    w.add_argument(
        "--gpus",
        type=positive_int,
        default=None,
        metavar="N",
        help="run N variants side by side, one per GPU",
    )
    w.set_defaults(func=cmd_sweep)

    cp = sub.add_parser("compare", help="one HTML page (and Markdown) putting several runs side by side")
    cp.add_argument("run_dirs", nargs="+", help="training runs' output directories")
    cp.add_argument("--output", default=None, help="folder for compare.html (default: the runs' parent)")
    cp.set_defaults(func=cmd_compare)


def _add_shipping(sub) -> None:
    """merge and export"""
    m = sub.add_parser("merge", help="merge an adapter into its base model: one standalone model directory")
    m.add_argument("adapter", help="adapter folder (out/<run>/adapter)")
    m.add_argument("--output", required=True, help="new directory for the merged model")
    m.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None)
    add_trust_flag(m)
    m.set_defaults(func=cmd_merge)

    x = sub.add_parser("export", help="write a GGUF file (+ Ollama Modelfile) for llama.cpp / Ollama")
    x.add_argument("model", help=f"{MODEL_HELP}; an adapter is merged in memory")
    x.add_argument("--format", choices=["gguf"], default="gguf")
    x.add_argument("--output", required=True, help="new .gguf file; <stem>.Modelfile is written beside it")
    x.add_argument("--dtype", choices=["f16", "bf16", "q8_0"], default="f16")
    x.set_defaults(func=cmd_export)


def _add_serving(sub) -> None:
    """serve"""
    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/chat/completions, /v1/models)")
    s.add_argument("models", nargs="+", help=f"served by name; each: {MODEL_HELP}")
    s.add_argument("--host", default="127.0.0.1", help="default loopback; 0.0.0.0 opens it to the network")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument(
        "--api-key", default=None, help="require 'Authorization: Bearer KEY' (or CHATTUNE_API_KEY)"
    )
    s.add_argument("--engine", choices=["transformers", "vllm"], default="transformers")
    s.add_argument("--device", default="auto")
    s.add_argument("--dtype", default="auto")
    s.add_argument("--max-queue", type=positive_int, default=64, help="waiting requests before 503")
    s.add_argument("--max-batch", type=positive_int, default=8, help="requests generated together")
    s.add_argument(
        "--max-body-mb",
        type=finite_float,
        default=4.0,
        help="larger request bodies are refused (413); default 4",
    )
    add_trust_flag(s)
    s.set_defaults(func=cmd_serve)


def _command_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The (sub-)sub-parser of the command `args` were parsed for (`data stats` -> its own parser)."""
    while True:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        name = getattr(args, subs[0].dest, None) if subs else None
        if name is None or name not in subs[0].choices:
            return parser
        parser = subs[0].choices[name]


def main(argv: list[str] | None = None) -> int:
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # peft 0.21 reads transformers 5's deprecated `is_gradient_checkpointing` on every model it wraps: a
    # warning about the libraries' interplay that the user can do nothing about, printed by every command.
    warnings.filterwarnings(
        "ignore", message=".*is_gradient_checkpointing.*deprecated", category=FutureWarning
    )
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # `key=value` overrides may follow a flag (`train c.yaml --resume lora.r=8`)
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = [*args.overrides, *extra]
        else:  # the command's own usage, not the top-level one
            _command_parser(parser, args).error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args)
    except ChattuneError as e:
        code = getattr(e, "exit_code", 2)  # 130: stopped by Ctrl-C / SIGTERM, and said what was saved
        print(f"{'error: ' if code == 2 else ''}{e}", file=sys.stderr)
        return code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
