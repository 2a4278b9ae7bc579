"""``dlp-lora serve``: an OpenAI-compatible HTTP server for a DLP-LoRA run.

Any OpenAI client gets routed, fused generation and sees how it was routed (``dlp_routing`` on every response).

Endpoints: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (``stream: true`` gives
server-sent events in OpenAI's chunk format, ending with ``data: [DONE]``), ``GET /health``, and vLLM's dynamic
LoRA endpoints ``POST /v1/load_lora_adapter`` / ``POST /v1/unload_lora_adapter`` so that this server can stand
in for vLLM as the upstream of ``dlp-lora serve --upstream`` (``dlp_lora.proxy``).

Models a request may name:

* ``dlp``            routed by the router, fused per sentence (the paper); ``"dlp": {"weights": {...}}`` forces
                     a manual mixture instead;
* ``dlp:<task>``     that one task adapter (``<task>`` alone works too, as vLLM's ``--lora-modules`` names);
* ``base``           the base model, no adapter;
* ``<lora_name>``    an adapter registered through ``/v1/load_lora_adapter``.

Batching: one background worker thread owns the engine. Requests are queued (bounded: full -> 429 with
``Retry-After``); the worker takes the oldest request, waits at most ``batch_window_ms`` after its arrival for
more (requests that queued while a batch was running are taken at once), and runs up to ``max_batch`` of them
as ONE heterogeneous ``DLPPipeline.generate`` call - every row with its own mixture, max tokens, temperature and
stop strings. Only options that are per call in the engine (router top_p/weighting/granularity, sampling
top_p, chat formatting, seed) split a batch into consecutive calls. Batch sizes are counted in ``/health``.

FastAPI and uvicorn are imported inside functions, so importing this module costs nothing.
"""

# No "from __future__ import annotations": FastAPI must see the real Request type of the endpoints.

import asyncio
import collections
import copy
import dataclasses
import hmac
import json
import math
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable

from .config import DLPError, check

DLP_MODEL = "dlp"
BASE_MODEL = "base"
ROUTING_FIELD = "dlp_routing"


# ---------------------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class ServeConfig:
    """How ``dlp-lora serve`` runs; every limit is enforced per request."""

    host: str = "127.0.0.1"                 # bind address (loopback unless told otherwise)
    port: int = 8000                        # TCP port (0: any free port)
    api_key: str = ""                       # when set, every /v1 request needs "Authorization: Bearer <key>"
    max_batch: int = 16                     # most requests joined into one engine call
    batch_window_ms: float = 10.0           # wait at most this long after a request arrives for others to join
    max_queue: int = 64                     # requests waiting for the engine at most; beyond -> 429
    max_tokens_cap: int = 512               # largest max_tokens a request may ask for (above -> 400)
    default_max_tokens: int = 64            # max_tokens when a request gives none
    max_prompt_tokens: int = 2048           # longest prompt in tokens, after chat formatting (above -> 400)
    max_body_bytes: int = 1_000_000         # largest request body (above -> 413)
    top_p: float = 0.8                      # router top-p when a request's "dlp" object gives none
    weighting: str = "paper"                # fusion weighting default: "paper" (Eq. 5 softmax) or "renorm"
    granularity: str = "sentence"           # routing default: "sentence" (paper) or "prompt"
    max_adapters: int = 0                   # router default: most adapters kept per row (0 = no cap); with
                                            # --upstream this bounds the rank of exported mixtures
    retry_after_s: int = 1                  # Retry-After header value on 429
    max_loaded_adapters: int = 16           # adapters /v1/load_lora_adapter may hold at once (beyond -> 400)
    max_lora_rank: int = 0                  # refuse loaded adapters of higher rank, like vLLM --max-lora-rank (0: any)
    upstream: str = ""                      # proxy mode: OpenAI-compatible LoRA server URL (see dlp_lora.proxy)
    upstream_model: str = ""                # proxy mode: upstream's base model id ("" = discover from /v1/models)
    upstream_api_key: str = ""              # proxy mode: bearer key sent to the upstream ("" = none)
    upstream_timeout_s: float = 300.0       # proxy mode: timeout of one upstream call
    mixture_cache: int = 32                 # proxy mode: exported mixtures kept loaded upstream (LRU)
    mixture_decimals: int = 2               # proxy mode: mixture weights are rounded to this many decimals
    mixture_dir: str = ""                   # proxy mode: where mixtures are exported ("" = a temp folder);
                                            # the upstream must be able to read this path

    def __post_init__(self) -> None:
        check(isinstance(self.host, str) and self.host.strip() != "", "host: must be a non-empty address")
        check(_is_int(self.port) and 0 <= self.port <= 65535, f"port: must be in 0..65535, got {self.port!r}")
        check(isinstance(self.api_key, str), "api_key: must be a string")
        check(_is_int(self.max_adapters) and self.max_adapters >= 0,
              f"max_adapters: must be an integer >= 0, got {self.max_adapters!r}")
        for name in ("max_batch", "max_queue", "max_tokens_cap", "default_max_tokens", "max_prompt_tokens",
                     "max_body_bytes", "retry_after_s", "max_loaded_adapters", "mixture_cache"):
            v = getattr(self, name)
            check(_is_int(v) and v > 0, f"{name}: must be a positive integer, got {v!r}")
        check(self.default_max_tokens <= self.max_tokens_cap,
              f"default_max_tokens: {self.default_max_tokens} is above max_tokens_cap {self.max_tokens_cap}")
        check(_is_num(self.batch_window_ms) and 0 <= self.batch_window_ms <= 10_000,
              f"batch_window_ms: must be in [0, 10000], got {self.batch_window_ms!r}")
        check(_is_num(self.top_p) and 0 < self.top_p <= 1, f"top_p: must be in (0, 1], got {self.top_p!r}")
        check(self.weighting in ("paper", "renorm"), f"weighting: must be paper|renorm, got {self.weighting!r}")
        check(self.granularity in ("prompt", "sentence"),
              f"granularity: must be prompt|sentence, got {self.granularity!r}")
        check(_is_int(self.max_lora_rank) and self.max_lora_rank >= 0,
              f"max_lora_rank: must be >= 0, got {self.max_lora_rank!r}")
        check(isinstance(self.upstream, str), "upstream: must be a URL string")
        if self.upstream:
            check(self.upstream.startswith(("http://", "https://")),
                  f"upstream: must start with http:// or https://, got {self.upstream!r}")
        check(_is_num(self.upstream_timeout_s) and self.upstream_timeout_s > 0,
              f"upstream_timeout_s: must be > 0, got {self.upstream_timeout_s!r}")
        check(isinstance(self.upstream_api_key, str), "upstream_api_key: must be a string")
        check(_is_int(self.mixture_decimals) and 1 <= self.mixture_decimals <= 6,
              f"mixture_decimals: must be in 1..6, got {self.mixture_decimals!r}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# ---------------------------------------------------------------------------------------------------------------
# OpenAI-style errors
# ---------------------------------------------------------------------------------------------------------------

class APIError(Exception):
    """An error answered as OpenAI's ``{"error": {"message", "type", "param", "code"}}`` with an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _invalid(param: str, message: str, status: int = 422, code: str = "invalid_value") -> APIError:
    return APIError(status, f"{param}: {message}", param=param, code=code)


# ---------------------------------------------------------------------------------------------------------------
# Request parsing (pure functions, also used by the proxy path)
# ---------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class GenRequest:
    """One validated generation request, in the engine's terms."""

    kind: str                               # "chat" or "completion"
    model: str                              # the model name as the client asked for it
    prompt: str                             # text handed to the engine
    chat: bool                              # True: the engine applies the chat template to ``prompt``
    route_text: str                         # the text routing looks at (user content, without template markup)
    max_tokens: int
    temperature: float
    top_p_sampling: float
    stop: list[str]
    seed: int | None
    stream: bool
    include_usage: bool
    top_p: float                            # router top-p
    weighting: str
    granularity: str
    max_adapters: int | None
    min_confidence: float | None
    weights: dict[str, float] | None        # forced mixture (task -> weight; {} = base model); None = routed
    adapter: str | None                     # a name registered through /v1/load_lora_adapter
    body: dict                              # the request body as received (the proxy forwards it)
    prompt_tokens: int = 0                  # counted while validating


def _get(body: dict, name: str, types: tuple, default=None, nullable: bool = True):
    v = body.get(name, default)
    if v is None:
        if name in body and not nullable:
            raise _invalid(name, "must not be null")
        return default
    if isinstance(v, bool) and bool not in types:
        raise _invalid(name, f"expected {'/'.join(t.__name__ for t in types)}, got boolean")
    if not isinstance(v, types):
        raise _invalid(name, f"expected {'/'.join(t.__name__ for t in types)}, got {_json_type(v)}")
    return v


def _json_type(v) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "integer", float: "number",
            type(None): "null"}.get(type(v), type(v).__name__)


