"""The web app: every page's handlers called directly (no Gradio), then each page's main action through its HTTP
API (``gradio_client``) on the tiny run, the one-line errors, cancellation, the Host/Origin guard, the merge
page's overwrite rules, temp-folder cleanup and the CLI entry point."""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from pathlib import Path

import pytest

pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")

from dlp_lora.config import DLPError, LoRATrainConfig, RouterConfig, RouterDataConfig  # noqa: E402
from dlp_lora.selection import GRANULARITIES, WEIGHTINGS, SelectionConfig  # noqa: E402
from helpers_ui import TASKS, ui_router, ui_run, ui_test_data, ui_url  # noqa: E402,F401  (fixtures)

ROUTER_SKIP = ("kind", "vocab_size", "tokenizer", "num_labels")
SEL = SelectionConfig()
SEL_VALUES = [SEL.top_p, SEL.weighting, SEL.max_adapters, SEL.min_confidence, SEL.granularity]


@pytest.fixture(scope="module")
def client(ui_url):
    from gradio_client import Client

    return Client(ui_url, verbose=False, analytics_enabled=False)


@pytest.fixture
def own_tmp(tmp_path, monkeypatch) -> Path:
    """The process's temp folder for this test, to check that pages leave nothing behind in it."""
    d = tmp_path / "system_tmp"
    d.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(d))
    return d


def cfg_values(cls, skip=(), **over) -> list:
    """The page's hyper-parameter inputs, in field order, with CLI defaults except ``over``."""
    vals = []
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        vals.append(over.pop(f.name, f.default))
    assert not over, over
    return vals


def sel_values(**over) -> list:
    """The selection inputs in SelectionConfig field order."""
    return [over.pop(f.name, getattr(SEL, f.name)) for f in dataclasses.fields(SelectionConfig)]


def table(v) -> list[dict]:
    """A Dataframe output (gradio_client dict or pandas frame) as a list of row dicts."""
    if hasattr(v, "to_dict"):
        return v.to_dict("records")
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


def last(gen):
    """Run a streaming handler to its end; its last yield is the page's final output."""
    out = None
    for out in gen:
        pass
    return out


# -------------------------------------------------------------------------------------------------------------
# handlers without Gradio
# -------------------------------------------------------------------------------------------------------------

