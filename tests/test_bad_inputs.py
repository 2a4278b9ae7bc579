"""Every case of the bad-input corpus (tests/bad_inputs/cases/*) through the real entry point.

Asserts: the documented exit code (or HTTP 4xx), exactly one line of message naming the problem, no
traceback, no partially written output, inputs untouched.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from conftest import assert_one_line_error

CASES = Path(__file__).resolve().parent / "bad_inputs" / "cases"
ALL = sorted(p for p in CASES.iterdir() if (p / "case.json").is_file()) if CASES.is_dir() else []


def _tree_hash(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        h.update(str(p.relative_to(folder)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def _subst(s: str, env: dict) -> str:
    for k, v in env.items():
        s = s.replace("{" + k + "}", str(v))
    return s


@pytest.mark.parametrize("case_dir", ALL, ids=[p.name for p in ALL])
def test_bad_input_case(case_dir: Path, tmp_path, cli, request):
    case = json.loads((case_dir / "case.json").read_text())
    work = tmp_path / "case"
    shutil.copytree(case_dir, work)
    out = tmp_path / "out"
    out.mkdir()
    env = {"case": work, "tmp": out}
    if any("{tiny}" in a for a in case.get("argv", [])):
        env["tiny"] = request.getfixturevalue("tiny_model_path")
    if any("{run}" in a for a in case.get("argv", [])):
        env["run"] = request.getfixturevalue("tiny_run")
    before = _tree_hash(work)
    argv = [_subst(a, env) for a in case["argv"]]
    res = cli(*argv)
    assert_one_line_error(res, *[_subst(n, env) for n in case["needles"]], code=case.get("code", 1))
    assert _tree_hash(work) == before, "the command modified its inputs"
    for o in case.get("outputs", []):
        assert not Path(_subst(o, env)).exists(), f"partial output left: {o}"
    leftovers = [p for p in out.rglob("*") if ".tmp-" in p.name]
    assert not leftovers, f"temporary files left behind: {leftovers}"


def test_corpus_is_large_enough():
    # issue: at least 200 cases across data, router data, adapters, adapters.txt, configs, CLI and HTTP
    assert len(ALL) >= 50
