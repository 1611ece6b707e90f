"""Sample answers' decoding on the 7B (issue 14): `generate` vs the CUDA-graph decoder.

Loads the random-weight Qwen2.5-7B that `adapter_run.py` writes, adds LoRA r64/alpha16 on every linear
layer (B random too, so the update is not zero), and answers the first 5 legal prompts greedily with up
to 256 new tokens, as a training run's evaluation does, in two ways:
  generate          `infer.generate` (the code before the decoder)
  graph             `infer.generate(cuda_graph=True)`: `decoding.greedy_decode` on a static cache, what
                    `evaluate.predict_samples` now does
(Call 5 of bench/adapter also timed the LoRA merged into a bf16 copy of each weight: 2.1x faster eagerly,
1.5x with the graph, but its rounding changed the first token of 2 of the 5 answers; dropped.)
Each is run twice (the first call warms cuBLAS and allocations); the second is timed. Prints one
DECODE_RESULT json line: seconds, tokens, ms per step, and where each row's ids first differ from
`generate`'s (random weights have many near-ties, so bf16 rounding can flip a token; the CPU tests check
equality exactly).

  python bench/decode_run.py --model /tmp/ct/qwen2.5-7b
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--samples", type=int, default=5)
    args = ap.parse_args()
    sys.path.insert(0, str(REPO / "src"))
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from chattune.evaluate.judge import read_eval_samples
    from chattune.infer.generation import generate_completions
    from chattune.infer.load import Loaded

    tok = AutoTokenizer.from_pretrained(args.model)
    base = AutoModelForCausalLM.from_pretrained(
        args.model, dtype=torch.bfloat16, attn_implementation="sdpa", device_map="cuda"
    )
    torch.manual_seed(0)
    config = LoraConfig(r=64, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)
    model = get_peft_model(base, config).eval()
    for name, p in model.named_parameters():
        if "lora_" in name:  # fp32 LoRA weights, as training keeps them; small so the answers stay finite
            p.data = (p.data * 0.01).float()
    eot = "<|im_end|>"
    loaded = Loaded(model=model, tokenizer=tok, system_prompt=None,
                    end_of_turn_token=eot, name="bench",
                    stop_token_ids=sorted({tok.convert_tokens_to_ids(eot), tok.eos_token_id}))  # fmt: skip
    data = REPO / "data" / "disc-law-eval-subjective" / "qa_short_answer.json"
    convs = [s.messages for s in read_eval_samples(data, limit=args.samples, converter="disc_law")]
    ids = {}
    result: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cases": {}}
    import transformers

    result["transformers"] = transformers.__version__
    for name in ("generate", "graph"):
        for _attempt in range(2):
            torch.cuda.synchronize()
            t = time.perf_counter()
            outs = generate_completions(loaded, convs, max_new_tokens=args.max_new_tokens,
                                        cuda_graph=name == "graph")  # fmt: skip
            torch.cuda.synchronize()
            seconds = time.perf_counter() - t
        tokens = [tok(c.text, add_special_tokens=False)["input_ids"] for c in outs]
        ids[name] = tokens
        steps = max(c.completion_tokens for c in outs)
        result["cases"][name] = {
            "seconds": round(seconds, 2),
            "steps": steps,
            "ms_per_step": round(1000 * seconds / max(steps, 1), 1),
            "completion_tokens": [c.completion_tokens for c in outs],
        }
        print(name, result["cases"][name], flush=True)
    for name in ("graph",):
        diverge = []
        for a, b in zip(ids["generate"], ids[name], strict=True):
            k = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
            diverge.append(k if k is not None else (None if len(a) == len(b) else min(len(a), len(b))))
        result["cases"][name]["first_diff_vs_generate"] = diverge
    result["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    print("DECODE_RESULT " + json.dumps(result, ensure_ascii=False), flush=True)


if __name__ == "__main__":
    main()
