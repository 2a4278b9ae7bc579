"""The continuous (iteration-level) scheduler: requests join the running decode batch between two steps and leave
it when done. Served over loopback with the real pipeline (tiny model, three random adapters, the tiny run's
router); every answer is compared token for token with the pipeline run on that request alone."""

from __future__ import annotations

import concurrent.futures as cf
import json
import threading
import time
import types

import httpx
import pytest

from helpers_server import TASKS, serve_pipeline, serve_run, serving  # noqa: F401 (fixtures)

from dlp_lora.config import DLPError
from dlp_lora.serve import ServeConfig, create_app
from dlp_lora.serve.scheduler import EngineStats, IterationBatcher, Job
from dlp_lora.serve.schema import APIError

LONG = "Tell me a long story."


def alone(pipe, body: dict):
    """The pipeline's own greedy answer for one completion request run by itself (the reference)."""
    model = body["model"]
    weights = (body.get("dlp") or {}).get("weights")
    if model == "base":
        weights = {}
    elif model.startswith("dlp:"):
        weights = {model[4:]: 1.0}
    return pipe.generate([body["prompt"]], chat=False, weights=None if weights is None else [weights],
                         max_new_tokens=body["max_tokens"], stop=body.get("stop"))[0]


def bodies(n: int, long_tokens: int = 24) -> list[dict]:
    """Completion requests on different mixtures (routed per sentence, each task, the base model, a manual mix),
    long and short answers, some with stop strings."""
    models = ["dlp", f"dlp:{TASKS[0]}", "base", f"dlp:{TASKS[1]}", "dlp", f"dlp:{TASKS[2]}"]
    out = []
    for i in range(n):
        b = {"model": models[i % len(models)], "prompt": f"Question {i}: what is {i} plus {2 * i}? Answer.",
             "max_tokens": long_tokens if i % 3 == 0 else 3 + i % 5}
        if i % 4 == 3:
            b["dlp"] = {"weights": {TASKS[0]: 0.6, TASKS[2]: 0.4}}
            b["model"] = "dlp"
        if i % 5 == 4:
            b["stop"] = ["e"]
        out.append(b)
    return out


def post(url: str, body: dict) -> httpx.Response:
    return httpx.post(url + "/completions", json=body, timeout=120)


def paced_steps(app, gates: dict[int, int]):
    """Make the worker wait, before decode step k, until ``gates[k]`` requests have been submitted: requests then
    join the running batch at exactly those steps. Returns the list of (step, live rows) seen at each join, and a
    dict whose "waiting" entry is the gate step the worker is waiting at (so a test submits a wave only then)."""
    batcher, stats = app.state.batcher, app.state.stats
    step, join = batcher.step, batcher.run_batch
    joins, count, state = [], [0], {"waiting": None}

    def gated_step():
        need = gates.get(count[0])
        t0 = time.monotonic()
        if need is not None and stats.submitted < need:
            state["waiting"] = count[0]
        while need is not None and stats.submitted < need:
            assert time.monotonic() - t0 < 60, "the test's requests never arrived"
            time.sleep(0.005)
        state["waiting"] = None
        count[0] += 1
        step()

    def seen_join(jobs):
        joins.append((count[0], batcher.live(), len(jobs)))
        join(jobs)

    batcher.step, batcher.run_batch = gated_step, seen_join
    return joins, state


