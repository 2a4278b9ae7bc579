"""``dlp-lora serve --upstream``: the router runs in the proxy, generation runs on an OpenAI-compatible LoRA
server. The upstream here is our own server (it speaks vLLM's /v1/load_lora_adapter), so the whole path - route,
export the mixture, register it upstream, reuse it from the cache - runs without a GPU; a scripted fake upstream
sends what a broken or hostile one could."""

from __future__ import annotations

import asyncio
import json
import shlex
import stat
import time

import httpx
import openai
import pytest

from conftest import free_port
from helpers_server import TASKS, serve_pipeline, serve_run, serving  # noqa: F401 (fixtures)

from dlp_lora.serve import ServeConfig, create_app
from dlp_lora.serve.proxy import UpstreamProxy, mixture_key, mixture_name, simulate_cache, vllm_command

MAX = 12


@pytest.fixture(scope="module")
def proxy_pipeline(serve_run):
    """The proxy's own pipeline (router + fused adapters, used for routing and exporting only)."""
    from dlp_lora.pipeline import DLPPipeline

    return DLPPipeline.from_run(serve_run, device="cpu", dtype="fp32")


def readable_roots(tmp_path_factory) -> tuple[str, ...]:
    """Where an upstream may load the proxy's mixtures from: the test folders and the system temp folder (a
    proxy without --mixture-dir exports there)."""
    import tempfile

    return (str(tmp_path_factory.getbasetemp()), tempfile.gettempdir())


@pytest.fixture(scope="module")
def upstream(serve_pipeline, tmp_path_factory):
    app = create_app(serve_pipeline, ServeConfig(max_loaded_adapters=8, adapter_roots=readable_roots(tmp_path_factory)))
    with serving(app) as s:
        yield s


@pytest.fixture(scope="module")
def proxy(proxy_pipeline, upstream, tmp_path_factory):
    cfg = ServeConfig(upstream=upstream.url, mixture_cache=2, mixture_dir=str(tmp_path_factory.mktemp("mixtures")))
    with serving(create_app(proxy_pipeline, cfg)) as s:
        yield s


@pytest.fixture(scope="module")
def client(proxy):
    return openai.OpenAI(base_url=proxy.base_url, api_key="x", max_retries=0, timeout=60)


def engine(upstream):
    return upstream.app.state.engine


def reference(upstream, pipe, prompt, weights, chat=False, max_new_tokens=MAX):
    """The direct fused engine's greedy answer for a mixture (weights dict, {} = base)."""
    with engine(upstream).lock:
        return pipe.generate([prompt], chat=chat, weights=[weights], max_new_tokens=max_new_tokens)[0]


def test_top1_routes_use_the_task_adapter_by_name(client, proxy, upstream, serve_pipeline):
    r = client.completions.create(model="dlp:capitals", prompt="The capital of Chile is", max_tokens=MAX)
    assert r.dlp_upstream["kind"] == "top1" and r.dlp_upstream["model"] == "capitals"
    assert r.model == "dlp:capitals"
    assert r.choices[0].text == reference(upstream, serve_pipeline, "The capital of Chile is", {"capitals": 1.0}).text
    # a routed request with a small router top-p keeps exactly one adapter: top-1, no export
    r = client.chat.completions.create(model="dlp", messages=[{"role": "user", "content": "What is 8 plus 9?"}],
                                       max_tokens=MAX, extra_body={"dlp": {"top_p": 0.01}})
    e = r.dlp_routing[0]
    assert len(e["selected"]) == 1 and e["weights"] == [1.0] and set(e["probs"]) == set(TASKS)
    assert r.dlp_upstream == {"url": upstream.url, "model": e["selected"][0], "kind": "top1", "mixture_cache": None}
    ref = reference(upstream, serve_pipeline, "What is 8 plus 9?", {e["selected"][0]: 1.0}, chat=True)
    assert r.choices[0].message.content == ref.text
    assert r.usage.completion_tokens == ref.completion_tokens


