"""Speed and peak memory of the fine-tuning methods, through the real trainer (`trainer_run.py`).

Each case is one `bench/trainer_run.py` process (a clean CUDA context, so each peak is its own) on a
random-weight model of the real architecture, on the legal tutorial's lengths (the bundled DISC-Law
records, `disc_law` converter, max 384 tokens), for `--max-steps` optimizer steps:

  7b-lora-r64          bf16 LoRA r64/alpha16, 4,096-token packs (the legal-fast config): the reference
  7b-qlora-nf4-r64     the same on an NF4 base (`model.quantization=nf4`; checkpointing on, layers eager)
  7b-qlora-nf4-r64-compiled   the same with `train.compile=on` (bitsandbytes under torch.compile)
  7b-qlora-nf4-r64-padded     the tutorial's batches: 4 x 384-token rows x 4 accumulation, no packing
  7b-qlora-int8-r64    the packed case on an 8-bit base
  7b-dora-r64          DoRA on the bf16 base (cost of the magnitude's weight norms)
  0.5b-lora / 0.5b-full       Qwen2.5-0.5B LoRA r64 vs full fine-tuning (`lora.enabled=false`: fp32
                       master weights, bf16 autocast), 16,384-token packs

  PYTHONUNBUFFERED=1 PYTHONPATH=src python bench/methods_run.py --out $OUT            # every case
  PYTHONPATH=src python bench/methods_run.py --out $OUT --cases 7b-qlora-nf4-r64 0.5b-full --max-steps 20

QLoRA cases need bitsandbytes (`pip install 'chattune[qlora]'`; on the GPU image, carry its wheel);
without it they are reported as skipped. Prints one `METHODS_RESULT {json}` line per case and a table
at the end, and writes `methods-results.json` to `--out`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

LEGAL = [
    "data.converter=disc_law",
    "data.system_prompt=你是一个法律专家，请根据用户的问题给出专业的回答",
    "data.truncation=cut_prompt",
    "eval.loss=false",
]
R64 = ["lora.r=64", "lora.alpha=16", "lora.dropout=0"]
PACKED_7B = ["train.packing=true", "train.pack_tokens=4096", "train.grad_accum_steps=1"]
PACKED_SMALL = ["train.packing=true", "train.pack_tokens=16384", "train.grad_accum_steps=1"]
PADDED = ["train.packing=false", "train.micro_batch_size=4", "train.grad_accum_steps=4"]

CASES: dict[str, tuple[str, list[str]]] = {
    "7b-lora-r64": ("qwen2.5-7b", R64 + PACKED_7B),
    "7b-qlora-nf4-r64": ("qwen2.5-7b", R64 + PACKED_7B + ["model.quantization=nf4"]),
    "7b-qlora-nf4-r64-compiled": (
        "qwen2.5-7b",
        R64 + PACKED_7B + ["model.quantization=nf4", "train.compile='on'"],
    ),
    "7b-qlora-nf4-r64-padded": ("qwen2.5-7b", R64 + PADDED + ["model.quantization=nf4"]),
    "7b-qlora-int8-r64": ("qwen2.5-7b", R64 + PACKED_7B + ["model.quantization=int8"]),
    "7b-dora-r64": ("qwen2.5-7b", R64 + PACKED_7B + ["lora.use_dora=true"]),
    "0.5b-lora": ("qwen2.5-0.5b", R64 + PACKED_SMALL),
    "0.5b-full": ("qwen2.5-0.5b", PACKED_SMALL + ["lora.enabled=false", "train.lr=1e-5"]),
}


def run_case(name: str, a: argparse.Namespace) -> dict:
    arch, overrides = CASES[name]
    quantized = any(o.startswith("model.quantization=") for o in overrides)
    if quantized and importlib.util.find_spec("bitsandbytes") is None:
        return {"case": name, "skipped": "bitsandbytes is not installed"}
    cmd = [
        sys.executable,
        str(HERE / "trainer_run.py"),
        "--arch",
        arch,
        "--name",
        name,
        "--out",
        a.out,
        "--model-dir",
        a.model_dir,
        "--data",
        a.data,
        "--records",
        str(a.records),
        *LEGAL,
        *overrides,
        f"train.max_steps={a.max_steps}",
        f"train.logging_steps={max(1, a.max_steps // 5)}",
    ]
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=a.case_timeout)
    row: dict = {
        "case": name,
        "arch": arch,
        "overrides": overrides,
        "process_s": round(time.perf_counter() - t0),
    }
    found = [line for line in done.stdout.splitlines() if line.startswith("TRAINER_RESULT ")]
    if done.returncode != 0 or not found:
        row["error"] = f"exit {done.returncode}: " + (done.stderr or done.stdout)[-1500:]
        return row
    result = json.loads(found[-1].removeprefix("TRAINER_RESULT "))
    keep = ("tokens_per_s_after_first_window", "tokens_per_s_whole_run", "peak_mem_gib", "train_s", "wall_s")
    row.update({k: result[k] for k in keep})
    row.update(first_loss=result["first_loss"], last_loss=result["last_loss"], hardware=result["hardware"])
    row["versions"] = result["versions"]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    ap.add_argument("--out", default="/tmp/chattune-bench-out")
    ap.add_argument("--model-dir", default="/tmp/chattune-bench-models")
    ap.add_argument(
        "--data", default=str(REPO / "data" / "disc-law-eval-subjective" / "qa_short_answer.json")
    )
    ap.add_argument("--records", type=int, default=4995, help="the legal tutorial's record count")
    ap.add_argument("--max-steps", type=int, default=40, help="optimizer steps per case")
    ap.add_argument("--case-timeout", type=int, default=900, help="seconds before a case is given up")
    a = ap.parse_args()
    Path(a.out).mkdir(parents=True, exist_ok=True)
    rows = []
    for name in a.cases:
        try:
            row = run_case(name, a)
        except subprocess.TimeoutExpired:
            row = {"case": name, "error": f"over {a.case_timeout} s"}
        rows.append(row)
        print("METHODS_RESULT " + json.dumps(row, ensure_ascii=False), flush=True)
        (Path(a.out) / "methods-results.json").write_text(json.dumps(rows, indent=1, ensure_ascii=False))
    print(f"\n{'case':30} {'steady tok/s':>13} {'whole tok/s':>12} {'peak GiB':>9}  loss first -> last")
    for r in rows:
        if "tokens_per_s_after_first_window" in r:
            print(
                f"{r['case']:30} {r['tokens_per_s_after_first_window']:>13,} {r['tokens_per_s_whole_run']:>12,} "
                f"{r['peak_mem_gib']:>9.1f}  {r['first_loss']:.3f} -> {r['last_loss']:.3f}"
            )
        else:
            print(f"{r['case']:30} {r.get('skipped') or r.get('error', '')[:200]}")


if __name__ == "__main__":
    main()
