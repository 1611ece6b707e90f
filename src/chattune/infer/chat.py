"""Interactive multi-turn chat in the terminal, each answer streamed as it is generated.

lines from `input_fn` --> a command (/reset, /system TEXT, /help, /exit) or a user turn
   --> infer.stream (the adapter's chat template and system prompt, as in training) --> `output`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TextIO

from chattune.infer.generation import default_sampling, stream
from chattune.infer.load import Loaded

HELP = (
    "commands: /reset forgets the conversation; /system TEXT sets the system prompt (/system alone shows it); "
    "/exit quits (or Ctrl-D). Ctrl-C stops an answer."
)


def run_chat(
    loaded: Loaded,
    *,
    input_fn: Callable[[str], str] = input,
    output: TextIO | None = None,
    system_prompt: str | None = None,
    max_new_tokens: int = 512,
    temperature: float | None = None,
    top_p: float | None = None,
    stop: list[str] | None = None,
) -> list[dict]:
    """Chat until /exit or end of input; return the conversation as it stands then (for tests and logs).

    `system_prompt` defaults to the adapter's stored one; temperature/top_p to the model's
    generation_config.json (greedy when it does not sample). `output` defaults to the current sys.stdout.
    """
    out = output if output is not None else sys.stdout  # looked up now: stdout may have been redirected
    system = system_prompt if system_prompt is not None else loaded.system_prompt
    default_t, default_p = default_sampling(loaded)
    sampling = dict(
        max_new_tokens=max_new_tokens,
        temperature=default_t if temperature is None else temperature,
        top_p=default_p if top_p is None else top_p,
        stop=stop,
    )
    history: list[dict] = []

    def say(text: str) -> None:
        out.write(text + "\n")
        out.flush()

    from chattune.render.template import template_default_system

    template_system = template_default_system(loaded.tokenizer)

    def describe(system: str | None) -> str:
        if system:
            return f"(system prompt: {system})"
        if template_system:
            return f"(no system prompt set: the chat template puts its default first: {template_system})"
        return "(no system prompt)"

    say(f"chatting with {loaded.name}. {HELP}")
    if system or template_system:
        say(describe(system))
    while True:
        try:
            line = input_fn(">>> ")
        except (EOFError, KeyboardInterrupt):
            say("")
            break
        except (
            UnicodeDecodeError
        ):  # bytes that are not UTF-8 (a terminal in another encoding, a binary paste)
            say("(that line is not valid UTF-8 text; type it again)")
            continue
        text = line.strip()
        if any("\ud800" <= c <= "\udfff" for c in text):  # stdin read with surrogateescape (a C locale)
            say("(that line is not valid UTF-8 text; type it again)")
            continue
        if not text:
            continue
        if text.startswith("/"):
            command, _, arg = text.partition(" ")
            if command in ("/exit", "/quit"):
                break
            if command == "/reset":
                history.clear()
                say("(conversation cleared)")
            elif command == "/system" and arg.strip():
                system = arg.strip()  # applies from the next answer on; /reset to start afresh with it
                say(describe(system))
            elif command == "/system":
                say(describe(system))
            else:
                say(HELP if command == "/help" else f"unknown command {command}. {HELP}")
            continue
        history.append({"role": "user", "content": text})
        # An explicit system message, so that /system wins over the stored prompt build_prompt would add.
        messages = ([{"role": "system", "content": system}] if system else []) + history
        answer = ""
        try:
            for piece in stream(loaded, messages, **sampling):
                out.write(piece)
                out.flush()
                answer += piece
        except KeyboardInterrupt:  # stop this answer (stream's cleanup stops the generation), keep chatting
            out.write(" [stopped]")
        say("")
        history.append({"role": "assistant", "content": answer})
    return history
