"""OpenAI-compatible HTTP server over loaded adapters (several adapters over one base, served by name).

client --POST /v1/chat/completions--> checks (401/400/404/413 in OpenAI's error shape) --bounded queue (503
when full)--> one generation worker thread, which batches compatible requests --> JSON, or SSE chunks.
Prompts go through `infer.build_prompt`, so the adapter's template and system prompt apply as in training.
A client's mistake is a 4xx with a short message; a 500 says only that the server failed (the details go
to the server's log). The body is bounded, and parsing, rendering and token counting run in a thread, so
the event loop (and `/health`) answers while a large request is read or prepared. A client that leaves
stops its generation at the next token, streamed or not.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import queue
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from chattune.console import say
from chattune.errors import ChattuneError
from chattune.infer.generation import (
    Completion,
    count_tokens,
    generate_completions,
    stream_events,
)
from chattune.infer.load import Loaded
from chattune.infer.requests import (
    MAX_BODY_BYTES,
    APIError,
    ReasoningSplitter,
    answer_message,
    check_api_key,
    prepare_request,
)
from chattune.local_server import LOOPBACK, check_port_free, cross_site_refusal

logger = logging.getLogger(__name__)


# -- the generation worker ------------------------------------------------------------------------------
@dataclass
class _Job:
    loaded: Loaded
    messages: list[dict]
    params: dict[str, Any]  # generate_completions keyword arguments
    stream: bool
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    push: Any = None  # stream: called (thread-safely) with each event, then with None at the end
    cancelled: threading.Event = field(default_factory=threading.Event)

    def batch_key(self) -> tuple | None:
        """Jobs with equal keys can share one `generate` call; seeded or streamed jobs run alone."""
        if self.stream or self.params["seed"] is not None:
            return None
        p = self.params
        return (
            id(self.loaded),
            p["max_new_tokens"],
            p["temperature"],
            p["top_p"],
            tuple(p["stop"] or ()),
            p["n"],
        )


class GenerationWorker:
    """One thread owns the model: requests wait in a bounded queue and compatible ones run as a batch."""

    def __init__(self, max_queue: int = 64, max_batch: int = 8):
        self.queue: queue.Queue[_Job] = queue.Queue(maxsize=max_queue)
        self.max_batch = max_batch
        self._held: deque[_Job] = deque()  # taken from the queue while batching but not compatible
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="chattune-serve-worker", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def submit(self, job: _Job) -> None:
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            raise APIError(
                503, "the server is busy (request queue full); retry shortly", code="overloaded"
            ) from None

    def _next_batch(self) -> list[_Job]:
        first = self._held.popleft() if self._held else self.queue.get(timeout=0.2)
        batch = [first]
        key = first.batch_key()
        while key is not None and len(batch) < self.max_batch:
            try:
                job = self.queue.get_nowait()
            except queue.Empty:
                break
            if job.batch_key() != key:
                self._held.append(job)  # runs next, so arrival order is kept
                break
            batch.append(job)
        return batch

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                batch = self._next_batch()
            except queue.Empty:
                continue
            if batch[0].stream:
                self._stream(batch[0])
                continue
            batch = [j for j in batch if j.future.set_running_or_notify_cancel()]  # drop abandoned requests
            if not batch:
                continue
            try:
                done = generate_completions(
                    batch[0].loaded,
                    [j.messages for j in batch],
                    **batch[0].params,
                    cancelled=[j.cancelled for j in batch],  # a client that left stops its rows
                )
            except Exception as e:  # handed to each request; the worker keeps serving
                for j in batch:
                    j.future.set_exception(e)
                continue
            n = batch[0].params["n"]
            for i, j in enumerate(batch):
                j.future.set_result(done[i * n : (i + 1) * n])
        held, self._held = [*self._held, *_drain(self.queue)], deque()
        for job in held:  # shutting down: nobody will answer these
            if job.stream:
                job.push(APIError(503, "the server is shutting down"))
                job.push(None)
            elif job.future.set_running_or_notify_cancel():
                job.future.set_exception(APIError(503, "the server is shutting down"))

    def _stream(self, job: _Job) -> None:
        if job.cancelled.is_set():  # the client left while the request waited in the queue
            job.push(None)
            return
        params = {k: v for k, v in job.params.items() if k != "n"}
        events = None
        try:  # whatever fails is reported in this stream; the worker thread keeps serving
            events = stream_events(job.loaded, job.messages, **params)
            for event in events:
                if job.cancelled.is_set():  # the client went away: stop generating for it
                    break
                job.push(event)
        except Exception as e:
            job.push(e)
        finally:
            if events is not None:
                events.close()
            job.push(None)


def _drain(q: queue.Queue) -> list:
    items = []
    while True:
        try:
            items.append(q.get_nowait())
        except queue.Empty:
            return items


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, or 413 as soon as it is known to exceed `limit` bytes (declared or received)."""
    declared = request.headers.get("content-length", "")
    too_large = APIError(
        413, f"the request body is larger than this server accepts ({limit} bytes)", code="request_too_large"
    )
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
    except ClientDisconnect:  # it left (a short body, a bad chunk, a closed connection): nothing to answer
        client = f"{request.client.host}:{request.client.port}" if request.client else "a client"
        logger.info("%s left before its request body was read whole (%d bytes received)", client, size)
        raise APIError(499, "the client closed the request") from None
    return b"".join(chunks)


