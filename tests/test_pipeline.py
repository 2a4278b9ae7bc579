"""DLPPipeline and its step-level decoder: routing, batched KV-cache generation, rows joining and leaving a running
batch, sentence and segment re-routing against naive references, streaming, and the CLI."""

from __future__ import annotations

import collections
import json

import pytest
import torch

from conftest import assert_one_line_error
from dlp_lora.config import DLPError
from dlp_lora.data import format_prompt, last_item_number, last_sentence_end, numbered_items, split_sentences
from dlp_lora.fusion import fuse_adapters, make_random_adapter
from dlp_lora.models import eos_token_ids, load_model, make_tiny_model
from dlp_lora.pipeline import DecodeRequest, DLPPipeline, decode
from dlp_lora.router.select import select_top_p
from dlp_lora.selection import SelectionConfig

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


def _trace(monkeypatch):
    """Spy on the decoder's token choice: per row tag, the next-token logits of each step."""
    seen: dict = collections.defaultdict(list)
    orig = decode.choose_tokens

    def spy(logits, rows):
        for b, r in enumerate(rows):
            seen[r.tag].append(logits[b].clone())
        return orig(logits, rows)

    monkeypatch.setattr(decode, "choose_tokens", spy)
    return seen


def _script(monkeypatch, script: list[list[int]]):
    """Make the decoder emit ``script[tag]`` token by token (then its last token again); returns the logits it saw
    per tag and step."""
    seen: dict = collections.defaultdict(list)

    def scripted(logits, rows):
        for b, r in enumerate(rows):
            seen[r.tag].append(logits[b].clone())
        return torch.tensor([script[r.tag][min(len(seen[r.tag]), len(script[r.tag])) - 1] for r in rows])

    monkeypatch.setattr(decode, "choose_tokens", scripted)
    return seen


def _naive_step_logits(pipe, prompt: str, script: list[int], prompt_w, gen_w) -> list[torch.Tensor]:
    """Reference decoding: for each step, the whole sequence again (no KV cache) with per-token weights set by
    hand: ``prompt_w[t]`` for prompt token t, ``gen_w[j]`` for generated token j."""
    ids0 = pipe.tokenizer(format_prompt(pipe.tokenizer, prompt), return_tensors="pt")["input_ids"][0]
    out = []
    for j in range(len(script)):
        ids = torch.cat([ids0, torch.tensor(script[:j], dtype=torch.long)]).unsqueeze(0)
        w = torch.stack(list(prompt_w) + list(gen_w[:j])).unsqueeze(0)
        with torch.no_grad(), pipe.fused.mixture(w):
            out.append(pipe.model(input_ids=ids).logits[0, -1].float())
    return out


def _prompt_token_weights(tok, prompt: str, pieces: list[tuple[str, torch.Tensor]]) -> list[torch.Tensor]:
    """Per prompt token: the weights of the last piece that starts at or before the token's first character
    (tokens before the first piece take the first piece's)."""
    text = format_prompt(tok, prompt)
    at = text.rfind(prompt)
    starts = [(at + prompt.index(p), w) for p, w in pieces]
    offs = tok(text, return_offsets_mapping=True)["offset_mapping"]
    return [max(((s, w) for s, w in starts if s <= a), key=lambda x: x[0], default=starts[0])[1] for a, _ in offs]


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
    routed = pipe2.generate(PROMPTS, SelectionConfig(granularity="prompt"), max_new_tokens=16)
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
    with pipe.decoder(merge=True) as batch, pytest.raises(DLPError, match="one row at a time"):
        batch.add([DecodeRequest("a", weights=forced), DecodeRequest("b", weights=forced)])


