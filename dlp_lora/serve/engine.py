"""The engine side of the server: the pipeline, the adapters loaded at run time, and failure isolation.

Only the worker thread generates: whole ``generate`` calls for the static scheduler, or, for the continuous
one, the running batches of :class:`Decoding` (one step-level ``DecodeBatch`` per pipeline). Failures are
isolated either way: a batch (or a join of new rows) that raises is split in halves and each half retried, down
to the one row that fails alone: that row gets a 500 (logged as one line), every other row its answer. A decode
step that raises has no row to blame: its rows are re-run through the static path, which isolates the culprit.
"""

from __future__ import annotations

import copy
import functools
import itertools
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable

from ..config import DLPError, format_error
from ..data import format_prompt
from ..run import check_adapter_dir
from .scheduler import EngineStats, Job, routing_key, split_groups
from .schema import BASE_MODEL, DLP_MODEL, APIError, ServeConfig, short

log = logging.getLogger("dlp_lora.serve")
MAX_NAME_CHARS = 128


def log_failure(what: str, e: BaseException) -> None:
    """One log line for an error nobody expected (the project's one error formatter); the traceback only with
    DLP_LORA_DEBUG=1, as in the CLI and the web app."""
    log.error("dlp-lora serve: %s: %s", what, format_error(e), exc_info=e if os.environ.get("DLP_LORA_DEBUG") else None)


