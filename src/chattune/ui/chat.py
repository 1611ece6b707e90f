"""The Chat tab: a finished run's adapter and its base model answering side by side, streamed.

Both answers go through `infer.stream_events` with the adapter's template and system prompt (as in
training); the base answers from the same loaded weights with the adapter switched off (peft's
`disable_adapter`), so one model is held per adapter. One generation at a time per model.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path

_LOADED: dict[str, tuple] = {}  # adapter folder -> (Loaded, its lock, its system prompts)
_LOADING = threading.Lock()


def load_adapter(adapter_dir: Path) -> tuple:
    """(Loaded, lock, system prompts) of the adapter, loaded once on `device: auto`. Whoever uses the
    model or its tokenizer holds the lock: a fast tokenizer used by two threads at once fails
    ("Already borrowed")."""
    key = str(adapter_dir.resolve())
    with _LOADING:
        if key not in _LOADED:
            # Every heavy import under this lock: transformers' lazy modules, imported from two threads
            # at once, can fail ("cannot import name 'AutoModel'").
            import chattune.infer.generation  # noqa: F401
            from chattune.infer.load import load_for_inference
            from chattune.render.template import template_default_system

            loaded = load_for_inference(adapter_dir)
            prompts = {
                "system": loaded.system_prompt,
                "template_default": template_default_system(loaded.tokenizer),
            }
            _LOADED[key] = (loaded, threading.Lock(), prompts)
    return _LOADED[key]


def system_prompts(adapter_dir: Path) -> dict:
    """The system prompt the adapter was trained with, and the template's default (shown when the data
    had none, as the template then puts it first)."""
    return load_adapter(adapter_dir)[2]


def stream_answer(
    adapter_dir: Path, messages: list[dict], *, base: bool, max_new_tokens: int
) -> Iterator[dict]:
    """Events {"text": piece}... then {"done": finish_reason, "tokens": n}, of the fine-tune (`base`
    False) or of its base model. Raises ChattuneError for a malformed conversation."""
    loaded, lock, _ = load_adapter(adapter_dir)  # first: it does the heavy imports, one thread at a time
    from chattune.infer.generation import Completion, build_prompt, default_sampling, stream_events

    temperature, top_p = default_sampling(loaded)
    with lock:
        build_prompt(loaded, messages)  # a bad conversation is refused before anything streams
        switch = getattr(loaded.model, "disable_adapter", None)
        with switch() if base and switch else nullcontext():
            events = stream_events(
                loaded, messages, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p
            )
            try:
                for event in events:
                    if isinstance(event, Completion):
                        yield {"done": event.finish_reason, "tokens": event.completion_tokens}
                    else:
                        yield {"text": event}
            finally:
                events.close()
