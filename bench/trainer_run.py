"""The real `chattune train` on a random-weight Qwen2.5 architecture: the product, not a re-implementation.

bench.py times chattune's stages in a loop of its own, next to the tutorial recipe. This script
runs `chattune.train.run(cfg)` itself — reading a bundled dataset, rendering it with the real
Qwen2.5 chat template, packing, LoRA, evaluation, saving the adapter — on a model directory
written here from the real config with random bf16 weights (weights do not change speed), and
prints the run's own summary (real tokens/s from `summary.json`, peak memory, wall time).

  PYTHONPATH=src python bench/trainer_run.py --arch qwen2.5-7b --out $OUT \\
      train.packing=true train.pack_tokens=8192 train.epochs=1

Extra arguments are `section.key=value` overrides of the config below (the 7B huanhuan tutorial's
LoRA: r 8, alpha 32, dropout 0.1, q/k/v/o/gate/up/down; eval loss on, no sample generation).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO / "src"))


def write_random_model(arch: str, target: Path) -> Path:
    """A loadable model directory: the real architecture's config, random bf16 weights, the real tokenizer."""
    import seed_recipe
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

    from chattune.models import tokenizer_asset_dir

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
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()

    from chattune.config import config_from_dict, parse_overrides
    from chattune.train import run

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
    run(cfg)
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "train/tokens_per_s" in r]
    steady = train_rows[1:] or train_rows  # the first window holds compilation
    result = {
        "arch": a.arch,
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
