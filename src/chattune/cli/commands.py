"""One function per `chattune` command: parse nothing, import the stage it runs (heavy libraries load only
when a command needs them), return the exit code. `parser.py` wires them to the argument parser.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def cmd_train(args) -> int:
    from chattune.config.load import load_config
    from chattune.data import check_sources

    cfg = load_config(args.config, args.overrides)  # a config mistake is reported once, before any launch
    check_sources(cfg.data)  # so is a data path that names nothing
    # Paths the config reads are relative to it; train.output_dir, an output, to the working directory.
    where = Path(cfg.train.output_dir).expanduser().resolve()
    print(f"chattune train: writing the run to {where}", file=sys.stderr, flush=True)
    if args.gpus is not None:
        from chattune.train.world import relaunch

        resume = ["--resume"] if args.resume else []
        return relaunch(args.gpus, ["train", args.config, *args.overrides, *resume])
    from chattune.train.job import run
    from chattune.train.rundir import recording_end_state

    with recording_end_state(cfg.train.output_dir):  # run_state.json: interrupted / failed; SIGTERM stops
        run(cfg, resume=args.resume)
    return 0


def cmd_demo(args) -> int:
    import torch

    from chattune.config.checks import check_output_dir
    from chattune.config.load import config_from_dict, parse_overrides
    from chattune.demo import (
        DEMO_NAME,
        demo_config_tree,
        print_before_after,
        print_knowledge_kept,
        read_before_after,
    )
    from chattune.track import held_run_links
    from chattune.train.job import run

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
    with held_run_links() as run_links:  # the `swanlab sync ...` line goes last, below the results
        out = run(cfg)
    print_before_after(read_before_after(out))
    print_knowledge_kept(out)
    print(f"\nAdapter: {out / 'adapter'}   Report: {out / 'report.html'}")
    print(f"Chat with it: chattune chat {out / 'adapter'}")
    for line in run_links:
        print(line)
    return 0


def cmd_chat(args) -> int:
    from chattune.infer.chat import run_chat
    from chattune.infer.load import load_for_inference

    loaded = load_for_inference(args.model, device=args.device, trust_remote_code=args.trust_remote_code)
    run_chat(
        loaded,
        system_prompt=args.system,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
    )
    return 0


def cmd_predict(args) -> int:
    from chattune.files import check_not_input, check_output_path
    from chattune.infer.load import load_for_inference
    from chattune.infer.predict import predict_file, read_prompts

    check_output_path(args.output, "--output", directory=False)  # before the model loads, not after
    check_not_input(args.output, [args.input], "--output")
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
    from chattune.evaluate.command import format_metrics_table, run_eval

    result = run_eval(
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
        columns=args.columns,
    )
    print(format_metrics_table(result))
    if args.output is not None:
        out = Path(args.output)
        print(f"wrote {out / 'predictions.jsonl'} and {out / 'metrics.json'}")
    return 0


def cmd_bench(args) -> int:
    from chattune.evaluate.bench_command import run_bench
    from chattune.evaluate.benchmarks import format_bench_table

    result = run_bench(
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
    print(format_bench_table(result, result["name"]))
    if args.output is not None:
        out = Path(args.output)
        print(f"wrote {out / 'predictions.jsonl'} and {out / 'metrics.json'}", file=sys.stderr)
    return 0


def cmd_report(args) -> int:
    from chattune.report.run_report import write_report

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

    from chattune.report.compare import write_compare

    dirs = [Path(d) for d in args.run_dirs]
    # Default: beside the runs when they share a folder (a sweep's layout), else here.
    parents = {d.resolve().parent for d in dirs}
    output = Path(args.output) if args.output else (parents.pop() if len(parents) == 1 else Path.cwd())
    html, md = write_compare(dirs, output)
    print(f"wrote {html} and {md}", file=sys.stderr)
    return 0


def cmd_merge(args) -> int:
    from chattune.infer.merge import merge_adapter

    out = merge_adapter(args.adapter, args.output, dtype=args.dtype, trust_remote_code=args.trust_remote_code)
    print(f"merged model written to {out}", file=sys.stderr)
    return 0


def cmd_export(args) -> int:
    from chattune.infer.export_gguf import export_gguf

    gguf_file, modelfile = export_gguf(args.model, args.output, dtype=args.dtype)
    print(f"wrote {gguf_file} and {modelfile}", file=sys.stderr)
    print(f"Ollama:    ollama create {gguf_file.stem} -f {modelfile}", file=sys.stderr)
    print(f"llama.cpp: llama-cli -m {gguf_file} --jinja", file=sys.stderr)
    return 0


def cmd_serve(args) -> int:
    from chattune.infer.serve import run_server

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