# exactness ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("chunk", [10_000, 4])
def test_a_request_decodes_the_same_alone_joining_mid_way_or_beside_other_mixtures(serve_pipeline, chunk):
    """Two long rows start; others join at steps 2, 5 and 9 (prefilled at once, or 4 tokens per step beside the
    decoding rows), on other mixtures, while earlier rows finish and leave: every greedy answer equals the
    pipeline's answer for that request alone."""
    app = create_app(serve_pipeline, ServeConfig(max_batch=8, batch_window_ms=200, prefill_chunk=chunk))
    reqs = bodies(9)
    waves = [reqs[:2], reqs[2:4], reqs[4:7], reqs[7:]]
    gates = {2: 4, 5: 7, 9: 9}
    joins, state = paced_steps(app, gates)
    with serving(app) as s, cf.ThreadPoolExecutor(len(reqs)) as ex:
        futures = []
        for k, wave in enumerate(waves):
            t0 = time.monotonic()
            # a later wave is sent only once the worker waits at its gate: it cannot join an earlier wave's batch
            while k > 0 and state["waiting"] != sorted(gates)[k - 1]:
                assert time.monotonic() - t0 < 60, (k, state, joins)
                time.sleep(0.005)
            futures += [ex.submit(post, s.base_url, b) for b in wave]
            t0 = time.monotonic()
            while app.state.stats.submitted < len(futures):
                assert time.monotonic() - t0 < 60
                time.sleep(0.005)
        answers = [f.result() for f in futures]
    assert [a.status_code for a in answers] == [200] * len(reqs), [a.text[:200] for a in answers]
    # the later waves joined a batch that was decoding, at several different steps
    mid_way = {step for step, live, _ in joins if live > 0}
    assert len(mid_way) >= 3, joins
    stats = app.state.stats
    assert stats.rows == len(reqs) and stats.errors == 0 and stats.running == 0
    with app.state.engine.lock:
        refs = [alone(serve_pipeline, b) for b in reqs]
    for b, a, ref in zip(reqs, answers, refs):
        got = a.json()
        assert got["choices"][0]["text"] == ref.text, b
        assert got["usage"]["completion_tokens"] == ref.completion_tokens, b
        assert got["dlp_routing"] == json.loads(json.dumps(ref.routing)), b
    assert len({a.json()["choices"][0]["text"] for a in answers}) > 3      # the mixtures really differ


@pytest.mark.parametrize("scheduler", ["continuous", "static"])
def test_ignore_eos_runs_to_max_tokens_under_both_schedulers(serve_pipeline, scheduler, monkeypatch):
    """vLLM's ``ignore_eos``: with every token made an EOS, a plain request stops at once while an
    ``ignore_eos`` one in the same batch runs to ``max_tokens`` with the text it would have had without that EOS;
    a non-boolean value is a 422."""
    body = {"model": f"dlp:{TASKS[0]}", "prompt": "Question: what is 2 plus 3? Answer.", "max_tokens": 6}
    ref = alone(serve_pipeline, body)
    monkeypatch.setattr(serve_pipeline, "eos_ids", set(range(len(serve_pipeline.tokenizer))))   # every token
    app = create_app(serve_pipeline, ServeConfig(max_batch=4, batch_window_ms=300, scheduler=scheduler))
    with serving(app) as s, cf.ThreadPoolExecutor(2) as ex:
        plain, kept = ex.map(lambda b: post(s.base_url, b), [body, {**body, "ignore_eos": True}])
        bad = post(s.base_url, {**body, "ignore_eos": "yes"})
    assert plain.json()["choices"][0]["finish_reason"] == "stop"
    assert plain.json()["usage"]["completion_tokens"] == 1
    got = kept.json()
    assert got["choices"][0]["finish_reason"] == "length" and got["usage"]["completion_tokens"] == 6
    assert got["choices"][0]["text"] == ref.text
    assert bad.status_code == 422 and bad.json()["error"]["param"] == "ignore_eos"


def test_cancelling_one_streaming_row_leaves_the_others_unchanged(serve_pipeline):
    app = create_app(serve_pipeline, ServeConfig(max_batch=8, batch_window_ms=300, max_tokens_cap=4000))
    stats = app.state.stats
    with app.state.engine.lock:
        ref_long = serve_pipeline.generate([LONG], chat=False, weights=[{"capitals": 1.0}], max_new_tokens=200)[0]
    assert ref_long.finish_reason == "length"       # this prompt does not stop early: a fair test of cancelling
    others = bodies(4, long_tokens=40)
    with serving(app) as s, cf.ThreadPoolExecutor(4) as ex:
        futures = [ex.submit(post, s.base_url, b) for b in others]
        body = {"model": "dlp:capitals", "prompt": LONG, "max_tokens": 2000, "stream": True}
        with httpx.stream("POST", s.base_url + "/completions", json=body, timeout=60) as r:
            it = r.iter_lines()
            got = [next(it) for _ in range(4)]       # a few tokens, then the client goes away
        assert all(g.startswith("data: ") or g == "" for g in got)
        answers = [f.result() for f in futures]
        t0 = time.monotonic()
        while stats.cancelled < 1 or stats.running:
            assert time.monotonic() - t0 < 60, stats
            time.sleep(0.02)
    assert [a.status_code for a in answers] == [200] * 4
    assert stats.cancelled == 1 and stats.completion_tokens < 2000
    with app.state.engine.lock:
        refs = [alone(serve_pipeline, b) for b in others]
    assert [a.json()["choices"][0]["text"] for a in answers] == [r.text for r in refs]


