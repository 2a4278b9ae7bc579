"""DLPPipeline: routing, batched KV-cache generation, sentence re-routing, streaming, and the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import assert_one_line_error
from dlp_lora.config import DLPError
from dlp_lora.fusion import fuse_adapters, make_random_adapter
from dlp_lora.models import eos_token_ids, load_model, make_tiny_model
from dlp_lora.pipeline import DLPPipeline
from dlp_lora.router.select import select_top_p

NAMES = ["alpha", "beta", "gamma"]
PROMPTS = ["Name a colour.", "What is two plus two? Answer briefly.", "Hi"]


class StubRouter:
    """Deterministic router: a task per keyword, recording every call."""

    labels = NAMES

    def __init__(self, table=None):
        self.table = table or {}
        self.calls: list[list[str]] = []

    def probs(self, texts):
        self.calls.append(list(texts))
        out = []
        for t in texts:
            k = next((i for key, i in self.table.items() if key in t), sum(map(ord, t)) % len(NAMES))
            v = torch.full((len(NAMES),), 0.05)
            v[k] = 0.9
            out.append(v)
        return torch.stack(out)


@pytest.fixture(scope="module")
def adapters(tiny_model_path, tmp_path_factory):
    root = tmp_path_factory.mktemp("pipe_adapters")
    model, _ = load_model(tiny_model_path, device="cpu", dtype="fp32")
    specs = [dict(rank=8, alpha=16), dict(rank=4, alpha=8, target_modules=("q_proj", "o_proj")),
             dict(rank=16, alpha=8, target_modules=("v_proj", "up_proj"), use_rslora=True)]
    return [make_random_adapter(model, root / n, seed=i, task=n, **s) for i, (n, s) in enumerate(zip(NAMES, specs))]


@pytest.fixture
def make_pipe(tiny_model_path, adapters):
    def make(router=None):
        model, tok = load_model(tiny_model_path, device="cpu", dtype="fp32")
        return DLPPipeline(model, tok, fuse_adapters(model, adapters), router if router is not None else StubRouter())
    return make


@pytest.fixture(scope="module")
def run_dir(adapters, tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    (run / "adapters.txt").write_text("\n".join(str(a) for a in adapters) + "\n")
    return run


def _hf_greedy(model, tok, prompts, max_new):
    """The model's own generate (greedy, left padding) -> new text per row."""
    from dlp_lora.data import format_prompt

    enc = tok([format_prompt(tok, p) for p in prompts], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new, do_sample=False, eos_token_id=eos_token_ids(model, tok),
                             pad_token_id=tok.pad_token_id)
    return [tok.decode(row[enc["input_ids"].shape[1]:], skip_special_tokens=True) for row in out]


def test_greedy_single_adapter_equals_peft_generate(make_pipe, tiny_model_path, adapters):
    from peft import PeftModel

    model, tok = load_model(tiny_model_path, device="cpu", dtype="fp32")
    peft_model = PeftModel.from_pretrained(model, adapters[1]).eval()
    want = _hf_greedy(peft_model, tok, PROMPTS, 16)
    pipe = make_pipe()
    forced = pipe.generate(PROMPTS, weights={"beta": 1.0}, max_new_tokens=16)
    assert [r.text for r in forced] == want
    beta_router = StubRouter({"": 1})                         # always "beta" with prob 0.9 -> top_p 0.8 keeps it alone
    pipe2 = make_pipe(beta_router)
    routed = pipe2.generate(PROMPTS, granularity="prompt", max_new_tokens=16)
    assert [r.text for r in routed] == want
    assert all(r.routing[0]["selected"] == ["beta"] and r.routing[0]["weights"] == [1.0] for r in routed)
    assert all(r.finish_reason in ("stop", "length") and r.prompt_tokens > 0 for r in routed)


def test_zero_weights_generate_like_the_base_model(make_pipe, tiny):
    want = _hf_greedy(tiny[0], tiny[1], PROMPTS, 12)
    got = make_pipe().generate(PROMPTS, weights=torch.zeros(len(PROMPTS), len(NAMES)), max_new_tokens=12)
    assert [r.text for r in got] == want
    assert got[0].routing[0]["selected"] == [] and got[0].routing[0]["source"] == "forced"


