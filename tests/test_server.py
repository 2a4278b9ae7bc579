"""The OpenAI-compatible server: the official ``openai`` client against ``create_app`` served by uvicorn on a free
loopback port, with the real pipeline (tiny model, three random adapters, the tiny run's mini-MLP router)."""

from __future__ import annotations

import concurrent.futures as cf
import json
import threading
import time

import httpx
import openai
import pytest

from helpers_server import TASKS, serve_pipeline, serve_run, serving  # noqa: F401 (fixtures)

from dlp_lora.config import DLPError
from dlp_lora.selection import SelectionConfig
from dlp_lora.serve import ServeConfig, create_app

Q_ROUTED = "What is 17 plus 25? Give the number."
MAX = 12


def direct(pipe, prompt, *, chat=True, weights=None, max_new_tokens=MAX, stop=None, selection=None):
    """The engine's own greedy answer for one request (the reference the server must reproduce)."""
    return pipe.generate([prompt], selection, chat=chat, weights=None if weights is None else [weights],
                         max_new_tokens=max_new_tokens, stop=stop)[0]


@pytest.fixture(scope="module")
def srv(serve_pipeline):
    app = create_app(serve_pipeline, ServeConfig(max_batch=16, batch_window_ms=300, max_tokens_cap=400,
                                                 max_prompt_tokens=200, max_body_bytes=20_000))
    with serving(app) as s:
        yield s


@pytest.fixture(scope="module")
def client(srv):
    return openai.OpenAI(base_url=srv.base_url, api_key="unused", max_retries=0, timeout=60)


def locked(srv):
    """Hold the engine lock while the test calls the pipeline directly (the server's worker shares it)."""
    return srv.app.state.engine.lock


# models, completions, chat, routing -------------------------------------------------------------------------------

def test_models_lists_dlp_base_and_every_adapter(client):
    ids = [m.id for m in client.models.list().data]
    assert ids[:2] == ["base", "dlp"]
    for t in TASKS:
        assert f"dlp:{t}" in ids and t in ids
    roots = [m for m in client.models.list().data if not m.parent]
    assert [m.id for m in roots] == ["base"]          # what a proxy discovers as the upstream base model


def test_chat_completion_is_routed_and_equals_the_engine(client, srv, serve_pipeline):
    r = client.chat.completions.create(model="dlp", messages=[{"role": "user", "content": Q_ROUTED}], max_tokens=MAX)
    with locked(srv):
        ref = direct(serve_pipeline, Q_ROUTED)
    assert r.object == "chat.completion" and r.model == "dlp"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == ref.text
    assert r.choices[0].finish_reason == ("length" if ref.finish_reason == "length" else "stop")
    assert r.usage.prompt_tokens == ref.prompt_tokens > 0
    assert r.usage.completion_tokens == ref.completion_tokens <= MAX
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    routing = r.dlp_routing
    assert routing == json.loads(json.dumps(ref.routing))
    # the prompt has two sentences: routed per sentence (paper), each with router probs over all tasks
    assert [e["sentence"] for e in routing[:2]] == ["What is 17 plus 25?", "Give the number."]
    for e in routing:
        assert set(e["selected"]) <= set(TASKS) and e["selected"]
        assert sum(e["weights"]) == pytest.approx(1.0, abs=1e-5)
        assert set(e["probs"]) == set(TASKS) and sum(e["probs"].values()) == pytest.approx(1.0, abs=1e-4)


def test_completion_raw_prompt(client, srv, serve_pipeline):
    prompt = "The capital of Peru is"
    r = client.completions.create(model="dlp", prompt=prompt, max_tokens=MAX)
    with locked(srv):
        ref = direct(serve_pipeline, prompt, chat=False)
    assert r.object == "text_completion"
    assert r.choices[0].text == ref.text
    assert r.usage.prompt_tokens == ref.prompt_tokens
    assert r.dlp_routing[0]["sentence"] == prompt and r.dlp_routing[0]["source"] == "prompt"


def test_forced_adapter_base_and_manual_weights(client, srv, serve_pipeline):
    prompt = "Sort the words: pear apple fig."
    texts = {}
    for model in [f"dlp:{t}" for t in TASKS] + ["base", TASKS[1]]:
        r = client.completions.create(model=model, prompt=prompt, max_tokens=MAX)
        texts[model] = r.choices[0].text
        if model == "base":
            assert r.dlp_routing[0]["selected"] == [] and r.dlp_routing[0]["weights"] == []
        else:
            task = model.split(":")[-1]
            assert r.dlp_routing[0]["selected"] == [task] and r.dlp_routing[0]["weights"] == [1.0]
            assert r.dlp_routing[0]["source"] == "forced"
    mix = {TASKS[0]: 0.7, TASKS[2]: 0.3}
    r = client.completions.create(model="dlp", prompt=prompt, max_tokens=MAX, extra_body={"dlp": {"weights": mix}})
    assert r.dlp_routing[0]["selected"] == [TASKS[0], TASKS[2]]
    assert r.dlp_routing[0]["weights"] == pytest.approx([0.7, 0.3])
    with locked(srv):
        for t in TASKS:
            assert texts[f"dlp:{t}"] == direct(serve_pipeline, prompt, chat=False, weights={t: 1.0}).text
        assert texts["base"] == direct(serve_pipeline, prompt, chat=False, weights={}).text
        assert r.choices[0].text == direct(serve_pipeline, prompt, chat=False, weights=mix).text
    assert texts[TASKS[1]] == texts[f"dlp:{TASKS[1]}"]           # vLLM-style bare adapter name
    assert len({texts[m] for m in texts}) > 1                   # the adapters really change the answer


