"""Throughput of the seed tutorial's LoRA recipe on a random-weight model of a real architecture.

COPY of ../shared/bench/seed_recipe.py (the tutorial recipe, the baseline of bench/bench.py). The
recipe itself is unchanged: HF Trainer, DataCollatorForSeq2Seq(padding=True), bs 4 x GA 4,
gradient checkpointing, LoRA r64/alpha16/dropout 0.1 on all linear layers, bf16, sdpa. Edits, all
outside the recipe: main() takes argv and returns its result dict so bench.py can call it in the
same process; a "tiny" arch and a CPU fallback (no cuda sync / memory stats) for the --tiny smoke
run; ruff formatting.

Weights don't change speed, so a model built from the real config (random init, bf16) measures
what the tutorial's recipe costs per token. Usage:
  python seed_recipe.py --arch qwen2.5-7b --variant seed --steps 12
Prints one JSON line with tokens/s, s/step, peak GiB, MFU (useful FLOPs = 4 * matmul params * tokens).
"""

import argparse
import json
import math
import random
import tempfile
import time

import torch
from transformers import (
    AutoModelForCausalLM,
    DataCollatorForSeq2Seq,
    Qwen2Config,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

ARCH = {
    "qwen2.5-0.5b": dict(
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        vocab_size=151936,
        tie_word_embeddings=True,
    ),
    "qwen2.5-1.5b": dict(
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        vocab_size=151936,
        tie_word_embeddings=True,
    ),
    "qwen2.5-7b": dict(
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=152064,
        tie_word_embeddings=False,
    ),
    "qwen2.5-14b": dict(
        hidden_size=5120,
        intermediate_size=13824,
        num_hidden_layers=48,
        num_attention_heads=40,
        num_key_value_heads=8,
        vocab_size=152064,
        tie_word_embeddings=False,
    ),
    # CPU smoke test only (bench.py --tiny): real vocab, toy depth and width.
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=151936,
        tie_word_embeddings=True,
    ),
}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def lengths(n, seed=0, max_len=384):
    """Synthetic (prompt, response) token lengths; overridden by --lengths file of 'p r' lines."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        p = rng.randint(40, 110)
        r = int(rng.lognormvariate(math.log(180), 0.6))
        out.append((p, max(4, r)))
    return out


class Timer(TrainerCallback):
    def __init__(self, warm):
        self.warm, self.t0, self.step_times = warm, None, []

    def on_step_begin(self, args, state, control, **kw):
        _sync()
        self.t = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        _sync()
        self.step_times.append(time.perf_counter() - self.t)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="qwen2.5-7b")
    ap.add_argument("--variant", default="seed")  # seed | nockpt | liger | liger-nockpt
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warm", type=int, default=2)
    ap.add_argument("--bs", type=int, default=4)
    ap.add_argument("--ga", type=int, default=4)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--lengths", default=None)
    a = ap.parse_args(argv)

    cfg = Qwen2Config(**ARCH[a.arch], max_position_embeddings=32768, rope_theta=1e6)
    if "liger" in a.variant:
        from liger_kernel.transformers import apply_liger_kernel_to_qwen2

        apply_liger_kernel_to_qwen2(
            rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=True
        )
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa")
    model.enable_input_require_grads()
    from peft import LoraConfig, TaskType, get_peft_model

    model = get_peft_model(
        model,
        LoraConfig(
            task_type=TaskType.CAUSAL_LM,
            r=a.rank,
            lora_alpha=16,
            lora_dropout=0.1,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        ),
    )
    n_samples = (a.steps + a.warm) * a.bs * a.ga
    if a.lengths:
        pairs = [tuple(map(int, line.split())) for line in open(a.lengths)]
        random.Random(0).shuffle(pairs)
        pairs = (pairs * (n_samples // len(pairs) + 1))[:n_samples]
    else:
        pairs = lengths(n_samples)
    rng = random.Random(1)
    data = []
    for p, r in pairs:
        ids = [rng.randrange(100, 150000) for _ in range(p + r + 1)][:384]
        labels = ([-100] * p + ids[p:])[:384]
        data.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    real_tokens = sum(len(d["input_ids"]) for d in data)

    class Tok:  # DataCollatorForSeq2Seq needs only pad()
        pad_token_id = 151643
        padding_side = "right"

        def pad(self, feats, **kw):
            L = max(len(f["input_ids"]) for f in feats)
            out = {k: [] for k in feats[0]}
            for f in feats:
                n = L - len(f["input_ids"])
                out["input_ids"].append(f["input_ids"] + [self.pad_token_id] * n)
                out["attention_mask"].append(f["attention_mask"] + [0] * n)
            return {k: torch.tensor(v) for k, v in out.items() if k != "labels"}

    ckpt = "nockpt" not in a.variant
    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(),
        per_device_train_batch_size=a.bs,
        gradient_accumulation_steps=a.ga,
        logging_steps=1000,
        max_steps=a.steps + a.warm,
        learning_rate=1e-4,
        gradient_checkpointing=ckpt,
        bf16=DEVICE == "cuda",
        use_cpu=DEVICE == "cpu",
        report_to="none",
        save_strategy="no",
        dataloader_num_workers=0,
        seed=0,
    )
    timer = Timer(a.warm)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=data,
        data_collator=DataCollatorForSeq2Seq(tokenizer=Tok(), padding=True),
        callbacks=[timer],
    )
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - t0
    st = timer.step_times[a.warm :]
    per_step = sorted(st)[len(st) // 2]
    toks_per_step = real_tokens / (a.steps + a.warm)
    # padded tokens actually computed
    matmul_params = sum(
        p.numel()
        for n, p in model.named_parameters()
        if p.dim() == 2 and "embed_tokens" not in n and "lora_" not in n
    )
    if cfg.tie_word_embeddings:
        matmul_params += cfg.vocab_size * cfg.hidden_size
    useful = 4 * matmul_params * toks_per_step
    res = dict(
        arch=a.arch,
        variant=a.variant,
        bs=a.bs,
        ga=a.ga,
        rank=a.rank,
        s_per_step=round(per_step, 3),
        tokens_per_s=round(toks_per_step / per_step),
        peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 1) if DEVICE == "cuda" else None,
        mfu_pct=round(100 * useful / per_step / 989e12, 1),
        matmul_params_b=round(matmul_params / 1e9, 2),
        mean_len=round(real_tokens / len(data), 1),
        total_s=round(total, 1),
        gpu=torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu",
        torch=torch.__version__,
    )
    import peft
    import transformers

    res["transformers"], res["peft"] = transformers.__version__, peft.__version__
    print("RESULT " + json.dumps(res), flush=True)
    return res


if __name__ == "__main__":
    main()
