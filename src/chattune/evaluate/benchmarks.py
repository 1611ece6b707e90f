"""Benchmark accuracy: does the fine-tune still know what it knew? (`chattune bench`, `eval.benchmarks`)

Benchmark (benchmark_readers) --build_prompt--> the model's own chat template, ending where the answer
letter would start --one forward per batch--> log p(letter | prompt) for each choice's letter --argmax-->
predicted letter -> accuracy per subject, per category and overall (0..100). `choice` scoring compares
each choice's text instead (one forward per choice; see `score_benchmark`).

The prompt is LLaMA-Factory's `llamafactory-cli eval` prompt (its `en` / `zh` eval templates): the
instruction line ("以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。" / "The following are
multiple choice questions (with answers) about {subject}.") opens the first user turn; each of the k dev
examples is a user turn (question, "\\nA. ...", "\\n答案：" / "\\nAnswer:") and an assistant turn holding
its letter; the question scored is the last user turn, then the template's generation prompt. Like
LLaMA-Factory, the letters are compared by the logit of their own token ("A", no leading space: the
assistant turn starts the line) at the prompt's last position. Differences: the k examples are the first
k of the dev file (C-Eval's and MMLU's own scripts do the same; LLaMA-Factory draws k at random for each
question), the model's stored system prompt is used as in `chattune eval`, and category and overall
accuracy pool the questions (LLaMA-Factory's way; `macro_accuracy` is the mean over subjects, as C-Eval's
and CMMLU's leaderboards average). lm-evaluation-harness scores the same letters, but as " A" after
"Answer:" in raw text (no chat template) by default.
"""

from __future__ import annotations

from chattune.errors import ChattuneError
from chattune.evaluate.benchmark_readers import LETTERS, Benchmark, Question, Subject, read_benchmark

PROMPTS = {
    "zh": ("以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。\n\n", "\n答案："),
    "en": ("The following are multiple choice questions (with answers) about {subject}.\n\n", "\nAnswer:"),
}


def format_question(q: Question, lang: str) -> str:
    """ "question\\nA. ...\\nB. ...\\n答案：" (or "\\nAnswer:"): one user turn, without the instruction line."""
    choices = "".join(f"\n{LETTERS[i]}. {c}" for i, c in enumerate(q.choices))
    return q.question + choices + PROMPTS[lang][1]


def build_messages(subject: Subject, q: Question, lang: str) -> list[dict]:
    """The conversation whose generation prompt is scored: k shots as user/assistant turns, then `q`."""
    msgs: list[dict] = []
    for shot in subject.shots:
        msgs += [
            {"role": "user", "content": format_question(shot, lang)},
            {"role": "assistant", "content": shot.answer_letter},
        ]
    msgs.append({"role": "user", "content": format_question(q, lang)})
    msgs[0] = {"role": "user", "content": PROMPTS[lang][0].format(subject=subject.title) + msgs[0]["content"]}
    return msgs


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _last_logits(model, rows: list[list[int]], pad_id: int, *, keep: int):
    """Logits (B, keep, V) of the last `keep` positions of token-id rows left-padded to one length, so
    every row ends at the same position; positions count real tokens only (as in generation)."""
    import torch

    device = next(model.parameters()).device
    width = max(len(r) for r in rows)
    input_ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows], device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    return model(
        input_ids=input_ids,
        attention_mask=mask,
        position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
        logits_to_keep=keep,
    ).logits


def letter_ids(tokenizer, n: int) -> list[int]:
    """The token id of each of the first `n` letters, as the answer's first token. Raises ChattuneError
    when the tokenizer needs several tokens for a letter (it could not be scored by one logit)."""
    ids = []
    for letter in LETTERS[:n]:
        enc = tokenizer.encode(letter, add_special_tokens=False)
        if len(enc) != 1:
            raise ChattuneError(f"the tokenizer splits the letter {letter!r} into {len(enc)} tokens")
        ids.append(enc[0])
    return ids