def test_base_model_is_discovered_upstream(client, upstream, serve_pipeline):
    r = client.completions.create(model="base", prompt="Hello there", max_tokens=MAX)
    assert r.dlp_upstream["kind"] == "base" and r.dlp_upstream["model"] == "base"
    assert r.choices[0].text == reference(upstream, serve_pipeline, "Hello there", {}).text


def test_mixture_is_exported_loaded_and_reused_from_the_cache(client, proxy, upstream, serve_pipeline):
    mix = {"arithmetic": 0.6, "word_sorting": 0.4}
    prompt = "Sort these words: kiwi apple."
    first = client.completions.create(model="dlp", prompt=prompt, max_tokens=MAX, extra_body={"dlp": {"weights": mix}})
    name = first.dlp_upstream["model"]
    assert first.dlp_upstream["kind"] == "mixture" and first.dlp_upstream["mixture_cache"] == "miss"
    assert name == mixture_name(mixture_key([0.6, 0.0, 0.4], 2)) and name in engine(upstream).loaded
    with open(engine(upstream).loaded[name]["path"] + "/dlp_mixture.json") as f:
        exported = json.load(f)
    assert exported["mixture"] == pytest.approx(mix) and engine(upstream).loaded[name]["rank"] == 16
    loads = proxy.app.state.proxy.counters["loads"]
    second = client.completions.create(model="dlp", prompt=prompt, max_tokens=MAX, extra_body={"dlp": {"weights": mix}})
    assert second.dlp_upstream == {**first.dlp_upstream, "mixture_cache": "hit"}
    assert proxy.app.state.proxy.counters["loads"] == loads          # reused: no second export or load
    # the upstream serving the exported rank-16 PEFT adapter == the fused engine mixing the two adapters
    ref = reference(upstream, serve_pipeline, prompt, mix)
    assert first.choices[0].text == second.choices[0].text == ref.text
    health = httpx.get(proxy.url + "/health").json()
    assert health["mode"] == "proxy" and name in health["upstream"]["mixtures_loaded"]


def test_routed_mixture_through_the_proxy_equals_the_direct_fused_engine(client, upstream, serve_pipeline):
    """route -> export -> load upstream -> generate == the fused engine, same mixture, greedy."""
    for prompt in ["What is 12 plus 30?", "Name the capital of Spain and sort: b a."]:
        r = client.chat.completions.create(model="dlp", messages=[{"role": "user", "content": prompt}],
                                           max_tokens=MAX, extra_body={"dlp": {"top_p": 1.0, "weighting": "renorm"}})
        e = r.dlp_routing[0]
        assert len(e["selected"]) >= 2 and r.dlp_upstream["kind"] == "mixture"
        assert e["sentence"] == prompt and sum(e["weights"]) == pytest.approx(1.0, abs=0.02)
        # the weights served are the router's, rounded to 2 decimals (the cache key)
        for t, w in zip(e["selected"], e["weights"]):
            assert w == pytest.approx(e["probs"][t], abs=0.005 + 1e-6)
        served = dict(zip(e["selected"], e["weights"]))
        ref = reference(upstream, serve_pipeline, prompt, served, chat=True)
        assert r.choices[0].message.content == ref.text


