"""chattune's LoRA fine-tune vs the tutorial recipe, back to back in one process on one GPU.

Not a test: a GPU benchmark. For each architecture (real Qwen2.5 configs, random bf16 weights:
weights do not change speed) it runs (a) the tutorial recipe, bench/seed_recipe.py unchanged, and
(b) chattune's path: documents packed into token budgets (chattune.render.packing), varlen attention
(chattune.model.attention), loss over targeted tokens only (chattune.model.loss), LoRA r64/alpha16/dropout 0
on q,k,v,o,gate,up,down via peft, bf16 autocast with fp32 LoRA weights, fused AdamW, checkpointing
chosen by chattune.model.loss.checkpointing_needed. Both see the same real (prompt, response) lengths
(bench/lengths-*.txt, cut at 384 tokens) and random token ids. Prints real tokens/s, useful MFU
(4 x matmul params x real tokens / (time x 989 TFLOP/s), the seed recipe's formula), peak memory
and the speed-up, and writes bench/results.json (and $OUT/results.json when --out is given).

  PYTHONPATH=src python bench/bench.py --tiny                 # CPU smoke run, seconds
  PYTHONPATH=src python bench/bench.py --plan full --out $OUT # one H100/H200, ~7.5 minutes

Imports only torch/transformers/peft and chattune.{packing,attention,loss,offload,throughput}: the GPU image has no
network and none of chattune's other dependencies.
"""

from __future__ import annotations

import argparse
import gc
import gzip
import json
import os
import platform
import random
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # varying T per pack

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

import seed_recipe  # noqa: E402

import chattune.model.loss as chattune_loss
from chattune.model.attention import pick_attn_implementation, register_attention
from chattune.model.loss import (
    activation_bytes_per_token,
    add_target_index,
    checkpointing_needed,
    lm_loss_sum,
)

SKIPS_MASK_BUILDING = chattune_loss._skips_mask_building
from chattune.render.packing import IGNORE_INDEX, build_batches, collate_packed, count_label_tokens
from chattune.train.offload import HostAdamW, offload_input_embeddings
from chattune.train.throughput import matmul_params

