"""The server's wire format: its settings, its one error type, and OpenAI requests checked at the door.

Every field of a request is type- and range-checked here, before it can reach the engine: a value the engine
cannot take (a seed beyond 64 bits, a weight of 1e308, a number with thousands of digits, a lone surrogate in a
prompt) is a 4xx naming the field, never an exception inside a batch that other requests share.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Callable

from ..config import SEED_MAX, DLPError, check, parse_json
from ..selection import SelectionConfig
from ..data import format_conversation

DLP_MODEL = "dlp"
BASE_MODEL = "base"
ROUTING_FIELD = "dlp_routing"
# A field of the right name but a wrong type or value. OpenAI answers 400; this server has always answered 422
# (FastAPI's convention), and clients map both to the same "bad request" error.
INVALID = 422
MAX_WEIGHT = 100.0                      # a manual mixture weight above this only overflows the activations
MAX_STOP_CHARS = 256                    # stop strings are matched at every decode step
MAX_STOPS = 4                           # as OpenAI
MIXTURE_MODES = ("shared", "private")
SCHEDULERS = ("continuous", "static")   # per decode step (rows join and leave) | batch at a time


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def short(v: Any, n: int = 40) -> str:
    """``repr`` cut to ``n`` characters (a value with thousands of digits must not fill an error line)."""
    try:
        r = repr(v) if not _is_int(v) or v.bit_length() < 128 else f"an integer of {len(str(abs(v)))} digits"
    except ValueError:                  # beyond Python's digit limit for str(int)
        r = "an integer of more than 4000 digits"
    return r if len(r) <= n else r[: n - 3] + "..."


@dataclasses.dataclass
class ServeConfig:
    """How ``dlp-lora serve`` runs; every limit is enforced per request."""

    host: str = "127.0.0.1"                 # bind address (loopback unless told otherwise)
    port: int = 8000                        # TCP port (0: any free port)
    api_key: str = ""                       # when set, every path but /health needs "Authorization: Bearer <key>"
    scheduler: str = "continuous"           # "continuous": rows join/leave every decode step; "static": per batch
    max_batch: int = 16                     # most requests decoding at once (static: joined into one engine call)
    prefill_chunk: int = 128                # continuous: a joining prompt is prefilled this many tokens per step
    batch_window_ms: float = 10.0           # wait at most this long after a request arrives for others to join
    max_queue: int = 64                     # requests waiting for the engine at most; beyond -> 429
    max_tokens_cap: int = 512               # largest max_tokens a request may ask for (above -> 400)
    default_max_tokens: int = 64            # max_tokens when a request gives none
    max_prompt_tokens: int = 2048           # longest prompt in tokens, after chat formatting (above -> 400)
    max_body_bytes: int = 1_000_000         # largest request body (above -> 413)
    selection: SelectionConfig = dataclasses.field(default_factory=SelectionConfig)  # a request's "dlp" defaults
    retry_after_s: int = 1                  # Retry-After header value on 429
    max_loaded_adapters: int = 16           # adapters /v1/load_lora_adapter may hold at once (beyond -> 400)
    max_lora_rank: int = 0                  # refuse loaded adapters of higher rank, like vLLM --max-lora-rank (0: any)
    adapter_roots: tuple = ()               # folders /v1/load_lora_adapter may read below (empty: the run folder)
    upstream: str = ""                      # proxy mode: OpenAI-compatible LoRA server URL (see serve.proxy)
    upstream_model: str = ""                # proxy mode: upstream's base model id ("" = discover from /v1/models)
    upstream_api_key: str = ""              # proxy mode: bearer key sent to the upstream ("" = none)
    upstream_timeout_s: float = 30.0        # proxy mode: one upstream call at most this long (beyond -> 504)
    mixture_cache: int = 32                 # proxy mode: exported mixtures kept loaded upstream (LRU)
    mixture_decimals: int = 2               # proxy mode: mixture weights are rounded to this many decimals
    mixture_dir: str = ""                   # proxy mode: where mixtures are exported ("" = a private temp folder)
    mixture_mode: str = ""                  # proxy mode: "shared" (0755/0644: an upstream running as another user
                                            # reads them) | "private" (0700/0600); "" = shared with mixture_dir

    def __post_init__(self) -> None:
        check(isinstance(self.host, str) and self.host.strip() != "", "host: must be a non-empty address")
        check(_is_int(self.port) and 0 <= self.port <= 65535, f"port: must be in 0..65535, got {short(self.port)}")
        check(isinstance(self.api_key, str), "api_key: must be a string")
        check(isinstance(self.selection, SelectionConfig),
              f"selection: must be a SelectionConfig, got {type(self.selection).__name__}")
        check(self.scheduler in SCHEDULERS,
              f"scheduler: must be {' | '.join(SCHEDULERS)}, got {short(self.scheduler)}")
        for name in ("max_batch", "prefill_chunk", "max_queue", "max_tokens_cap", "default_max_tokens",
                     "max_prompt_tokens", "max_body_bytes", "retry_after_s", "max_loaded_adapters", "mixture_cache"):
            v = getattr(self, name)
            check(_is_int(v) and 0 < v <= 2 ** 40, f"{name}: must be a positive integer, got {short(v)}")
        check(self.default_max_tokens <= self.max_tokens_cap,
              f"default_max_tokens: {self.default_max_tokens} is above max_tokens_cap {self.max_tokens_cap}")
        check(_is_num(self.batch_window_ms) and 0 <= self.batch_window_ms <= 10_000,
              f"batch_window_ms: must be in [0, 10000], got {short(self.batch_window_ms)}")
        check(_is_int(self.max_lora_rank) and 0 <= self.max_lora_rank <= 65536,
              f"max_lora_rank: must be in 0..65536, got {short(self.max_lora_rank)}")
        self.adapter_roots = tuple(str(r) for r in (self.adapter_roots or ()))
        self._check_upstream()

    def _check_upstream(self) -> None:
        check(isinstance(self.upstream, str), "upstream: must be a URL string")
        if self.upstream:
            check(self.upstream.startswith(("http://", "https://")),
                  f"upstream: must start with http:// or https://, got {short(self.upstream)}")
        check(_is_num(self.upstream_timeout_s) and 0 < self.upstream_timeout_s <= 3600,
              f"upstream_timeout_s: must be in (0, 3600] seconds, got {short(self.upstream_timeout_s)}")
        check(isinstance(self.upstream_api_key, str), "upstream_api_key: must be a string")
        check(_is_int(self.mixture_decimals) and 1 <= self.mixture_decimals <= 6,
              f"mixture_decimals: must be in 1..6, got {short(self.mixture_decimals)}")
        check(self.mixture_mode in ("",) + MIXTURE_MODES,
              f"mixture_mode: must be {' | '.join(MIXTURE_MODES)}, got {short(self.mixture_mode)}")


# errors -----------------------------------------------------------------------------------------------------------

class APIError(Exception):
    """The server's one error type: an HTTP status and OpenAI's ``{"error": {message, type, param, code}}``."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(param: str, message: str, status: int = INVALID, code: str = "invalid_value") -> APIError:
    return APIError(status, f"{param}: {message}", param=param, code=code)


