"""`chattune data ...`: look at what will be trained before training it (convert, check, stats, preview).

The same pre-flight runs before every training run (`preflight`): a sample of conversations goes
through the training path and through `tokenizer.apply_chat_template`, and training is refused when
they differ; warnings name settings that would train a model that cannot stop. Data commands need
only the tokenizer: `model.name_or_path` may be a directory with tokenizer files and no weights.
Heavy libraries are imported inside functions so that `chattune --help` stays instant.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from chattune.cli.args import positive_int
from chattune.console import say, tally
from chattune.render.preflight import preflight, require_examples
from chattune.render.stats import format_stats, length_table, write_histogram_png

_GREEN, _DIM, _RESET = "\033[1;32m", "\033[2m", "\033[0m"


# -- loading for the data commands ------------------------------------------------------------------------
def load_data_tokenizer(model_cfg):
    """The tokenizer (with the configured chat template) and its directory; never the weights."""
    from dataclasses import replace

    from chattune.model.builtin import BUILTIN_MODELS, BUILTIN_PREFIX
    from chattune.model.load import load_tokenizer
    from chattune.model.resolve import resolve_model_dir
    from chattune.paths import tokenizer_asset_dir
    from chattune.render.template import chat_template_path

    name = model_cfg.name_or_path.removeprefix(BUILTIN_PREFIX)
    if model_cfg.name_or_path.startswith(BUILTIN_PREFIX) and name in BUILTIN_MODELS:
        model_dir = (
            tokenizer_asset_dir()
        )  # the tiny built-ins use the vendored tokenizer: no need to build them
    else:  # a real model (a converted GGUF included) has its own tokenizer; an unknown name is an error
        model_dir = resolve_model_dir(model_cfg.name_or_path, model_cfg.source, model_cfg.revision)
    cfg = replace(model_cfg, chat_template=chat_template_path(model_cfg.chat_template))
    return load_tokenizer(model_dir, cfg), model_dir


def _load(args):
    from chattune.config.load import load_config
    from chattune.data import read_splits

    cfg = load_config(args.config, args.overrides, check_output=False)  # data commands write no run
    tokenizer, model_dir = load_data_tokenizer(cfg.model)
    from chattune.render.template import set_template_kwargs

    set_template_kwargs(tokenizer, cfg.data.template_kwargs)  # rendered as `chattune train` will
    train, held, read_report, eval_report = read_splits(cfg.data, cfg.train.seed)
    return cfg, tokenizer, model_dir, train, held, read_report, eval_report


def _read_summary(dc, train, held, read_report, eval_report) -> str:
    r = read_report
    skipped = sum(r.skipped.values())
    lines = [f"read: {r.rows} rows from {len(r.sources)} source(s), {r.kept} kept, {skipped} skipped"]
    lines += [f"  skipped {n}: {reason}" for reason, n in r.skipped.most_common()]
    if r.duplicates:
        what = "dropped (data.dedup)" if r.dropped_duplicates else "kept; data.dedup: true drops them"
        lines.append(f"  duplicated: {r.duplicates} conversations repeat an earlier one ({what})")
    if eval_report is not None and eval_report.duplicates:
        lines.append(f"  {eval_report.duplicates} eval conversations also occur in the training data")
    lines.append(f"split: {len(train)} train / {len(held)} eval conversations")
    return "\n".join(lines)


def _render_summary(name: str, report, dc) -> str:
    dropped = sum(report.dropped.values())
    out = [
        f"{name}: {report.examples} examples, {report.tokens} tokens ({report.trained_tokens} trained); "
        f"{report.truncated} truncated to {dc.max_len} tokens ({dc.truncation}), {dropped} dropped"
    ]
    out += [f"  dropped {n}: {reason}" for reason, n in report.dropped.most_common()]
    return "\n".join(out)


# -- commands ---------------------------------------------------------------------------------------------
def cmd_check(args) -> int:
    from chattune.render.cache import render_all
    from chattune.render.template import template_facts

    cfg, tok, model_dir, train, held, read_report, eval_report = _load(args)
    dc = cfg.data
    sample = len(train) if args.all else args.sample
    warnings = preflight(tok, train, model_dir=model_dir, train_on=dc.train_on, sample=sample)
    print(_read_summary(dc, train, held, read_report, eval_report))
    print(
        f"template: end-of-turn {template_facts(tok).eot!r}; {min(sample, len(train))} conversations rendered "
        "the same as apply_chat_template, with verified assistant labels"
    )
    kw = dict(
        max_len=dc.max_len,
        truncation=dc.truncation,
        train_on=dc.train_on,
        on_bad_row=dc.on_bad_row,
        cache=dc.cache,
    )
    for name, convs in (("train", train), ("eval", held)):
        if convs:
            report = render_all(tok, convs, **kw)[1]
            print(_render_summary(name, report, dc))
            if name == "train":
                require_examples(report, dc)
            elif not report.examples:
                warnings.append("every eval conversation was dropped: there will be no eval loss")
    for w in warnings:
        say(f"warning: {w}")
    print("ok: the data can be trained on")
    return 0


def cmd_stats(args) -> int:
    from chattune.render.cache import render_all

    cfg, tok, _, train, held, read_report, eval_report = _load(args)
    dc = cfg.data
    convs = train if args.split == "train" else held
    kw = dict(truncation=dc.truncation, train_on=dc.train_on, cache=dc.cache)
    # Two passes (natural lengths, then as trained); on a large file each reports its rate and time left.
    full, _ = render_all(tok, convs, max_len=10**9, desc="tokenising at full length", **kw)
    _, report = render_all(tok, convs, max_len=dc.max_len, desc=f"tokenising at max_len {dc.max_len}", **kw)
    print(_read_summary(dc, train, held, read_report, eval_report))
    print(format_stats(length_table(full), full, dc.max_len, title=f"{args.split} tokens before truncation"))
    print(_render_summary(args.split, report, dc))
    from chattune.render.template import dropped_reasoning

    # The template's own choice (Qwen3 renders no reasoning before the last user turn): said, not hidden.
    lost = sum(1 for c in convs if dropped_reasoning(tok, c.messages))
    if lost:
        print(
            f"{lost} multi-turn examples had reasoning dropped from earlier turns by the chat template (not trained)"
        )
    if args.png:
        write_histogram_png(full, dc.max_len, args.png)
        print(f"histogram written to {args.png}")
    return 0


def _highlight(tok, ids: list[int], labels: list[int], color: bool) -> str:
    from chattune.render.examples import IGNORE_INDEX

    out, k = [], 0
    while k < len(ids):
        trained = labels[k] != IGNORE_INDEX
        j = k
        while j < len(ids) and (labels[j] != IGNORE_INDEX) == trained:
            j += 1
        text = tok.decode(ids[k:j])
        if color:
            out.append(f"{_GREEN}{text}{_RESET}" if trained else f"{_DIM}{text}{_RESET}")
        else:
            out.append(f"[[{text}]]" if trained else text)
        k = j
    return "".join(out)


def cmd_preview(args) -> int:
    from chattune.render.examples import render_many

    cfg, tok, _, train, held, _, _ = _load(args)
    dc = cfg.data
    convs = (train if args.split == "train" else held)[: args.n]
    outs = render_many(
        tok, [c.messages for c in convs], max_len=dc.max_len, truncation=dc.truncation, train_on=dc.train_on
    )
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    for conv, out in zip(convs, outs, strict=True):
        if args.json:
            row = {"where": conv.where, "messages": conv.messages}
            row.update(
                {"dropped": out}
                if isinstance(out, str)
                else {"input_ids": out.input_ids, "labels": out.labels, "truncated": out.truncated}
            )
            print(json.dumps(row, ensure_ascii=False))
            continue
        if isinstance(out, str):
            print(f"── {conv.where}: dropped: {out}")
            continue
        n_trained = sum(label != -100 for label in out.labels)
        cut = ", truncated" if out.truncated else ""
        print(f"── {conv.where}: {len(out.input_ids)} tokens, {n_trained} trained{cut} ──")
        print(_highlight(tok, out.input_ids, out.labels, color))
    if not args.json and not color:
        print("(trained tokens are shown [[like this]])")
    return 0


def cmd_convert(args) -> int:
    from chattune.data import read_conversations, to_record
    from chattune.files import check_not_input

    check_not_input(args.output, [args.input], "OUTPUT")
    if args.converter == "identity" and not (args.name and args.author):
        from chattune.errors import ChattuneError

        raise ChattuneError(
            "the identity converter needs --name and --author (they replace {{name}}/{{author}})"
        )
    convs, report = read_conversations(
        args.input,
        converter=args.converter,
        system_prompt=args.system,
        on_bad_row=args.on_bad_row,
        placeholders={"name": args.name, "author": args.author},
    )
    records = [to_record(c.messages, args.to) for c in convs]
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".jsonl":
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    else:
        text = json.dumps(records, ensure_ascii=False, indent=2) + "\n"
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(out)
    skipped = sum(report.skipped.values())
    say(
        f"wrote {len(records)} records to {out} ({report.rows} read, {skipped} skipped{f' ({tally(report.skipped)})' if report.skipped else ''})"
    )
    return 0


def add_data_parser(sub) -> None:
    """Add the `data` subcommand group to the CLI's subparsers."""

    d = sub.add_parser("data", help="convert, check, inspect and preview training data")
    dsub = d.add_subparsers(dest="data_command", required=True)

    def with_config(name: str, helptext: str):
        p = dsub.add_parser(name, help=helptext)
        p.add_argument("config", help="YAML config file (its model and data sections are used)")
        p.add_argument("overrides", nargs="*", help="section.key=value, e.g. data.max_len=512")
        return p

    c = with_config("check", "pre-flight: render through the training path and apply_chat_template, compare")
    c.add_argument("--sample", type=positive_int, default=64, help="conversations compared (default 64)")
    c.add_argument("--all", action="store_true", help="compare every training conversation")
    c.set_defaults(func=cmd_check)

    s = with_config("stats", "counts, token lengths (mean/p50/p90/max), a length histogram, what was cut")
    s.add_argument("--split", choices=["train", "eval"], default="train")
    s.add_argument("--png", default=None, help="also write the length histogram to this PNG file")
    s.set_defaults(func=cmd_stats)

    p = with_config("preview", "rendered examples with the trained tokens highlighted")
    p.add_argument("-n", type=positive_int, default=3, help="examples to show (default 3)")
    p.add_argument("--split", choices=["train", "eval"], default="train")
    p.add_argument("--json", action="store_true", help="one JSON object per example: input_ids, labels")
    p.add_argument("--color", choices=["auto", "always", "never"], default="auto")
    p.set_defaults(func=cmd_preview)

    v = dsub.add_parser(
        "convert", help="convert a dataset (e.g. a tutorial's raw format) and write the records"
    )
    v.add_argument("input", help="data file, saved dataset directory or dataset id")
    v.add_argument("output", help=".jsonl or .json file to write")
    v.add_argument("--converter", choices=["news_cls", "disc_law", "huanhuan", "identity"], default=None)
    v.add_argument("--to", choices=["messages", "alpaca"], default="messages", help="record shape written")
    v.add_argument("--system", default=None, help="system prompt for records that have none")
    v.add_argument("--name", default=None, help="identity: the assistant's name for {{name}}")
    v.add_argument("--author", default=None, help="identity: the author for {{author}}")
    v.add_argument("--on-bad-row", choices=["error", "skip"], default="error")
    v.set_defaults(func=cmd_convert)
