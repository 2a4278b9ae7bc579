"""Property-based fuzzing (hypothesis) of the user-facing parsers and the math entry points.

Property everywhere: a valid result, or the documented one-line :class:`DLPError` (HTTP: a 4xx JSON error) —
never another exception, never a 5xx. Examples are bounded so that each test takes seconds.
"""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dlp_lora.config import DLPError
from dlp_lora.selection import SelectionConfig

FAST = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
SLOWER = settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)

_json_scalars = st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12)
JSON = st.recursive(_json_scalars, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids,
                                                                                            max_size=4), max_leaves=12)
_keys = st.sampled_from(["Q", "A", "input", "output", "question", "answer", "choices", "task", "metric", "data", "x"])
_values = st.one_of(st.text(max_size=10), st.sampled_from(["", " ", "ok", "A", "B", "accuracy", "exact", "t_1", "a b"]),
                    st.lists(st.text(max_size=4), max_size=3), st.none(), st.integers(-3, 3), st.booleans())
RECORD = st.dictionaries(_keys, _values, max_size=5)
TASKISH = st.one_of(st.lists(RECORD, max_size=4),
                    st.fixed_dictionaries({"data": st.lists(RECORD, max_size=3)},
                                          optional={"task": _values, "metric": _values, "choices": _values}))
_counter = itertools.count()


def _one_line(e: Exception) -> str:
    msg = str(e)
    assert msg and "\n" not in msg, repr(msg)
    return msg


# ---------------------------------------------------------------------------------------------------------------
# 1. the task data reader
# ---------------------------------------------------------------------------------------------------------------

def _check_read(path):
    from dlp_lora.data import TaskData, read_task

    try:
        t = read_task(path)
    except DLPError as e:
        assert path.name in _one_line(e) or str(path) in str(e), str(e)
        return None
    assert isinstance(t, TaskData) and t.records
    for r in t.records:
        assert isinstance(r.question, str) and r.question.strip() and isinstance(r.answer, str) and r.answer.strip()
    return t


@FAST
@given(value=st.one_of(JSON, TASKISH), suffix=st.sampled_from([".json", ".jsonl"]))
def test_data_reader_json_values(value, suffix, tmp_path_factory):
    d = tmp_path_factory.mktemp("fz", numbered=True) if next(_counter) % 50 == 0 else tmp_path_factory.getbasetemp()
    path = d / f"fuzz_{next(_counter)}{suffix}"
    if suffix == ".jsonl" and isinstance(value, list):
        path.write_text("\n".join(json.dumps(v) for v in value) + "\n")
    else:
        path.write_text(json.dumps(value))
    _check_read(path)


@FAST
@given(data=st.binary(max_size=200) | st.text(max_size=200).map(lambda s: s.encode("utf-8", "surrogatepass")),
       suffix=st.sampled_from([".json", ".jsonl"]))
def test_data_reader_bytes(data, suffix, tmp_path_factory):
    path = tmp_path_factory.getbasetemp() / f"fuzz_b{next(_counter)}{suffix}"
    path.write_bytes(data)
    _check_read(path)


# ---------------------------------------------------------------------------------------------------------------
# 2. select_top_p
# ---------------------------------------------------------------------------------------------------------------

_prob_rows = st.integers(1, 6).flatmap(lambda n: st.lists(
    st.lists(st.floats(0, 1, allow_nan=False), min_size=n, max_size=n).map(
        lambda r: [x / sum(r) for x in r] if sum(r) > 0 else [1.0 / len(r)] * len(r)), min_size=1, max_size=5))
_raw_rows = st.lists(st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), min_size=1, max_size=4),
                     min_size=1, max_size=3)
_top_p = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([0.0, 1e-9, 0.5, 0.8, 1.0, 1.0000001, -1]) \
    | st.integers(-2, 2) | st.just(True) | st.text(max_size=3)


@FAST
@given(probs=st.one_of(_prob_rows, _raw_rows), top_p=_top_p,
       weighting=st.sampled_from(["paper", "renorm", "softmax", "", None]),
       max_adapters=st.one_of(st.none(), st.integers(-2, 6), st.just(1.5)),
       min_confidence=st.one_of(st.none(), st.floats(-0.5, 1.5), st.just(float("nan"))))
