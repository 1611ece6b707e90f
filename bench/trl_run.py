"""The strongest peer a user would pick instead: TRL's `SFTTrainer` on the legal tutorial's job, whole run.

Same random-weight model directory, same records and chat template as `adapter_run.py`'s chattune run,
rendered here with the tokenizer's own template (system prompt + question as the prompt, the answer as
the completion, loss on the completion only), each record cut to 384 tokens (keep start) so both
trainers see the same documents; then TRL at its best single-GPU settings: best-fit-decreasing packing
into 4,096-token rows, padding-free (documents kept apart through `position_ids`), FlexAttention (the
attention transformers offers without the flash-attn package), Liger's RMSNorm/RoPE/SwiGLU kernels,
TRL's own chunked LM head, no gradient checkpointing (the H200 has the memory), LoRA r64/alpha16/
dropout 0 on every linear layer, bf16, 1 pack a step (chattune's legal-fast config), 2 epochs,
the adapter saved at the end with `save_model`. Everything else is TRL's default.

  python bench/trl_run.py --model-dir /tmp/ct/qwen2.5-7b --data /tmp/ct/legal-x4995.json --out /tmp/ct/trl

Prints `TRL_RESULT {json}`: seconds from process start to adapter saved, to the first step, training
time, real tokens (non-padding tokens of the packed rows x epochs), steady tokens/s (steps after the
first 10 x mean real tokens a step, over their time), useful MFU (4 x matmul weights x tokens/s over
989 TFLOP/s, bench.py's formula), peak GiB.
"""

from __future__ import annotations

import time

T0 = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

SYSTEM = "你是一个法律专家，请根据用户的问题给出专业的回答"
H200_BF16_TFLOPS = 989.0


def render(tokenizer, rows: list[dict], max_len: int) -> list[dict]:
    """DISC records -> {input_ids, completion_mask}, the template's own ids, cut to `max_len` (keep start)."""
    out = []
    for r in rows:
        prompt = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": r["input"]}]
        p_ids = tokenizer.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(
            prompt + [{"role": "assistant", "content": r["output"]}], tokenize=True
        )
        p_ids = list(p_ids["input_ids"] if hasattr(p_ids, "keys") else p_ids)
        full = list(full["input_ids"] if hasattr(full, "keys") else full)
        assert full[: len(p_ids)] == p_ids, "the template renders the prompt differently inside the chat"
        mask = [0] * len(p_ids) + [1] * (len(full) - len(p_ids))
        full, mask = full[:max_len], mask[:max_len]
        if sum(mask):
            out.append({"input_ids": full, "completion_mask": mask})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--epochs", type=float, default=2)
    ap.add_argument("--pack", type=int, default=4096)
    ap.add_argument("--max-len", type=int, default=384)
    ap.add_argument("--attn", default="flex_attention")
    ap.add_argument("--max-steps", type=int, default=-1)
    ap.add_argument(
        "--no-liger", action="store_true", help="for a CPU smoke run (Liger needs Triton on a GPU)"
    )
    a = ap.parse_args()

    import torch
    import transformers
    import trl
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    tok = AutoTokenizer.from_pretrained(a.model_dir)
    rows = json.loads(Path(a.data).read_text(encoding="utf-8"))
    docs = render(tok, rows, a.max_len)
    dataset = Dataset.from_list(docs)
    model = AutoModelForCausalLM.from_pretrained(
        a.model_dir, dtype=torch.bfloat16, attn_implementation=a.attn
    )
    t_loaded = time.perf_counter() - T0

    class Clock(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_step_end(self, args, state, control, **kw):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - T0)

    clock = Clock()
    cfg = SFTConfig(
        output_dir=a.out,
        num_train_epochs=a.epochs,
        max_steps=a.max_steps,
        per_device_train_batch_size=1,
        gradient_accumulation_steps=1,
        learning_rate=1e-4,
        bf16=torch.cuda.is_available(),
        use_cpu=not torch.cuda.is_available(),
        packing=True,
        packing_strategy="bfd",
        padding_free=True,
        max_length=a.pack,
        use_liger_kernel=not a.no_liger,
        gradient_checkpointing=False,
        logging_steps=10,
        report_to="none",
        dataloader_num_workers=0,
        seed=0,
    )
    trainer = SFTTrainer(
        model=model,
        args=cfg,
        train_dataset=dataset,
        processing_class=tok,
        peft_config=LoraConfig(
            r=64, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
        ),
        callbacks=[clock],
    )
    packed = trainer.train_dataset
    pack_tokens = [len(x) for x in packed["input_ids"]]
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t_train0 = time.perf_counter() - T0
    trainer.train()
    t_train1 = time.perf_counter() - T0
    trainer.save_model(str(Path(a.out) / "adapter"))
    t_saved = time.perf_counter() - T0

    steps = len(clock.times)
    real_tokens = (
        sum(pack_tokens) * a.epochs if a.max_steps < 0 else sum(pack_tokens) / len(pack_tokens) * steps
    )
    per_step = real_tokens / max(steps, 1)
    warm = min(10, steps - 1)
    steady = per_step * (steps - warm) / (clock.times[-1] - clock.times[warm - 1]) if steps > 1 else None
    base = trainer.model.get_base_model()
    matmul = sum(m.weight.numel() for m in base.modules() if isinstance(m, torch.nn.Linear))
    import peft

    result = {
        "peer": "trl.SFTTrainer",
        "process_to_adapter_s": round(t_saved, 1),
        "model_loaded_s": round(t_loaded, 1),
        "train_start_s": round(t_train0, 1),
        "first_step_s": round(clock.times[0] - t_train0, 1) if steps else None,
        "first_10_steps_s": round(clock.times[min(9, steps - 1)] - t_train0, 1) if steps else None,
        "train_s": round(t_train1 - t_train0, 1),
        "steps": steps,
        "packs": len(pack_tokens),
        "docs": len(docs),
        "real_tokens": int(real_tokens),
        "tokens_per_s_whole_training": round(real_tokens / (t_train1 - t_train0)),
        "tokens_per_s_steady": round(steady) if steady else None,
        "mfu_steady": round(4 * matmul * steady / (H200_BF16_TFLOPS * 1e12), 3) if steady else None,
        "matmul_params": matmul,
        "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1)
        if torch.cuda.is_available()
        else None,
        "final_loss": next((h["loss"] for h in reversed(trainer.state.log_history) if "loss" in h), None),
        "attn": a.attn,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "versions": {
            "trl": trl.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "torch": torch.__version__,
            "python": sys.version.split()[0],
        },
    }
    print("TRL_RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
