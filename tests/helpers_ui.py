"""Fixtures shared by the web-app tests: a small real run folder built from the tiny model, and the app served
in-process on a free loopback port."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

TASKS = ["arithmetic", "capitals"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ui_run(tiny_model_path, tmp_path_factory) -> Path:
    """A complete run folder made with the real library on the tiny model: two built-in tasks, two LoRAs
    (2 steps each), router data and a small mini-MLP router (seconds). Beside it: data/ (training task files) and test/ (test task files)."""
    from dlp_lora.config import LoRATrainConfig, RouterConfig, RouterDataConfig
    from dlp_lora.lora import train_adapters
    from dlp_lora.router import make_router_data, train_router
    from dlp_lora.tasks import write_builtin_tasks

    root = tmp_path_factory.mktemp("ui_run")
    data = root / "data"
    write_builtin_tasks(data, n=30, seed=0, tasks=TASKS)
    write_builtin_tasks(root / "test", n=8, seed=1, tasks=TASKS)  # other seed: eval refuses training questions
    run = root / "run"
    train_adapters(tiny_model_path, data, run, LoRATrainConfig(max_steps=2, batch_size=4, logging_steps=1,
                                                                save_steps=2, max_length=64), progress=False)
    make_router_data(run / "router_data", adapters=run, config=RouterDataConfig(val_frac=0.2, test_frac=0.2),
                     progress=False)
    train_router(run / "router_data", tiny_model_path, run / "router",
                 RouterConfig(epochs=30, patience=3, embed_dim=32, hidden_dim=64, batch_size=16, learning_rate=1e-2),
                 progress=False)
    return run


@pytest.fixture(scope="session")
def ui_url(ui_run, tiny_model_path):
    """The app (pre-filled with the run and the tiny model) served on 127.0.0.1:<free port>; yields its URL."""
    from dlp_lora import ui

    app = ui.build_app(run=ui_run, model=str(tiny_model_path))
    port = free_port()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, share=False,
               ssr_mode=False, show_error=True)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        app.close()
        ui.clear_pipelines()
