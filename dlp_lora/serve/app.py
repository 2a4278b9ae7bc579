"""The FastAPI app: endpoints, authentication, responses, and running it with uvicorn.

Endpoints: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (``stream: true`` gives
server-sent events in OpenAI's chunk format, ending with ``data: [DONE]``), ``GET /health``, and vLLM's dynamic
LoRA endpoints ``POST /v1/load_lora_adapter`` / ``POST /v1/unload_lora_adapter``.

Every answer that is not a success is OpenAI's error JSON, whoever produces it: the endpoints (:class:`APIError`),
the router (unknown path or method), the gate in front of everything (API key; an exception nobody expected is
a 500 logged as one line), and the HTTP parser itself (a malformed request, a negative ``Content-Length``, a
header too large: a JSON 400 instead of uvicorn's plain text).

FastAPI and uvicorn are imported inside functions, so importing this module costs nothing.
"""

# No "from __future__ import annotations": FastAPI must see the real Request type of the endpoints.

import asyncio
import contextlib
import hmac
import json
import os
import time
from pathlib import Path

from ..config import DLPError
from .engine import Engine, log_failure
from .scheduler import Batcher, EngineStats, IterationBatcher, Job
from .schema import (BASE_MODEL, DLP_MODEL, ROUTING_FIELD, APIError, GenRequest, ServeConfig, json_type, parse_body,
                     parse_request, sse)

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
POLL_S = 0.5                            # how often a waiting request checks that its client is still there
MAX_HEADER_BYTES = 16 * 1024            # all request headers together (h11's own limit for headers in transit)


class Server:
    """What the endpoints share: settings, the engine and its scheduler, or the upstream proxy."""

    def __init__(self, pipeline, config: ServeConfig, adapter_roots: list[Path], proxy=None) -> None:
        self.config, self.pipeline = config, pipeline
        self.stats = EngineStats()
        self.engine = Engine(pipeline, config, self.stats, adapter_roots)
        self.batcher = make_batcher(self.engine, config, self.stats)
        if proxy is None and config.upstream:
            from .proxy import UpstreamProxy

            proxy = UpstreamProxy.from_config(pipeline, config, max_inflight=config.max_queue + config.max_batch)
        self.proxy = proxy
        self.created = int(time.time())

    def parse(self, body, kind: str) -> GenRequest:
        e = self.engine
        req = parse_request(body, kind, names=e.names, loaded=e.loaded, tokenizer=e.count_tokenizer,
                            config=self.config, count_tokens=e.count_tokens,
                            context_length=None if self.proxy is not None else e.context_length)
        if req.weights is None and req.adapter is None and getattr(self.pipeline, "router", None) is None:
            raise APIError(400, f"model {req.model!r}: this server has no router; name an adapter "
                                f"({DLP_MODEL}:<task>) or pass \"dlp\": {{\"weights\": {{...}}}}",
                           param="model", code="no_router")
        return req


def make_batcher(engine: Engine, config: ServeConfig, stats: EngineStats) -> Batcher:
    """The queue and worker of ``config.scheduler``: per decode step ("continuous") or per batch ("static")."""
    if config.scheduler == "static":
        return Batcher(engine.run_batch, config.max_batch, config.max_queue, config.batch_window_ms, stats,
                       config.retry_after_s)
    return IterationBatcher(engine.join, engine.step, engine.live, engine.abort, config.max_batch, config.max_queue,
                            config.batch_window_ms, stats, config.retry_after_s)


def default_adapter_roots(pipeline, run_root) -> list[Path]:
    """Where ``/v1/load_lora_adapter`` may read when no ``--adapter-root`` is given: the run folder (else the
    folder that holds the run's adapters)."""
    if run_root is not None:
        return [Path(run_root)]
    return [Path(os.path.commonpath([str(Path(p).absolute().parent) for p in pipeline.fused.paths]))]


def create_app(pipeline_or_run, config: ServeConfig | None = None, *, model: str | None = None, router=None,
               proxy=None, run_root=None):
    """The FastAPI app serving ``pipeline_or_run`` (a :class:`DLPPipeline`, or a run folder loaded with its own
    base model unless ``model`` overrides it). With ``config.upstream`` (or an explicit ``proxy``), generation
    is forwarded to that OpenAI-compatible LoRA server (:mod:`dlp_lora.serve.proxy`)."""
    from fastapi import FastAPI

    config = config or ServeConfig()
    pipeline = pipeline_or_run
    if isinstance(pipeline_or_run, (str, Path)):
        pipeline, run = load_pipeline(pipeline_or_run, model=model, router=router)
        run_root = run_root or run.root
    roots = [Path(r) for r in config.adapter_roots] or default_adapter_roots(pipeline, run_root)
    server = Server(pipeline, config, roots, proxy)
    app = FastAPI(title="DLP-LoRA", version="0.1.0", lifespan=_lifespan(server), docs_url=None, redoc_url=None)
    app.state.server = server
    app.state.engine, app.state.stats, app.state.batcher = server.engine, server.stats, server.batcher
    app.state.config, app.state.proxy = config, server.proxy
    app.add_middleware(Gate, api_key=config.api_key)
    _add_error_handlers(app)
    _add_routes(app, server)
    return app


