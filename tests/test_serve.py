"""serve: the official openai client against a live server on 127.0.0.1; errors; load; several adapters."""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from test_infer import SYSTEM, make_adapter_dir

KEY = "sk-test-key"
HELLO = [{"role": "user", "content": "Hello there!"}]


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread(one_torch_thread):
    yield


@contextmanager
def serving(app) -> Iterator[str]:
    """Run `app` with uvicorn in a thread on a free port; yield its base URL; shut it down."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))  # bound before the server starts: no race for the port
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert thread.is_alive() and time.time() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
    assert not thread.is_alive()


def _post(url: str, body: bytes, key: str | None = KEY) -> tuple[int, dict]:
    """Raw HTTP (no proxy), for requests the openai client would refuse to send."""
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(urllib.request.Request(url, data=body, headers=headers), timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def adapter(tiny_model_dir, qwen_tokenizer, tmp_path_factory):
    return make_adapter_dir(tiny_model_dir, tmp_path_factory.mktemp("serve") / "adapter", qwen_tokenizer)


@pytest.fixture(scope="module")
def loaded(adapter):
    from chattune.infer.load import load_for_inference

    return load_for_inference(adapter, device="cpu")


@pytest.fixture(scope="module")
def server(loaded) -> Iterator[str]:
    from chattune.infer.serve import build_app

    with serving(build_app(loaded, api_key=KEY, max_queue=64, max_batch=8, default_max_tokens=8)) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=120)


def _expected(loaded, messages, k: int) -> str:
    from chattune.infer.generation import generate

    return generate(loaded, [messages], max_new_tokens=k)[0]


def test_completion_and_stream_with_the_openai_client(client, loaded):
    models = client.models.list()
    assert [m.id for m in models.data] == [loaded.name]

    r = client.chat.completions.create(model=loaded.name, messages=HELLO, max_tokens=6, temperature=0)
    want = _expected(loaded, HELLO, 6)  # with the stored system prompt, as chat and predict answer
    assert r.choices[0].message.content == want and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 6 and r.usage.prompt_tokens > 10 and r.model == loaded.name

    chunks = list(
        client.chat.completions.create(
            model=loaded.name,
            messages=HELLO,
            max_tokens=6,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 6

    # A system message in the request replaces the stored one; stop strings cut the answer.
    own = [{"role": "system", "content": "Other."}, *HELLO]
    r = client.chat.completions.create(model=loaded.name, messages=own, max_tokens=6, n=2)
    assert [c.message.content for c in r.choices] == [_expected(loaded, own, 6)] * 2
    stop = want[1:3]
    r = client.chat.completions.create(model=loaded.name, messages=HELLO, max_tokens=6, stop=stop)
    assert r.choices[0].message.content == want[: want.find(stop)] and r.choices[0].finish_reason == "stop"


def test_errors_are_openai_shaped_and_the_server_keeps_serving(server, client, loaded):
    import openai

    url = f"{server}/v1/chat/completions"
    ok = json.dumps({"model": loaded.name, "messages": HELLO, "max_tokens": 2}).encode()

    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0).models.list()
    assert _post(url, ok, key="wrong")[0] == 401
    assert _post(url, ok, key=None)[0] == 401

    status, body = _post(url, b'{"model": "x", "messages": [')
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    assert set(body["error"]) == {"message", "type", "param", "code"}
    status, body = _post(url, b'["not", "an", "object"]')
    assert status == 400 and "JSON object" in body["error"]["message"]
    status, body = _post(
        url, json.dumps({"model": loaded.name, "messages": HELLO, "max_tokens": "x"}).encode()
    )
    assert status == 400 and body["error"]["param"] == "max_tokens"
    # Features it cannot honour are refused rather than silently dropped from the answer.
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    with pytest.raises(openai.BadRequestError, match="tools"):
        client.chat.completions.create(model=loaded.name, messages=HELLO, max_tokens=2, tools=tools)
    with pytest.raises(openai.BadRequestError, match="logprobs"):
        client.chat.completions.create(model=loaded.name, messages=HELLO, max_tokens=2, logprobs=True)

    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=HELLO, max_tokens=2)
    assert e.value.status_code == 404 and "gpt-4o" in e.value.message

    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=loaded.name, messages=[], max_tokens=2)
    status, body = _post(url, json.dumps({"model": loaded.name, "messages": [{"role": "robot"}]}).encode())
    assert status == 400 and body["error"]["param"].startswith("messages")
    status, _ = _post(url, json.dumps({"model": loaded.name, "messages": HELLO, "temperature": -1}).encode())
    assert status == 400
    for extra, param in [
        ({"max_tokens": True}, "max_tokens"),  # not taken as 1
        ({"max_tokens": "5"}, "max_tokens"),  # nor as 5
        ({"stream": 1}, "stream"),
        ({"messages": [{"role": "user"}]}, "messages[0]"),  # an empty turn, as training refuses it
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),  # no `.str` in the path
    ]:
        status, body = _post(url, json.dumps({"model": loaded.name, "messages": HELLO, **extra}).encode())
        assert status == 400 and body["error"]["param"] == param, (extra, body)
    status, body = _post(url, b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}')
    assert status == 400 and "finite" in body["error"]["message"]

    long_text = "word " * 600  # the tiny model attends to 512 positions
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=loaded.name, messages=[{"role": "user", "content": long_text}])
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=loaded.name, messages=HELLO, max_tokens=10_000)

    assert _post(f"{server}/v1/nothing-here", b"{}")[0] == 404
    r = client.chat.completions.create(model=loaded.name, messages=HELLO, max_tokens=2)
    assert r.choices[0].message.content == _expected(loaded, HELLO, 2)  # still serving, still right


def test_fifty_concurrent_requests_all_complete(client, loaded, monkeypatch):
    import chattune.infer.serve

    batches: list[int] = []  # conversations per generate call (the worker thread calls it)
    real = chattune.infer.serve.generate_completions

    def counting(loaded, conversations, **kw):
        batches.append(len(conversations))
        return real(loaded, conversations, **kw)

    monkeypatch.setattr(chattune.infer.serve, "generate_completions", counting)
    questions = [[{"role": "user", "content": f"Question number {i}: {'why ' * i}?"}] for i in range(5)]
    want = [_expected(loaded, q, 4) for q in questions]

    def ask(i: int) -> str:
        kw = dict(model=loaded.name, messages=questions[i % 5], max_tokens=4)
        if i % 5 == 4:  # streams interleaved with plain requests
            return "".join(
                c.choices[0].delta.content or "" for c in client.chat.completions.create(**kw, stream=True)
            )
        return client.chat.completions.create(**kw).choices[0].message.content

    with concurrent.futures.ThreadPoolExecutor(max_workers=50) as pool:
        answers = list(pool.map(ask, range(50), timeout=120))
    # Batching (up to --max-batch) and queueing do not change greedy answers.
    assert answers == [want[i % 5] for i in range(50)]
    # 40 plain requests went through generate in shared calls, never more than --max-batch at once
    # (seen here: 9-11 calls of 1-8); the 10 streams ran one by one.
    assert sum(batches) == 40 and 1 < max(batches) <= 8


def test_client_leaving_a_stream_stops_its_generation(client, loaded, monkeypatch):
    """A client that closes a long stream must not keep the single worker generating for nobody."""
    generated: list[int] = []
    real = loaded.model.generate

    def recording(**kw):
        out = real(**kw)
        generated.append(out.shape[1] - kw["input_ids"].shape[1])
        return out

    monkeypatch.setattr(loaded.model, "generate", recording)
    stream = client.chat.completions.create(model=loaded.name, messages=HELLO, max_tokens=450, stream=True)
    pieces = 0
    for chunk in stream:
        pieces += bool(chunk.choices and chunk.choices[0].delta.content)
        if pieces == 2:
            break
    stream.close()
    deadline = time.monotonic() + 30
    while not generated:
        assert time.monotonic() < deadline, "generation went on after the client left"
        time.sleep(0.02)
    assert generated[0] < 450  # stopped at the next token (~0.1 s here), not after all 450 (~1.3 s)
    r = client.chat.completions.create(model=loaded.name, messages=HELLO, max_tokens=2)
    assert r.choices[0].message.content == _expected(loaded, HELLO, 2)  # and the worker serves again


def test_full_queue_answers_503(loaded):
    from chattune.infer.serve import _Job, build_app

    app = build_app(loaded, max_queue=1)
    with serving(app) as url:
        worker = app.state.worker
        worker.stop()  # hold the queue still so that it can be filled deterministically
        waiting = _Job(
            loaded,
            HELLO,
            dict(max_new_tokens=2, temperature=0.0, top_p=1.0, stop=None, n=1, seed=None),
            False,
        )
        worker.submit(waiting)
        body = json.dumps({"messages": HELLO, "max_tokens": 2}).encode()  # model may be left out: one served
        status, err = _post(f"{url}/v1/chat/completions", body, key=None)
        assert status == 503 and err["error"]["code"] == "overloaded"
        worker.start()
        assert waiting.future.result(timeout=60)[0].text == _expected(loaded, HELLO, 2)
        assert _post(f"{url}/v1/chat/completions", body, key=None)[0] == 200


def test_pages_of_other_sites_and_rebound_hosts_are_refused(loaded):
    """A web page cannot make a loopback `serve` generate (a text/plain POST needs no CORS preflight) nor
    read it through DNS rebinding; curl and the SDKs (no Origin, Host 127.0.0.1) are served as before."""
    from chattune.infer.serve import build_app
    from chattune.local_server import LOOPBACK

    body = json.dumps({"messages": HELLO, "max_tokens": 2}).encode()
    with serving(build_app(loaded, allowed_hosts=LOOPBACK)) as url:
        port = url.rsplit(":", 1)[1]
        post = f"POST /v1/chat/completions HTTP/1.1\nContent-Length: {len(body)}\nConnection: close\n"
        for head in [
            f"{post}Host: 127.0.0.1:{port}\nOrigin: http://evil.example\nContent-Type: text/plain\n",
            f"{post}Host: evil.example:{port}\nContent-Type: application/json\n",
            f"GET /v1/models HTTP/1.1\nHost: rebound.example:{port}\nConnection: close\n",
        ]:
            status, reply = _raw(url, head, body if head.startswith("POST") else b"")
            assert status == 403 and "error" in json.loads(reply), (head, reply)
        status, reply = _raw(url, f"{post}Host: 127.0.0.1:{port}\nContent-Type: application/json\n", body)
        assert status == 200 and json.loads(reply)["choices"][0]["message"]["content"] == _expected(
            loaded, HELLO, 2
        )
        same_site = f"{post}Host: localhost:{port}\nOrigin: http://localhost:{port}\n"
        assert _raw(url, same_site + "Content-Type: application/json\n", body)[0] == 200


def test_several_adapters_over_one_base(tiny_model_dir, qwen_tokenizer, tmp_path):
    from dataclasses import replace

    from openai import OpenAI
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from chattune.infer.generation import generate
    from chattune.infer.load import load_many_for_inference
    from chattune.infer.serve import build_app

    a = make_adapter_dir(tiny_model_dir, tmp_path / "alpha" / "adapter", qwen_tokenizer, seed=1)
    b = make_adapter_dir(
        tiny_model_dir, tmp_path / "beta" / "adapter", qwen_tokenizer, seed=2, system_prompt=None
    )
    both = load_many_for_inference([a, b], device="cpu")
    assert [m.name for m in both] == ["alpha", "beta"] and both[0].model is both[
        1
    ].model  # one base in memory
    assert both[0].system_prompt == SYSTEM and both[1].system_prompt is None
    want = {}
    for m, path in zip(both, [a, b], strict=True):  # each adapter alone over its own copy of the base
        alone = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), path).eval()
        want[m.name] = generate(replace(m, model=alone, adapter_name=None), [HELLO], max_new_tokens=5)[0]
    assert want["alpha"] != want["beta"]
    with serving(build_app(both)) as url:
        client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        for name in ["alpha", "beta", "alpha"]:  # switching back and forth
            r = client.chat.completions.create(model=name, messages=HELLO, max_tokens=5)
            assert r.choices[0].message.content == want[name]


def test_vllm_command(adapter, tiny_model_dir, tmp_path):
    from chattune.errors import ChattuneError
    from chattune.infer.serve_vllm import build_vllm_command

    cmd = build_vllm_command([adapter], "127.0.0.1", 8001)
    assert cmd[:3] == ["vllm", "serve", str(tiny_model_dir.resolve())]
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1" and cmd[cmd.index("--port") + 1] == "8001"
    assert f"{adapter.parent.name}={adapter}" in cmd and "--enable-lora" in cmd
    assert cmd[cmd.index("--max-lora-rank") + 1] == "8" and "--chat-template" not in cmd

    # vLLM's default --max-lora-rank (16) refuses the tutorials' r=64: the limit follows the adapter.
    def with_rank(r: int, **extra) -> Path:
        copy = tmp_path / f"r{r}-{len(extra)}" / "adapter"
        shutil.copytree(adapter, copy)
        cfg = json.loads((copy / "adapter_config.json").read_text())
        (copy / "adapter_config.json").write_text(json.dumps({**cfg, "r": r, **extra}))
        return copy

    def rank_limit(cmd: list[str]) -> str:
        return cmd[cmd.index("--max-lora-rank") + 1]

    assert rank_limit(build_vllm_command([with_rank(64)], "127.0.0.1", 8001)) == "64"
    assert rank_limit(build_vllm_command([with_rank(100)], "127.0.0.1", 8001)) == "128"
    larger = with_rank(16, rank_pattern={"q_proj": 64})  # some modules with a larger rank
    both = build_vllm_command([adapter, larger], "127.0.0.1", 8001, chat_template="t.jinja")
    assert rank_limit(both) == "64" and both[both.index("--max-loras") + 1] == "2"
    assert both[both.index("--chat-template") + 1] == "t.jinja"
    with pytest.raises(ChattuneError, match="rank 1024"):
        build_vllm_command([with_rank(1024)], "127.0.0.1", 8001)


TRICKY = 'He said "hi", it\'s {{ not jinja }} %} \\ 甄嬛\nline two 🙂'


@pytest.mark.parametrize("system", [SYSTEM, TRICKY], ids=["plain", "quotes-braces-newline-emoji"])
def test_vllm_chat_template_applies_the_stored_system_prompt(system, qwen_tokenizer):
    """vLLM renders the template itself: the wrapped template must give exactly build_prompt's text."""
    from chattune.infer.serve_vllm import build_vllm_chat_template
    from chattune.render.template import build_generation_prompt

    template = build_vllm_chat_template(qwen_tokenizer.chat_template, system)

    def render(messages: list[dict]) -> str:
        return qwen_tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=True
        )

    assert render(HELLO) == build_generation_prompt(qwen_tokenizer, HELLO, system)
    own = [{"role": "system", "content": "Mine."}, *HELLO]  # the request's own system prompt wins
    assert render(own) == build_generation_prompt(qwen_tokenizer, own, system)
    assert build_vllm_chat_template(qwen_tokenizer.chat_template, None) == qwen_tokenizer.chat_template