def test_select_top_p(probs, top_p, weighting, max_adapters, min_confidence):
    from dlp_lora.router import select_top_p

    try:
        p = torch.tensor(probs, dtype=torch.float32)
    except (ValueError, TypeError):       # ragged rows: not a matrix at all
        p = probs
    try:
        w = select_top_p(p, top_p, weighting=weighting, max_adapters=max_adapters, min_confidence=min_confidence)
    except DLPError as e:
        _one_line(e)
        return
    assert w.shape == p.shape and w.dtype == torch.float32
    assert bool(torch.isfinite(w).all()) and bool((w >= 0).all())
    sums = w.sum(-1)
    assert bool((((sums - 1).abs() < 1e-5) | (sums == 0)).all())
    for row_w, row_p in zip(w, p):
        kept = int((row_w > 0).sum())
        if kept == 0:
            assert min_confidence and float(row_p.max()) < min_confidence
            continue
        assert int(row_w.argmax()) in set(torch.nonzero(row_p == row_p.max()).flatten().tolist())
        assert all(float(row_p[i]) > 0 or i == int(row_p.argmax()) for i in torch.nonzero(row_w).flatten().tolist())
        if max_adapters:
            assert kept <= max_adapters
        # the kept tasks reach top_p (or every task with non-zero probability is kept, or the cap bit)
        mass = float(row_p[row_w > 0].sum())
        assert mass >= float(top_p) - 1e-4 or kept == int((row_p > 0).sum()) or (max_adapters and kept == max_adapters)


# ---------------------------------------------------------------------------------------------------------------
# 3. mixture weights: fused.set_weights / weights_vector / pipeline weights
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fuzz_pipeline(tiny_run, tiny_model_path):
    from dlp_lora.pipeline import DLPPipeline

    return DLPPipeline.from_run(tiny_run, model=tiny_model_path, device="cpu", dtype="fp32")


_weight_vals = st.floats(allow_nan=True, allow_infinity=True, width=32) | st.sampled_from([0.0, 0.5, 1.0, -1.0])
_weights = st.one_of(
    st.lists(st.lists(_weight_vals, min_size=0, max_size=4), min_size=0, max_size=3),               # (B, N?) lists
    st.lists(st.lists(st.lists(_weight_vals, min_size=3, max_size=3), min_size=1, max_size=3), min_size=1, max_size=2),
    st.lists(_weight_vals, max_size=4),
    st.text(max_size=5), st.none(), st.integers())


@SLOWER
@given(weights=_weights)
def test_fused_set_weights(fuzz_pipeline, weights):
    pipe = fuzz_pipeline
    try:
        pipe.fused.set_weights(weights)
    except DLPError as e:
        _one_line(e)
        return
    finally:
        pass
    try:
        w = torch.as_tensor(weights, dtype=torch.float32)
        assert w.shape[-1] == len(pipe.names) and bool(torch.isfinite(w).all()) and bool((w >= 0).all()), \
            f"accepted invalid weights {weights!r}"
        ids = torch.ones(w.shape[0], w.shape[1] if w.dim() == 3 else 3, dtype=torch.long)
        with torch.no_grad():
            out = pipe.model(input_ids=ids).logits
        assert bool(torch.isfinite(out).all())
    finally:
        pipe.fused.clear_weights()


_mapping = st.dictionaries(st.sampled_from(["arithmetic", "capitals", "word_sorting", "poetry", "", "Arithmetic"]),
                           _weight_vals | st.text(max_size=3) | st.none() | st.booleans(), max_size=4)


@SLOWER
@given(mapping=_mapping)
def test_weights_vector(fuzz_pipeline, mapping):
    fused = fuzz_pipeline.fused
    try:
        w = fused.weights_vector(mapping)
    except DLPError as e:
        _one_line(e)
        return
    assert w.shape == (len(fused.names),) and bool(torch.isfinite(w).all()) and bool((w >= 0).all())
    assert set(mapping) <= set(fused.names)