def test_mixed_batch_rows_equal_rows_alone(make_pipe):
    pipe = make_pipe()
    mix = [{"alpha": 0.7, "gamma": 0.3}, torch.tensor([0.0, 1.0, 0.0]), {"beta": 0.5, "gamma": 0.5}]
    batch = pipe.generate(PROMPTS, weights=mix, max_new_tokens=12)
    for i, p in enumerate(PROMPTS):
        alone = pipe.generate([p], weights=[mix[i]], max_new_tokens=12)[0]
        assert alone.text == batch[i].text
    # routed per sentence (different mixtures per row and per prompt sentence) is batch-invariant too
    routed = pipe.generate(PROMPTS, max_new_tokens=10)
    for i, p in enumerate(PROMPTS):
        assert pipe.generate([p], max_new_tokens=10)[0].text == routed[i].text


def test_merge_mode_equals_unmerged(make_pipe):
    pipe = make_pipe()
    before = {k: v.clone() for k, v in pipe.model.state_dict().items()}
    a = pipe.generate(PROMPTS, max_new_tokens=10)
    b = pipe.generate(PROMPTS, max_new_tokens=10, merge=True)
    assert [r.text for r in a] == [r.text for r in b]
    forced = {"alpha": 0.4, "beta": 0.6}
    assert [r.text for r in pipe.generate(PROMPTS, weights=forced, max_new_tokens=8, merge=True)] == \
        [r.text for r in pipe.generate(PROMPTS, weights=forced, max_new_tokens=8)]
    after = pipe.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)   # merge is undone exactly


def _spy_tokens(pipe, monkeypatch):
    steps: list[list[int]] = []
    orig = pipe._choose

    def spy(*a, **k):
        t = orig(*a, **k)
        steps.append(t.tolist())
        return t

    monkeypatch.setattr(pipe, "_choose", spy)
    return steps


def test_eos_stops_each_row_separately(make_pipe, tiny_model_path, adapters, monkeypatch):
    pipe = make_pipe()
    steps = _spy_tokens(pipe, monkeypatch)
    first = pipe.generate(PROMPTS[:2], weights={"alpha": 1.0}, max_new_tokens=8, chat=False)
    row0 = [s[0] for s in steps]
    row1 = [s[1] for s in steps if len(s) > 1]
    only0 = [t for t in row0 if t not in row1]       # a token only row 0 produces becomes an EOS
    eos = next((t for t in only0 if t != row0[0]), only0[0])
    k = row0.index(eos)
    model, tok = load_model(tiny_model_path, device="cpu", dtype="fp32")
    model.generation_config.eos_token_id = [tok.eos_token_id, eos]
    pipe2 = DLPPipeline(model, tok, fuse_adapters(model, adapters), StubRouter())
    second = pipe2.generate(PROMPTS[:2], weights={"alpha": 1.0}, max_new_tokens=8, chat=False)
    assert second[0].finish_reason == "stop" and second[0].completion_tokens == k + 1
    assert second[0].text == tok.decode(row0[:k], skip_special_tokens=True)
    assert second[1].text == first[1].text and second[1].completion_tokens == first[1].completion_tokens


def test_per_row_max_new_tokens_temperature_and_seed(make_pipe):
    pipe = make_pipe()
    res = pipe.generate(PROMPTS[:2], weights={"gamma": 1.0}, max_new_tokens=[3, 7])
    assert [r.completion_tokens for r in res] == [3, 7] or any(r.finish_reason == "stop" for r in res)
    greedy = pipe.generate(PROMPTS[:2], weights={"gamma": 1.0}, max_new_tokens=8)
    s1 = pipe.generate(PROMPTS[:2], weights={"gamma": 1.0}, max_new_tokens=8, temperature=[0.0, 1.5], seed=3,
                       top_p_sampling=0.9)
    s2 = pipe.generate(PROMPTS[:2], weights={"gamma": 1.0}, max_new_tokens=8, temperature=[0.0, 1.5], seed=3,
                       top_p_sampling=0.9)
    assert s1[0].text == greedy[0].text
    assert [r.text for r in s1] == [r.text for r in s2]