def test_eos_stops_each_row_separately(make_pipe, tiny_model_path, adapters, monkeypatch):
    pipe = make_pipe()
    seen = _trace(monkeypatch)
    first = pipe.generate(PROMPTS[:2], weights={"alpha": 1.0}, max_new_tokens=8, chat=False)
    row0 = [int(l.argmax()) for l in seen[0]]
    row1 = [int(l.argmax()) for l in seen[1]]
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
    # ignore_eos (per row): row 0 goes on through its EOS to max_new_tokens with the same tokens as without the EOS
    third = pipe2.generate(PROMPTS[:2], weights={"alpha": 1.0}, max_new_tokens=8, chat=False, ignore_eos=[True, False])
    assert third[0].finish_reason == "length" and third[0].completion_tokens == 8
    assert third[0].text == tok.decode(row0[:8], skip_special_tokens=True)
    assert third[1].text == first[1].text
    with pytest.raises(DLPError, match="ignore_eos: expected true or false"):
        pipe2.generate(PROMPTS[:1], weights={"alpha": 1.0}, max_new_tokens=2, ignore_eos="yes")


def test_per_row_max_new_tokens_temperature_and_seed(make_pipe):
    pipe = make_pipe()
    res = pipe.generate(PROMPTS[:2], weights={"gamma": 1.0}, max_new_tokens=[3, 7])
    assert [r.completion_tokens for r in res] == [3, 7] or any(r.finish_reason == "stop" for r in res)
    greedy = pipe.generate(PROMPTS[:2], weights={"gamma": 1.0}, max_new_tokens=8)
    kw = dict(weights={"gamma": 1.0}, max_new_tokens=8, temperature=[0.0, 1.5], seed=3, top_p_sampling=0.9)
    s1, s2 = pipe.generate(PROMPTS[:2], **kw), pipe.generate(PROMPTS[:2], **kw)
    assert s1[0].text == greedy[0].text
    assert [r.text for r in s1] == [r.text for r in s2]
    # each row samples from its own generator (seed + row index): the same alone as in the batch
    alone = pipe.generate([PROMPTS[0], PROMPTS[1]], **{**kw, "batch_size": 1})
    assert [r.text for r in alone] == [r.text for r in s1]


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


def test_sentence_rerouting_switches_the_mixture_at_the_boundary_like_a_naive_reference(make_pipe, monkeypatch):
    router = StubRouter({"First part": 2, "Second": 1, "colour": 0, "Then": 1})
    pipe = make_pipe(router)
    tok = pipe.tokenizer
    out0 = tok.encode(" First part. Second piece. End of it all", add_special_tokens=False)
    out1 = tok.encode(" no boundary here at all ok", add_special_tokens=False)
    seen = _script(monkeypatch, [out0, out1])
    prompts = ["Pick a colour. Then add two numbers!", "Hi"]
    sel = SelectionConfig(granularity="sentence", top_p=0.8)
    res = pipe.generate(prompts, sel, max_new_tokens=len(out0))
    r0 = res[0].routing
    assert [e["source"] for e in r0] == ["prompt", "prompt", "output", "output"]
    assert r0[2]["sentence"] == "First part." and r0[2]["selected"] == ["gamma"]
    assert r0[3]["sentence"] == "Second piece." and r0[3]["selected"] == ["beta"]
    assert r0[2]["probs"]["gamma"] == pytest.approx(0.9)
    assert [e["source"] for e in res[1].routing] == ["prompt"]        # no sentence completed in row 1
    # one router call for the prompt sentences of both rows, then one per boundary
    assert router.calls == [["Pick a colour.", "Then add two numbers!", "Hi"], ["First part."], ["Second piece."]]
    w = {s: select_top_p(router.probs([s]), 0.8)[0] for s in ("Pick a colour.", "Then add two numbers!",
                                                             "First part.", "Second piece.")}
    # by hand: a boundary is seen when the word after ". " arrives; that word is the first fed with the new mixture
    second = next(j for j in range(len(out0)) if tok.decode(out0[:j + 1]).endswith(". Second"))
    end = next(j for j in range(len(out0)) if tok.decode(out0[:j + 1]).endswith(". End"))
    gen_w = [w["Then add two numbers!"] if j < second else w["First part."] if j < end else w["Second piece."]
             for j in range(len(out0))]
    prompt_w = _prompt_token_weights(tok, prompts[0], [("Pick a colour.", w["Pick a colour."]),
                                                       ("Then add", w["Then add two numbers!"])])
    want = _naive_step_logits(pipe, prompts[0], out0, prompt_w, gen_w)
    assert len(seen[0]) == len(out0) and all(torch.allclose(g, e, atol=1e-4) for g, e in zip(seen[0], want))