# the queue ----------------------------------------------------------------------------------------------------------

def test_queue_limit_and_429_hold_while_the_batch_is_decoding(serve_pipeline):
    """Two rows decode (max_batch 2), two requests wait (max_queue 2): the next one is a 429 with Retry-After;
    the waiting ones join as the running rows leave, and every answer is exact."""
    # a long window: the first two requests start together (the window ends as soon as two wait)
    app = create_app(serve_pipeline, ServeConfig(max_batch=2, max_queue=2, batch_window_ms=5000, retry_after_s=2))
    stats, batcher = app.state.stats, app.state.batcher
    gate, entered = threading.Event(), threading.Event()
    step = batcher.step

    def held_step():
        entered.set()
        assert gate.wait(60)
        step()

    batcher.step = held_step
    reqs = [{"model": f"dlp:{TASKS[i % 3]}", "prompt": f"Sort: pear fig {i}.", "max_tokens": 6} for i in range(4)]
    with serving(app) as s, cf.ThreadPoolExecutor(4) as ex:
        running = [ex.submit(post, s.base_url, b) for b in reqs[:2]]
        t0 = time.monotonic()
        while not (entered.is_set() and batcher.live() == 2):
            assert time.monotonic() - t0 < 60, stats
            time.sleep(0.01)
        queued = [ex.submit(post, s.base_url, b) for b in reqs[2:]]
        while batcher.pending < 2:
            assert time.monotonic() - t0 < 60, stats
            time.sleep(0.01)
        r = post(s.base_url, reqs[0])
        assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"
        assert r.headers["retry-after"] == "2"
        gate.set()
        answers = [f.result() for f in running + queued]
        health = httpx.get(s.url + "/health").json()
    assert [a.status_code for a in answers] == [200] * 4
    assert stats.rejected == 1 and stats.rows == 4
    assert health["scheduler"] == "continuous" and health["queue"] == 0 and health["engine"]["max_batch_seen"] <= 2
    with app.state.engine.lock:
        assert [a.json()["choices"][0]["text"] for a in answers] == [alone(serve_pipeline, b).text for b in reqs]


def test_32_clients_for_30_seconds_lose_no_request(serve_pipeline):
    """32 clients send mixed requests (routed, forced, base, streamed, stop strings) back to back for 30 s: each
    one gets its answer, and the engine's counts add up (the test checks counts, never times)."""
    app = create_app(serve_pipeline, ServeConfig(max_batch=16, max_queue=64, batch_window_ms=5))
    pool = bodies(12)
    stop_at = time.monotonic() + 30

    def client(k: int) -> tuple[int, list]:
        sent, bad = 0, []
        with httpx.Client(timeout=120) as c:
            while time.monotonic() < stop_at:
                body = {**pool[(k + sent) % len(pool)], "stream": (k + sent) % 4 == 1}
                body["max_tokens"] = min(body["max_tokens"], 12)
                r = c.post(url + "/completions", json=body)
                sent += 1
                ok = r.status_code == 200 and (("data: [DONE]" in r.text and '"error"' not in r.text)
                                               if body["stream"] else r.json()["object"] == "text_completion")
                if not ok:
                    bad.append((r.status_code, r.text[:200]))
        return sent, bad

    with serving(app) as s:
        url = s.base_url
        with cf.ThreadPoolExecutor(32) as ex:
            results = list(ex.map(client, range(32)))
        health = httpx.get(s.url + "/health").json()
    sent = sum(n for n, _ in results)
    assert [b for _, bad in results for b in bad] == []
    stats = app.state.stats
    assert sent >= 32 and stats.submitted == sent and stats.rows == sent
    assert stats.errors == stats.rejected == stats.cancelled == stats.dropped == 0
    assert health["queue"] == 0 and stats.running == 0 and app.state.batcher.live() == 0
    assert stats.as_dict()["max_batch_seen"] >= 2


# failure isolation --------------------------------------------------------------------------------------------------