def test_vllm_engine_through_the_cli(adapter, tiny_model_dir, qwen_tokenizer, tmp_path, monkeypatch, capsys):
    """`chattune serve --engine vllm` with stand-ins for the vllm package and executable (no CUDA here):
    what vLLM would be started with, the key kept off its command line, the template file it reads."""
    import importlib.util

    from chattune.cli.parser import main
    from chattune.render.template import build_generation_prompt

    if importlib.util.find_spec("vllm") is None:
        assert main(["serve", str(adapter), "--engine", "vllm"]) == 2
        assert "vllm is not installed" in capsys.readouterr().err
        (tmp_path / "site" / "vllm").mkdir(parents=True)
        (tmp_path / "site" / "vllm" / "__init__.py").write_text("")
        monkeypatch.syspath_prepend(str(tmp_path / "site"))
    record = tmp_path / "vllm-call.json"
    fake = tmp_path / "bin" / "vllm"
    fake.parent.mkdir()
    fake.write_text(
        f"#!{sys.executable}\n"
        "import json, os, sys\n"
        "args = sys.argv[1:]\n"
        "template = open(args[args.index('--chat-template') + 1], encoding='utf-8').read()\n"
        f"json.dump(dict(args=args, template=template, key=os.environ.get('VLLM_API_KEY')), open({str(record)!r}, 'w'))\n"
    )
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(SystemExit) as done:
        main(["serve", str(adapter), "--engine", "vllm", "--port", "8002", "--api-key", KEY])
    assert done.value.code == 0
    call = json.loads(record.read_text())
    assert call["key"] == KEY and KEY not in call["args"]
    assert call["args"][:2] == ["serve", str(tiny_model_dir.resolve())]
    assert (
        f"{adapter.parent.name}={adapter}" in call["args"]
        and call["args"][call["args"].index("--port") + 1] == "8002"
    )
    rendered = qwen_tokenizer.apply_chat_template(
        HELLO, chat_template=call["template"], tokenize=False, add_generation_prompt=True
    )
    assert rendered == build_generation_prompt(qwen_tokenizer, HELLO, SYSTEM)
    assert not list(Path(tempfile.gettempdir()).glob("chattune-vllm-*"))  # the template file is cleaned up