def test_route_and_bad_input(make_pipe):
    pipe = make_pipe()
    probs, w = pipe.route(["Hello there."], SelectionConfig(top_p=0.5))
    assert probs.shape == (1, 3) and w.shape == (1, 3) and float(w.sum()) == pytest.approx(1.0)
    probs2, w2 = pipe.route_rows(["Hello there.", "Hello there."],
                                 [SelectionConfig(top_p=0.5), SelectionConfig(top_p=1.0, weighting="renorm")])
    assert torch.equal(w2[0], w[0]) and int((w2[1] > 0).sum()) == 3
    with pytest.raises(DLPError, match="selection"):
        pipe.generate(PROMPTS, {"top_p": 0.5})
    with pytest.raises(DLPError, match="expected shape"):
        pipe.generate(PROMPTS, weights=torch.ones(3, 2))
    with pytest.raises(DLPError, match=">= 0"):
        pipe.generate(PROMPTS[:1], weights=[torch.tensor([1.0, -1.0, 0.0])])
    with pytest.raises(DLPError, match=">= 0"):
        pipe.generate(PROMPTS[:1], weights=[torch.tensor([float("nan"), 0.0, 0.0])])
    with pytest.raises(DLPError, match="unknown task"):
        pipe.generate(PROMPTS[:1], weights={"nope": 1.0})
    with pytest.raises(DLPError, match="max_new_tokens"):
        pipe.generate(PROMPTS, max_new_tokens=[4, 0, 4])
    with pytest.raises(DLPError, match="top_p_sampling"):
        pipe.generate(PROMPTS, top_p_sampling=0.0)
    with pytest.raises(DLPError, match="segment_weights: 1 mixtures for a prompt of 2 numbered"):
        pipe.generate(["1. a\n2. b"], segment_weights=[[{"alpha": 1.0}]])
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


def test_from_run_with_a_run_folder(tiny_model_path, run_dir):
    pipe = DLPPipeline.from_run(run_dir, model=str(tiny_model_path), router=StubRouter(), device="cpu",
                                dtype="fp32")
    assert pipe.names == NAMES and pipe.fused.names == NAMES
    res = pipe.generate(["Hello. World?"], max_new_tokens=4)
    assert res[0].completion_tokens <= 4 and len(res[0].routing) >= 2


# The step-level decoder: rows join a running batch and leave it

JOINERS = [   # rows on different mixtures, granularities and sampling settings, prompts of different lengths
    DecodeRequest("Hi", weights={"alpha": 0.7, "gamma": 0.3}, max_new_tokens=14, tag=0),
    DecodeRequest("What is two plus two? Answer briefly.", SelectionConfig(granularity="sentence"),
                  max_new_tokens=10, tag=1),
    DecodeRequest("Answer each question.\n1. Name a colour. Be brief.\n2. What is two plus two?",
                  SelectionConfig(granularity="segment"), max_new_tokens=12, tag=2),
    DecodeRequest("Tell me a story about a fox.", weights={"beta": 1.0}, temperature=1.0, top_p_sampling=0.9,
                  seed=7, max_new_tokens=9, tag=3),
    DecodeRequest("Name a colour.", weights={}, max_new_tokens=6, tag=4),         # all-zero: the base model
]


def _decode(pipe, requests, joins, sizes=None, chunk=0):
    """Run ``requests`` through one DecodeBatch, request i joining before step ``joins[i]`` (prefilled ``chunk``
    columns per step when > 0); rows by tag. ``sizes`` collects (live rows, rows in prefill) of every step."""
    out, step = {}, 0
    with pipe.decoder() as batch:
        while step <= max(joins) or batch:
            batch.add([r for r, j in zip(requests, joins) if j == step], prefill_chunk=chunk)
            if sizes is not None:
                sizes.append((len(batch.rows), len(batch) - len(batch.rows)))
            out.update((row.tag, row) for row in batch.step())
            step += 1
    return out


