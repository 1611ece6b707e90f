"""Issue 28: two compiled Qwen2.5-7B decoder layers with LoRA r64 on every linear, bf16 vs FP8 base matmuls.

Variants (one copy of the same random-weight layers each, compiled as `train.run` compiles them:
`compiling.compile_layers`, static shapes, the LoRA A fusion on; under bf16 autocast):

  bf16           the base linears as today
  fp8            `chattune.model.fp8.convert_to_fp8` (weights quantized once, two e4m3 layouts, per-row scales)
  fp8-torchao    the same swap with torchao's `Float8Linear`, rowwise recipe (weights re-quantized each call)

For each: median milliseconds of forward + backward over `--tokens` tokens (one causal document,
sdpa), peak GiB, and against bf16 the relative error ||a - b|| / ||b|| of the layers' output, the input
gradient and the LoRA A/B gradients (B drawn random so that A's gradient is not zero).

  PYTHONUNBUFFERED=1 PYTHONPATH=src python bench/fp8_layer_run.py --out $OUT
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--variants", default="bf16,fp8,fp8-torchao")
    ap.add_argument("--out", default=".")
    a = ap.parse_args()

    import seed_recipe
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from chattune.config import LoraConfig
    from chattune.model.lora import add_lora

    arch = dict(seed_recipe.ARCH["qwen2.5-7b"], num_hidden_layers=a.layers)
    cfg = Qwen2Config(**arch, max_position_embeddings=32768, rope_theta=1e6)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa")
    model = add_lora(model, LoraConfig(r=64, alpha=16, dropout=0.0, target_modules="all-linear"))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    base = model.get_base_model().model
    layers0, rotary = base.layers, base.rotary_emb
    h0 = torch.randn(1, a.tokens, cfg.hidden_size, device="cuda", dtype=torch.bfloat16)
    pos = torch.arange(a.tokens, device="cuda")[None]
    g_out = torch.randn_like(h0)
    results, ref = [], None
    for variant in a.variants.split(","):
        try:
            ref = run_variant(variant, a, layers0, rotary, h0, pos, g_out, results, ref)
        except Exception as e:  # one failing variant is recorded; the others still run
            results.append({"variant": variant, "error": f"{type(e).__name__}: {str(e)[:2000]}"})
            print("LAYER " + json.dumps(results[-1]), flush=True)
    Path(a.out, "fp8-layer-results.json").write_text(json.dumps(results, indent=1))


def run_variant(variant, a, layers0, rotary, h0, pos, g_out, results, ref):
    import torch

    from chattune.model.fp8 import convert_to_fp8
    from chattune.train.compiling import compile_layers

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    layers = copy.deepcopy(layers0)
    swapped = 0
    if variant != "bf16":
        swapped = convert_to_fp8(layers, kernels="torchao" if variant == "fp8-torchao" else "chattune")
    compile_layers(list(layers), static_shapes=True)

    def step():
        h = h0.detach().requires_grad_(True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            pe = rotary(h, pos)
            x = h
            for layer in layers:
                x = layer(x, position_embeddings=pe, attention_mask=None, position_ids=pos)
                x = x[0] if isinstance(x, tuple) else x
        x.backward(g_out)
        return x, h.grad

    t = time.perf_counter()
    for _ in range(3):
        for p in layers.parameters():
            p.grad = None
        out, dx = step()
    torch.cuda.synchronize()
    warm_s = time.perf_counter() - t
    times = []
    for _ in range(a.iters):
        for p in layers.parameters():
            p.grad = None
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        out, dx = step()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
    times.sort()
    grads = {n: p.grad.float() for n, p in layers.named_parameters() if p.grad is not None}
    res = {
        "variant": variant,
        "swapped_linears": swapped,
        "ms_median": round(times[len(times) // 2], 3),
        "ms_min": round(times[0], 3),
        "warmup_s": round(warm_s, 1),
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "trainable_with_grad": len(grads),
    }
    if ref is None:
        ref = (out.float(), dx.float(), grads)
    else:

        def rel(x, y):
            return round(((x - y).norm() / y.norm()).item(), 5)

        res["rel_err_out"] = rel(out.float(), ref[0])
        res["rel_err_input_grad"] = rel(dx.float(), ref[1])
        common = [n for n in grads if n in ref[2]]
        res["rel_err_lora_A_grad_max"] = max(rel(grads[n], ref[2][n]) for n in common if "lora_A" in n)
        res["rel_err_lora_B_grad_max"] = max(rel(grads[n], ref[2][n]) for n in common if "lora_B" in n)
        res["speedup_vs_bf16"] = round(results[0]["ms_median"] / res["ms_median"], 3)
    results.append(res)
    print("LAYER " + json.dumps(res), flush=True)
    return ref


if __name__ == "__main__":
    main()
