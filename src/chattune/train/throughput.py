"""What a run's speed is: real tokens/s, MFU and peak memory, read without stalling the GPU.

Used by `train` for its log lines and summary; bench/ measures the same quantities on its own.
"""

from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


# Dense bf16 peak of GPUs we know, for MFU; unknown GPUs report no MFU rather than a guess.
PEAK_TFLOPS = {
    "H100": 989.0,
    "H200": 989.0,
    "H20": 148.0,
    "A100": 312.0,
    "L40S": 362.0,
    "A10": 125.0,
    "4090": 165.0,
}


class StepMeter:
    """Loss, gradient norm and throughput of the steps since the last log line, read with one sync.

    The loop queues each step on the GPU without waiting for it: reading a loss after every step
    (as HF-style loops do) makes the host wait for the GPU to drain and then leaves the GPU idle
    while the host prepares the next step (~3 % of a 7B step on an H200, bench/RESULTS.md). The
    device tensors wait here until a log line needs them. Time spent evaluating or checkpointing
    (inside `paused()`) counts neither as training time nor towards tokens/s.

    `marks[n]`: training seconds from the meter's start to the end of step n, for n in `MARK_STEPS`
    (compilation's cost shows there; each costs one sync, twice a run).
    """

    MARK_STEPS = (1, 10)

    def __init__(self) -> None:
        self.pending: list[tuple[torch.Tensor, torch.Tensor, int]] = []
        self.losses: list[float] = []
        self.grad_norm = float("nan")
        self.tokens = self.total_tokens = 0
        self.time = self.total_time = 0.0
        self.t0 = time.time()
        self.steps = 0
        self.marks: dict[int, float] = {}

    def add(self, loss_sum: torch.Tensor, grad_norm: torch.Tensor, n_labels: int, real_tokens: int) -> None:
        self.pending.append((loss_sum, grad_norm, n_labels))
        self.tokens += real_tokens
        self.total_tokens += real_tokens
        self.steps += 1
        if self.steps in self.MARK_STEPS:
            float(grad_norm)  # waits for this step's GPU work
            self.marks[self.steps] = self.total_time + time.time() - self.t0

    def _settle(self) -> None:
        """Wait for the queued steps (the first float() syncs) and bank the time they took."""
        for loss_sum, grad_norm, n_labels in self.pending:
            self.losses.append(float(loss_sum) / n_labels)
            self.grad_norm = float(grad_norm)
        self.pending = []
        now = time.time()
        self.time += now - self.t0
        self.total_time += now - self.t0
        self.t0 = now

    def read(self) -> tuple[float, float, float]:
        """(mean loss, last gradient norm, real tokens/s) of the steps since the last read."""
        self._settle()
        out = (
            sum(self.losses) / max(len(self.losses), 1),
            self.grad_norm,
            self.tokens / max(self.time, 1e-9),
        )
        self.losses, self.tokens, self.time = [], 0, 0.0
        return out

    @contextlib.contextmanager
    def paused(self):
        self._settle()
        try:
            yield
        finally:
            self.t0 = time.time()


def peak_mem_gib(device: str) -> float:
    """Peak GPU memory allocated by torch on CUDA; elsewhere the process's peak resident memory."""
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def matmul_params(model) -> int:
    """Weights that multiply every token (embeddings are a lookup; a tied head counts as the head)."""
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    n = sum(
        p.numel()
        for name, p in model.named_parameters()
        if p.dim() == 2 and "embed_tokens" not in name and "lora_" not in name
    )
    tied = getattr(hf.config, "tie_word_embeddings", False)
    return n + (hf.get_input_embeddings().weight.numel() if tied else 0)


def peak_tflops(device: str) -> float | None:
    if device != "cuda":
        return None
    import torch

    name = torch.cuda.get_device_name()
    for key, value in PEAK_TFLOPS.items():
        if key in name:
            return value
    return None
