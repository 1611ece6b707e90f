"""Pre-flight before every training run and `chattune data check`: a sample of conversations rendered our way
and through `tokenizer.apply_chat_template` must give the same ids, answers must join the template, and the
end-of-turn token must be one the model's generation config stops on; else training is refused.
"""

from __future__ import annotations

import json
from pathlib import Path

from chattune.render.examples import encode, label_ids
from chattune.render.template import (
    TemplateError,
    label_spans,
    layout,
    template_facts,
    template_kwargs,
)


def check_parity(tokenizer, conversations, *, sample: int = 32, train_on: str = "all_assistant") -> None:
    """Pre-flight: for a sample spread over the data, the training path must give the ids of
    `tokenizer.apply_chat_template(messages, **data.template_kwargs)`, labels equal to those found from
    this conversation's own whole-conversation rendering (no cached shape) and, where the template renders
    prefix by prefix (Qwen2.5, SmolLM2, ERNIE), equal to those found prefix by prefix too; and every
    trained assistant turn its end-of-turn token labeled. Refuse to train otherwise."""
    facts = template_facts(tokenizer)
    step = max(1, len(conversations) // max(sample, 1))
    picked = conversations[::step][:sample]
    for conv, out in zip(
        picked, encode(tokenizer, [c.messages for c in picked], train_on=train_on), strict=True
    ):
        ref = tokenizer.apply_chat_template(
            conv.messages, tokenize=True, return_dict=True, **template_kwargs(tokenizer)
        )["input_ids"]
        if list(ref) != out.input_ids:
            k = next(
                (i for i, (a, b) in enumerate(zip(ref, out.input_ids, strict=False)) if a != b),
                min(len(ref), len(out.input_ids)),
            )
            raise TemplateError(
                f"{conv.where}: rendered ids differ from tokenizer.apply_chat_template's from token {k} "
                f"({tokenizer.decode(out.input_ids[k : k + 8])!r} vs {tokenizer.decode(list(ref)[k : k + 8])!r})"
            )
        ways = [lambda m: layout(tokenizer, m, cached=False)]  # the independent, slower ways
        ways.append(lambda m: label_spans(tokenizer, m, eot=facts.eot))
        for k, way in enumerate(ways):
            try:
                text, spans = way(conv.messages)
            except TemplateError:
                if k == 0:
                    raise
                continue  # a template that renders history differently has no prefix-by-prefix labels
            enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            want = label_ids(
                enc["input_ids"], enc["offset_mapping"], spans[-1:] if train_on == "last_assistant" else spans
            )
            if want != out.labels:
                how = ("from its own rendering", "prefix by prefix")[k]
                raise TemplateError(f"{conv.where}: assistant labels differ from those found {how}")
        n_turns = 1 if train_on == "last_assistant" else sum(m["role"] == "assistant" for m in conv.messages)
        if sum(1 for label in out.labels if label == facts.eot_id) < n_turns:
            raise TemplateError(
                f"{conv.where}: an assistant turn's end-of-turn token {facts.eot!r} is not labeled"
            )


# -- pre-flight -------------------------------------------------------------------------------------------
def _generation_eos_ids(model_dir: Path) -> list[int] | None:
    """The ids the model's generation config stops on (generation_config.json, else config.json)."""
    for name in ("generation_config.json", "config.json"):
        path = Path(model_dir) / name
        if path.is_file():
            try:
                eos = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
            except (OSError, ValueError):
                continue
            if eos is not None:
                return eos if isinstance(eos, list) else [eos]
    return None


def _answer_joins_template(tokenizer, messages: list[dict], train_on: str) -> bool:
    """Does a trained answer's first token start inside the template text before it (e.g. ' 家' after
    'Assistant:')? Such a token is trained (it carries the answer), but generation sees another one."""
    from bisect import bisect_right

    text, spans = layout(tokenizer, messages)
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    ends = [b for _, b in offsets]
    for start, _ in spans[-1:] if train_on == "last_assistant" else spans:
        j = bisect_right(ends, start)
        if j < len(offsets) and offsets[j][0] < start:
            return True
    return False


def preflight(
    tokenizer, conversations, *, model_dir=None, train_on: str = "all_assistant", sample: int = 32
) -> list[str]:
    """Refuse (TemplateError) when the training path and `apply_chat_template` disagree on a sample or
    an end-of-turn token goes unlabeled; return warnings for settings that deserve a look."""
    from chattune.render.template import template_facts

    check_parity(tokenizer, conversations, sample=sample, train_on=train_on)
    facts = template_facts(tokenizer)
    warnings = []
    # A pad token equal to the end-of-turn token (SmolLM2) needs no warning: chattune masks padding by
    # position, so every answer's stop token is still trained; nothing for the user to act on.
    eos_ids = _generation_eos_ids(model_dir) if model_dir else None
    if eos_ids is not None and facts.eot_id not in eos_ids:
        warnings.append(
            f"the model's generation config stops on token ids {eos_ids}, not on the trained end-of-turn "
            f"token {facts.eot!r} (id {facts.eot_id}): transformers' generate and vLLM would run past the "
            "answers (chattune's chat/predict/serve stop on it); add it to eos_token_id in generation_config.json"
        )
    step = max(1, len(conversations) // max(sample, 1))
    picked = conversations[::step][:sample]
    merged = sum(_answer_joins_template(tokenizer, c.messages, train_on) for c in picked)
    if merged:
        warnings.append(
            f"in {merged} of {len(picked)} sampled conversations the first trained token also holds template "
            "text (the generation prompt ends with whitespace that the tokenizer joins to the answer): at "
            "generation time the prompt is tokenised differently than in training"
        )
    placeholders = sum(
        any("{{name}}" in m["content"] or "{{author}}" in m["content"] for m in c.messages)
        for c in conversations
    )
    if placeholders:
        warnings.append(
            f"{placeholders} conversations contain LLaMA-Factory placeholders {{{{name}}}}/{{{{author}}}}: use "
            "data.converter: identity with data.identity_name and data.identity_author"
        )
    return warnings


def require_examples(report, dc) -> None:
    """Refuse data whose every conversation was dropped at rendering (`train` and `data check` alike),
    saying how many and why in words, and what to change. `report`: a `templates.RenderReport`."""
    if report.examples:
        return
    from chattune.errors import DataError

    dropped = sum(report.dropped.values())
    reasons = "; ".join(f"{n} {reason}" for reason, n in report.dropped.most_common())
    sources = dc.train_path if isinstance(dc.train_path, str) else ", ".join(dc.train_path)
    raise DataError(
        sources,
        None,
        f"no example left to train on: all {dropped} conversations were dropped ({reasons}); raise "
        f"data.max_len (now {dc.max_len}) or choose another data.truncation (now {dc.truncation})",
    )
