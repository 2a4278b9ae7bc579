"""Routing in front of an OpenAI-compatible LoRA server (vLLM, SGLang, LoRAX, or ``dlp-lora serve`` itself).

``dlp-lora serve --upstream URL`` keeps the router here and forwards generation (DESIGN §2, issue 11):

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

The reported routing (``dlp_routing``) carries the weights actually served (the rounded ones), so the answer is
exactly the fused engine's answer for that mixture. Errors are :class:`UpstreamError` (HTTP status + OpenAI
error fields): upstream unreachable -> 502, timeout -> 504, adapter refused -> 502 with the upstream's reason.
No FastAPI here: the server turns results into responses; httpx is imported inside functions.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import hashlib
import json
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any, AsyncIterator

from .config import DLPError

MIX_PREFIX = "dlp-mix-"


class UpstreamError(Exception):
    """An error for the client: HTTP status plus OpenAI's error fields."""

    def __init__(self, status: int, message: str, code: str, type: str = "upstream_error",
                 param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.type, self.param = status, message, code, type, param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


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


class UpstreamProxy:
    """Forwards routed requests to an OpenAI-compatible LoRA server; owns the mixture cache."""

    def __init__(self, pipeline, url: str, cache_size: int = 32, decimals: int = 2, mixture_dir: str | None = None,
                 timeout_s: float = 300.0, base_model: str | None = None, api_key: str = "",
                 max_inflight: int = 256) -> None:
        if cache_size < 1:
            raise DLPError(f"mixture cache: size must be >= 1, got {cache_size}")
        self.pipeline = pipeline
        self.names: list[str] = list(pipeline.names)
        url = url.rstrip("/")
        self.url = url[:-3] if url.endswith("/v1") else url
        self.cache_size, self.decimals, self.timeout_s = cache_size, decimals, timeout_s
        self.base_model = base_model
        self.api_key = api_key
        self.max_inflight = max_inflight
        self._own_dir = mixture_dir is None
        self.mixture_dir = Path(mixture_dir) if mixture_dir else Path(tempfile.mkdtemp(prefix="dlp-mixtures-"))
        self.mixture_dir.mkdir(parents=True, exist_ok=True)
        self.cache: collections.OrderedDict[tuple, str] = collections.OrderedDict()  # key -> name (LRU order)
        self._loading: dict[tuple, asyncio.Future] = {}
        self._inuse: collections.Counter = collections.Counter()
        self._client = None
        self.inflight = 0
        self.counters = collections.Counter()
        self._route_lock = threading.Lock()   # routing runs in worker threads; tokenizers are not thread-safe

    # -- plumbing ------------------------------------------------------------------------------------------
    def client(self):
        if self._client is None:
            import httpx

            self._client = httpx.AsyncClient(timeout=httpx.Timeout(self.timeout_s, connect=10.0))
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

    def _transport_error(self, e: Exception, what: str) -> UpstreamError:
        import httpx

        if isinstance(e, httpx.TimeoutException):
            return UpstreamError(504, f"upstream {self.url}: timed out during {what} ({e.__class__.__name__})",
                                 code="upstream_timeout")
        return UpstreamError(502, f"upstream {self.url}: unreachable during {what} ({e.__class__.__name__}: "
                                  f"{str(e)[:200]})", code="upstream_unreachable")

    async def _post(self, path: str, body: dict, what: str):
        try:
            return await self.client().post(self.url + path, json=body, headers=self._headers())
        except Exception as e:
            self.counters["upstream_errors"] += 1
            raise self._transport_error(e, what) from None

    @staticmethod
    def _reason(resp) -> str:
        """The upstream's error message (OpenAI JSON, vLLM's {"message"} or plain text)."""
        try:
            data = resp.json()
            if isinstance(data, dict):
                e = data.get("error", data)
                if isinstance(e, dict) and e.get("message"):
                    return str(e["message"])[:500]
                if isinstance(e, str):
                    return e[:500]
        except Exception:
            pass
        return (resp.text or "").strip()[:500] or resp.reason_phrase

    async def upstream_base_model(self) -> str:
        """The upstream's base model id: the ``/v1/models`` entry without a ``parent`` (vLLM lists LoRA
        adapters with ``parent`` = the base model)."""
        if self.base_model:
            return self.base_model
        try:
            resp = await self.client().get(self.url + "/v1/models", headers=self._headers())
        except Exception as e:
            self.counters["upstream_errors"] += 1
            raise self._transport_error(e, "GET /v1/models") from None
        if resp.status_code != 200:
            raise UpstreamError(502, f"upstream {self.url}: GET /v1/models answered HTTP {resp.status_code}: "
                                     f"{self._reason(resp)}", code="upstream_error")
        try:
            data = resp.json()["data"]
            roots = [m["id"] for m in data if not m.get("parent")]
        except Exception:
            raise UpstreamError(502, f"upstream {self.url}: GET /v1/models is not an OpenAI model list",
                                code="upstream_error") from None
        if not roots:
            raise UpstreamError(502, f"upstream {self.url}: no base model in /v1/models (pass --upstream-model)",
                                code="upstream_error")
        self.base_model = roots[0]
        return self.base_model

    # -- routing -------------------------------------------------------------------------------------------
    def _route(self, req) -> tuple[list[float], dict | None]:
        """(weights per task, router probs or None) for one request; runs in a worker thread."""
        if req.weights is not None:  # forced: dlp:<task>, <task>, base, or "dlp": {"weights": ...}
            w = [float(req.weights.get(n, 0.0)) for n in self.names]
            return w, None
        with self._route_lock:
            probs, weights = self.pipeline.route([req.route_text], top_p=req.top_p, weighting=req.weighting,
                                                 max_adapters=req.max_adapters, min_confidence=req.min_confidence)
        p = probs[0].tolist()
        return [float(x) for x in weights[0].tolist()], {n: float(v) for n, v in zip(self.names, p)}

    async def plan(self, req) -> Plan:
        w, probs = await asyncio.to_thread(self._route, req)
        key = mixture_key(w, self.decimals)
        used = [i for i, v in enumerate(key) if v > 0]
        routing = [{"sentence": req.route_text, "selected": [self.names[i] for i in used],
                    "weights": [key[i] for i in used], "probs": probs if probs is not None else {}}]
        if not used:
            self.counters["base"] += 1
            return Plan(await self.upstream_base_model(), "base", list(key), routing)
        if len(used) == 1 and key[used[0]] == 1.0:
            self.counters["top1"] += 1
            return Plan(self.names[used[0]], "top1", list(key), routing)
        name, status = await self._mixture(key)
        self.counters["mixture"] += 1
        return Plan(name, "mixture", list(key), routing, cache=status)

    # -- the mixture cache ---------------------------------------------------------------------------------
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
            except UpstreamError:
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
            fut.set_exception(e if isinstance(e, UpstreamError) else UpstreamError(500, str(e), "export_failed"))
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
        weights = torch.tensor(key, dtype=torch.float32)
        try:
            await asyncio.to_thread(self.pipeline.fused.export_mixture, weights, path, True)
        except DLPError as e:
            raise UpstreamError(500, f"mixture {name}: export failed: {e}", code="export_failed",
                                type="server_error") from None
        self.counters["exports"] += 1
        resp = await self._post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(path.resolve())},
                                f"POST /v1/load_lora_adapter {name}")
        if resp.status_code != 200:
            reason = self._reason(resp)
            if "already" in reason.lower() and "load" in reason.lower():
                return name  # loaded by an earlier proxy process under the same (content-derived) name
            self.counters["adapter_refused"] += 1
            shutil.rmtree(path, ignore_errors=True)
            mix = ", ".join(f"{self.names[i]}={v}" for i, v in enumerate(key) if v > 0)
            raise UpstreamError(502, f"upstream {self.url} refused mixture adapter {name} ({mix}; rank "
                                     f"{_adapter_rank(path)}) at POST /v1/load_lora_adapter: HTTP "
                                     f"{resp.status_code}: {reason}", code="adapter_refused")
        self.counters["loads"] += 1
        return name

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
                await self.client().post(self.url + "/v1/unload_lora_adapter", json={"lora_name": name},
                                         headers=self._headers())
            except Exception:
                self.counters["upstream_errors"] += 1  # the upstream will drop it on restart anyway
            shutil.rmtree(self.mixture_dir / name, ignore_errors=True)

    # -- forwarding ----------------------------------------------------------------------------------------
    def _upstream_body(self, req, plan: Plan) -> dict:
        body = {k: v for k, v in req.body.items() if k != "dlp"}
        body["model"] = plan.model
        return body

    def _extra(self, plan: Plan) -> dict:
        return {"dlp_routing": plan.routing,
                "dlp_upstream": {"url": self.url, "model": plan.model, "kind": plan.kind, "mixture_cache": plan.cache}}

    def _path(self, req) -> str:
        return "/v1/chat/completions" if req.kind == "chat" else "/v1/completions"

    def _admit(self) -> None:
        if self.inflight >= self.max_inflight:
            raise UpstreamError(429, f"proxy busy: {self.max_inflight} requests in flight; retry later",
                                code="queue_full", type="rate_limit_error")
        self.inflight += 1

    async def complete(self, req) -> dict:
        """Forward a non-streaming request; the upstream's answer plus routing."""
        self._admit()
        try:
            for attempt in (0, 1):
                plan = await self.plan(req)
                try:
                    resp = await self._post(self._path(req), self._upstream_body(req, plan),
                                            f"POST {self._path(req)}")
                finally:
                    self.release(plan)
                if not (attempt == 0 and self._lost_mixture(resp, plan)):
                    break
            if resp.status_code != 200:
                raise self._forwarded_error(resp, plan)
            try:
                data = resp.json()
            except Exception:
                raise UpstreamError(502, f"upstream {self.url}: {self._path(req)} did not answer JSON",
                                    code="upstream_error") from None
            data["model"] = req.model
            data.update(self._extra(plan))
            self.counters["requests"] += 1
            return data
        finally:
            self.inflight -= 1

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

    def _forwarded_error(self, resp, plan: Plan) -> UpstreamError:
        self.counters["upstream_http_errors"] += 1
        status = resp.status_code if 400 <= resp.status_code < 500 else 502
        return UpstreamError(status, f"upstream {self.url} ({plan.model}): HTTP {resp.status_code}: "
                                     f"{self._reason(resp)}", code="upstream_http_error")

    async def open_stream(self, req) -> AsyncIterator[bytes]:
        """Start a streaming request upstream; errors before the first byte raise :class:`UpstreamError`.
        Returns the SSE byte stream (model renamed, routing on the chunk that carries finish_reason)."""
        self._admit()
        plan = None
        resp = None
        try:
            for attempt in (0, 1):
                plan = await self.plan(req)
                client = self.client()
                request = client.build_request("POST", self.url + self._path(req),
                                               json=self._upstream_body(req, plan), headers=self._headers())
                try:
                    resp = await client.send(request, stream=True)
                except Exception as e:
                    self.counters["upstream_errors"] += 1
                    raise self._transport_error(e, f"POST {self._path(req)}") from None
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
        except BaseException:
            if resp is not None:
                await resp.aclose()
            if plan is not None:
                self.release(plan)
            self.inflight -= 1
            raise
        return _Stream(self, req, plan, resp)