def json_type(v) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "integer", float: "number",
            type(None): "null"}.get(type(v), type(v).__name__)


def sse(obj) -> bytes:
    """One server-sent event carrying ``obj`` as JSON."""
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode("utf-8")


# the body as a whole ----------------------------------------------------------------------------------------------

def parse_body(raw: bytes, where: str = "request body") -> Any:
    """JSON of a request body, read by the project's one JSON reader (:func:`~dlp_lora.config.parse_json`): 400
    for bytes that are not UTF-8 JSON, nesting too deep to parse, integers beyond Python's digit limit, a lone
    surrogate such as ``"\\ud800"`` (no tokenizer takes it) and NaN/Infinity (not JSON; no upstream takes them)."""
    label = f"{where} (invalid JSON)"
    try:
        obj = parse_json(raw.decode("utf-8"), label)
    except UnicodeDecodeError as e:
        raise APIError(400, f"{label}: not UTF-8 text (bad byte at offset {e.start})", code="invalid_json") from None
    except DLPError as e:
        raise APIError(400, str(e), code="invalid_json") from None
    check_finite(obj, where)
    return obj


def check_finite(obj: Any, where: str = "request body") -> None:
    """Refuse NaN and Infinity anywhere in a parsed body (Python's JSON reader accepts them, and 1e400)."""
    stack: list[tuple[str, Any]] = [("", obj)]
    while stack:
        path, v = stack.pop()
        if isinstance(v, float) and not math.isfinite(v):
            raise APIError(400, f"{path or where}: {v} is not a JSON number", param=path or None,
                           code="invalid_value")
        if isinstance(v, dict):
            stack.extend((f"{path}.{k}" if path else str(k), x) for k, x in v.items())
        elif isinstance(v, list):
            stack.extend((f"{path}[{i}]", x) for i, x in enumerate(v))


