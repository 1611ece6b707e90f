"""The `chattune` command: one subcommand per job. Heavy libraries are imported inside commands so
`chattune --help` answers at once; a `ChattuneError` becomes one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import os
import sys

from chattune.errors import ChattuneError


def cmd_train(args) -> int:
    from chattune.config import load_config

    cfg = load_config(args.config, args.overrides)  # a config mistake is reported once, before any launch
    if args.gpus is not None:
        from chattune.distributed import relaunch

        resume = ["--resume"] if args.resume else []
        return relaunch(args.gpus, ["train", args.config, *args.overrides, *resume])
    from chattune.train import run

    run(cfg, resume=args.resume)
    return 0


def cmd_demo(args) -> int:
    from pathlib import Path

    import torch

    from chattune.config import check_output_dir, config_from_dict, parse_overrides
    from chattune.demo import (
        DEMO_NAME,
        demo_config_tree,
        print_before_after,
        print_knowledge_kept,
        read_before_after,
    )
    from chattune.train import run

    tree = demo_config_tree(args.output_dir)
    for key, value in parse_overrides(args.overrides):
        sec, _, name = key.partition(".")
        tree.setdefault(sec, {})[name] = value
    cfg = config_from_dict(tree, "demo config")
    check_output_dir(cfg.train, "demo config")
    torch.set_num_threads(max(1, min(os.cpu_count() or 1, 8)))  # every core: CPU training is compute-bound
    print(
        f"chattune demo: LoRA-tune {cfg.model.name_or_path} to answer as '{DEMO_NAME}', on this machine's CPU",
        flush=True,
    )
    out = run(cfg)
    print_before_after(read_before_after(out))
    print_knowledge_kept(out)
    print(f"\nAdapter: {out / 'adapter'}   Report: {out / 'report.html'}")
    print(f"Chat with it: chattune chat {out / 'adapter'}")
    # Where track.py told SwanLab to write: SWANLAB_LOG_DIR when set, else the run directory's swanlog/.
    swanlog = os.environ.get("SWANLAB_LOG_DIR") or os.environ.get("SWANLAB_LOGDIR") or str(out / "swanlog")
    swanlab_runs = sorted(Path(swanlog).glob("run-*"), key=lambda p: p.stat().st_mtime)
    if swanlab_runs:
        print(f"SwanLab (offline) run: upload it later with `swanlab sync {swanlab_runs[-1]}`")
    return 0


def cmd_chat(args) -> int:
    from chattune.chat import run_chat
    from chattune.loading import load_for_inference

    loaded = load_for_inference(args.model, device=args.device, trust_remote_code=args.trust_remote_code)
    run_chat(
        loaded,
        system_prompt=args.system,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
    )
    return 0


def cmd_predict(args) -> int:
    from chattune.files import check_output_path
    from chattune.infer import predict_file, read_prompts
    from chattune.loading import load_for_inference

    check_output_path(args.output, "--output", directory=False)  # before the model loads, not after
    read_prompts(args.input, "auto", None)  # a bad row is reported before the model loads too
    loaded = load_for_inference(args.model, device=args.device, trust_remote_code=args.trust_remote_code)
    n = predict_file(
        loaded,
        args.input,
        args.output,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature if args.temperature is not None else 0.0,
    )
    print(f"wrote {n} predictions to {args.output}", file=sys.stderr)
    return 0


def cmd_eval(args) -> int:
    from chattune.evaluate import run_eval

    run_eval(
        args.model,
        args.data,
        output_dir=args.output,
        samples=args.samples,
        task=args.task,
        metrics=args.metrics.split(",") if args.metrics else None,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        system_prompt=args.system,
        converter=args.converter,
        device=args.device,
        placeholders={"name": args.identity_name, "author": args.identity_author},
        trust_remote_code=args.trust_remote_code,
    )
    return 0


def cmd_bench(args) -> int:
    from chattune.benchmarks import run_bench

    run_bench(
        args.model,
        args.task,
        args.data,
        split=args.split,
        subjects=args.subjects.split(",") if args.subjects else None,
        shots=args.shots,
        max_questions=args.max_questions,
        dev=args.dev,
        scoring=args.scoring,
        backend=args.backend,
        batch_size=args.batch_size,
        output_dir=args.output,
        device=args.device,
        system_prompt=args.system,
        trust_remote_code=args.trust_remote_code,
    )
    return 0


def cmd_report(args) -> int:
    from chattune.report import write_report

    html, md = write_report(args.run_dir)
    print(f"wrote {html} and {md}", file=sys.stderr)
    return 0


def cmd_sweep(args) -> int:
    from chattune.sweep import run_sweep

    failed = run_sweep(args.config, args.overrides, args.vary, resume=args.resume, gpus=args.gpus)
    if failed:
        print(
            f"error: {failed} variant(s) failed (see above); rerun with --resume to retry them",
            file=sys.stderr,
        )
    return 1 if failed else 0


def cmd_compare(args) -> int:
    from pathlib import Path

    from chattune.compare import write_compare

    dirs = [Path(d) for d in args.run_dirs]
    # Default: beside the runs when they share a folder (a sweep's layout), else here.
    parents = {d.resolve().parent for d in dirs}
    output = Path(args.output) if args.output else (parents.pop() if len(parents) == 1 else Path.cwd())
    html, md = write_compare(dirs, output)
    print(f"wrote {html} and {md}", file=sys.stderr)
    return 0


def cmd_merge(args) -> int:
    from chattune.merge import merge_adapter

    out = merge_adapter(args.adapter, args.output, dtype=args.dtype, trust_remote_code=args.trust_remote_code)
    print(f"merged model written to {out}", file=sys.stderr)
    return 0


def cmd_export(args) -> int:
    from chattune.export import export_gguf

    gguf_file, modelfile = export_gguf(args.model, args.output, dtype=args.dtype)
    print(f"wrote {gguf_file} and {modelfile}", file=sys.stderr)
    print(f"Ollama:    ollama create {gguf_file.stem} -f {modelfile}", file=sys.stderr)
    print(f"llama.cpp: llama-cli -m {gguf_file} --jinja", file=sys.stderr)
    return 0


def cmd_serve(args) -> int:
    from chattune.serve import run_server

    run_server(
        args.models,
        host=args.host,
        port=args.port,
        api_key=args.api_key or os.environ.get("CHATTUNE_API_KEY"),
        engine=args.engine,
        device=args.device,
        dtype=args.dtype,
        max_queue=args.max_queue,
        max_batch=args.max_batch,
        max_body_bytes=int(args.max_body_mb * 2**20),
        trust_remote_code=args.trust_remote_code,
    )
    return 0


def add_trust_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="run Python code shipped with the model or adapter (auto_map); a folder never turns this on itself",
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="chattune", description="LoRA fine-tuning of chat models from one config file."
    )
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="fine-tune from a YAML config (key.sub=value overrides)")
    t.add_argument("config", help="YAML config file (see configs/)")
    t.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.lr=2e-4")
    t.add_argument(
        "--resume", action="store_true", help="continue from the last checkpoint in train.output_dir"
    )
    t.add_argument(
        "--gpus",
        type=int,
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

    from chattune.datacheck import add_data_parser  # light: imports nothing heavy at module level

    add_data_parser(sub)

    for name, helptext in [("chat", "chat with a model or adapter"), ("predict", "batch predictions")]:
        c = sub.add_parser(name, help=helptext)
        c.add_argument("model", help="adapter folder (out/<run>/adapter) or model directory")
        c.add_argument("--device", default="auto")
        c.add_argument("--max-new-tokens", type=int, default=256)
        default_t = "the model's generation_config (greedy when it does not sample)"
        c.add_argument(
            "--temperature",
            type=float,
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
            c.add_argument("--batch-size", type=int, default=8)
        add_trust_flag(c)
        c.set_defaults(func=cmd_chat if name == "chat" else cmd_predict)

    e = sub.add_parser("eval", help="predictions + metrics of a model or adapter on a data file")
    e.add_argument("model", help="adapter folder or model directory")
    e.add_argument("--data", required=True, help="data file (.json/.jsonl), records with reference answers")
    e.add_argument("--output", default=None, help="directory for predictions.jsonl and metrics.json")
    e.add_argument("--samples", type=int, default=None, help="evaluate only the first N records")
    e.add_argument("--task", choices=["generation", "classification"], default="generation")
    e.add_argument("--metrics", default=None, help="comma-separated metric names (default: per task)")
    e.add_argument("--max-new-tokens", type=int, default=256)
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--system", default=None, help="system prompt (default: the adapter's)")
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
    b.add_argument("--max-questions", type=int, default=None, help="the first N questions of each subject")
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
    b.add_argument("--batch-size", type=int, default=8)
    b.add_argument("--output", default=None, help="directory for predictions.jsonl and metrics.json")
    b.add_argument("--system", default=None, help="system prompt (default: the adapter's)")
    b.add_argument("--device", default="auto")
    add_trust_flag(b)
    b.set_defaults(func=cmd_bench)

    r = sub.add_parser("report", help="(re)write report.html and report.md of a run directory")
    r.add_argument("run_dir", help="a training run's output directory")
    r.set_defaults(func=cmd_report)

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
        "--gpus", type=int, default=None, metavar="N", help="run N variants side by side, one per GPU"
    )
    w.set_defaults(func=cmd_sweep)

    cp = sub.add_parser("compare", help="one HTML page (and Markdown) putting several runs side by side")
    cp.add_argument("run_dirs", nargs="+", help="training runs' output directories")
    cp.add_argument("--output", default=None, help="folder for compare.html (default: the runs' parent)")
    cp.set_defaults(func=cmd_compare)

    m = sub.add_parser("merge", help="merge an adapter into its base model: one standalone model directory")
    m.add_argument("adapter", help="adapter folder (out/<run>/adapter)")
    m.add_argument("--output", required=True, help="new directory for the merged model")
    m.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None)
    add_trust_flag(m)
    m.set_defaults(func=cmd_merge)

    x = sub.add_parser("export", help="write a GGUF file (+ Ollama Modelfile) for llama.cpp / Ollama")
    x.add_argument("model", help="adapter folder (merged in memory) or model directory")
    x.add_argument("--format", choices=["gguf"], default="gguf")
    x.add_argument("--output", required=True, help="new .gguf file; <stem>.Modelfile is written beside it")
    x.add_argument("--dtype", choices=["f16", "bf16", "q8_0"], default="f16")
    x.set_defaults(func=cmd_export)

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/chat/completions, /v1/models)")
    s.add_argument("models", nargs="+", help="adapter folders or model directories, served by name")
    s.add_argument("--host", default="127.0.0.1", help="default loopback; 0.0.0.0 opens it to the network")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument(
        "--api-key", default=None, help="require 'Authorization: Bearer KEY' (or CHATTUNE_API_KEY)"
    )
    s.add_argument("--engine", choices=["transformers", "vllm"], default="transformers")
    s.add_argument("--device", default="auto")
    s.add_argument("--dtype", default="auto")
    s.add_argument("--max-queue", type=int, default=64, help="waiting requests before 503")
    s.add_argument("--max-batch", type=int, default=8, help="requests generated together")
    s.add_argument(
        "--max-body-mb", type=float, default=4.0, help="larger request bodies are refused (413); default 4"
    )
    add_trust_flag(s)
    s.set_defaults(func=cmd_serve)
    return p


def main(argv: list[str] | None = None) -> int:
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # peft 0.21 reads transformers 5's deprecated `is_gradient_checkpointing` on every model it wraps: a
    # warning about the libraries' interplay that the user can do nothing about, printed by every command.
    warnings.filterwarnings(
        "ignore", message=".*is_gradient_checkpointing.*deprecated", category=FutureWarning
    )
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ChattuneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
