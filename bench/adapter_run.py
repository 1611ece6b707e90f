"""Time to adapter (issue 14, item 4): the legal tutorial's whole job, process start to adapter saved.

Cases, each its own process, run in the order given (`--cases`):

  cold       `chattune train configs/qwen2.5-7b-instruct-legal-fast.yaml` (the shipped config: LoRA
             r64/alpha16/dropout 0 on every linear layer, 4,096-token packs, 1 pack a step, 2 epochs, eval
             loss + 5 sample answers of up to 256 tokens before training and after each epoch, a
             checkpoint every 100 steps) on the legal tutorial's workload: the bundled 241 DISC-Law
             records repeated to 4,995. Empty `$CHATTUNE_CACHE` (no compile cache, no rendered data).
             Only the model, the data and the output move: `model.name_or_path=<random 7B dir>`,
             `data.train_path=<x4995 file>`, `track.backend=none` (SwanLab is not installed there).
  warm       the same command again: the compile cache and rendered data that `cold` left.
  cold-fp8   `cold` with `train.precision=fp8` (issue 28: FP8 base matmuls), its own empty cache
  warm-fp8   `cold-fp8` again, warm (the cache `cold-fp8` left)
  nosamples  `warm` with `eval.samples=0` (eval loss only): what the sample answers cost in the whole run
  ddp2       `cold`'s command with `--gpus 2` (torchrun, DDP replicas), its own empty cache: on nvidia-h200-x2
  fsdp2      the same with `train.distributed=fsdp` (FSDP2 shards)
  decode     `decode_run.py`: the 5 sample answers (256 tokens) by `generate` and by the CUDA-graph
             decoder, LoRA merged into a copy or not
  unfused    `trainer_run.py` (1,000 records, 1 epoch, 2 packs a step), LoRA A fusion off (item 2 A/B)
  fused      the same with it on (the default)
  samples    `fused` with 5 sample answers of up to 256 tokens before and after training (their cost)
  tutorial   the tutorial recipe (`seed_recipe.py`: HF Trainer, padding, bs 4 x GA 4, checkpointing) for
             a few steps on the same lengths; its whole-run time is extrapolated from its speed
  trl        `trl_run.py`: TRL's SFTTrainer at its best settings, whole run (its wheels must be importable)

The model is Qwen2.5-7B's architecture with random bf16 weights (speed does not depend on the values),
written once under `--work` with the real Qwen2.5 tokenizer. Times are from `Popen` to the process's
exit; the adapter is written before the exit. Each case's stderr goes to `--logs`/adapter-<case>.log
with every line's time since its start; results to `--logs`/adapter-results.json.

  PYTHONUNBUFFERED=1 python bench/adapter_run.py --cases cold,warm --work /tmp/ct --logs $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CONFIG = REPO / "configs" / "qwen2.5-7b-instruct-legal-fast.yaml"
RECORDS = 4995


def prepare(work: Path, arch: str = "qwen2.5-7b", records: int = RECORDS) -> tuple[Path, Path]:
    """The random-weight 7B directory and the 4,995-record legal file (both kept between calls)."""
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(REPO / "src"))
    import trainer_run

    t = time.perf_counter()
    model = trainer_run.write_random_model(arch, work / arch)
    data = work / f"legal-x{records}.json"
    if not data.is_file():
        rows = json.loads(
            (REPO / "data" / "disc-law-eval-subjective" / "qa_short_answer.json").read_text("utf-8")
        )
        data.write_text(
            json.dumps([rows[i % len(rows)] for i in range(records)], ensure_ascii=False), "utf-8"
        )
    print(f"prepared in {time.perf_counter() - t:.1f}s: {model}, {data}", flush=True)
    return model, data


def _pythonpath() -> str:
    """`$BENCH_SRC` (default: this checkout's src/) first, then whatever the caller set (e.g. carried wheels' folder)."""
    return os.pathsep.join(
        p for p in (os.environ.get("BENCH_SRC", str(REPO / "src")), os.environ.get("PYTHONPATH", "")) if p
    )


def timed(cmd: list[str], env: dict, log: Path, limit: float) -> tuple[float, int, list[tuple[float, str]]]:
    """Run `cmd`; returns (wall seconds, exit code, [(seconds since start, stderr+stdout line)])."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[tuple[float, str]] = []

    def read() -> None:
        for line in proc.stdout:  # type: ignore[union-attr]
            lines.append((round(time.perf_counter() - t0, 2), line.rstrip("\n")))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        proc.kill()
        rc = -9
    wall = time.perf_counter() - t0
    reader.join(timeout=5)
    log.write_text("\n".join(f"{t:8.2f} {s}" for t, s in lines) + "\n", encoding="utf-8")
    return wall, rc, lines


