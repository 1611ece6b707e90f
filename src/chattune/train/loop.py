"""The optimizer loop of `train.run`: epochs of steps, each step one window of micro-batches.

`train.run` builds everything (data, plan, model, strategy, optimizer, run directory) and hands it here.
`train` runs the steps and logs, evaluates and checkpoints between them; `train_step` is one optimizer
step through the strategy (`strategies`), the same code for one process, replicas and shards.
"""

from __future__ import annotations

import contextlib
import gc
import math
import shlex
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from chattune.config.schema import EvalConfig, TrainConfig
from chattune.console import say, say_once
from chattune.errors import ChattuneError
from chattune.evaluate.benchmarks import benchmarks_due, score_benchmarks
from chattune.evaluate.judge import eval_loss, predict_samples, score_predictions
from chattune.track import Tracker
from chattune.train.checkpoints import Checkpointer, Progress
from chattune.train.compiling import eager, mark_doc_count_dynamic
from chattune.train.records import LoopResult, Optim
from chattune.train.strategies import Strategy
from chattune.train.throughput import StepMeter, peak_mem_gib, peak_tflops
from chattune.train.world import World, share_window

if TYPE_CHECKING:
    import torch

    from chattune.infer.load import Loaded
    from chattune.train.records import Plan, RunDir


@dataclass(frozen=True)
class Batches:
    """The plan's micro-batches (lists of example indices) made into tensors on the host, then the device.

    `pack_shape`: with fixed packs (`fixed_packs`), every pack padded to one shape (pad_to, pad_id,
    max_doc_tokens: see `compiling`); {} otherwise.
    """

    examples: list[dict]
    packing: bool
    pad_id: int | None
    device: str
    fixed_packs: bool
    pack_shape: dict

    def collate(self, idx: list[int]) -> tuple[dict, int, int]:
        """A micro-batch on the host, with its target and real-token counts (known without a GPU sync)."""
        from chattune.model.loss import add_target_index
        from chattune.render.packing import collate_packed, collate_padded

        chunk = [self.examples[i] for i in idx]
        multiple = 8 if self.device == "cuda" else 1  # whole tensor-core tiles
        if self.packing:
            batch = collate_packed(chunk, **self.pack_shape)
        else:
            batch = collate_padded(chunk, self.pad_id, multiple)
        batch = add_target_index(batch)  # on the host: the loss then needs no GPU sync
        n_targets = int(batch["target_index"].numel())
        n_real = sum(len(e["input_ids"]) for e in chunk)
        return batch, n_targets, n_real

    def to_device(self, batch: dict) -> dict:
        # Pinned: a copy from pageable memory would first wait for the GPU to drain its queue.
        pin = self.device == "cuda"
        on_device = {
            k: (v.pin_memory() if pin else v).to(self.device, non_blocking=True) if hasattr(v, "to") else v
            for k, v in batch.items()
        }
        if self.fixed_packs:
            mark_doc_count_dynamic(on_device)
        return on_device


def forward_context(model, half: bool, compute_dtype) -> contextlib.AbstractContextManager:
    """Half-precision base weights with fp32 LoRA weights (peft's default): autocast runs the LoRA matmuls
    in `compute_dtype` too, and peft's own input casting (an extra copy per LoRA layer) is turned off."""
    if not half:
        return contextlib.nullcontext()
    import torch
    from peft.helpers import disable_input_dtype_casting

    stack = contextlib.ExitStack()
    stack.enter_context(torch.autocast("cuda", dtype=compute_dtype))
    stack.enter_context(disable_input_dtype_casting(model))
    return stack


@dataclass(frozen=True)
class StepResult:
    """One optimizer step's numbers: device tensors (read at the next log line) and host counts."""

    loss_sum: torch.Tensor  # 0-d, the step's summed loss over every rank's micro-batches
    grad_norm: torch.Tensor  # 0-d, before clipping, the whole model's
    n_labels: int  # labeled tokens of the whole step (at least 1)
    real_tokens: int  # tokens that are not padding