@pytest.mark.parametrize("joins, chunk", [((0, 0, 1, 4, 7), 0), ((0, 2, 2, 5, 11), 0), ((3, 0, 0, 1, 1), 0),
                                          ((0, 2, 2, 5, 11), 7), ((3, 0, 0, 1, 1), 4)])
def test_rows_joining_a_busy_batch_decode_exactly_as_alone(make_pipe, monkeypatch, joins, chunk):
    """Rows join at several steps (prefilled at once, or in chunks interleaved with the running rows' decode
    steps); each decodes the same tokens, from logits equal within float error, as alone."""
    pipe = make_pipe(StubRouter({"colour": 0, "two plus": 2, "Answer each": 1}))
    seen = _trace(monkeypatch)
    alone = {r.tag: _decode(pipe, [r], [0])[r.tag] for r in JOINERS}
    alone_logits = {tag: list(v) for tag, v in seen.items()}
    seen.clear()
    sizes: list[int] = []
    together = _decode(pipe, JOINERS, joins, sizes, chunk)
    assert max(live for live, _ in sizes) >= 3
    assert any(pending for _, pending in sizes) == (chunk > 0)     # chunked prefills ran beside decoding rows
    for r in JOINERS:
        a, t = alone[r.tag], together[r.tag]
        assert t.ids == a.ids and t.text == a.text and t.finish == a.finish, r.tag
        assert t.routing == a.routing, r.tag
        assert all(torch.allclose(x, y, atol=1e-4) for x, y in zip(seen[r.tag], alone_logits[r.tag])), r.tag
    assert together[2].routing[0]["source"] == "segment" and len(together[2].routing) == 2


def test_mixture_switches_of_rows_in_a_changing_batch_match_each_row_alone(make_pipe, monkeypatch):
    """Scripted outputs make the sentence row re-route and the segment row switch while other rows join and
    leave; every row sees the same logits at every step as when it runs alone."""
    pipe = make_pipe(StubRouter({"colour": 0, "plus": 2, "First": 2, "Second": 1}))
    tok = pipe.tokenizer
    reqs = [DecodeRequest("Answer.\n1. Name a colour.\n2. What is two plus two?",
                          SelectionConfig(granularity="segment"), max_new_tokens=9, tag=0),
            DecodeRequest("Say two sentences.", SelectionConfig(granularity="sentence"), max_new_tokens=8, tag=1),
            DecodeRequest("Hi", weights={"beta": 1.0}, max_new_tokens=3, tag=2)]
    script = [tok.encode("1. Red\n2. Four\n", add_special_tokens=False),
              tok.encode(" First part. Second piece. End", add_special_tokens=False),
              tok.encode(" ok ok ok", add_special_tokens=False)]
    seen = _script(monkeypatch, script)
    alone = {r.tag: _decode(pipe, [r], [0])[r.tag] for r in reqs}
    alone_logits = {tag: list(v) for tag, v in seen.items()}
    seen.clear()
    together = _decode(pipe, reqs, [2, 0, 1])
    assert [e["source"] for e in together[1].routing] == ["prompt", "output", "output"]
    for r in reqs:
        assert together[r.tag].routing == alone[r.tag].routing and together[r.tag].ids == alone[r.tag].ids
        assert len(seen[r.tag]) == len(alone_logits[r.tag])
        assert all(torch.allclose(x, y, atol=1e-4) for x, y in zip(seen[r.tag], alone_logits[r.tag])), r.tag