def test_a_row_failing_to_join_fails_alone(serve_pipeline, monkeypatch):
    """A join whose routing or prefill raises is split down to the failing row: that row gets a 500, the rows
    that joined with it and the rows already decoding get their exact answers."""
    app = create_app(serve_pipeline, ServeConfig(max_batch=16, batch_window_ms=300))
    real = type(serve_pipeline).mixtures

    def fragile(self, requests):
        if any("POISON" in r.prompt for r in requests):
            raise RuntimeError("boom")
        return real(self, requests)

    reqs = [{"model": "dlp", "prompt": f"Sort: pear apple {i}.", "max_tokens": 8} for i in range(5)]
    reqs.insert(3, {"model": "dlp", "prompt": "POISON here.", "max_tokens": 8})
    monkeypatch.setattr(type(serve_pipeline), "mixtures", fragile)
    with serving(app) as s, cf.ThreadPoolExecutor(len(reqs)) as ex:
        answers = list(ex.map(lambda b: post(s.base_url, b), reqs))
    monkeypatch.setattr(type(serve_pipeline), "mixtures", real)
    assert [a.status_code for a in answers] == [200, 200, 200, 500, 200, 200]
    assert answers[3].json()["error"]["code"] == "generation_failed"
    assert app.state.stats.failed_rows == 1 and app.state.stats.isolated >= 1
    with app.state.engine.lock:
        refs = [alone(serve_pipeline, b).text for i, b in enumerate(reqs) if i != 3]
    assert [a.json()["choices"][0]["text"] for i, a in enumerate(answers) if i != 3] == refs


def test_a_failing_decode_step_reruns_its_rows_without_repeating_streamed_text(serve_pipeline, monkeypatch):
    """A decode step that raises blames no row: its rows are re-run on the static path; every answer is exact
    and a streaming client sees its text once."""
    from dlp_lora.pipeline import DecodeBatch

    app = create_app(serve_pipeline, ServeConfig(max_batch=8, batch_window_ms=300))
    real, calls = DecodeBatch.step, [0]

    def flaky(self):
        calls[0] += 1
        if calls[0] == 4:
            raise RuntimeError("a transient failure")
        return real(self)

    reqs = [{"model": f"dlp:{TASKS[i % 3]}", "prompt": f"Sort: pear apple {i}.", "max_tokens": 10} for i in range(3)]
    stream_body = {**reqs[0], "stream": True}

    def stream():
        with httpx.stream("POST", s.base_url + "/completions", json=stream_body, timeout=120) as r:
            return [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]

    monkeypatch.setattr(DecodeBatch, "step", flaky)
    with serving(app) as s, cf.ThreadPoolExecutor(4) as ex:
        events = ex.submit(stream)
        answers = list(ex.map(lambda b: post(s.base_url, b), reqs))
        events = events.result()
    monkeypatch.setattr(DecodeBatch, "step", real)
    assert calls[0] >= 4 and app.state.stats.errors >= 1
    assert [a.status_code for a in answers] == [200] * 3
    with app.state.engine.lock:
        refs = [alone(serve_pipeline, b).text for b in reqs]
    assert [a.json()["choices"][0]["text"] for a in answers] == refs
    assert "".join(e["choices"][0]["text"] for e in events if e.get("choices")) == refs[0]


# the worker, without a model ----------------------------------------------------------------------------------------

class FakeEngine:
    """Rows that finish after ``steps`` decode steps; records how many rows joined at which step."""

    def __init__(self, steps: int = 3) -> None:
        self.rows: dict[Job, int] = {}
        self.joined: list[tuple[int, int]] = []
        self.n, self.steps = 0, steps

    def join(self, jobs):
        self.joined.append((self.n, len(jobs)))
        self.rows.update((j, self.steps) for j in jobs)

    def step(self):
        self.n += 1
        for j in list(self.rows):
            self.rows[j] -= 1
            if not self.rows[j]:
                del self.rows[j]
                j.emit("done", j.req)

    def live(self):
        return len(self.rows)

    def abort(self, error):
        for j in self.rows:
            j.emit("error", error)
        self.rows.clear()


class FakeLoop:
    def __init__(self) -> None:
        self.events = []

    def call_soon_threadsafe(self, fn, item):
        self.events.append(item)


def fake_job(i: int) -> Job:
    job = Job.__new__(Job)                  # no asyncio loop needed: events land in a list
    job.req, job.loop, job.id, job.events = i, FakeLoop(), str(i), types.SimpleNamespace(put_nowait=None)
    job.cancelled, job.row, job.routed, job.t_submit = False, None, None, time.monotonic()
    return job


