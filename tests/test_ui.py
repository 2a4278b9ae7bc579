"""The web app through its HTTP API (``gradio_client``): each page's main action on the tiny model, the
one-line errors, cancellation, and the CLI entry point. The app runs in-process on a free loopback port."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import pytest

pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")

from dlp_lora.config import LoRATrainConfig, RouterConfig, RouterDataConfig  # noqa: E402
from helpers_ui import TASKS, ui_run, ui_url  # noqa: E402,F401  (fixtures)

ROUTER_SKIP = ("kind", "vocab_size", "tokenizer", "num_labels")


@pytest.fixture(scope="module")
def client(ui_url):
    from gradio_client import Client

    return Client(ui_url, verbose=False, analytics_enabled=False)


def cfg_values(cls, skip=(), **over) -> list:
    """The page's hyper-parameter inputs, in field order, with CLI defaults except ``over``."""
    vals = []
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        vals.append(over.pop(f.name, f.default))
    assert not over, over
    return vals


def table(v) -> list[dict]:
    """A Dataframe output as a list of row dicts."""
    return [dict(zip(v["headers"], row)) for row in v["data"]]


def text_of(message: dict) -> str:
    """A chatbot message's text (Gradio 6 hands content back as a list of parts)."""
    c = message["content"]
    return c if isinstance(c, str) else "".join(p.get("text", "") for p in c if isinstance(p, dict))


def one_line_error(excinfo) -> str:
    msg = str(excinfo.value)
    assert "Traceback" not in msg
    assert len(msg.strip().splitlines()) == 1, msg
    return msg


# -------------------------------------------------------------------------------------------------------------
# 1. LoRA training + test mode
# -------------------------------------------------------------------------------------------------------------

def test_train_lora_page_trains_and_shows_loss(client, ui_run, tiny_model_path, tmp_path):
    from gradio_client import handle_file

    out = tmp_path / "adapters" / "arith_ui"
    data = ui_run.parent / "data"
    uploads = [handle_file(str(data / "arithmetic.json")), handle_file(str(data / "arithmetic.meta.json"))]
    status, loss, info, adapter = client.predict(
        str(tiny_model_path), uploads, "", "arith_ui",
        str(out), False, False,
        *cfg_values(LoRATrainConfig, max_steps=3, logging_steps=1, batch_size=4, max_length=64, save_steps=3),
        api_name="/train_lora")
    assert status.startswith("done"), status
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    meta = json.loads((out / "dlp_task.json").read_text())
    assert meta["task"] == "arith_ui" and info["task"] == "arith_ui"
    assert meta["steps"] == 3
    assert meta["metric"] == json.loads((data / "arithmetic.meta.json").read_text())["metric"]  # sidecar kept
    assert Path(adapter) == out.absolute() or Path(adapter) == out
    assert loss["columns"] == ["step", "loss"]
    assert [r[0] for r in loss["data"]] == [1.0, 2.0, 3.0]  # the live loss: one point per step (logging_steps=1)
    assert all(r[1] > 0 for r in loss["data"])


def test_test_mode_runs_base_and_lora_through_evaluate(client, ui_run, tiny_model_path):
    status, metrics, preds = client.predict(
        str(ui_run / "adapters" / "arithmetic"), ["base", "LoRA"], str(tiny_model_path), None,
        str(ui_run.parent / "test" / "arithmetic.json"), 3, 8, api_name="/test_lora")
    assert status.startswith("done"), status
    rows = table(metrics)
    assert {r["system"] for r in rows} == {"base", "LoRA (single)"}
    assert all(r["task"] == "arithmetic" and 0 <= r["score"] <= 100 for r in rows)
    p = table(preds)
    assert len(p) == 3 and {"prompt", "reference", "base", "single"} <= set(p[0])