def test_handlers_run_without_gradio(ui_run, tmp_path):
    """Load + generate + merge straight from the page modules in a process that never imports Gradio."""
    import subprocess
    import sys

    code = f"""
import sys
from dlp_lora.ui import playground, router_data_page
msg, names, *sliders = playground.load({str(ui_run)!r}, "", "")
out = list(playground.chat("What is 3 plus 4?", [], {str(ui_run)!r}, "", "", *{SEL_VALUES!r}, 8, 0.0, False,
                            False, True, "", *[0.0] * 32))[-1]
status, _ = router_data_page.merge_files(None, "{ui_run}/router_data/train.jsonl\\n{ui_run}/router_data/val.jsonl",
                                         {str(tmp_path / "m" / "all.jsonl")!r})
print(len(names), sum(s.get("visible", False) for s in sliders), out[1].split(";")[0] != "", status.startswith("done"),
      "gradio" in sys.modules)
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split()[-5:] == [str(len(TASKS)), str(len(TASKS)), "True", "True", "False"], res.stdout


def test_loader_uses_the_runs_base_model_without_a_model(ui_run, tiny_model_path):
    from dlp_lora.ui import playground

    msg, names, *sliders = playground.load(str(ui_run), "", "")
    assert names == TASKS and f"with {len(TASKS)} adapters" in msg and "a router" in msg
    assert Path(msg.split("`")[1]).resolve() == Path(tiny_model_path).resolve()  # the run's base, not "default"
    assert [s["label"] for s in sliders[:len(TASKS)]] == TASKS and not sliders[len(TASKS)]["visible"]
    a = playground.get_pipeline(str(ui_run))
    assert playground.get_pipeline(str(ui_run), str(tiny_model_path)) is a   # same resolved model: same pipeline
    assert playground.get_pipeline(f" {ui_run} ", " ", "") is a
    with pytest.raises(DLPError, match="run: type a run folder"):
        playground.load("", "", "")


def test_selection_comes_from_the_form_as_one_config():
    from dlp_lora.ui.common import SELECTION_FIELDS, selection_from_form

    assert SELECTION_FIELDS == [f.name for f in dataclasses.fields(SelectionConfig)]
    assert selection_from_form(SEL_VALUES) == SEL
    got = selection_from_form([0.5, WEIGHTINGS[-1], 2.0, 0.25, GRANULARITIES[-1]])  # Gradio numbers are floats
    assert got == SelectionConfig(top_p=0.5, weighting=WEIGHTINGS[-1], max_adapters=2, min_confidence=0.25,
                                  granularity=GRANULARITIES[-1])
    with pytest.raises(DLPError, match="^selection: granularity: must be one of"):
        selection_from_form(sel_values(granularity="token"))
    with pytest.raises(DLPError, match="max_adapters: must be a whole number"):
        selection_from_form(sel_values(max_adapters=1.5))


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


def test_test_mode_runs_base_and_lora_through_evaluate(client, ui_run, ui_test_data):
    status, metrics, preds = client.predict(
        str(ui_run / "adapters" / "arithmetic"), ["base", "LoRA"], "", None,
        str(ui_test_data / "arithmetic.json"), 3, 8, api_name="/test_lora")
    assert status.startswith("done"), status
    rows = table(metrics)
    assert {r["system"] for r in rows} == {"base", "LoRA (single)"}
    assert all(r["task"] == "arithmetic" and 0 <= r["score"] <= 100 for r in rows)
    p = table(preds)
    assert len(p) == 3 and {"prompt", "reference", "base", "single"} <= set(p[0])


def test_test_mode_leaves_no_temp_folder(ui_run, ui_test_data, own_tmp):
    from dlp_lora.ui import lora_page

    status, metrics, preds = last(lora_page.run_test_mode(
        str(ui_run / "adapters" / "capitals"), ["LoRA"], "", None, str(ui_test_data / "capitals.json"), 2, 4))
    assert status.startswith("done") and {r["system"] for r in table(metrics)} == {"LoRA (single)"}
    assert len(table(preds)) == 2
    assert list(own_tmp.iterdir()) == []   # the temporary run, data and outputs are gone
    with pytest.raises(DLPError, match="systems: pick base and/or LoRA"):
        last(lora_page.run_test_mode(str(ui_run / "adapters" / "capitals"), [], "", None,
                                     str(ui_test_data / "capitals.json"), 2, 4))
    assert list(own_tmp.iterdir()) == []


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
        client.predict("", [], "", "", "", *SEL_VALUES, 8, 0.0, False, False, True, "", *[0.0] * 32,
                       api_name="/generate")
    assert "prompt: type something first" in one_line_error(e)


def test_cancel_stops_training_and_leaves_nothing(client, ui_run, tiny_model_path, tmp_path):
    from dlp_lora.ui.jobs import running_jobs

    out = tmp_path / "cancelled"
    job = client.submit(str(tiny_model_path), None, str(ui_run.parent / "data" / "capitals.json"), "", str(out),
                        False, False, *cfg_values(LoRATrainConfig, max_steps=100000, batch_size=2, max_length=64,
                                           save_steps=100000, logging_steps=1),
                        api_name="/train_lora")
    running = []
    for _ in range(600):  # wait until the trainer has logged a loss (the job really runs)
        running = running_jobs("lora")
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
# 3. router dataset maker + merging router files
# -------------------------------------------------------------------------------------------------------------

def test_router_data_page_makes_balanced_data_and_merges(client, ui_run, tmp_path):
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

    merged = tmp_path / "merged" / "all.jsonl"
    status, rows = client.predict([handle_file(str(out / "train.jsonl")), handle_file(str(out / "val.jsonl"))],
                                  "", str(merged), False, api_name="/merge_router_files")
    n = sum(1 for line in merged.read_text().splitlines() if line.strip())
    expect = sum(1 for s in ("train", "val") for line in (out / f"{s}.jsonl").read_text().splitlines() if line.strip())
    assert n == expect and f"({n} records)" in status
    assert table(rows)
    assert not [p for p in merged.parent.iterdir() if p.name.startswith(".dlp-merge-")]


def test_make_router_data_removes_its_upload_folder(ui_run, tmp_path, own_tmp):
    from dlp_lora.ui import router_data_page

    data = ui_run.parent / "data"
    uploads = [str(data / f"{t}.json") for t in TASKS]
    status, counts, _ = last(router_data_page.make_data(
        uploads, "", "", str(tmp_path / "rd"), False, *cfg_values(RouterDataConfig, per_task=10)))
    assert status.startswith("done") and {r["task"] for r in table(counts)} == set(TASKS)
    assert list(own_tmp.iterdir()) == []


@pytest.fixture
def router_files(ui_run, tmp_path) -> tuple[Path, Path]:
    """Copies of the run's train/val router files (with their labels.json)."""
    import shutil

    src = tmp_path / "src"
    src.mkdir()
    for name in ("train.jsonl", "val.jsonl", "labels.json"):
        shutil.copy2(ui_run / "router_data" / name, src / name)
    return src / "train.jsonl", src / "val.jsonl"