class Engine:
    """Owns the pipeline and the adapters registered through ``/v1/load_lora_adapter``; ``lock`` keeps loading
    from racing a running batch."""

    def __init__(self, pipeline, config: ServeConfig, stats: EngineStats, adapter_roots: list[Path]) -> None:
        self.pipeline, self.config, self.stats = pipeline, config, stats
        self.names: list[str] = list(pipeline.names)
        # Request validation counts tokens on the event-loop thread while the worker tokenizes a batch: a fast
        # tokenizer is not safe for that (padding=True/False calls flip shared backend state and a batch then
        # fails with "Unable to create tensor"), so validation uses its own copy.
        try:
            self.count_tokenizer = copy.deepcopy(pipeline.tokenizer)
        except Exception:  # a tokenizer that cannot be copied: share it (single-request loads only)
            self.count_tokenizer = pipeline.tokenizer
        cfg = getattr(getattr(pipeline, "model", None), "config", None)
        self.context_length = getattr(cfg, "max_position_embeddings", None) or None
        self.adapters = LoadedAdapters(pipeline, config, adapter_roots)
        self.lock = threading.RLock()
        self.decoding = Decoding(self)

    @property
    def loaded(self) -> dict[str, dict]:
        return self.adapters.entries

    def count_tokens(self, prompt: str, chat: bool) -> int:
        tok = self.count_tokenizer
        text = format_prompt(tok, prompt) if chat else prompt
        return len(tok(text, add_special_tokens=False)["input_ids"])

    def load_adapter(self, name, path) -> dict:
        with self.lock:
            return self.adapters.load(name, path)

    def unload_adapter(self, name) -> dict:
        with self.lock:
            return self.adapters.unload(name)

    # generation (worker thread) ------------------------------------------------------------------------------------
    @staticmethod
    def engine_of(job: Job) -> str:
        return "loaded" if job.req.adapter is not None else "main"

    def run_batch(self, jobs: list[Job]) -> None:
        for group in split_groups(jobs, self.engine_of):
            group = [j for j in group if not j.cancelled]
            if group:
                self._run_isolated(group)

    def _run_isolated(self, jobs: list[Job]) -> None:
        """Run one engine call; when it raises, retry its halves so that only the failing row fails."""
        isolate(jobs, self._run_group, self._fail, self.stats, drop_cancelled=True)

    def _fail(self, job: Job, e: Exception) -> None:
        self.stats.failed_rows += 1
        if isinstance(e, DLPError):   # the engine refused this row's input in words: a client error
            job.emit("error", APIError(400, f"request: {format_error(e)}", code="invalid_request"))
            return
        log_failure(f"request {job.id} failed in the engine", e)
        job.emit("error", APIError(500, f"generation failed ({e.__class__.__name__}); other requests are unaffected",
                                   type="server_error", code="generation_failed"))

    def _run_group(self, jobs: list[Job]) -> None:
        for j in jobs:
            j.attempt_chars = 0
        with self.lock:
            pipe, weights, routed_here, jobs = self._plan(jobs)
            if not jobs:
                return
            self.stats.batches += 1
            self.stats.batch_sizes[len(jobs)] += 1
            self.stats.running = len(jobs)
            try:
                results = self._generate(pipe, jobs, weights)
            finally:
                self.stats.running = 0
        for i, rec in routed_here.items():
            results[i].routing[0] = rec
        for job, res in zip(jobs, results):
            self.stats.rows += 1
            self.stats.completion_tokens += int(res.completion_tokens)
            if res.finish_reason == "cancelled" or job.cancelled:
                self.stats.cancelled += 1
            job.emit("done", res)

    def _plan(self, jobs: list[Job]):
        """``(pipeline, per-row weights, routing records made here, jobs still servable)`` for one call."""
        if jobs[0].req.adapter is not None:
            gone = [j for j in jobs if j.req.adapter not in self.adapters.entries]
            for j in gone:  # unloaded between validation and now
                j.emit("error", APIError(404, f"model {short(j.req.adapter)} was unloaded", param="model",
                                         code="model_not_found"))
            jobs = [j for j in jobs if j not in gone]
            return self.adapters.pipeline(), [{j.req.adapter: 1.0} for j in jobs], {}, jobs
        weights = [j.req.weights for j in jobs]  # None = routed, {} = base, dict = forced mixture
        return self.pipeline, weights, self._route_conversations(jobs, weights), jobs

    def _generate(self, pipe, jobs: list[Job], weights: list):
        r0 = next((j.req for j in jobs if routing_key(j.req) is not None), jobs[0].req)
        # sampling options are equal for every sampled row of a group (group_key); greedy rows ignore them
        sampled = next((j.req for j in jobs if j.req.temperature > 0), None)

        def on_text(row: int, delta: str) -> bool:
            job = jobs[row]
            if job.cancelled:
                return True
            if delta:
                job.stream_delta(delta)
            return False

        return pipe.generate([j.req.prompt for j in jobs], r0.selection, weights=weights,
                             max_new_tokens=[j.req.max_tokens for j in jobs],
                             temperature=[j.req.temperature for j in jobs],
                             top_p_sampling=sampled.top_p_sampling if sampled else 1.0,
                             seed=sampled.seed if sampled else None, stop=[j.req.stop for j in jobs],
                             chat=r0.chat, on_text=on_text, batch_size=len(jobs),
                             ignore_eos=[j.req.ignore_eos for j in jobs])

    # the continuous scheduler's side (worker thread) ----------------------------------------------------------------
    def join(self, jobs: list[Job]) -> None:
        self.decoding.join(jobs)

    def step(self) -> None:
        self.decoding.step()

    def live(self) -> int:
        return self.decoding.live()

    def abort(self, error: APIError) -> None:
        self.decoding.abort(error)

    def _route_conversations(self, jobs: list[Job], weights: list) -> dict[int, dict]:
        """Route multi-message chats here, on their user turns, and force that mixture (in place in
        ``weights``). The engine would otherwise split the rendered template into "sentences" such as
        ``<|im_start|>assistant`` and route on those. Departure from the paper (§3.2): such a conversation is
        routed once (prompt granularity), its output sentences are not re-routed. Returns row -> routing record."""
        rows = [i for i, j in enumerate(jobs) if weights[i] is None and j.req.kind == "chat" and not j.req.chat]
        if not rows:
            return {}
        probs, w = self.pipeline.route([jobs[i].req.route_text for i in rows], jobs[rows[0]].req.selection)
        out = {}
        for k, i in enumerate(rows):
            weights[i] = w[k]
            out[i] = self.pipeline.record(jobs[i].req.route_text, w[k], probs[k], "prompt")
        return out


