"""The daemon's HTTP API (Starlette, an ASGI app run by uvicorn): OpenAI-compatible routes.

    POST /v1/chat/completions   POST /v1/completions   (stream: Server-Sent Events)
    GET  /v1/models             GET  /health (public)  GET  /metrics (Prometheus text)

Streaming follows what OpenAI clients expect: a first chunk with `delta.role = "assistant"`,
content chunks, a finishing chunk with `finish_reason` and no content, a usage chunk with empty
`choices` when `stream_options.include_usage`, then `data: [DONE]`. An error after the stream
started is sent as `data: {"error": ...}` (the `openai` client raises on it). Up to
`max_concurrent_requests` generate at once; `queue_size` more wait; beyond that, 503.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from typing import Any, AsyncIterator

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from edgesplit.device.daemon.metrics import Metrics
from edgesplit.device.daemon.requests import ApiError, ApiRequest, parse_request
from edgesplit.device.daemon.service import DaemonService, Generation, Piece
from edgesplit.runtime.errors import EdgesplitError

log = logging.getLogger(__name__)


class Gate:
    """At most `limit` requests generate at once; at most `queue` more wait; the rest are refused."""

    def __init__(self, limit: int, queue: int):
        self.sem, self.queue, self.waiting = asyncio.Semaphore(limit), queue, 0

    async def enter(self) -> None:
        if self.sem.locked() and self.waiting >= self.queue:
            raise ApiError(503, f"busy: all request slots and the queue of {self.queue} are taken; retry later",
                           "server_error", "overloaded")
        self.waiting += 1
        try:
            await self.sem.acquire()
        finally:
            self.waiting -= 1

    def leave(self) -> None:
        self.sem.release()

    def resize(self, limit: int, queue: int) -> None:
        """New limits for new requests (those running keep their slots)."""
        self.sem, self.queue = asyncio.Semaphore(limit), queue


def _error(exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


def _chunk(req: ApiRequest, rid: str, created: int, path: str, **fields: Any) -> str:
    """One SSE event; `system_fingerprint` says what served it (the split and its plan, or local)."""
    obj = "chat.completion.chunk" if req.kind == "chat" else "text_completion"
    return "data: " + json.dumps({"id": rid, "object": obj, "created": created, "model": req.model,
                                  "system_fingerprint": f"edgesplit-{path}", **fields}) + "\n\n"


def _choice(req: ApiRequest, text: str | None, finish: str | None, first: bool = False) -> dict:
    if req.kind == "chat":
        delta: dict = {"role": "assistant", "content": ""} if first else ({} if text is None else {"content": text})
        return {"index": 0, "delta": delta, "finish_reason": finish}
    return {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}


def _usage(last: Piece | None) -> dict:
    p, c = (last.prompt_tokens, last.completion_tokens) if last else (0, 0)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def build_app(service: DaemonService, metrics: Metrics) -> Starlette:
    """The ASGI app over a (loading or loaded) service."""
    gate = Gate(service.cfg.max_concurrent_requests, service.cfg.queue_size)
    service.on_reconfigure = lambda cfg: gate.resize(cfg.max_concurrent_requests, cfg.queue_size)

    def authorized(request: Request) -> bool:
        key = service.cfg.api_key  # read per request: SIGHUP may change it
        return key is None or request.headers.get("authorization") == f"Bearer {key}"

    async def health(request: Request) -> Response:
        if not service.ready.is_set():
            return JSONResponse({"status": "loading"}, status_code=503)
        up = service.link.up
        fits = up or await run_in_threadpool(lambda: service.local_fits()[0])
        body = {"status": "ok" if fits else "no cloud", "cut": service.plan.cut, "codec": str(service.plan.codec),
                "cloud": list(service.link.endpoints), "cloud_directory": service.cfg.cloud_directory, "cloud_up": up, "serves": "split" if up else "local" if fits
                else "nothing", "link_rtt_ms": service.link.rtt_ms, "last_cloud_error": service.last_cloud_error}
        return JSONResponse(body, status_code=200 if fits else 503)

    async def models(request: Request) -> Response:
        if not authorized(request):
            return _error(ApiError(401, "invalid or missing API key (Authorization: Bearer ...)",
                                   "authentication_error", "invalid_api_key"))
        return JSONResponse({"object": "list", "data": [{"id": service.cfg.model, "object": "model", "created": 0,
                                                         "owned_by": "edgesplit"}]})

    async def prometheus(request: Request) -> Response:
        metrics.refresh(service)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def completions(request: Request, kind: str) -> Response:
        endpoint = "chat" if kind == "chat" else "completions"
        try:
            if not authorized(request):
                raise ApiError(401, "invalid or missing API key (Authorization: Bearer ...)", "authentication_error",
                               "invalid_api_key")
            if not service.ready.is_set():
                raise ApiError(503, "the model is still loading; retry shortly", "server_error", "loading")
            try:
                body = await request.json()
            except ValueError:
                raise ApiError(400, "the request body is not valid JSON", "invalid_request_error", "invalid_json")
            req = parse_request(kind, body, service.cfg.model)
            await gate.enter()
        except ApiError as exc:
            metrics.requests.labels(endpoint, str(exc.status)).inc()
            return _error(exc)
        try:
            gen = await run_in_threadpool(service.generate, req, metrics.link)  # refusals before any output
        except ApiError as exc:
            gate.leave()
            metrics.requests.labels(endpoint, str(exc.status)).inc()
            return _error(exc)
        metrics.requests.labels(endpoint, "200").inc()
        if req.stream:
            return StreamingResponse(_stream(req, gen), media_type="text/event-stream",
                                     headers={"X-Edgesplit-Path": gen.path})
        try:
            return JSONResponse(await run_in_threadpool(_whole, req, gen), headers={"X-Edgesplit-Path": gen.path})
        except EdgesplitError as exc:
            service.last_cloud_error = str(exc)
            return _error(ApiError(503, f"generation failed: {exc}", "server_error", "unavailable"))
        finally:
            await run_in_threadpool(gen.close)
            gate.leave()

    def _whole(req: ApiRequest, gen: Generation) -> dict:
        last, text = None, []
        for last in metrics.timed(gen):
            text.append(last.text)
        rid, created = f"{'chatcmpl' if req.kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}", int(time.time())
        content, finish = "".join(text), last.finish_reason if last else "length"
        choice = ({"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish}
                  if req.kind == "chat" else {"index": 0, "text": content, "finish_reason": finish, "logprobs": None})
        return {"id": rid, "object": "chat.completion" if req.kind == "chat" else "text_completion",
                "created": created, "model": req.model, "system_fingerprint": f"edgesplit-{gen.path}",
                "choices": [choice], "usage": _usage(last)}

    async def _stream(req: ApiRequest, gen: Generation) -> AsyncIterator[str]:
        rid, created = f"{'chatcmpl' if req.kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}", int(time.time())
        pieces = metrics.timed(gen)
        last: Piece | None = None
        try:
            if req.kind == "chat":
                yield _chunk(req, rid, created, gen.path, choices=[_choice(req, None, None, first=True)])
            async for last in iterate_in_threadpool(pieces):
                if last.text:
                    yield _chunk(req, rid, created, gen.path, choices=[_choice(req, last.text, None)])
            finish = last.finish_reason if last else "length"
            yield _chunk(req, rid, created, gen.path, choices=[_choice(req, None, finish)])
            if req.include_usage:
                yield _chunk(req, rid, created, gen.path, choices=[], usage=_usage(last))
            yield "data: [DONE]\n\n"
        except ApiError as exc:
            yield "data: " + json.dumps(exc.body()) + "\n\n"
        except EdgesplitError as exc:
            service.last_cloud_error = str(exc)
            err = ApiError(503, f"generation failed: {exc}", "server_error", "unavailable")
            yield "data: " + json.dumps(err.body()) + "\n\n"
        finally:
            # Also reached when the client went away and the stream was cancelled: nothing may be
            # awaited here, so the slot is freed now and the generation closed by a thread (it
            # waits for a step in progress, then frees the cloud session and the front).
            gate.leave()
            threading.Thread(target=gen.close, name="edgesplit-close", daemon=True).start()

    async def chat(request: Request) -> Response:
        return await completions(request, "chat")

    async def text(request: Request) -> Response:
        return await completions(request, "completion")

    return Starlette(routes=[
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/v1/completions", text, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", prometheus, methods=["GET"]),
    ])
