"""Scheduling: a bounded request queue and the one worker thread that turns it into engine work.

Two schedulers share the queue, its limit (429 beyond ``max_queue``) and cancellation:

* ``continuous`` (:class:`IterationBatcher`, the default), iteration-level as in vLLM, SGLang and TGI: at every
  decode step the rows that finished have already left the running batch, and waiting requests join it (up to
  ``max_batch`` live rows; a long prompt is prefilled in chunks beside the decoding rows), so a short answer
  never waits behind a long one.
* ``static`` (:class:`Batcher`): the worker takes the oldest request, waits at most ``batch_window_ms`` after its
  arrival for more, and hands up to ``max_batch`` of them to the engine as heterogeneous
  ``DLPPipeline.generate`` calls; requests join at batch boundaries. Kept for comparison (bench row P8).

Either way every row has its own mixture, max tokens, sampling settings and stop strings, and only the worker
thread touches the model: the asyncio side queues requests and streams the deltas the worker hands it.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import threading
import time
import uuid
from typing import Any, Callable

from .schema import APIError, GenRequest


class Job:
    """A queued request: the worker thread fills ``events`` (an asyncio queue on the request's loop)."""

    def __init__(self, req: GenRequest, loop: asyncio.AbstractEventLoop) -> None:
        self.req, self.loop = req, loop
        self.id = uuid.uuid4().hex[:24]
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = False
        self.t_submit = time.monotonic()
        self.streamed = 0                   # characters already sent to a streaming client
        self.attempt_chars = 0              # characters the current engine attempt has produced
        self.row = None                     # continuous scheduler: the job's DecodeRow while it decodes
        self.routed: dict | None = None     # a routing record the engine made before decoding (conversations)

    def emit(self, kind: str, payload: Any) -> None:
        """Thread-safe: hand an event ("delta", "done", "error") to the request's event loop."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))
        except RuntimeError:  # the loop is closed (server shutting down)
            pass

    def stream_delta(self, delta: str) -> None:
        """Send the part of ``delta`` the client has not seen: a row retried after its batch failed produces its
        text again from the start, and only what goes beyond the earlier attempt is new."""
        start = self.attempt_chars
        self.attempt_chars += len(delta)
        if self.req.stream and self.attempt_chars > self.streamed:
            self.emit("delta", delta[max(0, self.streamed - start):])
            self.streamed = self.attempt_chars


@dataclasses.dataclass
class EngineStats:
    """What the worker saw; ``/health`` shows it and tests assert on it."""

    batch_sizes: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # rows per call
    batches: int = 0                        # engine calls (continuous: joins of new rows into the running batch)
    rows: int = 0                           # rows generated (requests)
    completion_tokens: int = 0              # tokens generated in total
    cancelled: int = 0                      # rows stopped because their client went away
    dropped: int = 0                        # requests cancelled while still queued
    submitted: int = 0                      # requests accepted into the queue
    rejected: int = 0                       # requests answered 429 (queue full)
    errors: int = 0                         # engine calls that raised
    steps: int = 0                          # continuous: decode steps run
    step_rows: int = 0                      # continuous: live rows summed over steps (/ steps = mean batch)
    isolated: int = 0                       # batches split up after a failure to find the failing row
    failed_rows: int = 0                    # rows answered 500 after failing alone
    running: int = 0                        # rows in the engine call now (continuous: live rows)

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["batch_sizes"] = {str(k): v for k, v in sorted(self.batch_sizes.items())}
        d["max_batch_seen"] = max(self.batch_sizes, default=0)
        d["mean_step_rows"] = round(self.step_rows / self.steps, 3) if self.steps else 0.0
        return d


def _shutting_down() -> APIError:
    return APIError(503, "server is shutting down", type="server_error", code="shutting_down")


class Batcher:
    """A bounded request queue and the single worker thread that turns it into engine calls."""

    def __init__(self, run_batch: Callable[[list[Job]], None], max_batch: int, max_queue: int, window_ms: float,
                 stats: EngineStats, retry_after_s: int = 1) -> None:
        self.run_batch, self.stats = run_batch, stats
        self.max_batch, self.max_queue, self.window = max_batch, max_queue, window_ms / 1000.0
        self.retry_after_s = retry_after_s
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
                job.emit("error", _shutting_down())
            self._pending.clear()
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, job: Job) -> None:
        """Queue ``job``; 429 (with Retry-After) when the queue is full, 503 while stopping."""
        with self._cv:
            if self._stop:
                raise _shutting_down()
            if len(self._pending) >= self.max_queue:
                self.stats.rejected += 1
                raise APIError(429, f"server busy: {self.max_queue} requests are queued; retry later",
                               type="rate_limit_error", code="queue_full",
                               headers={"Retry-After": str(self.retry_after_s)})
            self._pending.append(job)
            self.stats.submitted += 1
            self._cv.notify_all()

    def cancel(self, job: Job) -> None:
        """The client went away: drop the job if still queued, else make the engine stop its row."""
        with self._cv:
            job.cancelled = True
            row = job.row               # read once: the worker clears it when the row finishes
            if row is not None:         # decoding: the row leaves at its next step
                row.cancel()
            try:
                self._pending.remove(job)
                self.stats.dropped += 1
            except ValueError:
                pass

    def _take(self) -> list[Job] | None:
        with self._cv:
            while not self._pending and not self._stop:
                self._cv.wait()
            if self._stop:
                return None
            self._wait_for_company()
            batch = []
            while self._pending and len(batch) < self.max_batch:
                batch.append(self._pending.popleft())
            return batch

    def _wait_for_company(self) -> None:
        """With the lock held: wait for more requests, but never longer than the window after the oldest one
        arrived, so requests that queued while the previous work ran are taken at once."""
        deadline = self._pending[0].t_submit + self.window
        while len(self._pending) < self.max_batch and not self._stop:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._cv.wait(left)

    def _loop(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            batch = [j for j in batch if not j.cancelled]
            if batch:
                self._guarded(self.run_batch, batch)

    def _guarded(self, work: Callable[[list[Job]], Any], jobs: list[Job]) -> None:
        """Run ``work(jobs)``; never let the worker die: when it raises, every job in ``jobs`` gets an answer."""
        try:
            work(jobs)
        except BaseException as e:
            self.stats.errors += 1
            err = e if isinstance(e, APIError) else APIError(
                500, f"generation failed: {e.__class__.__name__}", type="server_error", code="generation_failed")
            for job in jobs:
                job.emit("error", err)


class IterationBatcher(Batcher):
    """The continuous scheduler: the same queue, and a worker that, between two decode steps of the running
    batch, joins as many waiting requests as there are free rows (``run_batch`` joins them; ``step`` decodes one
    token for every live row and answers the finished ones; ``live`` counts the rows the engine holds;
    ``abort`` answers every one of them when the server stops)."""

    def __init__(self, join: Callable[[list[Job]], None], step: Callable[[], None], live: Callable[[], int],
                 abort: Callable[[APIError], None], max_batch: int, max_queue: int, window_ms: float,
                 stats: EngineStats, retry_after_s: int = 1) -> None:
        super().__init__(join, max_batch, max_queue, window_ms, stats, retry_after_s)
        self.step, self.live, self.abort = step, live, abort

    def _take(self) -> list[Job] | None:
        """Requests to join now: when the engine is idle, wait for one (and up to the window for company), else
        take what is waiting at once, up to the free rows."""
        with self._cv:
            if not self.live():
                while not self._pending and not self._stop:
                    self._cv.wait()
                if self._pending and not self._stop:
                    self._wait_for_company()
            if self._stop:
                return None
            free = self.max_batch - self.live()
            return [self._pending.popleft() for _ in range(max(0, min(free, len(self._pending))))]

    def _loop(self) -> None:
        while True:
            jobs = self._take()
            if jobs is None:
                self._guarded(lambda _: self.abort(_shutting_down()), [])
                return
            jobs = [j for j in jobs if not j.cancelled]
            if jobs:
                self._guarded(self.run_batch, jobs)
            if self.live():
                self._guarded(lambda _: self.step(), [])


# which requests can share one engine call ---------------------------------------------------------------------------

def group_key(req: GenRequest, engine: str) -> tuple:
    """Requests with equal keys can share one engine call (the other options are per row in the engine)."""
    sampled = req.temperature > 0
    return (engine, req.chat,
            req.top_p_sampling if sampled else 1.0,
            # a seeded sampled request runs alone, so that its sample does not depend on its batch mates
            (req.seed, id(req)) if (sampled and req.seed is not None) else None)


def routing_key(req: GenRequest):
    """The per-call routing options of a routed request; None for a forced mixture (any call can take it)."""
    if req.weights is not None or req.adapter is not None:
        return None
    return req.selection


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