def test_merge_never_overwrites_without_the_box(router_files, tmp_path):
    from dlp_lora.ui.router_data_page import merge_files

    paths = "\n".join(map(str, router_files))
    out = tmp_path / "out" / "merged.jsonl"
    out.parent.mkdir()
    out.write_text("precious\n")
    with pytest.raises(DLPError, match="already exists"):
        merge_files(None, paths, str(out))
    assert out.read_text() == "precious\n" and not (out.parent / "labels.json").exists()
    status, _ = merge_files(None, paths, str(out), True)
    assert status.startswith("done") and out.read_text() != "precious\n"
    assert json.loads((out.parent / "labels.json").read_text()) == TASKS   # created where there was none
    assert sorted(p.name for p in out.parent.iterdir()) == ["labels.json", "merged.jsonl"]  # no temp folder


def test_merge_never_writes_onto_an_input(router_files):
    from dlp_lora.ui.router_data_page import merge_files

    train, val = router_files
    before = train.read_bytes()
    for overwrite in (False, True):
        with pytest.raises(DLPError, match="would overwrite an input"):
            merge_files(None, f"{train}\n{val}", str(train), overwrite)
    assert train.read_bytes() == before


def test_merge_never_rewrites_a_labels_json_beside_the_output(router_files, tmp_path):
    from dlp_lora.ui.router_data_page import merge_files

    paths = "\n".join(map(str, router_files))
    folder = tmp_path / "other"
    folder.mkdir()
    labels = folder / "labels.json"
    labels.write_text(json.dumps(["other_task"]))
    with pytest.raises(DLPError, match="labels.json: lists other tasks"):
        merge_files(None, paths, str(folder / "merged.jsonl"))
    assert json.loads(labels.read_text()) == ["other_task"] and sorted(p.name for p in folder.iterdir()) == ["labels.json"]
    labels.write_text(json.dumps(TASKS))   # the same labels: merged, labels.json untouched
    before = labels.stat().st_mtime_ns
    status, _ = merge_files(None, paths, str(folder / "merged.jsonl"))
    assert status.startswith("done") and labels.stat().st_mtime_ns == before


# -------------------------------------------------------------------------------------------------------------
# 4. DLP-LoRA test
# -------------------------------------------------------------------------------------------------------------

def eval_args(ui_run, data, out, systems, over=False, **sel):
    return [str(ui_run), None, "", "", None, str(data), *sel_values(**{"granularity": "prompt", **sel}), systems, "",
            2, str(out), over]