def test_dlp_options_top_p_and_weighting(client):
    r = client.completions.create(model="dlp", prompt="What is 3 plus 4?", max_tokens=4,
                                  extra_body={"dlp": {"top_p": 1.0, "weighting": "renorm", "granularity": "prompt"}})
    e = r.dlp_routing[0]
    # top_p = 1 keeps every task with non-zero probability; renorm weights are the probabilities themselves
    assert set(e["selected"]) == {t for t, p in e["probs"].items() if p > 0}
    for t, w in zip(e["selected"], e["weights"]):
        assert w == pytest.approx(e["probs"][t], abs=1e-4)


def test_multi_message_chat_routes_on_user_turns(client, srv, serve_pipeline):
    msgs = [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "What is 2 plus 2?"},
            {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3 plus 3?"}]
    r = client.chat.completions.create(model="dlp", messages=msgs, max_tokens=MAX)
    e = r.dlp_routing[0]
    assert e["sentence"] == "What is 2 plus 2?\nAnd 3 plus 3?"
    with locked(srv):
        probs, w = serve_pipeline.route([e["sentence"]], SelectionConfig())
        text = serve_pipeline.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        ref = direct(serve_pipeline, text, chat=False, weights=w[0])
    assert e["selected"] == [TASKS[i] for i in w[0].nonzero().flatten().tolist()] or \
        sorted(e["selected"]) == sorted(TASKS[i] for i in w[0].nonzero().flatten().tolist())
    assert r.choices[0].message.content == ref.text


def test_stop_strings(client, srv, serve_pipeline):
    prompt = "Count: one two three"
    with locked(srv):
        full = direct(serve_pipeline, prompt, chat=False, max_new_tokens=20).text
    assert len(full) > 6
    stop = full[3:6]
    r = client.completions.create(model="dlp", prompt=prompt, max_tokens=20, stop=[stop])
    assert r.choices[0].text == full[:full.find(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_seeded_sampling_is_reproducible(client):
    kw = dict(model="dlp:capitals", prompt="Once upon a time", max_tokens=10, temperature=1.0, top_p=0.9, seed=7)
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert a.choices[0].text == b.choices[0].text
    greedy = client.completions.create(model="dlp:capitals", prompt="Once upon a time", max_tokens=10)
    other = [client.completions.create(**{**kw, "seed": s}).choices[0].text for s in (1, 2, 3)]
    assert len(set(other + [greedy.choices[0].text])) > 1       # sampling really samples


# streaming --------------------------------------------------------------------------------------------------------

def test_chat_streaming_matches_non_streaming(client):
    msgs = [{"role": "user", "content": Q_ROUTED}]
    full = client.chat.completions.create(model="dlp", messages=msgs, max_tokens=MAX)
    chunks = list(client.chat.completions.create(model="dlp", messages=msgs, max_tokens=MAX, stream=True,
                                                 stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    final = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(final) == 1 and final[0].choices[0].finish_reason == full.choices[0].finish_reason
    assert final[0].dlp_routing == full.dlp_routing
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == full.usage.total_tokens
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1   # really incremental


def test_completion_streaming_raw_sse_ends_with_done(srv, client):
    body = {"model": "dlp:capitals", "prompt": "Name a city.", "max_tokens": 8, "stream": True}
    with httpx.stream("POST", srv.base_url + "/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [l for l in r.iter_lines() if l]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(l[6:]) for l in lines[:-1]]
    assert all(e["object"] == "text_completion" for e in events)
    ref = client.completions.create(model="dlp:capitals", prompt="Name a city.", max_tokens=8)
    assert "".join(e["choices"][0]["text"] for e in events) == ref.choices[0].text
    assert events[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert events[-1]["dlp_routing"][0]["selected"] == ["capitals"]
    assert events[-1]["usage"]["completion_tokens"] == ref.usage.completion_tokens


# batching ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def static_srv(serve_pipeline):
    """The batch-at-a-time scheduler (``--scheduler static``), kept for comparison."""
    app = create_app(serve_pipeline, ServeConfig(scheduler="static", max_batch=16, batch_window_ms=300,
                                                 max_tokens_cap=400, max_prompt_tokens=200))
    with serving(app) as s:
        yield s


def test_16_concurrent_requests_are_answered_correctly_in_batches(static_srv, serve_pipeline, monkeypatch):
    """The static scheduler hands the engine whole batches of heterogeneous rows."""
    srv = static_srv
    client = openai.OpenAI(base_url=srv.base_url, api_key="unused", max_retries=0, timeout=60)
    seen = []
    real = serve_pipeline.generate

    def spy(prompts, *args, **kw):  # what the engine itself is handed
        seen.append(len(prompts))
        return real(prompts, *args, **kw)

    monkeypatch.setattr(serve_pipeline, "generate", spy)
    models = ["dlp", "base"] + [f"dlp:{t}" for t in TASKS]
    reqs = [dict(model=models[i % len(models)], prompt=f"Question {i}: what is {i} plus {i}?",
                 max_tokens=4 + i % 5, mix=(i % 4 == 3)) for i in range(16)]
    before = dict(srv.stats.batch_sizes)
    barrier = threading.Barrier(16)

    def call(q):
        barrier.wait()
        extra = {"dlp": {"weights": {TASKS[0]: 0.5, TASKS[1]: 0.5}}} if q["mix"] else None
        model = "dlp" if q["mix"] else q["model"]
        return client.completions.create(model=model, prompt=q["prompt"], max_tokens=q["max_tokens"],
                                         extra_body=extra)

    with cf.ThreadPoolExecutor(16) as ex:
        answers = list(ex.map(call, reqs))
    monkeypatch.setattr(serve_pipeline, "generate", real)
    assert max(seen) > 1, seen
    grown = {k: v - before.get(k, 0) for k, v in srv.stats.batch_sizes.items() if v - before.get(k, 0)}
    assert sum(k * v for k, v in grown.items()) == 16 and max(grown) > 1
    # every answer is its own request's answer: the same as the engine run on that request alone
    with locked(srv):
        for q, a in zip(reqs, answers):
            if q["mix"]:
                w = {TASKS[0]: 0.5, TASKS[1]: 0.5}
            else:
                w = None if q["model"] == "dlp" else ({} if q["model"] == "base" else {q["model"][4:]: 1.0})
            ref = real([q["prompt"]], chat=False, weights=None if w is None else [w], max_new_tokens=q["max_tokens"])[0]
            assert a.choices[0].text == ref.text, q
            assert a.usage.completion_tokens == ref.completion_tokens <= q["max_tokens"]
            assert a.dlp_routing[0]["sentence"] == q["prompt"]


def test_sustained_concurrent_load_has_no_errors(serve_pipeline):
    """Requests keep arriving (and are validated, i.e. tokenized) while batches run: no request may fail.
    Regression: sharing one fast tokenizer between validation and the worker broke batches."""
    app = create_app(serve_pipeline, ServeConfig(max_batch=8, batch_window_ms=0))
    kinds = [("/completions", {"model": "base", "prompt": "Sort: b a c."}),
             ("/completions", {"model": "dlp", "prompt": "What is 4 plus 5? Then stop."}),
             ("/chat/completions", {"model": "dlp", "messages": [{"role": "user", "content": "Capital of Peru?"}]}),
             ("/chat/completions", {"model": "dlp:arithmetic", "messages": [{"role": "user", "content": "1+1?"}],
                                    "stream": True})]
    with serving(app) as s:
        def client(k):
            codes = []
            with httpx.Client(timeout=60) as c:
                for j in range(6):
                    path, body = kinds[(k + j) % len(kinds)]
                    r = c.post(s.base_url + path, json={**body, "max_tokens": 3 + (k + j) % 4})
                    ok = r.status_code == 200 and (("data: [DONE]" in r.text and '"error"' not in r.text)
                                                   if body.get("stream") else
                                                   "dlp_routing" in r.json())
                    codes.append((r.status_code, ok, r.text[:200] if not ok else ""))
            return codes

        with cf.ThreadPoolExecutor(8) as ex:
            codes = [c for cs in ex.map(client, range(8)) for c in cs]
    assert all(ok for _, ok, _ in codes), [c for c in codes if not c[1]][:3]
    assert app.state.stats.errors == 0 and app.state.stats.rows == 48


# errors -----------------------------------------------------------------------------------------------------------

def _post(srv, path, body=None, content=None, headers=None):
    r = httpx.post(srv.base_url + path, json=body, content=content, headers=headers, timeout=30)
    return r


def _assert_error(r, status, code=None, param=None, needle=None):
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if code:
        assert err["code"] == code, err
    if param:
        assert err["param"] == param, err
    if needle:
        assert needle in err["message"], err
    return err


@pytest.mark.parametrize("path,body,status,code,param", [
    ("/completions", {"model": "nope", "prompt": "x"}, 404, "model_not_found", "model"),
    ("/chat/completions", {"model": "dlp:nope", "messages": [{"role": "user", "content": "x"}]}, 404,
     "model_not_found", "model"),
    ("/completions", {"model": "dlp", "prompt": "x", "max_tokens": "ten"}, 422, "invalid_value", "max_tokens"),
    ("/completions", {"model": "dlp", "prompt": "x", "max_tokens": 0}, 422, "invalid_value", "max_tokens"),
    ("/completions", {"model": "dlp", "prompt": "x", "max_tokens": 401}, 400, "max_tokens_exceeded", "max_tokens"),
    ("/completions", {"model": "dlp", "prompt": "x", "temperature": -1}, 422, "invalid_value", "temperature"),
    ("/completions", {"model": "dlp", "prompt": "x", "temperature": "hot"}, 422, "invalid_value", "temperature"),
    ("/completions", {"model": "dlp", "prompt": "x", "top_p": 0}, 422, "invalid_value", "top_p"),
    ("/completions", {"model": "dlp", "prompt": "x", "stream": "yes"}, 422, "invalid_value", "stream"),
    ("/completions", {"model": "dlp", "prompt": "x", "stop": [1]}, 422, "invalid_value", "stop"),
    ("/completions", {"model": "dlp", "prompt": "x", "seed": 1.5}, 422, "invalid_value", "seed"),
    ("/completions", {"model": "dlp", "prompt": [1, 2, 3]}, 422, "invalid_value", "prompt"),
    ("/completions", {"model": "dlp"}, 422, "invalid_value", "prompt"),
    ("/completions", {"prompt": "x"}, 422, "invalid_value", "model"),
    ("/completions", {"model": "dlp", "prompt": "x", "n": 2}, 400, "unsupported_value", "n"),
    ("/chat/completions", {"model": "dlp", "messages": []}, 422, "invalid_value", "messages"),
    ("/chat/completions", {"model": "dlp", "messages": [{"role": "robot", "content": "x"}]}, 422, "invalid_value",
     "messages[0].role"),
    ("/chat/completions", {"model": "dlp", "messages": "hello"}, 422, "invalid_value", "messages"),
    ("/completions", {"model": "dlp", "prompt": "x", "dlp": {"weights": {"nope": 1}}}, 422, "unknown_task",
     "dlp.weights"),
    ("/completions", {"model": "dlp", "prompt": "x", "dlp": {"weights": {"capitals": -0.5}}}, 422,
     "negative_weight", "dlp.weights.capitals"),
    ("/completions", {"model": "dlp", "prompt": "x", "dlp": {"weights": {"capitals": "a lot"}}}, 422,
     "invalid_value", "dlp.weights.capitals"),
    ("/completions", {"model": "dlp", "prompt": "x", "dlp": {"weights": [1, 0, 0]}}, 422, "invalid_value",
     "dlp.weights"),
    ("/completions", {"model": "dlp:capitals", "prompt": "x", "dlp": {"weights": {"capitals": 1}}}, 400,
     "conflicting_options", "dlp.weights"),
    ("/completions", {"model": "dlp", "prompt": "x", "dlp": {"top_p": 1.5}}, 422, "invalid_value", "dlp.top_p"),
    ("/completions", {"model": "dlp", "prompt": "x", "dlp": {"weighting": "max"}}, 422, "invalid_value",
     "dlp.weighting"),
    ("/completions", {"model": "dlp", "prompt": "x", "dlp": {"temperature": 1}}, 422, "invalid_value",
     "dlp.temperature"),
    ("/completions", {"model": "dlp", "prompt": "x", "dlp": "fast"}, 422, "invalid_value", "dlp"),
    ("/completions", ["not", "an", "object"], 400, "invalid_json", None),
])
def test_bad_requests_get_openai_errors(srv, path, body, status, code, param):
    _assert_error(_post(srv, path, body), status, code, param)


def test_invalid_json_too_long_prompt_and_too_large_body(srv):
    _assert_error(_post(srv, "/completions", content=b'{"model": "dlp", "prompt": ',
                        headers={"content-type": "application/json"}), 400, "invalid_json")
    _assert_error(_post(srv, "/completions", content=b"\xff\xfe", headers={"content-type": "application/json"}),
                  400, "invalid_json")
    _assert_error(_post(srv, "/completions", {"model": "dlp", "prompt": "word " * 400}), 400,
                  "context_length_exceeded", "prompt", "above this server's limit of 200")
    _assert_error(_post(srv, "/completions", {"model": "dlp", "prompt": "x" * 30_000}), 413, "body_too_large")
    _assert_error(httpx.get(srv.url + "/v1/nothing"), 404, "not_found")
    _assert_error(httpx.get(srv.base_url + "/completions"), 405, "method_not_allowed")


def test_openai_client_raises_typed_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="dlp", prompt="x", max_tokens=2, n=2)
    with pytest.raises(openai.UnprocessableEntityError):
        client.chat.completions.create(model="dlp", messages=[{"role": "user", "content": "x"}], max_tokens=2,
                                       extra_body={"dlp": {"weights": {"capitals": -1}}})


def test_queue_full_answers_429_with_retry_after(serve_pipeline):
    app = create_app(serve_pipeline, ServeConfig(max_batch=1, max_queue=1, batch_window_ms=0, retry_after_s=3))
    stats, batcher, engine = app.state.stats, app.state.batcher, app.state.engine
    with serving(app) as s:
        body = {"model": "dlp:capitals", "prompt": "hello", "max_tokens": 3}
        results = {}

        def send(name):
            results[name] = httpx.post(s.base_url + "/completions", json=body, timeout=60)

        def wait(cond):
            t0 = time.monotonic()
            while not cond():
                assert time.monotonic() - t0 < 30
                time.sleep(0.01)

        with engine.lock:   # the worker blocks on its first batch: A is taken, B waits in the queue
            a = threading.Thread(target=send, args=("a",))
            a.start()
            wait(lambda: stats.submitted == 1 and batcher.pending == 0)
            b = threading.Thread(target=send, args=("b",))
            b.start()
            wait(lambda: stats.submitted == 2 and batcher.pending == 1)
            r = httpx.post(s.base_url + "/completions", json=body, timeout=60)
            _assert_error(r, 429, "queue_full")
            assert r.headers["retry-after"] == "3" and r.json()["error"]["type"] == "rate_limit_error"
        a.join(60)
        b.join(60)
        assert results["a"].status_code == 200 and results["b"].status_code == 200
        assert results["a"].json()["choices"][0]["text"] == results["b"].json()["choices"][0]["text"]
        assert stats.rejected == 1


def test_client_disconnect_mid_stream_frees_its_slot(serve_pipeline):
    app = create_app(serve_pipeline, ServeConfig(max_batch=1, max_tokens_cap=4000, batch_window_ms=0))
    stats = app.state.stats
    prompt = "Tell me a long story."
    with app.state.engine.lock:
        ref = serve_pipeline.generate([prompt], chat=False, weights=[{"capitals": 1.0}], max_new_tokens=300)[0]
    assert ref.finish_reason == "length"          # this prompt does not stop early: a fair test of cancelling
    with serving(app) as s:
        body = {"model": "dlp:capitals", "prompt": prompt, "max_tokens": 2000, "stream": True}   # within the context
        with httpx.stream("POST", s.base_url + "/completions", json=body, timeout=60) as r:
            it = r.iter_lines()
            got = [next(it) for _ in range(3)]
            assert all(g.startswith("data: ") or g == "" for g in got)
        t0 = time.monotonic()
        while stats.cancelled < 1:                 # the engine stops the row at its next token
            assert time.monotonic() - t0 < 60, stats
            time.sleep(0.02)
        assert stats.running == 0 and stats.completion_tokens < 2000
        r = httpx.post(s.base_url + "/completions", json={"model": "dlp:capitals", "prompt": "hi", "max_tokens": 3},
                       timeout=60)
        assert r.status_code == 200


def test_api_key_is_enforced(serve_pipeline):
    app = create_app(serve_pipeline, ServeConfig(api_key="sekret"))
    with serving(app) as s:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekret"}):
            for method, path, body in (("GET", "/models", None),
                                       ("POST", "/completions", {"model": "dlp", "prompt": "x", "max_tokens": 2}),
                                       ("POST", "/load_lora_adapter", {"lora_name": "a", "lora_path": "/x"})):
                r = httpx.request(method, s.base_url + path, json=body, headers=headers, timeout=30)
                err = _assert_error(r, 401, "invalid_api_key")
                assert err["type"] == "authentication_error" and r.headers["www-authenticate"] == "Bearer"
        bad = openai.OpenAI(base_url=s.base_url, api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        good = openai.OpenAI(base_url=s.base_url, api_key="sekret", max_retries=0)
        assert good.completions.create(model="dlp:capitals", prompt="x", max_tokens=2).choices[0].text is not None
        assert httpx.get(s.url + "/health").status_code == 200   # health stays open for load balancers


# adapters loaded at run time (vLLM's dynamic LoRA endpoints) ------------------------------------------------------

def test_load_and_unload_lora_adapter(serve_run, serve_pipeline, tmp_path):
    app = create_app(serve_pipeline, ServeConfig(max_lora_rank=8, max_loaded_adapters=2,
                                                 adapter_roots=(str(serve_run), str(tmp_path))))
    with serving(app) as s:
        c = openai.OpenAI(base_url=s.base_url, api_key="x", max_retries=0)
        path = serve_run / "adapters" / "word_sorting"
        r = _post(s, "/load_lora_adapter", {"lora_name": "mysort", "lora_path": str(path)})
        assert r.status_code == 200 and r.json()["status"] == "loaded"
        assert "mysort" in [m.id for m in c.models.list().data]
        a = c.completions.create(model="mysort", prompt="Sort: b a c.", max_tokens=MAX)
        b = c.completions.create(model="dlp:word_sorting", prompt="Sort: b a c.", max_tokens=MAX)
        assert a.choices[0].text == b.choices[0].text            # same adapter, same greedy answer
        assert a.dlp_routing[0]["selected"] == ["mysort"]
        # refusals: name taken / reserved, not an adapter, rank above the limit, too many
        _assert_error(_post(s, "/load_lora_adapter", {"lora_name": "mysort", "lora_path": str(path)}), 400, "name_taken")
        _assert_error(_post(s, "/load_lora_adapter", {"lora_name": "capitals", "lora_path": str(path)}), 400,
                      "name_taken")
        _assert_error(_post(s, "/load_lora_adapter", {"lora_name": "x", "lora_path": str(tmp_path)}), 400,
                      "invalid_adapter", "lora_path")
        _assert_error(_post(s, "/load_lora_adapter", {"lora_name": "x"}), 400, None, "lora_path")
        with s.app.state.engine.lock:
            big = serve_pipeline.fused.export_mixture({"arithmetic": 0.5, "capitals": 0.5}, tmp_path / "mix16")
        _assert_error(_post(s, "/load_lora_adapter", {"lora_name": "m16", "lora_path": str(big)}), 400,
                      "rank_too_large", "lora_path", "rank 16")
        assert _post(s, "/load_lora_adapter", {"lora_name": "cap2", "lora_path": str(serve_run / "adapters" / "capitals")}
                     ).status_code == 200
        _assert_error(_post(s, "/load_lora_adapter", {"lora_name": "third", "lora_path": str(path)}), 400,
                      "too_many_adapters")
        assert c.completions.create(model="cap2", prompt="x y", max_tokens=4).choices[0].text == \
            c.completions.create(model="capitals", prompt="x y", max_tokens=4).choices[0].text
        assert _post(s, "/unload_lora_adapter", {"lora_name": "mysort"}).status_code == 200
        _assert_error(_post(s, "/unload_lora_adapter", {"lora_name": "mysort"}), 404, "model_not_found")
        with pytest.raises(openai.NotFoundError):
            c.completions.create(model="mysort", prompt="x", max_tokens=2)


# config and CLI ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw,needle", [({"port": 70000}, "port"), ({"port": 10 ** 30}, "port"),
                                       ({"max_batch": 0}, "max_batch"), ({"max_queue": 2 ** 70}, "max_queue"),
                                       ({"selection": {"top_p": 0.5}}, "selection"), ({"upstream": "ftp://x"}, "upstream"),
                                       ({"default_max_tokens": 600}, "default_max_tokens"),
                                       ({"batch_window_ms": -1}, "batch_window_ms"),
                                       ({"upstream_timeout_s": 0}, "upstream_timeout_s"),
                                       ({"mixture_mode": "public"}, "mixture_mode")])
def test_serve_config_is_validated(kw, needle):
    with pytest.raises(DLPError, match=needle):
        ServeConfig(**kw)


def test_serve_config_defaults_bind_loopback():
    c = ServeConfig()
    assert c.host == "127.0.0.1" and c.api_key == "" and c.max_batch > 1 and c.max_queue > 0
    assert c.selection == SelectionConfig() and c.upstream_timeout_s <= 30


def test_cli_serve_errors_are_one_line(cli, tmp_path):
    from conftest import assert_one_line_error

    assert_one_line_error(cli("serve", "--run", tmp_path / "missing", "--model", "tiny"), "run folder not found")
    assert_one_line_error(cli("serve", "--run", tmp_path, "--max-batch", "0"), "max_batch")
    assert_one_line_error(cli("serve", "--run", tmp_path, "--top-p", "2"), "--top-p")
    assert_one_line_error(cli("serve", "--run", tmp_path, "--upstream-timeout", "0"), "upstream_timeout_s")
    assert_one_line_error(cli("serve", "--run", tmp_path, "--mixture-mode", "public"), "mixture_mode")
    assert_one_line_error(cli("serve", "--run", tmp_path, "--scheduler", "fifo"), "scheduler", "continuous | static")
    assert_one_line_error(cli("serve", "--run", tmp_path, "--prefill-chunk", "0"), "prefill_chunk")
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert_one_line_error(cli("serve", "--run", tmp_path, "--model", "tiny", "--port", port),
                              f"--port {port}", "cannot listen")


def test_cli_serve_runs_a_real_server_on_the_runs_own_base_model(tiny_run):
    """`dlp-lora serve --run R` without --model, in a subprocess: loads the base model R's adapters were trained on
    (the tiny model, not the default one), answers an OpenAI request on the port it was given, then stops."""
    import os
    import signal
    import subprocess
    import sys

    from conftest import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "dlp_lora", "serve", "--run", str(tiny_run), "--port", str(port),
                             "--device", "cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        t0 = time.monotonic()
        while True:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() - t0 < 120
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        r = c.chat.completions.create(model="dlp", messages=[{"role": "user", "content": "What is 1 plus 1?"}],
                                      max_tokens=4)
        assert r.usage.completion_tokens <= 4 and r.dlp_routing
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).json()["scheduler"] == "continuous"
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
    assert f"http://127.0.0.1:{port}/v1" in out
    assert "Traceback" not in err


# every value range-checked at the door ------------------------------------------------------------------------------

HUGE = int("9" * 3000)       # an integer with thousands of digits (below Python's limit for parsing it)
RAW_SURROGATE = '{"model": "dlp", "prompt": "a \\ud800 b", "max_tokens": 2}'


@pytest.mark.parametrize("path,body,status,param", [
    ("/completions", {"model": "dlp", "prompt": "x", "temperature": 1, "seed": 2 ** 64}, 422, "seed"),
    ("/completions", {"model": "dlp", "prompt": "x", "temperature": 1, "seed": -1}, 422, "seed"),
    ("/completions", {"model": "dlp", "prompt": "x", "seed": HUGE}, 422, "seed"),
    ("/completions", {"model": "dlp", "prompt": "x", "dlp": {"weights": {"capitals": 1e308}}}, 422,
     "dlp.weights.capitals"),
    ("/completions", {"model": "dlp", "prompt": "x", "dlp": {"max_adapters": 10 ** 30}}, 422, "dlp.max_adapters"),
    ("/completions", {"model": "dlp", "prompt": "x", "dlp": {"top_p": HUGE}}, 422, "dlp.top_p"),
    ("/completions", {"model": "dlp", "prompt": "x", "dlp": {"granularity": "word"}}, 422, "dlp.granularity"),
    ("/completions", {"model": "dlp", "prompt": "x", "temperature": 10 ** 400}, 422, "temperature"),
    ("/completions", {"model": "dlp", "prompt": "x", "top_p": 10 ** 400}, 422, "top_p"),
    ("/completions", {"model": "dlp", "prompt": "x", "max_tokens": HUGE}, 400, "max_tokens"),
    ("/completions", {"model": "dlp", "prompt": "x", "n": HUGE}, 400, "n"),
    ("/completions", {"model": "dlp", "prompt": "x", "stop": ["s" * 300]}, 422, "stop"),
])
def test_out_of_range_values_are_refused_at_the_door(srv, path, body, status, param):
    r = _post(srv, path, content=json.dumps(body).encode(), headers={"content-type": "application/json"})
    err = _assert_error(r, status, param=param)
    assert len(err["message"]) < 300 and "\n" not in err["message"]


@pytest.mark.parametrize("raw,needle", [
    (RAW_SURROGATE, "field 'prompt': unpaired surrogate"),
    (json.dumps({"model": "dlp", "messages": [{"role": "user", "content": "hi \ud800"}]}),
     "field 'messages': item 0: field 'content': unpaired surrogate"),
    (json.dumps({"model": "dlp", "prompt": "x", "stop": ["\udfff"]}), "field 'stop': item 0: unpaired surrogate"),
    ('{"model": "dlp", "prompt": "x", "temperature": NaN}', "not a JSON number"),
    ('{"model": "dlp", "prompt": "x", "top_p": 1e400}', "not a JSON number"),
    ('{"model": "dlp", "prompt": "x", "seed": ' + "1" * 5000 + "}", "more than 4300 digits"),
    ("[" * 5000 + "]" * 5000, "nested too deeply"),
])
def test_bodies_no_engine_could_take_are_400(srv, raw, needle):
    # json.dumps writes a lone surrogate as the escape "\ud800" - exactly what an attacker sends
    r = _post(srv, "/completions", content=raw.encode(), headers={"content-type": "application/json"})
    _assert_error(r, 400, needle=needle)


def test_24_good_requests_and_one_poisoned_request_share_a_batch(serve_pipeline):
    """The poisoned request is refused with a 4xx; every one of the 24 others is answered 200 (every run)."""
    app = create_app(serve_pipeline, ServeConfig(max_batch=32, batch_window_ms=300, max_queue=64))
    poisons = [{"model": "dlp", "prompt": "p", "temperature": 1.0, "seed": 2 ** 64},
               {"model": "dlp", "prompt": "p", "dlp": {"weights": {"capitals": 1e308}}},
               {"model": "dlp", "prompt": "p \ud800", "max_tokens": 2}]
    with serving(app) as s:
        for poison in poisons:
            bodies = [{"model": ["dlp", "base", "dlp:capitals"][i % 3], "prompt": f"Question {i}: 2 plus {i}?",
                       "max_tokens": 3} for i in range(24)]
            bodies.insert(12, poison)
            barrier = threading.Barrier(len(bodies))

            def send(body):
                barrier.wait()
                return httpx.post(s.base_url + "/completions", content=json.dumps(body).encode(), timeout=120,
                                  headers={"content-type": "application/json"})

            with cf.ThreadPoolExecutor(len(bodies)) as ex:
                codes = [r.status_code for r in ex.map(send, bodies)]
            assert codes[:12] + codes[13:] == [200] * 24 and 400 <= codes[12] < 500, codes
    assert app.state.stats.errors == 0


def test_a_row_failing_inside_the_engine_fails_alone(serve_pipeline, monkeypatch, caplog):
    """Whatever still fails inside the engine fails only its own row: the batch is split and retried, the other
    rows get their exact answers (a streamed one without repeating text), the failing row a 500 logged as one
    line. (The static scheduler; the continuous one's join and step failures: test_scheduler.py.)"""
    app = create_app(serve_pipeline, ServeConfig(scheduler="static", max_batch=16, batch_window_ms=300))
    real = serve_pipeline.generate

    def fragile(prompts, *args, **kw):
        out = real(prompts, *args, **kw)       # streams every row's text, then fails like a poisoned row would
        if any("POISON" in p for p in prompts):
            raise RuntimeError("boom\nsecond line of a long traceback")
        return out

    prompts = [f"Sort: pear apple {i}." for i in range(7)] + ["POISON here."]
    with serving(app) as s:
        monkeypatch.setattr(serve_pipeline, "generate", fragile)
        barrier = threading.Barrier(len(prompts) + 1)

        def send(i):
            barrier.wait()
            body = {"model": "dlp:word_sorting", "prompt": prompts[i], "max_tokens": 8}
            return httpx.post(s.base_url + "/completions", json=body, timeout=120)

        def send_stream():
            barrier.wait()
            body = {"model": "dlp:word_sorting", "prompt": prompts[0], "max_tokens": 8, "stream": True}
            with httpx.stream("POST", s.base_url + "/completions", json=body, timeout=120) as r:
                return [json.loads(l[6:]) for l in r.iter_lines() if l.startswith("data: {")]

        with caplog.at_level("ERROR", logger="dlp_lora.serve"), cf.ThreadPoolExecutor(len(prompts) + 1) as ex:
            stream = ex.submit(send_stream)
            answers = list(ex.map(send, range(len(prompts))))
            events = stream.result()
        monkeypatch.setattr(serve_pipeline, "generate", real)
    with app.state.engine.lock:
        refs = [direct(serve_pipeline, p, chat=False, weights={"word_sorting": 1.0}, max_new_tokens=8).text
                for p in prompts[:7]]
    assert [a.status_code for a in answers] == [200] * 7 + [500]
    assert [a.json()["choices"][0]["text"] for a in answers[:7]] == refs
    assert "".join(e["choices"][0]["text"] for e in events if e.get("choices")) == refs[0]
    _assert_error(answers[7], 500, "generation_failed")
    assert app.state.stats.isolated >= 1 and app.state.stats.failed_rows == 1
    lines = [r.getMessage() for r in caplog.records if r.name == "dlp_lora.serve"]
    assert len(lines) == 1 and "RuntimeError: boom" in lines[0] and "\n" not in lines[0]


def test_an_unexpected_error_is_a_json_500_logged_as_one_line(serve_pipeline, monkeypatch, caplog):
    app = create_app(serve_pipeline, ServeConfig())
    with serving(app) as s:
        monkeypatch.setattr(app.state.server, "parse", lambda body, kind: 1 / 0)
        with caplog.at_level("ERROR"):
            r = httpx.post(s.base_url + "/completions", json={"model": "dlp", "prompt": "x"}, timeout=30)
        _assert_error(r, 500, "internal_error")
    lines = [r.getMessage() for r in caplog.records if "ZeroDivisionError" in r.getMessage()]
    assert len(lines) == 1 and "\n" not in lines[0]
    assert not any(r.exc_info for r in caplog.records)


# the server's edges -------------------------------------------------------------------------------------------------

def test_openapi_schema_and_docs_need_the_api_key(serve_pipeline):
    with serving(create_app(serve_pipeline, ServeConfig(api_key="sekret"))) as s:
        for path in ("/openapi.json", "/docs", "/v1/nothing"):
            _assert_error(httpx.get(s.url + path, timeout=30), 401, "invalid_api_key")
        r = httpx.get(s.url + "/openapi.json", headers={"Authorization": "Bearer sekret"}, timeout=30)
        assert r.status_code == 200 and "/v1/chat/completions" in r.json()["paths"]
    with serving(create_app(serve_pipeline, ServeConfig())) as s:     # no key set: the schema is public
        assert httpx.get(s.url + "/openapi.json", timeout=30).status_code == 200


def test_load_lora_adapter_reads_only_below_the_adapter_roots(serve_run, serve_pipeline, tmp_path):
    outside = tmp_path / "outside"
    with serving(create_app(serve_pipeline, ServeConfig(max_loaded_adapters=4))) as s:   # default root: the run's
        (serve_run / "adapters" / "link_out").symlink_to(tmp_path)
        try:
            answers = [_post(s, "/load_lora_adapter", {"lora_name": "x", "lora_path": p})
                       for p in ("/etc", "/nonexistent", str(outside), str(serve_run / "adapters" / "link_out"),
                                 str(serve_run / "adapters" / ".." / ".." / "etc"), "/etc/passwd\x00")]
        finally:
            (serve_run / "adapters" / "link_out").unlink()
        first = _assert_error(answers[0], 400, "path_not_allowed", "lora_path")
        for r in answers[1:]:       # the same answer whether the path exists or not: nothing leaks
            assert r.status_code == 400 and r.json()["error"] == first
        inside = _post(s, "/load_lora_adapter", {"lora_name": "mine", "lora_path": str(serve_run / "adapters" / "capitals")})
        assert inside.status_code == 200 and inside.json()["lora_path"].startswith(str(serve_run.resolve()))


def _raw_http(port: int, data: bytes) -> tuple[int | None, dict, bytes]:
    """(status, headers, body) of a raw request; status None when the server reset the connection."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            resp = b""
            while chunk := sock.recv(65536):
                resp += chunk
        except ConnectionResetError:
            return None, {}, b""
    head, _, body = resp.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (l.partition(":") for l in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def test_malformed_http_gets_a_json_400_never_plain_text(srv):
    neg = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: -5\r\n\r\n"
    status, headers, body = _raw_http(srv.port, neg)
    assert status == 400 and headers["content-type"] == "application/json", (status, headers, body)
    assert json.loads(body)["error"]["code"] == "invalid_request"
    big = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n"
    status, headers, body = _raw_http(srv.port, big)
    assert status is None or (status in (400, 431) and headers["content-type"] == "application/json"), body
    garbage = b"\x16\x03\x01 not http at all\r\n\r\n"
    status, headers, body = _raw_http(srv.port, garbage)
    assert status == 400 and json.loads(body)["error"]["message"]
    assert httpx.get(srv.url + "/health", timeout=30).status_code == 200      # still serving


def test_prompt_plus_max_tokens_beyond_the_models_context_is_refused(serve_pipeline):
    ctx = serve_pipeline.model.config.max_position_embeddings
    app = create_app(serve_pipeline, ServeConfig(max_tokens_cap=ctx + 10, max_prompt_tokens=ctx + 10,
                                                 max_body_bytes=10 ** 7))
    with serving(app) as s:
        r = _post(s, "/completions", {"model": "base", "prompt": "x", "max_tokens": ctx})
        _assert_error(r, 400, "context_length_exceeded", "prompt", f"context of {ctx} tokens")