PEAK_FLOPS = 989e12  # H100 SXM dense bf16, as in the seed recipe's MFU
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
T_START = time.perf_counter()
TRACE_DIR: Path | None = None  # --trace-dir: profiled cases export a gzipped chrome trace there
# The seed recipe's architectures, plus an untied toy to smoke-test the embedding offload on CPU.
ARCH = {**seed_recipe.ARCH, "tiny-untied": {**seed_recipe.ARCH["tiny"], "tie_word_embeddings": False}}


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T_START:6.1f}s] {msg}", flush=True)


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def free_memory() -> None:
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def make_docs(lengths_path: Path, n_tokens: int, max_len: int = 384) -> list[dict]:
    """The seed recipe's documents: same shuffle, same random ids, same cut at max_len."""
    pairs = [tuple(map(int, line.split())) for line in open(lengths_path)]
    random.Random(0).shuffle(pairs)
    total = sum(min(p + r + 1, max_len) for p, r in pairs)
    pairs = pairs * (n_tokens // total + 1)
    rng = random.Random(1)
    docs = []
    for p, r in pairs:
        ids = [rng.randrange(100, 150000) for _ in range(p + r + 1)][:max_len]
        labels = ([IGNORE_INDEX] * p + ids[p:])[:max_len]
        docs.append({"input_ids": ids, "labels": labels})
    return docs


def measure_matmul() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(5):
        a @ b
    sync()
    t = time.perf_counter()
    for _ in range(30):
        a @ b
    sync()
    return 2 * 8192**3 / ((time.perf_counter() - t) / 30) / 1e12


def run_chattune(
    arch: str,
    lengths_path: Path,
    budget: int,
    steps: int,
    warm: int,
    *,
    compile_layers: bool = False,
    checkpointing: str = "auto",
    memory_mode: bool = False,
    accumulate: int = 1,
    check: bool = True,
    chunk_rows: int | None = None,
    profile: bool = False,
    fused_ce: bool = True,
    pin: bool = True,
    memory_budget: float | None = None,
    timing: str = "pipelined",
    stance: bool = False,
    mask_skip: bool = True,
    gc_freeze: bool = True,
) -> dict:
    from peft import LoraConfig, get_peft_model
    from peft.helpers import disable_input_dtype_casting
    from transformers import AutoModelForCausalLM, Qwen2Config

    cfg = Qwen2Config(**ARCH[arch], max_position_embeddings=32768, rope_theta=1e6)
    attn = pick_attn_implementation(DEVICE, packing=True)
    register_attention()  # also on CPU, to exercise the same attention function there
    attn = "chattune_varlen" if attn == "sdpa" and DEVICE == "cpu" else attn
    # bf16 on the GPU; fp32 on the CPU smoke run, where bf16 matmuls are emulated and very slow.
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation=attn)
    lcfg = LoraConfig(
        r=64, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS, task_type="CAUSAL_LM"
    )
    model = get_peft_model(model, lcfg)  # LoRA weights fp32 (peft's autocast_adapter_dtype)
    hf = model.get_base_model()
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)

    free = torch.cuda.mem_get_info()[0] if DEVICE == "cuda" else 1 << 40
    auto_ckpt = checkpointing_needed(model, budget, free)
    use_ckpt = auto_ckpt if checkpointing == "auto" else checkpointing == "on"
    if use_ckpt and compile_layers:  # as the trainer: the compiler recomputes (memory budget 0)
        memory_budget = 0.0
    elif use_ckpt:
        # transformers 5.23 renames this activation_checkpointing_enable; 5.17 has only this name.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if memory_mode:  # the trainer's `train.offload`: embedding table and AdamW state in host memory
        offload_input_embeddings(model, DEVICE)
    model.train()
    chattune_loss.FUSED_CE = fused_ce
    # mask_skip=False: transformers builds (and first detects) the packed-sequence mask, as before 2026-11-30 (b).
    chattune_loss._skips_mask_building = SKIPS_MASK_BUILDING if mask_skip else (lambda config: False)

    n_steps = (steps + warm) * accumulate
    # A pool 3x what the steps need: the randomly chosen bins then carry the data set's mix of
    # lengths, not only best-fit-decreasing's first (long-document) bins.
    docs = make_docs(lengths_path, budget * n_steps * 3)
    plan = build_batches(
        [len(d["input_ids"]) for d in docs],
        packing=True,
        budget_tokens=budget,
        micro_batch_size=1,
        seed=0,
        epoch=0,
    )[:n_steps]
    if len(plan) < n_steps:
        raise RuntimeError(f"only {len(plan)} packs for {n_steps} micro-steps")

    def to_device(batch: dict) -> dict:
        # Pinned as in the trainer: a pageable copy first waits for the GPU's queue to drain.
        pinned = pin and DEVICE == "cuda"
        return {
            k: (v.pin_memory() if pinned else v).to(DEVICE, non_blocking=True) if torch.is_tensor(v) else v
            for k, v in batch.items()
        }

    packs = [collate_packed([docs[i] for i in b]) for b in plan]
    real = [int(p["input_ids"].shape[1]) for p in packs]  # packs hold no padding: all tokens are real
    if memory_mode:
        opt = HostAdamW(trainable, lr=1e-4)
    else:
        opt = torch.optim.AdamW(trainable, lr=1e-4, fused=DEVICE == "cuda")

    res: dict = dict(
        recipe="chattune",
        arch=arch,
        attn=attn,
        budget=budget,
        accumulate=accumulate,
        checkpointing=use_ckpt,
        compile=compile_layers,
        memory_mode=memory_mode,
        fused_ce=fused_ce,
        pinned=pin,
        memory_budget=memory_budget,
        lora_params_m=round(n_trainable / 1e6, 1),
        auto_checkpointing=auto_ckpt,
        free_gib_after_load=round(free / 2**30, 1),
        est_activation_gib=round(activation_bytes_per_token(cfg, use_ckpt) * budget / 2**30, 2),
    )
    autocast = torch.autocast(DEVICE, dtype=dtype, enabled=DEVICE == "cuda")

    if check:  # packed loss == per-document losses (bf16): documents really are isolated
        model.eval()
        with torch.no_grad(), autocast, disable_input_dtype_casting(model):
            b = plan[0][:8]
            packed, n = lm_loss_sum(model, to_device(collate_packed([docs[i] for i in b])), chunk_rows)
            alone = [lm_loss_sum(model, to_device(collate_packed([docs[i]])), chunk_rows) for i in b]
            res["check_packed"] = round(packed.item() / n, 5)
            res["check_separate"] = round(sum(s.item() for s, _ in alone) / sum(k for _, k in alone), 5)
        model.train()
        log(f"check: packed {res['check_packed']} vs one by one {res['check_separate']}")
    # Regional compilation: one decoder layer compiled, the code reused by all layers. With
    # checkpointing the compiler recomputes (budget 0): transformers' non-reentrant checkpoint around
    # compiled layers failed on an H100 (CheckpointError: recomputed tensors differ; Qwen2.5-14B).
    res["memory_budget"] = memory_budget
    if compile_layers:
        import torch._functorch.config as functorch_config

        # < 1: the partitioner recomputes cheap ops in the backward instead of saving their outputs.
        functorch_config.activation_memory_budget = 1.0 if memory_budget is None else memory_budget
        torch._dynamo.reset()  # compile afresh under this budget
        for layer in hf.model.layers:
            layer.compile(dynamic=True)

    free_memory()
    static = torch.cuda.memory_allocated() if DEVICE == "cuda" else 0
    times = []

    def train_step(step: int) -> torch.Tensor:
        cpu_micro = packs[step * accumulate : (step + 1) * accumulate]
        counts = [count_label_tokens(m) for m in cpu_micro]  # from host copies: no GPU sync
        micro = [to_device(add_target_index(m)) for m in cpu_micro]
        for m in micro:
            with autocast, disable_input_dtype_casting(model):
                loss_sum, _ = lm_loss_sum(model, m, chunk_rows)
            (loss_sum / sum(counts)).backward()
        # As in the trainer: no sync between the backward and the optimizer (one would idle the GPU
        # while the host queues the step; the 2026-11-24 runs had one here to time the optimizer).
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss_sum.detach() / max(counts[-1], 1)

    # Warm-up steps (compilation) are timed one by one. The timed steps then run back to back with
    # one sync before and one after ("pipelined", as the trainer runs between its logging steps):
    # the host prepares step n+1 while the GPU finishes step n. "per-step" syncs around every step,
    # as the 2026-11-24 .. 2026-11-30 runs did, which leaves the GPU idle during each step's prologue.
    for step in range(warm):
        sync()
        t = time.perf_counter()
        loss = train_step(step)
        sync()
        times.append(time.perf_counter() - t)
        log(f"  step {step}: {times[-1]:.3f}s loss {loss.item():.3f}")
    if gc_freeze:  # as the trainer: the setup's objects leave the collector's generations
        gc.collect()
        gc.freeze()
    if stance:  # guards are skipped once every graph exists (bench-only experiment)
        torch.compiler.set_stance("default", skip_guard_eval_unsafe=True)
    if timing == "pipelined":
        sync()
        t = time.perf_counter()
        for step in range(warm, steps + warm):
            loss = train_step(step)
        sync()
        times += [(time.perf_counter() - t) / steps] * steps
    else:
        for step in range(warm, steps + warm):
            sync()
            t = time.perf_counter()
            loss = train_step(step)
            sync()
            times.append(time.perf_counter() - t)
    log(f"  timed steps ({timing}): {sum(times[warm:]) / steps:.3f}s each, last loss {loss.item():.3f}")
    t_timed = sum(times[warm:])
    tokens = sum(real[warm * accumulate :])
    mm = matmul_params(model)  # the trainer's count, for its MFU too
    res.update(
        tokens_per_s=round(tokens / t_timed),
        mfu_pct=round(100 * 4 * mm * tokens / t_timed / PEAK_FLOPS, 1),
        s_per_step=round(t_timed / steps, 3),
        tokens_per_step=round(tokens / steps),
        matmul_params_b=round(mm / 1e9, 2),
        mean_len=round(sum(real) / sum(len(b) for b in plan), 1),
        first_step_s=round(times[0], 1),
        timing=timing,
        stance=stance,
        mask_skip=mask_skip,
        gc_freeze=gc_freeze,
    )
    if profile and DEVICE == "cuda":  # one more step under the profiler: where the time goes
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        try:  # two steps back to back, as timed: the gap between them shows too
            sync()
            with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                train_step(warm)
                train_step(warm + 1)
                sync()
            table = prof.key_averages().table(
                sort_by="self_device_time_total", row_limit=25, max_name_column_width=70
            )
            print(f"PROFILE {arch} budget {budget} (2 steps)\n{table}", flush=True)
            print(gap_report(prof), flush=True)
            if TRACE_DIR is not None:  # for bench/trace_gaps.py: which host work each gap waited on
                path = TRACE_DIR / f"trace-{arch}-{budget}.json"
                prof.export_chrome_trace(str(path))
                with open(path, "rb") as f_in, gzip.open(f"{path}.gz", "wb") as f_out:
                    shutil.copyfileobj(f_in, f_out)
                path.unlink()
        except Exception as exc:
            log(f"profile failed: {exc}")
    if stance:
        torch.compiler.set_stance("default")
    if gc_freeze:
        gc.unfreeze()
    if DEVICE == "cuda":
        res["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        res["reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
        res["static_gib"] = round(static / 2**30, 2)  # weights + LoRA before the first step
    # Drop the last references (the step closure holds some) before freeing the cache.
    model = hf = opt = trainable = packs = train_step = None
    free_memory()
    return res


def gap_report(prof, top: int = 12) -> str:
    """Where the GPU sat idle during the profiled step: the gaps between kernels, largest first."""
    kernels = sorted(
        (e.time_range.start, e.time_range.end, e.name)
        for e in prof.events()
        if e.device_type == torch.autograd.DeviceType.CUDA
    )
    if not kernels:
        return "GAPS: no kernels"
    t0, busy, gaps, end = kernels[0][0], 0.0, [], kernels[0][0]
    prev_name = ""
    for s, e, name in kernels:
        if s > end:
            gaps.append((s - end, (end - t0) / 1e3, prev_name[:50], name[:50]))
        busy += max(0.0, e - max(s, end))
        if e > end:
            end, prev_name = e, name
    span = end - t0
    lines = [
        f"GAPS: span {span / 1e3:.1f} ms, kernels busy {busy / 1e3:.1f} ms, idle {(span - busy) / 1e3:.1f} ms"
    ]
    lines.append(
        f"  gaps > 50 us: {sum(1 for g in gaps if g[0] > 50)}, total {sum(g[0] for g in gaps) / 1e3:.1f} ms"
    )
    for g, at, before, after in sorted(gaps, reverse=True)[:top]:
        lines.append(f"  {g / 1e3:7.2f} ms at {at:8.1f} ms  after {before!r} before {after!r}")
    return "\n".join(lines)


def run_seed(arch: str, lengths_path: Path, steps: int, warm: int, bs: int = 4, ga: int = 4) -> dict:
    args = ["--arch", arch, "--steps", str(steps), "--warm", str(warm), "--lengths", str(lengths_path)]
    res = seed_recipe.main(args + ["--bs", str(bs), "--ga", str(ga)])
    res["recipe"] = "tutorial"
    free_memory()
    return res


PLANS = {
    # (case name, kind, kwargs): run in order until the deadline; each case is independent.
    "tiny": [
        ("tiny/tutorial", "seed", dict(arch="tiny", steps=2, warm=1, bs=1, ga=2)),
        ("tiny/chattune", "chattune", dict(arch="tiny", budget=2048, steps=3, warm=1)),
        (
            "tiny/chattune-ckpt-acc",
            "chattune",
            dict(arch="tiny", budget=1024, steps=2, warm=1, checkpointing="on", accumulate=2),
        ),
        (
            "tiny/compiled",
            "chattune",
            dict(arch="tiny", budget=1024, steps=2, warm=2, compile_layers=True, check=False),
        ),
        (
            "tiny/memory",
            "chattune",
            dict(
                arch="tiny-untied",
                budget=1024,
                steps=2,
                warm=1,
                memory_mode=True,
                checkpointing="on",
                accumulate=2,
                check=False,
            ),
        ),
    ],
    # What each change of this session buys, one variable at a time (H200, 2026-11-30).
    "explore": [
        (
            "0.5b/before",
            "chattune",
            dict(
                arch="qwen2.5-0.5b",
                budget=32768,
                steps=8,
                warm=2,
                compile_layers=True,
                check=False,
                fused_ce=False,
                pin=False,
            ),
        ),
        (
            "0.5b/fused-ce-pinned",
            "chattune",
            dict(arch="qwen2.5-0.5b", budget=32768, steps=8, warm=2, compile_layers=True, profile=True),
        ),
        (
            "0.5b/65536",
            "chattune",
            dict(arch="qwen2.5-0.5b", budget=65536, steps=6, warm=2, compile_layers=True, check=False),
        ),
        (
            "7b/4096",
            "chattune",
            dict(arch="qwen2.5-7b", budget=4096, steps=10, warm=3, compile_layers=True, profile=True),
        ),
        (
            "7b/8192-budget0.5",
            "chattune",
            dict(
                arch="qwen2.5-7b",
                budget=8192,
                steps=6,
                warm=2,
                compile_layers=True,
                check=False,
                checkpointing="off",
                memory_budget=0.5,
            ),
        ),
        (
            "7b/memory-4096",
            "chattune",
            dict(
                arch="qwen2.5-7b",
                budget=4096,
                steps=3,
                warm=1,
                memory_mode=True,
                checkpointing="on",
                accumulate=4,
                check=False,
            ),
        ),
        (
            "7b/memory-2048",
            "chattune",
            dict(
                arch="qwen2.5-7b",
                budget=2048,
                steps=2,
                warm=1,
                memory_mode=True,
                checkpointing="on",
                accumulate=8,
                check=False,
            ),
        ),
    ],
    # Second H200 call of 2026-11-30 (b): timing the steps back to back instead of syncing around
    # each one, skipping dynamo's guards, and pack sizes between 4,096 and 8,192 for the 40 GiB target.
    "overlap": [
        (
            "7b/4096-per-step",
            "chattune",
            dict(arch="qwen2.5-7b", budget=4096, steps=10, warm=3, compile_layers=True, timing="per-step"),
        ),
        (
            "7b/4096",
            "chattune",
            dict(
                arch="qwen2.5-7b",
                budget=4096,
                steps=12,
                warm=2,
                compile_layers=True,
                profile=True,
                check=False,
            ),
        ),
        (
            "7b/4096-stance",
            "chattune",
            dict(
                arch="qwen2.5-7b",
                budget=4096,
                steps=12,
                warm=2,
                compile_layers=True,
                stance=True,
                check=False,
            ),
        ),
        (
            "7b/5120",
            "chattune",
            dict(arch="qwen2.5-7b", budget=5120, steps=10, warm=2, compile_layers=True, check=False),
        ),
        (
            "7b/6144",
            "chattune",
            dict(arch="qwen2.5-7b", budget=6144, steps=8, warm=2, compile_layers=True, check=False),
        ),
        (
            "7b/8192",
            "chattune",
            dict(arch="qwen2.5-7b", budget=8192, steps=8, warm=2, compile_layers=True, check=False),
        ),
        (
            "0.5b/32768",
            "chattune",
            dict(arch="qwen2.5-0.5b", budget=32768, steps=10, warm=2, compile_layers=True, check=False),
        ),
    ],
    "full": [
        ("7b/tutorial", "seed", dict(arch="qwen2.5-7b", steps=10, warm=2)),
        (
            "7b/chattune",
            "chattune",
            dict(arch="qwen2.5-7b", budget=4096, steps=12, warm=3, compile_layers=True, profile=True),
        ),
        (  # A/B, same packs: transformers detects packed documents itself (its .all() syncs every forward)
            "7b/chattune-no-mask-skip",
            "chattune",
            dict(
                arch="qwen2.5-7b",
                budget=4096,
                steps=12,
                warm=3,
                compile_layers=True,
                check=False,
                mask_skip=False,
            ),
        ),
        (  # A/B, same packs: the garbage collector scans every object (no gc.freeze)
            "7b/chattune-no-gc-freeze",
            "chattune",
            dict(
                arch="qwen2.5-7b",
                budget=4096,
                steps=12,
                warm=3,
                compile_layers=True,
                check=False,
                gc_freeze=False,
            ),
        ),
        (
            "7b/chattune-8192",
            "chattune",
            dict(
                arch="qwen2.5-7b",
                budget=8192,
                steps=8,
                warm=2,
                check=False,
                compile_layers=True,
                checkpointing="off",
            ),
        ),
        (
            "7b/memory",
            "chattune",
            dict(
                arch="qwen2.5-7b",
                budget=4096,
                steps=3,
                warm=1,
                memory_mode=True,
                checkpointing="on",
                compile_layers=True,
                accumulate=4,
                check=False,
                chunk_rows=256,
            ),
        ),
        (
            "7b/memory-2048",
            "chattune",
            dict(
                arch="qwen2.5-7b",
                budget=2048,
                steps=3,
                warm=1,
                memory_mode=True,
                checkpointing="on",
                compile_layers=True,
                accumulate=8,
                check=False,
                chunk_rows=256,
            ),
        ),
        ("0.5b/tutorial", "seed", dict(arch="qwen2.5-0.5b", steps=10, warm=2)),
        (
            "0.5b/chattune",
            "chattune",
            dict(arch="qwen2.5-0.5b", budget=32768, steps=10, warm=3, compile_layers=True, profile=True),
        ),
        (
            "0.5b/chattune-65536",
            "chattune",
            dict(arch="qwen2.5-0.5b", budget=65536, steps=6, warm=2, compile_layers=True, check=False),
        ),
        ("1.5b/tutorial", "seed", dict(arch="qwen2.5-1.5b", steps=10, warm=2)),
        (
            "1.5b/chattune",
            "chattune",
            dict(arch="qwen2.5-1.5b", budget=16384, steps=10, warm=3, compile_layers=True),
        ),
        ("14b/tutorial", "seed", dict(arch="qwen2.5-14b", steps=6, warm=2)),
        (
            "14b/chattune",
            "chattune",
            dict(arch="qwen2.5-14b", budget=4096, steps=8, warm=3, compile_layers=True, check=False),
        ),
        (
            "7b/memory-eager",
            "chattune",
            dict(
                arch="qwen2.5-7b",
                budget=2048,
                steps=2,
                warm=1,
                memory_mode=True,
                checkpointing="on",
                accumulate=8,
                check=False,
                chunk_rows=256,
            ),
        ),
    ],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run with a toy config")
    ap.add_argument(
        "--plan", default=None, help=f"one of {sorted(PLANS)} (default: tiny on --tiny, else full)"
    )
    ap.add_argument("--only", default=None, help="comma-separated case names to run")
    ap.add_argument("--lengths", default=str(HERE / "lengths-disc.txt"))
    ap.add_argument(
        "--deadline", type=float, default=540.0, help="skip cases starting after this many seconds"
    )
    ap.add_argument("--out", default=None, help="also write results.json here")
    ap.add_argument("--trace-dir", default=None, help="write gzipped profiler traces of profiled cases here")
    a = ap.parse_args()
    global TRACE_DIR
    TRACE_DIR = Path(a.trace_dir) if a.trace_dir else None
    plan = PLANS[a.plan or ("tiny" if a.tiny else "full")]
    if a.only:
        keep = set(a.only.split(","))
        plan = [c for c in plan if c[0] in keep]

    import peft
    import transformers

    env = dict(
        device=torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu",
        torch=torch.__version__,
        transformers=transformers.__version__,
        peft=peft.__version__,
        date=time.strftime("%Y-%m-%d"),
        lengths=Path(a.lengths).name,
    )
    cpu = (
        [line for line in open("/proc/cpuinfo") if line.startswith("model name")]
        if os.path.exists("/proc/cpuinfo")
        else []
    )
    env["host_cpu"] = f"{cpu[0].split(':', 1)[1].strip()} x {len(cpu)}" if cpu else platform.processor()
    if DEVICE == "cuda":
        env["matmul_tflops_8192"] = round(measure_matmul())
        env["attn_for_packing"] = pick_attn_implementation("cuda", packing=True)
    log(f"env {json.dumps(env)}")
    results: dict = {"env": env, "cases": {}}
    # Only GPU runs replace the recorded bench/results.json; the CPU smoke run writes --out alone.
    paths = [HERE / "results.json"] if DEVICE == "cuda" else []
    paths += [Path(a.out) / "results.json"] if a.out else []

    for name, kind, kw in plan:
        if time.perf_counter() - T_START > a.deadline:
            results["cases"][name] = {"skipped": "deadline"}
            log(f"{name}: skipped (deadline)")
            continue
        log(f"{name}: start")
        try:
            if kind == "seed":
                res = run_seed(lengths_path=Path(a.lengths), **kw)
            else:
                res = run_chattune(lengths_path=Path(a.lengths), **kw)
        except Exception as exc:  # one failing case must not cost the others
            res = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
            free_memory()
        res["wall_s"] = round(time.perf_counter() - T_START, 1)
        results["cases"][name] = res
        log(f"{name}: {json.dumps(res)}")
        for p in paths:
            p.write_text(json.dumps(results, indent=1) + "\n")

    # Summary: the best chattune case per arch against the tutorial recipe of the same arch.
    print("\ncase                              tokens/s   MFU%   peak GiB   vs tutorial")
    cases = results["cases"]
    for name, res in cases.items():
        if "tokens_per_s" not in res:
            print(f"{name:32s}  {res.get('error', res.get('skipped', '?'))[:60]}")
            continue
        base = cases.get(name.split("/")[0] + "/tutorial", {}).get("tokens_per_s")
        ratio = f"{res['tokens_per_s'] / base:.2f}x" if base else "-"
        print(
            f"{name:32s} {res['tokens_per_s']:9d} {res['mfu_pct']:6.1f} {res.get('peak_gib') or 0:10.1f}   {ratio}"
        )


if __name__ == "__main__":
    main()