def score_letters(
    loaded, prompts: list[str], n_choices: list[int], *, batch_size: int = 8, desc: str = ""
) -> list:
    """log p(letter | prompt) (log-softmax over the whole vocabulary) of each prompt's choice letters.

    Prompts are rendered text (special tokens included), batched longest first with left padding, so
    every row's last position is its prompt's last token; positions count real tokens only. One forward
    per batch that keeps only the last position's logits. Returns one list of `n_choices[i]` floats per
    prompt, in prompt order. Progress lines (questions done / total, rate, time left) when `desc` is given.
    """
    import torch

    from chattune.console import ProgressLines

    if batch_size < 1:
        raise ChattuneError(f"batch_size must be at least 1, got {batch_size}")
    tok, model = loaded.tokenizer, loaded.model
    if loaded.adapter_name is not None:
        model.set_adapter(loaded.adapter_name)
    ids = letter_ids(tok, max(n_choices, default=0))
    encoded = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    too_long = [ids for ids in encoded if loaded.max_context and len(ids) > loaded.max_context]
    if too_long:
        raise ChattuneError(
            f"a prompt of {len(too_long[0])} tokens is longer than the model's context "
            f"({loaded.max_context}); use fewer --shots"
        )
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    out: dict[int, list[float]] = {}
    was_training = model.training
    model.eval()
    bar = ProgressLines(len(prompts), desc, enabled=bool(desc))
    try:
        with torch.no_grad():
            for start in range(0, len(order), batch_size):
                chunk = order[start : start + batch_size]
                logits = _last_logits(model, [encoded[i] for i in chunk], _pad_id(tok), keep=1)[:, -1, :]
                logp = torch.log_softmax(logits.float(), dim=-1)[:, ids].tolist()
                for row, i in enumerate(chunk):
                    out[i] = logp[row][: n_choices[i]]
                bar.update(len(chunk))
    finally:
        bar.close()
        model.train(was_training)
    return [out[i] for i in range(len(prompts))]


def score_choices(
    loaded, prompts: list[str], choices: list[list[str]], *, batch_size: int = 8, desc: str = ""
) -> list:
    """Mean log-likelihood per character of each choice's text as the answer to its prompt: for prompt
    i and choice j, sum log p(choice tokens | prompt) / len(choice j) (lm-evaluation-harness's
    `acc_norm`). Returns one list of floats per prompt, in prompt order.

    Each batch of prompts runs once (left-padded, keeping its KV cache); the cache is then repeated for
    every choice and only the choices' tokens run (right-padded after the prompt): a prompt's tokens are
    computed once instead of once per choice.
    """
    import torch

    from chattune.console import ProgressLines
    from chattune.infer.graph_decode import cache_argument

    if batch_size < 1:
        raise ChattuneError(f"batch_size must be at least 1, got {batch_size}")
    tok, model = loaded.tokenizer, loaded.model
    if loaded.adapter_name is not None:
        model.set_adapter(loaded.adapter_name)
    pad = _pad_id(tok)
    ctx = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    conts = [
        [tok(c, add_special_tokens=False)["input_ids"] or [tok.eos_token_id] for c in cs] for cs in choices
    ]
    order = sorted(range(len(prompts)), key=lambda i: -len(ctx[i]))
    out: dict[int, list[float]] = {}
    was_training = model.training
    model.eval()
    bar = ProgressLines(len(prompts), desc, enabled=bool(desc))
    try:
        with torch.no_grad():
            for start in range(0, len(order), batch_size):
                chunk = order[start : start + batch_size]
                first, cache, mask = _prompt_pass(model, [ctx[i] for i in chunk], pad)
                n = max(len(conts[i]) for i in chunk)  # choices per prompt; missing ones are dummies
                rows = [conts[i][j] if j < len(conts[i]) else [pad] for i in chunk for j in range(n)]
                width = max(len(r) for r in rows)
                cache.batch_repeat_interleave(n)
                cont_ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=mask.device)
                cont_mask = torch.tensor(
                    [[1] * len(r) + [0] * (width - len(r)) for r in rows], device=mask.device
                )
                start_pos = mask.sum(-1).repeat_interleave(n)[:, None]
                logits = model(
                    input_ids=cont_ids,
                    attention_mask=torch.cat([mask.repeat_interleave(n, 0), cont_mask], dim=-1),
                    position_ids=start_pos + torch.arange(width, device=mask.device),
                    use_cache=False,
                    **{cache_argument(model): cache},
                ).logits.float()  # (B*n, width, V): position t predicts choice token t + 1
                # Choice token 0 is predicted by the prompt's last position, token t by choice position t-1.
                pred = torch.cat([first.repeat_interleave(n, 0)[:, None], logits[:, :-1]], dim=1)
                logp = pred.gather(-1, cont_ids[..., None])[..., 0] - pred.logsumexp(-1)
                sums = (logp * cont_mask).sum(-1).tolist()
                for b, i in enumerate(chunk):
                    out[i] = [sums[b * n + j] / max(len(choices[i][j]), 1) for j in range(len(conts[i]))]
                bar.update(len(chunk))
    finally:
        bar.close()
        model.train(was_training)
    return [out[i] for i in range(len(prompts))]