def test_errors_are_one_line_messages(client, tiny_model_path, tmp_path):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError) as e:
        client.predict(str(tiny_model_path), None, str(tmp_path / "missing.json"), "", "", False, False,
                       *cfg_values(LoRATrainConfig), api_name="/train_lora")
    assert "missing.json: file not found" in one_line_error(e)

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"Q": "1+1?", "A": "2"}, {"Q": "no answer"}]))
    with pytest.raises(AppError) as e:
        client.predict(str(tiny_model_path), None, str(bad), "", "", False, False, *cfg_values(LoRATrainConfig),
                       api_name="/train_lora")
    msg = one_line_error(e)
    assert "bad.json: record 1: field 'A'" in msg  # names the file, the record and the field

    with pytest.raises(AppError) as e:  # a hyper-parameter rejected by the config's validation
        client.predict(str(tiny_model_path), None, str(bad), "", "", False, False,
                       *cfg_values(LoRATrainConfig, rank=0), api_name="/train_lora")
    assert "rank must be a positive integer" in one_line_error(e)

    with pytest.raises(AppError) as e:
        client.predict("", [], "", "", "", 0.8, "paper", "sentence", 8, 0.0, False, False, True, "",
                       *[0.0] * 32, api_name="/generate")
    assert "prompt: type something first" in one_line_error(e)


def test_cancel_stops_training_and_leaves_nothing(client, ui_run, tiny_model_path, tmp_path):
    from dlp_lora import ui

    out = tmp_path / "cancelled"
    job = client.submit(str(tiny_model_path), None, str(ui_run.parent / "data" / "capitals.json"), "", str(out),
                        False, False, *cfg_values(LoRATrainConfig, max_steps=100000, batch_size=2, max_length=64,
                                           save_steps=100000, logging_steps=1),
                        api_name="/train_lora")
    running = None
    for _ in range(600):  # wait until the trainer has logged a loss (the job really runs)
        running = [j for (s, page), j in ui._JOBS.items() if page == "lora" and not j.done.is_set()]
        if running and running[0].losses:
            break
        time.sleep(0.1)
    assert running and running[0].losses, f"training did not start: {job.status()} {job.done() and job.exception()}"
    assert client.predict(api_name="/cancel_lora") == "cancelled"
    assert running[0].done.wait(30), "the worker thread did not stop"
    assert not out.exists()  # no adapter: only the library's resumable checkpoint folder may stay
    assert not any(".tmp-" in p.name for p in out.parent.iterdir())
    with pytest.raises(Exception):
        job.result(timeout=30)
    assert client.predict(api_name="/cancel_lora") == "nothing to cancel"


# -------------------------------------------------------------------------------------------------------------
# 2. router training
# -------------------------------------------------------------------------------------------------------------

def test_router_page_trains_and_shows_accuracy_and_confusion(client, ui_run, tiny_model_path, tmp_path):
    out = tmp_path / "router"
    status, acc, conf, md = client.predict(
        "mlp", str(ui_run / "router_data"), str(tiny_model_path), str(out), False,
        *cfg_values(RouterConfig, ROUTER_SKIP, epochs=2, embed_dim=16, hidden_dim=32),
        api_name="/train_router")
    assert status.startswith("done"), status
    assert (out / "router.safetensors").is_file() and (out / "confusion.png").is_file()
    rows = table(acc)
    assert {r["task"] for r in rows} == set(TASKS)
    metrics = json.loads((out / "metrics.json").read_text())
    assert {r["task"]: r["accuracy %"] for r in rows} == pytest.approx(
        {t: 100 * a for t, a in metrics["per_task_accuracy"].items()}, abs=0.01)
    assert conf and Path(conf).is_file() and Path(conf).stat().st_size > 1000  # the confusion matrix image
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["kind"] == "mlp" and cfg["epochs"] == 2 and cfg["embed_dim"] == 16


# -------------------------------------------------------------------------------------------------------------
# 3. router dataset maker + fusion
# -------------------------------------------------------------------------------------------------------------