class _Stream:
    """An open upstream stream: ``body()`` relays it; ``close()`` (idempotent) frees the upstream connection, the
    mixture's in-use mark and the in-flight slot - from the body's end, or from the server's background task
    when the client left before the body started."""

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

    async def body(self) -> AsyncIterator[bytes]:
        req, plan, resp, proxy = self.req, self.plan, self.resp, self.proxy
        extra = proxy._extra(plan)
        try:
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    yield b"data: [DONE]\n\n"
                    break
                try:
                    obj = json.loads(data)
                except json.JSONDecodeError:
                    continue
                if isinstance(obj, dict) and "choices" in obj:
                    obj["model"] = req.model
                    if any(c.get("finish_reason") for c in obj.get("choices") or []):
                        obj.update(extra)
                yield f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode("utf-8")
            proxy.counters["requests"] += 1
        except Exception as e:  # the upstream dropped the stream mid-way: tell the client in-band
            import httpx

            if not isinstance(e, httpx.HTTPError):
                raise
            err = proxy._transport_error(e, "streaming")
            yield f"data: {json.dumps(err.body())}\n\n".encode("utf-8")
            yield b"data: [DONE]\n\n"
        finally:
            await self.close()


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
        elif key in cache:
            distinct.add(key)
            cache.move_to_end(key)
            out["hits"] += 1
        else:
            distinct.add(key)
            out["misses"] += 1
            cache[key] = True
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