def chattune_case(name: str, model: Path, data: Path, work: Path, logs: Path, limit: float) -> dict:
    extra = {"nosamples": ["eval.samples=0"], "fsdp2": ["train.distributed=fsdp"]}.get(name, [])
    if name.endswith("-fp8"):
        extra = ["train.precision=fp8"]
    gpus = ["--gpus", "2"] if name in ("ddp2", "fsdp2") else []
    out = work / f"run-{name}"
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "CHATTUNE_CACHE": str(work / "cache"), "PYTHONPATH": _pythonpath()}
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    if name in ("cold", "cold-fp8", "ddp2", "fsdp2"):  # each starts cold
        shutil.rmtree(work / "cache", ignore_errors=True)
    cache_there = (work / "cache" / "torch-compile").is_dir()  # warm only if an earlier case filled it
    cmd = [
        sys.executable, "-m", "chattune", "train", *gpus, str(CONFIG),
        f"model.name_or_path={model}", "model.source=local", f"data.train_path={data}",
        f"train.output_dir={out}", "track.backend=none", "train.progress=false", *extra,
    ]  # fmt: skip
    wall, rc, lines = timed(cmd, env, logs / f"adapter-{name}.log", limit)
    res: dict = {
        "case": name,
        "process_to_exit_s": round(wall, 1),
        "rc": rc,
        "compile_cache_there": cache_there,
    }
    summary_path = out / "summary.json"
    if rc != 0 or not summary_path.is_file():
        res["tail"] = [s for _, s in lines[-15:]]
        return res
    summary = json.loads(summary_path.read_text())
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "train/tokens_per_s" in r]
    steady = train[1:] or train
    first = lambda prefix: next((t for t, s in lines if s.startswith(prefix)), None)  # noqa: E731
    res.update(
        adapter_saved=(out / "adapter" / "adapter_model.safetensors").is_file(),
        train_s=round(summary["train_s"], 1),
        run_wall_s=round(summary["wall_s"], 1),
        train_tokens=summary["train_tokens"],
        steps=summary["steps"],
        first_step_s=summary.get("first_step_s"),
        first_10_steps_s=summary.get("first_10_steps_s"),
        tokens_per_s_whole_training=round(summary["tokens_per_s"]),
        tokens_per_s_steady=round(sum(r["train/tokens_per_s"] for r in steady) / len(steady)),
        mfu_steady=round(sum(r.get("train/mfu", 0) for r in steady) / len(steady), 3),
        peak_mem_gib=summary["peak_mem_gib"],
        evals=[
            {k: v for k, v in e.items() if k in ("step", "eval/loss", "tag")} for e in summary["evaluations"]
        ],
        seconds={  # since process start, from the log lines' times
            "data_line": first("data:"),
            "model_line": first("model:"),
            "baseline_eval": first("eval [baseline]"),
            "epoch1_eval": first("eval [epoch 1]"),
            "epoch2_eval": first("eval [epoch 2]"),
            "done_line": first("done in"),
        },
        losses=[[r["step"], r["train/loss"]] for r in train if "train/loss" in r],  # every log window
        hardware=summary["hardware"],
        versions=summary["versions"],
    )
    return res


def trainer_case(name: str, model: Path, work: Path, logs: Path, limit: float) -> dict:
    """Item 2's A/B: the same short run with the LoRA A fusion on and off (shared compile cache)."""
    # Each its own compile cache: the fusion pass's cache key does not see the switch.
    env = {**os.environ, "CHATTUNE_CACHE": str(work / f"cache-{name}"), "PYTHONPATH": _pythonpath()}
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    cmd = [
        sys.executable, str(HERE / "trainer_run.py"), "--arch", "qwen2.5-7b", "--model-dir", str(model.parent),
        "--data", str(REPO / "data" / "disc-law-eval-subjective" / "qa_short_answer.json"), "--records", "1000",
        "--out", str(work / "ab"), "--name", name,
        "data.converter=disc_law", "data.truncation=cut_prompt", "lora.r=64", "lora.alpha=16", "lora.dropout=0.0",
        "lora.target_modules=all-linear", "train.packing=true", "train.pack_tokens=4096",
        "train.grad_accum_steps=2", "train.epochs=1", "train.logging_steps=5",
    ]  # fmt: skip
    if name == "unfused":
        cmd.insert(2, "--no-lora-fusion")
    if name == "samples":  # what the shipped config's sample answers cost (5 x up to 256 tokens an eval)
        cmd += ["eval.samples=5", "eval.max_new_tokens=256"]
    wall, rc, lines = timed(cmd, env, logs / f"adapter-{name}.log", limit)
    res = {"case": name, "process_to_exit_s": round(wall, 1), "rc": rc}
    found = [s for _, s in lines if s.startswith("TRAINER_RESULT ")]
    if found:
        r = json.loads(found[-1].split(" ", 1)[1])
        res.update(
            {k: r[k] for k in ("tokens_per_s_after_first_window", "mfu_after_first_window", "peak_mem_gib")}
        )
        res.update(losses=r["losses"], start=r["start"], compile=r["compile"].get("phase_s"))
    else:
        res["tail"] = [s for _, s in lines[-15:]]
    res["line_times"] = [(t, s[:90]) for t, s in lines if s.startswith(("data:", "model:", "eval ["))]
    return res