@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(weights=st.one_of(_mapping, st.lists(st.one_of(st.none(), _mapping), min_size=0, max_size=3),
                         st.lists(st.lists(_weight_vals, min_size=3, max_size=3), min_size=1, max_size=3)))
def test_pipeline_forced_weights(fuzz_pipeline, weights):
    pipe = fuzz_pipeline
    if isinstance(weights, list) and weights and isinstance(weights[0], list):
        weights = torch.tensor(weights, dtype=torch.float32)
    prompts = ["2+2?", "Capital of France?"]
    try:
        res = pipe.generate(prompts, SelectionConfig(granularity="prompt"), weights=weights, max_new_tokens=1)
    except DLPError as e:
        _one_line(e)
        return
    assert len(res) == 2 and all(isinstance(r.text, str) for r in res)
    for r in res:
        for e in r.routing:
            assert all(w >= 0 and math.isfinite(w) for w in e["weights"])


# ---------------------------------------------------------------------------------------------------------------
# 4. the HTTP request schema
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fuzz_client(fuzz_pipeline):
    from fastapi.testclient import TestClient

    from dlp_lora.serve import ServeConfig, create_app

    cfg = ServeConfig(max_tokens_cap=3, default_max_tokens=2, max_prompt_tokens=256, batch_window_ms=0)
    with TestClient(create_app(fuzz_pipeline, cfg), raise_server_exceptions=False) as c:
        yield c


_msg = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "wizard", 3]),
                              "content": st.one_of(st.text(max_size=20), st.integers(), st.none(),
                                                   st.lists(st.fixed_dictionaries({"type": st.just("text"),
                                                                                   "text": st.text(max_size=5)}),
                                                            max_size=2))})
_field_values = {
    "model": st.sampled_from(["dlp", "base", "dlp:arithmetic", "capitals", "gpt-4", "", 7, None]),
    "messages": st.one_of(st.lists(_msg, max_size=3), JSON),
    "prompt": st.one_of(st.text(max_size=20), st.lists(st.text(max_size=5), max_size=2), st.integers()),
    "max_tokens": st.one_of(st.integers(-2, 5), st.floats(allow_nan=False), st.text(max_size=2), st.none()),
    "temperature": st.one_of(st.floats(-1, 3), st.text(max_size=2), st.none()),
    "top_p": st.one_of(st.floats(-0.5, 1.5), st.none()),
    "n": st.integers(-1, 3), "stream": st.one_of(st.booleans(), st.text(max_size=2)),
    "stop": st.one_of(st.text(max_size=3), st.lists(st.text(max_size=3), max_size=5), st.integers()),
    "seed": st.one_of(st.integers(-5, 5), st.text(max_size=2)),
    "dlp": st.one_of(JSON, st.fixed_dictionaries({}, optional={
        "top_p": st.floats(-1, 2), "weighting": st.sampled_from(["paper", "renorm", "x"]),
        "weights": st.dictionaries(st.sampled_from(["arithmetic", "capitals", "poetry"]), _weight_vals, max_size=3),
        "granularity": st.sampled_from(["prompt", "sentence", "token"]), "max_adapters": st.integers(-1, 4)})),
}
BODY = st.one_of(JSON, st.fixed_dictionaries({}, optional=_field_values))


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(body=BODY, path=st.sampled_from(["/v1/chat/completions", "/v1/completions"]))
def test_http_schema(fuzz_client, body, path):
    r = fuzz_client.post(path, json=body)
    assert r.status_code < 500, (r.status_code, r.text[:300], body)
    if r.status_code >= 400:
        err = r.json()["error"]
        assert isinstance(err["message"], str) and "\n" not in err["message"] and err["type"]
    elif r.headers["content-type"].startswith("application/json"):
        assert r.json()["choices"]
    else:
        assert "data:" in r.text


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(raw=st.binary(max_size=64))
def test_http_raw_bytes(fuzz_client, raw):
    r = fuzz_client.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert 400 <= r.status_code < 500 or r.status_code == 200, (r.status_code, r.text[:200])
    if r.status_code >= 400:
        assert "\n" not in r.json()["error"]["message"]
