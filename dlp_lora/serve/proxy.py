"""Routing in front of an OpenAI-compatible LoRA server (vLLM, SGLang, LoRAX, or ``dlp-lora serve`` itself).

``dlp-lora serve --upstream URL`` keeps the router here and forwards generation (DESIGN §2):

* the router picks the mixture of a request (once per request: the upstream serves one adapter per request, so
  this is the paper's *prompt* granularity, not its per-sentence re-routing - a documented departure, §3.2);
* **no adapter** (all weights zero, ``base``) -> the upstream's base model;
* **top-1** (one adapter with weight 1) -> the task adapter by name (``model: <task>``; the upstream was started
  with ``--lora-modules <task>=<path>``);
* **a mixture** -> the weights are rounded (``decimals``), exported once with ``FusedAdapters.export_mixture`` as
  an exact rank-Σr PEFT adapter, registered upstream through ``POST /v1/load_lora_adapter`` and then used by
  name. Exported mixtures sit in a bounded LRU cache keyed by the rounded weights; an evicted mixture is
  unloaded upstream (``/v1/unload_lora_adapter``) and its folder deleted. A mixture in use by a running request
  is never evicted.

Everything the upstream sends is untrusted: an answer that is not an OpenAI completion (a JSON array, ``null``,
``{}`` without ``choices``, NaN, a non-SSE body on a streamed request, a malformed chunk) is a clean 502, or on a
stream that has started an error event followed by ``data: [DONE]``. Unreachable -> 502, slower than
``timeout_s`` -> 504, adapter refused -> 502 with the upstream's reason. Errors are :class:`APIError`.
No FastAPI here: the app turns results into responses; httpx is imported inside functions.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any, AsyncIterator

from ..config import DLPError
from .schema import APIError, ServeConfig, parse_body, sse

MIX_PREFIX = "dlp-mix-"
SHARED_MODES = (0o755, 0o644)            # folders, files: an upstream running as another user can read them
PRIVATE_MODES = (0o700, 0o600)


def upstream_error(status: int, message: str, code: str = "upstream_error") -> APIError:
    return APIError(status, message, type="upstream_error", code=code)


@dataclasses.dataclass
class Plan:
    """Where one request goes upstream."""

    model: str                              # upstream model name: base model, task adapter or mixture
    kind: str                               # "base" | "top1" | "mixture"
    weights: list[float]                    # the mixture served (rounded), one per task
    routing: list[dict]                     # dlp_routing entries (same shape as the engine's)
    cache: str | None = None                # "hit" | "miss" for mixtures


def mixture_key(weights, decimals: int) -> tuple[float, ...]:
    """Weights rounded to ``decimals`` (the cache key, and the mixture actually served)."""
    return tuple(round(float(w), decimals) + 0.0 for w in weights)


def mixture_name(key: tuple[float, ...]) -> str:
    digest = hashlib.sha1(json.dumps(key).encode()).hexdigest()[:12]
    return f"{MIX_PREFIX}{digest}"


def set_mode(path: Path, modes: tuple[int, int]) -> None:
    """``chmod`` a folder tree: folders to ``modes[0]``, files to ``modes[1]``."""
    os.chmod(path, modes[0])
    for root, dirs, files in os.walk(path):
        for d in dirs:
            os.chmod(os.path.join(root, d), modes[0])
        for f in files:
            os.chmod(os.path.join(root, f), modes[1])


class UpstreamProxy:
    """Forwards routed requests to an OpenAI-compatible LoRA server; owns the mixture cache."""

    def __init__(self, pipeline, url: str, cache_size: int = 32, decimals: int = 2, mixture_dir: str | None = None,
                 timeout_s: float = 30.0, base_model: str | None = None, api_key: str = "",
                 max_inflight: int = 256, mixture_mode: str = "") -> None:
        if cache_size < 1:
            raise DLPError(f"mixture cache: size must be >= 1, got {cache_size}")
        self.pipeline = pipeline
        self.names: list[str] = list(pipeline.names)
        url = url.rstrip("/")
        self.url = url[:-3] if url.endswith("/v1") else url
        self.cache_size, self.decimals, self.timeout_s = cache_size, decimals, timeout_s
        self.base_model, self.api_key, self.max_inflight = base_model, api_key, max_inflight
        self._open_mixture_dir(mixture_dir, mixture_mode)
        self.cache: collections.OrderedDict[tuple, str] = collections.OrderedDict()  # key -> name (LRU order)
        self._loading: dict[tuple, asyncio.Future] = {}
        self._inuse: collections.Counter = collections.Counter()
        self._client = None
        self.inflight = 0
        self.counters = collections.Counter()
        self._route_lock = threading.Lock()   # routing runs in worker threads; tokenizers are not thread-safe

    @classmethod
    def from_config(cls, pipeline, config: ServeConfig, max_inflight: int) -> "UpstreamProxy":
        return cls(pipeline, config.upstream, cache_size=config.mixture_cache, decimals=config.mixture_decimals,
                   mixture_dir=config.mixture_dir or None, timeout_s=config.upstream_timeout_s,
                   base_model=config.upstream_model or None, api_key=config.upstream_api_key,
                   max_inflight=max_inflight, mixture_mode=config.mixture_mode)

    def _open_mixture_dir(self, mixture_dir: str | None, mode: str) -> None:
        """A given folder is shared by default (the upstream reads it, maybe as another user); the temp folder
        used without one is private by default."""
        self.shared = mode == "shared" or (mode == "" and mixture_dir is not None)
        self._own_dir = mixture_dir is None
        try:
            if mixture_dir is None:
                self.mixture_dir = Path(tempfile.mkdtemp(prefix="dlp-mixtures-"))
            else:
                self.mixture_dir = Path(mixture_dir)
                created = not self.mixture_dir.exists()
                self.mixture_dir.mkdir(parents=True, exist_ok=True)
                if not created:
                    return                    # the user's own folder keeps the mode the user gave it
            os.chmod(self.mixture_dir, (SHARED_MODES if self.shared else PRIVATE_MODES)[0])
        except OSError as e:
            raise DLPError(f"--mixture-dir {mixture_dir}: cannot create ({e.strerror or e})") from None

    # plumbing ------------------------------------------------------------------------------------------------------
    def client(self):
        if self._client is None:
            import httpx

            self._client = httpx.AsyncClient(timeout=httpx.Timeout(self.timeout_s, connect=min(10.0, self.timeout_s)))
        return self._client

    def _headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    async def aclose(self) -> None:
        """Unload our mixtures upstream (best effort: their files may be deleted next), close the client."""
        if self._client is not None:
            for name in list(self.cache.values()):
                try:
                    await self._client.post(self.url + "/v1/unload_lora_adapter", json={"lora_name": name},
                                            headers=self._headers(), timeout=5.0)
                except Exception:
                    pass
            self.cache.clear()
            await self._client.aclose()
            self._client = None
        if self._own_dir:
            shutil.rmtree(self.mixture_dir, ignore_errors=True)

    def stats(self) -> dict:
        return {"url": self.url, "base_model": self.base_model, "mixture_cache_size": self.cache_size,
                "mixtures_loaded": list(self.cache.values()), "inflight": self.inflight, **dict(self.counters)}

    def _transport_error(self, e: BaseException, what: str) -> APIError:
        import httpx

        self.counters["upstream_errors"] += 1
        if isinstance(e, (httpx.TimeoutException, asyncio.TimeoutError)):
            return upstream_error(504, f"upstream {self.url}: no answer within {self.timeout_s:g} s during {what}",
                                  "upstream_timeout")
        return upstream_error(502, f"upstream {self.url}: unreachable during {what} ({e.__class__.__name__}: "
                                   f"{str(e)[:200]})", "upstream_unreachable")

    async def _post(self, path: str, body: dict, what: str):
        """POST with the whole call bounded by ``timeout_s`` (httpx bounds each read, not the total)."""
        try:
            return await asyncio.wait_for(self.client().post(self.url + path, json=body, headers=self._headers()),
                                          self.timeout_s)
        except Exception as e:
            raise self._transport_error(e, what) from None

    def _bad_answer(self, what: str, why: str) -> APIError:
        self.counters["upstream_bad_answers"] += 1
        return upstream_error(502, f"upstream {self.url}: {what}: {why}", "upstream_bad_response")

    @staticmethod
    def _reason(resp) -> str:
        """The upstream's error message (OpenAI JSON, vLLM's {"message"} or plain text), one line."""
        try:
            data = resp.json()
            e = data.get("error", data) if isinstance(data, dict) else None
            if isinstance(e, dict) and e.get("message"):
                return " ".join(str(e["message"]).split())[:500]
            if isinstance(e, str):
                return " ".join(e.split())[:500]
        except Exception:
            pass
        return " ".join((resp.text or "").split())[:500] or resp.reason_phrase

    async def upstream_base_model(self) -> str:
        """The upstream's base model id: the ``/v1/models`` entry without a ``parent`` (vLLM lists LoRA
        adapters with ``parent`` = the base model)."""
        if self.base_model:
            return self.base_model
        try:
            resp = await asyncio.wait_for(self.client().get(self.url + "/v1/models", headers=self._headers()),
                                          self.timeout_s)
        except Exception as e:
            raise self._transport_error(e, "GET /v1/models") from None
        if resp.status_code != 200:
            raise upstream_error(502, f"upstream {self.url}: GET /v1/models answered HTTP {resp.status_code}: "
                                      f"{self._reason(resp)}")
        try:
            roots = [m["id"] for m in resp.json()["data"] if not m.get("parent")]
            assert roots and all(isinstance(r, str) and r for r in roots)
        except Exception:
            raise self._bad_answer("GET /v1/models", "not an OpenAI model list with a base model "
                                                     "(pass --upstream-model)") from None
        self.base_model = roots[0]
        return self.base_model

    # routing -------------------------------------------------------------------------------------------------------
    def _route(self, req) -> tuple[list[float], Any]:
        """(weights per task, router probs row or None) for one request; runs in a worker thread."""
        if req.weights is not None:  # forced: dlp:<task>, <task>, base, or "dlp": {"weights": ...}
            return [float(req.weights.get(n, 0.0)) for n in self.names], None
        with self._route_lock:
            probs, weights = self.pipeline.route([req.route_text], req.selection)
        return [float(x) for x in weights[0].tolist()], probs[0]

    async def plan(self, req) -> Plan:
        import torch

        w, probs = await asyncio.to_thread(self._route, req)
        key = mixture_key(w, self.decimals)
        used = [i for i, v in enumerate(key) if v > 0]
        record = self.pipeline.record(req.route_text, torch.tensor(key), probs,
                                       "forced" if probs is None else "prompt")
        if not used:
            self.counters["base"] += 1
            return Plan(await self.upstream_base_model(), "base", list(key), [record])
        if len(used) == 1 and key[used[0]] == 1.0:
            self.counters["top1"] += 1
            return Plan(self.names[used[0]], "top1", list(key), [record])
        name, status = await self._mixture(key)
        self.counters["mixture"] += 1
        return Plan(name, "mixture", list(key), [record], cache=status)

    # the mixture cache ---------------------------------------------------------------------------------------------
    async def _mixture(self, key: tuple) -> tuple[str, str]:
        """The upstream name of the mixture ``key``; exported and loaded on a miss. Marks it in use."""
        while True:
            name = self.cache.get(key)
            if name is not None:
                self.cache.move_to_end(key)
                self._inuse[name] += 1
                self.counters["cache_hits"] += 1
                return name, "hit"
            fut = self._loading.get(key)
            if fut is None:
                break
            try:
                await asyncio.shield(fut)  # another request is loading this mixture: share its result
            except APIError:
                pass  # its failure was reported to it; try ourselves
        fut = asyncio.get_running_loop().create_future()
        self._loading[key] = fut
        try:
            name = await self._export_and_load(key)
            self.cache[key] = name
            self._inuse[name] += 1
            self.counters["cache_misses"] += 1
            fut.set_result(name)
        except BaseException as e:
            fut.set_exception(e if isinstance(e, APIError) else upstream_error(502, "mixture load interrupted"))
            fut.exception()  # mark retrieved
            raise
        finally:
            del self._loading[key]
        await self._evict()
        return name, "miss"

    async def _export_and_load(self, key: tuple) -> str:
        import torch

        name = mixture_name(key)
        path = self.mixture_dir / name
        try:
            await asyncio.to_thread(self._export, torch.tensor(key, dtype=torch.float32), path)
        except DLPError as e:
            raise APIError(500, f"mixture {name}: export failed: {e}", type="server_error",
                           code="export_failed") from None
        resp = await self._post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(path.resolve())},
                                f"POST /v1/load_lora_adapter {name}")
        if resp.status_code != 200:
            reason = self._reason(resp)
            if "already" in reason.lower() and "load" in reason.lower():
                return name  # loaded by an earlier proxy process under the same (content-derived) name
            self.counters["adapter_refused"] += 1
            rank = _adapter_rank(path)
            shutil.rmtree(path, ignore_errors=True)
            mix = ", ".join(f"{self.names[i]}={v}" for i, v in enumerate(key) if v > 0)
            raise upstream_error(502, f"upstream {self.url} refused mixture adapter {name} ({mix}; rank {rank}) at "
                                      f"POST /v1/load_lora_adapter: HTTP {resp.status_code}: {reason}",
                                 "adapter_refused")
        self.counters["loads"] += 1
        return name

    def _export(self, weights, path: Path) -> None:
        self.pipeline.fused.export_mixture(weights, path, True)
        try:
            set_mode(path, SHARED_MODES if self.shared else PRIVATE_MODES)
        except OSError as e:
            raise DLPError(f"{path}: cannot set its mode ({e.strerror or e})") from None
        self.counters["exports"] += 1

    def release(self, plan: Plan) -> None:
        if plan.kind == "mixture":
            self._inuse[plan.model] -= 1
            if self._inuse[plan.model] <= 0:
                del self._inuse[plan.model]

    async def _evict(self) -> None:
        """Unload least recently used mixtures beyond the cache size (never one a running request uses)."""
        for key in list(self.cache):
            if len(self.cache) <= self.cache_size:
                return
            name = self.cache[key]
            if self._inuse.get(name):
                continue
            del self.cache[key]
            self.counters["evictions"] += 1
            try:
                await self._post("/v1/unload_lora_adapter", {"lora_name": name}, "unload")
            except APIError:
                pass  # counted; the upstream drops it on restart anyway
            shutil.rmtree(self.mixture_dir / name, ignore_errors=True)

    # forwarding ----------------------------------------------------------------------------------------------------
    def _upstream_body(self, req, plan: Plan) -> dict:
        body = {k: v for k, v in req.body.items() if k != "dlp"}
        body["model"] = plan.model
        return body

    def _extra(self, plan: Plan) -> dict:
        return {"dlp_routing": plan.routing,
                "dlp_upstream": {"url": self.url, "model": plan.model, "kind": plan.kind, "mixture_cache": plan.cache}}

    @staticmethod
    def _path(req) -> str:
        return "/v1/chat/completions" if req.kind == "chat" else "/v1/completions"

    def _admit(self) -> None:
        if self.inflight >= self.max_inflight:
            raise APIError(429, f"proxy busy: {self.max_inflight} requests in flight; retry later",
                           type="rate_limit_error", code="queue_full")
        self.inflight += 1

    async def complete(self, req) -> dict:
        """Forward a non-streaming request; the upstream's answer (checked) plus routing. Cancelling it (the
        client went away) frees its in-flight slot and its mixture at once."""
        self._admit()
        try:
            for attempt in (0, 1):
                plan = await self.plan(req)
                try:
                    resp = await self._post(self._path(req), self._upstream_body(req, plan), f"POST {self._path(req)}")
                finally:
                    self.release(plan)
                if not (attempt == 0 and self._lost_mixture(resp, plan)):
                    break
            if resp.status_code != 200:
                raise self._forwarded_error(resp, plan)
            data = self._checked_answer(resp, req)
            data["model"] = req.model
            data.update(self._extra(plan))
            self.counters["requests"] += 1
            return data
        finally:
            self.inflight -= 1

    def _checked_answer(self, resp, req) -> dict:
        """The upstream's JSON answer when it is an OpenAI completion of the request's kind; else a 502."""
        what = f"POST {self._path(req)}"
        try:
            data = parse_body(resp.content, "answer")
        except APIError as e:
            raise self._bad_answer(what, e.message) from None
        if not isinstance(data, dict):
            raise self._bad_answer(what, f"expected a completion object, got JSON {type(data).__name__}")
        choices = data.get("choices")
        if not isinstance(choices, list) or not choices or not all(_choice_ok(c, req.kind) for c in choices):
            raise self._bad_answer(what, "the answer has no valid 'choices'")
        if not isinstance(data.get("usage", {}), (dict, type(None))):
            raise self._bad_answer(what, "'usage' is not an object")
        return data

    def _lost_mixture(self, resp, plan: Plan) -> bool:
        """The upstream no longer knows a cached mixture (restarted, or unloaded by someone else): forget it so
        that the retry exports and loads it again."""
        if resp.status_code != 404 or plan.kind != "mixture":
            return False
        for key, name in list(self.cache.items()):
            if name == plan.model:
                del self.cache[key]
        self.counters["mixtures_lost_upstream"] += 1
        return True

    def _forwarded_error(self, resp, plan: Plan) -> APIError:
        self.counters["upstream_http_errors"] += 1
        # the client's own mistakes pass through; the upstream refusing our key or failing is a bad gateway
        status = resp.status_code if 400 <= resp.status_code < 500 and resp.status_code not in (401, 403) else 502
        return upstream_error(status, f"upstream {self.url} ({plan.model}): HTTP {resp.status_code}: "
                                      f"{self._reason(resp)}", "upstream_http_error")

    async def open_stream(self, req) -> "UpstreamStream":
        """Start a streaming request upstream; errors before the first byte raise :class:`APIError`."""
        self._admit()
        plan = resp = None
        try:
            for attempt in (0, 1):
                plan = await self.plan(req)
                resp = await self._send_stream(req, plan)
                if resp.status_code == 200 or attempt == 1:
                    break
                await resp.aread()
                if not self._lost_mixture(resp, plan):
                    break
                await resp.aclose()
                self.release(plan)
                resp = plan = None
            if resp.status_code != 200:
                await resp.aread()
                raise self._forwarded_error(resp, plan)
            ctype = resp.headers.get("content-type", "")
            if not ctype.startswith("text/event-stream"):
                raise self._bad_answer(f"POST {self._path(req)}", f"a streamed request was answered with "
                                                                  f"{ctype or 'no content type'}, not server-sent events")
        except BaseException:
            if resp is not None:
                await resp.aclose()
            if plan is not None:
                self.release(plan)
            self.inflight -= 1
            raise
        return UpstreamStream(self, req, plan, resp)

    async def _send_stream(self, req, plan: Plan):
        client = self.client()
        request = client.build_request("POST", self.url + self._path(req), json=self._upstream_body(req, plan),
                                       headers=self._headers())
        try:
            return await asyncio.wait_for(client.send(request, stream=True), self.timeout_s)
        except Exception as e:
            raise self._transport_error(e, f"POST {self._path(req)}") from None


def _choice_ok(c, kind: str) -> bool:
    if not isinstance(c, dict):
        return False
    if kind == "chat":
        m = c.get("message")
        return isinstance(m, dict) and isinstance(m.get("content"), (str, type(None)))
    return isinstance(c.get("text"), str)


def _chunk_ok(obj, kind: str) -> bool:
    """A streamed chunk: an object with a list of choices (empty for the usage chunk) of the request's kind."""
    if not isinstance(obj, dict) or not isinstance(obj.get("choices"), list):
        return False
    for c in obj["choices"]:
        if not isinstance(c, dict):
            return False
        part = c.get("delta") if kind == "chat" else c.get("text")
        if not (isinstance(part, dict) if kind == "chat" else isinstance(part, str)):
            return False
    return True