def test_eval_page_writes_test_outputs(client, ui_run, ui_test_data, tmp_path):
    out = tmp_path / "TestOutputs" / "ui"
    status, md, plots, summary = client.predict(*eval_args(ui_run, ui_test_data, out, ["base", "single", "dlp"]),
                                                api_name="/evaluate")
    assert status.startswith("done"), status
    for f in ("summary.json", "summary.md", "predictions.jsonl"):
        assert (out / f).is_file(), f
    assert summary["systems"] == ["base", "single", "dlp"] and summary["n_samples"] == 2 * len(TASKS)
    assert "Scores per task" in md
    assert plots and all(Path(p["image"]["path"] if isinstance(p["image"], dict) else p["image"]).is_file()
                         for p in plots)

    from gradio_client.exceptions import AppError

    with pytest.raises(AppError) as e:  # the output exists now: refused before any model is loaded
        client.predict(*eval_args(ui_run, ui_test_data, out, ["base"]), api_name="/evaluate")
    assert "already exists" in one_line_error(e)


def test_eval_page_removes_its_upload_folder(ui_run, ui_test_data, tmp_path, own_tmp):
    from dlp_lora.ui import eval_page

    out = tmp_path / "ev"
    args = eval_args(ui_run, "", out, ["base"])
    args[4] = [str(ui_test_data / f"{t}.json") for t in TASKS]   # uploaded test files
    status, _, _, summary = last(eval_page.run_eval(*args))
    assert status.startswith("done") and summary["n_samples"] == 2 * len(TASKS)
    assert list(own_tmp.iterdir()) == []


# -------------------------------------------------------------------------------------------------------------
# 5. playground
# -------------------------------------------------------------------------------------------------------------

def playground_args(ui_run, prompt, *, manual=False, sliders=(), more="", history=None, gran="sentence",
                    use_history=False, router=""):
    s = list(sliders) + [0.0] * (32 - len(sliders))
    return [prompt, history or [], str(ui_run), "", str(router), *sel_values(granularity=gran), 12, 0.0,
            use_history, manual, True, more, *s]


def test_playground_routes_each_sentence_and_draws_the_chart(client, ui_run, ui_router):
    loaded, names, *sliders = client.predict(str(ui_run), "", str(ui_router), api_name="/load")
    assert f"{len(TASKS)} adapters" in loaded
    chat, status, chart, routing, prompt = client.predict(
        *playground_args(ui_run, "What is 3 plus 4? What is the capital of France?", router=ui_router),
        api_name="/generate")
    assert chat[-2]["role"] == "user" and chat[-1]["role"] == "assistant"
    assert text_of(chat[-2]) == "What is 3 plus 4? What is the capital of France?" and text_of(chat[-1])
    assert "routing decision" in status and prompt == ""
    rows = table(routing)
    assert len(rows) >= 2  # one routing decision per prompt sentence at least
    assert rows[0]["sentence"].startswith("What is 3 plus 4?")
    assert rows[1]["sentence"].startswith("What is the capital of France?")
    # the router given in the router box separates the built-in tasks: each sentence goes to its own task
    assert rows[0]["top task"].startswith("arithmetic") and rows[1]["top task"].startswith("capitals")
    assert Path(chart).is_file()
    from PIL import Image

    with Image.open(chart) as im:
        assert im.size[0] > 300 and im.size[1] > 100

    # chat mode: earlier turns go through the chat template; prompt granularity routes once on the whole prompt
    chat2, status, _, routing, _ = client.predict(
        *playground_args(ui_run, "And what is 5 plus 6?", history=chat, use_history=True, gran="prompt",
                         router=ui_router), api_name="/generate")
    assert len(chat2) == len(chat) + 2 and text_of(chat2[-2]) == "And what is 5 plus 6?"
    assert table(routing)[0]["selected"] != ""