def train_step(
    window: list[list[int]], batches: Batches, strategy: Strategy, world: World, optim: Optim, forward_ctx
) -> StepResult:
    """One optimizer step over `window` (the step's micro-batches, as example indices); `forward_ctx()`:
    the context each forward runs in (`forward_context`).

    Every rank collates the whole step on the host, so each knows the step's counts without a
    collective (a host sync per step), then runs its share of it. The loss is normalised by the
    labeled tokens of the whole accumulated batch, so it is the per-token mean however the tokens were
    split into micro-batches, packs or processes.
    """
    import torch

    staged = [batches.collate(idx) for idx in window]
    n_labels = max(1, sum(n for _, n, _ in staged))
    real_tokens = sum(n for _, _, n in staged)  # padding is work the GPU did for nothing
    mine = share_window(staged, world)
    # Gradients cross ranks inside the backward of each rank's last pass (DDP's buckets, FSDP's
    # reduce-scatter), so every rank runs as many passes as the busiest one: a rank short of a
    # micro-batch runs a blank one that takes part and adds nothing.
    passes = math.ceil(len(window) / world.size)
    loss_total = torch.zeros((), device=batches.device)  # summed on the device, read at the next log line
    for i in range(passes):
        blank = i >= len(mine)
        b = batches.to_device((mine[i] if not blank else staged[0])[0])
        with strategy.micro_batch(last=i == passes - 1):
            with forward_ctx():
                loss_sum = strategy.loss(b)
            ((loss_sum * 0.0) if blank else (loss_sum / n_labels)).backward()
        if not blank:
            loss_total += loss_sum.detach()
    strategy.reduce_loss_(loss_total)
    grad_norm = strategy.clip_grad_norm(optim.params, optim.max_grad_norm)
    optim.optimizer.step()
    optim.scheduler.step()
    optim.optimizer.zero_grad(set_to_none=True)
    return StepResult(loss_total, grad_norm, n_labels, real_tokens)


@dataclass(frozen=True)
class Evaluation:
    """Evaluation before training, every `train.eval_steps` and after every epoch: eval loss, sample
    predictions and their metrics, logged to the tracker and appended to `history`.

    Replicas: rank 0 evaluates alone while the others wait in their next collective. Shards: every rank
    runs the same forwards (each one gathers the weights), and only rank 0's tracker records.
    """

    cfg: EvalConfig
    model: torch.nn.Module
    loaded: Loaded  # the model as `predict_samples` uses it
    eval_ex: list[dict]
    samples: list[dict]
    pad_id: int | None
    metric_names: list[str]
    tracker: Tracker
    history: list[dict]  # evaluations of the whole run, resumed or not; appended to
    takes_part: bool  # rank 0, or every rank of sharded weights
    device: str
    compiled: bool
    benchmarks: list = ()  # (BenchmarkConfig, Benchmark): before training, at the end, per epoch if asked
    total_steps: int = 0  # the run's last step: its epoch-end evaluation scores every benchmark

    def __call__(self, step: int, epoch: float, tag: str) -> None:
        import torch

        from chattune.train.offload import embeddings_on_device

        if not self.takes_part:
            return
        due = benchmarks_due(self.benchmarks, tag, step, self.total_steps)
        if not ((self.cfg.loss and self.eval_ex) or self.samples or due):  # nothing to evaluate now
            return
        # Forked generators: whatever evaluation draws, training draws the same dropout masks with or
        # without it, so a resumed run (which skips the evaluation of its checkpoint's step) stays exact.
        # Eager: evaluation's shapes change every batch, and compiling them cost more than it saved.
        d = self.device
        rng = torch.random.fork_rng(devices=[torch.cuda.current_device()] if d == "cuda" else [])
        with rng, embeddings_on_device(self.model), eager() if self.compiled else contextlib.nullcontext():
            self._evaluate(step, epoch, tag, due)

    def _evaluate(self, step: int, epoch: float, tag: str, due: list) -> None:
        row: dict = {"epoch": epoch, "tag": tag}
        if self.cfg.loss and self.eval_ex:
            row["eval/loss"] = eval_loss(self.model, self.eval_ex, self.pad_id, self.cfg.batch_size)
        if self.samples:
            preds = predict_samples(
                self.loaded,
                self.samples,
                max_new_tokens=self.cfg.max_new_tokens,
                batch_size=self.cfg.batch_size,
            )
            self.tracker.log_predictions([{**r, "epoch": epoch} for r in preds], step=step, tag=tag)
            row.update({f"eval/{k}": v for k, v in score_predictions(preds, self.metric_names).items()})
            for r in preds[:2]:
                say_once(f"  [{tag}] Q: {r['prompt'][:60]!r}\n  [{tag}] A: {r['prediction'][:80]!r}")
        if due:
            row.update(score_benchmarks(self.loaded, due, batch_size=self.cfg.batch_size))
        self.tracker.log(row, step=step)
        self.history.append({"step": step, **row})
        say_once(format_eval_line(tag, step, epoch, row))


