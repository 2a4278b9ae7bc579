"""Fixtures for the server and proxy tests: a run whose adapters clearly differ, its real pipeline, and apps served
by uvicorn (with the server's own configuration) in a background thread on a free loopback port."""

from __future__ import annotations

import contextlib
import shutil
import threading
import time
from pathlib import Path

import pytest

from conftest import free_port

TASKS = ["arithmetic", "capitals", "word_sorting"]   # conftest's tiny_run tasks == adapters.txt order == router labels


def random_adapter_run(tiny_run: Path, model_path: Path, root: Path, rank: int = 8) -> Path:
    """The shared tiny run with its adapters replaced by random ones of the same tasks (its router is reused).

    The server tests must tell rows apart: after two training steps the tiny run's adapters still answer like the
    base model, so a request served another row's mixture would go unnoticed. Random adapters answer differently."""
    from dlp_lora.fusion import make_random_adapter
    from dlp_lora.models import load_model
    from dlp_lora.run import write_adapter_list

    run = root / "run"
    shutil.copytree(tiny_run / "router", run / "router")
    model, _ = load_model(model_path, device="cpu", dtype="fp32")
    dirs = [make_random_adapter(model, run / "adapters" / t, rank=rank, alpha=2 * rank, seed=i + 1, task=t)
            for i, t in enumerate(TASKS)]
    write_adapter_list(run / "adapters.txt", dirs)
    return run


@pytest.fixture(scope="session")
def serve_run(tiny_run, tiny_model_path, tmp_path_factory) -> Path:
    return random_adapter_run(tiny_run, tiny_model_path, tmp_path_factory.mktemp("serve_run"))


@pytest.fixture(scope="session")
def serve_pipeline(serve_run):
    """The real DLPPipeline of the run (its own tiny base model, fp32, CPU). Shared: the server never mutates it."""
    from dlp_lora.pipeline import DLPPipeline

    return DLPPipeline.from_run(serve_run, device="cpu", dtype="fp32")


class Served:
    """A running app: ``url`` (http://127.0.0.1:PORT), ``base_url`` (.../v1), ``app``."""

    def __init__(self, app, port: int) -> None:
        self.app, self.port = app, port
        self.url = f"http://127.0.0.1:{port}"
        self.base_url = self.url + "/v1"

    @property
    def stats(self):
        return self.app.state.stats


@contextlib.contextmanager
def serving(app, timeout: float = 30.0):
    """Serve ``app`` with uvicorn on 127.0.0.1:<free port> in a daemon thread; stop it on exit."""
    import uvicorn

    from dlp_lora.serve import server_config

    port = free_port()
    server = uvicorn.Server(server_config(app, "127.0.0.1", port))
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    t0 = time.monotonic()
    while not server.started:
        if not thread.is_alive() or time.monotonic() - t0 > timeout:
            raise RuntimeError("test server did not start")
        time.sleep(0.02)
    try:
        yield Served(app, port)
    finally:
        server.should_exit = True
        thread.join(timeout)
