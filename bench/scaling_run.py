"""Issue 14 item 3: one GPU against two (DDP, FSDP2) on the real trainer, in one call of a 2-GPU machine.

Each case is `trainer_run.py` (random-weight Qwen2.5-7B, the bundled legal records repeated, LoRA
r64/alpha16/dropout 0, 4,096-token packs, 2 packs a step, a log line every step so that per-step losses
can be compared), one GPU first (it also writes the model and warms the compile cache under
$CHATTUNE_CACHE), then the same run under torchrun on two GPUs. Also: NCCL's all-reduce and all-gather
bandwidth between the two GPUs (what the overlap has to hide), and the 0.5B full fine-tuning case of
`methods_run.py` (issue 16's re-check). Each case runs in its own process group with a hard timeout,
and a case is skipped when the call's deadline would not leave it time.

  PYTHONUNBUFFERED=1 PYTHONPATH=src python bench/scaling_run.py --out /tmp/sc --logs $OUT --deadline 520

Prints one `SCALING_RESULT {json}` line per case and a table with each run's speed-up over one GPU and
the largest relative difference of its per-step losses from one GPU's; writes `scaling-results.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from methods_run import LEGAL, R64  # noqa: E402  (the same workload as issue 16's cases)

PACKED = ["train.packing=true", "train.pack_tokens=4096", "train.grad_accum_steps=2"]
TWO = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def cases(a: argparse.Namespace, before_src: str | None) -> list[tuple[str, list[str], int]]:
    """(name, command, seconds it may take)."""
    common = [
        "--arch",
        "qwen2.5-7b",
        "--out",
        a.out,
        "--data",
        a.data,
        "--records",
        str(a.records),
        *LEGAL,
        *R64,
        *PACKED,
        f"train.max_steps={a.max_steps}",
        f"train.logging_steps={a.logging_steps}",
    ]
    run = str(HERE / "trainer_run.py")
    out = [
        ("1gpu", [sys.executable, run, "--name", "1gpu", *common], 150),
        ("ddp", [*TWO, run, "--name", "ddp", *common, "train.distributed=ddp"], 120),
        ("fsdp", [*TWO, run, "--name", "fsdp", *common, "train.distributed=fsdp"], 130),
        (
            "0.5b-full",
            [
                sys.executable,
                str(HERE / "methods_run.py"),
                "--out",
                a.out,
                "--cases",
                "0.5b-full",
                "--max-steps",
                "20",
                "--case-timeout",
                "140",
            ],
            150,
        ),
        (
            "fsdp-reshard",
            [*TWO, run, "--name", "fsdp-reshard", *common, "train.distributed=fsdp"]
            + ["train.fsdp_reshard_after_forward='on'"],
            130,
        ),
    ]
    if before_src:  # the code before this change: one all-reduce after the backward
        out.insert(4, ("ddp-before", [*TWO, run, "--name", "ddp-before", "--src", before_src, *common], 120))
    return out


def run_logged(name: str, cmd: list[str], timeout: int, log: Path) -> tuple[int | None, str]:
    """(exit code, stdout) of `cmd` run in its own process group, stderr and stdout appended to `log`;
    on timeout the whole group (torchrun and its workers) is killed and the code is None."""
    with open(log, "a", encoding="utf-8") as f:
        f.write(f"\n===== {name}: {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=f, text=True, start_new_session=True)
        try:
            stdout, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, _ = proc.communicate()
            f.write(stdout or "")
            return None, stdout or ""
        f.write(stdout)
    return proc.returncode, stdout


def run_case(name: str, cmd: list[str], timeout: int, log: Path) -> dict:
    t0 = time.perf_counter()
    code, stdout = run_logged(name, cmd, timeout, log)
    row: dict = {"case": name, "process_s": round(time.perf_counter() - t0)}
    if code is None:
        return {**row, "error": f"over {timeout} s"}
    for prefix in ("TRAINER_RESULT ", "METHODS_RESULT "):
        found = [line for line in stdout.splitlines() if line.startswith(prefix)]
        if found:
            row.update(json.loads(found[0].removeprefix(prefix)))
    if code != 0 or len(row) == 2:
        row["error"] = f"exit {code}"
    if "compile" in row:  # graphs and recompiles; the phase times are long
        row["compile"].pop("phase_s", None)
    return row


def probe() -> None:
    """Under torchrun: NCCL all-reduce / all-gather bandwidth between the ranks (256 MiB of bf16)."""
    import torch
    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl")
    n = 128 * 2**20  # bf16 elements: 256 MiB
    x = torch.ones(n, dtype=torch.bfloat16, device="cuda")
    out = torch.empty(n * dist.get_world_size(), dtype=torch.bfloat16, device="cuda")
    res = {}
    for name, op in [
        ("all_reduce", lambda: dist.all_reduce(x)),
        ("all_gather", lambda: dist.all_gather_into_tensor(out, x)),
    ]:
        for _ in range(3):
            op()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(10):
            op()
        torch.cuda.synchronize()
        # bytes each rank holds / time ("algorithm bandwidth"; for 2 ranks NCCL's bus bandwidth too)
        res[name + "_GBps"] = round(10 * 2 * n / (time.perf_counter() - t) / 1e9, 1)
    if rank == 0:
        print("PROBE " + json.dumps(res), flush=True)
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default="/tmp/chattune-scaling")
    ap.add_argument(
        "--logs", default=None, help="folder for cases.log and scaling-results.json (default --out)"
    )
    ap.add_argument(
        "--data", default=str(REPO / "data" / "disc-law-eval-subjective" / "qa_short_answer.json")
    )
    ap.add_argument("--records", type=int, default=2000)
    ap.add_argument("--max-steps", type=int, default=40)
    ap.add_argument(
        "--logging-steps", type=int, default=1, help="1: per-step losses, at the cost of a host sync a step"
    )
    ap.add_argument("--cases", nargs="*", default=None, help="case names to run (default: all)")
    ap.add_argument("--before-src", default=None, help="another checkout's src/ to run as `ddp-before`")
    ap.add_argument("--deadline", type=float, default=520, help="seconds for all cases together")
    a = ap.parse_args()
    if a.probe:
        return probe()
    t0 = time.perf_counter()
    logs = Path(a.logs or a.out)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / "cases.log"
    rows: list[dict] = []
    if a.cases is None or "nccl-probe" in a.cases:
        probe_rows(rows, log)
    for name, cmd, budget in cases(a, a.before_src):
        if a.cases is not None and name not in a.cases:
            continue
        left = a.deadline - (time.perf_counter() - t0)
        if left < budget * 0.6:
            rows.append({"case": name, "skipped": f"{left:.0f} s left of the deadline"})
        else:
            rows.append(run_case(name, cmd, int(min(budget, left)), log))
        print(
            "SCALING_RESULT " + json.dumps({k: v for k, v in rows[-1].items() if k != "log_times"}),
            flush=True,
        )
        (logs / "scaling-results.json").write_text(json.dumps(rows, indent=1, ensure_ascii=False))
    report(rows)


def probe_rows(rows: list[dict], log: Path) -> None:
    code, stdout = run_logged("nccl-probe", [*TWO, str(Path(__file__).resolve()), "--probe"], 90, log)
    found = [line for line in stdout.splitlines() if line.startswith("PROBE ")]
    rows.append({"case": "nccl-probe", **(json.loads(found[0][6:]) if found else {"error": f"exit {code}"})})
    print("SCALING_RESULT " + json.dumps(rows[-1]), flush=True)


def report(rows: list[dict]) -> None:
    base = next((r for r in rows if r["case"] == "1gpu" and "tokens_per_s_after_first_window" in r), None)
    base_losses = dict(base["losses"]) if base else {}
    print(
        f"\n{'case':14} {'steady tok/s':>12} {'x 1 GPU':>8} {'MFU':>6} {'peak GiB':>9} {'run s':>6}  losses vs 1 GPU"
    )
    for r in rows:
        if "tokens_per_s_after_first_window" not in r:
            print(f"{r['case']:14} {json.dumps({k: v for k, v in r.items() if k != 'case'})[:300]}")
            continue
        tps = r["tokens_per_s_after_first_window"]
        same = base and r.get("arch") == base.get("arch")
        speed = f"{tps / base['tokens_per_s_after_first_window']:.3f}" if same else "-"
        diffs = [
            abs(v - base_losses[s]) / abs(base_losses[s]) for s, v in r.get("losses", []) if s in base_losses
        ]
        diff = f"max rel diff {max(diffs):.2e} over {len(diffs)} steps" if diffs else ""
        print(
            f"{r['case']:14} {tps:>12,} {speed:>8} {r.get('mfu_after_first_window', 0):>6.3f} "
            f"{r['peak_mem_gib']:>9.1f} {r.get('run_s', 0):>6}  {diff}"
        )


if __name__ == "__main__":
    main()
