"""What `chattune serve` accepts: the OpenAI chat-completions request body, validated before any work is
queued, and the OpenAI error shape for every refusal (400/401/404/413 with the field at fault).
"""

from __future__ import annotations

import hmac
import json
import re
from typing import Any, Literal

from fastapi import Request
from fastapi.responses import JSONResponse
from jinja2 import TemplateError
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError

from chattune.errors import ChattuneError
from chattune.infer.generation import build_prompt, count_tokens, default_sampling
from chattune.infer.load import Loaded

MAX_N = 8  # completions per request: n=100 would hold the single worker for everyone else


MAX_STOP = 16  # stop strings per request (OpenAI allows 4); each is checked at every generated token


MAX_BODY_BYTES = 4 << 20  # a 128k-token prompt as escaped JSON is ~1-2 MiB


GREEDY_BELOW = 1e-5  # temperatures below this decode greedily (vLLM's rule): dividing by ~0 overflows


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    def response(self) -> JSONResponse:
        kind = {401: "authentication_error", 404: "not_found_error", 503: "server_error"}.get(
            self.status, "invalid_request_error" if self.status < 500 else "server_error"
        )
        body = {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


# -- request schema -------------------------------------------------------------------------------------
class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    reasoning_content: str | None = None  # an earlier answer's reasoning, as vLLM and SGLang return it


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # clients send fields we do not use (user, logprobs=false, ...)

    model: str | None = None
    messages: list[ChatMessage]
    # Numbers as JSON numbers, flags as true/false: "5" or true for max_tokens is a client's bug, said.
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    max_tokens: StrictInt | None = Field(None, ge=1, le=2**31 - 1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1, le=2**31 - 1)  # newer clients' max_tokens
    stop: str | list[str] | None = Field(None, max_length=MAX_STOP)
    n: StrictInt = Field(1, ge=1, le=MAX_N)
    stream: StrictBool = False
    stream_options: dict[str, Any] | None = None
    seed: StrictInt | None = Field(None, ge=0, le=2**63 - 1)  # what torch.manual_seed takes (OpenAI's int64)
    # Accepted only in their "off" form: a client that asks for tool calls or logprobs must not get a
    # plain answer that silently lacks them.
    tools: list[dict[str, Any]] | None = None
    logprobs: bool | None = None
    # vLLM's / SGLang's extension: arguments for the chat template (e.g. {"enable_thinking": false}),
    # over those the adapter was trained with.
    chat_template_kwargs: dict[str, str | int | float | bool | None] | None = None


def message_text(m: ChatMessage, k: int) -> str:
    if isinstance(m.content, str) or m.content is None:
        return m.content or ""
    parts = []
    for part in m.content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise APIError(400, f"messages[{k}]: only text content parts are supported", param="messages")
        parts.append(part["text"])
    return "".join(parts)


THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


class ReasoningSplitter:
    """Splits an answer's text, whole or streamed piece by piece, into reasoning and answer, as vLLM's and
    SGLang's reasoning parsers return them: a leading `<think>...</think>` block (Qwen3, DeepSeek-R1) goes
    to `reasoning_content` (newlines at its ends dropped), the rest to `content` (leading newlines
    dropped). A thought cut off before `</think>` (max_tokens) is all reasoning, `content` empty; text that
    does not start with `<think>` is all `content`, unchanged.

    `feed(piece)` and then `finish()` return deltas, each `{"reasoning_content": str}` or
    `{"content": str}` (never empty), in order; joined per key they equal `answer_message(whole text)`.
    Text that may still turn into a tag (`<thi`, `</th`) or newlines that may end the reasoning are held
    back until the next piece says which.
    """

    def __init__(self) -> None:
        self.state = "start"  # start -> reasoning -> answer, or start -> plain
        self.held = ""
        self.lead = True  # still dropping the leading newlines of the current part

    def feed(self, piece: str) -> list[dict[str, str]]:
        self.held += piece
        return self._drain(final=False)

    def finish(self) -> list[dict[str, str]]:
        return self._drain(final=True)

    def _drain(self, final: bool) -> list[dict[str, str]]:
        out: list[dict[str, str]] = []
        if self.state == "start":
            head = self.held.lstrip()
            if head.startswith(THINK_OPEN):
                self.state, self.held = "reasoning", head[len(THINK_OPEN) :]
            elif THINK_OPEN.startswith(head) and not final:
                return out  # nothing yet, or the start of a tag: wait for more
            else:
                self.state = "plain"
        if self.state == "reasoning":
            if self.lead:
                self.held = self.held.lstrip("\n")
                self.lead = not self.held
            end = self.held.find(THINK_CLOSE)
            if end >= 0:
                reasoning, self.held = self.held[:end].rstrip("\n"), self.held[end + len(THINK_CLOSE) :]
                self.state, self.lead = "answer", True
            elif final:
                reasoning, self.held = self.held.rstrip("\n"), ""
            else:  # hold back what may be the start of `</think>`, and newlines that may end the reasoning
                keep = next(k for k in range(len(THINK_CLOSE), -1, -1) if self.held.endswith(THINK_CLOSE[:k]))
                sure = self.held[: len(self.held) - keep]
                reasoning = sure.rstrip("\n")
                self.held = self.held[len(reasoning) :]
            if reasoning:
                out.append({"reasoning_content": reasoning})
        if self.state == "answer" and self.lead:
            self.held = self.held.lstrip("\n")
            self.lead = not self.held
        if self.state in ("answer", "plain") and self.held:
            out.append({"content": self.held})
            self.held = ""
        return out


def answer_message(text: str) -> dict[str, str]:
    """The assistant message of a whole completion, its reasoning apart (`ReasoningSplitter`):
    `{"role": "assistant", "content": ...}` plus `"reasoning_content"` when the text starts with `<think>`.
    """
    splitter = ReasoningSplitter()
    deltas = splitter.feed(text) + splitter.finish()
    content = "".join(d.get("content", "") for d in deltas)
    if splitter.state == "plain":  # finish() leaves no text in "start"
        return {"role": "assistant", "content": content}
    reasoning = "".join(d.get("reasoning_content", "") for d in deltas)
    return {"role": "assistant", "content": content, "reasoning_content": reasoning}


# -- the app --------------------------------------------------------------------------------------------
def check_api_key(request: Request, api_key: str | None) -> None:
    if api_key is None:
        return
    given = request.headers.get("authorization", "")
    if not given.startswith("Bearer ") or not hmac.compare_digest(given[7:].encode(), api_key.encode()):
        raise APIError(
            401, "invalid or missing API key (send 'Authorization: Bearer <key>')", code="invalid_api_key"
        )


def _lone_surrogate(value: Any, where: str) -> str | None:
    """The place (`messages[0].content`) of the first string (key or value) in `value` holding a lone surrogate, or None."""
    stack = [(value, where)]
    while stack:  # not recursive: json.loads has already bounded the depth, but a deep body costs no stack
        value, where = stack.pop()
        if isinstance(value, str):
            if _SURROGATE.search(value):
                return where
        elif isinstance(value, dict):
            for k, v in value.items():
                place = f"{where}.{k}" if where else str(k)
                if _SURROGATE.search(k):
                    return where or "request"
                stack.append((v, place))
        elif isinstance(value, list):
            stack.extend((v, f"{where}[{i}]") for i, v in enumerate(value))
    return None


_SURROGATE = re.compile("[\ud800-\udfff]")


def _field_path(loc: tuple) -> str:
    """pydantic's error location as the request's own path, `messages[0].content`: without the names of
    the union member it tried (`str`, `list[dict[str,any]]`), which are not fields of the request."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part.isidentifier() and part not in ("str", "int", "float", "bool", "list", "dict", "none"):
            path += f".{part}" if path else part
    return path or "request"


def parse_request(body: bytes) -> ChatRequest:
    try:
        data = json.loads(body)
    except RecursionError:
        raise APIError(400, "the request body is nested too deeply", code="invalid_json") from None
    except ValueError as e:  # malformed JSON, bad UTF-8, an integer of more than 4300 digits
        raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object with 'model' and 'messages'")
    where = _lone_surrogate(data, "")
    if where is not None:  # legal JSON ("\\ud800"), but no text: the tokenizer and the response encoder fail
        raise APIError(
            400, f"{where or 'request'}: holds a lone UTF-16 surrogate, not a character", param=where
        )
    try:
        return ChatRequest.model_validate(data)
    except ValidationError as e:
        err = e.errors(include_url=False, include_input=False)[0]
        where = _field_path(err["loc"])
        raise APIError(400, f"{where}: {err['msg']}", param=where) from None
    except RecursionError:
        raise APIError(400, "the request body is nested too deeply", code="invalid_json") from None


def prepare_request(
    body: bytes, by_name: dict[str, Loaded], default_max_tokens: int
) -> tuple[Loaded, list[dict], int, dict, ChatRequest]:
    """Parse and check a chat-completions body for the models served (`by_name`), render its prompt and
    count its tokens: (model, messages, prompt tokens, generation parameters, the request).

    Raises APIError (400 naming the field, 404 for a model not served) before any work is queued. Run in
    a worker thread: it takes time in proportion to the request, and the event loop must keep answering.
    """
    req = parse_request(body)
    if req.model is None and len(by_name) == 1:
        req.model = next(iter(by_name))
    if req.model is None:
        raise APIError(400, f"model is required (serving: {', '.join(by_name)})", param="model")
    if req.model not in by_name:
        raise APIError(
            404,
            f"model '{req.model[:100]}' is not served here (serving: {', '.join(by_name)})",
            code="model_not_found",
            param="model",
        )
    loaded = by_name[req.model]
    if not req.messages:
        raise APIError(400, "messages must not be empty", param="messages")
    if req.stream and req.n > 1:
        raise APIError(400, "stream with n > 1 is not supported", param="n")
    if req.tools:
        raise APIError(400, "tools (function calling) are not supported by chattune serve", param="tools")
    if req.logprobs:
        raise APIError(400, "logprobs are not supported by chattune serve", param="logprobs")
    for k, m in enumerate(req.messages):
        if m.content is None and m.role != "assistant":  # training refuses an empty turn just the same
            raise APIError(400, f"messages[{k}]: a {m.role} message needs content", param=f"messages[{k}]")
    messages = [
        {"role": "system" if m.role == "developer" else m.role, "content": message_text(m, k)}
        | ({"reasoning_content": m.reasoning_content} if m.reasoning_content is not None else {})
        for k, m in enumerate(req.messages)
    ]
    try:
        prompt = build_prompt(loaded, messages, template_kwargs=req.chat_template_kwargs)
    except (ChattuneError, ValueError, TemplateError) as e:  # the template refuses it (e.g. role order)
        raise APIError(400, f"messages: {str(e)[:300]}", param="messages") from None
    prompt_tokens = count_tokens(loaded, prompt)
    limit = loaded.max_context
    room = limit - prompt_tokens if limit else default_max_tokens
    max_tokens = req.max_completion_tokens or req.max_tokens or max(1, min(default_max_tokens, room))
    if limit and prompt_tokens + max_tokens > limit:
        raise APIError(
            400,
            f"this model's maximum context length is {limit} tokens; the messages use "
            f"{prompt_tokens} and max_tokens asks for {max_tokens}",
            code="context_length_exceeded",
            param="messages",
        )
    temperature, top_p = default_sampling(loaded)
    temperature = temperature if req.temperature is None else req.temperature
    stop = [req.stop] if isinstance(req.stop, str) else req.stop
    params = dict(
        max_new_tokens=max_tokens,
        temperature=0.0 if temperature < GREEDY_BELOW else temperature,
        top_p=top_p if req.top_p is None else req.top_p,
        stop=[s for s in stop or [] if s] or None,
        n=req.n,
        seed=req.seed,
    )
    return loaded, messages, prompt_tokens, params, req
