"""FP8 base matmuls for LoRA training (`train.precision: fp8`): the frozen base weights in e4m3.

Part of the model stage: `train.job.check_run` calls `check_fp8_device` before anything is written, and
`train.job.build_model` calls `convert_to_fp8` after LoRA is added and before the decoder layers are
compiled. Every frozen `nn.Linear` inside the decoder layers (peft's `base_layer`s, and frozen linears
LoRA does not wrap) becomes an `Fp8Linear`: its weight quantized ONCE to float8 e4m3 with one scale per
row, in the two layouts Hopper's FP8 tensor cores need (row-major A, column-major B):

    forward      y  = x  @ W^T     x: (tokens, in)   W   (out, in) e4m3, one scale per output row
    input grad   dx = dy @ W       dy: (tokens, out) W^T (in, out) e4m3, one scale per input column

so the bf16 weight is dropped (the two e4m3 copies take the same bytes). Activations and incoming
gradients are quantized per token row on the fly, in plain torch ops that inductor fuses into the
compiled decoder layer. No weight gradient is ever computed and no activation is saved for backward.
LoRA A/B, norms, attention, the embeddings, the LM head and the loss stay in bf16/fp32, so the saved
adapter is an ordinary one (only `lora_` tensors are written).

`kernels="torchao"` swaps in torchao's `Float8Linear` (rowwise recipe) instead, for comparison in
bench/fp8_layer_run.py: it keeps the bf16 weight and re-quantizes it in both layouts on every call, and its
backward computes a weight gradient (eager mode at least); bench/RESULTS.md has both measured.
"""

from __future__ import annotations

from collections.abc import Iterable

from chattune.errors import ConfigError

E4M3_MAX = 448.0  # largest finite float8_e4m3fn
# Hopper's FP8 tensor cores (torch._scaled_mm with row-wise scales): compute capability 9.0 or later.
MIN_CAPABILITY = (9, 0)


def check_fp8_device(device: str) -> None:
    """Refuse `train.precision: fp8` where it cannot run: no CUDA GPU, or one older than Hopper.

    `device`: `train.device` (auto / cpu / cuda). Raises ConfigError naming `train.precision`.
    """
    import torch

    if device == "cpu" or not torch.cuda.is_available():
        raise ConfigError(
            "train.precision", "fp8 needs a CUDA GPU with FP8 tensor cores (Hopper or newer); set it to bf16"
        )
    capability = torch.cuda.get_device_capability()
    if capability < MIN_CAPABILITY:
        name = torch.cuda.get_device_name()
        raise ConfigError(
            "train.precision",
            f"fp8 needs FP8 tensor cores with row-wise scales (compute capability 9.0, Hopper, or newer); "
            f"this {name} is {capability[0]}.{capability[1]}: set it to bf16",
        )