def tutorial_case(logs: Path, limit: float) -> dict:
    cmd = [
        sys.executable, str(HERE / "seed_recipe.py"), "--arch", "qwen2.5-7b", "--steps", "8", "--warm", "2",
        "--lengths", str(HERE / "lengths-disc.txt"),
    ]  # fmt: skip
    wall, rc, lines = timed(cmd, dict(os.environ), logs / "adapter-tutorial.log", limit)
    found = [s for _, s in lines if s.startswith("RESULT ")]
    res: dict = {"case": "tutorial", "process_to_exit_s": round(wall, 1), "rc": rc}
    if found:
        r = json.loads(found[-1].split(" ", 1)[1])
        res.update(r)
    else:
        res["tail"] = [s for _, s in lines[-15:]]
    return res


def trl_case(model: Path, data: Path, work: Path, logs: Path, limit: float) -> dict:
    cmd = [sys.executable, str(HERE / "trl_run.py"), "--model-dir", str(model), "--data", str(data)]
    cmd += ["--out", str(work / "trl")]
    wall, rc, lines = timed(cmd, dict(os.environ), logs / "adapter-trl.log", limit)
    found = [s for _, s in lines if s.startswith("TRL_RESULT ")]
    res: dict = {"case": "trl", "process_to_exit_s": round(wall, 1), "rc": rc}
    if found:
        res.update(json.loads(found[-1].split(" ", 1)[1]))
    else:
        res["tail"] = [s for _, s in lines[-25:]]
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default="cold,warm")
    ap.add_argument("--work", default="/tmp/chattune-adapter")
    ap.add_argument("--logs", default=".")
    ap.add_argument("--arch", default="qwen2.5-7b", help="'tiny' for a CPU smoke run")
    ap.add_argument("--records", type=int, default=RECORDS)
    ap.add_argument("--limit", type=float, default=400, help="seconds a case may take before it is killed")
    a = ap.parse_args()
    work, logs = Path(a.work), Path(a.logs)
    work.mkdir(parents=True, exist_ok=True)
    logs.mkdir(parents=True, exist_ok=True)
    model, data = prepare(work, a.arch, a.records)
    path = logs / "adapter-results.json"
    results = json.loads(path.read_text()) if path.is_file() else []
    for case in a.cases.split(","):
        if case in ("cold", "warm", "cold-fp8", "warm-fp8", "nosamples", "ddp2", "fsdp2"):
            res = chattune_case(case, model, data, work, logs, a.limit)
        elif case in ("fused", "unfused", "samples"):
            res = trainer_case(case, model, work, logs, a.limit)
        elif case == "tutorial":
            res = tutorial_case(logs, a.limit)
            if res.get("tokens_per_s"):  # the whole job at that speed (same real tokens as chattune's run)
                done = [r for r in results if r.get("train_tokens")]
                tokens = done[-1]["train_tokens"] if done else 2_661_134
                res["whole_run_estimate_s"] = round(tokens / res["tokens_per_s"])
        elif case == "decode":
            cmd = [sys.executable, str(HERE / "decode_run.py"), "--model", str(model)]
            wall, rc, lines = timed(cmd, dict(os.environ), logs / "adapter-decode.log", a.limit)
            found = [s for _, s in lines if s.startswith("DECODE_RESULT ")]
            res = {"case": "decode", "process_to_exit_s": round(wall, 1), "rc": rc}
            res.update(
                json.loads(found[-1].split(" ", 1)[1]) if found else {"tail": [s for _, s in lines[-25:]]}
            )
        elif case == "trl":
            res = trl_case(model, data, work, logs, a.limit)
        else:
            raise SystemExit(f"unknown case {case!r}")
        res["date"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        results.append(res)
        path.write_text(json.dumps(results, indent=1, ensure_ascii=False))
        brief = {
            k: v
            for k, v in res.items()
            if not isinstance(v, (list, dict)) or k in ("seconds", "start", "cases")
        }
        print("CASE " + json.dumps(brief, ensure_ascii=False), flush=True)


if __name__ == "__main__":
    main()
