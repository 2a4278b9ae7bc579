"""Shared fixtures: offline environment, the tiny model, and a CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory) -> Path:
    """A tiny random Llama (hidden 64, 2 layers) with SmolLM2's real tokenizer, written once per session."""
    from dlp_lora.models import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny(tiny_model_path):
    """``(model, tokenizer)`` of the tiny model (fresh load; tests must not leave it modified)."""
    from dlp_lora.models import load_model

    return load_model(tiny_model_path, device="cpu", dtype="fp32")


class CLIResult:
    def __init__(self, code: int, out: str, err: str) -> None:
        self.code, self.out, self.err = code, out, err

    def __repr__(self) -> str:
        return f"CLIResult(code={self.code}, out={self.out[-500:]!r}, err={self.err[-500:]!r})"


@pytest.fixture
def cli(capsys):
    """Run ``dlp-lora ARGS`` in-process; returns code, stdout, stderr."""
    from dlp_lora.cli import main

    def run(*args: str) -> CLIResult:
        capsys.readouterr()
        try:
            code = main([str(a) for a in args])
        except SystemExit as e:
            code = int(e.code or 0)
        out, err = capsys.readouterr()
        return CLIResult(code, out, err)

    return run


def run_cli_subprocess(*args: str, cwd: str | os.PathLike | None = None, timeout: int = 300) -> CLIResult:
    """Run ``python -m dlp_lora ARGS`` in a real subprocess (for checking there is no traceback)."""
    p = subprocess.run([sys.executable, "-m", "dlp_lora", *map(str, args)], capture_output=True, text=True,
                       cwd=cwd, timeout=timeout, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return CLIResult(p.returncode, p.stdout, p.stderr)


def assert_one_line_error(res: CLIResult, *needles: str, code: int = 1) -> None:
    """The CLI failed with exactly one line on stderr that contains every needle, and no traceback."""
    assert res.code == code, res
    lines = [l for l in res.err.splitlines() if l.strip() and not _is_noise(l)]
    assert len(lines) == 1, res
    assert "Traceback" not in res.err, res
    for n in needles:
        assert n in lines[0], (n, lines[0])


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for servers the tests start)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _is_noise(line: str) -> bool:
    # progress bars and library warnings are not our error message
    return "it/s]" in line or "%|" in line or "Warning" in line or line.startswith("  warnings.warn")


def build_tiny_run(model_path: Path, root: Path, tasks=("arithmetic", "capitals", "word_sorting")) -> Path:
    """A tiny trained run folder: RUN/adapters/<task>/ (2 LoRA steps each), RUN/adapters.txt, RUN/router_data/,
    RUN/router/ (a small mini-MLP), plus RUN/data/ (the built-in task files it was trained on)."""
    from dlp_lora.config import LoRATrainConfig, RouterConfig, RouterDataConfig
    from dlp_lora.lora import train_adapters
    from dlp_lora.router import make_router_data, train_router
    from dlp_lora.tasks import write_builtin_tasks

    run = root / "run"
    data = root / "data"
    write_builtin_tasks(data, n=30, seed=0, tasks=list(tasks))
    train_adapters(model_path, data, run, LoRATrainConfig(max_steps=2, batch_size=4, max_length=64, save_steps=50),
                   progress=False)
    make_router_data(run / "router_data", adapters=run, config=RouterDataConfig(val_frac=0.2, test_frac=0.2),
                     progress=False)
    train_router(run / "router_data", model_path, run / "router",
                 RouterConfig(epochs=3, embed_dim=16, hidden_dim=32, batch_size=16), progress=False)
    return run


@pytest.fixture(scope="session")
def tiny_run(tiny_model_path, tmp_path_factory) -> Path:
    """A tiny trained run (see build_tiny_run); shared, read-only by convention: copy it before changing it."""
    return build_tiny_run(tiny_model_path, tmp_path_factory.mktemp("tiny_run"))
