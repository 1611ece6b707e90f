"""`chattune serve --engine vllm`: the same adapters behind vLLM's own OpenAI-compatible server.

adapter folders --build_vllm_command--> `vllm serve BASE --enable-lora --max-lora-rank R --lora-modules
name=dir ... --chat-template T`, where T is the adapter's template with its stored system prompt built
in (vLLM would not apply it), and R the smallest rank limit vLLM accepts that fits every adapter.
"""

from __future__ import annotations

import json
from pathlib import Path

from chattune.console import say
from chattune.errors import ChattuneError

_VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # the values vLLM accepts for --max-lora-rank


def build_vllm_chat_template(template: str, system_prompt: str | None) -> str:
    """The adapter's chat template, with its stored system prompt as the default (vLLM applies none).

    A `set` before the template prepends the system message when a request has none, as `build_prompt`
    does; json.dumps gives a string literal that Jinja reads back exactly (quotes, newlines, any script).
    """
    if not system_prompt:
        return template
    literal = json.dumps(system_prompt, ensure_ascii=False)
    return (
        "{%- if not messages or messages[0]['role'] != 'system' %}"
        f"{{%- set messages = [{{'role': 'system', 'content': {literal}}}] + messages %}}"
        "{%- endif %}\n" + template
    )


def build_vllm_command(
    paths: list[str | Path], host: str, port: int, chat_template: str | Path | None = None
) -> list[str]:
    """`vllm serve` over the same base and adapters, under the names `chattune serve` gives them."""
    from chattune.infer.load import read_model_source

    sources = [read_model_source(p) for p in paths]
    bases = {s.base_dir for s in sources}
    if len(bases) != 1:
        raise ChattuneError("--engine vllm serves adapters over one base model; these use several")
    base = bases.pop()
    plain = [s for s in sources if s.adapter_dir is None]
    name = plain[0].name if plain else base.name
    cmd = ["vllm", "serve", str(base), "--served-model-name", name, "--host", host, "--port", str(port)]
    adapters = [s for s in sources if s.adapter_dir is not None]
    if adapters:
        ranks = []
        for s in adapters:
            cfg = json.loads((s.adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
            r = [cfg.get("r"), *(cfg.get("rank_pattern") or {}).values()]  # per-module ranks may be larger
            if not all(isinstance(x, int) for x in r):
                raise ChattuneError(f"{s.adapter_dir / 'adapter_config.json'}: no integer LoRA rank 'r'")
            ranks.append(max(r))
        # vLLM refuses adapters above --max-lora-rank, which defaults to 16 (a rank-64 adapter fails).
        rank = next((r for r in _VLLM_LORA_RANKS if r >= max(ranks)), None)
        if rank is None:
            raise ChattuneError(f"--engine vllm: LoRA rank {max(ranks)} is above vLLM's limit of 512")
        cmd += ["--enable-lora", "--max-lora-rank", str(rank), "--max-loras", str(len(adapters))]
        cmd += ["--lora-modules", *(f"{s.name}={s.adapter_dir}" for s in adapters)]
    if chat_template is not None:
        cmd += ["--chat-template", str(chat_template)]
    return cmd


def run_vllm(paths: list[str | Path], host: str, port: int, api_key: str | None) -> None:
    import importlib.util
    import os
    import subprocess
    import tempfile

    from chattune.infer.load import load_source_tokenizer, read_model_source

    if importlib.util.find_spec("vllm") is None:
        raise ChattuneError(
            "--engine vllm: vllm is not installed (pip install vllm, on a CUDA machine), "
            "or use the default --engine transformers"
        )
    adapters = [s for s in map(read_model_source, paths) if s.adapter_dir is not None]
    template = None
    if adapters:  # the template the adapter was trained with, which vLLM would otherwise take from the base
        template = load_source_tokenizer(adapters[0], for_generation=False).chat_template
        prompts = {s.system_prompt for s in adapters}
        if len(prompts) == 1 and isinstance(template, str):
            template = build_vllm_chat_template(template, prompts.pop())
        elif prompts != {None}:  # they differ, and vLLM takes one chat template for every model
            say(
                "warning: vLLM will not apply these adapters' stored system prompts; send one in each request"
            )
    env = {**os.environ, **({"VLLM_API_KEY": api_key} if api_key else {})}  # not on the command line (ps)
    with tempfile.TemporaryDirectory(prefix="chattune-vllm-") as tmp:
        path = None
        if isinstance(template, str):
            path = Path(tmp) / "chat_template.jinja"
            path.write_text(template, encoding="utf-8")
        raise SystemExit(subprocess.call(build_vllm_command(paths, host, port, path), env=env))