def _lifespan(server: Server):
    @contextlib.asynccontextmanager
    async def lifespan(app):
        server.batcher.start()
        try:
            yield
        finally:
            server.batcher.stop()
            if server.proxy is not None:
                await server.proxy.aclose()

    return lifespan


def _add_error_handlers(app) -> None:
    from starlette.exceptions import HTTPException

    @app.exception_handler(HTTPException)
    async def http_error(request, exc):  # unknown path / method in OpenAI's error shape
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error_response(APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                                       code=code))


def _add_routes(app, server: Server) -> None:
    from fastapi import Request

    @app.get("/health")
    async def health():
        return health_body(server)

    @app.get("/v1/models")
    async def models():
        return models_body(server)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(server, request, "completion")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generate(server, request, "chat")

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request):
        return await adapter_endpoint(server, request, "load")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: Request):
        return await adapter_endpoint(server, request, "unload")


# the gate: API key and one-line 500s ----------------------------------------------------------------------------

class Gate:
    """ASGI middleware in front of every route: a size limit for the headers, the API key (all paths but
    ``/health``, the OpenAPI schema included) and a last line of defence that answers an unexpected exception with a JSON 500 and logs it as
    one line (Starlette's own handler would print a full traceback)."""

    OPEN = ("/health",)

    def __init__(self, app, api_key: str = "") -> None:
        self.app, self.api_key = app, api_key.encode()

    def _authorized(self, scope) -> bool:
        auth = dict(scope.get("headers") or []).get(b"authorization", b"")
        scheme, _, token = auth.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.api_key)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if sum(len(k) + len(v) for k, v in scope.get("headers") or []) > MAX_HEADER_BYTES:
            return await send_error(send, APIError(431, f"request headers: above this server's limit of "
                                                        f"{MAX_HEADER_BYTES} bytes", code="headers_too_large"))
        if self.api_key and scope.get("path") not in self.OPEN and not self._authorized(scope):
            return await send_error(send, APIError(
                401, "invalid or missing API key (send 'Authorization: Bearer <key>')", type="authentication_error",
                code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}))
        started = False

        async def watch(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except Exception as e:
            log_failure(f"{scope.get('method')} {scope.get('path')} failed", e)
            if not started:
                await send_error(send, APIError(500, f"internal error ({e.__class__.__name__})", type="server_error",
                                                code="internal_error"))


async def send_error(send, e: APIError) -> None:
    """An APIError answered at the ASGI level (no framework)."""
    body = json.dumps(e.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), str(v).encode()) for k, v in e.headers.items()]
    await send({"type": "http.response.start", "status": e.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def error_response(e: APIError):
    from starlette.responses import JSONResponse

    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


async def read_body(request, max_bytes: int):
    """The request body parsed as JSON and checked (:func:`~dlp_lora.serve.schema.parse_body`); 413 above
    ``max_bytes``, 400 for a bad Content-Length."""
    cl = request.headers.get("content-length")
    if cl is not None:
        if not (cl.isascii() and cl.strip().isdigit()):
            raise APIError(400, "request body: bad Content-Length header", code="invalid_request")
        if int(cl) > max_bytes:
            raise APIError(413, f"request body: {int(cl)} bytes is above this server's limit of {max_bytes}",
                           code="body_too_large")
    buf = bytearray()
    async for chunk in request.stream():
        buf += chunk
        if len(buf) > max_bytes:
            raise APIError(413, f"request body: above this server's limit of {max_bytes} bytes", code="body_too_large")
    return parse_body(bytes(buf))


async def until_disconnected(request, awaitable):
    """Await ``awaitable``; when the client goes away first, cancel it and raise a 499."""
    task = asyncio.ensure_future(awaitable)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                break
    except asyncio.CancelledError:
        task.cancel()
        raise
    task.cancel()
    with contextlib.suppress(BaseException):
        await task
    raise APIError(499, "client closed the request", code="client_closed")


# endpoints --------------------------------------------------------------------------------------------------------

def health_body(server: Server) -> dict:
    body = {"status": "ok", "adapters": server.engine.names, "loaded_adapters": sorted(server.engine.loaded),
            "queue": server.batcher.pending, "max_queue": server.config.max_queue,
            "max_batch": server.config.max_batch, "scheduler": server.config.scheduler,
            "engine": server.stats.as_dict(),
            "mode": "proxy" if server.proxy is not None else "local"}
    if server.proxy is not None:
        body["upstream"] = server.proxy.stats()
    return body


def models_body(server: Server) -> dict:
    def entry(mid, parent=BASE_MODEL):
        return {"id": mid, "object": "model", "created": server.created, "owned_by": "dlp-lora", "root": BASE_MODEL,
                "parent": parent}

    names = server.engine.names
    data = [entry(BASE_MODEL, None), entry(DLP_MODEL)] + [entry(f"{DLP_MODEL}:{n}") for n in names]
    data += [entry(n) for n in names] + [entry(n) for n in sorted(server.engine.loaded)]
    return {"object": "list", "data": data}


async def generate(server: Server, request, kind: str):
    """A completions / chat-completions request: checked, then queued for the engine or forwarded upstream."""
    from starlette.background import BackgroundTask
    from starlette.responses import StreamingResponse

    try:
        req = server.parse(await read_body(request, server.config.max_body_bytes), kind)
        if server.proxy is not None:
            return await forward(server, request, req)
        job = Job(req, asyncio.get_running_loop())
        server.batcher.submit(job)
    except APIError as e:
        return error_response(e)
    rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + job.id
    created = int(time.time())
    if req.stream:
        # the background task also runs when the client leaves before the first byte (the body generator,
        # never started, would not get to its finally): a finished job is unaffected by cancel()
        return StreamingResponse(stream_events(server, job, rid, created), media_type="text/event-stream",
                                 headers=SSE_HEADERS, background=BackgroundTask(server.batcher.cancel, job))
    return await wait_result(server, request, job, rid, created)


async def forward(server: Server, request, req: GenRequest):
    """Proxy mode: the upstream generates; a client that goes away frees its slot at once."""
    from starlette.background import BackgroundTask
    from starlette.responses import JSONResponse, StreamingResponse

    if req.stream:
        stream = await until_disconnected(request, server.proxy.open_stream(req))
        return StreamingResponse(stream.body(), media_type="text/event-stream", headers=SSE_HEADERS,
                                 background=BackgroundTask(stream.close))
    return JSONResponse(await until_disconnected(request, server.proxy.complete(req)))


async def wait_result(server: Server, request, job: Job, rid: str, created: int):
    from starlette.responses import JSONResponse

    try:
        kind, payload = await until_disconnected(request, job.events.get())
    except APIError as e:                   # the client went away: stop its row
        server.batcher.cancel(job)
        return error_response(e)
    except asyncio.CancelledError:
        server.batcher.cancel(job)
        raise
    if kind == "error":
        return error_response(payload)
    res = payload
    return JSONResponse(response_body(job.req, rid, created, res.text, finish_reason(res),
                                      usage(res.prompt_tokens, res.completion_tokens), res.routing))


async def stream_events(server: Server, job: Job, rid: str, created: int):
    req, done = job.req, False
    try:
        if req.kind == "chat":
            yield sse(chunk_body(req, rid, created, "", role=True))
        while True:
            kind, payload = await job.events.get()
            if kind == "delta":
                yield sse(chunk_body(req, rid, created, payload))
                continue
            if kind == "error":
                yield sse(payload.body())
            else:
                use = usage(payload.prompt_tokens, payload.completion_tokens)
                yield sse(chunk_body(req, rid, created, None if req.kind == "chat" else "",
                                     reason=finish_reason(payload), extra={ROUTING_FIELD: payload.routing, "usage": use}))
                if req.include_usage:
                    yield sse(chunk_body(req, rid, created, None, empty_choices=True, extra={"usage": use}))
            break
        done = True
        yield b"data: [DONE]\n\n"
    finally:
        if not done:  # the client went away (or the server is stopping): free the slot
            server.batcher.cancel(job)


async def adapter_endpoint(server: Server, request, action: str):
    try:
        body = await read_body(request, server.config.max_body_bytes)
        if not isinstance(body, dict):
            raise APIError(400, f"request body: expected a JSON object, got {json_type(body)}", code="invalid_json")
        if server.proxy is not None:
            raise APIError(400, f"/v1/{action}_lora_adapter: not available in proxy mode (load adapters on the "
                                f"upstream {server.config.upstream})", code="unsupported_in_proxy_mode")
        if action == "load":
            return await asyncio.to_thread(server.engine.load_adapter, body.get("lora_name"), body.get("lora_path"))
        return await asyncio.to_thread(server.engine.unload_adapter, body.get("lora_name"))
    except APIError as e:
        return error_response(e)


# responses --------------------------------------------------------------------------------------------------------

def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": int(prompt_tokens), "completion_tokens": int(completion_tokens),
            "total_tokens": int(prompt_tokens) + int(completion_tokens)}


def finish_reason(res) -> str:
    return "length" if res.finish_reason == "length" else "stop"


def response_body(req: GenRequest, rid: str, created: int, text: str, reason: str, use: dict, routing) -> dict:
    if req.kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason,
                  "logprobs": None}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "finish_reason": reason, "logprobs": None}
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": req.model, "choices": [choice],
            "usage": use, ROUTING_FIELD: routing, "system_fingerprint": None}