def format_eval_line(tag: str, step: int, epoch: float, row: dict) -> str:
    """An evaluation as a two-row table under its name, e.g.

    eval [step 4] step 4 (epoch 0.03)
      loss    bleu4  rougeL
      2.7001  12.50  30.12
    """
    cells = [
        (k.removeprefix("eval/"), f"{v:.4f}") for k, v in row.items() if k.startswith(("eval/", "bench/"))
    ]
    widths = [max(len(k), len(v)) for k, v in cells]
    names = "  ".join(k.ljust(w) for (k, _), w in zip(cells, widths, strict=True))
    values = "  ".join(v.ljust(w) for (_, v), w in zip(cells, widths, strict=True))
    return f"eval [{tag}] step {step} (epoch {epoch:.2f})\n  {names.rstrip()}\n  {values.rstrip()}"


def run_steps(
    tc: TrainConfig,
    plan: Plan,
    take_step,
    opened: RunDir,
    evaluate: Evaluation,
    optim: Optim,
    *,
    model,
    world: World,
    n_matmul: int,
    t_start: float,
) -> LoopResult:
    """Steps `done.step + 1 .. plan.total_steps`: `take_step(window) -> StepResult` each, with a log line every
    `train.logging_steps`, evaluation and checkpoints at their steps, evaluation after every epoch.
    `opened.done`: where a resumed run starts (step 0 otherwise); `opened.history`: the evaluations so far.

    Raises ChattuneError when a step's loss or gradient norm is NaN or inf (before anything is logged,
    saved or evaluated after it).
    """
    device = world.device
    import torch
    from tqdm.auto import tqdm

    tracker, ckpt, done, history = opened.tracker, opened.ckpt, opened.done, opened.history
    peak = peak_tflops(device)
    bar = tqdm(
        total=plan.total_steps,
        initial=done.step,
        disable=not (tc.progress and world.is_main),
        desc="train",
        dynamic_ncols=True,
    )
    step = done.step
    meter = StepMeter()
    meter.losses = list(done.progress.unlogged_losses)  # a log line across the checkpoint averages them all
    # (step, loss, grad norm) on the device, checked for NaN/inf where the host syncs anyway
    unchecked: list[tuple] = []
    # Nothing built so far (model, tokenizer, data) becomes garbage during training: frozen, it is left out
    # of the collector's passes, which otherwise stall the host that feeds the GPU (torchtitan does the same).
    gc.collect()
    gc.freeze()
    model.train()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    # Ctrl-C / SIGTERM: stop at a step boundary with a checkpoint (one process: ranks would disagree).
    # Leaving (at the end, stopped or failed): the checkpoint being written is waited for.
    with ckpt.writer.writing(), stop_requests(world.size == 1) as asked:
        for epoch in range(plan.n_epochs):
            windows = plan.windows(epoch)
            stepped, windows_done = False, 0
            for w, window in enumerate(windows):
                if epoch * plan.steps_per_epoch + w < done.step:
                    continue  # resumed: these steps were done before the checkpoint
                if step >= plan.total_steps:
                    break
                out = take_step(window)
                step += 1
                stepped, windows_done = True, w + 1
                meter.add(
                    out.loss_sum, out.grad_norm, out.n_labels, out.real_tokens
                )  # no sync: stays on the device
                unchecked.append((step, out.loss_sum / out.n_labels, out.grad_norm))
                bar.update(1)
                log_now = step % tc.logging_steps == 0 or step == plan.total_steps
                save_now = tc.save_steps and step % tc.save_steps == 0 and step < plan.total_steps
                eval_now = tc.eval_steps and step % tc.eval_steps == 0 and step < plan.total_steps
                stopping = bool(asked) and step < plan.total_steps  # the last step writes the adapter anyway
                if (
                    log_now or save_now or eval_now or stopping
                ):  # nothing diverged is logged, saved or evaluated
                    stop_if_nonfinite(unchecked, tc.lr, ckpt)
                if log_now:
                    loss_mean, grad_norm, tps = meter.read()  # the one host sync of these steps
                    row = {
                        "train/loss": loss_mean,
                        "train/lr": optim.scheduler.get_last_lr()[0],
                        "train/grad_norm": grad_norm,
                        "train/epoch": epoch + (w + 1) / len(windows),
                        "train/tokens_per_s": tps,
                    }
                    row["train/peak_mem_gib"] = peak_mem_gib(device)
                    if peak:  # forward 2N + input-gradient 2N FLOPs a token; frozen weights get no grad
                        row["train/mfu"] = 4 * n_matmul * tps / (peak * 1e12 * world.size)
                    tracker.log(row, step=step)
                    bar.set_postfix(
                        loss=f"{row['train/loss']:.4f}", lr=f"{row['train/lr']:.2e}", tok_s=f"{tps:,.0f}"
                    )
                if eval_now:  # before the checkpoint of the same step, so that it holds this evaluation too
                    with meter.paused():
                        evaluate(step, epoch + (w + 1) / len(windows), f"step {step}")
                if save_now or stopping:
                    with meter.paused():
                        ckpt.save(step, progress_so_far(done.progress, meter, t_start, history))
                if stopping:
                    bar.close()
                    ckpt.wait()  # the message says it is saved
                    raise Interrupted(asked[0], step, plan.total_steps, ckpt.ckpt_dir)
            stop_if_nonfinite(unchecked, tc.lr, ckpt)
            if stepped:
                # An epoch cut short (train.max_steps) is named by its step, never as a whole epoch.
                whole = windows_done == len(windows)
                with meter.paused():
                    evaluate(
                        step,
                        epoch + windows_done / len(windows),
                        f"epoch {epoch + 1}" if whole else f"step {step}",
                    )
            if step >= plan.total_steps:
                break
    bar.close()
    gc.unfreeze()
    return LoopResult(step, meter)


