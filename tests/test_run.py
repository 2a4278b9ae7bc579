"""The run format and its one loader: every front-end resolves the same adapters, router and base model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from dlp_lora.config import DLPError
from dlp_lora.run import ADAPTER_LIST, base_model_of, open_run, read_adapter_list, write_adapter_list


def test_open_run_resolves_adapters_router_and_base_model(tiny_run, tiny_model_path):
    run = open_run(tiny_run)
    assert run.root == tiny_run.absolute()
    assert run.names == ["arithmetic", "capitals", "word_sorting"]
    assert run.adapter_dirs == read_adapter_list(tiny_run / ADAPTER_LIST)
    assert run.router_dir == tiny_run / "router" and run.has_router
    # the adapters' own base model (dlp_task.json), not the default model
    assert Path(run.base_model).resolve() == Path(tiny_model_path).resolve()
    assert open_run(tiny_run, model="tiny").base_model == "tiny"          # --model only overrides
    assert open_run(tiny_run, router=False).router_dir is None
    assert open_run(tiny_run / ADAPTER_LIST).names == run.names           # adapters.txt works the same
    one = open_run(run.adapter_dirs[1])                                   # a single adapter folder
    assert one.names == ["capitals"] and one.router_dir is None and one.root is None


def test_open_run_errors_are_one_line(tmp_path):
    with pytest.raises(DLPError, match="run folder not found"):
        open_run(tmp_path / "nope")
    with pytest.raises(DLPError, match="no adapters.txt"):
        open_run(tmp_path)
    with pytest.raises(DLPError, match="not a PEFT LoRA folder"):
        (tmp_path / "r").mkdir()
        open_run([tmp_path / "r"])


def test_missing_router_folder_is_named(tiny_run, tmp_path):
    with pytest.raises(DLPError, match="router folder not found"):
        open_run(tiny_run, router=tmp_path / "missing")


def test_require_router_names_the_run(tiny_run, tmp_path):
    run_copy = tmp_path / "run"
    shutil.copytree(tiny_run, run_copy, ignore=shutil.ignore_patterns("router"))
    with pytest.raises(DLPError, match="no router/ folder"):
        open_run(run_copy).require_router()


def test_adapters_txt_with_byte_order_mark(tiny_run, tmp_path):
    dirs = read_adapter_list(tiny_run)
    lst = tmp_path / "adapters.txt"
    lst.write_text("\ufeff" + "\n".join(map(str, dirs)) + "\n", encoding="utf-8")
    assert read_adapter_list(lst) == dirs
    out = write_adapter_list(tmp_path / "again.txt", dirs)
    assert read_adapter_list(out) == dirs


def test_base_model_falls_back_to_default_when_unknown():
    assert base_model_of([{"task": "x"}]) == "default"
    assert base_model_of([{"task": "x", "base_model": {"name_or_path": "/no/such/model"}}]) == "default"


def test_generate_without_model_uses_the_runs_base_model(cli, tiny_run):
    """The bug: generate --run RUN without --model loaded the default model (adapter shape mismatch)."""
    res = cli("generate", "--run", tiny_run, "--prompt", "What is 2 plus 3?", "--max-new-tokens", "3",
              "--json", "--device", "cpu")
    assert res.code == 0, res
    row = json.loads(res.out.strip().splitlines()[-1])
    assert row["routing"] and row["completion_tokens"] >= 1


def test_eval_without_model_uses_the_runs_base_model(cli, tiny_run, tmp_path):
    from dlp_lora.tasks import write_builtin_tasks

    # held-out questions (another generator seed): eval refuses test questions the adapters were trained on
    write_builtin_tasks(tmp_path / "test", n=6, seed=11, tasks=["arithmetic", "capitals", "word_sorting"])
    res = cli("eval", "--run", tiny_run, "--data-dir", tmp_path / "test", "--systems", "dlp", "--limit", "1",
              "--max-new-tokens", "2", "--out", tmp_path / "eval", "--no-progress", "--device", "cpu")
    assert res.code == 0, res
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert "tiny" in json.dumps(summary["config"]), summary["config"]