def test_playground_segment_granularity_routes_each_numbered_item(client, ui_run):
    assert "segment" in GRANULARITIES
    _, status, _, routing, _ = client.predict(
        *playground_args(ui_run, "1. What is 3 plus 4?\n2. What is the capital of France?", gran="segment"),
        api_name="/generate")
    assert "routing decision" in status
    rows = table(routing)
    assert rows and all(r["selected"] for r in rows)


def test_playground_manual_mixture_and_base(client, ui_run):
    # sliders [0.2, 0.6] normalised -> 0.25 / 0.75 are the mixture the library generated with (its routing record)
    chat, status, chart, routing, _ = client.predict(
        *playground_args(ui_run, "What is 3 plus 4?", manual=True, sliders=[0.2, 0.6]), api_name="/generate")
    assert "manual mixture" in status
    rows = table(routing)
    assert len(rows) == 1 and rows[0]["selected"] == f"{TASKS[1]} (0.75), {TASKS[0]} (0.25)"
    assert Path(chart).is_file()
    # text weights are added to the sliders; all-zero weights mean the base model
    _, _, _, routing, _ = client.predict(*playground_args(ui_run, "Hi.", manual=True, more=f"{TASKS[0]}=2"),
                                         api_name="/generate")
    assert table(routing)[0]["selected"] == f"{TASKS[0]} (1.00)"
    _, _, _, routing, _ = client.predict(*playground_args(ui_run, "Hi.", manual=True), api_name="/generate")
    assert table(routing)[0]["selected"] == "(base model)"

    from gradio_client.exceptions import AppError

    with pytest.raises(AppError) as e:
        client.predict(*playground_args(ui_run, "hi", manual=True, more="nosuchtask=1"), api_name="/generate")
    assert "unknown task 'nosuchtask'" in one_line_error(e)


def test_selection_inputs_offer_the_selection_modules_choices(ui_url):
    import urllib.request

    with urllib.request.urlopen(ui_url + "config", timeout=30) as r:
        cfg = json.loads(r.read())
    radios = {}
    for comp in cfg["components"]:
        props = comp.get("props", {})
        if comp.get("type") == "radio" and props.get("label") in ("weighting", "granularity"):
            radios.setdefault(props["label"], []).append(([c[0] for c in props["choices"]], props["value"]))
    # the playground and the test page: the module's choices; defaults: the module's (eval routes per prompt)
    assert sorted(radios["granularity"]) == sorted([(list(GRANULARITIES), SEL.granularity),
                                                    (list(GRANULARITIES), "prompt")])
    assert radios["weighting"] == [(list(WEIGHTINGS), SEL.weighting)] * 2


# -------------------------------------------------------------------------------------------------------------
# the Host / Origin guard
# -------------------------------------------------------------------------------------------------------------

def _get(url: str, headers: dict) -> int:
    import http.client
    from urllib.parse import urlsplit

    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    try:
        conn.request("GET", "/config", headers=headers)
        r = conn.getresponse()
        body = r.read()
        if r.status == 403:
            assert json.loads(body)["error"]["message"]
        return r.status
    finally:
        conn.close()


def test_foreign_host_or_origin_is_refused(ui_url):
    from urllib.parse import urlsplit

    port = urlsplit(ui_url).port
    assert _get(ui_url, {"Host": f"127.0.0.1:{port}"}) == 200
    assert _get(ui_url, {"Host": f"localhost:{port}", "Origin": f"http://localhost:{port}"}) == 200
    assert _get(ui_url, {"Host": f"evil.example:{port}"}) == 403             # DNS rebinding
    assert _get(ui_url, {"Host": "evil.example"}) == 403
    assert _get(ui_url, {"Host": f"127.0.0.1:{port}", "Origin": "http://evil.example"}) == 403   # cross-site post
    assert _get(ui_url, {"Host": f"127.0.0.1:{port}", "Origin": "null"}) == 403