def _prompt_pass(model, rows: list[list[int]], pad_id: int):
    """Left-padded prompts through the model once: (last position's logits (B, V) in float32, the KV
    cache, the attention mask (B, P))."""
    import torch

    device = next(model.parameters()).device
    width = max(len(r) for r in rows)
    input_ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows], device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    out = model(
        input_ids=input_ids,
        attention_mask=mask,
        position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
        use_cache=True,
        logits_to_keep=1,
    )
    cache = getattr(out, "cache", None) or out.past_key_values  # renamed in transformers 5.24
    return out.logits[:, -1].float(), cache, mask


SCORINGS = ("letter", "choice")


def build_prompt_text(loaded, subject: Subject, q: Question, lang: str, scoring: str) -> str:
    """The rendered prompt scored for `q`: the chat template's generation prompt (stored system prompt)."""
    from chattune.render.template import build_generation_prompt

    msgs = build_messages(subject, q, lang) if scoring == "letter" else build_cloze_messages(subject, q, lang)
    return build_generation_prompt(loaded.tokenizer, msgs, loaded.system_prompt)


def build_cloze_messages(subject: Subject, q: Question, lang: str) -> list[dict]:
    """`choice` scoring: the question alone (no lettered list), each shot answered by its choice's text."""
    msgs: list[dict] = []
    for shot in subject.shots:
        msgs += [
            {"role": "user", "content": shot.question + PROMPTS[lang][1]},
            {"role": "assistant", "content": shot.choices[shot.answer]},
        ]
    msgs.append({"role": "user", "content": q.question + PROMPTS[lang][1]})
    msgs[0] = {"role": "user", "content": PROMPTS[lang][0].format(subject=subject.title) + msgs[0]["content"]}
    return msgs


def score_benchmark(
    loaded, bench: Benchmark, *, batch_size: int = 8, scoring: str = "letter", progress: bool = True
) -> tuple[dict, list]:
    """Answer every question of `bench`; returns (summary, rows). Summary: accuracy, macro_accuracy,
    questions, correct, and the same per category and per subject (accuracy 0..100). Rows: one per
    question: subject, where (file:line), answer, prediction, correct, scores by letter.

    `scoring`: `letter` (log p of each choice's letter, the standard for these benchmarks) or `choice`
    (mean log-likelihood per character of each choice's text, the "cloze" form small models are
    reported with: a 135M model picks letters almost at random but can tell Paris from Berlin)."""
    if scoring not in SCORINGS:
        raise ChattuneError(f"scoring '{scoring}': use one of {', '.join(SCORINGS)}")
    items = [(s, q) for s in bench.subjects for q in s.questions]
    prompts = [build_prompt_text(loaded, s, q, bench.lang, scoring) for s, q in items]
    desc = f"bench {bench.task}" if progress else ""
    if scoring == "letter":
        n = [len(q.choices) for _, q in items]
        scores = score_letters(loaded, prompts, n, batch_size=batch_size, desc=desc)
    else:
        scores = score_choices(
            loaded, prompts, [list(q.choices) for _, q in items], batch_size=batch_size, desc=desc
        )
    rows = []
    for (s, q), lp in zip(items, scores, strict=True):
        pred = max(range(len(lp)), key=lp.__getitem__)
        rows.append(
            {
                "subject": s.name,
                "where": q.where,
                "answer": q.answer_letter,
                "prediction": LETTERS[pred],
                "correct": pred == q.answer,
                "scores": {LETTERS[i]: round(v, 4) for i, v in enumerate(lp)},
            }
        )
    summary = summarize(bench, rows)
    summary["scoring"] = scoring
    return summary, rows


def _acc(rows: list[dict]) -> dict:
    n, c = len(rows), sum(r["correct"] for r in rows)
    return {"questions": n, "correct": c, "accuracy": 100.0 * c / n if n else None}


