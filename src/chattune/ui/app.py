"""The `chattune ui` web app (FastAPI): the page, its JSON API and the live run stream.

browser --GET /--> static page (every asset from the package: no CDN, font or analytics)
        --/api/schema, /api/config/check--> the form from the config dataclasses, checked by the config
        --POST /api/runs--> launch.start_run --> `chattune train` process --> run directory
        <--/api/runs/{id}/events (server-sent events, live.py)-- what the run directory gains
Bad requests get 4xx with {"error", "field"}; nothing outside the runs directory is served.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import re
import time
import uuid
from pathlib import Path

import yaml
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles

from chattune.console import say
from chattune.errors import ChattuneError, ConfigError
from chattune.files import atomic_path
from chattune.local_server import LOOPBACK, check_port_free, cross_site_refusal
from chattune.ui import launch, runs, schema
from chattune.ui.live import event_stream, first_or_error, sse_pieces

STATIC = Path(__file__).parent / "static"
MAX_BODY_BYTES = 2 * 2**20  # an uploaded YAML or a chat: far below this
CSP = (
    "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)
UPLOAD_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")  # what data.train_path reads as a file
UPLOAD_NAME = re.compile(r"[\w\u4e00-\u9fff][\w\u4e00-\u9fff .+-]{0,150}")  # a plain file name, CJK allowed
MAX_UPLOAD_BYTES = 1024 * 2**20
logger = logging.getLogger("chattune.ui")


class HTTPProblem(Exception):
    def __init__(self, status: int, message: str, field: str | None = None):
        super().__init__(message)
        self.status, self.message, self.field = status, message, field


def _problem(status: int, message: str, field: str | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "field": field}, status_code=status)


async def _json_body(request: Request) -> dict:
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
        raise HTTPProblem(415, "send the request body as JSON (Content-Type: application/json)")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise HTTPProblem(413, f"the request body is larger than {MAX_BODY_BYTES} bytes")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise HTTPProblem(413, f"the request body is larger than {MAX_BODY_BYTES} bytes")
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        raise HTTPProblem(400, "the request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise HTTPProblem(400, "the request body must be a JSON object")
    return data


def build_app(
    runs_dir: str | Path, *, api_key: str | None = None, allowed_hosts: tuple[str, ...] = LOOPBACK
) -> FastAPI:
    """The app serving `runs_dir`. `api_key`: every request must carry it (header `Authorization:
    Bearer KEY`, or the cookie the page sets after `/?key=KEY`). `allowed_hosts`: Host header names
    accepted (a page elsewhere cannot reach a loopback UI through DNS rebinding); empty accepts any."""
    runs_dir = Path(runs_dir).resolve()
    runs_dir.mkdir(parents=True, exist_ok=True)
    app = FastAPI(title="chattune ui", docs_url=None, redoc_url=None, openapi_url=None)
    cookie = "chattune_ui_key"

    @app.middleware("http")
    async def guard(request: Request, call_next):
        h = request.headers
        refusal = cross_site_refusal(request.method, h.get("host"), h.get("origin"), allowed_hosts)
        if refusal:
            return _problem(403, refusal)
        set_cookie = False
        if api_key is not None:
            given = request.headers.get("authorization", "").removeprefix("Bearer ")
            given = given or request.cookies.get(cookie, "")
            if not given and request.url.path == "/":
                given, set_cookie = request.query_params.get("key", ""), True
            if not hmac.compare_digest(given.encode(), api_key.encode()):
                return _problem(
                    401, "this UI needs its API key: open /?key=KEY or send 'Authorization: Bearer KEY'"
                )
        try:
            response = await call_next(request)
        except Exception as e:  # never a traceback or internals to the client; the server log has them
            ref = uuid.uuid4().hex[:12]
            logger.error("internal error %s", ref, exc_info=e)
            return _problem(500, f"internal error (reference {ref}; the `chattune ui` log has the details)")
        if set_cookie:
            response.set_cookie(cookie, api_key, httponly=True, samesite="strict")
        response.headers.setdefault("Content-Security-Policy", CSP)
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response

    @app.exception_handler(HTTPProblem)
    async def _on_problem(request: Request, e: HTTPProblem):
        return _problem(e.status, e.message, e.field)

    @app.exception_handler(ConfigError)
    async def _on_config(request: Request, e: ConfigError):
        return _problem(422, f"{e.key}: {e.reason}", e.key)

    @app.exception_handler(runs.PathRefused)
    async def _on_path(request: Request, e: runs.PathRefused):
        return _problem(400, str(e), "id")

    @app.exception_handler(launch.Refused)
    async def _on_refused(request: Request, e: launch.Refused):
        return _problem(409, str(e))

    @app.exception_handler(ChattuneError)
    async def _on_user_error(request: Request, e: ChattuneError):
        return _problem(400, str(e))

    @app.exception_handler(404)
    async def _on_404(request: Request, e: Exception):
        return _problem(404, f"nothing at {request.url.path[:200]}")

    @app.exception_handler(405)
    async def _on_405(request: Request, e: Exception):
        return _problem(405, f"{request.method} is not accepted at {request.url.path[:200]}")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/")
    async def index():
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/api/meta")
    async def meta():
        import chattune

        return {
            "runs_dir": str(runs_dir),
            "cwd": str(Path.cwd()),
            "version": chattune.__version__,
            "default_output_dir": _free_output_dir(runs_dir),
        }

    @app.get("/api/schema")
    async def form_schema():
        return schema.form_schema()

    @app.post("/api/config/check")
    async def check(request: Request):
        tree = schema.to_tree((await _json_body(request)).get("values"))
        text, out = launch.check_tree(tree, runs_dir)
        command = launch.train_argv(
            runs.launch_dir(runs_dir, out.relative_to(runs_dir).as_posix()) / "config.yaml"
        )[1]
        return {"yaml": text, "command": command, "output_dir": str(out)}

    @app.post("/api/config/from-yaml")
    async def from_yaml(request: Request):
        text = (await _json_body(request)).get("text")
        if not isinstance(text, str):
            raise HTTPProblem(422, "text: expected the YAML file's text", "text")
        from chattune.config.load import read_yaml  # what `chattune train` reads: a key twice is refused

        try:
            tree = read_yaml(text) or {}
        except yaml.YAMLError as e:
            raise HTTPProblem(422, f"(file): not valid YAML: {getattr(e, 'problem', e)}", "(file)") from None
        except RecursionError:
            raise HTTPProblem(422, "(file): nested too deeply to be a config", "(file)") from None
        if not isinstance(tree, dict):
            raise HTTPProblem(422, "(file): the top level must be a mapping of sections", "(file)")
        from chattune.config.load import config_from_dict

        config_from_dict(tree, "uploaded YAML")  # an unknown key or bad value is named now, by its field
        return {"values": schema.values_from_tree(tree)}

    @app.post("/api/upload", status_code=201)
    async def upload(request: Request):
        """A data file from the page, saved as <runs>/.chattune-ui/uploads/<name> (a new name if taken)."""
        name = request.query_params.get("name", "")
        if not UPLOAD_NAME.fullmatch(name) or Path(name).suffix.lower() not in UPLOAD_SUFFIXES:
            raise HTTPProblem(
                422, f"name: a file name ending {' / '.join(UPLOAD_SUFFIXES)}, got {name[:80]!r}", "name"
            )
        folder = runs_dir / runs.UI_DIR / "uploads"
        folder.mkdir(parents=True, exist_ok=True)
        path, k = folder / name, 1
        while path.exists():
            k += 1
            path = folder / f"{Path(name).stem}-{k}{Path(name).suffix}"
        size = 0
        with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a failed upload leaves nothing
            async for chunk in request.stream():
                size += len(chunk)
                if size > MAX_UPLOAD_BYTES:
                    raise HTTPProblem(
                        413, f"the file is larger than {MAX_UPLOAD_BYTES // 2**20} MiB; give its path instead"
                    )
                f.write(chunk)
        return {"path": str(path), "bytes": size}

    data_lock = asyncio.Lock()  # one data command at a time: each loads a tokenizer and reads the data

    @app.post("/api/data")
    async def data_command(request: Request):
        body = await _json_body(request)
        tree = schema.to_tree(body.get("values"))
        async with data_lock:
            return await asyncio.to_thread(launch.run_data_command, tree, runs_dir, str(body.get("command")))

    configs_dir = Path.cwd() / "configs"  # a checkout's shipped configs, when the UI runs in one

    @app.get("/api/configs")
    async def shipped_configs():
        return sorted(p.name for p in configs_dir.glob("*.yaml")) if configs_dir.is_dir() else []

    @app.get("/api/configs/{name}")
    async def shipped_config(name: str):
        if name not in await shipped_configs():  # only a listed name: never a path
            raise HTTPProblem(404, f"no config {name[:100]!r} in {configs_dir}", "name")
        from chattune.config.load import _resolve_relative

        tree = yaml.safe_load((configs_dir / name).read_text(encoding="utf-8")) or {}
        # Its paths are relative to the config file, as `chattune train` reads them.
        return {"values": schema.values_from_tree(_resolve_relative(tree, configs_dir))}

    @app.get("/api/runs")
    async def list_runs():
        launch.reap()
        rows = []
        for run_id in runs.list_run_ids(runs_dir):
            try:
                rows.append(runs.run_overview(runs_dir, run_id))
            except runs.PathRefused:  # a folder the UI would not serve is not listed either
                continue
        return rows

    @app.post("/api/runs", status_code=201)
    async def start(request: Request):
        tree = schema.to_tree((await _json_body(request)).get("values"))
        return launch.start_run(tree, runs_dir)

    @app.get("/api/runs/{run_id:path}/config")
    async def run_config(run_id: str):
        run_dir = _existing(run_id)
        tree = runs.read_config_tree(run_dir)
        if not tree:
            raise HTTPProblem(404, f"run {run_id} has no readable config.yaml")
        return {"values": schema.values_from_tree(tree)}

    @app.post("/api/runs/{run_id:path}/stop")
    async def stop(run_id: str):
        _existing(run_id)
        return launch.stop_run(runs_dir, run_id)

    @app.post("/api/runs/{run_id:path}/resume")
    async def resume(run_id: str):
        _existing(run_id)
        return launch.resume_run(runs_dir, run_id)

    @app.get("/api/runs/{run_id:path}/events")
    async def events(run_id: str, request: Request):
        run_dir = _existing(run_id)
        return StreamingResponse(
            event_stream(runs_dir, run_id, run_dir, request),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    @app.get("/api/runs/{run_id:path}/gguf-size")
    async def gguf_size(run_id: str, dtype: str = "f16"):
        from chattune.infer.export_gguf import DTYPES

        if dtype not in DTYPES:
            raise HTTPProblem(422, f"dtype: use one of {', '.join(DTYPES)}", "dtype")
        return {
            "dtype": dtype,
            "bytes": await asyncio.to_thread(runs.gguf_size_estimate, _adapter(run_id).parent, dtype),
        }

    @app.get("/runs/{run_id:path}/report.html")
    async def report(run_id: str):
        path = _existing(run_id) / "report.html"
        if not path.is_file():
            raise HTTPProblem(404, f"run {run_id} has no report.html yet (it is written when the run ends)")
        return FileResponse(path, media_type="text/html")

    @app.get("/api/compare")
    async def compare(request: Request):
        from chattune.report.compare import write_compare

        ids = request.query_params.getlist("id")
        if len(ids) < 2:
            raise HTTPProblem(422, "id: pick at least two runs to compare", "id")
        dirs = [_existing(r) for r in ids]
        out = runs_dir / runs.UI_DIR / "compare" / hashlib.sha256("\0".join(ids).encode()).hexdigest()[:16]
        out.mkdir(parents=True, exist_ok=True)
        html_path, _ = await asyncio.to_thread(write_compare, dirs, out)
        return HTMLResponse(html_path.read_text(encoding="utf-8"))

    @app.get("/api/chat/{run_id:path}/info")
    async def chat_info(run_id: str):
        from chattune.ui.chat import system_prompts

        return await asyncio.to_thread(system_prompts, _adapter(run_id))

    @app.post("/api/chat/{run_id:path}")
    async def chat(run_id: str, request: Request):
        from chattune.ui.chat import stream_answer

        body = await _json_body(request)
        messages, base, max_new = (
            body.get("messages"),
            body.get("base", False),
            body.get("max_new_tokens", 128),
        )
        if not isinstance(messages, list) or not messages:
            raise HTTPProblem(422, "messages: expected a non-empty list of {role, content}", "messages")
        if not isinstance(base, bool):
            raise HTTPProblem(422, "base: expected true or false", "base")
        if not isinstance(max_new, int) or isinstance(max_new, bool) or not 1 <= max_new <= 4096:
            raise HTTPProblem(422, "max_new_tokens: expected an integer in [1, 4096]", "max_new_tokens")
        adapter = _adapter(run_id)
        pieces = stream_answer(adapter, messages, base=base, max_new_tokens=max_new)
        # A bad conversation is a 4xx, not a stream cut short.
        first = await asyncio.to_thread(first_or_error, pieces)
        return StreamingResponse(sse_pieces(first, pieces), media_type="text/event-stream")

    def _existing(run_id: str) -> Path:
        run_dir = runs.check_run_id(runs_dir, run_id)
        if not run_dir.is_dir() and runs.read_launch(runs_dir, run_id) is None:
            raise HTTPProblem(404, f"no run {run_id!r} in {runs_dir}", "id")
        return run_dir

    def _adapter(run_id: str) -> Path:
        adapter = _existing(run_id) / "adapter"
        if not (adapter / "adapter_config.json").is_file():
            raise HTTPProblem(409, f"run {run_id} has no adapter yet (chat needs a finished LoRA run)", "id")
        return adapter

    return app


def _free_output_dir(runs_dir: Path) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name, k = f"run-{stamp}", 1
    while (runs_dir / name).exists():
        k += 1
        name = f"run-{stamp}-{k}"
    return str(runs_dir / name)


def run_ui(runs_dir: str, host: str = "127.0.0.1", port: int = 7860, api_key: str | None = None) -> None:
    """Serve the UI until interrupted (the `chattune ui` command). Another host than loopback needs
    an API key; runs it started go on training after it stops."""
    import uvicorn

    if not 0 <= port <= 65535:
        raise ChattuneError(f"--port must be in [0, 65535], got {port}")
    if host not in LOOPBACK and not api_key:
        raise ChattuneError(
            f"--host {host}: serving beyond this machine needs --api-key KEY (or CHATTUNE_API_KEY)"
        )
    check_port_free(host, port)
    app = build_app(runs_dir, api_key=api_key, allowed_hosts=LOOPBACK if host in LOOPBACK else ())
    shown = f"[{host}]" if ":" in host else host
    key = f"/?key={api_key}" if api_key else "/"
    say(
        f"chattune ui: http://{shown}:{port}{key}  (runs: {Path(runs_dir).resolve()}; Ctrl-C stops the UI, not the runs)"
    )
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=2)
