"""`chattune serve` as users run it: the real command in a subprocess on 127.0.0.1, the official openai client.

test_serve.py drives the ASGI app in a thread; this file checks what only the command adds: argument
parsing, loading an adapter folder from disk, uvicorn's startup and shutdown, --api-key.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_infer import SYSTEM, make_adapter_dir

KEY = "sk-cli-key"
HELLO = [{"role": "user", "content": "Hello there!"}]
START_TIMEOUT_S = 120  # importing torch and loading the tiny model takes ~5 s; a loaded 2-core CI box more


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread(one_torch_thread):
    yield


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, key: str | None = None, timeout_s: float = 10) -> tuple[int, dict]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback, never a proxy
    try:
        with opener.open(urllib.request.Request(url, headers=headers), timeout=timeout_s) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _stop(proc: subprocess.Popen) -> int:
    """SIGTERM (uvicorn's graceful shutdown), then SIGKILL if it hangs; always reaps the process."""
    if proc.poll() is None:
        proc.terminate()
        try:
            return proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait(timeout=30)


@pytest.fixture(scope="module")
def adapter(tiny_model_dir, qwen_tokenizer, tmp_path_factory) -> Path:
    return make_adapter_dir(
        tiny_model_dir, tmp_path_factory.mktemp("cli") / "run" / "adapter", qwen_tokenizer
    )


@pytest.fixture(scope="module")
def cli_server(adapter, tmp_path_factory) -> Iterator[tuple[str, subprocess.Popen, Path]]:
    """`python -m chattune.cli serve ADAPTER --port P --api-key KEY` on 127.0.0.1 until the module ends."""
    port = _free_port()
    log = tmp_path_factory.mktemp("cli-log") / "serve.log"
    cmd = [sys.executable, "-m", "chattune", "serve", str(adapter), "--port", str(port)]
    cmd += ["--api-key", KEY, "--device", "cpu", "--max-batch", "4"]
    env = {k: v for k, v in os.environ.items() if k != "CHATTUNE_API_KEY"}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")  # tiny model: threads only spin (see test_serve)
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert proc.poll() is None, f"chattune serve exited ({proc.returncode}):\n{log.read_text()}"
            assert time.monotonic() < deadline, f"no /health in {START_TIMEOUT_S} s:\n{log.read_text()}"
            try:
                if _get(f"{url}/health", timeout_s=2)[0] == 200:
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.2)
        yield url, proc, log
    finally:
        _stop(proc)


@pytest.fixture(scope="module")
def loaded(adapter):
    from chattune.infer.load import load_for_inference

    return load_for_inference(adapter, device="cpu")


def test_the_command_answers_the_openai_client_with_the_stored_system_prompt(
    cli_server, loaded, qwen_tokenizer
):
    from openai import OpenAI

    from chattune.infer.generation import generate
    from chattune.render.template import build_generation_prompt

    url, _, _ = cli_server
    client = OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60)
    assert [m.id for m in client.models.list().data] == ["run"]  # named after the run folder

    r = client.chat.completions.create(model="run", messages=HELLO, max_tokens=6, temperature=0)
    want = generate(loaded, [HELLO], max_new_tokens=6)[0]  # in-process, with the stored system prompt
    assert r.choices[0].message.content == want and r.choices[0].finish_reason == "length"
    # The stored system prompt was applied: the prompt the server counted is exactly that one.
    stored = build_generation_prompt(qwen_tokenizer, HELLO, SYSTEM)
    assert SYSTEM in stored
    assert r.usage.prompt_tokens == len(qwen_tokenizer(stored, add_special_tokens=False)["input_ids"])
    explicit = client.chat.completions.create(
        model="run", messages=[{"role": "system", "content": SYSTEM}, *HELLO], max_tokens=6
    )
    other = client.chat.completions.create(
        model="run",
        messages=[{"role": "system", "content": "Something else entirely."}, *HELLO],
        max_tokens=6,
    )
    assert explicit.choices[0].message.content == want and explicit.usage == r.usage
    assert other.usage.prompt_tokens != r.usage.prompt_tokens

    chunks = list(
        client.chat.completions.create(
            model="run",
            messages=HELLO,
            max_tokens=6,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 6


def test_the_command_requires_its_api_key(cli_server):
    import openai

    url, proc, _ = cli_server
    with pytest.raises(openai.AuthenticationError) as e:
        openai.OpenAI(
            base_url=f"{url}/v1", api_key="sk-wrong", max_retries=0, timeout=30
        ).chat.completions.create(model="run", messages=HELLO, max_tokens=2)
    assert e.value.status_code == 401 and e.value.code == "invalid_api_key"
    assert _get(f"{url}/v1/models")[0] == 401  # no key at all
    assert _get(f"{url}/v1/models", key=KEY)[0] == 200
    assert _get(f"{url}/health")[0] == 200  # liveness probes need no key
    assert proc.poll() is None


def test_sigterm_shuts_the_command_down_cleanly(cli_server):
    """Last in this module: it stops the shared server."""
    _, proc, log = cli_server
    # uvicorn shuts down gracefully, then re-raises the signal so the exit status says how it ended.
    assert _stop(proc) in (0, -signal.SIGTERM), log.read_text()
    text = log.read_text()
    assert "Traceback" not in text and "Application shutdown complete" in text


def test_bad_arguments_are_one_line_errors(tmp_path, capsys, adapter):
    import importlib.util

    from chattune.cli.parser import main

    assert main(["serve", str(tmp_path / "missing")]) == 2
    assert "missing' does not exist" in capsys.readouterr().err
    if importlib.util.find_spec("vllm") is None:
        assert main(["serve", str(adapter), "--engine", "vllm"]) == 2
        assert "vllm is not installed" in capsys.readouterr().err


def test_serve_arguments_reach_the_server(monkeypatch):
    """Loopback by default; the key may come from CHATTUNE_API_KEY (kept out of `ps` and shell history)."""
    import chattune.infer.serve
    from chattune.cli.parser import main

    calls = []
    monkeypatch.setattr(chattune.infer.serve, "run_server", lambda paths, **kw: calls.append((paths, kw)))
    monkeypatch.setenv("CHATTUNE_API_KEY", "sk-from-env")
    assert main(["serve", "a/adapter", "b/adapter", "--max-queue", "3"]) == 0
    paths, kw = calls[-1]
    assert paths == ["a/adapter", "b/adapter"] and kw["host"] == "127.0.0.1" and kw["port"] == 8000
    assert kw["api_key"] == "sk-from-env" and kw["max_queue"] == 3 and kw["engine"] == "transformers"
    assert main(["serve", "a", "--api-key", "sk-flag", "--host", "0.0.0.0"]) == 0
    assert calls[-1][1]["api_key"] == "sk-flag" and calls[-1][1]["host"] == "0.0.0.0"