def test_streaming_through_the_proxy(client, upstream, serve_pipeline):
    mix = {"capitals": 0.5, "word_sorting": 0.5}
    chunks = list(client.chat.completions.create(model="dlp", messages=[{"role": "user", "content": "Paris?"}],
                                                 max_tokens=MAX, stream=True, extra_body={"dlp": {"weights": mix}}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reference(upstream, serve_pipeline, "Paris?", mix, chat=True).text
    assert all(c.model == "dlp" for c in chunks)
    final = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(final) == 1 and final[0].dlp_routing[0]["selected"] == ["capitals", "word_sorting"]
    assert final[0].dlp_upstream["kind"] == "mixture"


def test_lru_evicts_and_unloads_upstream(client, proxy, upstream):
    p = proxy.app.state.proxy
    names = []
    for w in (0.1, 0.2, 0.3, 0.4):        # cache size 2: the oldest mixtures are unloaded upstream
        r = client.completions.create(model="dlp", prompt="x", max_tokens=2,
                                      extra_body={"dlp": {"weights": {"arithmetic": w, "capitals": 1 - w}}})
        names.append(r.dlp_upstream["model"])
    assert len(set(names)) == 4 and len(p.cache) == 2
    assert list(p.cache.values()) == names[-2:]
    loaded = set(engine(upstream).loaded)
    assert set(names[-2:]) <= loaded and not (set(names[:2]) & loaded)
    assert not (p.mixture_dir / names[0]).exists() and (p.mixture_dir / names[-1]).exists()


def test_upstream_down_is_a_502_json_error(proxy_pipeline):
    cfg = ServeConfig(upstream=f"http://127.0.0.1:{free_port()}", upstream_timeout_s=10)
    with serving(create_app(proxy_pipeline, cfg)) as s:
        for body in ({"model": "dlp:capitals", "prompt": "x", "max_tokens": 2},
                     {"model": "dlp", "prompt": "x", "max_tokens": 2, "dlp": {"weights": {"capitals": 0.5,
                                                                                         "arithmetic": 0.5}}},
                     {"model": "base", "prompt": "x", "max_tokens": 2},
                     {"model": "dlp:capitals", "prompt": "x", "max_tokens": 2, "stream": True}):
            r = httpx.post(s.base_url + "/completions", json=body, timeout=30)
            assert r.status_code == 502, r.text
            err = r.json()["error"]
            assert err["code"] == "upstream_unreachable" and err["type"] == "upstream_error"
            assert "unreachable" in err["message"] and cfg.upstream in err["message"]
        c = openai.OpenAI(base_url=s.base_url, api_key="x", max_retries=0)
        with pytest.raises(openai.InternalServerError):
            c.completions.create(model="dlp:capitals", prompt="x", max_tokens=2)
        # request validation still happens locally
        assert httpx.post(s.base_url + "/completions", json={"model": "nope", "prompt": "x"}).status_code == 404


def test_upstream_refusing_the_adapter_is_a_clear_error(proxy_pipeline, serve_pipeline, tmp_path, tmp_path_factory):
    # like vLLM started with --max-lora-rank 8: rank-8 task adapters work, a rank-16 mixture is refused
    up = create_app(serve_pipeline, ServeConfig(max_lora_rank=8, adapter_roots=readable_roots(tmp_path_factory)))
    with serving(up) as u:
        with serving(create_app(proxy_pipeline, ServeConfig(upstream=u.base_url, mixture_dir=str(tmp_path)))) as s:
            ok = httpx.post(s.base_url + "/completions", json={"model": "dlp:capitals", "prompt": "x", "max_tokens": 2})
            assert ok.status_code == 200
            r = httpx.post(s.base_url + "/completions", timeout=30, json={
                "model": "dlp", "prompt": "x", "max_tokens": 2,
                "dlp": {"weights": {"capitals": 0.5, "arithmetic": 0.5}}})
            assert r.status_code == 502
            err = r.json()["error"]
            assert err["code"] == "adapter_refused"
            for needle in ("refused mixture adapter", "arithmetic=0.5", "capitals=0.5", "rank 16",
                           "/v1/load_lora_adapter", "HTTP 400", "max_lora_rank 8"):
                assert needle in err["message"], err["message"]
            assert not list(tmp_path.iterdir())          # the refused export is not left behind
            assert s.app.state.proxy.cache == {}


def test_proxy_mode_refuses_local_adapter_loading(proxy):
    r = httpx.post(proxy.base_url + "/load_lora_adapter", json={"lora_name": "a", "lora_path": "/x"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "unsupported_in_proxy_mode"


def test_mixture_cache_key_and_simulation():
    assert mixture_key([0.574, 0.426, 0.0], 2) == (0.57, 0.43, 0.0)
    assert mixture_name((0.57, 0.43, 0.0)) == mixture_name((0.57, 0.43, 0.0)) != mixture_name((0.43, 0.57, 0.0))
    rows = [[1, 0, 0], [0.5, 0.5, 0], [0.5, 0.5, 0], [0, 0.5, 0.5], [0.501, 0.499, 0], [0, 0, 0]]
    sim = simulate_cache(rows, cache_size=1)
    assert sim["top1"] == 1 and sim["base"] == 1 and sim["mixtures"] == 4
    # (0.5,0.5) miss, hit, (0,.5,.5) miss evicts it, (0.5,0.5) again after rounding: miss
    assert (sim["hits"], sim["misses"], sim["distinct_mixtures"]) == (1, 3, 2)
    assert simulate_cache(rows, cache_size=4)["hits"] == 2
    with pytest.raises(Exception):
        UpstreamProxy(type("P", (), {"names": ["a"]})(), "http://x", cache_size=0)


def test_vllm_command_names_every_adapter_with_a_rank_for_the_largest_mixture(serve_run, tiny_model_path, cli):
    cmd = vllm_command(serve_run, model="HuggingFaceTB/SmolLM2-135M-Instruct", max_adapters=2, mixture_cache=16)
    assert cmd.startswith("VLLM_ALLOW_RUNTIME_LORA_UPDATING=True vllm serve HuggingFaceTB/SmolLM2-135M-Instruct")
    assert "--enable-lora" in cmd and "--max-lora-rank 16 " in cmd + " "     # 2 adapters x rank 8
    assert "--max-cpu-loras 19" in cmd                                      # 3 tasks + 16 cached mixtures
    for t in TASKS:
        assert f"{t}={(serve_run / 'adapters' / t).resolve()}" in cmd
    assert "--max-lora-rank 32" in vllm_command(serve_run)                  # uncapped: 3 x 8 = 24 -> 32
    res = cli("serve", "--run", serve_run, "--print-vllm-command", "--max-adapters", "2")
    # without --vllm-model: the base model the run's adapters were trained on
    assert res.code == 0 and f"vllm serve {shlex.quote(str(tiny_model_path))}" in res.out


def test_client_leaving_a_proxied_stream_frees_the_upstream_slot(client, proxy, upstream):
    p = proxy.app.state.proxy
    up_stats = upstream.app.state.stats
    cancelled = up_stats.cancelled
    body = {"model": "dlp", "prompt": "Tell me a long story.", "max_tokens": 500, "stream": True,
            "dlp": {"weights": {"capitals": 0.7, "word_sorting": 0.3}}}
    with httpx.stream("POST", proxy.base_url + "/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        it = r.iter_lines()
        assert [next(it) for _ in range(3)]
        assert p.inflight == 1 and sum(p._inuse.values()) == 1     # the mixture cannot be evicted meanwhile
    t0 = time.monotonic()
    while p.inflight or p._inuse or up_stats.cancelled == cancelled:
        assert time.monotonic() - t0 < 60, (p.inflight, dict(p._inuse), up_stats)
        time.sleep(0.02)
    assert up_stats.running == 0


def test_a_mixture_lost_upstream_is_loaded_again(client, proxy, upstream):
    """The upstream restarted or someone unloaded the mixture: the proxy notices the 404, reloads, answers."""
    mix = {"arithmetic": 0.25, "word_sorting": 0.75}
    first = client.completions.create(model="dlp", prompt="abc", max_tokens=4, extra_body={"dlp": {"weights": mix}})
    name = first.dlp_upstream["model"]
    assert httpx.post(upstream.base_url + "/unload_lora_adapter", json={"lora_name": name}).status_code == 200
    for stream in (False, True):
        if stream:
            httpx.post(upstream.base_url + "/unload_lora_adapter", json={"lora_name": name})
            chunks = list(client.completions.create(model="dlp", prompt="abc", max_tokens=4, stream=True,
                                                    extra_body={"dlp": {"weights": mix}}))
            assert "".join(c.choices[0].text for c in chunks) == first.choices[0].text
        else:
            again = client.completions.create(model="dlp", prompt="abc", max_tokens=4,
                                              extra_body={"dlp": {"weights": mix}})
            assert again.choices[0].text == first.choices[0].text
            assert again.dlp_upstream["mixture_cache"] == "miss"
        assert name in engine(upstream).loaded
    assert proxy.app.state.proxy.counters["mixtures_lost_upstream"] == 2


def test_proxy_shutdown_unloads_its_mixtures_upstream(proxy_pipeline, upstream):
    with serving(create_app(proxy_pipeline, ServeConfig(upstream=upstream.url))) as s:
        r = httpx.post(s.base_url + "/completions", timeout=60, json={
            "model": "dlp", "prompt": "x", "max_tokens": 2, "dlp": {"weights": {"capitals": 0.85, "arithmetic": 0.15}}})
        name = r.json()["dlp_upstream"]["model"]
        mixture_dir = s.app.state.proxy.mixture_dir
        assert name in engine(upstream).loaded and (mixture_dir / name).is_dir()
    assert name not in engine(upstream).loaded and not mixture_dir.exists()


# an upstream that cannot be trusted ---------------------------------------------------------------------------------

GOOD = {"id": "x", "object": "text_completion", "choices": [{"index": 0, "text": "ok", "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
GOOD_CHUNK = "data: " + json.dumps({"id": "x", "object": "text_completion",
                                    "choices": [{"index": 0, "text": "o", "finish_reason": None}]}) + "\n\n"


def fake_upstream(script: dict):
    """An OpenAI-shaped upstream that answers generation requests as ``script["mode"]`` says (and counts the
    answers it finished in ``script["finished"]``)."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    bodies = {"array": "[1, 2]", "null": "null", "empty": "{}", "no_choices": '{"id": "x"}',
              "bad_choices": '{"choices": [1]}', "nan": '{"choices": [{"text": NaN}]}', "html": "<html>oops</html>",
              "json_instead": json.dumps(GOOD)}
    chunks = {"bad_chunk": [GOOD_CHUNK, "data: {not json\n\n"], "no_done": [GOOD_CHUNK],
              "chunk_array": [GOOD_CHUNK, "data: [1, 2]\n\n"],
              "error_event": [GOOD_CHUNK, 'data: {"error": {"message": "kaboom"}}\n\n']}

    async def generate(request):
        mode = script["mode"]
        if mode == "slow":
            await asyncio.sleep(script["delay"])
            script["finished"] += 1
            return JSONResponse(GOOD)
        if mode in chunks:
            async def events():
                for c in chunks[mode]:
                    yield c.encode()
            return StreamingResponse(events(), media_type="text/event-stream")
        return Response(bodies[mode], media_type="text/html" if mode == "html" else "application/json")

    async def models(request):
        return JSONResponse({"object": "list", "data": [{"id": "fake-base", "object": "model"}]})

    return Starlette(routes=[Route("/v1/models", models), Route("/v1/completions", generate, methods=["POST"]),
                             Route("/v1/chat/completions", generate, methods=["POST"])])


@pytest.fixture(scope="module")
def scripted(proxy_pipeline):
    """(script, proxy served in front of the fake upstream)."""
    script = {"mode": "array", "delay": 0.0, "finished": 0}
    with serving(fake_upstream(script)) as up:
        with serving(create_app(proxy_pipeline, ServeConfig(upstream=up.url, upstream_timeout_s=2))) as s:
            yield script, s


@pytest.mark.parametrize("mode", ["array", "null", "empty", "no_choices", "bad_choices", "nan", "html"])
def test_an_answer_that_is_not_a_completion_is_a_clean_502(scripted, mode):
    script, s = scripted
    script["mode"] = mode
    r = httpx.post(s.base_url + "/completions", json={"model": "base", "prompt": "x", "max_tokens": 2}, timeout=30)
    assert r.status_code == 502 and r.headers["content-type"] == "application/json", r.text
    err = r.json()["error"]
    assert err["code"] == "upstream_bad_response" and s.app.state.proxy.url in err["message"]
    assert "\n" not in err["message"] and s.app.state.proxy.inflight == 0


def test_a_non_sse_answer_to_a_stream_is_a_clean_502(scripted):
    script, s = scripted
    script["mode"] = "json_instead"
    body = {"model": "base", "prompt": "x", "max_tokens": 2, "stream": True}
    r = httpx.post(s.base_url + "/completions", json=body, timeout=30)
    assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_bad_response"
    assert "not server-sent events" in r.json()["error"]["message"]


@pytest.mark.parametrize("mode,needle", [("bad_chunk", "not valid JSON"), ("no_done", "without data: [DONE]"),
                                         ("chunk_array", "not an OpenAI completion chunk"), ("error_event", "kaboom")])
def test_a_broken_stream_ends_with_an_error_event_and_done(scripted, mode, needle):
    script, s = scripted
    script["mode"] = mode
    body = {"model": "base", "prompt": "x", "max_tokens": 2, "stream": True}
    with httpx.stream("POST", s.base_url + "/completions", json=body, timeout=30) as r:
        assert r.status_code == 200
        lines = [l for l in r.iter_lines() if l]
    assert lines[-1] == "data: [DONE]"
    first, last = json.loads(lines[0][6:]), json.loads(lines[-2][6:])
    assert first["choices"][0]["text"] == "o" and first["model"] == "base"      # the good chunk was relayed
    assert last["error"]["type"] == "upstream_error" and needle in last["error"]["message"]
    assert s.app.state.proxy.inflight == 0


def test_a_slow_upstream_is_a_504_after_the_upstream_timeout(scripted):
    script, s = scripted
    script.update(mode="slow", delay=5.0)
    for stream in (False, True):
        body = {"model": "base", "prompt": "x", "max_tokens": 2, "stream": stream}
        r = httpx.post(s.base_url + "/completions", json=body, timeout=30)
        assert r.status_code == 504, r.text
        assert r.json()["error"]["code"] == "upstream_timeout" and "2 s" in r.json()["error"]["message"]
    assert s.app.state.proxy.inflight == 0


def test_a_client_leaving_a_proxied_request_frees_its_slot_at_once(proxy_pipeline):
    script = {"mode": "slow", "delay": 20.0, "finished": 0}
    with serving(fake_upstream(script)) as up:
        with serving(create_app(proxy_pipeline, ServeConfig(upstream=up.url, upstream_timeout_s=60))) as s:
            p = s.app.state.proxy
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(s.base_url + "/completions", json={"model": "base", "prompt": "x"}, timeout=1.0)
            t0 = time.monotonic()
            while p.inflight:
                assert time.monotonic() - t0 < 15, p.stats()
                time.sleep(0.05)
            assert script["finished"] == 0       # freed while the upstream was still working on it


@pytest.mark.parametrize("mode,modes", [("", (0o755, 0o644)), ("private", (0o700, 0o600)),
                                        ("shared", (0o755, 0o644))])
def test_mixture_folders_have_the_documented_mode(proxy_pipeline, upstream, tmp_path, mode, modes):
    mix_dir = tmp_path / "mixtures"
    cfg = ServeConfig(upstream=upstream.url, mixture_dir=str(mix_dir), mixture_mode=mode)
    with serving(create_app(proxy_pipeline, cfg)) as s:
        r = httpx.post(s.base_url + "/completions", timeout=60, json={
            "model": "dlp", "prompt": "x", "max_tokens": 2, "dlp": {"weights": {"capitals": 0.35, "arithmetic": 0.65}}})
        assert r.status_code == 200, r.text
        folder = mix_dir / r.json()["dlp_upstream"]["model"]
        assert stat.S_IMODE(mix_dir.stat().st_mode) == modes[0]
        assert stat.S_IMODE(folder.stat().st_mode) == modes[0]
        files = [f for f in folder.rglob("*") if f.is_file()]
        assert files and {stat.S_IMODE(f.stat().st_mode) for f in files} == {modes[1]}


def test_the_temp_mixture_folder_is_private_by_default(proxy_pipeline):
    p = UpstreamProxy(proxy_pipeline, "http://127.0.0.1:1")
    try:
        assert stat.S_IMODE(p.mixture_dir.stat().st_mode) == 0o700
    finally:
        asyncio.run(p.aclose())
    assert not p.mixture_dir.exists()