class UpstreamStream:
    """An open upstream stream: ``body()`` relays it; ``close()`` (idempotent) frees the upstream connection, the
    mixture's in-use mark and the in-flight slot - from the body's end, or from the app's background task when
    the client left before the body started."""

    def __init__(self, proxy: UpstreamProxy, req, plan: Plan, resp) -> None:
        self.proxy, self.req, self.plan, self.resp = proxy, req, plan, resp
        self.closed = False

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            await self.resp.aclose()  # a client that went away closes the upstream stream too (frees its slot)
        finally:
            self.proxy.release(self.plan)
            self.proxy.inflight -= 1

    def _relay(self, data: str) -> bytes:
        """One upstream ``data:`` payload as our event; APIError when it is not a valid chunk."""
        proxy = self.proxy
        try:
            obj = parse_body(data.encode("utf-8", "surrogatepass"), "a chunk")
        except APIError as e:
            raise proxy._bad_answer("stream", e.message) from None
        if isinstance(obj, dict) and "error" in obj:
            raise upstream_error(502, f"upstream {proxy.url}: stream failed: {_error_text(obj['error'])}")
        if not _chunk_ok(obj, self.req.kind):
            raise proxy._bad_answer("stream", "a chunk is not an OpenAI completion chunk")
        obj["model"] = self.req.model
        if any(c.get("finish_reason") for c in obj["choices"]):
            obj.update(proxy._extra(self.plan))
        return sse(obj)

    async def body(self) -> AsyncIterator[bytes]:
        import httpx

        try:
            async for line in self.resp.aiter_lines():
                if not line.startswith("data:"):
                    continue               # comments, event names, blank separators
                data = line[5:].strip()
                if data == "[DONE]":
                    self.proxy.counters["requests"] += 1
                    yield b"data: [DONE]\n\n"
                    return
                yield self._relay(data)
            raise self.proxy._bad_answer("stream", "it ended without data: [DONE]")
        except (APIError, httpx.HTTPError) as e:   # tell the client in-band, then end the stream properly
            err = e if isinstance(e, APIError) else self.proxy._transport_error(e, "streaming")
            yield sse(err.body())
            yield b"data: [DONE]\n\n"
        finally:
            await self.close()


