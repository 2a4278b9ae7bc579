"""Fixtures shared by the web-app tests: the shared tiny run (conftest's ``tiny_run``), held-out test files for
its tasks, and the app served in-process on a free loopback port."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import free_port

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

TASKS = ["arithmetic", "capitals", "word_sorting"]   # the tasks of conftest's tiny_run, in adapters.txt order


@pytest.fixture(scope="session")
def ui_run(tiny_run) -> Path:
    """The shared tiny run (read-only: pages write their outputs under each test's tmp_path)."""
    assert [line.split("/")[-1] for line in (tiny_run / "adapters.txt").read_text().split()] == TASKS
    return tiny_run


@pytest.fixture(scope="session")
def ui_router(ui_run, tiny_model_path, tmp_path_factory) -> Path:
    """A router trained longer than the shared run's (seconds) on the run's router data, so that each built-in
    task's sentences go to their own task; pages take it through their "router folder" box."""
    from dlp_lora.config import RouterConfig
    from dlp_lora.router import train_router

    out = tmp_path_factory.mktemp("ui_router") / "router"
    return train_router(ui_run / "router_data", tiny_model_path, out,
                        RouterConfig(epochs=30, patience=3, embed_dim=32, hidden_dim=64, batch_size=16,
                                     learning_rate=1e-2), progress=False)


@pytest.fixture(scope="session")
def ui_test_data(tmp_path_factory) -> Path:
    """Test files for the run's tasks, drawn with another seed than the training files (eval refuses training
    questions)."""
    from dlp_lora.tasks import write_builtin_tasks

    folder = tmp_path_factory.mktemp("ui_test_data")
    write_builtin_tasks(folder, n=8, seed=1, tasks=TASKS)
    return folder


@pytest.fixture(scope="session")
def ui_url(ui_run):
    """The app, pre-filled with the run only (the run decides the base model), served on 127.0.0.1:<free port>
    with the same launch options as ``dlp-lora ui``; yields its URL."""
    from dlp_lora import ui
    from dlp_lora.ui.app import launch_options
    from dlp_lora.ui.playground import clear_pipelines

    app = ui.build_app(run=ui_run)
    port = free_port()
    app.launch(**launch_options("127.0.0.1", port, prevent_thread_lock=True, quiet=True))
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        app.close()
        clear_pipelines()
