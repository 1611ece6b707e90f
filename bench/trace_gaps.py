"""Where the GPU waited, and on what host work: reads a gzipped chrome trace from `bench.py --trace-dir`.

For each of the largest idle spans between GPU kernels it finds the kernel that ended the span,
the host call that launched it (matched by the profiler's correlation id) and the CPU ops open
on that thread at launch time. A kernel that starts within a few microseconds of its launch was
waiting for the host (host-bound); a larger lag means it was queued behind something else. It
also lists every blocking host call (synchronisations, blocking copies) of the profiled steps.

  python bench/trace_gaps.py trace-qwen2.5-7b-4096.json.gz [--top 15]
"""

from __future__ import annotations

import argparse
import bisect
import gzip
import json
from collections import defaultdict

GPU_CATS = {"kernel", "gpu_memcpy", "gpu_memset"}
# Host calls that wait for the GPU (or for the driver to page-lock memory).
BLOCKING_NAMES = {"cudaMemcpy", "cudaFree", "cudaHostAlloc", "cudaMallocHost", "cuMemcpyDtoH_v2"}


def load(path: str) -> list[dict]:
    with gzip.open(path, "rt") if path.endswith(".gz") else open(path) as f:
        data = json.load(f)
    return [e for e in data["traceEvents"] if e.get("ph") == "X"]


def open_ops(ops_by_tid: dict, tid, t: float) -> list[str]:
    """Names of the CPU ops on thread `tid` whose span holds time t, outermost first."""
    starts, ops = ops_by_tid[tid]
    i = bisect.bisect_right(starts, t)
    return [e["name"] for e in ops[:i] if e["ts"] + e["dur"] >= t][-6:]


def report(events: list[dict], top: int) -> str:
    gpu = sorted((e for e in events if e.get("cat") in GPU_CATS), key=lambda e: e["ts"])
    runtime = [e for e in events if e.get("cat") in ("cuda_runtime", "cuda_driver")]
    by_corr = {e["args"]["correlation"]: e for e in runtime if "correlation" in e.get("args", {})}
    ops_by_tid: dict = defaultdict(list)
    for e in events:
        if e.get("cat") in ("cpu_op", "python_function", "user_annotation"):
            ops_by_tid[e["tid"]].append(e)
    for tid, ops in ops_by_tid.items():
        ops.sort(key=lambda e: e["ts"])
        ops_by_tid[tid] = ([e["ts"] for e in ops], ops)
    if not gpu:
        return "no GPU events in this trace"

    t0, end, busy, gaps = gpu[0]["ts"], gpu[0]["ts"], 0.0, []
    for e in gpu:
        s, f = e["ts"], e["ts"] + e["dur"]
        if s > end:
            gaps.append((s - end, end, e))
        busy += max(0.0, f - max(s, end))
        end = max(end, f)
    lines = [
        f"span {(end - t0) / 1e3:.1f} ms, GPU busy {busy / 1e3:.1f} ms, idle {(end - t0 - busy) / 1e3:.1f} ms "
        f"in {len(gaps)} gaps ({sum(1 for g in gaps if g[0] > 50)} over 50 us)"
    ]
    host_bound = sum(
        g
        for g, _, e in gaps
        if (r := by_corr.get(e.get("args", {}).get("correlation"))) and e["ts"] - r["ts"] - r["dur"] < 30
    )
    lines.append(
        f"idle that ends when the host launches the next kernel (host-bound): {host_bound / 1e3:.1f} ms"
    )
    for g, at, e in sorted(gaps, key=lambda x: -x[0])[:top]:
        r = by_corr.get(e.get("args", {}).get("correlation"))
        lag = f"launched {e['ts'] - r['ts']:.0f} us before it ran" if r else "launch not found"
        stack = " > ".join(open_ops(ops_by_tid, r["tid"], r["ts"])) if r else ""
        lines.append(f"{g / 1e3:6.2f} ms at {(at - t0) / 1e3:7.1f} ms before {e['name'][:60]!r} ({lag})")
        if stack:
            lines.append(f"         host: {stack[:230]}")
    blocking = [e for e in runtime if "Synchronize" in e["name"] or e["name"] in BLOCKING_NAMES]
    lines.append(f"blocking host calls: {len(blocking)}")
    for e in blocking[:20]:
        stack = " > ".join(open_ops(ops_by_tid, e["tid"], e["ts"]))
        lines.append(f"  {e['name']} {e['dur']:.0f} us at {(e['ts'] - t0) / 1e3:.1f} ms: {stack[:200]}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("trace")
    ap.add_argument("--top", type=int, default=15)
    a = ap.parse_args()
    print(report(load(a.trace), a.top))


if __name__ == "__main__":
    main()