# fields -----------------------------------------------------------------------------------------------------------

def get_field(body: dict, name: str, types: tuple, default=None):
    """``body[name]`` of one of ``types`` (booleans are not numbers); ``default`` when absent or null."""
    v = body.get(name)
    if v is None:
        return default
    if (isinstance(v, bool) and bool not in types) or not isinstance(v, types):
        raise invalid(name, f"expected {'/'.join(t.__name__ for t in types)}, got {json_type(v)}")
    return v


def number_field(body: dict, name: str, lo: float, hi: float, default: float, low_open: bool = False) -> float:
    """A number in ``[lo, hi]`` (``(lo, hi]`` with ``low_open``). Compared before any float conversion, so an
    integer with hundreds of digits is refused, not overflowed."""
    v = get_field(body, name, (int, float), default)
    if not ((lo < v if low_open else lo <= v) and v <= hi):
        interval = f"({lo:g}, {hi:g}]" if low_open else f"[{lo:g}, {hi:g}]"
        raise invalid(name, f"must be a number in {interval}, got {short(v)}")
    return float(v)


def int_field(body: dict, name: str, lo: int, hi: int, default: int | None) -> int | None:
    v = get_field(body, name, (int,), default)
    if v is not None and not lo <= v <= hi:
        raise invalid(name, f"must be an integer in [{lo}, {hi}], got {short(v)}")
    return v


# the request ------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class GenRequest:
    """One validated generation request, in the engine's terms."""

    kind: str                               # "chat" or "completion"
    model: str                              # the model name as the client asked for it
    prompt: str                             # text handed to the engine
    chat: bool                              # True: the engine applies the chat template to ``prompt``
    route_text: str                         # the text routing looks at (user content, without template markup)
    max_tokens: int                         # most tokens to generate
    temperature: float                      # 0 = greedy
    top_p_sampling: float                   # nucleus sampling top-p (the OpenAI field "top_p")
    stop: list[str]                         # stop strings (at most MAX_STOPS)
    seed: int | None                        # sampling seed
    stream: bool                            # answer as server-sent events
    include_usage: bool                     # stream_options.include_usage
    ignore_eos: bool                        # go on past EOS up to max_tokens (vLLM's extension; benchmarks)
    selection: SelectionConfig              # router options: the server defaults with the request's "dlp" fields
    weights: dict[str, float] | None        # forced mixture (task -> weight; {} = base model); None = routed
    adapter: str | None                     # a name registered through /v1/load_lora_adapter
    body: dict                              # the request body as received (the proxy forwards it)
    prompt_tokens: int = 0                  # counted while validating


