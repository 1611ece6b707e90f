"""Cold and warm starts of the real trainer, before and after a change (issue 14: compilation's cost).

Runs `trainer_run.py` four times, one process each, on a random-weight Qwen2.5-7B and the legal
tutorial's lengths (the bundled DISC-Law records repeated to `--records`, `disc_law` converter, max
384, LoRA r64/alpha16/dropout 0 on every linear layer, 4,096-token packs, 2 packs a step, 1 epoch):

  before-cold   `--before-src` (e.g. `git archive <commit> src | tar -x -C before/`), empty compile cache
  before-warm   the same code again, its compile cache now filled by before-cold
  after-cold    this checkout's code, empty `$CHATTUNE_CACHE` (the compile cache lives there)
  after-warm    the same again

Cold runs log every 5 steps (steady tokens/s as the trainer reports it) and record `TORCH_LOGS=
recompiles,graph_breaks`; warm runs log every step, so their per-step losses can be compared (each log
line is a host sync: warm tokens/s read ~3 % low). Each run's log goes to `--out`/compile-<case>.log,
the results to `compile-results.json` (both under `--logs`), and a table is printed at the end.

  git archive <commit> src | tar -x -C /tmp/before     # the code before the change
  PYTHONUNBUFFERED=1 python bench/compile_run.py --before-src /tmp/before/src --logs $OUT   # ~8 min
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

WORKLOAD = [
    "data.converter=disc_law",
    "data.system_prompt=你是一个法律专家，请根据用户的问题给出专业的回答",
    "data.truncation=cut_prompt",
    "lora.r=64",
    "lora.alpha=16",
    "lora.dropout=0",
    "train.packing=true",
    "train.pack_tokens=4096",
    "train.grad_accum_steps=2",
    "train.epochs=1",
]


def run_case(name: str, src: Path | None, cache: Path, a: argparse.Namespace) -> dict:
    cold = name.endswith("cold")
    env = {k: v for k, v in os.environ.items() if k not in ("TORCHINDUCTOR_CACHE_DIR", "TORCH_LOGS")}
    env["CHATTUNE_CACHE"] = str(cache)
    if src is not None:  # the old code keeps inductor's default location: point it at its own folder
        env["TORCHINDUCTOR_CACHE_DIR"] = str(cache / "inductor")
    if cold:
        env["TORCH_LOGS"] = "recompiles,graph_breaks"
    cmd = [sys.executable, str(HERE / "trainer_run.py"), "--arch", a.arch, "--name", name]
    cmd += ["--out", a.out, "--model-dir", a.model_dir, "--data", a.data, "--records", str(a.records)]
    if src is not None:
        cmd += ["--src", str(src)]
    cmd += WORKLOAD + [f"train.logging_steps={5 if cold else 1}"] + a.set
    t0 = time.perf_counter()
    log = Path(a.logs or a.out) / f"compile-{name}.log"
    with open(log, "w") as f:
        try:
            done = subprocess.run(
                cmd, env=env, stdout=subprocess.PIPE, stderr=f, text=True, timeout=a.timeout
            )
            stdout, rc = done.stdout, done.returncode
        except subprocess.TimeoutExpired as e:
            stdout, rc = (
                (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""),
                "timeout",
            )
        f.write(stdout)
    row: dict = {"case": name, "process_s": round(time.perf_counter() - t0, 1)}
    found = [line for line in stdout.splitlines() if line.startswith("TRAINER_RESULT ")]
    if rc != 0 or not found:
        row["error"] = f"exit {rc}: " + log.read_text()[-1500:]
        return row
    row.update(json.loads(found[-1].removeprefix("TRAINER_RESULT ")))
    return row


def _max_rel_diff(a: list, b: list) -> float | None:
    pairs = [(x, y) for (s1, x), (s2, y) in zip(a, b, strict=False) if s1 == s2]
    return max((abs(x - y) / abs(y) for x, y in pairs), default=None) if pairs else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before-src", required=True, help="the old code's src/ folder")
    ap.add_argument("--cases", nargs="*", default=["before-cold", "before-warm", "after-cold", "after-warm"])
    ap.add_argument("--out", default="/tmp/chattune-bench-out")
    ap.add_argument("--logs", default=None, help="where the logs and results go (default: --out)")
    ap.add_argument("--model-dir", default="/tmp/chattune-bench-models")
    ap.add_argument("--work", default="/tmp/chattune-compile-bench", help="the runs' CHATTUNE_CACHE folders")
    ap.add_argument(
        "--data", default=str(REPO / "data" / "disc-law-eval-subjective" / "qa_short_answer.json")
    )
    ap.add_argument("--records", type=int, default=1200)
    ap.add_argument("--arch", default="qwen2.5-7b")
    ap.add_argument("--set", nargs="*", default=[], help="more section.key=value overrides")
    ap.add_argument("--timeout", type=int, default=300, help="seconds before a run is given up")
    a = ap.parse_args()
    Path(a.out).mkdir(parents=True, exist_ok=True)
    Path(a.logs or a.out).mkdir(parents=True, exist_ok=True)
    work = Path(a.work)
    for side in ("before", "after"):  # cold means cold
        if f"{side}-cold" in a.cases:
            shutil.rmtree(work / side, ignore_errors=True)
    rows = []
    for name in a.cases:
        side = name.split("-")[0]
        src = Path(a.before_src).resolve() if side == "before" else None
        row = run_case(name, src, work / side, a)
        rows.append(row)
        brief = {k: row.get(k) for k in ("case", "process_s", "run_s", "start", "error")}
        print("COMPILE_RESULT " + json.dumps(brief, ensure_ascii=False), flush=True)
        (Path(a.logs or a.out) / "compile-results.json").write_text(
            json.dumps(rows, indent=1, ensure_ascii=False)
        )

    print(
        f"\n{'case':12} {'to step1':>8} {'step1':>6} {'10 steps':>8} {'steady':>7} {'train':>6} {'run()':>6} "
        f"{'peak':>5} {'graphs':>6} {'recomp':>6} {'fx hit/miss':>11} {'aot hit/miss':>12}"
    )
    for r in rows:
        if "error" in r:
            print(f"{r['case']:12} {r['error'][:300]}")
            continue
        s, c = r["start"], r.get("compile", {})
        ind, aot = c.get("inductor", {}), c.get("aot_autograd", {})
        print(
            f"{r['case']:12} {s['step1_done'] or 0:>8.1f} {s['first_step_s'] or 0:>6.1f} "
            f"{s['first_10_steps_s'] or 0:>8.1f} {r['tokens_per_s_after_first_window']:>7,} {r['train_s']:>6.1f} "
            f"{r['run_s']:>6.1f} {r['peak_mem_gib']:>5.1f} {c.get('stats', {}).get('unique_graphs', 0):>6} "
            f"{sum(c.get('recompiles', {}).values()):>6} "
            f"{ind.get('fxgraph_cache_hit', 0):>5}/{ind.get('fxgraph_cache_miss', 0):<5} "
            f"{aot.get('autograd_cache_hit', 0):>6}/{aot.get('autograd_cache_miss', 0):<5}"
        )
    by = {r["case"]: r for r in rows if "error" not in r}
    for x, y in (("after-warm", "before-warm"), ("after-cold", "before-cold")):
        if x in by and y in by:
            print(
                f"losses {x} vs {y}: max relative difference {_max_rel_diff(by[x]['losses'], by[y]['losses'])}"
            )


if __name__ == "__main__":
    main()