class Decoding:
    """The continuous scheduler's running batches: one step-level decoder per pipeline (the task pipeline, and
    the loaded adapters' twin while requests use it). Rows join between two steps and leave when done."""

    def __init__(self, engine: Engine) -> None:
        self.engine, self.stats = engine, engine.stats
        self.batches: dict[int, tuple] = {}         # id(pipeline) -> (pipeline, DecodeBatch, its jobs)
        self.waiting: list[tuple] = []              # (pipeline, jobs, requests) that cannot join their batch yet

    def live(self) -> int:
        """Rows the engine holds: decoding, prefilling, or waiting for their batch to accept joins."""
        return sum(len(jobs) for _, _, jobs in self.batches.values()) + sum(len(j) for _, j, _ in self.waiting)

    def join(self, jobs: list[Job]) -> None:
        """Plan ``jobs`` (engine, mixture, conversation routing) and join them to their pipeline's batch."""
        with self.engine.lock:
            for group in split_by_engine(jobs, self.engine.engine_of):
                self._plan_and_join(group)

    def _plan_and_join(self, jobs: list[Job]) -> None:
        """Plan then join ``jobs``; planning that raises (routing a conversation) is split like a failed join."""
        isolate(jobs, self._plan_then_join, self.engine._fail, self.stats)

    def _plan_then_join(self, jobs: list[Job]) -> None:
        pipe, weights, routed_here, jobs = self.engine._plan(jobs)
        for i, rec in routed_here.items():
            jobs[i].routed = rec
        if jobs:   # the join isolates its own failures, so none reaches the planning's isolation above
            self._join(pipe, jobs, [self._request(j, w) for j, w in zip(jobs, weights)])

    def _request(self, job: Job, weights):
        from ..pipeline import DecodeRequest

        job.attempt_chars = 0
        r = job.req
        return DecodeRequest(prompt=r.prompt, selection=r.selection, weights=weights, max_new_tokens=r.max_tokens,
                             temperature=r.temperature, top_p_sampling=r.top_p_sampling, seed=r.seed,
                             stop=list(r.stop), ignore_eos=r.ignore_eos, chat=r.chat,
                             on_text=functools.partial(_stream, job), tag=job)

    def _batch(self, pipe) -> tuple:
        if id(pipe) not in self.batches:
            self.batches[id(pipe)] = (pipe, pipe.decoder(), [])
        return self.batches[id(pipe)]

    def _join(self, pipe, jobs: list[Job], requests: list) -> None:
        """Prefill and join ``jobs``; a join that raises is split in halves, down to the row that fails alone."""
        _, batch, members = self._batch(pipe)
        if not batch.can_join:                      # this model's cache cannot take rows mid-way: wait
            self.waiting.append((pipe, jobs, requests))
            return

        def add(pairs: list) -> None:
            rows = batch.add([r for _, r in pairs], prefill_chunk=self.engine.config.prefill_chunk)
            self.stats.batches += 1
            self.stats.batch_sizes[len(rows)] += 1
            for (job, _), row in zip(pairs, rows):
                job.row = row
                members.append(job)
                if job.cancelled:                   # its client left while it was being prefilled
                    row.cancel()

        # a failed prefill may have left its mixture on the model: close() clears it before the halves run
        isolate(list(zip(jobs, requests)), add, self.engine._fail, self.stats, job_of=lambda pair: pair[0],
                cleanup=batch.close)

    def step(self) -> None:
        """One decode step of every running batch; finished rows are answered, emptied batches dropped."""
        with self.engine.lock:
            for pipe, jobs, requests in self._retry_waiting():
                self._join(pipe, jobs, requests)
            for key, (pipe, batch, members) in list(self.batches.items()):
                if not batch:
                    batch.close()
                    del self.batches[key]
                    continue
                try:
                    done = batch.step()
                except Exception as e:
                    self._recover(key, e)
                    continue
                self.stats.steps += 1
                self.stats.step_rows += len(batch.rows) + len(done)
                for row in done:
                    members.remove(row.tag)
                    self._finish(row.tag, row.result())
            self.stats.running = self.live()

    def _retry_waiting(self) -> list[tuple]:
        ready = [w for w in self.waiting if self._batch(w[0])[1].can_join]
        self.waiting = [w for w in self.waiting if w not in ready]
        return ready

    def _finish(self, job: Job, res) -> None:
        job.row = None
        if job.routed is not None:
            res.routing[0] = job.routed
        self.stats.rows += 1
        self.stats.completion_tokens += int(res.completion_tokens)
        if res.finish_reason == "cancelled" or job.cancelled:
            self.stats.cancelled += 1
        job.emit("done", res)

    def _recover(self, key: int, e: Exception) -> None:
        """A decode step raised: no row to blame, so the batch is dropped and its rows re-run on the static path
        (whole ``generate`` calls split down to the failing row); streams resume where they stopped."""
        pipe, batch, members = self.batches.pop(key)
        batch.close()
        self.stats.errors += 1
        log_failure(f"a decode step of {len(members)} row(s) failed; re-running them one call at a time", e)
        for job in members:
            job.row = None
        alive = [j for j in members if not j.cancelled]
        if alive:
            self.engine._run_isolated(alive)

    def abort(self, error: APIError) -> None:
        """The server stops: every row still held gets ``error``."""
        with self.engine.lock:
            for _, batch, members in self.batches.values():
                batch.close()
                for job in members:
                    job.emit("error", error)
            for _, jobs, _ in self.waiting:
                for job in jobs:
                    job.emit("error", error)
            self.batches, self.waiting = {}, []


