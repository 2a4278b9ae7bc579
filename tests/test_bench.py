"""Benchmark protocol (DESIGN §7): statistics helper, interleaving, baselines' math, and the command end to end.

No test asserts a wall time: timings are only checked for shape (positive, min <= median <= max)."""

from __future__ import annotations

import json

import pytest
import torch

from dlp_lora import bench
from dlp_lora.config import DLPError


# ---------------------------------------------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------------------------------------------

def test_summarize_median_min_max():
    s = bench.summarize([5, 1, 3, 2, 4])
    assert (s["median"], s["min"], s["max"], s["n"]) == (3, 1, 5, 5)
    assert s["values"] == [5, 1, 3, 2, 4]  # raw values kept in repetition order
    assert bench.summarize([1, 2, 3, 10])["median"] == 2.5  # even count: mean of the middle two
    with pytest.raises(DLPError):
        bench.summarize([])


def test_paired_ratio_pairs_repetitions():
    r = bench.paired_ratio([2, 4, 9], [1, 4, 3])
    assert r["values"] == [2.0, 1.0, 3.0]
    assert (r["median"], r["min"], r["max"]) == (2.0, 1.0, 3.0)
    with pytest.raises(DLPError):
        bench.paired_ratio([1, 2], [1])


def test_interleave_runs_warmup_then_a_b_a_b():
    calls = []
    now = [0.0]

    def clock():
        return now[0]

    def sys_a():
        calls.append("A")
        now[0] += 1.0                    # timed by the clock: 1 s per call

    def sys_b():
        calls.append("B")
        return {"prefill": 0.25, "decode": 0.5}   # own parts; the wall time (0 here) becomes "total"

    def sys_c():
        calls.append("C")
        return 7.0

    progress = []
    raw = bench.interleave({"a": sys_a, "b": sys_b, "c": sys_c}, reps=5, warmup=2, clock=clock,
                           on_call=lambda name, rep: progress.append((name, rep)))
    # warm-up in order, then every other round backwards (ABBA): ABC CBA ABC CBA ABC
    assert "".join(calls) == "ABC" * 2 + "ABC" + "CBA" + "ABC" + "CBA" + "ABC"
    assert progress[:6] == [("a", -1), ("b", -1), ("c", -1)] * 2     # warm-up is reported but not recorded
    assert progress[6:12] == [("a", 0), ("b", 0), ("c", 0), ("c", 1), ("b", 1), ("a", 1)]
    assert raw["a"] == {"total": [1.0] * 5}
    assert raw["b"]["prefill"] == [0.25] * 5 and raw["b"]["decode"] == [0.5] * 5 and raw["b"]["total"] == [0.0] * 5
    assert raw["c"] == {"total": [7.0] * 5}


def test_interleave_without_alternation_keeps_a_fixed_order():
    calls = []
    bench.interleave({"a": lambda: calls.append("A") or 1.0, "b": lambda: calls.append("B") or 1.0}, reps=5,
                     warmup=0, alternate=False)
    assert "".join(calls) == "AB" * 5


def test_interleave_rejects_bad_arguments():
    with pytest.raises(DLPError):
        bench.interleave({"a": lambda: 1.0}, reps=0)
    with pytest.raises(DLPError):
        bench.interleave({}, reps=5)


def test_config_needs_five_repetitions_and_known_rows():
    with pytest.raises(DLPError, match="reps"):
        bench.BenchConfig(reps=3)
    with pytest.raises(DLPError, match="P9"):
        bench.BenchConfig(only="P1,P9")
    assert bench.BenchConfig(only="p7, P2").rows() == ["P2", "P7"]
    assert bench.BenchConfig().resolved()["reps"] == 5
    assert bench.BenchConfig(scaling="100,1,10").scaling_list() == [1, 10, 100]


def test_benchmarks_md_sections_are_replaced_not_duplicated(tmp_path):
    md = tmp_path / "BENCHMARKS.md"
    bench.update_benchmarks_md(md, "a", "## a\nfirst\n")
    bench.update_benchmarks_md(md, "b", "## b\nother\n")
    bench.update_benchmarks_md(md, "a", "## a\nsecond\n")
    text = md.read_text()
    assert text.startswith("# Benchmarks")
    assert text.count("<!-- bench:a start -->") == 1 and "second" in text and "first" not in text
    assert "## b\nother" in text
    assert text.index("bench:a start") < text.index("bench:b start")   # order kept


# ---------------------------------------------------------------------------------------------------------------
# the decode loop and the baselines' math
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def own_tiny(tiny_model_path):
    from dlp_lora.models import load_model

    model, _ = load_model(tiny_model_path, device="cpu", dtype="fp32")
    return model


