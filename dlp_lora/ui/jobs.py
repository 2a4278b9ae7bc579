"""Long page actions run as jobs: one worker thread per (browser session, page), cancellable.

The page's handler (a generator on Gradio's queue) starts a job and polls it, so the page streams progress and
partial results while the library works. Cancel asks the job to stop; a job that does not stop cooperatively
(the LoRA trainer and the generation hook do) is interrupted in its thread. Artifacts are written with
``atomic_dir``, so a cancelled job leaves nothing half written.
"""

from __future__ import annotations

import contextvars
import ctypes
import threading
from typing import Any, Callable, Iterator

from ..config import DLPError

POLL_S = 0.4                   # how often a running job's page is refreshed
LOCAL_SESSION = "local"        # the session of calls made without a browser (tests, scripts)


class JobCancelled(BaseException):
    """Raised inside a worker thread when its page's Cancel button is pressed.

    A BaseException (like KeyboardInterrupt) so library ``except Exception`` blocks do not swallow it and
    ``atomic_dir`` still removes its temporary folder.
    """


class Job:
    """A library call running in a thread, with a stop flag, a loss log and a text stream."""

    def __init__(self, fn: Callable[["Job"], Any]) -> None:
        self.stop = threading.Event()
        self.done = threading.Event()
        self.losses: list[tuple[float, float]] = []   # (step, loss) from the trainer's logs
        self.text: list[str] = []                     # streamed generation deltas
        self.progress: tuple[int, int] = (0, 0)       # (done, total) steps, when the job reports them
        self.result: Any = None
        self.error: BaseException | None = None
        # copy the handler's context so gr.Progress(track_tqdm=True) sees the library's tqdm bars
        ctx = contextvars.copy_context()
        self.thread = threading.Thread(target=ctx.run, args=(self._run, fn), daemon=True, name="dlp-ui-job")
        self.thread.start()

    def _run(self, fn) -> None:
        try:
            self.result = fn(self)
        except BaseException as e:  # noqa: BLE001 - handed to the page as a one-line message
            self.error = e
        finally:
            self.done.set()

    def cancel(self, grace_s: float = 2.0) -> None:
        """Ask the job to stop; interrupt its thread if it does not stop cooperatively within ``grace_s``."""
        self.stop.set()
        if self.done.wait(grace_s) or self.thread.ident is None:
            return
        # the exception is delivered at the thread's next Python bytecode (between torch ops)
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self.thread.ident), ctypes.py_object(JobCancelled))


JOBS: dict[tuple[str, str], Job] = {}
_JOBS_LOCK = threading.Lock()


def start_job(page: str, session: str, fn: Callable[[Job], Any]) -> Job:
    """Run ``fn(job)`` in a worker thread; one running job per (session, page)."""
    key = (session or LOCAL_SESSION, page)
    with _JOBS_LOCK:
        old = JOBS.get(key)
        if old is not None and not old.done.is_set():
            raise DLPError(f"{page}: a job is already running on this page (press Cancel first)")
        job = JOBS[key] = Job(fn)
    return job


def wait_job(job: Job, render: Callable[[], Any] | None = None) -> Iterator[Any]:
    """Yield ``render()`` while ``job`` runs; return its result (or raise its error). Use with ``yield from``."""
    try:
        while not job.done.wait(POLL_S):
            if render is not None:
                upd = render()
                if upd is not None:
                    yield upd
    finally:
        if not job.done.is_set():  # the page went away or the event was cancelled: stop the work too
            threading.Thread(target=job.cancel, daemon=True).start()
    if job.error is not None:
        raise job.error
    return job.result


def run_job(page: str, session: str, fn: Callable[[Job], Any]) -> Iterator[Any]:
    """Start a job and wait for it without intermediate output (``yield from`` it)."""
    return (yield from wait_job(start_job(page, session, fn)))


def cancel_job(page: str, session: str = LOCAL_SESSION) -> str:
    """Cancel the running job of ``page`` for this browser session; returns a status line."""
    with _JOBS_LOCK:
        job = JOBS.get((session or LOCAL_SESSION, page))
    if job is None or job.done.is_set():
        return "nothing to cancel"
    job.cancel()
    return "cancelled"


def running_jobs(page: str) -> list[Job]:
    """The jobs of ``page`` still running, in any session (for tests and the Cancel button's feedback)."""
    with _JOBS_LOCK:
        return [j for (_, p), j in JOBS.items() if p == page and not j.done.is_set()]
