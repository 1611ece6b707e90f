"""`run(cfg)`: one LoRA fine-tune, top to bottom.

data -> render (the model's own template, assistant-only labels) -> batches (padded or packed)
-> model + LoRA (transformers + peft) -> optimizer loop with evaluation before training and after
every epoch -> adapter folder that carries everything needed to use it.
Everything the user gave is checked before the run directory is created, so a bad config or data
file leaves nothing half-written behind.

Launched by torchrun / accelerate launch, every process runs this same function on the same plan and
takes its share of each optimizer step's micro-batches (`distributed.share_window`); rank 0 alone
prints, evaluates, logs and writes (see `distributed` for the rest).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

from chattune.checkpoints import (
    AdapterFacts,
    Checkpointer,
    Progress,
    find_resume_point,
    fingerprint_examples,
    tidy_run_dir,
    write_adapter,
)
from chattune.compiling import compile_layers, doc_bound, eager, mark_doc_count_dynamic, use_compile_cache
from chattune.config import Config, config_to_dict, dump_config
from chattune.data import read_splits
from chattune.datacheck import preflight, require_examples
from chattune.distributed import (
    Replicas,
    broadcast_trainable,
    check_launch,
    end_process_group,
    full_tensor,
    gather_trainable,
    init_process_group,
    keep_gathered_fits,
    read_world,
    shard_model,
    share_window,
    sum_tensor_,
)
from chattune.errors import ChattuneError, ConfigError
from chattune.evaluate import build_samples, eval_loss, predict_samples, read_samples, score_predictions
from chattune.files import file_sha256
from chattune.methods import (
    build_optimizer,
    initial_adapter_state,
    training_model_config,
)
from chattune.metrics import require_metric_packages
from chattune.models import add_lora, load_model, load_tokenizer, pick_device, pick_dtype, resolve_model_dir
from chattune.templates import end_of_turn_token, render_all
from chattune.throughput import StepMeter, matmul_params, peak_mem_gib, peak_tflops
from chattune.track import Tracker, build_tracker


def _say(msg: str) -> None:
    if os.environ.get("RANK", "0") in ("", "0"):  # one voice for a run of several processes
        print(msg, file=sys.stderr, flush=True)


def _check_output_dir(path: Path, resume: bool) -> None:
    if path.exists() and not path.is_dir():
        raise ConfigError("train.output_dir", f"'{path}' is a file; name a directory")
    if path.exists() and any(path.iterdir()) and not resume:
        if any((path / "checkpoints").glob("step-*")) or (path / "summary.json").exists():
            what = "pass --resume to continue its last checkpoint"
        else:  # killed before its first checkpoint
            what = "pass --resume to train it again from the beginning in place"
        raise ChattuneError(
            f"output directory '{path}' already exists and is not empty; set train.output_dir to a new "
            f"directory, delete it, or {what}"
        )


def run(cfg: Config, *, resume: bool = False) -> Path:
    t_start = time.time()
    _check_finite(cfg)
    if cfg.eval.samples or cfg.eval.samples_path:  # sample answers are scored after every epoch
        require_metric_packages(cfg.eval.metrics or _default_metrics(cfg.eval.task))
    dc, tc = cfg.data, cfg.train
    world = read_world()  # one process unless started by torchrun / accelerate launch
    sharded = world.size > 1 and tc.distributed == "fsdp"
    if world.size > 1:
        check_launch(os.environ, tc.distributed)
        if tc.offload:
            raise ConfigError(
                "train.offload", "memory mode runs in one process; set it false with several GPUs"
            )
    out_dir = Path(tc.output_dir)
    # On every rank, like every check below: a rank failing alone would leave the others waiting.
    _check_output_dir(out_dir, resume)

    # ---- data: read, validate, split, render with the model's own template -------------------------------
    model_dir = resolve_model_dir(cfg.model.name_or_path, cfg.model.source, cfg.model.revision)
    tokenizer = load_tokenizer(model_dir, cfg.model)
    train_convs, eval_convs, read_report, eval_read = read_splits(dc, tc.seed)
    # Pre-flight: refuse to train on ids that differ from the template's or an untrained end of turn.
    for warning in preflight(tokenizer, train_convs, model_dir=model_dir, train_on=dc.train_on):
        if world.is_main:
            _say(f"warning: {warning}")
    render_kw = dict(
        max_len=dc.max_len,
        truncation=dc.truncation,
        train_on=dc.train_on,
        on_bad_row=dc.on_bad_row,
        cache=dc.cache,
    )
    train_ex, train_report = render_all(tokenizer, train_convs, **render_kw)
    eval_ex, eval_report = render_all(tokenizer, eval_convs, **render_kw)
    require_examples(train_report, dc)  # a readable refusal when every conversation was dropped
    if cfg.eval.max_eval_examples is not None:
        eval_ex = eval_ex[: cfg.eval.max_eval_examples]
    if cfg.eval.samples_path:
        samples = read_samples(
            cfg.eval.samples_path,
            cfg.eval.samples,
            fmt=dc.format,
            system_prompt=dc.system_prompt,
            converter=dc.eval_converter or (dc.converter if isinstance(dc.converter, str) else None),
            placeholders={"name": dc.identity_name, "author": dc.identity_author},
        )
    else:
        samples = build_samples(eval_convs, cfg.eval.samples)
    skipped, dropped = read_report.skipped, train_report.dropped
    _say(
        f"data: {read_report.rows} rows read from {dc.train_path}, {sum(skipped.values())} skipped"
        f"{f' {dict(skipped)}' if skipped else ''}; {len(train_ex)} train / {len(eval_ex)} eval examples; "
        f"{train_report.truncated} truncated to {dc.max_len} tokens, {sum(dropped.values())} dropped"
        f"{f' {dict(dropped)}' if dropped else ''}"
    )

    from chattune.packing import build_batches

    # ---- the plan: micro-batches per epoch, optimizer steps, schedule -------------------------------------
    lengths = [len(e["input_ids"]) for e in train_ex]
    plan_kw = dict(
        packing=tc.packing, budget_tokens=tc.pack_tokens, micro_batch_size=tc.micro_batch_size, seed=tc.seed
    )
    steps_per_epoch = math.ceil(len(build_batches(lengths, epoch=0, **plan_kw)) / tc.grad_accum_steps)
    total_steps = tc.max_steps or max(1, math.ceil(tc.epochs * steps_per_epoch))
    n_epochs = math.ceil(total_steps / steps_per_epoch)
    # --resume: the checkpoint to continue, and a config it cannot continue refused, before the model loads.
    fingerprint = fingerprint_examples(train_ex) if (tc.save_steps or resume) else ""
    point = None
    if resume:
        point = find_resume_point(out_dir, cfg, fingerprint, total_steps, sharded, world.is_main)

    # ---- model + LoRA ---------------------------------------------------------------------------------------
    import torch
    from transformers import get_scheduler

    from chattune.attention import VARLEN, pick_attn_implementation, register_attention, varlen_kernel_ready
    from chattune.loss import add_target_index, lm_loss_sum
    from chattune.offload import embeddings_on_device
    from chattune.packing import collate_packed, collate_padded

    torch.manual_seed(tc.seed)
    device = pick_device(tc.device)
    # Every check on the user's config and data has run on every rank: from here on ranks talk.
    joined = init_process_group(world, device)
    if not world.is_main:  # the libraries' progress bars and notices: rank 0 shows them once
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    register_attention()
    attn = cfg.model.attn_implementation
    if attn == "auto":
        attn = pick_attn_implementation(device, tc.packing)
    offload = tc.offload and device == "cuda"  # on the CPU everything is in host memory already
    quantized = cfg.model.quantization != "none"
    if sharded:  # read in the device's dtype onto the host; FSDP then moves each rank's shard to the device
        dtype = str(pick_dtype(cfg.model.dtype, device)).removeprefix("torch.")
        model = load_model(
            model_dir, dataclasses.replace(cfg.model, dtype=dtype), "cpu", attn_implementation=attn
        )
    else:  # full fine-tuning: fp32 master weights (methods.training_model_config says why)
        model_cfg = training_model_config(cfg.model, cfg.lora, offload)
        model = load_model(model_dir, model_cfg, device, attn_implementation=attn)
    model.config.use_cache = False  # a KV cache would let packed documents see each other
    if cfg.lora.enabled:
        model = add_lora(model, cfg.lora)
    else:
        model.requires_grad_(True)  # full fine-tuning: every weight trains
    initial_lora = initial_adapter_state(model, cfg.lora)  # PiSSA/OLoRA: to save a plain LoRA at the end
    # The largest micro-batch in tokens: what activation memory scales with.
    micro_tokens = tc.pack_tokens if tc.packing else tc.micro_batch_size * dc.max_len
    use_ckpt = tc.checkpointing == "on" or (
        tc.checkpointing == "auto"
        and device == "cuda"
        and (offload or quantized or _memory_tight(model, micro_tokens))
    )
    # Regional compilation: one decoder layer's code, reused by every layer. `auto` only for packs:
    # padded batches change width every step and would recompile again and again (an H100,
    # Qwen2.5-0.5B, one padded epoch of huanhuan: 1.7k tokens/s over the run with compilation, against
    # 2.3k for the tutorial's eager recipe).
    # Quantized (bitsandbytes) layers are compiled only when asked for (`on`): not measured here yet.
    use_compile = tc.compile == "on" or (
        tc.compile == "auto" and device == "cuda" and tc.packing and not quantized
    )
    if use_ckpt and use_compile:
        # Checkpointing by the compiler: with a memory budget of 0 the partitioner saves only each
        # compiled layer's inputs and recomputes the rest in the backward (what checkpointing does,
        # fused). transformers' own checkpoint wrapped around compiled layers failed to recompute
        # identically on an H100 (Qwen2.5-14B), so it is used only for eager layers.
        import torch._functorch.config as functorch_config

        functorch_config.activation_memory_budget = 0.0
    elif use_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()  # frozen embeddings: checkpointed blocks still need grads
    # Packs padded to one shape: one static graph for every step, warm from the cache the next run
    # (compiling.py; issue 14: compilation cost the first ~89 s of a 7B run).
    # Only where attention is torch's varlen kernel: the per-document fallback loop breaks the graph.
    fixed_packs = (
        use_compile
        and tc.packing
        and attn == VARLEN
        and varlen_kernel_ready()
        and pick_dtype(cfg.model.dtype, device) in (torch.bfloat16, torch.float16)
    )
    if use_compile:
        use_compile_cache()
        if fixed_packs:  # layer 0 then shares the other layers' graph
            model.enable_input_require_grads()
        compile_layers(_decoder_layers(model), static_shapes=fixed_packs)
    if offload:
        from chattune.offload import offload_input_embeddings

        if not offload_input_embeddings(model, device):
            _say(
                "note: train.offload: the embedding table is tied to the output head or trained, so it "
                "stays on the GPU"
            )
    # Half-precision base weights with fp32 LoRA weights (peft's default): autocast runs the LoRA
    # matmuls in bf16 too, and peft's own input casting (an extra copy per LoRA layer) is turned off.
    # Full fine-tuning's fp32 weights compute in the same half dtype under autocast.
    compute_dtype = pick_dtype(cfg.model.dtype, device)
    half = device == "cuda" and compute_dtype in (torch.bfloat16, torch.float16)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_total = sum(p.numel() for p in model.parameters())
    n_matmul = matmul_params(model)
    if world.size > 1:
        broadcast_trainable([p for p in model.parameters() if p.requires_grad])
        torch.manual_seed(tc.seed + world.rank)  # LoRA dropout: each rank draws its own masks
    ce_chunk_rows = 256 if offload else None  # memory mode: ~150 MB of logits at a time, not ~1 GB

    def loss_of(m, batch: dict):  # the micro-batch's summed loss
        return lm_loss_sum(m, batch, ce_chunk_rows)[0]

    engine = None  # how several processes share a step: Replicas (ddp) or Shards (fsdp)
    if sharded:
        reshard = {"on": True, "off": False}.get(tc.fsdp_reshard_after_forward)
        if reshard is None:  # auto
            reshard = not keep_gathered_fits(model.get_base_model(), device)
        engine = shard_model(model.get_base_model(), _decoder_layers(model), device, world.size, reshard)
    elif world.size > 1:
        engine = Replicas(model, loss_of, world, device)  # the loss runs through torch's DDP
    step_loss = engine.loss if isinstance(engine, Replicas) else lambda batch: loss_of(model, batch)

    # ---- the optimizer and its schedule ---------------------------------------------------------------------
    if tc.grad_accum_steps % world.size:
        _say(
            f"note: train.grad_accum_steps ({tc.grad_accum_steps}) is not a multiple of the {world.size} "
            "processes, so some of them idle for part of every step; a multiple keeps all of them busy"
        )
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(model, cfg.lora, tc, device, offload)  # AdamW, LoRA+ groups, or on the host
    scheduler = get_scheduler(
        tc.lr_schedule,
        optimizer,
        num_warmup_steps=int(tc.warmup_ratio * total_steps),
        num_training_steps=total_steps,
    )
    pad_id = tokenizer.pad_token_id
    pack_shape: dict = {}
    if fixed_packs:
        pack_shape = dict(
            pad_to=tc.pack_tokens,
            pad_id=pad_id if pad_id is not None else 0,
            max_doc_tokens=doc_bound(lengths, tc.pack_tokens),
        )

    def collate(idx: list[int]) -> tuple[dict, int, int]:
        """A micro-batch on the host, with its target and real-token counts (known without a GPU sync)."""
        chunk = [train_ex[i] for i in idx]
        multiple = 8 if device == "cuda" else 1  # whole tensor-core tiles
        batch = collate_packed(chunk, **pack_shape) if tc.packing else collate_padded(chunk, pad_id, multiple)
        batch = add_target_index(batch)  # on the host: the loss then needs no GPU sync
        n_targets = int(batch["target_index"].numel())
        n_real = sum(len(e["input_ids"]) for e in chunk)
        return batch, n_targets, n_real

    def to_device(batch: dict) -> dict:
        # Pinned: a copy from pageable memory would first wait for the GPU to drain its queue.
        pin = device == "cuda"
        on_device = {
            k: (v.pin_memory() if pin else v).to(device, non_blocking=True) if hasattr(v, "to") else v
            for k, v in batch.items()
        }
        if fixed_packs:
            mark_doc_count_dynamic(on_device)
        return on_device

    def forward_ctx() -> contextlib.AbstractContextManager:
        if not half:
            return contextlib.nullcontext()
        from peft.helpers import disable_input_dtype_casting

        stack = contextlib.ExitStack()
        stack.enter_context(torch.autocast("cuda", dtype=compute_dtype))
        stack.enter_context(disable_input_dtype_casting(model))
        return stack

    # ---- run directory, tracker ---------------------------------------------------------------------------
    # Everything the user gave has been checked by now: only from here on is anything written.
    facts = AdapterFacts(tokenizer=tokenizer, cfg=cfg, model_dir=model_dir)
    ckpt = Checkpointer(
        out_dir / "checkpoints", model, optimizer, scheduler, world, sharded, device, facts, fingerprint
    )
    done = ckpt.restore(point, cfg, total_steps)  # on every rank
    if done.folder is not None:
        _say(f"resuming from {done.folder} (step {done.step})")
    start_step = done.step
    data_info: dict = {}
    tracker: Tracker = _SilentTracker()  # ranks other than 0 write nothing
    if world.is_main:
        if resume:  # no half-saved folders, and no record of the steps about to be run again
            tidy_run_dir(out_dir, start_step)
        data_info = {
            "train_path": dc.train_path,
            "train_sha256": file_sha256(dc.train_path) if _is_file(dc.train_path) else None,
            # Each source's sha256 (a file) or `datasets` fingerprint, as the reader found it.
            "sources": read_report.as_dict().get("sources"),
            "read": read_report.as_dict(),
            "eval_read": eval_read.as_dict() if eval_read else None,
            "train": train_report.as_dict(),
            "eval": eval_report.as_dict(),
        }
        hparams = {**config_to_dict(cfg), "model_dir": str(model_dir), "dataset": data_info}
        hparams["params"] = {"trainable": n_trainable, "total": n_total}
        # The first write: a tracker asked for that cannot start stops the run here and leaves nothing.
        tracker = build_tracker(cfg.track, out_dir, hparams)
        (out_dir / "config.yaml").write_text(dump_config(cfg), encoding="utf-8")
    from chattune.loading import Loaded

    eot = end_of_turn_token(tokenizer)
    loaded = Loaded(
        model=model,
        tokenizer=tokenizer,
        system_prompt=dc.system_prompt,
        end_of_turn_token=eot,
        name="training",
        stop_token_ids=sorted({tokenizer.convert_tokens_to_ids(eot), tokenizer.eos_token_id}),
    )
    metric_names = cfg.eval.metrics or _default_metrics(cfg.eval.task)
    history: list[dict] = done.progress.history  # evaluations of the whole run, resumed or not

    def evaluate_now(step: int, epoch: float, tag: str) -> None:
        # Replicas: rank 0 evaluates alone while the others wait in their next collective. Shards: every
        # rank runs the same forwards (each one gathers the weights), and only rank 0's tracker records.
        if not (world.is_main or sharded):
            return
        if not ((cfg.eval.loss and eval_ex) or samples):  # evaluation is off: nothing to say either
            return
        # Forked generators: whatever evaluation draws, training draws the same dropout masks with or
        # without it, so a resumed run (which skips the evaluation of its checkpoint's step) stays exact.
        # Eager: evaluation's shapes change every batch, and compiling them cost more than it saved.
        rng = torch.random.fork_rng(devices=[torch.cuda.current_device()] if device == "cuda" else [])
        with rng, embeddings_on_device(model), eager() if use_compile else contextlib.nullcontext():
            _evaluate(step, epoch, tag)

    def _evaluate(step: int, epoch: float, tag: str) -> None:
        row: dict = {"epoch": epoch, "tag": tag}
        if cfg.eval.loss and eval_ex:
            row["eval/loss"] = eval_loss(model, eval_ex, pad_id, cfg.eval.batch_size)
        if samples:
            preds = predict_samples(
                loaded, samples, max_new_tokens=cfg.eval.max_new_tokens, batch_size=cfg.eval.batch_size
            )
            tracker.log_predictions([{**r, "epoch": epoch} for r in preds], step=step, tag=tag)
            row.update({f"eval/{k}": v for k, v in score_predictions(preds, metric_names).items()})
            for r in preds[:2]:
                _say(f"  [{tag}] Q: {r['prompt'][:60]!r}\n  [{tag}] A: {r['prediction'][:80]!r}")
        tracker.log(row, step=step)
        history.append({"step": step, **row})
        shown = {k: round(v, 4) for k, v in row.items() if k.startswith("eval/")}
        _say(f"eval [{tag}] step {step}: {shown}")

    _say(
        f"model: {cfg.model.name_or_path} on {device} ({next(model.parameters()).dtype}, attention {attn}, "
        f"checkpointing {'on' if use_ckpt else 'off'}, compiled layers {'on' if use_compile else 'off'}"
        f"{', memory mode (offload)' if offload else ''}); {'LoRA' if cfg.lora.enabled else 'full fine-tuning'} trains {n_trainable:,} of {n_total:,} parameters; "
        f"{total_steps} optimizer steps over {n_epochs} epoch(s)"
        + (f"; {world.size} processes share each step ({tc.distributed})" if world.size > 1 else "")
    )
    if start_step == 0:
        evaluate_now(0, 0.0, "baseline")

    # ---- the loop -------------------------------------------------------------------------------------------
    from tqdm.auto import tqdm

    peak = peak_tflops(device)
    bar = tqdm(
        total=total_steps,
        initial=start_step,
        disable=not (tc.progress and world.is_main),
        desc="train",
        dynamic_ncols=True,
    )
    step = start_step
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
    for epoch in range(n_epochs):
        batches = build_batches(lengths, epoch=epoch, **plan_kw)
        windows = [batches[i : i + tc.grad_accum_steps] for i in range(0, len(batches), tc.grad_accum_steps)]
        stepped = False
        for w, window in enumerate(windows):
            if epoch * steps_per_epoch + w < start_step:
                continue  # resumed: these steps were done before the checkpoint
            if step >= total_steps:
                break
            # Every rank collates the whole step on the host, so each knows the step's counts without a
            # collective (a host sync per step), then runs its share of it.
            staged = [collate(idx) for idx in window]
            # Normalise by the labeled tokens of the whole accumulated batch, so the loss is the
            # per-token mean however the tokens were split into micro-batches, packs or processes.
            n_labels = max(1, sum(n for _, n, _ in staged))
            real_tokens = sum(n for _, _, n in staged)  # padding is work the GPU did for nothing
            mine = share_window(staged, world)
            # Gradients cross ranks inside the backward of each rank's last pass (DDP's buckets, FSDP's
            # reduce-scatter), so every rank runs as many passes as the busiest one: a rank short of a
            # micro-batch runs a blank one that takes part and adds nothing.
            passes = math.ceil(len(window) / world.size)
            loss_total = torch.zeros((), device=device)  # summed on the device, read at the next log line
            for i in range(passes):
                blank = i >= len(mine)
                b = to_device((mine[i] if not blank else staged[0])[0])
                sync = engine.micro_batch(last=i == passes - 1) if engine else contextlib.nullcontext()
                with sync:
                    with forward_ctx():
                        loss_sum = step_loss(b)
                    ((loss_sum * 0.0) if blank else (loss_sum / n_labels)).backward()
                if not blank:
                    loss_total += loss_sum.detach()
            if world.size > 1:
                sum_tensor_(loss_total)
            grad_norm_t = torch.nn.utils.clip_grad_norm_(params, tc.max_grad_norm)
            grad_norm_t = full_tensor(grad_norm_t)  # a sharded norm is gathered on every rank
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            stepped = True
            meter.add(loss_total, grad_norm_t, n_labels, real_tokens)  # no sync: values stay on the device
            unchecked.append((step, loss_total / n_labels, grad_norm_t))
            bar.update(1)
            log_now = step % tc.logging_steps == 0 or step == total_steps
            save_now = tc.save_steps and step % tc.save_steps == 0 and step < total_steps
            eval_now = tc.eval_steps and step % tc.eval_steps == 0 and step < total_steps
            if log_now or save_now or eval_now:  # nothing diverged is logged, saved or evaluated
                _stop_if_nonfinite(unchecked, tc.lr, ckpt.ckpt_dir)
            if log_now:
                loss_mean, grad_norm, tps = meter.read()  # the one host sync of these steps
                row = {
                    "train/loss": loss_mean,
                    "train/lr": scheduler.get_last_lr()[0],
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
                    evaluate_now(step, epoch + (w + 1) / len(windows), f"step {step}")
            if save_now:
                with meter.paused():
                    ckpt.save(step, _progress(done.progress, meter, t_start, history))
        _stop_if_nonfinite(unchecked, tc.lr, ckpt.ckpt_dir)
        if stepped:
            with meter.paused():
                evaluate_now(step, float(epoch + 1), f"epoch {epoch + 1}")
        if step >= total_steps:
            break
    bar.close()
    gc.unfreeze()

    # ---- save: the adapter folder carries everything needed to use it --------------------------------------
    lora_state = gather_trainable(model) if sharded else None  # a collective: every rank takes part
    saved = out_dir / ("adapter" if cfg.lora.enabled else "model")
    if world.is_main:
        write_adapter(model, facts, saved, lora_state, initial=initial_lora)
        total = _progress(done.progress, meter, t_start, history)  # the whole run, over its resumes
        hardware = (
            torch.cuda.get_device_name()
            if device == "cuda"
            else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
        )
        summary = {
            "wall_s": total.wall_s,
            "train_s": total.train_s,
            "train_tokens": total.train_tokens,
            "tokens_per_s": total.train_tokens / max(total.train_s, 1e-9),
            # Training seconds to the end of the first / tenth step: compilation shows here.
            "first_step_s": meter.marks.get(1),
            "first_10_steps_s": meter.marks.get(10),
            "steps": step,
            "resumed_at_steps": total.resumed_at,
            "peak_mem_gib": peak_mem_gib(device),
            "hardware": hardware if world.size == 1 else f"{world.size} processes x {hardware}",
            "versions": _versions(),
            "data": data_info,
            "evaluations": history,
        }
        if world.size > 1:
            summary["distributed"] = {"processes": world.size, "mode": tc.distributed}
        (out_dir / "summary.json").write_text(
            json.dumps(summary, ensure_ascii=False, indent=2), encoding="utf-8"
        )
        tracker.finish()
        try:
            from chattune.report import write_report

            write_report(out_dir)
        except Exception as e:  # a report problem must not lose a finished run
            _say(f"warning: could not write the run report: {e}")
        _say(
            f"done in {summary['wall_s']:.1f}s ({summary['tokens_per_s']:,.0f} tokens/s); {saved.name}: {saved}"
        )
    if use_ckpt and use_compile:
        functorch_config.activation_memory_budget = 1.0  # the default, for whatever runs next here
    end_process_group(joined)  # every rank returns once the adapter is written
    return out_dir


# -- helpers of run() ---------------------------------------------------------------------------------------
def _stop_if_nonfinite(unchecked: list[tuple], lr: float, ckpt_dir: Path) -> None:
    """Stop the run, before anything more is written, when a step's loss or gradient norm was NaN or inf.

    `unchecked`: (step, loss, gradient norm) device tensors since the last check, emptied here (one sync).
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
    last = sorted(ckpt_dir.glob("step-*"))
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