@pytest.fixture(scope="module")
def two_adapters(own_tiny, tmp_path_factory):
    from dlp_lora.fusion import make_random_adapter

    d = tmp_path_factory.mktemp("bench_adapters")
    return [make_random_adapter(own_tiny, d / f"t{i}", rank=4, alpha=8, seed=i) for i in range(2)]


def test_decode_fixed_runs_exactly_the_requested_steps(own_tiny):
    calls = []
    h = own_tiny.register_forward_hook(lambda m, a, kw: calls.append(1))
    try:
        ids = bench.random_prompts(own_tiny, 2, 5, seed=0, device="cpu")
        parts = bench.decode_fixed(own_tiny, ids, 6, "cpu")
    finally:
        h.remove()
    assert len(calls) == 6                                   # 1 prefill + 5 KV-cached steps, no EOS stop
    assert set(parts) == {"setup", "prefill", "decode", "total"}
    assert all(v >= 0 for v in parts.values())


def test_shared_copy_shares_weights_not_modules(own_tiny):
    c = bench.shared_copy(own_tiny)
    p0, c0 = dict(own_tiny.named_parameters()), dict(c.named_parameters())
    assert p0.keys() == c0.keys()
    assert all(p0[k] is c0[k] for k in p0)
    assert c.model.layers[0].self_attn.q_proj is not own_tiny.model.layers[0].self_attn.q_proj


def _naive_logits(model, ids, dirs, weights):
    """Reference: W x + Σ_i w_i s_i B_i A_i x, computed by hooking every adapted linear of a fresh copy."""
    m = bench.shared_copy(model)
    loras = [bench._read_lora(d, "cpu", torch.float32) for d in dirs]
    hooks = []
    for path in loras[0][0]:
        lin = m.get_submodule(path)

        def hook(mod, inp, out, path=path):
            x = inp[0]
            return out + sum(float(weights[i]) * s * (x @ mods[path][0].T @ mods[path][1].T)
                             for i, (mods, s) in enumerate(loras))
        hooks.append(lin.register_forward_hook(hook))
    with torch.no_grad():
        return m(input_ids=ids).logits


