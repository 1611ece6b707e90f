"""What `job.build_model` decides from the config and the device before it touches a model: compilation,
activation checkpointing and fixed-shape packs. Pure functions of plain values, tested on the CPU.

Each rule's measurement lives in bench/RESULTS.md; the config keys are `train.compile`,
`train.checkpointing` and `train.packing`.
"""

from __future__ import annotations

from collections.abc import Callable

from chattune.config.schema import TrainConfig


def use_compile(tc: TrainConfig, device: str, quantized: bool) -> bool:
    """Compile each decoder layer (regional compilation: one layer's code, reused by every layer).

    `auto` compiles only packed batches on CUDA: padded batches change width every step and would keep
    recompiling (an H100, Qwen2.5-0.5B, one padded epoch of huanhuan: 1.7k tokens/s with compilation,
    against 2.3k for the tutorial's eager recipe). Quantized (bitsandbytes) layers only when asked (`on`).
    """
    return tc.compile == "on" or (tc.compile == "auto" and device == "cuda" and tc.packing and not quantized)


def use_checkpointing(
    tc: TrainConfig, device: str, *, offload: bool, quantized: bool, memory_tight: Callable[[], bool]
) -> bool:
    """Activation checkpointing: `on`, or `auto` on CUDA when memory is short (memory mode, a quantized base,
    or activations that would not fit: `memory_tight()`, asked last because it reads the GPU's free memory).
    Never on the CPU in `auto`."""
    return tc.checkpointing == "on" or (
        tc.checkpointing == "auto" and device == "cuda" and (offload or quantized or memory_tight())
    )


def use_fixed_packs(tc: TrainConfig, *, compiled: bool, varlen: bool, half: bool) -> bool:
    """Packs padded to one shape, so every step replays one static graph (warm from the compile cache the
    next run; issue 14: compilation cost the first ~89 s of a 7B run). Only for compiled packed batches whose
    attention is torch's varlen kernel (`varlen`: the per-document fallback loop breaks the graph), in a
    half-precision dtype (`half`)."""
    return compiled and tc.packing and varlen and half
