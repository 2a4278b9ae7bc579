"""Fixtures for the server and proxy tests: a real run folder on the tiny model (three random adapters, a
mini-MLP router trained on built-in tasks), a real pipeline, and apps served by uvicorn in a background thread
on a free loopback port."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from pathlib import Path

import pytest

TASKS = ["arithmetic", "capitals", "word_sorting"]   # file-name order == adapters.txt order == router labels


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_run(model_path: Path, root: Path, tasks=TASKS, rank: int = 8) -> Path:
    """RUN/adapters/<task> (random PEFT adapters), RUN/adapters.txt, RUN/router_data, RUN/router."""
    from dlp_lora.config import RouterConfig, RouterDataConfig
    from dlp_lora.fusion import make_random_adapter
    from dlp_lora.lora import write_adapter_list
    from dlp_lora.models import load_model
    from dlp_lora.router import make_router_data, train_router
    from dlp_lora.tasks import write_builtin_tasks

    data = root / "data"
    write_builtin_tasks(data, n=40, seed=0, tasks=list(tasks))
    run = root / "run"
    model, _ = load_model(model_path, device="cpu", dtype="fp32")
    dirs = [make_random_adapter(model, run / "adapters" / t, rank=rank, alpha=2 * rank, seed=i + 1, task=t)
            for i, t in enumerate(tasks)]
    write_adapter_list(run / "adapters.txt", dirs)
    make_router_data(run / "router_data", data_dir=data, config=RouterDataConfig(val_frac=0.2, test_frac=0.2),
                     progress=False)
    train_router(run / "router_data", model_path, run / "router",
                 RouterConfig(epochs=6, embed_dim=32, hidden_dim=64, batch_size=16), progress=False)
    return run


@pytest.fixture(scope="session")
def serve_run(tiny_model_path, tmp_path_factory) -> Path:
    return build_run(tiny_model_path, tmp_path_factory.mktemp("serve_run"))


@pytest.fixture(scope="session")
def serve_pipeline(serve_run, tiny_model_path):
    """The real DLPPipeline of the run (tiny model, fp32, CPU). Shared: the server never mutates it."""
    from dlp_lora.pipeline import DLPPipeline

    return DLPPipeline.from_pretrained(tiny_model_path, serve_run, serve_run / "router", device="cpu", dtype="fp32")


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

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
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