def test_finished_rows_leave_and_the_cache_is_cut_from_the_left(make_pipe):
    pipe = make_pipe()
    long_prompt = "Please describe, in several careful sentences, the colour of the sky at noon."
    with pipe.decoder() as batch:
        short, long = batch.add([DecodeRequest("Hi", weights={"alpha": 1.0}, max_new_tokens=8, tag="s"),
                                 DecodeRequest(long_prompt, weights={"beta": 1.0}, max_new_tokens=2, tag="l")])
        assert batch.width == long.prompt_tokens
        done = batch.step() + batch.step()
        assert [r.tag for r in done] == ["l"] and len(batch) == 1
        assert batch.width == short.prompt_tokens + len(short.ids)       # the long prompt's columns are gone
        while batch:
            batch.step()
    assert short.text == pipe.generate(["Hi"], weights={"alpha": 1.0}, max_new_tokens=8)[0].text


def test_cancelling_one_row_leaves_the_others_unchanged(make_pipe):
    pipe = make_pipe()
    reqs = [DecodeRequest(p, weights=w, max_new_tokens=10, tag=i)
            for i, (p, w) in enumerate(zip(PROMPTS, [{"alpha": 1.0}, {"beta": 0.5, "gamma": 0.5}, {"gamma": 1.0}]))]
    alone = {r.tag: _decode(pipe, [r], [0])[r.tag] for r in reqs}
    with pipe.decoder() as batch:
        rows = batch.add(reqs)
        for _ in range(3):
            batch.step()
        rows[1].cancel()
        left = batch.step()
        assert [r.tag for r in left] == [1] and rows[1].finish == "cancelled" and len(rows[1].ids) == 3
        while batch:
            batch.step()
    assert rows[1].result().finish_reason == "cancelled" and rows[1].result().completion_tokens == 3
    for i in (0, 2):
        assert rows[i].ids == alone[i].ids and rows[i].text == alone[i].text


def test_generate_refills_the_batch_as_rows_finish(make_pipe, monkeypatch):
    pipe = make_pipe()
    sizes: list[int] = []
    orig = decode.choose_tokens
    monkeypatch.setattr(decode, "choose_tokens", lambda logits, rows: (sizes.append(len(rows)), orig(logits, rows))[1])
    prompts = PROMPTS + ["Name a fruit.", "Count to three."]
    budgets = [2, 9, 4, 6, 3]
    res = pipe.generate(prompts, weights={"beta": 0.6, "gamma": 0.4}, max_new_tokens=budgets, batch_size=2)
    assert max(sizes) == 2 and len(sizes) < sum(budgets)       # rows decode two at a time, joining as others leave
    for p, n, r in zip(prompts, budgets, res):
        assert r.text == pipe.generate([p], weights={"beta": 0.6, "gamma": 0.4}, max_new_tokens=n)[0].text


# Segment granularity (ours, beyond the paper): answer i on the mixture of question i

def test_numbered_item_rule():
    text = 'Answer like this:\n1. Paris\n2. (B)\n\n1. What is 2+3?\n2. Is it\n   true?\n3. Sort "b a".'
    assert [text[a:b] for a, b in numbered_items(text)] == ["1. What is 2+3?", "2. Is it\n   true?",
                                                            '3. Sort "b a".']
    assert numbered_items("no items here\n2. starts at two") == []
    inner = "1. Sort.\n2. Which holds?\n3. Pick one:\n1. yes\n2. no"       # a list inside the last question
    assert [inner[a:b] for a, b in numbered_items(inner)][2] == "3. Pick one:\n1. yes\n2. no"
    assert last_item_number("1. 7\n2.") == (2, 7)                  # seen as soon as the "." arrives
    assert last_item_number("1. 7\n2.5 apples")[0] == 1            # 2.5 is a number, not a label
    assert last_item_number("** 3.** x")[0] == 3
    assert split_sentences("One. Two!\nThree") == ["One.", "Two!", "Three"]
    assert last_sentence_end("One. Tw") == 5 and last_sentence_end("One.") == -1