class Interrupted(ChattuneError):
    """Ctrl-C or SIGTERM stopped training at a step boundary, after a checkpoint of that step was saved.

    The message names the signal, the step, the checkpoint and the exact command that continues the run.
    """

    exit_code = 130  # the shell's code for a run stopped by Ctrl-C

    def __init__(self, signal_name: str, step: int, total_steps: int, ckpt_dir: Path):
        saved = ckpt_dir / f"step-{step:07d}"
        super().__init__(
            f"{signal_name}: stopped after step {step} of {total_steps}; saved checkpoint {saved} "
            f"(adapter and optimizer state). Continue with: {resume_command(ckpt_dir.parent)}"
        )


def resume_command(output_dir: Path) -> str:
    """The command that continues this run: the `chattune train ...` typed, plus --resume; for a run
    started otherwise (demo, the Python API), training again from the config.yaml the run directory holds."""
    argv = sys.argv[1:]
    if argv[:1] == ["train"] and "--gpus" not in argv:
        return shlex.join(["chattune", *argv, *([] if "--resume" in argv else ["--resume"])])
    return shlex.join(
        ["chattune", "train", str(output_dir / "config.yaml"), f"train.output_dir={output_dir}", "--resume"]
    )


@contextlib.contextmanager
def stop_requests(enabled: bool):
    """Yield a list that Ctrl-C or SIGTERM fill with the signal's name; the loop stops at the next step
    boundary. A second Ctrl-C stops at once (KeyboardInterrupt, no checkpoint). Off: the defaults stay."""
    asked: list[str] = []
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield asked
        return

    def on_signal(signum, frame) -> None:
        if asked:
            raise KeyboardInterrupt
        asked.append(signal.Signals(signum).name)
        say(f"\n{asked[0]}: stopping after this step, saving a checkpoint (Ctrl-C again: stop now, unsaved)")

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield asked
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def stop_if_nonfinite(unchecked: list[tuple], lr: float, ckpt: Checkpointer) -> None:
    """Stop the run, before anything more is written, when a step's loss or gradient norm was NaN or inf.

    `unchecked`: (step, loss, gradient norm) device tensors since the last check, emptied here (one sync).
    `ckpt`: the checkpoint being written (of an earlier, finite step) is waited for, and the last one named.
    The weights of such a step are broken: nothing after it may become an adapter or a checkpoint.
    """
    if not unchecked:
        return
    import torch

    ok = torch.stack([torch.isfinite(loss) & torch.isfinite(norm) for _, loss, norm in unchecked]).tolist()
    bad = [entry for entry, fine in zip(unchecked, ok, strict=True) if not fine]
    unchecked.clear()
    if not bad:
        return
    step, loss, norm = bad[0]
    ckpt.wait(quiet=True)
    last = sorted(ckpt.ckpt_dir.glob("step-*"))
    resume = (
        f"; {last[-1]} holds the weights of an earlier step: `--resume` with a lower train.lr continues from it"
        if last
        else ""
    )
    raise ChattuneError(
        f"step {step}: the loss is {float(loss)} and the gradient norm {float(norm)}: training diverged, so no "
        f"adapter was written. Lower train.lr (now {lr:g}); check the data for broken rows (chattune data "
        f"check); with model.dtype float16, use bfloat16 or float32 (float16 overflows){resume}"
    )


def progress_so_far(before: Progress, meter: StepMeter, t_start: float, history: list[dict]) -> Progress:
    """The whole run's counters: those saved before the last resume plus this process's."""
    return Progress(
        train_s=before.train_s + meter.total_time,
        train_tokens=before.train_tokens + meter.total_tokens,
        wall_s=before.wall_s + time.time() - t_start,
        history=list(history),
        resumed_at=list(before.resumed_at),
        unlogged_losses=list(meter.losses),  # settled: saved inside meter.paused()
    )
