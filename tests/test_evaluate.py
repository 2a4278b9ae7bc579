"""dlp-lora eval: the evaluation loop (fake pipeline for exact bookkeeping), the whole command on the tiny model
with random adapters and a trained router (real pipeline), refusing to overwrite, and bad inputs."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest

from conftest import assert_one_line_error
from dlp_lora.composite import INSTRUCTION
from dlp_lora.config import DLPError
from dlp_lora.data import QARecord, TaskData, write_task
from dlp_lora.evaluate import evaluate, paper_summary, summary_markdown

CHOICES = ["(A) red", "(B) blue", "(C) green"]
TASKS = ("capitals", "colors", "echo")  # sorted: the order of adapters and router labels
CITIES = ["Paris", "Rome", "Berlin", "Madrid", "Lisbon", "Vienna", "Athens", "Oslo", "Dublin", "Prague",
          "Warsaw", "Bern", "Sofia", "Riga"]
COUNTRIES = ["France", "Italy", "Germany", "Spain", "Portugal", "Austria", "Greece", "Norway", "Ireland",
             "Czechia", "Poland", "Switzerland", "Bulgaria", "Latvia"]
WORDS = ["apple", "river", "stone", "cloud", "tiger", "piano", "lemon", "candle", "garden", "rocket", "violin",
         "window", "forest", "silver"]


def _tasks(n: int = 12) -> list[TaskData]:
    cap = [QARecord(f"What is the capital city of {c}?", a) for c, a in zip(COUNTRIES[:n], CITIES[:n])]
    col = [QARecord(f"Item {i}: which colour is a clear daytime sky? Options: (A) red (B) blue (C) green",
                    "(B)" if i % 2 == 0 else "blue") for i in range(n)]
    echo = [QARecord(f"Repeat the words: {w} {WORDS[(i + 3) % len(WORDS)]} and {WORDS[(i + 5) % len(WORDS)]}",
                     f"{w} {WORDS[(i + 3) % len(WORDS)]} and {WORDS[(i + 5) % len(WORDS)]}")
            for i, w in enumerate(WORDS[:n])]
    return [TaskData("capitals", cap, metric="exact"), TaskData("colors", col, metric="accuracy", choices=CHOICES),
            TaskData("echo", echo, metric="bleu_rouge")]


def _write_tasks(folder: Path, tasks: list[TaskData]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for t in tasks:
        write_task(folder / f"{t.name}.json", t)
    return folder


# ---------------------------------------------------------------------------------------------------------------
# Fake pipeline: the loop's bookkeeping checked exactly
# ---------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class FakeResult:
    text: str
    routing: list
    prompt_tokens: int = 5
    completion_tokens: int = 3
    finish_reason: str = "stop"
    seconds: float = 0.0


class FakePipeline:
    """Answers from a lookup: single (one-hot on the true task) and dlp answer right, base never, uniform only
    for the MCQ task; a one-hot on another task answers wrong. The router sends every 'Spain' question to 'echo'
    (top-1 wrong). Composite prompts: routed systems answer every item right, uniform only item 1, base nothing."""

    def __init__(self, tasks: list[TaskData]) -> None:
        self.names = [t.name for t in tasks]
        self.truth = {r.question: (t.name, r.answer) for t in tasks for r in t.records}
        self.router = object()
        self.tokenizer = None
        self.model = None
        self.calls: list[tuple[str, list[str], list]] = []
        self.granularities: list[str] = []

    def _probs(self, q: str) -> dict[str, float]:
        if "Spain" in q:
            return {"capitals": 0.35, "colors": 0.05, "echo": 0.6}
        task = self.truth[q][0] if q in self.truth else self.names[0]
        return {n: (0.9 if n == task else 0.1 / (len(self.names) - 1)) for n in self.names}

    def route(self, texts, selection=None):
        import torch

        probs = torch.tensor([[self._probs(q)[n] for n in self.names] for q in texts])
        return probs, probs

    def _routed(self, q: str) -> FakeResult:
        if q.startswith(INSTRUCTION.split("{n}")[0]):
            items = [l.split(". ", 1)[1] for l in q.splitlines() if l[:1].isdigit()]
            return FakeResult("\n".join(f"{i}. {self.truth[x][1]}" for i, x in enumerate(items, 1)), [])
        task, answer = self.truth[q]
        routing = ([{"sentence": q, "selected": ["echo", "capitals"], "weights": [0.55, 0.45], "probs": self._probs(q)}]
                   if "Spain" in q else [{"sentence": q, "selected": [task], "weights": [1.0], "probs": self._probs(q)}])
        return FakeResult(answer, routing)

    def _forced(self, q: str, row: list[float]) -> tuple[str, FakeResult]:
        composite = q.startswith(INSTRUCTION.split("{n}")[0])
        if max(row) == 0.0:
            return "base", FakeResult("I am not sure.", [])
        if max(row) == 1.0:
            if composite:
                return "one-hot", FakeResult("1. no idea", [])
            task, answer = self.truth[q]
            right = self.names[row.index(1.0)] == task
            return "one-hot", FakeResult((answer if task == "echo" else f"{answer}.") if right else "wrong", [])
        assert all(abs(x - 1 / len(self.names)) < 1e-6 for x in row)
        if composite:
            first = [l.split(". ", 1)[1] for l in q.splitlines() if l[:1].isdigit()][0]
            return "uniform", FakeResult(f"1. {self.truth[first][1]}", [])
        return "uniform", FakeResult("The answer is (B)." if self.truth[q][0] == "colors" else "no idea", [])

    def generate(self, prompts, selection=None, *, weights=None, segment_weights=None, max_new_tokens=64, **kw):
        assert selection is not None
        self.granularities.append(selection.granularity)
        out, kind = [], None
        for j, q in enumerate(prompts):
            if segment_weights is not None:   # oracle-segment: one one-hot mixture per question, its true task
                kind = "oracle-segment"
                items = [l.split(". ", 1)[1] for l in q.splitlines() if l[:1].isdigit()]
                assert segment_weights[j] == [{self.truth[x][0]: 1.0} for x in items]
                out.append(self._routed(q))
            elif weights is None:
                kind = f"dlp-{selection.granularity}"
                out.append(self._routed(q))
            else:
                kind, res = self._forced(q, [float(x) for x in weights[j]])
                out.append(res)
        budgets = max_new_tokens if isinstance(max_new_tokens, list) else [max_new_tokens] * len(prompts)
        self.calls.append((kind, list(prompts), budgets))
        return out


class FakeMultitask:
    """A one-adapter pipeline: answers every question right (but 'Paris' in lower case)."""

    def __init__(self, tasks: list[TaskData]) -> None:
        self.names = ["multitask"]
        self.truth = {r.question: r.answer for t in tasks for r in t.records}
        self.router = None
        self.tokenizer = None
        self.model = None

    def generate(self, prompts, selection=None, *, weights=None, **kw):
        assert weights is not None and weights.tolist() == [[1.0]] * len(prompts)
        return [FakeResult(self.truth.get(q, "?").lower(), []) for q in prompts]


def test_evaluate_loop_with_fake_pipeline(tmp_path):
    tasks = _tasks(6)
    test_dir = _write_tasks(tmp_path / "test", tasks)
    fake = FakePipeline(tasks)
    out = tmp_path / "TestOutputs" / "fake"
    summary = evaluate(None, data_dir=test_dir, out_dir=out, pipeline=fake, batch_size=4, limit=5, progress=False)

    # same samples for every system, interleaved per batch with the first system rotated
    timed = [c for c in fake.calls if max(c[2]) > 2]  # warm-up calls use a 2-token budget
    assert len(timed) == 4 * 4  # 15 samples / batch 4 = 4 batches x 4 systems
    for b in range(4):
        group = timed[4 * b: 4 * b + 4]
        assert len({tuple(c[1]) for c in group}) == 1
        assert group[0][0] == ["base", "one-hot", "dlp-prompt", "uniform"][b % 4]
    assert summary["n_samples"] == 15

    pt = summary["per_task"]
    assert pt["capitals"]["single"]["score"] == 100.0 and pt["capitals"]["base"]["score"] == 0.0
    assert pt["colors"]["uniform"]["score"] == 100.0 and pt["capitals"]["uniform"]["score"] == 0.0
    assert pt["echo"]["single"]["bleu"] == pytest.approx(100.0) and pt["echo"]["single"]["rougeL"] == pytest.approx(100.0)
    av = summary["averages"]
    assert av["single"]["mcq"] == 100.0 and av["base"]["overall"] == 0.0
    assert av["uniform"]["overall"] == pytest.approx(100.0 / 3)
    assert av["single"]["qa_bleu"] == pytest.approx(100.0)
    # dlp: 'Spain' (capitals item 3) routed to echo but answered right by the fake
    r = summary["routing"]
    assert r["accuracy"] == pytest.approx(100.0 * 14 / 15)
    assert r["per_task"]["capitals"]["accuracy"] == pytest.approx(80.0)
    assert r["mean_selected"] == pytest.approx(16 / 15)
    assert r["mean_true_weight"] == pytest.approx((14 + 0.45) / 15)
    conf = r["confusion"]["matrix"]
    assert r["confusion"]["labels"] == list(TASKS)
    assert conf[0] == [4, 0, 1] and conf[1] == [0, 5, 0] and conf[2] == [0, 0, 5]
    assert summary["target"]["met"] is True and summary["target"]["dlp_minus_single"] == pytest.approx(0.0)
    for s in ("base", "single", "dlp", "uniform"):
        tm = summary["timing"][s]
        assert tm["samples"] == 15 and tm["completion_tokens"] == 45 and tm["seconds"] > 0
        assert tm["ratio_to_base"] > 0 and tm["token_ratio_to_single"] > 0
    assert summary["timing"]["base"]["ratio_to_base"] == pytest.approx(1.0)

    rows = [json.loads(l) for l in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 15
    assert rows[0]["task"] == "capitals" and rows[0]["reference"] == "Paris"
    assert set(rows[0]["outputs"]) == {"base", "single", "dlp", "uniform"}
    assert rows[0]["outputs"]["single"] == "Paris." and rows[0]["scores"]["single"] == 1.0
    assert rows[3]["routing"]["top1"] == "echo" and rows[3]["routing"]["entries"][0]["selected"] == ["echo", "capitals"]
    assert {p.name for p in (out / "plots").iterdir()} == {"scores.png", "routing_confusion.png", "time_ratios.png"}
    assert (out / "summary.md").read_text() == summary_markdown(summary)
    assert json.loads((out / "config.json").read_text())["systems"] == ["base", "single", "dlp", "uniform"]
    # nothing temporary left next to the output
    assert [p.name for p in out.parent.iterdir()] == ["fake"]


ALL_PER_TASK = ["base", "single", "dlp", "dlp-sentence", "top1", "multitask", "uniform"]


def test_new_systems_and_composite_with_fake_pipeline(tmp_path):
    tasks = _tasks(6)
    test_dir = _write_tasks(tmp_path / "test", tasks)
    fake = FakePipeline(tasks)
    out = tmp_path / "o"
    s = evaluate(None, data_dir=test_dir, out_dir=out, pipeline=fake, multitask_pipeline=FakeMultitask(tasks),
                 systems=ALL_PER_TASK + ["dlp-segment", "oracle-segment"], composite=[2], composite_n=4, seed=3,
                 limit=5, batch_size=4, progress=False)
    assert s["systems"] == ALL_PER_TASK                 # the segment systems run on composite prompts only
    pt = s["per_task"]
    # top1: the router's best adapter alone - 'Spain' goes to echo and is answered wrong
    assert [pt[t]["top1"]["score"] for t in TASKS] == pytest.approx([80.0, 100.0, 100.0])  # echo: corpus BLEU
    assert [pt[t]["multitask"]["score"] for t in TASKS] == pytest.approx([100.0, 100.0, 100.0])
    assert pt["capitals"]["dlp-sentence"]["score"] == 100.0
    assert set(fake.granularities) == {"prompt", "sentence", "segment"}
    assert s["routing"]["system"] == "dlp" and s["routing"]["granularity"] == "prompt"
    # reuse: single and top1 share one-hot mixtures; dlp-sentence (mixture may change mid-answer) is never
    # answered from the cache, multitask (its own adapter set) and base / uniform (mixtures no one else has) neither
    re = s["reuse"]["reused"]
    assert re["single"] + re["top1"] > 0
    assert re["dlp-sentence"] == re["multitask"] == re["base"] == re["uniform"] == 0
    assert all(re[sy] + s["reuse"]["generated"][sy] == 15 for sy in ALL_PER_TASK)
    assert s["target"]["dlp_minus_top1"] == pytest.approx(100 / 15) and s["target"]["dlp_minus_multitask"] == 0.0

    comp = s["composite"]["2"]
    assert comp["prompts"] == 4 and comp["skipped"] == {"single": "needs one true task per prompt"}
    assert comp["scores"]["dlp-segment"]["reused"] == comp["scores"]["oracle-segment"]["reused"] == 0
    fig = {sy: {k: v for k, v in f.items() if k in ("item_score", "all_correct", "format_rate")}
           for sy, f in comp["scores"].items()}
    assert set(fig) == set(ALL_PER_TASK + ["dlp-segment", "oracle-segment"]) - {"single"}
    assert fig["dlp"] == fig["dlp-sentence"] == fig["dlp-segment"] == fig["oracle-segment"] == {
        "item_score": 100.0, "all_correct": 100.0, "format_rate": 100.0}
    assert fig["uniform"] == {"item_score": 50.0, "all_correct": 0.0, "format_rate": 50.0}   # answers item 1 only
    assert fig["base"] == fig["multitask"] == {"item_score": 0.0, "all_correct": 0.0, "format_rate": 0.0}
    assert fig["top1"] == {"item_score": 0.0, "all_correct": 0.0, "format_rate": 50.0}       # "1. no idea"
    # the fake's dlp (prompt) answers composites as well as dlp-segment: a tie is not "above"
    assert comp["target"]["met"] is False and comp["target"]["dlp_segment_minus_dlp"] == 0.0
    assert comp["target"]["dlp_segment_minus_uniform"] == 50.0
    assert comp["target"]["dlp_segment_minus_oracle-segment"] == 0.0
    rows = [json.loads(l) for l in (out / "composite.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(r["n"] == 2 and len({it["task"] for it in r["items"]}) == 2 for r in rows)
    assert rows[0]["answers"]["uniform"][1] is None and rows[0]["all_correct"]["dlp"] is True
    assert "### Composite-2 (4 prompts" in (out / "summary.md").read_text()

    ps = paper_summary(s, train_seconds=12.5, command="bash scripts/reproduce_paper.sh")
    assert set(ps) == {"model", "tasks", "systems", "per_task", "averages", "routing", "composite", "seconds", "command"}
    assert ps["tasks"] == list(TASKS) and ps["systems"] == ALL_PER_TASK + ["dlp-segment", "oracle-segment"]
    assert ps["per_task"]["capitals"] == {"metric": "exact", "n": 5, "scores": {
        "base": 0.0, "single": 100.0, "dlp": 100.0, "dlp-sentence": 100.0, "top1": 80.0, "multitask": 100.0,
        "uniform": 0.0}}
    assert ps["averages"]["mcq"]["uniform"] == 100.0 and ps["averages"]["overall"]["top1"] == pytest.approx(93.33)
    assert ps["routing"] == {"accuracy": pytest.approx(93.33), "mean_selected": pytest.approx(1.07)}
    assert ps["composite"]["2"]["uniform"] == {"item_score": 50.0, "all_correct": 0.0, "format_rate": 50.0}
    assert ps["seconds"]["train"] == 12.5 and ps["seconds"]["eval"] > 0
    assert ps["command"] == "bash scripts/reproduce_paper.sh"
    json.dumps(ps)  # plain JSON


def test_system_choices_are_checked_before_any_work(tmp_path):
    tasks = _tasks(3)
    test_dir = _write_tasks(tmp_path / "test", tasks)
    with pytest.raises(DLPError, match="dlp-segment, oracle-segment run on composite prompts only"):
        evaluate(None, data_dir=test_dir, out_dir=tmp_path / "o", pipeline=FakePipeline(tasks),
                 systems="dlp,dlp-segment,oracle-segment")
    with pytest.raises(DLPError, match="--composite 4: needs test questions of at least 4 different tasks, got 3"):
        evaluate(None, data_dir=test_dir, out_dir=tmp_path / "o", pipeline=FakePipeline(tasks), systems="dlp",
                 composite="4", progress=False)
    with pytest.raises(DLPError, match="--composite x: expected a number"):
        evaluate(None, data_dir=test_dir, out_dir=tmp_path / "o", pipeline=FakePipeline(tasks), composite="x")
    assert not (tmp_path / "o").exists()


def test_metric_override_and_one_system(tmp_path):
    tasks = _tasks(4)
    test_dir = _write_tasks(tmp_path / "test", tasks)
    fake = FakePipeline(tasks)
    s = evaluate(None, data=[test_dir / "capitals.json"], out_dir=tmp_path / "o", pipeline=fake, systems="single",
                 metrics=["capitals=contains"], progress=False)
    assert s["systems"] == ["single"] and s["tasks"][0]["metric"] == "contains"
    assert s["routing"] is None and s["target"] is None
    assert s["per_task"]["capitals"]["single"]["score"] == 100.0
    with pytest.raises(DLPError, match="no test file for task 'nope'"):
        evaluate(None, data=[test_dir / "capitals.json"], out_dir=tmp_path / "o2", pipeline=fake, metrics=["nope=exact"])
    with pytest.raises(DLPError, match="unknown metric 'f9'"):
        evaluate(None, data=[test_dir / "capitals.json"], out_dir=tmp_path / "o2", pipeline=fake, metrics=["capitals=f9"])


def test_auto_budget_per_task(tmp_path):
    tasks = _tasks(3)
    test_dir = _write_tasks(tmp_path / "test", tasks)
    fake = FakePipeline(tasks)
    evaluate(None, data_dir=test_dir, out_dir=tmp_path / "o", pipeline=fake, systems="base", max_new_tokens=19,
             progress=False, batch_size=100)
    budgets = fake.calls[-1][2]
    # per task: min(cap, longest reference + 16) (echo: 4 words + 16 capped at 19); the fake has no tokenizer: words
    assert budgets == [17] * 3 + [17] * 3 + [19] * 3
    evaluate(None, data_dir=test_dir, out_dir=tmp_path / "o2", pipeline=fake, systems="base", max_new_tokens=18,
             progress=False, batch_size=100, auto_budget=False)
    assert fake.calls[-1][2] == [18] * 9


# ---------------------------------------------------------------------------------------------------------------
# Real pipeline on the tiny model: random adapters + a router trained on tiny data
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def eval_run(tmp_path_factory, tiny_model_path):
    from dlp_lora.config import RouterConfig, RouterDataConfig
    from dlp_lora.fusion import make_random_adapter
    from dlp_lora.models import load_model
    from dlp_lora.router import make_router_data, train_router
    from dlp_lora.run import write_adapter_list

    root = tmp_path_factory.mktemp("evalrun")
    tasks = _tasks(12)
    train_dir = _write_tasks(root / "train", tasks)
    test_dir = _write_tasks(root / "test", [dataclasses.replace(t, records=t.records[-4:]) for t in tasks])
    run = root / "run"
    model, _ = load_model(tiny_model_path, device="cpu", dtype="fp32")  # own copy: make_random_adapter wraps it
    dirs = [make_random_adapter(model, run / "adapters" / name, rank=4, alpha=8, seed=i, task=name)
            for i, name in enumerate(TASKS)]
    write_adapter_list(run / "adapters.txt", dirs)
    make_router_data(run / "router_data", data_dir=train_dir, config=RouterDataConfig(val_frac=0.2, test_frac=0.2),
                     progress=False)
    train_router(run / "router_data", tiny_model_path, run / "router", config=RouterConfig(epochs=30, patience=30),
                 progress=False)
    return {"root": root, "run": run, "test": test_dir, "train": train_dir, "model": tiny_model_path}


def test_eval_command_end_to_end_on_tiny_model(cli, eval_run, tmp_path):
    out = tmp_path / "TestOutputs" / "tiny"
    results = tmp_path / "RESULTS.md"
    cmds = tmp_path / "build.sh"
    cmds.write_text("dlp-lora train-lora ...\n")
    args = ["eval", "--run", eval_run["run"], "--data-dir", eval_run["test"], "--model", eval_run["model"],
            "--limit", "3", "--max-new-tokens", "6", "--batch-size", "4", "--out", out, "--results-md", results,
            "--results-commands", cmds, "--no-progress"]
    res = cli(*args)
    assert res.code == 0, res
    assert "| task | metric | n | base | single | dlp | uniform |" in res.out
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "plots", "predictions.jsonl", "summary.json", "summary.md"]
    assert sorted(p.name for p in (out / "plots").iterdir()) == ["routing_confusion.png", "scores.png", "time_ratios.png"]
    for p in (out / "plots").iterdir():
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    s = json.loads((out / "summary.json").read_text())
    assert {"created", "run", "model", "adapters", "systems", "n_samples", "tasks", "per_task", "averages", "routing",
            "timing", "target", "command", "config", "run_info", "dropped_seen_in_training"} <= set(s)
    assert 0.0 <= s["run_info"]["router"]["test_accuracy"] <= 1.0  # from router/metrics.json
    assert s["adapters"] == list(TASKS) and s["n_samples"] == 9
    assert [t["task"] for t in s["tasks"]] == list(TASKS)
    assert {t["task"]: t["metric"] for t in s["tasks"]} == {"capitals": "exact", "colors": "accuracy", "echo": "bleu_rouge"}
    for t in TASKS:
        for sy in ("base", "single", "dlp", "uniform"):
            assert 0.0 <= s["per_task"][t][sy]["score"] <= 100.0
    assert {"bleu", "rouge1", "rouge2", "rougeL"} <= set(s["per_task"]["echo"]["dlp"])
    for sy in ("base", "single", "dlp", "uniform"):
        assert {"mcq", "qa", "overall", "qa_bleu", "qa_rougeL"} <= set(s["averages"][sy])
        tm = s["timing"][sy]
        assert {"seconds_per_sample", "tokens_per_s", "ratio_to_base", "ratio_to_single", "token_ratio_to_base"} <= set(tm)
        assert tm["completion_tokens"] > 0 and tm["seconds"] > 0
    r = s["routing"]
    assert 0.0 <= r["accuracy"] <= 100.0 and r["mean_selected"] >= 1.0 and 0.0 <= r["mean_true_weight"] <= 1.0
    assert sum(map(sum, r["confusion"]["matrix"])) == 9
    assert s["command"].startswith("dlp-lora eval --run ") and "--limit 3" in s["command"]
    assert set(s["target"]) >= {"dlp_minus_single", "dlp_minus_uniform", "dlp_minus_base", "met"}

    rows = [json.loads(l) for l in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 9
    for row in rows:
        assert {"task", "prompt", "reference", "outputs", "scores", "routing"} <= set(row)
        assert set(row["outputs"]) == {"base", "single", "dlp", "uniform"}
        assert row["routing"]["entries"] and row["routing"]["top1"] in TASKS
    # base (all-zero weights) and single (a random adapter) generate different text somewhere: weights reach the model
    assert any(r["outputs"]["base"] != r["outputs"]["single"] for r in rows)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["limit"] == 3 and cfg["max_new_tokens"] == 6

    text = results.read_text()
    assert "<!-- dlp-lora eval: tiny -->" in text and s["command"] in text
    assert "Re-created by [`build.sh`](build.sh)" in text and "dlp-lora train-lora ..." not in text   # linked

    # refusing to overwrite: one-line error, the folder untouched
    before = (out / "summary.json").read_text()
    res = cli(*args)
    assert_one_line_error(res, str(out), "already exists")
    assert (out / "summary.json").read_text() == before
    # --overwrite replaces it; RESULTS.md keeps one section for this name
    res = cli(*args, "--systems", "base,single", "--overwrite")
    assert res.code == 0, res
    assert json.loads((out / "summary.json").read_text())["systems"] == ["base", "single"]
    assert results.read_text().count("<!-- dlp-lora eval: tiny -->") == 1
    assert not (out / "plots" / "routing_confusion.png").exists()


def test_every_system_and_composite_on_the_shared_tiny_run(cli, tiny_run, tmp_path):
    """All systems on the conftest tiny run (no --model: the run's own base model), held-out questions, and
    composite-2/3 prompts - checked against each other where they must agree exactly."""
    from dlp_lora.tasks import write_builtin_tasks

    test = tmp_path / "test"
    write_builtin_tasks(test, n=6, seed=11, tasks=["arithmetic", "capitals", "word_sorting"])
    out = tmp_path / "o"
    systems = "base,single,dlp,dlp-sentence,dlp-segment,top1,multitask,uniform,oracle-segment"
    # the multitask system loads any PEFT folder: here the capitals adapter, so it must equal single on capitals;
    # top-p 0.01 keeps the router's top-1 alone, so dlp must equal top1
    res = cli("eval", "--run", tiny_run, "--data-dir", test, "--systems", systems, "--top-p", "0.01",
              "--multitask-adapter", tiny_run / "adapters" / "capitals", "--limit", "2", "--max-new-tokens", "4",
              "--fixed-length", "--composite", "2,3", "--composite-n", "3", "--seed", "5", "--batch-size", "3",
              "--out", out, "--no-progress", "--device", "cpu")
    assert res.code == 0, res
    s = json.loads((out / "summary.json").read_text())
    assert s["systems"] == ["base", "single", "dlp", "dlp-sentence", "top1", "multitask", "uniform"]
    assert Path(s["model"]).name == "tiny" and s["n_samples"] == 6
    assert s["routing"]["top_p"] == 0.01 and s["routing"]["mean_selected"] == 1.0
    rows = [json.loads(l) for l in (out / "predictions.jsonl").read_text().splitlines()]
    for r in rows:
        if r["task"] == "capitals":
            assert r["outputs"]["multitask"] == r["outputs"]["single"]
        # top1 is the router's top-1 adapter alone: the oracle whenever that top-1 is the true task
        if r["routing"]["top1"] == r["task"]:
            assert r["outputs"]["top1"] == r["outputs"]["single"]
        assert r["routing"]["entries"][0]["selected"] == [r["routing"]["top1"]]
        assert r["outputs"]["dlp"] == r["outputs"]["top1"]
    comp = [json.loads(l) for l in (out / "composite.jsonl").read_text().splitlines()]
    assert [r["n"] for r in comp] == [2, 2, 2, 3, 3, 3]
    for n in ("2", "3"):
        size = s["composite"][n]
        assert size["prompts"] == 3 and set(size["skipped"]) == {"single"}
        assert set(size["scores"]) == set(systems.split(",")) - {"single"}
        for f in size["scores"].values():
            assert all(0.0 <= f[k] <= 100.0 for k in ("item_score", "all_correct", "format_rate"))
    for r in comp:
        assert len({it["task"] for it in r["items"]}) == r["n"]
        assert r["prompt"].splitlines()[2].startswith("1. ")
        # dlp-segment routes each numbered question on its own; oracle-segment forces each one's true task
        seg = [e for e in r["routing"]["dlp-segment"] if e["source"] == "segment"]
        assert len(seg) == r["n"]
        assert [e["sentence"] for e in seg] == [it["question"] for it in r["items"]]
    for n in ("2", "3"):   # the share of questions whose own segment was routed to their task, from those entries
        hits = [max(e["probs"], key=e["probs"].get) == it["task"] for r in comp if r["n"] == int(n)
                for e, it in zip([e for e in r["routing"]["dlp-segment"] if e["source"] == "segment"], r["items"])]
        assert s["composite"][n]["scores"]["dlp-segment"]["question_routing_accuracy"] == \
            pytest.approx(100.0 * sum(hits) / len(hits))
    md = (out / "summary.md").read_text()
    assert "### Composite-3 (3 prompts" in md and "| oracle-segment |" in md
    ps = paper_summary(s)
    assert set(ps["composite"]) == {"2", "3"} and ps["seconds"]["eval"] > 0 and ps["seconds"]["train"] > 0


def test_composite_scaffold_answers_every_item_on_its_label(cli, tiny_run, tmp_path):
    """--composite-scaffold: every system's output carries the labels 1. .. N. in order, each answer within its
    task's budget, so the format rate is 100 and the items are scored from what follows each label."""
    from dlp_lora.composite import numbered_answers
    from dlp_lora.tasks import write_builtin_tasks

    test = tmp_path / "test"
    write_builtin_tasks(test, n=4, seed=3, tasks=["arithmetic", "capitals", "word_sorting"])
    out = tmp_path / "o"
    res = cli("eval", "--run", tiny_run, "--data-dir", test, "--systems", "base,dlp,dlp-segment,oracle-segment",
              "--limit", "1", "--max-new-tokens", "3", "--fixed-length", "--composite", "2,3", "--composite-n", "2",
              "--composite-scaffold", "--batch-size", "2", "--out", out, "--no-progress", "--device", "cpu")
    assert res.code == 0, res
    s = json.loads((out / "summary.json").read_text())
    assert "--composite-scaffold" in s["command"]
    assert json.loads((out / "config.json").read_text())["composite_scaffold"] is True
    for r in (json.loads(l) for l in (out / "composite.jsonl").read_text().splitlines()):
        assert s["composite"][str(r["n"])]["scaffold"] is True
        for system, text in r["outputs"].items():
            labels = [l.split(".", 1)[0] for l in text.splitlines() if l[:1].isdigit() and "." in l[:3]]
            assert labels[: r["n"]] == [str(i) for i in range(1, r["n"] + 1)], (system, text)
            assert r["answers"][system] == numbered_answers(text, r["n"])
    for size in s["composite"].values():
        assert all(f["format_rate"] == 100.0 for f in size["scores"].values())


def test_base_system_equals_plain_generation(eval_run, tmp_path):
    """The base system is the base model: all-zero weights give the same greedy text as the unadapted model."""
    from dlp_lora.data import format_prompt
    from dlp_lora.models import load_model

    out = tmp_path / "o"
    s = evaluate(eval_run["run"], data=[eval_run["test"] / "capitals.json"], out_dir=out, systems="base",
                 model_spec=str(eval_run["model"]), limit=2, max_new_tokens=5, progress=False)
    rows = [json.loads(l) for l in (out / "predictions.jsonl").read_text().splitlines()]
    model, tok = load_model(eval_run["model"], device="cpu", dtype="fp32")
    import torch

    for row, budget in zip(rows, [5, 5]):
        ids = tok(format_prompt(tok, row["prompt"]), return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            g = model.generate(**ids, max_new_tokens=row["completion_tokens"]["base"], do_sample=False)
        ref = tok.decode(g[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
        assert row["outputs"]["base"].strip() == ref.strip()
    assert s["n_samples"] == 2


# ---------------------------------------------------------------------------------------------------------------
# Bad inputs: one-line errors, nothing written
# ---------------------------------------------------------------------------------------------------------------

def test_bad_inputs(cli, eval_run, tmp_path):
    run, test, model = eval_run["run"], eval_run["test"], eval_run["model"]
    out = tmp_path / "out"
    base = ["eval", "--run", run, "--model", model, "--out", out, "--no-progress"]

    res = cli(*base, "--data-dir", test, "--systems", "base,oracle")
    assert_one_line_error(res, "unknown system 'oracle'")

    extra = _write_tasks(tmp_path / "extra", [TaskData("poems", [QARecord("Write a poem", "roses")])])
    res = cli(*base, "--data", test / "colors.json", extra / "poems.json")
    assert_one_line_error(res, "poems.json", "task 'poems' has no adapter")
    # base / uniform need no adapter for the task: allowed (checked by getting past the adapter check)
    res = cli(*base, "--data", extra / "poems.json", "--systems", "base", "--max-new-tokens", "2")
    assert res.code == 0, res
    out.rename(tmp_path / "out_poems")

    empty = tmp_path / "empty"
    empty.mkdir()
    res = cli(*base, "--data-dir", empty)
    assert_one_line_error(res, str(empty), "no task files")
    (empty / "t.json").write_text("[]")
    res = cli(*base, "--data", empty / "t.json")
    assert_one_line_error(res, "t.json", "no records")

    res = cli(*base, "--data-dir", test, "--limit", "0")
    assert_one_line_error(res, "limit must be >= 1")
    res = cli(*base, "--data-dir", test, "--metric", "colors")
    assert_one_line_error(res, "--metric colors", "TASK=METRIC")
    res = cli("eval", "--run", tmp_path / "no_run", "--data-dir", test, "--out", out)
    assert_one_line_error(res, "no_run")
    assert not out.exists()

    out.mkdir()
    res = cli(*base, "--data-dir", test)
    assert_one_line_error(res, str(out), "already exists")


def test_dlp_needs_a_router(cli, eval_run, tmp_path):
    import shutil

    from dlp_lora.run import read_adapter_list, write_adapter_list

    run2 = tmp_path / "run2"
    run2.mkdir()
    write_adapter_list(run2 / "adapters.txt", read_adapter_list(eval_run["run"]))
    res = cli("eval", "--run", run2, "--data-dir", eval_run["test"], "--model", eval_run["model"],
              "--out", tmp_path / "o", "--systems", "single,dlp")
    assert_one_line_error(res, "no router")
    assert shutil.which  # keep import used


def test_leakage_guard_drops_training_questions(tmp_path):
    """A test question also in the adapter's training file (dlp_task.json data_file) is dropped and counted."""
    from dlp_lora.run import write_adapter_list

    tasks = _tasks(6)
    train = _write_tasks(tmp_path / "train", [dataclasses.replace(t, records=t.records[:4]) for t in tasks])
    test = _write_tasks(tmp_path / "test", [dataclasses.replace(t, records=t.records[2:]) for t in tasks])
    run = tmp_path / "run"
    dirs = []
    for t in tasks:
        d = run / "adapters" / t.name
        d.mkdir(parents=True)
        (d / "dlp_task.json").write_text(json.dumps({"task": t.name, "data_file": str((train / f"{t.name}.json").resolve()),
                                                     "metric": t.metric}))
        # a PEFT folder in form only: the fake pipeline never loads it
        (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "target_modules": ["q_proj"]}))
        (d / "adapter_model.safetensors").write_bytes(b"")
        dirs.append(d)
    write_adapter_list(run / "adapters.txt", dirs)
    s = evaluate(run, data_dir=test, out_dir=tmp_path / "o", pipeline=FakePipeline(tasks), systems="single",
                 progress=False)
    assert s["dropped_seen_in_training"] == {"capitals": 2, "colors": 2, "echo": 2}
    assert s["n_samples"] == 6
    rows = [json.loads(l) for l in (tmp_path / "o" / "predictions.jsonl").read_text().splitlines()]
    train_q = {r.question for t in tasks for r in t.records[:4]}
    assert not any(r["prompt"] in train_q for r in rows)
    assert "were dropped: capitals 2, colors 2, echo 2" in (tmp_path / "o" / "summary.md").read_text()
    # every test question seen in training: an empty test set, one-line error
    with pytest.raises(DLPError, match="empty test set"):
        evaluate(run, data=[train / "capitals.json"], out_dir=tmp_path / "o2", pipeline=FakePipeline(tasks),
                 systems="single", progress=False)


def test_reuse_gives_the_same_scores_as_no_reuse_on_the_tiny_run(cli, tiny_run, tmp_path):
    """With top-p 0.01 the router keeps one adapter, so dlp, top1 and (when routing is right) single generate with
    the same one-hot mixture: the default run answers those from one generation, ``--no-reuse`` generates each
    system itself, and both give the same outputs and scores."""
    from dlp_lora.tasks import write_builtin_tasks

    test = tmp_path / "test"
    write_builtin_tasks(test, n=4, seed=11, tasks=["arithmetic", "capitals", "word_sorting"])
    common = ["eval", "--run", tiny_run, "--data-dir", test, "--systems", "base,single,dlp,top1,uniform",
              "--top-p", "0.01", "--limit", "3", "--max-new-tokens", "5", "--fixed-length", "--batch-size", "3",
              "--no-progress", "--device", "cpu"]
    runs = {}
    for name, extra in (("reuse", []), ("no_reuse", ["--no-reuse"])):
        res = cli(*common, "--out", tmp_path / name, *extra)
        assert res.code == 0, res
        runs[name] = (json.loads((tmp_path / name / "summary.json").read_text()),
                      [json.loads(l) for l in (tmp_path / name / "predictions.jsonl").read_text().splitlines()])
    (s, rows), (s0, rows0) = runs["reuse"], runs["no_reuse"]
    assert s["reuse"]["enabled"] is True and s0["reuse"]["enabled"] is False
    assert set(s0["reuse"]["reused"].values()) == {0} and set(s0["reuse"]["generated"].values()) == {9}
    # dlp and top1 always share a mixture here, so one of the two reused the other's answer on every sample
    assert s["reuse"]["reused"]["dlp"] + s["reuse"]["reused"]["top1"] >= 9
    assert sum(s["reuse"]["reused"].values()) == sum(sum(r["reused"].values()) for r in rows)
    for sy in ("base", "single", "dlp", "top1", "uniform"):
        assert s["reuse"]["reused"][sy] + s["reuse"]["generated"][sy] == 9
        assert s["timing"][sy]["reused"] == s["reuse"]["reused"][sy]
        assert s["timing"][sy]["samples"] + s["timing"][sy]["reused"] <= 9
        for t in s["per_task"]:
            assert s["per_task"][t][sy] == s0["per_task"][t][sy]
    assert s["reuse"]["reused"]["base"] == s["reuse"]["reused"]["uniform"] == 0   # mixtures no other system has
    assert s["routing"] == s0["routing"]          # a reused dlp answer still carries its own routing record
    assert "config.json" in {p.name for p in (tmp_path / "reuse").iterdir()}
    for r, r0 in zip(rows, rows0):
        assert r["outputs"] == r0["outputs"] and r["scores"] == r0["scores"]
        assert r["routing"] == r0["routing"]
        assert not any(r0["reused"].values()) and all(v >= 0 for v in r["seconds"].values())
        if r["reused"]["dlp"] or r["reused"]["top1"]:
            assert r["outputs"]["dlp"] == r["outputs"]["top1"]
    assert "| timed samples | reused |" in (tmp_path / "reuse" / "summary.md").read_text()


def test_an_interrupted_eval_resumes_from_its_journal(tiny_run, tmp_path, monkeypatch):
    """Killed after a few batches, ``resume`` reads the finished batches back from the journal, generates only
    the rest and writes the same predictions as an uninterrupted run; other settings or a changed adapter are
    refused; a finished run removes the journal."""
    import dlp_lora.evaluate as ev
    from dlp_lora.tasks import write_builtin_tasks

    test = tmp_path / "test"
    write_builtin_tasks(test, n=4, seed=3, tasks=["arithmetic", "capitals", "word_sorting"])
    common = dict(data_dir=test, systems="base,single,dlp,dlp-segment,uniform", limit=3, max_new_tokens=4,
                  auto_budget=False, composite=[2], composite_n=4, batch_size=2, device="cpu")
    real, calls, full_calls = ev._generate, [], []
    monkeypatch.setattr(ev, "_generate", lambda system, *a, **k: (full_calls.append(system), real(system, *a, **k))[1])
    full = evaluate(tiny_run, out_dir=tmp_path / "full", progress=False, **common)

    def dying(system, pipes, rows, budgets, *a, **k):
        calls.append(set(budgets) != {2})     # warm-up calls ask for 2 tokens
        if sum(calls) == 9:                   # the machine dies during the 9th timed batch
            raise KeyboardInterrupt
        return real(system, pipes, rows, budgets, *a, **k)

    monkeypatch.setattr(ev, "_generate", dying)
    with pytest.raises(KeyboardInterrupt):
        evaluate(tiny_run, out_dir=tmp_path / "o", progress=False, **common)
    journal = tmp_path / ".o.partial" / "journal.jsonl"
    assert not (tmp_path / "o").exists() and len(journal.read_text().splitlines()) == 1 + 8
    with pytest.raises(DLPError, match=r"other settings \(limit\)"):
        evaluate(tiny_run, out_dir=tmp_path / "o", progress=False, resume=True, **{**common, "limit": 2})

    calls.clear()
    monkeypatch.setattr(ev, "_generate", lambda system, *a, **k: (calls.append(system), real(system, *a, **k))[1])
    resumed = evaluate(tiny_run, out_dir=tmp_path / "o", progress=False, resume=True, **common)
    assert resumed["resumed_batches"] == 8 and len(calls) == len(full_calls) - 8
    read = lambda d, f: [json.loads(l) for l in (tmp_path / d / f).read_text().splitlines()]
    for f in ("predictions.jsonl", "composite.jsonl"):
        assert [r["outputs"] for r in read("o", f)] == [r["outputs"] for r in read("full", f)]
    assert resumed["per_task"] == full["per_task"] and resumed["composite"]["2"]["scores"].keys() == \
        full["composite"]["2"]["scores"].keys()
    assert not journal.parent.exists()

    # a journal left by an interrupted run is refused when an adapter changed since
    monkeypatch.setattr(ev, "_generate", dying)
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        evaluate(tiny_run, out_dir=tmp_path / "p", progress=False, **common)
    weights = next((tiny_run / "adapters").rglob("adapter_model.safetensors"))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    with pytest.raises(DLPError, match="input files"):
        evaluate(tiny_run, out_dir=tmp_path / "p", progress=False, resume=True, **common)