def _message_text(content, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise invalid(f"{where}.content[{j}]", "only text parts ({\"type\": \"text\", \"text\": ...}) are supported")
            parts.append(part["text"])
        return "".join(parts)
    raise invalid(f"{where}.content", f"expected string or array of text parts, got {json_type(content)}")


def _messages(messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise invalid("messages", "expected a non-empty array of {role, content} objects")
    norm = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise invalid(where, f"expected an object, got {json_type(m)}")
        role = m.get("role")
        if role not in ("system", "developer", "user", "assistant"):
            raise invalid(f"{where}.role", f"must be system|developer|user|assistant, got {short(role)}")
        norm.append({"role": "system" if role == "developer" else role, "content": _message_text(m.get("content"), where)})
    if norm[-1]["role"] == "assistant":
        raise invalid("messages", "the last message must not be an assistant message (continuation is not supported)")
    if not any(m["role"] == "user" for m in norm):
        raise invalid("messages", "at least one user message is required")
    return norm


def chat_prompt(tokenizer, messages: list) -> tuple[str, bool, str]:
    """``(prompt, chat, route_text)`` for a list of chat messages.

    A single user message is handed to the engine as the question with ``chat=True`` (the engine applies the
    chat template exactly as in training and routes on the question). A conversation is rendered with the
    tokenizer's chat template here (``chat=False``) and routed on its user turns, joined by newlines.
    """
    norm = _messages(messages)
    user_texts = [m["content"] for m in norm if m["role"] == "user"]
    if len(norm) == 1:
        return norm[0]["content"], True, norm[0]["content"]
    try:
        text = format_conversation(tokenizer, norm)
    except Exception as e:  # a template that refuses this conversation (e.g. roles out of order)
        raise invalid("messages", f"chat template refused the conversation ({str(e).splitlines()[0][:200]})") from None
    return text, False, "\n".join(user_texts)


def parse_selection(obj: dict, defaults: SelectionConfig) -> SelectionConfig:
    """The request's ``dlp`` selection fields over the server defaults; each field is tried alone first so that
    the error names it."""
    fields = {f.name for f in dataclasses.fields(SelectionConfig)}
    given = {k: v for k, v in obj.items() if k != "weights" and v is not None}
    for k in given:
        if k not in fields:
            raise invalid(f"dlp.{k}", f"unknown option (known: {', '.join(sorted(fields | {'weights'}))})")
        try:
            SelectionConfig.from_mapping({k: given[k]}, base=defaults, where="")
        except DLPError as e:
            raise invalid(f"dlp.{k}", str(e).partition(": ")[2] or str(e)) from None
    return SelectionConfig.from_mapping(given, base=defaults, where="dlp")


def check_weights(weights, names: list[str], param: str = "dlp.weights") -> dict[str, float]:
    """A forced mixture: ``{task: weight}`` with known task names and numbers in [0, MAX_WEIGHT]."""
    if not isinstance(weights, dict):
        raise invalid(param, f"expected an object {{task: weight}}, got {json_type(weights)}")
    clean = {}
    for task, v in weights.items():
        if task not in names:
            raise APIError(INVALID, f"{param}: unknown task {short(task)} (adapters: {', '.join(names)})",
                           param=param, code="unknown_task")
        if not _is_num(v):
            raise invalid(f"{param}.{task}", f"must be a number, got {json_type(v)}")
        if v < 0:
            raise invalid(f"{param}.{task}", f"must be >= 0, got {short(v)}", code="negative_weight")
        if not v <= MAX_WEIGHT:
            raise invalid(f"{param}.{task}", f"must be at most {MAX_WEIGHT:g}, got {short(v)}")
        clean[task] = float(v)
    return clean


def resolve_model(model: str, names: list[str], loaded) -> tuple[dict | None, str | None]:
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
    raise APIError(404, f"model {short(model, 80)} does not exist (see GET /v1/models)", param="model",
                   code="model_not_found")


_UNSUPPORTED = (("best_of", lambda v: v in (None, 1)), ("echo", lambda v: v in (None, False)),
                ("logprobs", lambda v: v in (None, False)), ("suffix", lambda v: v is None),
                ("tools", lambda v: not v), ("functions", lambda v: not v))


def _check_supported(body: dict) -> None:
    n = get_field(body, "n", (int,), 1)
    if n != 1:
        raise APIError(400, f"n: only n=1 is supported, got {short(n)}", param="n", code="unsupported_value")
    for name, ok in _UNSUPPORTED:
        if name in body and not ok(body[name]):
            raise APIError(400, f"{name}: not supported by this server", param=name, code="unsupported_value")


def _prompt(body: dict, kind: str, tokenizer) -> tuple[str, bool, str, int | None]:
    """``(prompt, chat, route_text, max_tokens or None)`` of a chat or completions body."""
    if kind == "chat":
        if "messages" not in body:
            raise invalid("messages", "required")
        prompt, chat, route_text = chat_prompt(tokenizer, body["messages"])
        where = "max_tokens" if body.get("max_tokens") is not None else "max_completion_tokens"
        max_tokens = body.get(where)
    else:
        if "prompt" not in body:
            raise invalid("prompt", "required")
        prompt = body["prompt"]
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise invalid("prompt", f"expected a string (token arrays and batches are not supported), got {json_type(prompt)}")
        chat, route_text, max_tokens, where = False, prompt, body.get("max_tokens"), "max_tokens"
    if not prompt.strip():
        raise invalid("prompt" if kind == "completion" else "messages", "must not be empty")
    return prompt, chat, route_text, get_field({where: max_tokens}, where, (int,), None)


def _max_tokens(value: int | None, config: ServeConfig) -> int:
    if value is None:
        return config.default_max_tokens
    if value < 1:
        raise invalid("max_tokens", f"must be >= 1, got {short(value)}")
    if value > config.max_tokens_cap:
        raise APIError(400, f"max_tokens: {short(value)} is above this server's cap of {config.max_tokens_cap}",
                       param="max_tokens", code="max_tokens_exceeded")
    return value


def _stops(body: dict) -> list[str]:
    stop = get_field(body, "stop", (str, list), None)
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if len(stop) > MAX_STOPS or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stop):
        raise invalid("stop", f"expected a string or an array of at most {MAX_STOPS} non-empty strings of at most "
                              f"{MAX_STOP_CHARS} characters")
    return list(stop)


def _include_usage(body: dict) -> bool:
    so = get_field(body, "stream_options", (dict,), None) or {}
    include_usage = so.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise invalid("stream_options.include_usage", f"expected boolean, got {json_type(include_usage)}")
    return include_usage


def _mixture(body: dict, model: str, names: list[str], loaded, defaults: SelectionConfig):
    """``(selection, forced weights or None, loaded adapter or None)`` from the model name and ``dlp``."""
    dlp = body.get("dlp")
    if dlp is not None and not isinstance(dlp, dict):
        raise invalid("dlp", f"expected an object, got {json_type(dlp)}")
    dlp = dlp or {}
    selection = parse_selection(dlp, defaults)
    weights = check_weights(dlp["weights"], names) if dlp.get("weights") is not None else None
    forced, adapter = resolve_model(model, names, loaded)
    if weights is not None:
        if model != DLP_MODEL:
            raise invalid("dlp.weights", f"manual weights need model {DLP_MODEL!r}, got {short(model)}", status=400,
                          code="conflicting_options")
        forced = weights
    return selection, forced, adapter


def parse_request(body, kind: str, *, names: list[str], loaded, tokenizer, config: ServeConfig,
                  count_tokens: Callable[[str, bool], int] | None = None,
                  context_length: int | None = None) -> GenRequest:
    """Validate an OpenAI completions / chat-completions body; raises :class:`APIError` (400/404/413/422)."""
    if not isinstance(body, dict):
        raise APIError(400, f"request body: expected a JSON object, got {json_type(body)}", code="invalid_json")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise invalid("model", "required: a model name string (see GET /v1/models)")
    _check_supported(body)
    prompt, chat, route_text, max_tokens = _prompt(body, kind, tokenizer)
    req = GenRequest(kind=kind, model=model, prompt=prompt, chat=chat, route_text=route_text,
                     max_tokens=_max_tokens(max_tokens, config),
                     temperature=number_field(body, "temperature", 0, 2, 0.0),  # greedy by default (OpenAI: 1)
                     top_p_sampling=number_field(body, "top_p", 0, 1, 1.0, low_open=True),
                     stop=_stops(body), seed=int_field(body, "seed", 0, SEED_MAX, None),
                     stream=get_field(body, "stream", (bool,), False), include_usage=_include_usage(body),
                     ignore_eos=get_field(body, "ignore_eos", (bool,), False),
                     selection=config.selection, weights=None, adapter=None, body=body)
    req.selection, req.weights, req.adapter = _mixture(body, model, names, loaded, config.selection)
    if count_tokens is not None:
        _check_length(req, count_tokens(prompt, chat), config, context_length)
    return req


def _check_length(req: GenRequest, prompt_tokens: int, config: ServeConfig, context_length: int | None) -> None:
    param = "messages" if req.kind == "chat" else "prompt"
    req.prompt_tokens = prompt_tokens
    if prompt_tokens > config.max_prompt_tokens:
        raise APIError(400, f"{param}: {prompt_tokens} tokens is above this server's limit of "
                            f"{config.max_prompt_tokens}", param=param, code="context_length_exceeded")
    if context_length and prompt_tokens + req.max_tokens > context_length:
        raise APIError(400, f"{param}: {prompt_tokens} prompt tokens + max_tokens {req.max_tokens} is above the "
                            f"model's context of {context_length} tokens", param=param,
                       code="context_length_exceeded")