def _message_text(content, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise _invalid(f"{where}.content[{j}]", "only text parts ({\"type\": \"text\", \"text\": ...}) are supported")
            parts.append(part["text"])
        return "".join(parts)
    raise _invalid(f"{where}.content", f"expected string or array of text parts, got {_json_type(content)}")


def chat_prompt(tokenizer, messages: list) -> tuple[str, bool, str]:
    """``(prompt, chat, route_text)`` for a list of chat messages.

    A single user message is handed to the engine as the question with ``chat=True`` (the engine applies the
    chat template exactly as in training and routes on the question). A conversation is rendered with the
    tokenizer's chat template here (``chat=False``) and routed on its user turns, joined by newlines.
    """
    if not isinstance(messages, list) or not messages:
        raise _invalid("messages", "expected a non-empty array of {role, content} objects")
    norm = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _invalid(where, f"expected an object, got {_json_type(m)}")
        role = m.get("role")
        if role not in ("system", "developer", "user", "assistant"):
            raise _invalid(f"{where}.role", f"must be system|developer|user|assistant, got {role!r}")
        norm.append({"role": "system" if role == "developer" else role, "content": _message_text(m.get("content"), where)})
    if norm[-1]["role"] == "assistant":
        raise _invalid("messages", "the last message must not be an assistant message (continuation is not supported)")
    user_texts = [m["content"] for m in norm if m["role"] == "user"]
    if not user_texts:
        raise _invalid("messages", "at least one user message is required")
    if len(norm) == 1:
        return norm[0]["content"], True, norm[0]["content"]
    if getattr(tokenizer, "chat_template", None):
        try:
            text = tokenizer.apply_chat_template(norm, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # a template that refuses this conversation (e.g. roles out of order)
            raise _invalid("messages", f"chat template refused the conversation ({str(e).splitlines()[0][:200]})") from None
    else:
        text = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in norm) + "Assistant: "
    return text, False, "\n".join(user_texts)


def parse_dlp(obj, config: ServeConfig) -> dict:
    """Validate the request's extra ``"dlp"`` object."""
    out = {"top_p": config.top_p, "weighting": config.weighting, "granularity": config.granularity,
           "weights": None, "max_adapters": config.max_adapters or None, "min_confidence": None}
    if obj is None:
        return out
    if not isinstance(obj, dict):
        raise _invalid("dlp", f"expected an object, got {_json_type(obj)}")
    known = {"top_p", "weighting", "granularity", "weights", "max_adapters", "min_confidence"}
    for k in obj:
        if k not in known:
            raise _invalid(f"dlp.{k}", f"unknown option (known: {', '.join(sorted(known))})")
    if obj.get("top_p") is not None:
        v = obj["top_p"]
        if not _is_num(v) or not 0 < v <= 1:
            raise _invalid("dlp.top_p", f"must be a number in (0, 1], got {v!r}")
        out["top_p"] = float(v)
    if obj.get("weighting") is not None:
        if obj["weighting"] not in ("paper", "renorm"):
            raise _invalid("dlp.weighting", f"must be paper|renorm, got {obj['weighting']!r}")
        out["weighting"] = obj["weighting"]
    if obj.get("granularity") is not None:
        if obj["granularity"] not in ("prompt", "sentence"):
            raise _invalid("dlp.granularity", f"must be prompt|sentence, got {obj['granularity']!r}")
        out["granularity"] = obj["granularity"]
    if obj.get("max_adapters") is not None:
        v = obj["max_adapters"]
        if not _is_int(v) or v < 0:
            raise _invalid("dlp.max_adapters", f"must be an integer >= 0, got {v!r}")
        out["max_adapters"] = v or None
    if obj.get("min_confidence") is not None:
        v = obj["min_confidence"]
        if not _is_num(v) or not 0 <= v <= 1:
            raise _invalid("dlp.min_confidence", f"must be a number in [0, 1], got {v!r}")
        out["min_confidence"] = float(v)
    if obj.get("weights") is not None:
        w = obj["weights"]
        if not isinstance(w, dict):
            raise _invalid("dlp.weights", f"expected an object {{task: weight}}, got {_json_type(w)}")
        out["weights"] = w  # names and values are checked against the adapters in parse_request
    return out


def check_weights(weights: dict, names: list[str], param: str = "dlp.weights") -> dict[str, float]:
    """Forced weights: known task names, finite numbers >= 0."""
    clean = {}
    for task, v in weights.items():
        if task not in names:
            raise APIError(422, f"{param}: unknown task {task!r} (adapters: {', '.join(names)})", param=param,
                           code="unknown_task")
        if not _is_num(v):
            raise _invalid(f"{param}.{task}", f"must be a finite number, got {v!r}")
        if v < 0:
            raise _invalid(f"{param}.{task}", f"must be >= 0, got {v!r}", code="negative_weight")
        clean[task] = float(v)
    return clean


def resolve_model(model: str, names: list[str], loaded: set[str] | dict) -> tuple[dict | None, str | None]:
    """``(forced weights or None, loaded adapter or None)`` for a model name; unknown -> 404."""
    if model == DLP_MODEL:
        return None, None
    if model == BASE_MODEL:
        return {}, None
    if model.startswith(DLP_MODEL + ":") and model[len(DLP_MODEL) + 1:] in names:
        return {model[len(DLP_MODEL) + 1:]: 1.0}, None
    if model in names:
        return {model: 1.0}, None
    if model in loaded:
        return None, model
    raise APIError(404, f"model {model!r} does not exist (see GET /v1/models)", param="model", code="model_not_found")


def parse_request(body, kind: str, *, names: list[str], loaded, tokenizer, config: ServeConfig,
                  count_tokens: Callable[[str, bool], int] | None = None) -> GenRequest:
    """Validate an OpenAI completions / chat-completions body; raises :class:`APIError` (400/404/422)."""
    if not isinstance(body, dict):
        raise APIError(400, f"request body: expected a JSON object, got {_json_type(body)}", code="invalid_json")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _invalid("model", "required: a model name string (see GET /v1/models)")
    n = _get(body, "n", (int,), 1)
    if n != 1:
        raise APIError(400, f"n: only n=1 is supported, got {n!r}", param="n", code="unsupported_value")
    for name, ok in (("best_of", lambda v: v in (None, 1)), ("echo", lambda v: v in (None, False)),
                     ("logprobs", lambda v: v in (None, False)), ("suffix", lambda v: v is None),
                     ("tools", lambda v: not v), ("functions", lambda v: not v)):
        if name in body and not ok(body[name]):
            raise APIError(400, f"{name}: not supported by this server", param=name, code="unsupported_value")
    if kind == "chat":
        if "messages" not in body:
            raise _invalid("messages", "required")
        prompt, chat, route_text = chat_prompt(tokenizer, body["messages"])
        max_tokens = _get(body, "max_completion_tokens", (int,), None)
        max_tokens = _get(body, "max_tokens", (int,), max_tokens)
    else:
        if "prompt" not in body:
            raise _invalid("prompt", "required")
        prompt = body["prompt"]
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise _invalid("prompt", f"expected a string (token arrays and batches are not supported), got {_json_type(prompt)}")
        chat, route_text = False, prompt
        max_tokens = _get(body, "max_tokens", (int,), None)
    if not prompt.strip():
        raise _invalid("prompt" if kind == "completion" else "messages", "must not be empty")
    if max_tokens is None:
        max_tokens = config.default_max_tokens
    if max_tokens < 1:
        raise _invalid("max_tokens", f"must be >= 1, got {max_tokens}")
    if max_tokens > config.max_tokens_cap:
        raise APIError(400, f"max_tokens: {max_tokens} is above this server's cap of {config.max_tokens_cap}",
                       param="max_tokens", code="max_tokens_exceeded")
    temperature = float(_get(body, "temperature", (int, float), 0.0))  # greedy by default (OpenAI: 1.0)
    if not math.isfinite(temperature) or not 0 <= temperature <= 2:
        raise _invalid("temperature", f"must be in [0, 2], got {temperature!r}")
    top_p_sampling = float(_get(body, "top_p", (int, float), 1.0))
    if not math.isfinite(top_p_sampling) or not 0 < top_p_sampling <= 1:
        raise _invalid("top_p", f"must be in (0, 1], got {top_p_sampling!r}")
    stop = _get(body, "stop", (str, list), None)
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise _invalid("stop", "expected a string or an array of at most 4 non-empty strings")
    seed = _get(body, "seed", (int,), None)
    stream = _get(body, "stream", (bool,), False)
    so = _get(body, "stream_options", (dict,), None) or {}
    include_usage = so.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise _invalid("stream_options.include_usage", f"expected boolean, got {_json_type(include_usage)}")
    dlp = parse_dlp(body.get("dlp"), config)
    forced, adapter = resolve_model(model, names, loaded)
    if dlp["weights"] is not None:
        if model != DLP_MODEL:
            raise _invalid("dlp.weights", f"manual weights need model {DLP_MODEL!r}, got {model!r}", status=400,
                           code="conflicting_options")
        forced = check_weights(dlp["weights"], names)
    req = GenRequest(kind=kind, model=model, prompt=prompt, chat=chat, route_text=route_text, max_tokens=max_tokens,
                     temperature=temperature, top_p_sampling=top_p_sampling, stop=list(stop), seed=seed,
                     stream=stream, include_usage=include_usage, top_p=dlp["top_p"], weighting=dlp["weighting"],
                     granularity=dlp["granularity"], max_adapters=dlp["max_adapters"],
                     min_confidence=dlp["min_confidence"], weights=forced, adapter=adapter, body=body)
    if count_tokens is not None:
        req.prompt_tokens = count_tokens(prompt, chat)
        if req.prompt_tokens > config.max_prompt_tokens:
            raise APIError(400, f"prompt: {req.prompt_tokens} tokens is above this server's limit of "
                                f"{config.max_prompt_tokens}", param="messages" if kind == "chat" else "prompt",
                           code="context_length_exceeded")
    return req


# ---------------------------------------------------------------------------------------------------------------
# The batching worker
# ---------------------------------------------------------------------------------------------------------------

class QueueFull(Exception):
    pass


class Job:
    """A queued request: the worker thread fills ``events`` (an asyncio queue on the request's loop)."""

    def __init__(self, req: GenRequest, loop: asyncio.AbstractEventLoop) -> None:
        self.req, self.loop = req, loop
        self.id = uuid.uuid4().hex[:24]
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = False
        self.t_submit = time.monotonic()

    def emit(self, kind: str, payload: Any) -> None:
        """Thread-safe: hand an event ("delta", "done", "error") to the request's event loop."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))
        except RuntimeError:  # the loop is closed (server shutting down)
            pass


@dataclasses.dataclass
class EngineStats:
    """What the worker saw; ``/health`` shows it and tests assert on it."""

    batch_sizes: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # rows per call
    batches: int = 0                        # engine calls
    rows: int = 0                           # rows generated (requests)
    completion_tokens: int = 0              # tokens generated in total
    cancelled: int = 0                      # rows stopped because their client went away
    dropped: int = 0                        # requests cancelled while still queued
    submitted: int = 0                      # requests accepted into the queue
    rejected: int = 0                       # requests answered 429 (queue full)
    errors: int = 0                         # engine calls that raised
    running: int = 0                        # rows in the engine call now

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["batch_sizes"] = {str(k): v for k, v in sorted(self.batch_sizes.items())}
        d["max_batch_seen"] = max(self.batch_sizes, default=0)
        return d


class Batcher:
    """A bounded request queue and the single worker thread that turns it into engine calls."""

    def __init__(self, run_batch: Callable[[list[Job]], None], config: ServeConfig, stats: EngineStats) -> None:
        self.run_batch, self.config, self.stats = run_batch, config, stats
        self._pending: collections.deque[Job] = collections.deque()
        self._cv = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None

    @property
    def pending(self) -> int:
        return len(self._pending)

    def start(self) -> None:
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="dlp-serve-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        with self._cv:
            self._stop = True
            for job in self._pending:
                job.cancelled = True
                job.emit("error", APIError(503, "server is shutting down", type="server_error", code="shutting_down"))
            self._pending.clear()
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, job: Job) -> None:
        with self._cv:
            if self._stop:
                raise APIError(503, "server is shutting down", type="server_error", code="shutting_down")
            if len(self._pending) >= self.config.max_queue:
                self.stats.rejected += 1
                raise QueueFull()
            self._pending.append(job)
            self.stats.submitted += 1
            self._cv.notify_all()

    def cancel(self, job: Job) -> None:
        """The client went away: drop the job if still queued, else make the engine stop its row."""
        with self._cv:
            job.cancelled = True
            try:
                self._pending.remove(job)
                self.stats.dropped += 1
            except ValueError:
                pass

    def _take(self) -> list[Job] | None:
        window = self.config.batch_window_ms / 1000.0
        with self._cv:
            while not self._pending and not self._stop:
                self._cv.wait()
            if self._stop:
                return None
            # Wait for company, but never longer than `window` after the oldest request arrived: requests that
            # queued while the previous batch ran are taken at once.
            deadline = self._pending[0].t_submit + window
            while len(self._pending) < self.config.max_batch and not self._stop:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cv.wait(left)
            batch = []
            while self._pending and len(batch) < self.config.max_batch:
                batch.append(self._pending.popleft())
            return batch

    def _loop(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            batch = [j for j in batch if not j.cancelled]
            if not batch:
                continue
            try:
                self.run_batch(batch)
            except BaseException as e:  # never let the worker die; every waiting request gets an answer
                self.stats.errors += 1
                err = e if isinstance(e, APIError) else APIError(
                    500, f"generation failed: {e.__class__.__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}",
                    type="server_error", code="generation_failed")
                for job in batch:
                    job.emit("error", err)


def group_key(req: GenRequest, engine: str) -> tuple:
    """Requests with equal keys can share one engine call (the other options are per row in the engine)."""
    sampled = req.temperature > 0
    return (engine, req.chat,
            req.top_p_sampling if sampled else 1.0,
            # a seeded sampled request runs alone, so that its sample does not depend on its batch mates
            (req.seed, id(req)) if (sampled and req.seed is not None) else None)


def routing_key(req: GenRequest) -> tuple | None:
    """The per-call routing options of a routed request; None for a forced mixture (any call can take it)."""
    if req.weights is not None or req.adapter is not None:
        return None
    return (req.top_p, req.weighting, req.granularity, req.max_adapters, req.min_confidence)


def split_groups(jobs: list[Job], engine_of: Callable[[Job], str]) -> list[list[Job]]:
    """Jobs -> engine calls, in arrival order of each call's first job. Forced-mixture requests join the first
    call with the same per-call options whatever its routing options."""
    groups: dict[tuple, list[Job]] = {}
    forced = []
    for job in jobs:
        rk = routing_key(job.req)
        if rk is None:
            forced.append(job)
        else:
            groups.setdefault((group_key(job.req, engine_of(job)), rk), []).append(job)
    for job in forced:
        gk = group_key(job.req, engine_of(job))
        home = next((k for k in groups if k[0] == gk), (gk, None))
        groups.setdefault(home, []).append(job)
    return list(groups.values())


# ---------------------------------------------------------------------------------------------------------------
# The engine side: main pipeline + adapters loaded at run time
# ---------------------------------------------------------------------------------------------------------------

class Engine:
    """Owns the pipeline and the adapters registered through ``/v1/load_lora_adapter``.

    Loaded adapters are served by a second pipeline over a second copy of the base model that fuses exactly
    the loaded adapters (one-hot weights): the task pipeline's adapter set, and with it the router's label
    order, never changes at run time. Only the worker thread generates; loading takes ``lock`` so it never
    races a running batch.
    """

    def __init__(self, pipeline, config: ServeConfig, stats: EngineStats) -> None:
        self.pipeline, self.config, self.stats = pipeline, config, stats
        self.names: list[str] = list(pipeline.names)
        self.tokenizer = pipeline.tokenizer
        # Request validation counts tokens on the event-loop thread while the worker tokenizes a batch: a fast
        # tokenizer is not safe for that (padding=True/False calls flip shared backend state and a batch then
        # fails with "Unable to create tensor"), so validation uses its own copy.
        try:
            self.count_tokenizer = copy.deepcopy(pipeline.tokenizer)
        except Exception:  # a tokenizer that cannot be copied: share it (single-request loads only)
            self.count_tokenizer = pipeline.tokenizer
        self.loaded: dict[str, dict] = {}          # name -> {"path", "rank", "created"}
        self._extra = None                        # pipeline fusing the loaded adapters (built lazily)
        self.lock = threading.RLock()

    # -- token counting ------------------------------------------------------------------------------------
    def count_tokens(self, prompt: str, chat: bool) -> int:
        from .data import format_prompt

        tok = self.count_tokenizer
        text = format_prompt(tok, prompt) if chat else prompt
        return len(tok(text, add_special_tokens=False)["input_ids"])

    # -- generation (worker thread) -------------------------------------------------------------------------
    def engine_of(self, job: Job) -> str:
        return "loaded" if job.req.adapter is not None else "main"

    def run_batch(self, jobs: list[Job]) -> None:
        for group in split_groups(jobs, self.engine_of):
            group = [j for j in group if not j.cancelled]
            if group:
                self._run_group(group)

    def _run_group(self, jobs: list[Job]) -> None:
        # per-call options: from the first routed request (forced ones do not use them)
        r0 = next((j.req for j in jobs if routing_key(j.req) is not None), jobs[0].req)
        # sampling options: equal for every sampled row of a group (group_key); greedy rows ignore them
        sampled = next((j.req for j in jobs if j.req.temperature > 0), None)
        sampler = dataclasses.replace(r0, top_p_sampling=sampled.top_p_sampling if sampled else 1.0,
                                      seed=sampled.seed if sampled else None)
        with self.lock:
            if r0.adapter is not None:
                missing = [j for j in jobs if j.req.adapter not in self.loaded]
                for j in missing:  # unloaded between validation and now
                    j.emit("error", APIError(404, f"model {j.req.adapter!r} was unloaded", param="model",
                                             code="model_not_found"))
                jobs = [j for j in jobs if j.req.adapter in self.loaded]
                if not jobs:
                    return
                pipe = self._extra_pipeline()
                weights = [{j.req.adapter: 1.0} for j in jobs]
            else:
                pipe = self.pipeline
                weights = [j.req.weights for j in jobs]  # None = routed, {} = base, dict = forced mixture
                routed_here = self._route_conversations(jobs, weights)

            def on_text(row: int, delta: str) -> bool:
                job = jobs[row]
                if job.cancelled:
                    return True
                if job.req.stream and delta:
                    job.emit("delta", delta)
                return False

            self.stats.batches += 1
            self.stats.batch_sizes[len(jobs)] += 1
            self.stats.running = len(jobs)
            try:
                results = pipe.generate(
                    [j.req.prompt for j in jobs], top_p=r0.top_p, weighting=r0.weighting, granularity=r0.granularity,
                    weights=weights, max_new_tokens=[j.req.max_tokens for j in jobs],
                    temperature=[j.req.temperature for j in jobs], top_p_sampling=sampler.top_p_sampling,
                    seed=sampler.seed, stop=[j.req.stop for j in jobs], chat=r0.chat,
                    max_adapters=r0.max_adapters, min_confidence=r0.min_confidence, on_text=on_text,
                    batch_size=len(jobs))
            finally:
                self.stats.running = 0
        if r0.adapter is None:
            for i, rec in routed_here.items():
                results[i].routing[0] = rec
        for job, res in zip(jobs, results):
            self.stats.rows += 1
            self.stats.completion_tokens += int(res.completion_tokens)
            if res.finish_reason == "cancelled" or job.cancelled:
                self.stats.cancelled += 1
            job.emit("done", res)

    def _route_conversations(self, jobs: list[Job], weights: list) -> dict[int, dict]:
        """Route multi-message chats here, on their user turns, and force that mixture (in place in
        ``weights``). The engine would otherwise split the rendered template into "sentences" such as
        ``<|im_start|>assistant`` and route on those. Departure from the paper (§3.2): such a conversation is
        routed once (prompt granularity), its output sentences are not re-routed. Returns row -> routing record."""
        rows = [i for i, j in enumerate(jobs) if weights[i] is None and j.req.kind == "chat" and not j.req.chat]
        if not rows:
            return {}
        r0 = jobs[rows[0]].req
        probs, w = self.pipeline.route([jobs[i].req.route_text for i in rows], top_p=r0.top_p,
                                       weighting=r0.weighting, max_adapters=r0.max_adapters,
                                       min_confidence=r0.min_confidence)
        out = {}
        for k, i in enumerate(rows):
            weights[i] = w[k]
            sel = sorted((t for t in range(len(self.names)) if float(w[k, t]) > 0), key=lambda t: (-float(w[k, t]), t))
            out[i] = {"sentence": jobs[i].req.route_text, "selected": [self.names[t] for t in sel],
                      "weights": [round(float(w[k, t]), 6) for t in sel],
                      "probs": {n: round(float(probs[k, t]), 6) for t, n in enumerate(self.names)}, "source": "prompt"}
        return out

    # -- adapters loaded at run time ------------------------------------------------------------------------
    def _extra_pipeline(self):
        if self._extra is None:
            self._extra = _build_extra_pipeline(self.pipeline, {k: v["path"] for k, v in self.loaded.items()})
        return self._extra

    def load_adapter(self, name: str, path: str) -> dict:
        """Register a PEFT LoRA folder under ``name`` (vLLM's /v1/load_lora_adapter)."""
        if not isinstance(name, str) or not name or not isinstance(path, str) or not path:
            raise APIError(400, "lora_name and lora_path: both required strings", param="lora_name",
                           code="invalid_value")
        if name in (DLP_MODEL, BASE_MODEL) or name.startswith(DLP_MODEL + ":") or name in self.names:
            raise APIError(400, f"lora_name: {name!r} is reserved (dlp, base, dlp:<task> and task names)",
                           param="lora_name", code="name_taken")
        p = Path(path)
        try:
            from .lora import check_adapter_dir
            cfg = check_adapter_dir(p)
        except DLPError as e:
            raise APIError(400, f"lora_path: {e}", param="lora_path", code="invalid_adapter") from None
        rank = max([int(cfg.get("r", 0) or 0)] + [int(v) for v in (cfg.get("rank_pattern") or {}).values()])
        if self.config.max_lora_rank and rank > self.config.max_lora_rank:
            raise APIError(400, f"lora_path: {p}: adapter rank {rank} is above this server's max_lora_rank "
                                f"{self.config.max_lora_rank}", param="lora_path", code="rank_too_large")
        with self.lock:
            if name in self.loaded:
                raise APIError(400, f"lora_name: {name!r} is already loaded (unload it first)", param="lora_name",
                               code="name_taken")
            if len(self.loaded) >= self.config.max_loaded_adapters:
                raise APIError(400, f"lora_name: {self.config.max_loaded_adapters} adapters are loaded already "
                                    "(unload one first)", param="lora_name", code="too_many_adapters")
            entry = {"path": str(p.resolve()), "rank": rank, "created": int(time.time())}
            trial = {**self.loaded, name: entry}
            try:  # build now so a bad adapter (other base model, ...) is refused here, not at generation
                extra = _build_extra_pipeline(self.pipeline, {k: v["path"] for k, v in trial.items()})
            except DLPError as e:
                raise APIError(400, f"lora_path: {e}", param="lora_path", code="invalid_adapter") from None
            self._drop_extra()
            self.loaded, self._extra = trial, extra
        return {"object": "lora_adapter", "lora_name": name, "lora_path": entry["path"], "rank": rank,
                "status": "loaded"}

    def unload_adapter(self, name: str) -> dict:
        with self.lock:
            if name not in self.loaded:
                raise APIError(404, f"lora_name: {name!r} is not loaded", param="lora_name", code="model_not_found")
            del self.loaded[name]
            self._drop_extra()
        return {"object": "lora_adapter", "lora_name": name, "status": "unloaded"}

    def _drop_extra(self) -> None:
        self._extra = None  # rebuilt lazily for the next request that needs it


def _build_extra_pipeline(pipeline, adapters: dict[str, str]):
    """A pipeline fusing ``adapters`` (name -> folder; no router) over a second copy of ``pipeline``'s model.

    The copy shares every weight tensor with the original (``deepcopy`` with all parameters and buffers in the
    memo), so it costs module objects, not memory; the task adapters' wrappers are swapped back to their base
    ``nn.Linear`` in the copy, then the loaded adapters are fused into it."""
    import copy
    import itertools

    from .fusion import fuse_adapters
    from .pipeline import DLPPipeline

    model = pipeline.model
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    twin = copy.deepcopy(model, memo)
    for name in pipeline.fused.layers:
        parent_name, _, child = name.rpartition(".")
        parent = twin.get_submodule(parent_name) if parent_name else twin
        setattr(parent, child, getattr(parent, child).base)
    fused = fuse_adapters(twin, list(adapters.values()), names=list(adapters))
    return DLPPipeline(twin, pipeline.tokenizer, fused, router=None)


# ---------------------------------------------------------------------------------------------------------------
# Responses
# ---------------------------------------------------------------------------------------------------------------

def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": int(prompt_tokens), "completion_tokens": int(completion_tokens),
            "total_tokens": int(prompt_tokens) + int(completion_tokens)}


def finish_reason(res) -> str:
    return "length" if res.finish_reason == "length" else "stop"


def response_body(req: GenRequest, rid: str, created: int, text: str, reason: str, use: dict, routing,
                  extra: dict | None = None) -> dict:
    if req.kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason,
                  "logprobs": None}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "finish_reason": reason, "logprobs": None}
        obj = "text_completion"
    body = {"id": rid, "object": obj, "created": created, "model": req.model, "choices": [choice],
            "usage": use, ROUTING_FIELD: routing, "system_fingerprint": None}
    if extra:
        body.update(extra)
    return body