def test_router_data_page_makes_balanced_data_and_fuses(client, ui_run, tmp_path):
    from gradio_client import handle_file

    data = ui_run.parent / "data"
    files = [handle_file(str(data / f"{t}.json")) for t in TASKS]
    out = tmp_path / "rdata"
    status, counts, preview = client.predict(
        files, "", "", str(out), False, *cfg_values(RouterDataConfig, per_task=20, val_frac=0.2, test_frac=0.2),
        api_name="/make_router_data")
    assert status.startswith("done"), status
    assert json.loads((out / "labels.json").read_text()) == TASKS
    c = table(counts)
    train = {r["task"]: r["records"] for r in c if r["split"] == "train"}
    assert set(train) == set(TASKS) and len(set(train.values())) == 1  # balanced: same number per task
    p = table(preview)
    assert p and {"text", "label", "task"} <= set(p[0])

    fused = tmp_path / "fused" / "all.jsonl"
    status, rows = client.predict([handle_file(str(out / "train.jsonl")), handle_file(str(out / "val.jsonl"))],
                                  "", str(fused), api_name="/fuse_router_files")
    n = sum(1 for line in fused.read_text().splitlines() if line.strip())
    expect = sum(1 for s in ("train", "val") for line in (out / f"{s}.jsonl").read_text().splitlines() if line.strip())
    assert n == expect and f"({n} records)" in status
    assert table(rows)


# -------------------------------------------------------------------------------------------------------------
# 4. DLP-LoRA test
# -------------------------------------------------------------------------------------------------------------

def test_eval_page_writes_test_outputs(client, ui_run, tmp_path):
    out = tmp_path / "TestOutputs" / "ui"
    status, md, plots, summary = client.predict(
        str(ui_run), None, "", "", None, str(ui_run.parent / "test"), 0.8, "paper", "prompt",
        ["base", "single", "dlp"], 2, str(out), False, api_name="/evaluate")
    assert status.startswith("done"), status
    for f in ("summary.json", "summary.md", "predictions.jsonl"):
        assert (out / f).is_file(), f
    assert summary["systems"] == ["base", "single", "dlp"] and summary["n_samples"] == 4
    assert "Scores per task" in md
    assert plots and all(Path(p["image"]["path"] if isinstance(p["image"], dict) else p["image"]).is_file()
                         for p in plots)

    from gradio_client.exceptions import AppError

    with pytest.raises(AppError) as e:  # the output exists now: refused before any model is loaded
        client.predict(str(ui_run), None, "", "", None, str(ui_run.parent / "test"), 0.8, "paper", "prompt",
                       ["base"], 2, str(out), False, api_name="/evaluate")
    assert "already exists" in one_line_error(e)


# -------------------------------------------------------------------------------------------------------------
# 5. playground
# -------------------------------------------------------------------------------------------------------------

def playground_args(ui_run, tiny_model_path, prompt, *, manual=False, sliders=(), more="", history=None,
                    gran="sentence", use_history=False):
    s = list(sliders) + [0.0] * (32 - len(sliders))
    return [prompt, history or [], str(ui_run), str(tiny_model_path), "", 0.8, "paper", gran, 12, 0.0, use_history,
            manual, True, more, *s]


