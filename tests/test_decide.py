"""`train.decide`: the build's decisions (compile, activation checkpointing, fixed-shape packs) from the config
and the device alone, checked on the CPU without loading a model."""

from __future__ import annotations

import pytest

from chattune.config.schema import TrainConfig
from chattune.train import decide


@pytest.mark.parametrize(
    ("compile_", "device", "packing", "quantized", "want"),
    [
        ("auto", "cuda", True, False, True),  # packed batches on a GPU: compiled
        ("auto", "cuda", False, False, False),  # padded batches change shape every step
        ("auto", "cpu", True, False, False),
        ("auto", "cuda", True, True, False),  # bitsandbytes layers only when asked
        ("on", "cpu", False, True, True),
        ("off", "cuda", True, False, False),
    ],
)
def test_compile_rule(compile_, device, packing, quantized, want):
    tc = TrainConfig(compile=compile_, packing=packing)
    assert decide.use_compile(tc, device, quantized) is want


def test_checkpointing_rule_asks_for_free_memory_only_when_it_decides():
    asked = []

    def tight():
        asked.append(1)
        return True

    auto = TrainConfig(checkpointing="auto")
    assert decide.use_checkpointing(auto, "cpu", offload=False, quantized=False, memory_tight=tight) is False
    assert decide.use_checkpointing(auto, "cuda", offload=True, quantized=False, memory_tight=tight) is True
    assert decide.use_checkpointing(auto, "cuda", offload=False, quantized=True, memory_tight=tight) is True
    assert asked == []  # memory mode and QLoRA decide without reading the GPU
    assert decide.use_checkpointing(auto, "cuda", offload=False, quantized=False, memory_tight=tight) is True
    assert asked == [1]
    assert decide.use_checkpointing(
        TrainConfig(checkpointing="on"), "cpu", offload=False, quantized=False, memory_tight=tight
    )
    assert not decide.use_checkpointing(
        TrainConfig(checkpointing="off"), "cuda", offload=True, quantized=True, memory_tight=tight
    )


@pytest.mark.parametrize(
    ("compiled", "packing", "varlen", "half", "want"),
    [
        (True, True, True, True, True),
        (False, True, True, True, False),
        (True, False, True, True, False),
        (True, True, False, True, False),  # the per-document fallback breaks the graph
        (True, True, True, False, False),  # fp32: no fixed packs
    ],
)
def test_fixed_packs_rule(compiled, packing, varlen, half, want):
    tc = TrainConfig(packing=packing)
    assert decide.use_fixed_packs(tc, compiled=compiled, varlen=varlen, half=half) is want
