"""Faults: a training killed with SIGKILL resumes and finishes with the same number of steps, an evaluation
killed mid-run leaves nothing that looks complete, full disks and unwritable output folders give one clear line
and no partial artifact."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import assert_one_line_error

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _start(*args: str, cwd=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "dlp_lora", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=ENV, cwd=cwd, start_new_session=True)


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 240.0) -> bool:
    """SIGKILL ``proc`` as soon as ``ready()`` holds; False if it finished first."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            return False
        if ready():
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(30)
            return True
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    raise AssertionError("the condition to kill never came")


def _tmp_leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if ".tmp-" in p.name]


# ---------------------------------------------------------------------------------------------------------------
# LoRA training: SIGKILL after the first checkpoint, then --resume
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_lora_training_killed_resumes_to_the_same_steps(tiny_model_path, tiny_run, tmp_path):
    from dlp_lora.lora import _last_checkpoint, work_dir_for

    data = tiny_run.parent / "data" / "arithmetic.json"
    out = tmp_path / "adapter"
    steps = 24
    args = ["train-lora", "--model", tiny_model_path, "--data", data, "--out", out, "--save-steps", "2",
            "--max-steps", str(steps), "--batch-size", "8", "--max-length", "128", "--no-progress"]
    work = work_dir_for(out)
    proc = _start(*args)
    killed = _kill_when(proc, lambda: _last_checkpoint(work) is not None)   # a complete checkpoint
    assert killed, "training finished before it could be killed; raise --max-steps"
    assert not (out / "adapter_config.json").exists(), "a killed training left an adapter that looks finished"
    assert any(work.glob("checkpoint-*")), "no checkpoint survived the kill"
    res = subprocess.run([sys.executable, "-m", "dlp_lora", *map(str, args), "--resume"], capture_output=True,
                         text=True, env=ENV, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    meta = json.loads((out / "dlp_task.json").read_text())
    assert meta["steps"] == steps
    assert meta["resumed_from_step"] >= 2
    assert not work.exists(), "the checkpoint folder was not cleaned up"
    from dlp_lora.fusion import read_adapter

    assert read_adapter(out)["modules"]      # a loadable PEFT adapter


# ---------------------------------------------------------------------------------------------------------------
# Router training: exact resume (in-process) and SIGKILL + --resume (subprocess)
# ---------------------------------------------------------------------------------------------------------------

def test_router_resume_gives_the_same_weights(tiny_model_path, tiny_run, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    import dlp_lora.router.train as T
    from dlp_lora.config import RouterConfig

    cfg = RouterConfig(epochs=5, embed_dim=16, hidden_dim=32, batch_size=16, patience=100)
    data = tiny_run / "router_data"
    T.train_router(data, tiny_model_path, tmp_path / "a", cfg, progress=False, checkpoint_seconds=0)
    orig = T._save_checkpoint

    def interrupted(path, model, opts, gen, state, best):
        orig(path, model, opts, gen, state, best)
        if state["epoch"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(T, "_save_checkpoint", interrupted)
    with pytest.raises(KeyboardInterrupt):
        T.train_router(data, tiny_model_path, tmp_path / "b", cfg, progress=False, checkpoint_seconds=0)
    assert not (tmp_path / "b").exists()
    assert (T.router_work_dir(tmp_path / "b") / T.CHECKPOINT).is_file()
    monkeypatch.setattr(T, "_save_checkpoint", orig)
    # other options: the checkpoint is refused, not silently mixed in
    from dlp_lora.config import DLPError

    with pytest.raises(DLPError, match="other data or options"):
        T.train_router(data, tiny_model_path, tmp_path / "b", RouterConfig(**{**cfg.__dict__, "learning_rate": 1e-2}),
                       progress=False, resume=True)
    T.train_router(data, tiny_model_path, tmp_path / "b", cfg, progress=False, checkpoint_seconds=0, resume=True)
    a, b = load_file(str(tmp_path / "a" / T.ROUTER_WEIGHTS)), load_file(str(tmp_path / "b" / T.ROUTER_WEIGHTS))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    m = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert m["resumed_from_epoch"] == 2 and m["epochs_run"] == 5
    assert not T.router_work_dir(tmp_path / "b").exists()
    # resume of a finished router keeps it
    assert T.train_router(data, tiny_model_path, tmp_path / "b", cfg, progress=False, resume=True) == tmp_path / "b"


@pytest.mark.slow
def test_router_training_killed_resumes_to_the_same_epochs(tiny_model_path, tiny_run, tmp_path):
    from dlp_lora.router.train import CHECKPOINT, router_work_dir

    out = tmp_path / "router"
    epochs = 60
    args = ["train-router", "--data", tiny_run / "router_data", "--model", tiny_model_path, "--out", out,
            "--epochs", str(epochs), "--patience", str(epochs), "--checkpoint-seconds", "0", "--no-progress"]
    ckpt = router_work_dir(out) / CHECKPOINT
    proc = _start(*args)
    assert _kill_when(proc, ckpt.is_file), "router training finished before it could be killed"
    assert not out.exists()
    res = subprocess.run([sys.executable, "-m", "dlp_lora", *map(str, args), "--resume"], capture_output=True,
                         text=True, env=ENV, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["epochs_run"] == epochs and m["resumed_from_epoch"] >= 1
    assert not router_work_dir(out).exists()


# ---------------------------------------------------------------------------------------------------------------
# Evaluation killed mid-run
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_eval_killed_leaves_no_complete_summary(tiny_model_path, tiny_run, tmp_path):
    from dlp_lora.tasks import write_builtin_tasks

    test_dir = tmp_path / "test_data"      # other questions than the adapters' training files (seed 1)
    write_builtin_tasks(test_dir, n=30, seed=1, tasks=["arithmetic", "capitals", "word_sorting"])
    out = tmp_path / "TestOutputs" / "ev"
    proc = _start("eval", "--run", tiny_run, "--model", tiny_model_path, "--data-dir", test_dir,
                  "--out", out, "--max-new-tokens", "64", "--fixed-length", "--batch-size", "1")
    t0 = time.monotonic()
    # kill while it generates: a few seconds after start (model loaded, predictions under way)
    killed = _kill_when(proc, lambda: time.monotonic() - t0 > 8.0)
    assert killed, "evaluation finished before it could be killed"
    assert not (out / "summary.json").exists(), "a killed evaluation left a summary that looks complete"
    assert not out.exists() or not any(out.iterdir())


# ---------------------------------------------------------------------------------------------------------------
# Full disk and unwritable output folders: one line, no partial artifact
# ---------------------------------------------------------------------------------------------------------------

def _enospc(*a, **k):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("target", ["os.replace", "safetensors.torch.save_file"])
def test_full_disk_export_mixture(cli, tiny_model_path, tiny_run, tmp_path, monkeypatch, target):
    mod, _, name = target.rpartition(".")
    monkeypatch.setattr(sys.modules[mod] if mod in sys.modules else __import__(mod, fromlist=[name]), name, _enospc)
    out = tmp_path / "mix"
    res = cli("export-mixture", "--model", tiny_model_path, "--run", tiny_run, "--weights", "arithmetic=1",
              "--out", out)
    assert_one_line_error(res, "mix", "No space left on device")
    assert not out.exists() and not _tmp_leftovers(tmp_path)


def test_full_disk_builtin_tasks(cli, tmp_path, monkeypatch):
    monkeypatch.setattr(os, "replace", _enospc)
    res = cli("data", "builtin", "--out", tmp_path / "tasks", "--n", "5", "--tasks", "arithmetic")
    assert_one_line_error(res, "No space left on device")
    assert not any(p.suffix == ".json" for p in tmp_path.rglob("*")) and not _tmp_leftovers(tmp_path)


def test_full_disk_train_router(cli, tiny_model_path, tiny_run, tmp_path, monkeypatch):
    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "save_model", _enospc)
    out = tmp_path / "router"
    res = cli("train-router", "--data", tiny_run / "router_data", "--model", tiny_model_path, "--out", out,
              "--epochs", "1", "--no-progress")
    assert_one_line_error(res, "router", "No space left on device")
    assert not out.exists() and not _tmp_leftovers(tmp_path)


def test_full_disk_make_router_data(cli, tiny_run, tmp_path, monkeypatch):
    monkeypatch.setattr(os, "replace", _enospc)
    out = tmp_path / "rd"
    res = cli("make-router-data", "--adapters", tiny_run, "--out", out, "--no-progress")
    assert_one_line_error(res, "rd", "No space left on device")
    assert not out.exists() and not _tmp_leftovers(tmp_path)


READ_ONLY = Path("/sys/dlp_lora_reliability_out")     # mkdir there fails even for root (EPERM)


@pytest.mark.skipif(not Path("/sys").is_dir(), reason="needs /sys (Linux) for an unwritable folder")
@pytest.mark.parametrize("argv", [
    ["data", "builtin", "--n", "5", "--tasks", "arithmetic", "--out", "{out}"],
    ["make-router-data", "--adapters", "{run}", "--no-progress", "--out", "{out}"],
    ["export-mixture", "--model", "{tiny}", "--run", "{run}", "--weights", "arithmetic=1", "--out", "{out}"],
    ["train-router", "--data", "{run}/router_data", "--model", "{tiny}", "--epochs", "1", "--no-progress",
     "--out", "{out}"],
    ["models", "tiny", "--out", "{out}"],
], ids=["builtin", "make-router-data", "export-mixture", "train-router", "models-tiny"])
@pytest.mark.parametrize("where", ["read_only", "under_a_file"])
def test_unwritable_output(cli, tiny_model_path, tiny_run, tmp_path, argv, where):
    if where == "read_only":
        if os.access("/sys", os.W_OK) and os.geteuid() != 0:
            pytest.skip("/sys is writable here")
        out = READ_ONLY / "x"
    else:
        (tmp_path / "file.txt").write_text("a plain file\n")
        out = tmp_path / "file.txt" / "x"
    env = {"out": out, "run": tiny_run, "tiny": tiny_model_path}
    args = [a.format(**env) for a in argv]
    res = cli(*args)
    assert_one_line_error(res, "x")
    assert "internal error" not in res.err, res.err
    assert not _tmp_leftovers(tmp_path)
    if where == "under_a_file":
        assert (tmp_path / "file.txt").read_text() == "a plain file\n"


# ---------------------------------------------------------------------------------------------------------------
# Safety: only safetensors/JSON from user paths; server limits under a burst
# ---------------------------------------------------------------------------------------------------------------

PKG = Path(__file__).resolve().parents[1] / "dlp_lora"


def test_no_pickle_or_remote_code_in_the_package():
    """No code path calls torch.load / pickle / numpy allow_pickle; models load with use_safetensors=True;
    trust_remote_code is never hard-wired to True (it is a parameter that defaults to False)."""
    import ast

    bad = []
    for f in sorted(PKG.rglob("*.py")):
        tree = ast.parse(f.read_text(), str(f))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                if any(n.split(".")[0] in ("pickle", "cPickle", "dill", "joblib", "cloudpickle") for n in names):
                    bad.append(f"{f.name}:{node.lineno}: imports a pickle module")
            if not isinstance(node, ast.Call):
                continue
            fn = ast.unparse(node.func)
            if fn.endswith(("torch.load", "pickle.load", "pickle.loads")) or fn in ("load_pickle",):
                bad.append(f"{f.name}:{node.lineno}: {fn}()")
            for kw in node.keywords:
                if kw.arg in ("trust_remote_code", "allow_pickle") and isinstance(kw.value, ast.Constant) \
                        and kw.value.value is True:
                    bad.append(f"{f.name}:{node.lineno}: {kw.arg}=True")
                if kw.arg == "weights_only" and isinstance(kw.value, ast.Constant) and kw.value.value is False:
                    bad.append(f"{f.name}:{node.lineno}: weights_only=False")
            if fn.startswith("AutoModel") and fn.endswith(".from_pretrained"):
                kws = {kw.arg: kw.value for kw in node.keywords}
                ok = "gguf_file" in kws or (isinstance(kws.get("use_safetensors"), ast.Constant)
                                            and kws["use_safetensors"].value is True)
                if not ok:
                    bad.append(f"{f.name}:{node.lineno}: {fn} without use_safetensors=True")
    assert not bad, bad
    src = (PKG / "models.py").read_text()
    assert "trust_remote_code: bool = False" in src


def _no_unpickling(monkeypatch):
    import pickle

    def refuse(*a, **k):
        raise AssertionError("a pickle was loaded from a user path")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)


def test_bin_only_adapter_is_refused_without_unpickling(cli, tiny_model_path, tiny_run, tmp_path, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    ad = run / "adapters" / "arithmetic"
    (ad / "adapter_model.safetensors").unlink()
    import pickle

    (ad / "adapter_model.bin").write_bytes(pickle.dumps({"x": 1}))
    _no_unpickling(monkeypatch)
    for argv in (["generate", "--model", tiny_model_path, "--run", run, "--weights", "arithmetic=1", "--prompt", "hi",
                  "--device", "cpu", "--max-new-tokens", "1"],
                 ["export-mixture", "--model", tiny_model_path, "--run", run, "--weights", "arithmetic=1", "--out",
                  tmp_path / "mix"],
                 ["make-router-data", "--adapters", run, "--out", tmp_path / "rd", "--no-progress"]):
        res = cli(*argv)
        if argv[0] == "make-router-data":   # reads only dlp_task.json (the data file), never the weights
            assert res.code in (0, 1), res
            continue
        assert_one_line_error(res, "adapter_model.bin", "never loaded")
    assert not (tmp_path / "mix").exists()


def test_bin_only_model_is_refused_without_unpickling(cli, tiny_model_path, tiny_run, tmp_path, monkeypatch):
    import pickle

    model = tmp_path / "model"
    shutil.copytree(tiny_model_path, model)
    for f in model.glob("*.safetensors"):
        f.unlink()
    (model / "pytorch_model.bin").write_bytes(pickle.dumps({"x": 1}))
    _no_unpickling(monkeypatch)
    res = cli("generate", "--model", model, "--run", tiny_run, "--prompt", "hi", "--device", "cpu")
    assert_one_line_error(res, "model", "safetensors")
    res = cli("train-lora", "--model", model, "--data", tiny_run.parent / "data" / "arithmetic.json", "--out",
              tmp_path / "ad", "--max-steps", "1", "--no-progress")
    assert_one_line_error(res, "model", "safetensors")
    assert not (tmp_path / "ad").exists()


def test_server_limits_hold_under_a_burst(tiny_run, tiny_model_path):
    """50 oversized bodies -> 413, 50 max_tokens over the cap -> 400, a flood while the engine is busy -> 429
    beyond the queue (with Retry-After); afterwards the server is healthy and answers normally."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    from dlp_lora.pipeline import DLPPipeline
    from dlp_lora.serve import ServeConfig, create_app
    from helpers_server import serving

    pipe = DLPPipeline.from_run(tiny_run, model=tiny_model_path, device="cpu", dtype="fp32")
    cfg = ServeConfig(max_body_bytes=4000, max_tokens_cap=8, default_max_tokens=2, max_queue=4, max_batch=1,
                      batch_window_ms=0)
    app = create_app(pipe, cfg)
    ok_body = {"model": "dlp", "messages": [{"role": "user", "content": "2+2?"}], "max_tokens": 2}
    with serving(app) as srv:
        url = srv.base_url + "/chat/completions"

        def post(body, raw: bytes | None = None):
            with httpx.Client(timeout=60) as c:
                if raw is not None:
                    return c.post(url, content=raw, headers={"content-type": "application/json"})
                return c.post(url, json=body)

        big = json.dumps({**ok_body, "messages": [{"role": "user", "content": "x" * 50_000}]}).encode()
        with ThreadPoolExecutor(16) as ex:
            r413 = list(ex.map(lambda _: post(None, big), range(50)))
            r400 = list(ex.map(lambda _: post({**ok_body, "max_tokens": 10_000}), range(50)))
        assert {r.status_code for r in r413} == {413}
        assert all(r.json()["error"]["code"] == "body_too_large" for r in r413)
        assert {r.status_code for r in r400} == {400}

        # hold the engine on its first batch so the queue fills deterministically
        gate, entered = threading.Event(), threading.Event()
        batcher = app.state.batcher
        real = batcher.run_batch

        def held(batch):
            entered.set()
            gate.wait(60)
            return real(batch)

        batcher.run_batch = held
        with ThreadPoolExecutor(40) as ex:
            first = ex.submit(post, ok_body)
            assert entered.wait(30)
            rest = [ex.submit(post, ok_body) for _ in range(30)]
            deadline = time.monotonic() + 30
            while sum(f.done() for f in rest) < 30 - cfg.max_queue and time.monotonic() < deadline:
                time.sleep(0.05)
            gate.set()
            codes = [first.result().status_code] + [f.result().status_code for f in rest]
        batcher.run_batch = real
        assert codes.count(429) == 30 - cfg.max_queue, codes
        assert codes.count(200) == 1 + cfg.max_queue, codes
        r429 = next(f.result() for f in rest if f.result().status_code == 429)
        assert r429.headers.get("retry-after") and r429.json()["error"]["code"] == "queue_full"

        with httpx.Client(timeout=60) as c:
            health = c.get(srv.url + "/health").json()
            assert health["status"] == "ok" and health["queue"] == 0
            r = c.post(url, json=ok_body)
            assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] is not None