def test_allowed_hosts_rules():
    from dlp_lora.ui.hosts import AllowedHosts, normalise_host, refusal

    assert normalise_host("LocalHost.:7860") == "localhost" and normalise_host("[::1]:80") == "::1"
    loop = AllowedHosts("127.0.0.1")
    assert loop.allows("127.0.0.1:7860") and loop.allows("localhost") and loop.allows("[::1]:7860")
    assert not loop.allows("evil.example") and not loop.allows("10.0.0.5") and not loop.allows("")
    extra = AllowedHosts("127.0.0.1", ["ui.example.org"])
    assert extra.allows("UI.example.org:443") and not extra.allows("example.org")
    anywhere = AllowedHosts("0.0.0.0")       # every interface: any IP literal (never a rebinding), no other name
    assert anywhere.allows("192.168.1.7:7860") and anywhere.allows("localhost") and not anywhere.allows("evil.example")
    assert refusal({"host": "localhost"}, loop) is None
    assert "--allow-host evil.example" in refusal({"host": "evil.example:7860"}, loop)
    assert "origin" in refusal({"host": "localhost", "origin": "https://evil.example"}, loop)


# -------------------------------------------------------------------------------------------------------------
# units and the CLI
# -------------------------------------------------------------------------------------------------------------

def test_manual_weights_parsing():
    from dlp_lora.ui.playground import manual_weights

    names = ["a", "b", "c"]
    assert manual_weights(names, [0.5, 0.5, 0.0], "", True) == {"a": 0.5, "b": 0.5}
    assert manual_weights(names, [1.0, 0.0, 0.0], "c=3", True) == {"a": 0.25, "c": 0.75}
    assert manual_weights(names, [0.2, 0.0, 0.0], "", False) == {"a": 0.2}
    assert manual_weights(names, [0.0] * 3, "", True) == {}
    with pytest.raises(DLPError, match="expected task=weight"):
        manual_weights(names, [0.0] * 3, "a:1", True)
    with pytest.raises(DLPError, match="must be a finite number >= 0"):
        manual_weights(names, [0.0] * 3, "a=-1", True)
    with pytest.raises(DLPError, match="must be a finite number >= 0"):
        manual_weights(names, [0.0] * 3, "a=1e400", True)


def test_routing_chart_highlights_selected():
    from dlp_lora.ui.routing_view import routing_chart, routing_rows

    routing = [{"sentence": "One.", "selected": ["b"], "weights": [1.0], "probs": {"a": 0.1, "b": 0.9}},
               {"sentence": "Two.", "selected": ["a", "b"], "weights": [0.6, 0.4], "probs": {"a": 0.5, "b": 0.5}}]
    im = routing_chart(routing, ["a", "b"])
    assert im.size[0] > 300
    import numpy as np

    # the selected bar is orange: look for orange pixels
    assert (np.asarray(im.convert("RGB")) == (0xF9, 0x73, 0x16)).all(-1).any()
    rows = routing_rows(routing)
    assert rows[0]["selected"] == "b (1.00)" and rows[1]["top task"].startswith("a")


def test_field_docs_come_from_the_config():
    from dlp_lora.ui.common import field_docs

    docs = field_docs(LoRATrainConfig)
    assert docs["rank"].startswith("LoRA rank")
    assert set(docs) == {f.name for f in dataclasses.fields(LoRATrainConfig)}


def test_ui_imports_gradio_lazily_and_cli_registers_ui():
    import subprocess
    import sys

    pages = "common, eval_page, hosts, jobs, lora_page, playground, router_data_page, router_page, routing_view"
    code = f"import sys, dlp_lora.ui, dlp_lora.cli; from dlp_lora.ui import {pages}; print('gradio' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
    from dlp_lora.cli import build_parser

    args = build_parser().parse_args(["ui", "--run", "r", "--port", "7999"])
    assert args.host == "127.0.0.1" and args.port == 7999 and args.run == "r" and args.model is None
    assert args.allow_host == []
    args = build_parser().parse_args(["ui", "--allow-host", "a.example", "--allow-host", "b.example"])
    assert args.allow_host == ["a.example", "b.example"]