def test_streaming_callback_and_cancel(make_pipe):
    pipe = make_pipe()
    seen: dict[int, list[str]] = {0: [], 1: []}

    def on_text(i, delta):
        seen[i].append(delta)
        return i == 1            # cancel row 1 after its first piece of text

    res = pipe.generate(PROMPTS[:2], weights={"alpha": 1.0}, max_new_tokens=10, on_text=on_text)
    full = pipe.generate(PROMPTS[:2], weights={"alpha": 1.0}, max_new_tokens=10)
    assert "".join(seen[0]) == res[0].text == full[0].text
    assert res[1].finish_reason == "cancelled" and len(seen[1]) == 1
    assert res[1].completion_tokens < full[1].completion_tokens


def test_stop_strings_per_row(make_pipe):
    pipe = make_pipe()
    full = pipe.generate(PROMPTS[:2], weights={"beta": 1.0}, max_new_tokens=12)
    text = full[0].text
    stop = text[len(text) // 2: len(text) // 2 + 3]
    assert stop.strip()
    streamed: list[str] = []
    res = pipe.generate(PROMPTS[:2], weights={"beta": 1.0}, max_new_tokens=12, stop=[[stop], None],
                        on_text=lambda i, d: streamed.append(d) if i == 0 else None)
    assert res[0].text == text[:text.find(stop)] and res[0].finish_reason == "stop"
    assert "".join(streamed) == res[0].text          # the stop string is never streamed
    assert res[1].text == full[1].text


def test_sentence_rerouting_changes_the_mixture_at_a_sentence_boundary(make_pipe, monkeypatch):
    router = StubRouter({"First part": 2, "Second": 1, "colour": 0, "Then": 1})
    pipe = make_pipe(router)
    tok = pipe.tokenizer
    script = [tok.encode(" First part. Second piece. End of it all", add_special_tokens=False),
              tok.encode(" no boundary here at all ok", add_special_tokens=False)]
    n_steps = max(map(len, script))

    def scripted(logits, temps, top_p_sampling, gen):
        step = len(calls)
        calls.append(step)
        return torch.tensor([script[b][min(step, len(script[b]) - 1)] for b in range(logits.shape[0])])

    calls: list[int] = []
    monkeypatch.setattr(pipe, "_choose", scripted)
    set_calls: list[torch.Tensor] = []
    orig_set = pipe.fused.set_weights
    monkeypatch.setattr(pipe.fused, "set_weights", lambda w: (set_calls.append(w.clone()), orig_set(w))[1])
    prompts = ["Pick a colour. Then add two numbers!", "Hi"]
    res = pipe.generate(prompts, max_new_tokens=n_steps, top_p=0.8)
    # prefill: per-token weights; the two prompt sentences of row 0 carry different mixtures
    pre = set_calls[0]
    assert pre.dim() == 3
    row0 = {tuple(pre[0, t].tolist()) for t in range(pre.shape[1])}
    assert len(row0) == 2
    # routing of row 0: two prompt sentences, then each completed output sentence
    r0 = res[0].routing
    assert [e["source"] for e in r0] == ["prompt", "prompt", "output", "output"]
    assert r0[2]["sentence"] == "First part." and r0[2]["selected"] == ["gamma"]
    assert r0[3]["sentence"] == "Second piece." and r0[3]["selected"] == ["beta"]
    assert r0[2]["probs"]["gamma"] == pytest.approx(0.9)
    assert [e["source"] for e in res[1].routing] == ["prompt"]        # no sentence completed in row 1
    # after the boundary, row 0 decodes with the new mixture; row 1 keeps its own
    want = select_top_p(router.probs(["First part."]), 0.8)[0]
    decode_sets = [w for w in set_calls[1:] if w.dim() == 2]
    assert any(torch.allclose(w[0], want) for w in decode_sets)
    assert all(torch.equal(w[1], decode_sets[0][1]) for w in decode_sets if w.shape[0] == 2)
    # one router call per step at most: prompt sentences in one call, each boundary in its own step
    assert router.calls[0] == ["Pick a colour.", "Then add two numbers!", "Hi"]
    assert ["First part."] in router.calls and ["Second piece."] in router.calls


def test_route_and_bad_input(make_pipe):
    pipe = make_pipe()
    probs, w = pipe.route(["Hello there."], top_p=0.5)
    assert probs.shape == (1, 3) and w.shape == (1, 3) and float(w.sum()) == pytest.approx(1.0)
    with pytest.raises(DLPError, match="top_p"):
        pipe.generate(PROMPTS, top_p=1.5)
    with pytest.raises(DLPError, match="top_p"):
        pipe.route(["x"], top_p=0.0)
    with pytest.raises(DLPError, match="expected shape"):
        pipe.generate(PROMPTS, weights=torch.ones(3, 2))
    with pytest.raises(DLPError, match=">= 0"):
        pipe.generate(PROMPTS[:1], weights=[torch.tensor([1.0, -1.0, 0.0])])
    with pytest.raises(DLPError, match=">= 0"):
        pipe.generate(PROMPTS[:1], weights=[torch.tensor([float("nan"), 0.0, 0.0])])
    with pytest.raises(DLPError, match="unknown task"):
        pipe.generate(PROMPTS[:1], weights={"nope": 1.0})
    with pytest.raises(DLPError, match="granularity"):
        pipe.generate(PROMPTS, granularity="token")
    no_router = DLPPipeline(pipe.model, pipe.tokenizer, pipe.fused, None)
    with pytest.raises(DLPError, match="router"):
        no_router.generate(PROMPTS)


def test_router_labels_and_tokenizer_are_checked(make_pipe, tiny_model_path, adapters):
    bad = StubRouter()
    bad.labels = ["beta", "alpha", "gamma"]
    with pytest.raises(DLPError, match="labels"):
        make_pipe(bad)
    other_tok = StubRouter()
    other_tok.tokenizer_id = "123:abc"
    with pytest.raises(DLPError, match="tokenizer"):
        make_pipe(other_tok)


def test_from_pretrained_with_a_run_folder(tiny_model_path, run_dir):
    pipe = DLPPipeline.from_pretrained(tiny_model_path, run_dir, router=StubRouter(), device="cpu", dtype="fp32")
    assert pipe.names == NAMES and pipe.fused.names == NAMES
    res = pipe.generate(["Hello. World?"], max_new_tokens=4)
    assert res[0].completion_tokens <= 4 and len(res[0].routing) >= 2


# ---------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------

def test_cli_generate_json_and_export_mixture(cli, tiny_model_path, run_dir, tmp_path, tiny):
    from peft import PeftModel

    res = cli("generate", "--run", run_dir, "--model", tiny_model_path, "--prompt", "Hello there.",
              "--weights", "alpha=0.5,gamma=0.5", "--max-new-tokens", "5", "--json", "--device", "cpu")
    assert res.code == 0, res
    line = json.loads(res.out.strip().splitlines()[-1])
    assert line["prompt"] == "Hello there." and line["routing"][0]["selected"] == ["alpha", "gamma"]
    assert line["completion_tokens"] <= 5
    inp = tmp_path / "p.jsonl"
    inp.write_text(json.dumps({"prompt": "One."}) + "\n" + json.dumps("Two.") + "\n")
    res = cli("generate", "--run", run_dir, "--model", tiny_model_path, "--input", inp, "--weights", "beta=1",
              "--max-new-tokens", "3", "--device", "cpu")
    assert res.code == 0 and res.out.count("tokens,") == 2, res
    out = tmp_path / "mix"
    res = cli("export-mixture", "--run", run_dir, "--model", tiny_model_path, "--weights", "alpha=0.5,gamma=0.5",
              "--out", out)
    assert res.code == 0 and (out / "adapter_model.safetensors").is_file(), res
    # the exported adapter reproduces the fused mixture
    model, tok = load_model(tiny_model_path, device="cpu", dtype="fp32")
    enc = tok(["Hello there. Test."], return_tensors="pt")
    pm = PeftModel.from_pretrained(model, out).eval()
    m2, _ = load_model(tiny_model_path, device="cpu", dtype="fp32")
    fused = fuse_adapters(m2, (run_dir / "adapters.txt").read_text().split())
    with torch.no_grad(), fused.mixture(torch.tensor([[0.5, 0.0, 0.5]])):
        want = m2(**enc).logits
    with torch.no_grad():
        got = pm(**enc).logits
    assert torch.allclose(got, want, atol=1e-5, rtol=0)


def test_cli_bad_input(cli, tiny_model_path, run_dir, adapters, tmp_path):
    base = ("generate", "--model", tiny_model_path, "--prompt", "Hi", "--device", "cpu")
    bad_list = tmp_path / "adapters.txt"
    bad_list.write_text(f"{adapters[0]}\nmissing_adapter\n")
    assert_one_line_error(cli(*base, "--adapters", bad_list, "--weights", "alpha=1"), "missing_adapter", "not found")
    empty = tmp_path / "empty_adapter"
    empty.mkdir()
    assert_one_line_error(cli(*base, "--adapters", f"{adapters[0]},{empty}", "--weights", "alpha=1"),
                          "empty_adapter", "PEFT")
    other, _ = load_model(make_tiny_model(tmp_path / "other", hidden=32), device="cpu", dtype="fp32")
    foreign = make_random_adapter(other, tmp_path / "foreign")
    assert_one_line_error(cli(*base, "--adapters", foreign, "--weights", "foreign=1"), "foreign", "q_proj")
    assert_one_line_error(cli(*base, "--run", run_dir, "--weights", "alpha=1", "--top-p", "0"), "top-p")
    assert_one_line_error(cli(*base, "--run", run_dir, "--weights", "alpha=-1"), "weights", ">= 0")
    assert_one_line_error(cli(*base, "--run", run_dir, "--weights", "alpha=nan"), "weights")
    assert_one_line_error(cli(*base, "--run", run_dir, "--weights", "zeta=1"), "unknown task", "zeta")
    assert_one_line_error(cli(*base, "--run", run_dir), "router")
    assert_one_line_error(cli("export-mixture", "--run", run_dir, "--model", tiny_model_path, "--weights",
                              "alpha=0", "--out", tmp_path / "z"), "zero")
    assert not (tmp_path / "z").exists()


@pytest.mark.slow
def test_default_model_greedy_single_adapter_equals_peft(tmp_path):
    """SmolLM2-135M: a routed one-adapter mixture generates exactly PEFT's greedy text; a 2-adapter mixture of a
    per-row batch equals each row alone."""
    from peft import PeftModel

    model, tok = load_model("default", device="cpu", dtype="fp32")
    dirs = [make_random_adapter(model, tmp_path / n, seed=i, task=n, rank=8, alpha=16) for i, n in enumerate(NAMES)]
    peft_model = PeftModel.from_pretrained(load_model("default", device="cpu", dtype="fp32")[0], dirs[2]).eval()
    prompts = ["What is the capital of France?", "Sort these words: pear, apple."]
    want = _hf_greedy(peft_model, tok, prompts, 12)
    pipe = DLPPipeline(model, tok, fuse_adapters(model, dirs), StubRouter({"": 2}))
    assert [r.text for r in pipe.generate(prompts, granularity="prompt", max_new_tokens=12)] == want
    mix = [{"alpha": 0.6, "beta": 0.4}, {"gamma": 1.0}]
    both = pipe.generate(prompts, weights=mix, max_new_tokens=12)
    assert [pipe.generate([p], weights=[m], max_new_tokens=12)[0].text for p, m in zip(prompts, mix)] == \
        [r.text for r in both]
