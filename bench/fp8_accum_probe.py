"""Issue 28 probe: where does one FP8 base matmul lose accuracy, and what does fixing it cost?

For the Qwen2.5-7B linear shapes at 4,096 tokens (random bf16 weights, std 0.02; activations N(0, 1)
with a few outlier channels, as real residual streams have), the relative error against an fp32 matmul
of: bf16; e4m3 row-wise scales with and without fast accumulation (torch._scaled_mm); and, emulated in
fp32 (quantize, de-quantize, fp32 matmul), row-wise vs 1x128 tile-wise activation scales, to separate
rounding from accumulation. Also the ms of each _scaled_mm variant. GPU only; prints JSON lines.
"""

import json
import sys

import torch

sys.path.insert(0, ".fp8/src")
from chattune.model.fp8 import quantize_rows  # noqa: E402

E4M3_MAX = 448.0


def quantize_tiles(x, tile=128):
    rows, cols = x.shape
    t = x.float().reshape(rows, cols // tile, tile)
    scale = (t.abs().amax(-1, keepdim=True).clamp(min=1e-12)) / E4M3_MAX
    q = (t / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return (q.float() * scale).reshape(rows, cols)


def rel(y, ref):
    return ((y.float() - ref).norm() / ref.norm()).item()


def ms(fn, n=20):
    for _ in range(3):
        fn()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(n):
        fn()
    e.record()
    torch.cuda.synchronize()
    return s.elapsed_time(e) / n


torch.manual_seed(0)
T = 4096
shapes = {
    "q": (3584, 3584),
    "kv": (512, 3584),
    "o": (3584, 3584),
    "gate_up": (18944, 3584),
    "down": (3584, 18944),
}
print(json.dumps({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}))
for name, (n_out, k) in shapes.items():
    x = torch.randn(T, k, device="cuda")
    x[:, torch.randperm(k)[:8]] *= 30.0  # outlier channels
    x = x.bfloat16()
    w = (torch.randn(n_out, k, device="cuda") * 0.02).bfloat16()
    ref = x.float() @ w.float().t()
    out = {"shape": name, "M": T, "N": n_out, "K": k, "bf16": rel(x @ w.t(), ref)}
    wq, ws = quantize_rows(w)
    wdq = wq.float() * ws
    xq, xs = quantize_rows(x)
    for fast in (True, False):

        def f(xq=xq, wq=wq, xs=xs, ws=ws, fast=fast):
            return torch._scaled_mm(
                xq,
                wq.t(),
                scale_a=xs,
                scale_b=ws.reshape(1, -1),
                out_dtype=torch.bfloat16,
                use_fast_accum=fast,
            )

        out[f"fp8_rows_fast{int(fast)}"] = rel(f(), ref)
        out[f"ms_fast{int(fast)}"] = round(ms(f), 4)
    out["ms_bf16"] = round(ms(lambda x=x, w=w: x @ w.t()), 4)
    out["emul_w_only"] = rel(x.float() @ wdq.t(), ref)
    out["emul_rows"] = rel((xq.float() * xs) @ wdq.t(), ref)
    out["emul_tiles128"] = rel(quantize_tiles(x) @ wdq.t(), ref)
    print(json.dumps(out), flush=True)