def build_app(
    models: Loaded | list[Loaded],
    *,
    api_key: str | None = None,
    max_queue: int = 64,
    max_batch: int = 8,
    default_max_tokens: int = 512,
    max_body_bytes: int = MAX_BODY_BYTES,
    allowed_hosts: tuple[str, ...] = (),
) -> FastAPI:
    """The ASGI app; the generation worker runs while the app is being served (its lifespan).

    `max_body_bytes`: larger request bodies are refused with 413 before they are read whole.
    `allowed_hosts`: Host names served (`run_server` gives `LOOPBACK` when bound to loopback; empty: any);
    another site's page posting here is refused (403) either way (`local_server.cross_site_refusal`)."""
    by_name = {m.name: m for m in (models if isinstance(models, list) else [models])}
    for m in by_name.values():  # settle the tokenizer's padding settings before two threads use it
        count_tokens(m, "")
    worker = GenerationWorker(max_queue=max_queue, max_batch=max_batch)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        worker.start()
        yield
        worker.stop()

    app = FastAPI(title="chattune", lifespan=lifespan)
    app.state.worker = worker

    app.add_middleware(_CrossSiteGuard, allowed_hosts=allowed_hosts)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(StarletteHTTPException)  # unknown routes, wrong methods: same error shape
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return APIError(exc.status_code, str(exc.detail)).response()

    @app.exception_handler(Exception)  # a bug in one request: a JSON 500, and the server keeps serving
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
        return _internal(exc).response()

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "models": list(by_name), "queued": worker.queue.qsize()}

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict:
        check_api_key(request, api_key)
        data = [{"id": n, "object": "model", "created": created, "owned_by": "chattune"} for n in by_name]
        return {"object": "list", "data": data}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        check_api_key(request, api_key)
        body = await _read_body(request, max_body_bytes)
        loaded, messages, prompt_tokens, params, req = await asyncio.to_thread(
            prepare_request, body, by_name, default_max_tokens
        )
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": loaded.name}
        job = _Job(loaded, messages, params, stream=req.stream)
        if req.stream:
            include_usage = bool((req.stream_options or {}).get("include_usage"))
            return _stream_response(job, worker, meta, include_usage)
        worker.submit(job)
        waiting = asyncio.wrap_future(job.future)
        while not (await asyncio.wait({waiting}, timeout=0.1))[0]:
            if await request.is_disconnected():  # nobody will read the answer: stop generating it
                job.cancelled.set()
                job.future.cancel()  # not started yet: the worker skips it
                raise APIError(499, "the client closed the request")
        try:
            done: list[Completion] = waiting.result()
        except ChattuneError as e:
            raise APIError(400, str(e)[:300]) from None
        choices = [
            {
                "index": i,
                "message": answer_message(c.text),  # reasoning apart, as vLLM and SGLang return it
                "logprobs": None,
                "finish_reason": c.finish_reason,
            }
            for i, c in enumerate(done)
        ]
        used = sum(c.completion_tokens for c in done)
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": used,
            "total_tokens": prompt_tokens + used,
        }
        return {**meta, "object": "chat.completion", "choices": choices, "usage": usage}

    return app


