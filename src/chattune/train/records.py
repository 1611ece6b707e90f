"""The records passed between the stages of `train.job.run`: the data, the plan, the built model, the
opened run directory, the optimizer and what the loop trained. Plain frozen dataclasses, no behaviour
beyond `Plan.windows`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from chattune.track import Tracker
from chattune.train.checkpoints import Checkpointer, ResumeState
from chattune.train.save import AdapterFacts
from chattune.train.throughput import StepMeter

if TYPE_CHECKING:  # types only: importing torch or transformers here would load them for `--help`
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from chattune.data.splits import ReadReport
    from chattune.render.examples import RenderReport


@dataclass(frozen=True)
class Optim:
    """What updates the weights: `params` (the trainable ones) clipped to `max_grad_norm`, then stepped."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    params: list[torch.nn.Parameter]
    max_grad_norm: float


@dataclass(frozen=True)
class LoopResult:
    step: int  # the last optimizer step done
    meter: StepMeter  # this process's training time, tokens and unlogged losses


@dataclass(frozen=True)
class RunDir:
    """The run directory's writers and what a resumed run brought back."""

    facts: AdapterFacts  # what every adapter folder carries besides the weights
    ckpt: Checkpointer
    done: ResumeState  # the checkpoint's step and progress (step 0 for a fresh run)
    history: list[dict]  # evaluations of the whole run, resumed or not; the loop appends to it
    tracker: Tracker  # rank 0's; one that records nothing on other ranks
    data_info: dict  # the data's files, hashes and reports, for summary.json (rank 0)


@dataclass(frozen=True)
class TrainingData:
    """The run's data: read, validated, split and rendered with the model's own template."""

    model_dir: Path
    tokenizer: PreTrainedTokenizerBase
    train_ex: list[dict]  # {input_ids, labels}, labels -100 outside what is trained
    eval_ex: list[dict]  # at most eval.max_eval_examples
    samples: list[dict]  # prompts whose answers are generated at each evaluation
    read_report: ReadReport  # data.ReadReport of the training file (and its held-out split)
    eval_read: ReadReport | None  # data.ReadReport of data.eval_path, or None
    train_report: RenderReport  # render.RenderReport: truncated, dropped
    eval_report: RenderReport
    # (BenchmarkConfig, Benchmark) of each eval.benchmarks entry, read before the run directory exists
    benchmarks: list = field(default_factory=list)


@dataclass(frozen=True)
class Plan:
    """Micro-batches per epoch, optimizer steps, and where a resumed run continues."""

    lengths: list[int]  # tokens of each training example
    batching: dict  # packing, budget_tokens, micro_batch_size, seed: `packing.build_batches`'s
    grad_accum_steps: int  # micro-batches per optimizer step
    steps_per_epoch: int
    total_steps: int
    n_epochs: int
    fingerprint: str  # of the training examples, that a checkpoint must match ("" without checkpoints)
    resume_point: tuple[Path, dict] | None  # (folder, state) of the checkpoint to continue

    def windows(self, epoch: int) -> list[list[list[int]]]:
        """The epoch's optimizer steps, each a list of micro-batches of example indices."""
        from chattune.render.packing import build_batches as plan_batches

        batches = plan_batches(self.lengths, epoch=epoch, **self.batching)
        n = self.grad_accum_steps
        return [batches[i : i + n] for i in range(0, len(batches), n)]


@dataclass(frozen=True)
class ModelSetup:
    """The model being trained and the decisions taken for it."""

    model: PreTrainedModel  # the peft model (LoRA), or the transformers model (full fine-tuning)
    attn: str  # attention implementation
    offload: bool  # memory mode, on a GPU
    use_ckpt: bool  # activation checkpointing
    use_compile: bool  # compiled decoder layers
    fixed_packs: bool  # packs padded to one shape: one static graph
    half: bool  # compute in `compute_dtype` under autocast
    compute_dtype: torch.dtype
    initial_lora: dict | None  # PiSSA/OLoRA: to save a plain LoRA at the end
    n_trainable: int
    n_total: int
    n_matmul: int  # parameters in matmuls: 2 FLOPs per token each, forward
    loss_of: Callable  # (model, batch) -> the micro-batch's summed loss