def test_the_worker_fills_free_rows_between_steps_and_answers_everyone_at_stop():
    eng = FakeEngine(steps=3)
    b = IterationBatcher(eng.join, eng.step, eng.live, eng.abort, max_batch=2, max_queue=10, window_ms=0,
                         stats=EngineStats())
    jobs = [fake_job(i) for i in range(5)]
    with b._cv:                             # all queued before the worker looks
        for j in jobs:
            b.submit(j)
    b.start()
    t0 = time.monotonic()
    while sum(bool(j.loop.events) for j in jobs) < 5:
        assert time.monotonic() - t0 < 10, eng.joined
        time.sleep(0.005)
    # never more than two live rows: two at once, then the rest as rows leave
    assert eng.joined[0] == (0, 2) and sum(n for _, n in eng.joined) == 5
    assert all(j.loop.events == [("done", j.req)] for j in jobs)
    late = fake_job(9)
    eng.steps = 10 ** 9                     # a row that never finishes: the stop must answer it
    b.submit(late)
    while not eng.rows:
        assert time.monotonic() - t0 < 10
        time.sleep(0.005)
    b.stop()
    assert late.loop.events and late.loop.events[-1][0] == "error"
    assert late.loop.events[-1][1].code == "shutting_down"
    with pytest.raises(APIError):
        b.submit(fake_job(10))


def test_serve_config_refuses_an_unknown_scheduler():
    with pytest.raises(DLPError, match="scheduler"):
        ServeConfig(scheduler="fifo")
    with pytest.raises(DLPError, match="prefill_chunk"):
        ServeConfig(prefill_chunk=0)


# bench row P8's workload and figures (the row itself runs two servers: `dlp-lora bench --only P8`) -------------------

def test_p8_workload_is_fixed_and_mixed():
    from dlp_lora.bench import P8_MAX_TOKENS, p8_request

    tasks = ["a", "b", "c"]
    reqs = [p8_request(i, tasks, seed=0) for i in range(400)]
    assert reqs == [p8_request(i, tasks, seed=0) for i in range(400)]          # the same sequence every run
    assert reqs != [p8_request(i, tasks, seed=1) for i in range(400)]
    assert all(r["stream"] and r["stream_options"] == {"include_usage": True} and r["ignore_eos"] for r in reqs)
    assert {r["max_tokens"] for r in reqs} == {m for m, _ in P8_MAX_TOKENS}  # short and long answers
    routed = [r for r in reqs if r["model"] == "dlp" and "dlp" not in r]
    forced = {r["model"] for r in reqs if r["model"].startswith("dlp:")}
    mixed = [r["dlp"]["weights"] for r in reqs if "dlp" in r]
    assert len(routed) > 100 and forced == {"dlp:a", "dlp:b", "dlp:c"} and len(mixed) > 40
    assert all(len(w) == 2 and set(w) <= set(tasks) for w in mixed)
    assert len({r["messages"][0]["content"] for r in reqs}) > 100                # eight kinds, varied


def test_p8_figures_and_its_benchmarks_section():
    from dlp_lora.bench import TITLES, _md_case, _md_summary_row, p8_figures

    phases = [{"samples": [{"ttft": 0.1 * k, "latency": 1.0 * k, "tokens": 10} for k in range(1, 101)],
               "failed": 1, "elapsed": 20.0},
              {"samples": [{"ttft": 0.5, "latency": 2.0, "tokens": 30}], "failed": 0, "elapsed": 5.0}]
    f = p8_figures(phases)
    assert f["tokens_per_s"] == pytest.approx(1030 / 25.0)
    assert f["requests"] == 101 and f["failed"] == 1 and f["output_tokens"] == 1030
    assert f["ttft_p50"] == pytest.approx(5.0) and f["ttft_p99"] == pytest.approx(9.9)
    assert f["latency_p99"] == pytest.approx(99.0)
    st = {**f, "tokens_per_s": 10.0, "ttft_p99": 8.0}
    co = {**f, "tokens_per_s": 16.0, "ttft_p99": 2.0}
    keys = ("tokens_per_s", "ttft_p50", "ttft_p99", "latency_p50", "latency_p99")
    case = {"name": "32 clients", "shapes": {"clients": 32}, "systems": {"static": st, "continuous": co},
            "ratios": {k: co[k] / st[k] for k in keys}}
    row = {"systems": case["systems"], "met": True, "figure": {"tokens_per_s_ratio": 1.6, "ttft_p99_ratio": 0.25}}
    line = _md_summary_row("P8", row)
    assert line.startswith(f"| P8 | {TITLES['P8']} |") and "1.60×" in line and "0.25×" in line
    assert line.endswith("| yes |")
    table = "\n".join(_md_case("P8", case))
    assert "| continuous / static | 1.60× |" in table and "| 0.25× |" in table