def _error_text(err) -> str:
    msg = err.get("message") if isinstance(err, dict) else err
    return " ".join(str(msg).split())[:300] if msg else "no reason given"


def _adapter_rank(path: Path) -> Any:
    try:
        cfg = json.loads((path / "adapter_config.json").read_text())
        return max([int(cfg.get("r", 0))] + [int(v) for v in (cfg.get("rank_pattern") or {}).values()])
    except Exception:
        return "?"


def simulate_cache(weight_rows, cache_size: int, decimals: int = 2) -> dict:
    """Hit rate of the mixture cache for a sequence of routed weight rows (used by docs/scaling.md).

    Counts requests served by the base model, a single adapter (no cache needed), and mixtures split into
    cache hits and misses with an LRU of ``cache_size``."""
    cache: collections.OrderedDict = collections.OrderedDict()
    out = collections.Counter()
    distinct = set()
    for row in weight_rows:
        key = mixture_key(row, decimals)
        used = [v for v in key if v > 0]
        if not used:
            out["base"] += 1
        elif len(used) == 1 and used[0] == 1.0:
            out["top1"] += 1
        else:
            distinct.add(key)
            out["hits" if key in cache else "misses"] += 1
            cache[key] = True
            cache.move_to_end(key)
            if len(cache) > cache_size:
                cache.popitem(last=False)
    total = sum(out.values())
    mix = out["hits"] + out["misses"]
    return {"requests": total, "base": out["base"], "top1": out["top1"], "mixtures": mix, "hits": out["hits"],
            "misses": out["misses"], "distinct_mixtures": len(distinct),
            "hit_rate_mixtures": (out["hits"] / mix) if mix else None,
            "served_without_new_load": ((total - out["misses"]) / total) if total else None}


