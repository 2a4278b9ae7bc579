"""Every case of the bad-input corpus (tests/bad_inputs/cases/*) through the real entry point.

CLI cases run ``dlp-lora ARGS`` in-process; HTTP cases send a request to the OpenAI-compatible server
(``dlp_lora.server.create_app`` on the tiny run's pipeline, through Starlette's TestClient).

Asserts: the documented exit code (or HTTP 4xx), exactly one line of message naming the problem (never the
catch-all "internal error"), no traceback, no partially written output, inputs untouched.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import pytest

from conftest import assert_one_line_error

CASES = Path(__file__).resolve().parent / "bad_inputs" / "cases"
ALL = sorted(p for p in CASES.iterdir() if (p / "case.json").is_file()) if CASES.is_dir() else []
CATEGORIES = ("data", "args", "router_data", "router", "adapter", "adapters_txt", "cmd", "http")


def _tree_hash(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        h.update(str(p.relative_to(folder)).encode())
        if p.is_file() and not p.is_symlink():  # never read a FIFO or a link to /dev/zero here either
            h.update(p.read_bytes())
    return h.hexdigest()


def _subst(s: str, env: dict) -> str:
    for k, v in env.items():
        s = s.replace("{" + k + "}", str(v))
    return s


def _setup(case: dict, case_dir: Path, work: Path, request) -> None:
    """The case's private copy: the tiny run (when asked), then the case's own files, then deletions/edits."""
    if case.get("copy_run"):
        shutil.copytree(request.getfixturevalue("tiny_run"), work / "run")
    shutil.copytree(case_dir, work, dirs_exist_ok=True,
                    ignore=lambda d, names: [n for n in names if Path(d, n).is_file() and (work / "run").exists()
                                             and Path(d, n).relative_to(case_dir).parts[:1] == ("run",)
                                             and (work / Path(d, n).relative_to(case_dir)).is_dir()])
    for rel in case.get("delete", []):
        p = work / rel
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    for rel, key, value in case.get("json_set", []):
        p = work / rel
        obj = json.loads(p.read_text())
        if value is None:
            obj.pop(key, None)
        else:
            obj[key] = value
        p.write_text(json.dumps(obj, indent=2))
    # a case file that replaces a folder of the run (e.g. run/router as a plain file) is written after deletion
    for p in case_dir.rglob("*"):
        rel = p.relative_to(case_dir)
        if p.is_file() and not (work / rel).exists():
            (work / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(p, work / rel)
    for rel in case.get("mkfifo", []):          # inputs git cannot hold: made here, before fingerprinting
        (work / rel).parent.mkdir(parents=True, exist_ok=True)
        os.mkfifo(work / rel)
    for rel, target in case.get("symlink", []):
        (work / rel).parent.mkdir(parents=True, exist_ok=True)
        (work / rel).symlink_to(target)


# ---------------------------------------------------------------------------------------------------------------
# HTTP: one app per server config, all on the tiny run's pipeline
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def http_clients(tiny_run, tiny_model_path):
    from fastapi.testclient import TestClient

    from dlp_lora.pipeline import DLPPipeline
    from dlp_lora.serve import ServeConfig, create_app

    pipe = DLPPipeline.from_run(tiny_run, model=tiny_model_path, device="cpu", dtype="fp32")
    clients: dict[str, TestClient] = {}

    def get(server: dict) -> TestClient:
        key = json.dumps(server, sort_keys=True)
        if key not in clients:
            c = TestClient(create_app(pipe, ServeConfig(**server)), raise_server_exceptions=False)
            c.__enter__()
            clients[key] = c
        return clients[key]

    yield get
    for c in clients.values():
        c.__exit__(None, None, None)


def _http(case: dict, client) -> None:
    req = case["request"]
    method = req.get("method", "POST")
    headers = dict(req.get("headers", {}))
    kw: dict = {"headers": headers}
    if "raw" in req:
        kw["content"] = req["raw"].encode()
        headers.setdefault("content-type", "application/json")
    elif "raw_bytes" in req:
        kw["content"] = bytes.fromhex(req["raw_bytes"])
        headers.setdefault("content-type", "application/json")
    elif "body" in req:
        kw["json"] = req["body"]
    r = client.request(method, req["path"], **kw)
    assert r.status_code == case["status"], (r.status_code, r.text[:500])
    assert 400 <= r.status_code < 500
    assert r.headers["content-type"].startswith("application/json"), r.headers
    body = r.json()
    err = body.get("error") if isinstance(body, dict) else None
    assert isinstance(err, dict) and isinstance(err.get("message"), str) and isinstance(err.get("type"), str), body
    msg = err["message"]
    assert "\n" not in msg and "Traceback" not in msg and msg.strip(), msg
    for n in case["needles"]:
        assert n in msg, (n, msg)


@pytest.mark.parametrize("case_dir", ALL, ids=[p.name for p in ALL])
def test_bad_input_case(case_dir: Path, tmp_path, cli, request, monkeypatch):
    case = json.loads((case_dir / "case.json").read_text())
    if case["kind"] == "http":
        _http(case, request.getfixturevalue("http_clients")(case.get("server", {})))
        return
    work = tmp_path / "case"
    work.mkdir()
    _setup(case, case_dir, work, request)
    out = tmp_path / "out"
    out.mkdir()
    env = {"case": work, "tmp": out}
    if any("{tiny}" in a for a in case.get("argv", [])):
        env["tiny"] = request.getfixturevalue("tiny_model_path")
    if any("{run}" in a for a in case.get("argv", [])):
        env["run"] = request.getfixturevalue("tiny_run")
    before = _tree_hash(work)
    run_before = _tree_hash(env["run"]) if "run" in env else None
    argv = [_subst(a, env) for a in case["argv"]]
    for name, value in case.get("env", {}).items():
        monkeypatch.setenv(name, value)
    res = cli(*argv)
    assert_one_line_error(res, *[_subst(n, env) for n in case["needles"]], code=case.get("code", 1))
    assert "internal error" not in res.err, res      # the catch-all means nobody named the problem
    assert _tree_hash(work) == before, "the command modified its inputs"
    if run_before is not None:
        assert _tree_hash(env["run"]) == run_before, "the command modified the shared run"
    for o in case.get("outputs", []):
        assert not Path(_subst(o, env)).exists(), f"partial output left: {o}"
    leftovers = [p for p in list(out.rglob("*")) + list(work.rglob("*")) if ".tmp-" in p.name]
    assert not leftovers, f"temporary files left behind: {leftovers}"


def test_corpus_is_large_enough():
    # the corpus only grows: a case is removed only when its input stops being bad (then it moves to a test)
    assert len(ALL) >= 450
    cats = {p.name.split("__")[0] for p in ALL}
    assert set(CATEGORIES) <= cats, cats


def test_one_error_formatter():
    from dlp_lora.config import DLPError, format_error

    assert format_error(DLPError("t.json: record 3: field 'Q': missing\nmore")) == "t.json: record 3: field 'Q': missing"
    assert format_error(DLPError("")) == "failed"
    too_long = OSError(36, "File name too long", "/tmp/" + "x" * 300)
    assert format_error(too_long) == "/tmp/" + "x" * 300 + ": File name too long"
    assert format_error(RecursionError("maximum recursion depth exceeded")).startswith("input nested too deeply")
    msg = format_error(ValueError("bad\nvalue"))
    assert msg.startswith("internal error: ValueError: bad") and "\n" not in msg


def test_cli_prints_unexpected_errors_as_one_named_line(cli, monkeypatch):
    import dlp_lora.tasks as tasks

    def boom(*a, **k):
        raise KeyError("surprise")

    monkeypatch.setattr(tasks, "write_builtin_tasks", boom)
    res = cli("data", "builtin", "--out", "x")
    assert_one_line_error(res, "internal error: KeyError", "surprise", "DLP_LORA_DEBUG")


def test_check_int_bounds_and_short_messages():
    from dlp_lora.config import DLPError, check_int

    assert check_int("seed", 7, 0, 10) == 7
    for bad, needle in ((True, "whole number"), (1.5, "whole number"), (-1, "[0, 10]"), (11, "got 11")):
        with pytest.raises(DLPError, match=re.escape(needle)):
            check_int("seed", bad, 0, 10)
    with pytest.raises(DLPError) as e:
        check_int("max_new_tokens", 10 ** 5000, 1, 100_000)   # str() of this number itself would fail
    assert "about 5001 digits" in str(e.value) and len(str(e.value)) < 120


def test_overwrite_never_replaces_the_users_folders(tmp_path, monkeypatch):
    from dlp_lora.config import DLPError, atomic_dir

    inner = tmp_path / "project" / "work"
    inner.mkdir(parents=True)
    monkeypatch.chdir(inner)
    for folder in (tmp_path / "project", inner, Path.home(), Path("/usr")):
        with pytest.raises(DLPError, match="refusing to replace"):
            with atomic_dir(folder, overwrite=True):
                pass
    with pytest.raises(DLPError, match="file-system root"):
        with atomic_dir("/", overwrite=True):
            pass
    assert inner.is_dir() and Path("/usr").is_dir()
    other = tmp_path / "artifact"
    other.mkdir()
    with atomic_dir(other, overwrite=True) as tmp:          # an ordinary artifact folder is replaced
        (tmp / "new.txt").write_text("x")
    assert [p.name for p in other.iterdir()] == ["new.txt"]