def test_cli_ui_missing_run_is_one_line_error(cli, tmp_path):
    from conftest import assert_one_line_error

    res = cli("ui", "--run", tmp_path / "nope")
    assert_one_line_error(res, "nope", "run folder not found")
    res = cli("ui", "--port", "70000")
    assert_one_line_error(res, "--port", "1..65535")


def test_cli_ui_serves_the_app_on_loopback(ui_run):
    """`dlp-lora ui` in a real subprocess: serves the page on 127.0.0.1, pre-filled with the run; a request
    addressed to another host is refused unless --allow-host names it."""
    import os
    import subprocess
    import sys
    import urllib.request

    from conftest import free_port

    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    proc = subprocess.Popen([sys.executable, "-m", "dlp_lora", "ui", "--run", str(ui_run), "--port", str(port),
                             "--allow-host", "ui.test"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env)
    url = f"http://127.0.0.1:{port}/"
    try:
        body = None
        for _ in range(240):
            if proc.poll() is not None:
                break
            try:
                with urllib.request.urlopen(url + "config", timeout=2) as r:
                    body = r.read().decode()
                    break
            except OSError:
                time.sleep(0.5)
        assert body is not None, proc.stdout.read() if proc.poll() is not None else "no answer"
        assert str(ui_run) in body and "Playground" in body
        assert _get(url, {"Host": f"evil.example:{port}"}) == 403
        assert _get(url, {"Host": f"ui.test:{port}"}) == 200
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0]
    assert url.rstrip("/") in out and "Traceback" not in out, out


def test_jobs_stop_cooperatively_or_are_interrupted():
    from dlp_lora.ui.common import error_message
    from dlp_lora.ui.jobs import Job, JobCancelled, cancel_job

    def polite(job):  # checks the stop flag (like the trainer callback and the generation hook)
        while not job.stop.wait(0.01):
            pass
        return "stopped politely"

    j = Job(polite)
    j.cancel()
    assert j.done.is_set() and j.result == "stopped politely"

    def stubborn(job):  # never looks at the flag: the worker thread is interrupted
        x = 0
        while True:
            x += 1

    j = Job(stubborn)
    j.cancel(grace_s=0.2)
    assert j.done.wait(10) and isinstance(j.error, JobCancelled)
    assert error_message(j.error) == "cancelled"
    assert cancel_job("nothing-runs-here") == "nothing to cancel"


def test_error_message_is_one_line():
    from dlp_lora.ui.common import error_message

    assert error_message(DLPError("a.json: record 2: field 'Q': missing\nmore")) == "a.json: record 2: field 'Q': missing"
    msg = error_message(ValueError("boom\nline two"))
    assert msg.startswith("internal error: ValueError: boom") and "\n" not in msg


def test_router_page_adds_and_removes_a_task_without_gradio(tiny_run, tmp_path):
    """The router page's add/remove handlers (plain functions): the label order and other adapters are kept."""
    import json
    import shutil

    from dlp_lora.run import open_run
    from dlp_lora.ui.router_page import add_task_page, remove_task_page

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    names = open_run(run).names
    data = tmp_path / "cp.json"
    data.write_text((tiny_run.parent / "data" / f"{names[0]}.json").read_text())
    # an existing PEFT adapter for the new task (re-labelled "cp"), so nothing is trained here
    status = list(add_task_page(str(run), str(data), str(run / "adapters" / names[0]), False))[-1]
    assert status.startswith("done: added `cp`"), status
    assert open_run(run).names == names + ["cp"]
    assert json.loads((run / "router" / "labels.json").read_text()) == names + ["cp"]
    status = list(remove_task_page(str(run), names[1]))[-1]
    assert status.startswith(f"done: removed `{names[1]}`"), status
    assert open_run(run).names == [names[0], names[2], "cp"]
    with pytest.raises(DLPError, match="remove a task"):
        list(remove_task_page("", ""))
