"""HTTP front of the scheduler: OpenAI-compatible routes, server-sent events, and the chat page.

    GET  /                     the chat page (minillm/assets/chat.html; no network, no CDN)
    GET  /health               {"status": "ok", "running": ..., "waiting": ...}
    GET  /v1/models            the one served model
    POST /v1/chat/completions  ChatML conversations (messages), streamed or not
    POST /v1/completions       raw text continuation

Starlette (with uvicorn) rather than FastAPI: the request bodies are validated by openai_api.py into
OpenAI's own error shape, so a pydantic layer would add a dependency and a second error format.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from minillm.data.tokenizer import Tokenizer
from minillm.infer.choices import Choices, Mailbox
from minillm.infer.openai_api import (
    ApiError,
    CompletionSpec,
    choice,
    model_list,
    new_id,
    parse_request,
    reply,
)
from minillm.infer.serving import QueueFull, Scheduler, ShuttingDown

PAGE = Path(__file__).resolve().parent.parent / "assets" / "chat.html"


@dataclass
class ServerConfig:
    """What the HTTP layer needs besides the scheduler."""

    model_name: str
    """The id in /v1/models; requests naming another model get 404."""
    api_key: str | None = None
    """When set, /v1 routes need `Authorization: Bearer <api_key>`."""
    max_body_bytes: int = 1 << 20
    """Larger request bodies get 413."""
    allowed_hosts: frozenset[str] | None = None
    """Host header names answered (lower case, no port; "[::1]" for IPv6); others get 400, so a web page on
    another site cannot reach the server through DNS rebinding. None answers any Host."""
    body_timeout: float = 30.0
    """Seconds a client may take to send its request body; slower ones get 408."""


_HOST = re.compile(r"(\[[0-9a-f:.]+\]|[a-z0-9._-]+)(?::\d{1,5})?")


def host_name(header: str) -> str:
    """The name part of a Host header: "127.0.0.1:8000" -> "127.0.0.1", "[::1]:8000" -> "[::1]"; "" for a header
    that is not one name with an optional port (such as "[::1]evil.com" or "a b"), which no allowed name equals."""
    match = _HOST.fullmatch(header.strip().lower())
    return match.group(1) if match else ""


def allowed_hosts(host: str, extra: list[str]) -> frozenset[str] | None:
    """The Host names the server answers: its address (and the loopback names on loopback) plus `extra`;
    None (any) for a wildcard address without `extra`."""
    names = {host_name(h) for h in extra}
    if host in ("0.0.0.0", "::", ""):
        return frozenset(names) or None
    loopback = host == "localhost" or host == "::1" or host.startswith("127.")
    own = {f"[{host}]" if ":" in host else host}
    return frozenset(names | own | ({"localhost", "127.0.0.1", "[::1]"} if loopback else set()))


def header_deadline_protocol(seconds: float) -> type:
    """uvicorn's HTTP/1.1 protocol with a deadline for each request's line and headers, so a client that
    trickles them (slowloris) is cut off instead of holding a connection forever."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Protocol(H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def _arm(self) -> None:
            self._waiting_for, self._deadline = self.cycle, self.loop.call_later(seconds, self._expire)

        def _expire(self) -> None:
            if self.cycle is self._waiting_for and not self.transport.is_closing():  # no new request yet
                self.transport.close()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.cycle is not self._waiting_for:  # a request line and its headers arrived in time
                self._deadline.cancel()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()  # the next request on this keep-alive connection has its own deadline

    return Protocol


class HostCheck:
    """ASGI middleware: requests whose Host names none of `allowed` get an OpenAI-style 400."""

    def __init__(self, app, allowed: frozenset[str]) -> None:
        self.app, self.allowed = app, allowed

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            host = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
            name = host_name(host)
            if not name or name not in self.allowed:
                e = ApiError(400, f"the Host header {host!r} names none of this server's addresses "
                                  f"({', '.join(sorted(self.allowed))}); serve.py --allowed_host NAME adds one",
                             code="invalid_host")
                await error_response(e)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def error_response(e: ApiError) -> JSONResponse:
    """An ApiError as an OpenAI-style JSON error."""
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def sse(obj: dict | str) -> str:
    """One server-sent event."""
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n"