def _stream(job: Job, delta: str) -> bool:
    """A row's streamed text to its client; True (cancel the row) once the client has gone."""
    if job.cancelled:
        return True
    job.stream_delta(delta)
    return False


def isolate(items: list, attempt: Callable[[list], Any], fail: Callable[[Job, Exception], None], stats,
            job_of: Callable[[Any], Job] = lambda job: job, cleanup: Callable[[], Any] | None = None,
            drop_cancelled: bool = False) -> None:
    """Run ``attempt(items)``; when it raises, retry its halves until the failing item is alone, so that one bad
    request never fails its neighbours. An APIError is a refusal of the whole call: each of its jobs gets it.
    Any other error: ``cleanup()``, then a lone item's job is answered by ``fail(job, e)``."""
    if drop_cancelled:
        items = [it for it in items if not job_of(it).cancelled]
    if not items:
        return
    try:
        attempt(items)
        return
    except APIError as e:
        for it in items:
            job_of(it).emit("error", e)
        return
    except Exception as e:
        if cleanup is not None:
            cleanup()
        stats.errors += 1
        if len(items) == 1:
            fail(job_of(items[0]), e)
            return
    stats.isolated += 1
    half = len(items) // 2
    for part in (items[:half], items[half:]):
        isolate(part, attempt, fail, stats, job_of, cleanup, drop_cancelled)


def split_by_engine(jobs: list[Job], engine_of) -> list[list[Job]]:
    """Jobs grouped by the pipeline that serves them, in arrival order of each group's first job."""
    groups: dict[str, list[Job]] = {}
    for job in jobs:
        groups.setdefault(engine_of(job), []).append(job)
    return list(groups.values())


