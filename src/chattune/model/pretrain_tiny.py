"""A short full-parameter warm-up that turns the random built-in model into a Chinese babbler.

Only `models.materialize_builtin` calls this, once per machine. Without it the tiny model's
logits are nearly uniform over 151,665 tokens and no LoRA on top of it can move them, so the
demo's loss would not fall. The corpus is the bundled LLaMA-Factory alpaca_zh_demo set rendered
with the real Qwen2.5 chat template. The softmax runs over the few thousand token ids that the
bundled text uses (our own code, not a library: a full-vocabulary softmax would cost ~20x more on
two CPU cores). Every other id gets an all-zero embedding row (the head is tied), so its logit is
exactly 0 for any input; the loss adds those N ids as one extra logit log(N), which makes the
warm-up's loss the exact full-vocabulary cross-entropy at the cost of the subset alone.
"""

from __future__ import annotations

import json
import math
import random
from importlib import resources

WARMUP_STEPS = 300


WARMUP_BATCH = 16


WARMUP_MAX_LEN = 128


WARMUP_LR = 3e-3


def _texts(tokenizer) -> tuple[list[list[int]], list[int]]:
    """Token ids of the warm-up corpus, and the vocabulary subset to train the softmax over."""
    assets = resources.files("chattune") / "assets" / "data"
    alpaca = json.loads((assets / "alpaca-zh-demo" / "alpaca_zh_demo.json").read_text(encoding="utf-8"))
    huanhuan = json.loads((assets / "huanhuan-demo" / "huanhuan_demo.json").read_text(encoding="utf-8"))
    docs = []
    for rec in alpaca:
        user = "\n".join(x for x in (rec["instruction"], rec.get("input", "")) if x)
        msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": rec["output"]}]
        ids = tokenizer.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"]
        docs.append(list(ids)[:WARMUP_MAX_LEN])
    vocab = {t for d in docs for t in d}
    # The demo's own words are in the softmax too (as candidates, never as targets here), so that
    # the LoRA fine-tune can learn to say them.
    for rec in huanhuan:
        vocab.update(tokenizer(rec["instruction"] + rec["output"], add_special_tokens=False)["input_ids"])
    vocab.update(tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>", "<|endoftext|>"]))
    return docs, sorted(vocab)


def pretrain_tiny(model, tokenizer, *, steps: int = WARMUP_STEPS, seed: int = 0) -> float:
    """Train all parameters of `model` in place for `steps` steps; returns the last loss."""
    import torch
    import torch.nn.functional as F

    docs, vocab = _texts(tokenizer)
    vocab_t = torch.tensor(vocab)
    remap = torch.full((model.config.vocab_size,), -100, dtype=torch.long)
    remap[vocab_t] = torch.arange(len(vocab))
    rng = random.Random(seed)
    with torch.no_grad():  # unused ids: a zero row, so a logit of exactly 0 whatever the hidden state
        keep = torch.zeros(model.config.vocab_size, dtype=torch.bool)
        keep[vocab_t] = True
        model.get_input_embeddings().weight[~keep] = 0.0
    rest_logit = math.log(model.config.vocab_size - len(vocab))  # N ids at logit 0 = one logit log(N)
    opt = torch.optim.AdamW(model.parameters(), lr=WARMUP_LR, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=WARMUP_LR, total_steps=steps, pct_start=0.1)
    pad = tokenizer.pad_token_id
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        batch = rng.sample(docs, WARMUP_BATCH)
        width = max(len(d) for d in batch)
        ids = torch.tensor([d + [pad] * (width - len(d)) for d in batch])
        mask = torch.tensor([[1] * len(d) + [0] * (width - len(d)) for d in batch])
        hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1]
        targets = remap[ids[:, 1:]].masked_fill(mask[:, 1:] == 0, -100)
        logits = hidden @ model.get_output_embeddings().weight[vocab_t].T  # (B, T-1, |vocab|)
        logits = torch.cat([logits, logits.new_full((*logits.shape[:2], 1), rest_logit)], dim=-1)
        loss = F.cross_entropy(
            logits.reshape(-1, len(vocab) + 1).float(), targets.reshape(-1), ignore_index=-100
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    return float(loss)