def create_app(scheduler: Scheduler, tokenizer: Tokenizer, config: ServerConfig) -> Starlette | HostCheck:
    """The ASGI application serving `scheduler`'s model (the scheduler starts and stops with the app)."""
    created = int(time.time())

    mailbox: list[Mailbox] = []  # made on the server's event loop

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        mailbox.append(Mailbox(asyncio.get_running_loop()))
        scheduler.start()
        yield
        scheduler.stop()

    def authorize(request: Request) -> None:
        if config.api_key is None:
            return
        # The scheme is case-insensitive (RFC 9110): "bearer KEY" is as good as "Bearer KEY".
        scheme, _, given = request.headers.get("authorization", "").strip().partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), config.api_key.encode()):
            raise ApiError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    async def read_body(request: Request) -> bytes:
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > config.max_body_bytes:
                raise ApiError(413, f"the request body exceeds the limit of {config.max_body_bytes} bytes")
        return bytes(body)

    async def read_json(request: Request) -> object:
        # JSON only: a page on another site can send text/plain without asking, never application/json.
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/json":
            raise ApiError(415, f"the request body must be sent as Content-Type: application/json, got "
                                f"{kind or 'none'!r}", code="unsupported_media_type")
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > config.max_body_bytes:
            raise ApiError(413, f"the request body is {declared} bytes; the limit is {config.max_body_bytes}")
        try:
            body = await asyncio.wait_for(read_body(request), config.body_timeout)
        except asyncio.TimeoutError:
            raise ApiError(408, f"the request body did not arrive within {config.body_timeout:g} s",
                           code="timeout") from None
        try:
            value = json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}") from None
        except RecursionError:
            raise ApiError(400, "the request body is not valid JSON for this server: nested too deeply") from None
        try:  # a lone surrogate ("\ud800") is valid JSON but not text: nothing downstream could encode it
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise ApiError(400, "the request body holds a string with a lone surrogate (e.g. \\ud800): "
                                "not valid Unicode text") from None
        return value

    async def complete(request: Request, chat: bool) -> Response:
        try:
            authorize(request)
            # Off the event loop: rendering an outside chat template may take up to its time bound, and
            # tokenizing a long prompt takes a while; /health and the streams keep going meanwhile.
            spec = await run_in_threadpool(parse_request, await read_json(request), chat, tokenizer,
                                           scheduler.context, config.model_name, scheduler.max_waiting)
            choices = Choices(spec, tokenizer, mailbox[0])
            try:
                scheduler.submit(choices.requests)
            except QueueFull as e:  # as OpenAI answers a rate limit: retry after a while
                raise ApiError(429, f"the server is busy: {e}; retry shortly", code="server_busy",
                               kind="rate_limit_error", headers={"Retry-After": "1"}) from None
            except ShuttingDown as e:
                raise ApiError(503, str(e), code="shutting_down", kind="server_error") from None
        except ApiError as e:
            return error_response(e)
        except ClientDisconnect:
            return Response(status_code=499)
        rid = new_id(chat)
        if spec.stream:
            return StreamingResponse(stream(spec, choices, rid), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await whole(request, spec, choices, rid)

    async def whole(request: Request, spec: CompletionSpec, choices: Choices, rid: str) -> Response:
        texts = [""] * len(choices.requests)
        reasons: list[str | None] = [None] * len(choices.requests)

        async def watch() -> None:  # a client that hangs up frees its slots
            while not await request.is_disconnected():
                await asyncio.sleep(0.25)
            choices.cancel()

        watcher = asyncio.create_task(watch())
        try:
            while choices.open:
                i, piece, reason = await choices.next()
                texts[i] += piece
                reasons[i] = reason or reasons[i]
        except ApiError as e:
            return error_response(e)
        finally:
            watcher.cancel()
        out = [choice(spec.chat, i, choices.content(i, t), r, tool_calls=choices.calls[i])
               for i, (t, r) in enumerate(zip(texts, reasons))]
        return JSONResponse(reply(spec, rid, config.model_name, out, choices.usage(spec)))

    async def stream(spec: CompletionSpec, choices: Choices, rid: str) -> AsyncIterator[str]:
        try:
            if spec.chat:
                first = [choice(True, i, "", None, delta=True, first=True) for i in range(len(choices.requests))]
                yield sse(reply(spec, rid, config.model_name, first, None, chunk=True))
            while choices.open:
                try:
                    i, piece, reason = await choices.next()
                except ApiError as e:
                    yield sse(e.body())
                    return
                if reason == "tool_calls":  # each call as the API streams it: id and name, then the arguments
                    for k, call in enumerate(choices.calls[i]):
                        head = {"index": k, "id": call["id"], "type": "function",
                                "function": {"name": call["function"]["name"], "arguments": ""}}
                        for delta in (head, {"index": k, "function": {"arguments": call["function"]["arguments"]}}):
                            out = [choice(True, i, "", None, delta=True, tool_calls=[delta])]
                            yield sse(reply(spec, rid, config.model_name, out, None, chunk=True))
                if piece or reason:
                    out = [choice(spec.chat, i, piece, reason, delta=True)]
                    yield sse(reply(spec, rid, config.model_name, out, None, chunk=True))
            if spec.include_usage:
                yield sse(reply(spec, rid, config.model_name, [], choices.usage(spec), chunk=True))
            yield sse("[DONE]")
        finally:  # normal end, or the client went away (the task is cancelled): free the slots
            choices.cancel()

    async def chat_completions(request: Request) -> Response:
        return await complete(request, chat=True)

    async def completions(request: Request) -> Response:
        return await complete(request, chat=False)

    async def models(request: Request) -> Response:
        try:
            authorize(request)
        except ApiError as e:
            return error_response(e)
        return JSONResponse(model_list(config.model_name, created))

    async def health(request: Request) -> Response:
        running, waiting = scheduler.load()
        return JSONResponse({"status": "ok", "model": config.model_name, "context": scheduler.context,
                             "max_batch": scheduler.max_batch, "running": running, "waiting": waiting})

    async def page(request: Request) -> Response:
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    async def http_error(request: Request, exc: HTTPException) -> Response:
        return error_response(ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}"))

    app = Starlette(
        routes=[Route("/", page), Route("/health", health), Route("/v1/models", models),
                Route("/v1/chat/completions", chat_completions, methods=["POST"]),
                Route("/v1/completions", completions, methods=["POST"])],
        exception_handlers={HTTPException: http_error},
        lifespan=lifespan)
    return app if config.allowed_hosts is None else HostCheck(app, config.allowed_hosts)
