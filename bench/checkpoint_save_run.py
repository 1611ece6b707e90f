"""How long `Checkpointer.save` holds the training loop, and how long the write takes (issue 28 item 3).

A random-weight Qwen2 of the given shape with LoRA r on every linear layer and one AdamW step (so the
Adam moments exist), then `--saves` checkpoints through the real `Checkpointer` (the tokenizer, peft's
save_pretrained, torch.save, the atomic folder). Per save: the seconds `save()` held the caller
(`blocked_s`), and with background writing the seconds until the write was on disk (`written_s`, from
the call); the code before this change writes inside `save()`, so its two numbers are one.
Run the code before a change with `PYTHONPATH=<old src>`; the JSON line says which tree ran.

    PYTHONPATH=src python bench/checkpoint_save_run.py                      # CPU, small shape (~1 min)
    PYTHONPATH=src python bench/checkpoint_save_run.py --device cuda --hidden 3584 --inter 18944 \
        --layers 28 --heads 28 --kv-heads 4 --vocab 152064                   # Qwen2.5-7B's LoRA r64 state
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu")
    p.add_argument("--hidden", type=int, default=896)
    p.add_argument("--inter", type=int, default=4864)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=14)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--r", type=int, default=64)
    p.add_argument("--saves", type=int, default=4)
    a = p.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

    import chattune
    from chattune.config.load import config_from_dict
    from chattune.paths import tokenizer_asset_dir
    from chattune.train.checkpoints import Checkpointer, Progress
    from chattune.train.save import AdapterFacts
    from chattune.train.world import World

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_asset_dir()))  # the real Qwen2.5 tokenizer
    work = Path(tempfile.mkdtemp(prefix="ckpt-bench-"))
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=a.vocab,
        hidden_size=a.hidden,
        intermediate_size=a.inter,
        num_hidden_layers=a.layers,
        num_attention_heads=a.heads,
        num_key_value_heads=a.kv_heads,
        tie_word_embeddings=False,
    )
    model_dir = work / "base"
    with torch.device(a.device):
        base = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    config.save_pretrained(model_dir)  # the adapter names its base; the weights are not needed
    linear = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(base, LoraConfig(r=a.r, lora_alpha=2 * a.r, target_modules=linear))
    for prm in model.parameters():
        if prm.requires_grad:
            prm.data = prm.data.float()  # fp32 LoRA weights, as chattune trains them
    trainable = [prm for prm in model.parameters() if prm.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    for prm in trainable:
        prm.grad = torch.randn_like(prm)
    opt.step(), sched.step()
    n = sum(prm.numel() for prm in trainable)
    cfg = config_from_dict(
        {
            "model": {"name_or_path": str(model_dir)},
            "data": {"train_path": str(work / "unused.jsonl")},
            "train": {"output_dir": str(work / "run")},
        }
    )
    eot = "<|im_end|>"
    facts = AdapterFacts(tokenizer, cfg, model_dir, eot, [tokenizer.convert_tokens_to_ids(eot)])
    world = World(device=a.device)
    ckpt = Checkpointer(work / "run" / "checkpoints", model, opt, sched, world, False, facts, "bench")
    background = hasattr(ckpt, "wait")
    rows = []
    for i in range(1, a.saves + 1):
        t0 = time.perf_counter()
        ckpt.save(i, Progress())
        blocked = time.perf_counter() - t0
        if background:
            ckpt.wait()
        rows.append(
            {"save": i, "blocked_s": round(blocked, 4), "written_s": round(time.perf_counter() - t0, 4)}
        )
        print(json.dumps(rows[-1]), flush=True)
    size = sum(f.stat().st_size for f in (work / "run" / "checkpoints").rglob("*") if f.is_file())
    print(
        json.dumps(
            {
                "chattune": chattune.__file__,
                "background": background,
                "device": torch.cuda.get_device_name() if a.device == "cuda" else "cpu",
                "torch": torch.__version__,
                "trainable_params": n,
                "checkpoint_mb": round(size / 2**20, 1),
                "blocked_s_after_first": [r["blocked_s"] for r in rows[1:]],
                "written_s": [r["written_s"] for r in rows],
            }
        ),
        flush=True,
    )
    sys.exit(0)


if __name__ == "__main__":
    main()