# vLLM accepts only these values for --max-lora-rank (vllm/config/lora.py, MaxLoRARanks)
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def vllm_command(run, model: str | None = None, max_adapters: int = 0, mixture_cache: int = 32,
                 port: int = 8000) -> str:
    """The ``vllm serve`` command for a run's adapters: every task adapter registered by name, LoRA rank large
    enough for the largest mixture the router can send (Σ of the ``max_adapters`` largest ranks; all adapters
    when uncapped), CPU adapter cache for the task adapters plus the mixture cache, runtime loading enabled.
    ``model``: the id vLLM loads (default: the run's own base model)."""
    import shlex

    from ..run import check_adapter_dir, open_run

    r = open_run(run, router=False, model=model)
    ranks = []
    for d in r.adapter_dirs:
        cfg = check_adapter_dir(d)
        ranks.append(max([int(cfg.get("r", 0))] + [int(v) for v in (cfg.get("rank_pattern") or {}).values()]))
    mods = [f"{n}={Path(d).resolve()}" for n, d in zip(r.names, r.adapter_dirs)]
    base = r.base_model
    if str(base) == "default":  # our default model, by its hub id (vLLM downloads or finds it in its cache)
        base = "HuggingFaceTB/SmolLM2-135M-Instruct"
    k = min(max_adapters or len(ranks), len(ranks))
    need = sum(sorted(ranks, reverse=True)[:k])
    rank = next((x for x in VLLM_MAX_LORA_RANKS if x >= need), None)
    note = "" if rank else f"  # the largest mixture needs rank {need} > 512: cap it with --max-adapters"
    lines = ["VLLM_ALLOW_RUNTIME_LORA_UPDATING=True vllm serve " + shlex.quote(str(base)),
             "--enable-lora", f"--max-lora-rank {rank or 512}{note}",
             # adapters in one GPU batch: every task adapter plus a few mixtures (one slot = max-lora-rank memory)
             f"--max-loras {min(len(ranks) + 4, 32)}", f"--max-cpu-loras {len(ranks) + mixture_cache}",
             f"--port {port}", "--lora-modules " + " ".join(shlex.quote(m) for m in mods)]
    return " \\\n    ".join(lines)