class LoadedAdapters:
    """Adapters registered through ``/v1/load_lora_adapter`` (vLLM's dynamic LoRA endpoint).

    They are served by a second pipeline over a copy of the base model that fuses exactly the loaded adapters
    (one-hot weights): the task pipeline's adapter set, and with it the router's label order, never changes at
    run time. Paths are accepted only below the configured roots, and every path outside them gets the same
    answer, so the endpoint tells nobody which folders exist on the machine."""

    def __init__(self, pipeline, config: ServeConfig, roots: list[Path]) -> None:
        self.main, self.config = pipeline, config
        self.roots = [Path(os.path.realpath(r)) for r in roots]
        self.entries: dict[str, dict] = {}      # name -> {"path", "rank", "created"}
        self._pipe = None

    def pipeline(self):
        if self._pipe is None:
            self._pipe = twin_pipeline(self.main, {k: v["path"] for k, v in self.entries.items()})
        return self._pipe

    def check_name(self, name) -> str:
        if not isinstance(name, str) or not name.strip() or len(name) > MAX_NAME_CHARS:
            raise APIError(400, f"lora_name: required: a non-empty string of at most {MAX_NAME_CHARS} characters",
                           param="lora_name", code="invalid_value")
        return name

    def check_path(self, path) -> Path:
        """The real path of ``path`` when it lies below a root; one identical 400 for anything else."""
        if not isinstance(path, str) or not path:
            raise APIError(400, "lora_path: required: a folder path string", param="lora_path", code="invalid_value")
        try:
            real = Path(os.path.realpath(path))
        except (ValueError, OSError):       # an embedded NUL byte, a loop of links
            real = None
        if real is None or not any(real == r or r in real.parents for r in self.roots):
            raise APIError(400, "lora_path: not below an adapter folder this server may read (see --adapter-root)",
                           param="lora_path", code="path_not_allowed")
        return real

    def load(self, name, path) -> dict:
        name = self.check_name(name)
        if name in (DLP_MODEL, BASE_MODEL) or name.startswith(DLP_MODEL + ":") or name in self.main.names:
            raise APIError(400, f"lora_name: {short(name)} is reserved (dlp, base, dlp:<task> and task names)",
                           param="lora_name", code="name_taken")
        if name in self.entries:
            raise APIError(400, f"lora_name: {short(name)} is already loaded (unload it first)", param="lora_name",
                           code="name_taken")
        if len(self.entries) >= self.config.max_loaded_adapters:
            raise APIError(400, f"lora_name: {self.config.max_loaded_adapters} adapters are loaded already "
                                "(unload one first)", param="lora_name", code="too_many_adapters")
        real = self.check_path(path)
        rank = self._rank(real)
        entry = {"path": str(real), "rank": rank, "created": int(time.time())}
        trial = {**self.entries, name: entry}
        try:  # build now so a bad adapter (other base model, ...) is refused here, not at generation
            pipe = twin_pipeline(self.main, {k: v["path"] for k, v in trial.items()})
        except DLPError as e:
            raise APIError(400, f"lora_path: {e}", param="lora_path", code="invalid_adapter") from None
        self.entries, self._pipe = trial, pipe
        return {"object": "lora_adapter", "lora_name": name, "lora_path": entry["path"], "rank": rank,
                "status": "loaded"}

    def _rank(self, real: Path) -> int:
        try:
            cfg = check_adapter_dir(real)
            rank = max([int(cfg.get("r", 0) or 0)] + [int(v) for v in (cfg.get("rank_pattern") or {}).values()])
        except DLPError as e:
            raise APIError(400, f"lora_path: {e}", param="lora_path", code="invalid_adapter") from None
        except (TypeError, ValueError, AttributeError):
            raise APIError(400, f"lora_path: {real}: adapter_config.json: field 'r': not an integer",
                           param="lora_path", code="invalid_adapter") from None
        if self.config.max_lora_rank and rank > self.config.max_lora_rank:
            raise APIError(400, f"lora_path: {real}: adapter rank {rank} is above this server's max_lora_rank "
                                f"{self.config.max_lora_rank}", param="lora_path", code="rank_too_large")
        return rank

    def unload(self, name) -> dict:
        if not isinstance(name, str) or name not in self.entries:
            raise APIError(404, f"lora_name: {short(name)} is not loaded", param="lora_name", code="model_not_found")
        del self.entries[name]
        self._pipe = None  # rebuilt lazily for the next request that needs it
        return {"object": "lora_adapter", "lora_name": name, "status": "unloaded"}


def twin_pipeline(pipeline, adapters: dict[str, str]):
    """A pipeline fusing ``adapters`` (name -> folder; no router) over a second copy of ``pipeline``'s model.

    The copy shares every weight tensor with the original (``deepcopy`` with all parameters and buffers in the
    memo), so it costs module objects, not memory. The task adapters are detached from the copy (through the
    copied ``FusedAdapters``), then the loaded adapters are fused into it."""
    from ..fusion import fuse_adapters
    from ..pipeline import DLPPipeline

    model = pipeline.model
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    twin, twin_fused = copy.deepcopy((model, pipeline.fused), memo)
    twin_fused.detach()
    fused = fuse_adapters(twin, list(adapters.values()), names=list(adapters))
    return DLPPipeline(twin, pipeline.tokenizer, fused, router=None)