def test_loop_baseline_matches_naive_reference_and_fused_engine(own_tiny, two_adapters):
    from dlp_lora.fusion import fuse_adapters

    ids = bench.random_prompts(own_tiny, 2, 7, seed=1, device="cpu")
    w = torch.tensor([[0.3, 0.7], [0.3, 0.7]])
    ref = _naive_logits(own_tiny, ids, two_adapters, w[0])
    lm, state = bench.loop_model(own_tiny, two_adapters)
    state["weights"], state["selected"] = w, [0, 1]
    with torch.no_grad():
        loop = lm(input_ids=ids).logits
    fm = bench.shared_copy(own_tiny)
    fused = fuse_adapters(fm, two_adapters)
    with torch.no_grad(), fused.mixture(w):
        ours = fm(input_ids=ids).logits
    with torch.no_grad():
        base = own_tiny(input_ids=ids).logits
    assert not torch.allclose(ref, base, atol=1e-4)          # the adapters really change the output
    torch.testing.assert_close(loop, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_peft_baselines_agree_with_the_loop_on_one_hot_weights(own_tiny, two_adapters):
    pm, names = bench.load_peft(own_tiny, two_adapters, progress=False)
    lm, state = bench.loop_model(own_tiny, two_adapters)
    ids = bench.random_prompts(own_tiny, 2, 7, seed=2, device="cpu")
    w = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    state["weights"], state["selected"] = w, [0, 1]
    with torch.no_grad():
        loop = lm(input_ids=ids).logits
        mixed = pm(input_ids=ids, adapter_names=[names[1], names[0]]).logits   # the peft_mixed baseline
    torch.testing.assert_close(mixed, loop, atol=1e-5, rtol=1e-5)


def test_original_baseline_runs_each_row_alone_with_its_own_loras(own_tiny, two_adapters):
    """The original code's method: batch 1 per row, each row with only its selected LoRAs and weights."""

    class Ctx:
        device = "cpu"

        def get(self, key):
            assert key == "loop"
            return lm, state

    lm, state = bench.loop_model(own_tiny, two_adapters)
    seen = []

    def spy(mod, args, kwargs, out):
        seen.append((kwargs["input_ids"].shape[0], tuple(state["selected"]),
                     state["weights"].tolist() if state["weights"] is not None else None))
    h = lm.register_forward_hook(spy, with_kwargs=True)
    try:
        ids = bench.random_prompts(own_tiny, 2, 5, seed=3, device="cpu")
        w = torch.tensor([[0.0, 1.0], [0.5, 0.25]])
        parts = bench.sys_original(Ctx(), ids, 4, w)()
    finally:
        h.remove()
    assert len(seen) == 2 * 4                                    # 2 rows x (prefill + 3 steps)
    assert all(b == 1 for b, _, _ in seen)                       # batch size 1
    assert seen[0][1:] == ((1,), [[0.0, 1.0]]) and seen[4][1:] == ((0, 1), [[0.5, 0.25]])
    assert state["weights"] is None and set(parts) == {"setup", "prefill", "decode", "total"}
    assert parts["total"] >= parts["decode"] > 0


def test_random_mixtures_respect_top_p_cap():
    w = bench.random_mixtures(16, 26, 0.8, 3, seed=0)
    k = (w != 0).sum(-1)
    assert w.shape == (16, 26) and int(k.max()) <= 3 and int(k.min()) >= 1
    torch.testing.assert_close(w.sum(-1), torch.ones(16))
    assert len({tuple(r) for r in w.tolist()}) == 16          # 16 different mixtures


def test_presets_are_real_shapes():
    assert bench.PRESETS["llama-2-7b"]["hidden_size"] == 4096
    assert bench.PRESETS["qwen2-1.5b"]["vocab_size"] == 151936
    assert bench.PRESETS["llama-3-8b"]["num_key_value_heads"] == 8


# ---------------------------------------------------------------------------------------------------------------
# the command, end to end
# ---------------------------------------------------------------------------------------------------------------

def _check_summary(s):
    assert s["n"] >= 5 and len(s["values"]) == s["n"]
    assert s["min"] <= s["median"] <= s["max"]


def test_bench_command_quick_writes_results(cli, tiny_model_path, tmp_path):
    out = tmp_path / "bench" / "t"
    md = tmp_path / "BENCHMARKS.md"
    res = cli("bench", "--model", tiny_model_path, "--quick", "--only", "P2,P7", "--threads", "1",
              "--out", out, "--markdown", md, "--no-progress")
    assert res.code == 0, res
    assert "P2:" in res.out and "P7:" in res.out and "threads = 1" in res.out
    data = json.loads((out / "results.json").read_text())
    assert data["threads"] == 1 and data["rows_run"] == ["P2", "P7"]
    assert data["versions"]["torch"] and data["machine"]["cpu_count"]
    assert json.loads((out / "config.json").read_text())["only"] == "P2,P7"
    p2 = data["rows"]["P2"]["cases"][0]
    assert p2["shapes"]["batch"] == 16 and p2["shapes"]["distinct_mixtures"] == 16
    assert p2["shapes"]["adapters_loaded"] == 26 and p2["shapes"]["selected_per_row_max"] <= 3
    assert set(p2["systems"]) == {"ours", "peft_single", "peft_mixed", "peft_cat", "base"}
    p7 = data["rows"]["P7"]["cases"][0]
    assert set(p7["systems"]) == {"ours", "original", "loop", "base"}
    assert p7["target_ratio"] == "original / ours, decode" and p7["shapes"]["distinct_mixtures"] == 16
    for parts in p2["systems"].values():
        assert {"prefill", "decode", "total"} <= set(parts)
        for s in parts.values():
            _check_summary(s)
    assert p2["target_ratio"] in p2["ratios"]
    _check_summary(p2["ratios"][p2["target_ratio"]])
    for row in ("P2", "P7"):
        r = data["rows"][row]
        assert isinstance(r["met"], bool) and r["figure"]
    text = md.read_text()
    assert "<!-- bench:t start -->" in text and "| P2 |" in text and "| P7 |" in text and "median" in text
    assert (out / "results.md").read_text().strip() in text


def test_bench_command_router_and_memory_rows(cli, tiny_model_path, tmp_path):
    out = tmp_path / "bench" / "rm"
    res = cli("bench", "--model", tiny_model_path, "--quick", "--only", "P4,P6", "--threads", "1",
              "--out", out, "--markdown", "", "--no-progress")
    assert res.code == 0, res
    data = json.loads((out / "results.json").read_text())
    p4, p6 = data["rows"]["P4"], data["rows"]["P6"]
    _check_summary(p4["figure"]["latency_ms"])
    _check_summary(p4["figure"]["sentences_per_s"])
    f = p6["cases"][0]["figures"]
    assert f["adapter_bytes"] > 0 and f["ours_tensor_bytes"] > f["base_tensor_bytes"]
    assert p6["figure"]["tensor_ratio"] > 0 and not (tmp_path / "BENCHMARKS.md").exists()


def test_bench_bad_row_is_one_line_error(cli, tmp_path):
    from conftest import assert_one_line_error

    res = cli("bench", "--only", "P1,P42", "--out", tmp_path / "b")
    assert_one_line_error(res, "P42")
    assert not (tmp_path / "b").exists()