def _check_finite(cfg: Config) -> None:
    """Every number in the config is finite (`train.lr: .inf` would train into NaN weights)."""
    for section in dataclasses.fields(cfg):
        values = getattr(cfg, section.name)
        for f in dataclasses.fields(values):
            value = getattr(values, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{section.name}.{f.name}", f"must be a finite number, got {value}")


def _progress(before: Progress, meter: StepMeter, t_start: float, history: list[dict]) -> Progress:
    """The whole run's counters: those saved before the last resume plus this process's."""
    return Progress(
        train_s=before.train_s + meter.total_time,
        train_tokens=before.train_tokens + meter.total_tokens,
        wall_s=before.wall_s + time.time() - t_start,
        history=list(history),
        resumed_at=list(before.resumed_at),
        unlogged_losses=list(meter.losses),  # settled: saved inside meter.paused()
    )


class _SilentTracker:
    """The tracker of ranks other than 0: they train and evaluate like rank 0 but record nothing."""

    def log(self, metrics: dict, step: int) -> None:
        pass

    def log_predictions(self, rows: list[dict], step: int, tag: str) -> None:
        pass

    def finish(self) -> None:
        pass


def _default_metrics(task: str) -> list[str]:
    from chattune.metrics import default_metrics

    return default_metrics(task)


def _is_file(path) -> bool:
    return isinstance(path, str) and Path(path).is_file()


def _memory_tight(model, micro_tokens: int) -> bool:
    from chattune.loss import checkpointing_needed

    return checkpointing_needed(model, micro_tokens)


def _decoder_layers(model) -> list:
    """The repeated transformer blocks (`model.model.layers` in Qwen2, Llama and ERNIE-4.5 models)."""
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = getattr(getattr(hf, "model", None), "layers", None)
    if layers is None:
        raise ChattuneError(
            f"train.compile: cannot find the decoder layers of {type(hf).__name__}; set train.compile: off"
        )
    return list(layers)


def _versions() -> dict[str, str]:
    import peft
    import torch
    import transformers

    import chattune

    return {
        "chattune": chattune.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
    }
