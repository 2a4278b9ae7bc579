"""`dlp-lora demo --quick` end to end: the exact artifact tree, the summary keys, reuse, an interrupted stage."""

from __future__ import annotations

import json

import pytest

import dlp_lora.router as router_pkg
from dlp_lora.demo import DemoConfig, QUICK, run_demo

TASKS = ["arithmetic", "boolean_logic"]


def _tree(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def cfg():
    return DemoConfig(**{**QUICK, "tasks": ",".join(TASKS), "n_train": 32, "n_test": 2, "max_steps": 2})


def test_quick_demo_interrupted_resumed_and_reused(tmp_path, cfg, monkeypatch, capsys):
    out = tmp_path / "demo"

    # 1) interrupt the router stage (Ctrl-C): finished stages stay, the router leaves nothing behind
    real_train_router = router_pkg.train_router

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(router_pkg, "train_router", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_demo(out, config=cfg)
    assert (out / "adapters.txt").is_file() and (out / "router_data" / "labels.json").is_file()
    assert not (out / "router").exists()
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name], "half-written artifact left behind"
    adapter_mtime = (out / "adapters" / TASKS[0] / "adapter_model.safetensors").stat().st_mtime_ns
    monkeypatch.setattr(router_pkg, "train_router", real_train_router)

    # 2) re-run: the interrupted stage is redone, the finished ones are reused
    capsys.readouterr()
    result = run_demo(out, config=cfg)
    log = capsys.readouterr().out
    assert "[adapters] reusing" in log and "[router data] reusing" in log and "[router] ->" in log
    assert (out / "adapters" / TASKS[0] / "adapter_model.safetensors").stat().st_mtime_ns == adapter_mtime

    # the exact artifact tree
    files = set(_tree(out))
    expected = {"demo_config.json", "demo_summary.json", "adapters.txt"}
    for t in TASKS:
        expected |= {f"data/{s}/{t}.json" for s in ("train", "test")} | {f"data/{s}/{t}.meta.json" for s in ("train", "test")}
        expected |= {f"adapters/{t}/{f}" for f in ("adapter_config.json", "adapter_model.safetensors", "dlp_task.json",
                                                   "train_config.json")}
    expected |= {f"router_data/{f}" for f in ("train.jsonl", "val.jsonl", "test.jsonl", "labels.json", "config.json",
                                             "stats.json")}
    expected |= {f"router/{f}" for f in ("router.safetensors", "config.json", "labels.json", "metrics.json",
                                        "confusion.png", "reliability.png", "fallback.png")}
    expected |= {f"eval/{f}" for f in ("summary.json", "summary.md", "predictions.jsonl", "config.json",
                                      "plots/scores.png", "plots/routing_confusion.png", "plots/time_ratios.png")}
    tokenizer_files = {f for f in files if f.startswith("router/tokenizer/")}
    assert tokenizer_files, "the router keeps the tokenizer it was trained with"
    assert files - tokenizer_files == expected

    # the summary's keys
    summary = json.loads((out / "eval" / "summary.json").read_text())
    for key in ("per_task", "averages", "routing", "timing", "systems"):
        assert key in summary
    assert set(summary["averages"]) == {"base", "single", "dlp", "uniform"}
    assert json.loads((out / "router" / "labels.json").read_text()) == TASKS
    assert [l.strip() for l in (out / "adapters.txt").read_text().splitlines() if l.strip()] == \
        [f"adapters/{t}" for t in TASKS]
    assert len(result["live"]) == 3 and all(r["routing"] for r in result["live"])
    demo_summary = json.loads((out / "demo_summary.json").read_text())
    assert set(demo_summary) == {"timings_s", "live", "eval", "config"}

    # 3) a third run reuses everything (no retraining, no re-evaluation)
    capsys.readouterr()
    run_demo(out, config=cfg)
    log = capsys.readouterr().out
    for stage in ("data", "adapters", "router data", "router", "eval"):
        assert f"[{stage}] reusing" in log
    assert (out / "adapters" / TASKS[0] / "adapter_model.safetensors").stat().st_mtime_ns == adapter_mtime


def test_cli_demo_quick_flag_parses(cli):
    res = cli("demo", "--bogus")
    assert res.code == 2 and "unrecognized" in res.err