def test_segment_mixture_switches_exactly_at_the_answer_label(make_pipe, monkeypatch):
    router = StubRouter({"colour": 0, "plus": 2})
    pipe = make_pipe(router)
    tok = pipe.tokenizer
    prompt = "Answer each question on its own numbered line.\n1. Name a colour.\n2. What is two plus two?"
    out = tok.encode("1. Red\n2. Four\n3. x", add_special_tokens=False)
    seen = _script(monkeypatch, [out])
    res = pipe.generate([prompt], SelectionConfig(granularity="segment"), max_new_tokens=len(out))[0]
    assert [(e["sentence"], e["selected"], e["source"]) for e in res.routing] == [
        ("Name a colour.", ["alpha"], "segment"), ("What is two plus two?", ["gamma"], "segment")]
    assert router.calls == [["Name a colour.", "What is two plus two?"]]       # the output is never routed
    w1, w2 = (select_top_p(router.probs([q]), 0.8)[0] for q in ("Name a colour.", "What is two plus two?"))
    # by hand: tokens up to the "." of "2." decide nothing new; from the "." on, item 2's mixture ("3." is no item)
    label2 = next(j for j in range(len(out)) if tok.decode(out[:j + 1]).endswith("\n2."))
    assert 2 < label2 < len(out) - 3
    gen_w = [w1 if j < label2 else w2 for j in range(len(out))]
    prompt_w = _prompt_token_weights(tok, prompt, [("1. Name", w1), ("2. What", w2)])
    want = _naive_step_logits(pipe, prompt, out, prompt_w, gen_w)
    assert len(seen[0]) == len(out) and all(torch.allclose(g, e, atol=1e-4) for g, e in zip(seen[0], want))


def test_answer_scaffold_forces_each_label_and_switches_the_segment_mixture_at_it(make_pipe, monkeypatch):
    """The model says " Red", then EOS (replaced by the forced "\n2."), then " Four" and a line break (the last
    answer's end). Its logits at every step equal a naive full recompute with item 1's mixture up to the "." of
    the forced "2." and item 2's from there on."""
    router = StubRouter({"colour": 0, "plus": 2})
    pipe = make_pipe(router)
    tok = pipe.tokenizer
    enc = lambda s: tok.encode(s, add_special_tokens=False)                       # noqa: E731
    eos = min(pipe.eos_ids)
    prompt = "Answer each question on its own numbered line.\n1. Name a colour.\n2. What is two plus two?"
    l1, red, l2, four, nl = enc("1."), enc(" Red"), enc("\n2."), enc(" Four"), enc("\n")
    # what the model "chooses" at each step: anything (EOS here) where a label is forced
    script = [eos] * len(l1) + red + [eos] + [eos] * (len(l2) - 1) + four + nl
    out = l1 + red + l2 + four + nl
    seen = _script(monkeypatch, [script])
    res = pipe.generate([prompt], SelectionConfig(granularity="segment"), max_new_tokens=40,
                        answer_labels=[["1.", "2."]])[0]
    assert res.text == tok.decode(out) and res.finish_reason == "stop" and res.completion_tokens == len(out)
    w1, w2 = (select_top_p(router.probs([q]), 0.8)[0] for q in ("Name a colour.", "What is two plus two?"))
    label2 = len(l1) + len(red) + len(l2) - 1                    # the "." of the forced "2."
    gen_w = [w1 if j < label2 else w2 for j in range(len(out))]
    prompt_w = _prompt_token_weights(tok, prompt, [("1. Name", w1), ("2. What", w2)])
    want = _naive_step_logits(pipe, prompt, out, prompt_w, gen_w)
    keep = torch.ones(want[0].shape[0], dtype=torch.bool)
    keep[sorted(pipe.eos_ids)] = False
    assert len(seen[0]) == len(out) and all(torch.allclose(g[keep], e[keep], atol=1e-4) for g, e in zip(seen[0], want))
    # EOS is banned exactly where an answer has no text yet: right after each label (not while forcing one)
    empty = {len(l1), len(l1) + len(red) + len(l2)}
    assert [j for j, g in enumerate(seen[0]) if bool(torch.isinf(g[~keep]).all())] == sorted(empty)


