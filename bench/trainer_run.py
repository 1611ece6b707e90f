"""The real `chattune train` on a random-weight Qwen2.5 architecture: the product, not a re-implementation.

bench.py times chattune's stages in a loop of its own, next to the tutorial recipe. This script
runs `chattune.train.job.run(cfg)` itself — reading a bundled dataset, rendering it with the real
Qwen2.5 chat template, packing, LoRA, evaluation, saving the adapter — on a model directory
written here from the real config with random bf16 weights (weights do not change speed), and
prints the run's own summary (real tokens/s from `summary.json`, peak memory, wall time).

  PYTHONPATH=src python bench/trainer_run.py --arch qwen2.5-7b --out $OUT \\
      train.packing=true train.pack_tokens=8192 train.epochs=1

Extra arguments are `section.key=value` overrides of the config below (the 7B huanhuan tutorial's
LoRA: r 8, alpha 32, dropout 0.1, q/k/v/o/gate/up/down; eval loss on, no sample generation).

The result also says where the start of the run went (issue 14), measured from outside the trainer so
that any version of it can be timed (`--src` imports another checkout's `src/`, e.g. the code before a
change): seconds from `run()` to the baseline evaluation's log line, to the end of the first optimizer
step (one sync there), to the step-10 log line; every log line's time; and torch's compile counters
(graphs, recompiles, cache hits and misses) and compile-phase times.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO / "src"))
if "--src" in sys.argv:  # another checkout's code, before anything imports chattune
    sys.path.insert(0, str(Path(sys.argv[sys.argv.index("--src") + 1]).resolve()))


def write_random_model(arch: str, target: Path) -> Path:
    """A loadable model directory: the real architecture's config, random bf16 weights, the real tokenizer."""
    import seed_recipe
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

    from chattune.paths import tokenizer_asset_dir

    if (target / "config.json").is_file():
        return target
    tok = AutoTokenizer.from_pretrained(str(tokenizer_asset_dir()))
    cfg = Qwen2Config(
        **seed_recipe.ARCH[arch],
        max_position_embeddings=32768,
        rope_theta=1e6,
        eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tok.pad_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(target)
    del model
    return target


class LineClock:
    """Times at which lines appear in a growing file (the run's metrics.jsonl), polled every 20 ms."""

    def __init__(self, path: Path, t0: float) -> None:
        self.path, self.t0, self.rows = path, t0, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        seen = 0
        while not self._stop.is_set():
            try:
                lines = self.path.read_text(encoding="utf-8").splitlines()
            except (FileNotFoundError, UnicodeDecodeError):
                lines = []
            now = time.perf_counter() - self.t0
            for line in lines[seen:]:
                try:
                    self.rows.append((round(now, 2), json.loads(line)))
                except json.JSONDecodeError:
                    break  # half-written: read again next time
                seen += 1
            time.sleep(0.02)

    def stop(self) -> list:
        self._stop.set()
        self._thread.join()
        return self.rows


def compile_stats() -> dict:
    """torch's own counters of this process: graphs, recompiles, cache hits/misses, phase times."""
    try:
        from torch._dynamo.utils import compilation_time_metrics, counters
    except ImportError:
        return {}
    keep = ("stats", "frames", "recompiles", "graph_break", "inductor", "aot_autograd")
    out: dict = {k: dict(counters[k]) for k in keep if k in counters}
    out["inductor"] = {k: v for k, v in out.get("inductor", {}).items() if "cache" in k or "graph" in k}
    out["phase_s"] = {k: [round(sum(v), 2), len(v)] for k, v in compilation_time_metrics.items()}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="qwen2.5-7b")
    ap.add_argument("--model-dir", default="/tmp/chattune-bench-models")
    ap.add_argument("--data", default=str(REPO / "data" / "huanhuan" / "huanhuan.json"))
    ap.add_argument("--out", default="/tmp/chattune-bench-out")
    ap.add_argument("--name", default=None, help="run name (default: the arch)")
    ap.add_argument(
        "--records",
        type=int,
        default=0,
        help="repeat the data file's records up to this many (a workload's size)",
    )
    ap.add_argument("--src", default=None, help="import chattune from this src/ folder instead")
    ap.add_argument(
        "--no-lora-fusion",
        action="store_true",
        help="LoRA A projections that share an input stay separate matmuls (issue 14 item 2's A/B); "
        "give the run its own compile cache, the pass's cache key does not see this switch",
    )
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()

    from chattune.config.load import config_from_dict, parse_overrides
    from chattune.train.job import run

    if a.no_lora_fusion:
        import chattune.train.compiling

        chattune.train.compiling.fuse_lora_inputs = lambda graph: 0

    t0 = time.perf_counter()
    model_dir = write_random_model(a.arch, Path(a.model_dir) / a.arch)
    t_model = time.perf_counter() - t0
    out = Path(a.out) / (a.name or a.arch)
    shutil.rmtree(out, ignore_errors=True)
    data = a.data
    if a.records:  # e.g. the legal tutorial's 4,995 records from the bundled 241 (speed only: repeats kept)
        rows = json.loads(Path(a.data).read_text(encoding="utf-8"))
        data = str(Path(a.out) / f"{Path(a.data).stem}-x{a.records}.json")
        Path(a.out).mkdir(parents=True, exist_ok=True)
        repeated = [rows[i % len(rows)] for i in range(a.records)]
        Path(data).write_text(json.dumps(repeated, ensure_ascii=False), encoding="utf-8")
    tree: dict = {
        "model": {"name_or_path": str(model_dir)},
        "data": {
            "train_path": data,
            "system_prompt": "现在你要扮演皇帝身边的女人--甄嬛",
            "eval_ratio": 0.02,
            "max_len": 384,
        },
        "lora": {
            "r": 8,
            "alpha": 32,
            "dropout": 0.1,
            "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        },
        "train": {"output_dir": str(out), "epochs": 1, "lr": 1e-4, "logging_steps": 5, "progress": False},
        "eval": {"samples": 0, "loss": True},
        "track": {"backend": "none"},
    }
    for key, value in parse_overrides(a.overrides):
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    cfg = config_from_dict(tree, "trainer_run")
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    import chattune

    t_run = time.perf_counter()
    marks: dict = {}

    def after_step(optimizer, args, kwargs) -> None:
        marks["steps"] = marks.get("steps", 0) + 1
        if marks["steps"] == 1:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            marks["step1"] = time.perf_counter() - t_run

    hook = register_optimizer_step_post_hook(after_step)
    clock = LineClock(out / "metrics.jsonl", t_run)
    try:
        run(cfg)
    finally:
        hook.remove()
        lines = clock.stop()
    t_done = time.perf_counter() - t_run
    summary = json.loads((out / "summary.json").read_text())
    baseline = next((t for t, r in lines if "eval/loss" in r and r.get("step") == 0), None)
    step10 = next((t for t, r in lines if "train/loss" in r and r.get("step") == 10), None)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "train/tokens_per_s" in r]
    steady = train_rows[1:] or train_rows  # the first window holds compilation
    result = {
        "arch": a.arch,
        "chattune_src": str(Path(chattune.__file__).parent),
        "data": Path(a.data).name,
        "records": a.records or None,
        "overrides": a.overrides,
        "model_write_s": round(t_model, 1),
        "wall_s": round(summary["wall_s"], 1),
        "train_s": round(summary["train_s"], 1),
        "train_tokens": summary["train_tokens"],
        "tokens_per_s_whole_run": round(summary["tokens_per_s"]),
        "tokens_per_s_after_first_window": round(
            sum(r["train/tokens_per_s"] for r in steady) / max(len(steady), 1)
        ),
        "mfu_after_first_window": round(sum(r.get("train/mfu", 0) for r in steady) / max(len(steady), 1), 3),
        "peak_mem_gib": summary["peak_mem_gib"],
        "hardware": summary["hardware"],
        "versions": summary["versions"],
        "run_s": round(t_done, 1),
        "start": {  # seconds from run() (issue 14: where the first minute goes)
            "baseline_eval_logged": baseline,
            "step1_done": round(marks["step1"], 2) if "step1" in marks else None,
            "step10_logged": step10,
            "first_step_s": round(marks["step1"] - baseline, 2) if baseline and "step1" in marks else None,
            "first_10_steps_s": round(step10 - baseline, 2) if baseline and step10 else None,
            "trainer_first_step_s": summary.get("first_step_s"),
            "trainer_first_10_steps_s": summary.get("first_10_steps_s"),
        },
        "log_times": [[t, r.get("step"), r.get("train/loss", r.get("eval/loss"))] for t, r in lines],
        "losses": [[r["step"], r["train/loss"]] for r in train_rows],
        "compile": compile_stats(),
        "first_loss": train_rows[0]["train/loss"] if train_rows else None,
        "last_loss": train_rows[-1]["train/loss"] if train_rows else None,
        "eval": [
            {k: v for k, v in e.items() if k.startswith("eval/") or k == "step"}
            for e in summary["evaluations"]
        ],
    }
    print("TRAINER_RESULT " + json.dumps(result), flush=True)
    (Path(a.out) / f"trainer-{a.name or a.arch}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