def summarize(bench: Benchmark, rows: list[dict]) -> dict:
    """Accuracy (0..100) overall, per category (questions pooled) and per subject, from scored rows."""
    by_subject = {s.name: [r for r in rows if r["subject"] == s.name] for s in bench.subjects}
    subjects = {
        s.name: {"title": s.title, "categories": list(s.categories), **_acc(by_subject[s.name])}
        for s in bench.subjects
    }
    categories: dict[str, list[dict]] = {}
    for s in bench.subjects:
        for cat in s.categories:
            categories.setdefault(cat, []).extend(by_subject[s.name])
    accs = [v["accuracy"] for v in subjects.values() if v["accuracy"] is not None]
    return {
        "task": bench.task,
        "split": bench.split,
        "shots": bench.shots,
        "data": bench.path,
        **_acc(rows),
        "macro_accuracy": sum(accs) / len(accs) if accs else None,
        "categories": {c: _acc(rs) for c, rs in sorted(categories.items())},
        "subjects": subjects,
    }


def format_bench_table(summary: dict, name: str) -> str:
    """One benchmark's summary as aligned text: overall, then categories, then subjects."""
    head = (
        f"bench {summary['task']} ({summary['split']} split, {summary['shots']}-shot, {summary['scoring']} "
        f"scoring) of {name}: "
        f"{summary['questions']} questions, accuracy {summary['accuracy']:.2f} "
        f"(mean over subjects {summary['macro_accuracy']:.2f})"
    )
    lines = [head]
    for title, group in (("category", summary["categories"]), ("subject", summary["subjects"])):
        if not group:
            continue
        width = max(len(title), *(len(k) for k in group))
        lines.append(f"  {title:<{width}}  {'questions':>9}  {'accuracy':>8}")
        lines += [f"  {k:<{width}}  {v['questions']:>9}  {v['accuracy']:>8.2f}" for k, v in group.items()]
    return "\n".join(lines)


# ---- during training (eval.benchmarks) ---------------------------------------------------------------


def bench_key(name: str) -> str:
    """The tracker / metrics.jsonl key of a benchmark's overall accuracy."""
    return f"bench/{name}/accuracy"


def read_benchmark_configs(cfgs) -> list[tuple[object, Benchmark]]:
    """Each `eval.benchmarks` entry with its questions, read before the run directory is made (a bad
    file stops the run before anything is written). Raises DataError / ChattuneError naming the entry."""
    out = []
    for i, c in enumerate(cfgs):
        try:
            bench = read_benchmark(
                c.task,
                c.data,
                split=c.split,
                subjects=c.subjects or None,
                shots=c.shots,
                max_questions=c.max_questions,
                dev=c.dev,
            )
        except ChattuneError as e:
            raise ChattuneError(f"eval.benchmarks[{i}]: {e}") from None
        out.append((c, bench))
    return out


def benchmarks_due(prepared: list, tag: str, step: int, total_steps: int) -> list:
    """The benchmarks to score at this evaluation: all before training and at the end, and those with
    `per_epoch` after every epoch (never at `train.eval_steps`)."""
    if tag == "baseline" or (tag.startswith("epoch") and step >= total_steps):
        return list(prepared)
    return [(c, b) for c, b in prepared if tag.startswith("epoch") and c.per_epoch]


def score_benchmarks(loaded, prepared: list, *, batch_size: int) -> dict[str, float]:
    """{bench/<name>/accuracy: 0..100} for each (config, Benchmark); no progress bar (the trainer's runs)."""
    row = {}
    for c, bench in prepared:
        summary, _ = score_benchmark(loaded, bench, batch_size=batch_size, scoring=c.scoring, progress=False)
        row[bench_key(c.name or c.task)] = summary["accuracy"]
    return row


def knowledge_kept(eval_rows: list[dict]) -> list[dict]:
    """Before and after for every `bench/...` key of a run's evaluations (rows with `tag`, sorted by step):
    {key, before (the baseline's), after (the last evaluation that scored it), tag (of that one)}."""
    keys = list(dict.fromkeys(k for r in eval_rows for k in r if k.startswith("bench/")))
    out = []
    for key in keys:
        scored = [r for r in eval_rows if isinstance(r.get(key), int | float)]
        before = next((r[key] for r in scored if r.get("tag") == "baseline"), None)
        last = next((r for r in reversed(scored) if r.get("tag") != "baseline"), None)
        out.append(
            {
                "key": key,
                "before": before,
                "after": last[key] if last else None,
                "tag": last.get("tag") if last else None,
            }
        )
    return out