class _CrossSiteGuard:
    """`local_server.cross_site_refusal` as plain ASGI middleware: a 403 before the app sees the request.
    (Not `@app.middleware("http")`: Starlette's BaseHTTPMiddleware hides a client's disconnect from the
    endpoint, and a client that leaves must stop its generation.)"""

    def __init__(self, app: Any, allowed_hosts: tuple[str, ...]):
        self.app, self.allowed_hosts = app, allowed_hosts

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
            refusal = cross_site_refusal(
                scope["method"], headers.get("host"), headers.get("origin"), self.allowed_hosts
            )
            if refusal:
                await APIError(403, refusal).response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _stream_response(
    job: _Job, worker: GenerationWorker, meta: dict, include_usage: bool
) -> StreamingResponse:
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()

    def push(event: Any) -> None:
        try:
            loop.call_soon_threadsafe(events.put_nowait, event)
        except RuntimeError:  # the event loop is closed: the server is gone
            job.cancelled.set()

    job.push = push
    worker.submit(job)  # raises 503 before any byte of the stream is sent

    def chunk(delta: dict, finish: str | None = None, **extra: Any) -> str:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        body = {**meta, "object": "chat.completion.chunk", "choices": [choice], **extra}
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    async def body() -> AsyncIterator[str]:
        splitter = ReasoningSplitter()  # reasoning apart, as in the whole answer (`answer_message`)
        try:
            yield chunk({"role": "assistant", "content": ""})
            while (event := await events.get()) is not None:
                if isinstance(event, str):
                    for delta in splitter.feed(event):
                        yield chunk(delta)
                elif isinstance(event, Completion):
                    for delta in splitter.finish():
                        yield chunk(delta)
                    yield chunk({}, event.finish_reason)
                    if include_usage:
                        used = event.completion_tokens
                        usage = {
                            "prompt_tokens": event.prompt_tokens,
                            "completion_tokens": used,
                            "total_tokens": event.prompt_tokens + used,
                        }
                        body = {**meta, "object": "chat.completion.chunk", "choices": [], "usage": usage}
                        yield f"data: {json.dumps(body)}\n\n"
                else:  # an exception from the worker: headers are sent, so report it in the stream
                    error = event if isinstance(event, APIError) else _internal(event)
                    err = {
                        "message": error.message,
                        "type": "server_error",
                        "param": None,
                        "code": error.status,
                    }
                    yield f"data: {json.dumps({'error': err})}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            job.cancelled.set()  # client disconnected or stream done: the worker stops at the next token

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


# -- running it -----------------------------------------------------------------------------------------
def run_server(
    path_or_paths: str | Path | list[str | Path],
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    *,
    engine: str = "transformers",
    device: str = "auto",
    dtype: str = "auto",
    max_queue: int = 64,
    max_batch: int = 8,
    default_max_tokens: int = 512,
    log_level: str = "info",
    max_body_bytes: int = MAX_BODY_BYTES,
    trust_remote_code: bool = False,
) -> None:
    """Load the model(s) and serve until interrupted (the `chattune serve` command)."""
    import uvicorn

    from chattune.infer.load import load_for_inference, load_many_for_inference

    # Checked before the model loads: a bad number would otherwise surface after minutes, or never
    # (a queue of size 0 is unbounded).
    for flag, value, low, high in [
        ("--port", port, 0, 65535),
        ("--max-queue", max_queue, 1, 1_000_000),
        ("--max-batch", max_batch, 1, 1024),
        ("default max tokens", default_max_tokens, 1, 2**31 - 1),
        ("the body limit in bytes (--max-body-mb)", max_body_bytes, 1, 2**40),
    ]:
        if not low <= value <= high:
            raise ChattuneError(f"{flag} must be in [{low}, {high}], got {value}")
    check_port_free(host, port)  # before the model loads: minutes later is too late to hear it
    paths = path_or_paths if isinstance(path_or_paths, list) else [path_or_paths]
    if engine == "vllm":
        from chattune.infer.serve_vllm import run_vllm

        return run_vllm(paths, host, port, api_key)
    if engine != "transformers":
        raise ChattuneError(f"--engine {engine}: use transformers (default) or vllm")
    if host not in LOOPBACK and not api_key:
        say(f"warning: serving on {host} without --api-key: anyone who can reach it can use it")
    if len(paths) == 1:
        models: Loaded | list[Loaded] = load_for_inference(
            paths[0], device=device, dtype=dtype, trust_remote_code=trust_remote_code
        )
    else:
        models = load_many_for_inference(
            paths, device=device, dtype=dtype, trust_remote_code=trust_remote_code
        )
    app = build_app(
        models,
        api_key=api_key,
        max_queue=max_queue,
        max_batch=max_batch,
        default_max_tokens=default_max_tokens,
        max_body_bytes=max_body_bytes,
        allowed_hosts=LOOPBACK if host in LOOPBACK else (),
    )
    uvicorn.run(app, host=host, port=port, log_level=log_level)


def _internal(exc: BaseException) -> APIError:
    """A server-side failure: logged with its traceback under an id; the client gets only the id."""
    ref = uuid.uuid4().hex[:12]
    logger.error("internal error %s", ref, exc_info=(type(exc), exc, exc.__traceback__))
    return APIError(500, f"internal server error (reference {ref}; the server log has the details)")