def vllm_command(run, model: str = "MODEL", max_adapters: int = 0, mixture_cache: int = 32, port: int = 8000) -> str:
    """The ``vllm serve`` command for a run's adapters: every task adapter registered by name, LoRA rank large
    enough for the largest mixture the router can send (Σ of the ``max_adapters`` largest ranks; all adapters
    when uncapped), CPU adapter cache for the task adapters plus the mixture cache, runtime loading enabled."""
    import shlex

    from .lora import check_adapter_dir, read_adapter_list, read_task_meta

    dirs = read_adapter_list(run)
    if not dirs:
        raise DLPError(f"{run}: no adapters")
    ranks, mods = [], []
    for d in dirs:
        cfg = check_adapter_dir(d)
        ranks.append(max([int(cfg.get("r", 0))] + [int(v) for v in (cfg.get("rank_pattern") or {}).values()]))
        mods.append(f"{read_task_meta(d)['task']}={Path(d).resolve()}")
    if str(model) == "default":  # our default model, by its hub id (vLLM downloads or finds it in its cache)
        model = "HuggingFaceTB/SmolLM2-135M-Instruct"
    k = min(max_adapters or len(ranks), len(ranks))
    need = sum(sorted(ranks, reverse=True)[:k])
    rank = next((r for r in VLLM_MAX_LORA_RANKS if r >= need), None)
    note = "" if rank else f"  # the largest mixture needs rank {need} > 512: cap it with --max-adapters"
    lines = ["VLLM_ALLOW_RUNTIME_LORA_UPDATING=True vllm serve " + shlex.quote(str(model)),
             "--enable-lora", f"--max-lora-rank {rank or 512}{note}",
             # adapters in one GPU batch: every task adapter plus a few mixtures (one slot = max-lora-rank memory)
             f"--max-loras {min(len(dirs) + 4, 32)}", f"--max-cpu-loras {len(dirs) + mixture_cache}",
             f"--port {port}", "--lora-modules " + " ".join(shlex.quote(m) for m in mods)]
    return " \\\n    ".join(lines)
