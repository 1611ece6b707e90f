"""Issue 28 probe: where does one FP8 base matmul lose accuracy, and what does fixing it cost?

For the Qwen2.5-7B linear shapes at 4,096 tokens (random bf16 weights, std 0.02; activations N(0, 1)
with a few outlier channels, as real residual streams have), the relative error against an fp32 matmul
of: bf16; e4m3 row-wise scales with and without fast accumulation (torch._scaled_mm); and, emulated in
fp32 (quantize, de-quantize, fp32 matmul), row-wise vs 1x128 tile-wise activation scales, to separate
rounding from accumulation; and the real 1x128 tile-scaled `_scaled_mm` (both operands, cuBLAS 12.9+ on
SM90) in each scale layout its second operand might take, to find the one this torch accepts. Also the
ms of each _scaled_mm variant. GPU only; prints JSON lines.
"""

import json
import sys

import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1] / "src"))
from chattune.model.fp8 import quantize_rows  # noqa: E402

E4M3_MAX = 448.0


def quantize_tiles(x, tile=128):
    rows, cols = x.shape
    t = x.float().reshape(rows, cols // tile, tile)
    scale = (t.abs().amax(-1, keepdim=True).clamp(min=1e-12)) / E4M3_MAX
    q = (t / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return (q.float() * scale).reshape(rows, cols)


def tiles_q(x, tile=128):
    """e4m3 (rows, cols) and fp32 scales (rows, cols/128): one scale per 1x128 tile."""
    rows, cols = x.shape
    t = x.float().reshape(rows, cols // tile, tile)
    scale = (t.abs().amax(-1, keepdim=True).clamp(min=1e-12)) / E4M3_MAX
    q = (t / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q.reshape(rows, cols), scale.reshape(rows, cols // tile)


def tile_mm(xq, xs, wq, ws, layout):
    """torch._scaled_mm with 1x128 scales on both operands (cuBLAS 12.9+, SM90), in one of the scale
    layouts the second operand's scales might be wanted in; raises what _scaled_mm raises."""
    b_scale = {
        "nk_outer": lambda s: s.t().contiguous().t(),
        "kn": lambda s: s.t().contiguous(),
        "kn_outer": lambda s: s.t().contiguous().t().t(),
    }[layout](ws)
    return torch._scaled_mm(
        xq,
        wq.t(),
        scale_a=xs.t().contiguous().t(),
        scale_b=b_scale,
        out_dtype=torch.bfloat16,
        use_fast_accum=False,
    )


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
    txq, txs = tiles_q(x)
    twq, tws = tiles_q(w)
    for layout in ("nk_outer", "kn", "kn_outer"):
        try:
            out[f"fp8_tiles_{layout}"] = rel(tile_mm(txq, txs, twq, tws, layout), ref)
            out[f"ms_tiles_{layout}"] = round(ms(lambda a=(txq, txs, twq, tws, layout): tile_mm(*a)), 4)
        except Exception as exc:  # noqa: BLE001 - which layouts this torch build takes is what we ask
            out[f"fp8_tiles_{layout}"] = f"{type(exc).__name__}: {str(exc)[:120]}"
    print(json.dumps(out), flush=True)