def test_playground_routes_each_sentence_and_draws_the_chart(client, ui_run, tiny_model_path):
    loaded, names, *sliders = client.predict(str(ui_run), str(tiny_model_path), "", api_name="/load")
    assert "2 adapters" in loaded
    chat, status, chart, routing, prompt = client.predict(
        *playground_args(ui_run, tiny_model_path, "What is 3 plus 4? What is the capital of France?"),
        api_name="/generate")
    assert chat[-2]["role"] == "user" and chat[-1]["role"] == "assistant"
    assert text_of(chat[-2]) == "What is 3 plus 4? What is the capital of France?" and text_of(chat[-1])
    assert "routing decision" in status and prompt == ""
    rows = table(routing)
    assert len(rows) >= 2  # one routing decision per prompt sentence at least
    assert rows[0]["sentence"].startswith("What is 3 plus 4?")
    assert rows[1]["sentence"].startswith("What is the capital of France?")
    # the fixture's router separates the two built-in tasks: each sentence goes to its own task
    assert rows[0]["top task"].startswith("arithmetic") and rows[1]["top task"].startswith("capitals")
    assert Path(chart).is_file()
    from PIL import Image

    with Image.open(chart) as im:
        assert im.size[0] > 300 and im.size[1] > 100

    # chat mode: earlier turns go through the chat template; prompt granularity routes once on the whole prompt
    chat2, status, _, routing, _ = client.predict(
        *playground_args(ui_run, tiny_model_path, "And what is 5 plus 6?", history=chat, use_history=True,
                         gran="prompt"), api_name="/generate")
    assert len(chat2) == len(chat) + 2 and text_of(chat2[-2]) == "And what is 5 plus 6?"
    assert table(routing)[0]["selected"] != ""


def test_playground_manual_mixture_and_base(client, ui_run, tiny_model_path):
    # sliders [0.2, 0.6] normalised -> 0.25 / 0.75 are the mixture the library generated with (its routing record)
    chat, status, chart, routing, _ = client.predict(
        *playground_args(ui_run, tiny_model_path, "What is 3 plus 4?", manual=True, sliders=[0.2, 0.6]),
        api_name="/generate")
    assert "manual mixture" in status
    rows = table(routing)
    assert len(rows) == 1 and rows[0]["selected"] == f"{TASKS[1]} (0.75), {TASKS[0]} (0.25)"
    assert Path(chart).is_file()
    # text weights are added to the sliders; all-zero weights mean the base model
    _, _, _, routing, _ = client.predict(
        *playground_args(ui_run, tiny_model_path, "Hi.", manual=True, more=f"{TASKS[0]}=2"), api_name="/generate")
    assert table(routing)[0]["selected"] == f"{TASKS[0]} (1.00)"
    _, _, _, routing, _ = client.predict(*playground_args(ui_run, tiny_model_path, "Hi.", manual=True),
                                         api_name="/generate")
    assert table(routing)[0]["selected"] == "(base model)"

    from gradio_client.exceptions import AppError

    with pytest.raises(AppError) as e:
        client.predict(*playground_args(ui_run, tiny_model_path, "hi", manual=True, more="nosuchtask=1"),
                       api_name="/generate")
    assert "unknown task 'nosuchtask'" in one_line_error(e)


def test_pipeline_is_cached_per_model_and_run(ui_run, tiny_model_path):
    from dlp_lora import ui

    a = ui.get_pipeline(str(tiny_model_path), str(ui_run))
    assert ui.get_pipeline(str(tiny_model_path), str(ui_run)) is a
    assert ui.get_pipeline("", str(ui_run)) is a  # blank model = the adapters' own base model


# -------------------------------------------------------------------------------------------------------------
# units and the CLI
# -------------------------------------------------------------------------------------------------------------

def test_manual_weights_parsing():
    from dlp_lora.config import DLPError
    from dlp_lora.ui import _manual_weights

    names = ["a", "b", "c"]
    assert _manual_weights(names, [0.5, 0.5, 0.0], "", True) == {"a": 0.5, "b": 0.5}
    assert _manual_weights(names, [1.0, 0.0, 0.0], "c=3", True) == {"a": 0.25, "c": 0.75}
    assert _manual_weights(names, [0.2, 0.0, 0.0], "", False) == {"a": 0.2}
    assert _manual_weights(names, [0.0] * 3, "", True) == {}
    with pytest.raises(DLPError, match="expected task=weight"):
        _manual_weights(names, [0.0] * 3, "a:1", True)
    with pytest.raises(DLPError, match="must be >= 0"):
        _manual_weights(names, [0.0] * 3, "a=-1", True)