def quantize_rows(x):
    """(..., n) float tensor -> (e4m3 tensor of the same shape, fp32 scales (..., 1)), x ~= q * scale.

    One scale per row (the last dimension's amax over 448); an all-zero row gets a tiny scale, not 0.
    """
    import torch

    amax = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12)
    scale = amax / E4M3_MAX
    q = (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q, scale


def _fp8_matmul(a, b_fp8_t, b_scale_row, out_dtype, fast_accum: bool):
    """a (M, K) float @ b (K, N), b given as its (N, K) e4m3 row-major copy and (1, N) scales."""
    import torch

    a_fp8, a_scale = quantize_rows(a)
    return torch._scaled_mm(
        a_fp8,
        b_fp8_t.t(),  # (K, N), column-major: the layout _scaled_mm wants for its second operand
        scale_a=a_scale,
        scale_b=b_scale_row,
        out_dtype=out_dtype,
        use_fast_accum=fast_accum,
    )


def _function():
    import torch

    class _FrozenFp8Matmul(torch.autograd.Function):
        """y = x @ W^T with W frozen in e4m3; backward gives dx only (from dy and W^T, not x)."""

        @staticmethod
        def forward(ctx, x, w_fp8, w_scale, wt_fp8, wt_scale):
            ctx.save_for_backward(wt_fp8, wt_scale)
            out_dtype = (
                x.dtype if x.dtype in (torch.bfloat16, torch.float16, torch.float32) else torch.bfloat16
            )
            rows = x.reshape(-1, x.shape[-1])
            y = _fp8_matmul(rows, w_fp8, w_scale, out_dtype, fast_accum=True)
            return y.reshape(*x.shape[:-1], y.shape[-1])

        @staticmethod
        def backward(ctx, dy):
            wt_fp8, wt_scale = ctx.saved_tensors
            rows = dy.reshape(-1, dy.shape[-1])
            # Gradients: full-precision accumulation (torchao's rowwise recipe does the same). Keeping this
            # matmul in bf16 instead changed no loss (bench/RESULTS.md, issue 28, call 3).
            dx = _fp8_matmul(rows, wt_fp8, wt_scale, dy.dtype, fast_accum=False)
            return dx.reshape(*dy.shape[:-1], dx.shape[-1]), None, None, None, None

    return _FrozenFp8Matmul


_FN = None


def _frozen_fp8_matmul(*args):
    global _FN
    if _FN is None:
        _FN = _function()
    return _FN.apply(*args)


def _module_class():
    import torch

    class Fp8Linear(torch.nn.Module):
        """A frozen `nn.Linear` whose weight is stored only as e4m3 (two layouts) with per-row scales.

        `weight_fp8` (out, in) is a frozen parameter (so parameter counts and FLOP counts still see the
        weight); `weight_t_fp8` (in, out) and both scales are buffers. `bias` stays in its own dtype.
        """

        def __init__(self, linear: torch.nn.Linear):
            super().__init__()
            w = linear.weight.detach()
            self.in_features, self.out_features = linear.in_features, linear.out_features
            self.weight_dtype = w.dtype  # what the original weight was (the module's output dtype)
            q, s = quantize_rows(w)
            self.weight_fp8 = torch.nn.Parameter(q, requires_grad=False)
            self.register_buffer("weight_scale", s.reshape(1, -1).contiguous())  # (1, out)
            qt, st = quantize_rows(w.t())
            self.register_buffer("weight_t_fp8", qt.contiguous())  # (in, out)
            self.register_buffer("weight_t_scale", st.reshape(1, -1).contiguous())  # (1, in)
            self.bias = linear.bias  # frozen with the rest of the base
            if self.bias is not None:
                self.bias.requires_grad_(False)

        def forward(self, x):
            if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
                x = x.to(self.weight_dtype)
            y = _frozen_fp8_matmul(
                x, self.weight_fp8, self.weight_scale, self.weight_t_fp8, self.weight_t_scale
            )
            if self.bias is not None:
                y = y + self.bias.to(y.dtype)
            return y

        def dequantized_weight(self):
            """The weight as the forward multiplies it, in its original dtype (out, in)."""
            return (self.weight_fp8.float() * self.weight_scale.t()).to(self.weight_dtype)

        def extra_repr(self) -> str:
            return f"in_features={self.in_features}, out_features={self.out_features}, e4m3 per-row scales"

    return Fp8Linear


_CLASS = None


def fp8_linear_class():
    """The `Fp8Linear` module class (built on first use, so importing this module does not import torch)."""
    global _CLASS, _FN
    if _CLASS is None:
        _CLASS = _module_class()
    if _FN is None:  # built here, outside any compiled region: dynamo cannot trace a class being made
        _FN = _function()
    return _CLASS


def _swappable(module) -> bool:
    """A frozen plain `nn.Linear` whose dimensions the FP8 tensor cores take (multiples of 16)."""
    import torch

    return (
        type(module) is torch.nn.Linear
        and not module.weight.requires_grad
        and module.in_features % 16 == 0
        and module.out_features % 16 == 0
    )


def convert_to_fp8(layers: Iterable, kernels: str = "chattune") -> int:
    """Swap every frozen `nn.Linear` inside `layers` (the decoder layers) for its FP8 version, in place.

    `kernels`: "chattune" (`Fp8Linear`, weights quantized once; the default) or "torchao" (torchao's
    `Float8Linear` with the rowwise recipe; needs the torchao package). LoRA's own A/B linears are
    trainable and are never touched. Returns the number of linears swapped; the bf16 weights of the
    swapped ones are freed (chattune kernels). Call before `torch.compile`.
    """
    if kernels not in ("chattune", "torchao"):
        raise ValueError(f"kernels must be 'chattune' or 'torchao', got {kernels!r}")
    if kernels == "torchao":
        from torchao.float8 import Float8LinearConfig
        from torchao.float8.float8_linear import Float8Linear

        config = Float8LinearConfig.from_recipe_name("rowwise")
        make = lambda linear: Float8Linear.from_float(linear, config=config)  # noqa: E731
    else:
        make = fp8_linear_class()
    swapped = 0
    for layer in layers:
        for parent in list(layer.modules()):
            for name, child in list(parent.named_children()):
                if _swappable(child):
                    setattr(parent, name, make(child))
                    swapped += 1
    return swapped