def chunk_body(req: GenRequest, rid: str, created: int, delta: str | None, reason: str | None = None,
               role: bool = False, extra: dict | None = None, empty_choices: bool = False) -> dict:
    if req.kind == "chat":
        d: dict = {}
        if role:
            d["role"] = "assistant"
        if delta is not None:
            d["content"] = delta
        choice = {"index": 0, "delta": d, "finish_reason": reason, "logprobs": None}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": delta or "", "finish_reason": reason, "logprobs": None}
        obj = "text_completion"
    body = {"id": rid, "object": obj, "created": created, "model": req.model,
            "choices": [] if empty_choices else [choice], "system_fingerprint": None}
    if extra:
        body.update(extra)
    return body


def sse(obj) -> bytes:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode("utf-8")


# ---------------------------------------------------------------------------------------------------------------
# The app
# ---------------------------------------------------------------------------------------------------------------

async def read_json_body(request, max_bytes: int):
    """The request body parsed as JSON; 413 above ``max_bytes``, 400 when it is not JSON."""
    cl = request.headers.get("content-length")
    if cl is not None:
        try:
            if int(cl) > max_bytes:
                raise APIError(413, f"request body: {cl} bytes is above this server's limit of {max_bytes}",
                               code="body_too_large")
        except ValueError:
            raise APIError(400, "request body: bad Content-Length header", code="invalid_request") from None
    buf = bytearray()
    async for chunk in request.stream():
        buf += chunk
        if len(buf) > max_bytes:
            raise APIError(413, f"request body: above this server's limit of {max_bytes} bytes", code="body_too_large")
    try:
        return json.loads(bytes(buf).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise APIError(400, f"request body: invalid JSON ({e.__class__.__name__}: {e})", code="invalid_json") from None


def create_app(pipeline_or_run, config: ServeConfig | None = None, *, model: str = "default", router=None,
               proxy=None):
    """The FastAPI app serving ``pipeline_or_run`` (a :class:`DLPPipeline`, or a run folder loaded with
    ``model``). With ``config.upstream`` (or an explicit ``proxy``), generation is forwarded to that
    OpenAI-compatible LoRA server by :mod:`dlp_lora.proxy`; routing and mixture export stay here."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.background import BackgroundTask
    from starlette.exceptions import HTTPException as StarletteHTTPException

    config = config or ServeConfig()
    pipeline = pipeline_or_run
    if isinstance(pipeline_or_run, (str, Path)):
        pipeline = load_pipeline(pipeline_or_run, model=model, router=router)
    stats = EngineStats()
    engine = Engine(pipeline, config, stats)
    batcher = Batcher(engine.run_batch, config, stats)
    if proxy is None and config.upstream:
        from .proxy import UpstreamProxy

        proxy = UpstreamProxy(pipeline, config.upstream, cache_size=config.mixture_cache,
                              decimals=config.mixture_decimals, mixture_dir=config.mixture_dir or None,
                              timeout_s=config.upstream_timeout_s, base_model=config.upstream_model or None,
                              api_key=config.upstream_api_key, max_inflight=config.max_queue + config.max_batch)
    created_at = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        try:
            yield
        finally:
            batcher.stop()
            if proxy is not None:
                await proxy.aclose()

    app = FastAPI(title="DLP-LoRA", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.engine, app.state.stats, app.state.batcher, app.state.config = engine, stats, batcher, config
    app.state.proxy = proxy

    def err(e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc):  # unknown path / method in OpenAI's error shape
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return err(APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code=code))

    @app.exception_handler(Exception)
    async def _internal(request, exc):
        return err(APIError(500, f"internal error: {exc.__class__.__name__}", type="server_error",
                            code="internal_error"))

    def authorize(request) -> None:
        if not config.api_key:
            return
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), config.api_key.encode()):
            raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')",
                           type="authentication_error", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})

    @app.get("/health")
    async def health():
        body = {"status": "ok", "adapters": engine.names, "loaded_adapters": sorted(engine.loaded),
                "queue": batcher.pending, "max_queue": config.max_queue, "max_batch": config.max_batch,
                "engine": stats.as_dict(), "mode": "proxy" if proxy is not None else "local"}
        if proxy is not None:
            body["upstream"] = proxy.stats()
        return body

    @app.get("/v1/models")
    async def models(request: Request):
        try:
            authorize(request)
        except APIError as e:
            return err(e)
        entry = lambda mid, parent=BASE_MODEL: {"id": mid, "object": "model", "created": created_at,
                                                "owned_by": "dlp-lora", "root": BASE_MODEL, "parent": parent}
        data = [entry(BASE_MODEL, None), entry(DLP_MODEL)]
        data += [entry(f"{DLP_MODEL}:{n}") for n in engine.names]
        data += [entry(n) for n in engine.names]
        data += [entry(n) for n in sorted(engine.loaded)]
        return {"object": "list", "data": data}

    async def generate_endpoint(request, kind: str):
        try:
            authorize(request)
            body = await read_json_body(request, config.max_body_bytes)
            req = parse_request(body, kind, names=engine.names, loaded=engine.loaded, tokenizer=engine.count_tokenizer,
                                config=config, count_tokens=engine.count_tokens)
        except APIError as e:
            return err(e)
        if req.weights is None and req.adapter is None and getattr(pipeline, "router", None) is None:
            return err(APIError(400, f"model {req.model!r}: this server has no router; name an adapter "
                                     f"({DLP_MODEL}:<task>) or pass \"dlp\": {{\"weights\": {{...}}}}",
                                param="model", code="no_router"))
        if proxy is not None:
            return await forward(req)
        job = Job(req, asyncio.get_running_loop())
        try:
            batcher.submit(job)
        except QueueFull:
            return err(APIError(429, f"server busy: {config.max_queue} requests are queued; retry later",
                                type="rate_limit_error", code="queue_full",
                                headers={"Retry-After": str(config.retry_after_s)}))
        except APIError as e:
            return err(e)
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + job.id
        created = int(time.time())
        if req.stream:
            # the background task also runs when the client leaves before the first byte (the body generator,
            # never started, would not get to its finally): a finished job is unaffected by cancel()
            return StreamingResponse(stream_events(job, rid, created), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                                     background=BackgroundTask(batcher.cancel, job))
        return await wait_result(request, job, rid, created)

    async def forward(req: GenRequest):
        from .proxy import UpstreamError

        try:
            if req.stream:
                stream = await proxy.open_stream(req)
                return StreamingResponse(stream.body(), media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                                         background=BackgroundTask(stream.close))
            return JSONResponse(await proxy.complete(req))
        except UpstreamError as e:
            headers = {"Retry-After": str(config.retry_after_s)} if e.status == 429 else None
            return err(APIError(e.status, e.message, type=e.type, param=e.param, code=e.code, headers=headers))

    async def wait_result(request, job: Job, rid: str, created: int):
        try:
            while True:
                try:
                    kind, payload = await asyncio.wait_for(job.events.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        batcher.cancel(job)
                        return err(APIError(499, "client closed the request", code="client_closed"))
                    continue
                if kind == "error":
                    return err(payload)
                if kind == "done":
                    res = payload
                    return JSONResponse(response_body(job.req, rid, created, res.text, finish_reason(res),
                                                      usage(res.prompt_tokens, res.completion_tokens), res.routing))
        except asyncio.CancelledError:
            batcher.cancel(job)
            raise

    async def stream_events(job: Job, rid: str, created: int):
        req = job.req
        done = False
        try:
            if req.kind == "chat":
                yield sse(chunk_body(req, rid, created, "", role=True))
            while True:
                kind, payload = await job.events.get()
                if kind == "delta":
                    yield sse(chunk_body(req, rid, created, payload))
                elif kind == "error":
                    yield sse(payload.body())
                    break
                elif kind == "done":
                    res = payload
                    use = usage(res.prompt_tokens, res.completion_tokens)
                    yield sse(chunk_body(req, rid, created, None if req.kind == "chat" else "",
                                         reason=finish_reason(res), extra={ROUTING_FIELD: res.routing, "usage": use}))
                    if req.include_usage:
                        yield sse(chunk_body(req, rid, created, None, empty_choices=True, extra={"usage": use}))
                    break
            done = True
            yield b"data: [DONE]\n\n"
        finally:
            if not done:  # the client went away (or the server is stopping): free the slot
                batcher.cancel(job)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate_endpoint(request, "completion")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generate_endpoint(request, "chat")

    async def adapter_endpoint(request, action: str):
        try:
            authorize(request)
            body = await read_json_body(request, config.max_body_bytes)
            if not isinstance(body, dict):
                raise APIError(400, f"request body: expected a JSON object, got {_json_type(body)}",
                               code="invalid_json")
            if proxy is not None:
                raise APIError(400, f"/v1/{action}_lora_adapter: not available in proxy mode (load adapters on "
                                    f"the upstream {config.upstream})", code="unsupported_in_proxy_mode")
            name = body.get("lora_name")
            if not isinstance(name, str) or not name:
                raise _invalid("lora_name", "required: a non-empty string", status=400)
            if action == "load":
                path = body.get("lora_path")
                if not isinstance(path, str) or not path:
                    raise _invalid("lora_path", "required: a folder path string", status=400)
                out = await asyncio.to_thread(engine.load_adapter, name, path)
            else:
                out = await asyncio.to_thread(engine.unload_adapter, name)
        except APIError as e:
            return err(e)
        return out

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request):
        return await adapter_endpoint(request, "load")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: Request):
        return await adapter_endpoint(request, "unload")

    return app


# ---------------------------------------------------------------------------------------------------------------
# Running it
# ---------------------------------------------------------------------------------------------------------------

def load_pipeline(run, model: str | None = None, router=None, device: str | None = None):
    """The pipeline of a run: its adapters, its own base model unless ``model`` overrides it, and its router."""
    from .pipeline import DLPPipeline

    return DLPPipeline.from_run(run, model=model, router=router, device=device)


def _check_bind(host: str, port: int) -> int:
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
    """Load the run and serve it with uvicorn until interrupted."""
    import uvicorn

    config = config or ServeConfig()
    config.port = _check_bind(config.host, config.port)   # fail in one line before loading the model
    app = create_app(load_pipeline(run, model=model, router=router, device=device), config)
    url = f"http://{config.host}:{config.port}"
    mode = f" -> upstream {config.upstream}" if config.upstream else ""
    print(f"dlp-lora serve: {url}/v1 (models: {DLP_MODEL}, {BASE_MODEL}, "
          f"{', '.join(DLP_MODEL + ':' + n for n in app.state.engine.names)}){mode}", flush=True)
    if config.host not in ("127.0.0.1", "localhost", "::1") and not config.api_key:
        print(f"warning: listening on {config.host} without --api-key: anyone who can reach it can use it",
              flush=True)
    uvicorn.run(app, host=config.host, port=config.port, log_level=log_level)