def test_answer_scaffold_caps_each_answer_and_keeps_rows_independent(make_pipe, monkeypatch):
    pipe = make_pipe()
    tok = pipe.tokenizer
    enc = lambda s: tok.encode(s, add_special_tokens=False)                       # noqa: E731
    a = enc(" a")[0]
    _script(monkeypatch, [[a] * 30, [a] * 30])           # never a line break, never EOS
    res = pipe.generate(["1. x\n2. y", "Hi"], weights={"alpha": 1.0}, max_new_tokens=[40, 5],
                        answer_labels=[["1.", "2.", "3."], None], answer_tokens=[[2, 3, 1], None])
    assert res[0].text == tok.decode(enc("1.") + [a, a] + enc("\n2.") + [a] * 3 + enc("\n3.") + [a])
    assert res[0].finish_reason == "length"              # the last answer's own cap
    assert res[1].text == tok.decode([a] * 5) and res[1].finish_reason == "length"   # no scaffold: untouched
    with pytest.raises(DLPError, match="answer_tokens: expected one positive integer per answer label"):
        pipe.generate(["q"], weights={"alpha": 1.0}, answer_labels=[["1.", "2."]], answer_tokens=[[3]])
    with pytest.raises(DLPError, match="answer_labels: expected a list of non-empty strings"):
        pipe.generate(["q"], weights={"alpha": 1.0}, answer_labels=[["1.", ""]])
    with pytest.raises(DLPError, match="answer_labels: expected one list per prompt"):
        pipe.generate(["q"], weights={"alpha": 1.0}, answer_labels=["1.", "2."])
    for bad in (dict(answer_labels=5), dict(answer_labels=["1."], answer_tokens=3)):   # a request built directly
        with pytest.raises(DLPError, match="answer_(labels|tokens): expected"):
            DecodeRequest("q", **bad).check()


def test_forced_segment_weights_and_prompts_without_items(make_pipe):
    router = StubRouter({"colour": 0, "plus": 2})
    pipe = make_pipe(router)
    prompt = "1. Name a colour.\n2. What is two plus two?"
    routed = pipe.generate([prompt], SelectionConfig(granularity="segment"), max_new_tokens=10)[0]
    oracle = pipe.generate([prompt], segment_weights=[[{"alpha": 1.0}, {"gamma": 1.0}]], max_new_tokens=10)[0]
    assert oracle.text == routed.text
    assert [(e["selected"], e["source"]) for e in oracle.routing] == [(["alpha"], "forced"), (["gamma"], "forced")]
    plain = "Name a colour. What is two plus two?"           # no numbered items: like prompt granularity
    seg = pipe.generate([plain], SelectionConfig(granularity="segment"), max_new_tokens=8)[0]
    whole = pipe.generate([plain], SelectionConfig(granularity="prompt"), max_new_tokens=8)[0]
    assert seg.text == whole.text and seg.routing == whole.routing and seg.routing[0]["source"] == "prompt"


# CLI

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
    assert [r.text for r in pipe.generate(prompts, SelectionConfig(granularity="prompt"), max_new_tokens=12)] == want
    mix = [{"alpha": 0.6, "beta": 0.4}, {"gamma": 1.0}]
    both = pipe.generate(prompts, weights=mix, max_new_tokens=12)
    assert [pipe.generate([p], weights=[m], max_new_tokens=12)[0].text for p, m in zip(prompts, mix)] == \
        [r.text for r in both]


def test_prompt_plus_budget_beyond_the_context_is_refused_in_one_line(tiny_run):
    from dlp_lora.config import DLPError
    from dlp_lora.models import context_length
    from dlp_lora.pipeline import DLPPipeline
    from dlp_lora.selection import SelectionConfig

    pipe = DLPPipeline.from_run(tiny_run, device="cpu", dtype="fp32")
    ctx = context_length(pipe.model)
    with pytest.raises(DLPError, match=rf"exceed the model's context of {ctx} tokens"):
        pipe.generate(["What is 2 plus 3?"], SelectionConfig(granularity="prompt"), max_new_tokens=ctx)
    assert pipe.generate(["What is 2 plus 3?"], SelectionConfig(granularity="prompt"), max_new_tokens=2)[0].completion_tokens >= 1