def chunk_body(req: GenRequest, rid: str, created: int, delta: str | None, reason: str | None = None,
               role: bool = False, extra: dict | None = None, empty_choices: bool = False) -> dict:
    if req.kind == "chat":
        d: dict = {"role": "assistant"} if role else {}
        if delta is not None:
            d["content"] = delta
        choice = {"index": 0, "delta": d, "finish_reason": reason, "logprobs": None}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": delta or "", "finish_reason": reason, "logprobs": None}
        obj = "text_completion"
    body = {"id": rid, "object": obj, "created": created, "model": req.model,
            "choices": [] if empty_choices else [choice], "system_fingerprint": None}
    body.update(extra or {})
    return body


# running it -------------------------------------------------------------------------------------------------------

def load_pipeline(run, model: str | None = None, router=None, device: str | None = None):
    """``(pipeline, run)``: the run's adapters, its own base model unless ``model`` overrides it, its router."""
    from ..pipeline import DLPPipeline
    from ..run import open_run

    r = open_run(run, router=router, model=model)
    return DLPPipeline.from_run(r, device=device), r


def json_error_protocol():
    """uvicorn's h11 protocol answering requests it cannot parse (a negative Content-Length, a header above
    h11's size limit, garbage) with OpenAI's error JSON instead of a plain-text 400."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class JSONErrorH11Protocol(H11Protocol):
        def send_400_response(self, msg: str) -> None:
            body = json.dumps(APIError(400, f"malformed HTTP request ({msg.rstrip('.')})",
                                       code="invalid_request").body()).encode()
            headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
            for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"),
                          h11.Data(data=body), h11.EndOfMessage()):
                self.transport.write(self.conn.send(event))
            self.transport.close()

    return JSONErrorH11Protocol


def server_config(app, host: str, port: int, log_level: str = "warning"):
    """The uvicorn configuration every entry point serves with (CLI, tests, load test)."""
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on", http=json_error_protocol())


def check_bind(host: str, port: int) -> int:
    """The port to serve on (a free one for port 0); DLPError when the address cannot be bound."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise DLPError(f"--host {host}: cannot resolve ({e.strerror})") from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as uvicorn does
        try:
            sock.bind(addr)
        except OSError as e:
            raise DLPError(f"--port {port}: cannot listen on {host}:{port} ({e.strerror})") from None
        return sock.getsockname()[1]


def serve(run, config: ServeConfig | None = None, model: str | None = None, router=None, device: str | None = None,
          log_level: str = "warning") -> None:
    """Load the run (its own base model unless ``model`` overrides it) and serve it until interrupted."""
    import uvicorn

    config = config or ServeConfig()
    config.port = check_bind(config.host, config.port)   # fail in one line before loading the model
    pipeline, r = load_pipeline(run, model=model, router=router, device=device)
    app = create_app(pipeline, config, run_root=r.root)
    url = f"http://{config.host}:{config.port}"
    mode = f" -> upstream {config.upstream}" if config.upstream else ""
    print(f"dlp-lora serve: {url}/v1 (models: {DLP_MODEL}, {BASE_MODEL}, "
          f"{', '.join(DLP_MODEL + ':' + n for n in app.state.engine.names)}){mode}", flush=True)
    if config.host not in ("127.0.0.1", "localhost", "::1") and not config.api_key:
        print(f"warning: listening on {config.host} without --api-key: anyone who can reach it can use it",
              flush=True)
    uvicorn.Server(server_config(app, config.host, config.port, log_level)).run()
