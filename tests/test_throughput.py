"""throughput: the trainer's step meter (one sync per log line, evaluation time left out) and MFU inputs."""

from __future__ import annotations

import time

import torch

from chattune.train.throughput import StepMeter, matmul_params


def test_step_meter_reads_queued_steps_once_and_skips_paused_time():
    """The trainer's loop reads losses at log lines only; evaluation time is not training time."""
    meter = StepMeter()
    meter.add(torch.tensor(6.0), torch.tensor(1.5), 3, 100)  # loss sum 6 over 3 labels
    with meter.paused():
        time.sleep(0.3)  # an evaluation
    meter.add(torch.tensor(2.0), torch.tensor(0.5), 2, 50)
    loss, grad_norm, tps = meter.read()
    assert loss == (6.0 / 3 + 2.0 / 2) / 2 and grad_norm == 0.5
    assert meter.total_tokens == 150 and meter.total_time < 0.3 and tps > 150 / 0.3
    meter.add(torch.tensor(1.0), torch.tensor(0.1), 1, 10)
    assert meter.read()[0] == 1.0  # a new window
    assert meter.total_tokens == 160


def test_step_meter_marks_the_first_and_tenth_step_in_training_time():
    """Compilation's cost: training seconds to step 1 and step 10, evaluation pauses left out."""
    meter = StepMeter()
    time.sleep(0.05)
    meter.add(torch.tensor(1.0), torch.tensor(1.0), 1, 10)
    with meter.paused():
        time.sleep(0.3)
    for _ in range(9):
        meter.add(torch.tensor(1.0), torch.tensor(1.0), 1, 10)
    meter.add(torch.tensor(1.0), torch.tensor(1.0), 1, 10)
    assert sorted(meter.marks) == [1, 10]
    assert 0.05 <= meter.marks[1] < 0.25 and meter.marks[1] <= meter.marks[10] < 0.3


def test_matmul_params_counts_a_tied_head_once_and_skips_lora(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    cfg = model.config
    assert cfg.tie_word_embeddings
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    # The tied head is an nn.Linear sharing the embedding's weight: counted once, as the head.
    assert matmul_params(model) == linear
    lora = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert matmul_params(lora) == linear