def test_routing_chart_highlights_selected():
    from dlp_lora.ui import routing_chart, routing_rows

    routing = [{"sentence": "One.", "selected": ["b"], "weights": [1.0], "probs": {"a": 0.1, "b": 0.9}},
               {"sentence": "Two.", "selected": ["a", "b"], "weights": [0.6, 0.4], "probs": {"a": 0.5, "b": 0.5}}]
    im = routing_chart(routing, ["a", "b"])
    assert im.size[0] > 300
    # the selected bar is orange: look for orange pixels
    px = set(im.convert("RGB").getdata())
    assert (0xF9, 0x73, 0x16) in px
    rows = routing_rows(routing)
    assert rows[0]["selected"] == "b (1.00)" and rows[1]["top task"].startswith("a")


def test_field_docs_come_from_the_config():
    from dlp_lora.ui import _field_docs

    docs = _field_docs(LoRATrainConfig)
    assert docs["rank"].startswith("LoRA rank")
    assert set(docs) == {f.name for f in dataclasses.fields(LoRATrainConfig)}


def test_ui_imports_gradio_lazily_and_cli_registers_ui():
    import subprocess
    import sys

    code = "import sys, dlp_lora.ui, dlp_lora.cli; print('gradio' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
    from dlp_lora.cli import build_parser

    args = build_parser().parse_args(["ui", "--run", "r", "--port", "7999"])
    assert args.host == "127.0.0.1" and args.port == 7999 and args.run == "r" and args.model is None


def test_cli_ui_missing_run_is_one_line_error(cli, tmp_path):
    from conftest import assert_one_line_error

    res = cli("ui", "--run", tmp_path / "nope")
    assert_one_line_error(res, "nope", "run folder not found")


def test_cli_ui_serves_the_app_on_loopback(ui_run, tiny_model_path):
    """`dlp-lora ui` in a real subprocess: serves the page on 127.0.0.1, pre-filled with the run."""
    import os
    import subprocess
    import sys
    import urllib.request

    from helpers_ui import free_port

    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    proc = subprocess.Popen([sys.executable, "-m", "dlp_lora", "ui", "--run", str(ui_run), "--model",
                             str(tiny_model_path), "--port", str(port)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    try:
        body = None
        for _ in range(240):
            if proc.poll() is not None:
                break
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=2) as r:
                    body = r.read().decode()
                    break
            except OSError:
                time.sleep(0.5)
        assert body is not None, proc.stdout.read() if proc.poll() is not None else "no answer"
        assert str(ui_run) in body and "Playground" in body
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0]
    assert f"http://127.0.0.1:{port}" in out and "Traceback" not in out, out


def test_jobs_stop_cooperatively_or_are_interrupted():
    from dlp_lora.ui import JobCancelled, _Job, cancel_job, error_message

    def polite(job):  # checks the stop flag (like the trainer callback and the generation hook)
        while not job.stop.wait(0.01):
            pass
        return "stopped politely"

    j = _Job(polite)
    j.cancel()
    assert j.done.is_set() and j.result == "stopped politely"

    def stubborn(job):  # never looks at the flag: the worker thread is interrupted
        x = 0
        while True:
            x += 1

    j = _Job(stubborn)
    j.cancel(grace_s=0.2)
    assert j.done.wait(10) and isinstance(j.error, JobCancelled)
    assert error_message(j.error) == "cancelled"
    assert cancel_job("nothing-runs-here") == "nothing to cancel"


def test_error_message_is_one_line():
    from dlp_lora.config import DLPError
    from dlp_lora.ui import error_message

    assert error_message(DLPError("a.json: record 2: field 'Q': missing\nmore")) == "a.json: record 2: field 'Q': missing"
    msg = error_message(ValueError("boom\nline two"))
    assert msg.startswith("internal error: ValueError: boom") and "\n" not in msg