# -- hardening: client mistakes are 4xx, internals stay in the log, bounded bodies, a free event loop ------
def _raw(url: str, head: str, body: bytes = b"", read: bool = True, timeout: float = 10) -> tuple[int, bytes]:
    """Send raw bytes (a request the HTTP libraries would not send); return (status, response body)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(head.replace("\n", "\r\n").encode() + b"\r\n" + body)
        if not read:
            return 0, b""
        data = b""
        while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _length(data):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    status = int(data.split(b" ", 2)[1])
    return status, data.split(b"\r\n\r\n", 1)[1]


def _length(data: bytes) -> int:
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":")[1])
    return 0


def _health_time(url: str) -> float:
    start = time.perf_counter()
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"{url}/health", timeout=10) as r:
        assert r.status == 200
    return time.perf_counter() - start


def test_oversized_bodies_get_413_at_once_and_health_keeps_answering(loaded):
    from chattune.infer.serve import build_app

    with serving(build_app(loaded, max_body_bytes=1 << 20)) as url:
        # 10 MB declared: refused from the headers, before the body is read
        head = "POST /v1/chat/completions HTTP/1.1\nHost: x\nContent-Type: application/json\n"
        start = time.perf_counter()
        status, body = _raw(url, head + f"Content-Length: {10 << 20}\n", b'{"messages": "' + b"x" * 65536)
        assert status == 413 and "larger than" in json.loads(body)["error"]["message"]
        assert time.perf_counter() - start < 5 and _health_time(url) < 2
        # no length declared (chunked): refused once more than the limit has arrived
        chunk = b"x" * (256 << 10)
        chunks = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(5))
        status, body = _raw(url, head + "Transfer-Encoding: chunked\n", chunks)
        assert status == 413
        # under the limit, a normal answer
        ok = json.dumps({"messages": HELLO, "max_tokens": 2}).encode()
        assert _post(f"{url}/v1/chat/completions", ok, key=None)[0] == 200


def test_health_answers_while_a_request_is_being_prepared(loaded, monkeypatch):
    """Rendering and counting a large prompt take seconds; they must not hold the event loop."""
    import chattune.infer.serve
    from chattune.infer.serve import build_app

    app = build_app(loaded)
    release = threading.Event()
    real = chattune.infer.serve.count_tokens

    def slow_count(loaded, prompt):
        release.wait(timeout=20)  # held until /health has answered (or the test gives up)
        return real(loaded, prompt)

    monkeypatch.setattr(chattune.infer.serve, "count_tokens", slow_count)
    with serving(app) as url:
        body = json.dumps({"messages": HELLO, "max_tokens": 2}).encode()
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pending = pool.submit(_post, f"{url}/v1/chat/completions", body, None)
            time.sleep(0.3)  # the request is now inside count_tokens
            try:
                assert _health_time(url) < 5
            finally:
                release.set()
            assert pending.result(timeout=60)[0] == 200


def test_a_500_names_no_internals_and_the_log_has_them(loaded, monkeypatch, caplog):
    import logging

    import chattune.infer.serve
    from chattune.infer.serve import build_app

    def broken(*a, **k):
        raise RuntimeError("CUDA error at /opt/secret/kernel.cu:42")

    monkeypatch.setattr(chattune.infer.serve, "generate_completions", broken)
    monkeypatch.setattr(chattune.infer.serve, "stream_events", broken)
    with caplog.at_level(logging.ERROR, logger="chattune.infer.serve"), serving(build_app(loaded)) as url:
        body = json.dumps({"messages": HELLO, "max_tokens": 2}).encode()
        status, err = _post(f"{url}/v1/chat/completions", body, key=None)
        assert status == 500 and "secret" not in json.dumps(err) and "reference" in err["error"]["message"]
        stream = json.dumps({"messages": HELLO, "max_tokens": 2, "stream": True}).encode()
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        req = urllib.request.Request(f"{url}/v1/chat/completions", data=stream)
        with opener.open(req, timeout=30) as r:
            text = r.read().decode()
        assert '"error"' in text and "secret" not in text
    assert any("secret" in (r.exc_text or "") for r in caplog.records)


def test_client_leaving_a_plain_request_stops_its_generation(server, loaded, monkeypatch):
    """A non-streamed request whose client has gone must not keep the single worker generating."""
    from chattune.infer.generation import generate_completions

    assert (
        generate_completions(loaded, [HELLO], max_new_tokens=450)[0].completion_tokens == 450
    )  # no early stop
    generated: list[int] = []
    real = loaded.model.generate

    def recording(**kw):
        out = real(**kw)
        generated.append(out.shape[1] - kw["input_ids"].shape[1])
        return out

    monkeypatch.setattr(loaded.model, "generate", recording)
    body = json.dumps({"model": loaded.name, "messages": HELLO, "max_tokens": 450}).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\nHost: x\nAuthorization: Bearer {KEY}\n"
        f"Content-Type: application/json\nContent-Length: {len(body)}\n"
    )
    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as s:
        s.sendall(head.replace("\n", "\r\n").encode() + b"\r\n" + body)
        time.sleep(0.3)  # generating now
    deadline = time.monotonic() + 30
    while not generated:
        assert time.monotonic() < deadline, "generation went on after the client left"
        time.sleep(0.02)
    assert generated[0] < 450
    assert (
        _post(f"{server}/v1/chat/completions", json.dumps({"messages": HELLO, "max_tokens": 2}).encode())[0]
        == 200
    )
