"""The fused engine (DESIGN §4): exactness against a naive reference and PEFT, merge, export, detach, bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from dlp_lora.config import DLPError
from dlp_lora.fusion import FusedLoRALinear, fuse_adapters, make_random_adapter
from dlp_lora.models import load_model, make_tiny_model

# adapters that differ in rank, alpha, rsLoRA and target modules
SPECS = [
    dict(rank=8, alpha=16, target_modules=("q_proj", "v_proj"), use_rslora=False),
    dict(rank=4, alpha=8, target_modules=("q_proj", "o_proj", "up_proj"), use_rslora=True),
    dict(rank=16, alpha=4, target_modules=("v_proj",), use_rslora=False),
    dict(rank=2, alpha=3, target_modules=("q_proj", "k_proj", "down_proj"), use_rslora=False),
]
PROMPTS = ["The quick brown fox. It jumps over the lazy dog!", "Hi", "What is 2 + 3? Answer with a number."]


@pytest.fixture(scope="module")
def adapters(tiny_model_path, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    model, _ = load_model(tiny_model_path, device="cpu", dtype="fp32")
    return [make_random_adapter(model, root / f"task{i}", seed=i, **spec) for i, spec in enumerate(SPECS)]


@pytest.fixture
def fresh(tiny_model_path):
    """A model copy the test may wrap."""
    return load_model(tiny_model_path, device="cpu", dtype="fp32")


def _batch(tok, prompts=PROMPTS):
    enc = tok(prompts, return_tensors="pt", padding=True)
    pos = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    return dict(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], position_ids=pos)


def _naive_logits(model, adapter_dirs, weights, batch):
    """Reference: W·x + Σ_i w_i·s_i·B_i·A_i·x via forward hooks on an untouched model, reading the PEFT files
    independently of the engine."""
    handles = []
    for i, d in enumerate(adapter_dirs):
        cfg = json.loads((d / "adapter_config.json").read_text())
        sd = load_file(str(d / "adapter_model.safetensors"))
        for key, A in sd.items():
            if not key.endswith("lora_A.weight"):
                continue
            mod = key[len("base_model.model."):-len(".lora_A.weight")]
            B = sd[key.replace("lora_A", "lora_B")]
            r = A.shape[0]
            s = cfg["lora_alpha"] / (math.sqrt(r) if cfg.get("use_rslora") else r)

            def hook(m, inp, out, A=A, B=B, s=s, i=i):
                x = inp[0]
                w = weights[..., i]
                w = w.view(w.shape[0], 1, 1) if weights.dim() == 2 else w.unsqueeze(-1)
                return out + w * s * ((x @ A.T) @ B.T)

            handles.append(model.get_submodule(mod).register_forward_hook(hook))
    try:
        with torch.no_grad():
            return model(**batch).logits
    finally:
        for h in handles:
            h.remove()


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def test_fused_equals_naive_reference_for_random_weights(fresh, tiny_model_path, adapters):
    model, tok = fresh
    ref_model, _ = load_model(tiny_model_path, device="cpu", dtype="fp32")
    batch = _batch(tok)
    fused = fuse_adapters(model, adapters)
    assert fused.names == [f"task{i}" for i in range(len(SPECS))]
    gen = torch.Generator().manual_seed(0)
    bsz, seq = batch["input_ids"].shape
    cases = [torch.rand(bsz, len(SPECS), generator=gen) for _ in range(3)]
    sparse = torch.rand(bsz, len(SPECS), generator=gen)
    sparse[0, 1:] = 0
    sparse[1, :2] = 0
    sparse[2, ::2] = 0           # rows use different adapter subsets: the per-row path
    cases.append(sparse)
    per_token = torch.rand(bsz, seq, len(SPECS), generator=gen) * (torch.rand(bsz, seq, len(SPECS), generator=gen) > 0.5)
    cases.append(per_token)      # (B, S, N) per-token mixtures
    for w in cases:
        with fused.mixture(w):
            got = _logits(model, batch)
        want = _naive_logits(ref_model, adapters, w, batch)
        assert torch.allclose(got, want, atol=1e-5, rtol=0), (got - want).abs().max()
    fused.detach()


@pytest.mark.parametrize("i", range(len(SPECS)))
def test_one_hot_equals_peft_single_adapter(fresh, tiny_model_path, adapters, i):
    from peft import PeftModel

    model, tok = fresh
    batch = _batch(tok)
    peft_model = PeftModel.from_pretrained(load_model(tiny_model_path, device="cpu", dtype="fp32")[0], adapters[i]).eval()
    want = _logits(peft_model, batch)
    fused = fuse_adapters(model, adapters)
    w = torch.zeros(1, len(SPECS))
    w[0, i] = 1.0
    with fused.mixture(w):
        got = _logits(model, batch)
    assert torch.allclose(got, want, atol=1e-5, rtol=0)


def test_zero_weights_and_no_weights_equal_base_exactly(fresh, tiny, adapters):
    model, tok = fresh
    batch = _batch(tok)
    base = _logits(tiny[0], batch)
    fused = fuse_adapters(model, adapters)
    assert torch.equal(_logits(model, batch), base)
    with fused.mixture(torch.zeros(3, len(SPECS))):
        assert torch.equal(_logits(model, batch), base)
    with fused.mixture(torch.rand(3, len(SPECS))):
        assert not torch.allclose(_logits(model, batch), base, atol=1e-3)
    assert torch.equal(_logits(model, batch), base)  # cleared on exit


def test_each_row_of_a_mixed_batch_equals_the_row_alone(fresh, adapters):
    model, tok = fresh
    fused = fuse_adapters(model, adapters)
    w = torch.tensor([[0.7, 0.0, 0.3, 0.0], [0.0, 1.0, 0.0, 0.0], [0.2, 0.2, 0.2, 0.4]])
    batch = _batch(tok)
    with fused.mixture(w):
        mixed = _logits(model, batch)
    for row, prompt in enumerate(PROMPTS):
        alone_batch = _batch(tok, [prompt])
        with fused.mixture(w[row:row + 1]):
            alone = _logits(model, alone_batch)
        n = alone.shape[1]
        assert torch.allclose(mixed[row, -n:], alone[0], atol=1e-5, rtol=0)


def test_kv_cache_decode_with_per_row_and_per_token_weights(fresh, tiny_model_path, adapters):
    """Prefill with per-token (B,S,N) weights, then one cached decode step with (B,N) weights == naive full pass."""
    model, tok = fresh
    ref_model, _ = load_model(tiny_model_path, device="cpu", dtype="fp32")
    batch = _batch(tok)
    bsz, seq = batch["input_ids"].shape
    fused = fuse_adapters(model, adapters)
    gen = torch.Generator().manual_seed(1)
    w_prefill = torch.rand(bsz, seq, len(SPECS), generator=gen)
    w_step = torch.tensor([[0.0, 0.5, 0.0, 0.0], [1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.3, 0.0]])
    nxt = torch.tensor([[42], [7], [1000]])
    with torch.no_grad():
        fused.set_weights(w_prefill)
        out = model(**batch, use_cache=True)
        fused.set_weights(w_step)
        mask = torch.cat([batch["attention_mask"], torch.ones(bsz, 1, dtype=torch.long)], 1)
        step = model(input_ids=nxt, attention_mask=mask, position_ids=batch["position_ids"][:, -1:] + 1,
                     past_key_values=out.past_key_values, use_cache=True).logits[:, -1]
        fused.clear_weights()
    full = {"input_ids": torch.cat([batch["input_ids"], nxt], 1), "attention_mask": mask,
            "position_ids": torch.cat([batch["position_ids"], batch["position_ids"][:, -1:] + 1], 1)}
    w_full = torch.cat([w_prefill, w_step.unsqueeze(1)], 1)
    want = _naive_logits(ref_model, adapters, w_full, full)[:, -1]
    assert torch.allclose(step, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("w_step", [
    [[0.0, 0.5, 0.0, 0.7], [1.0, 0.0, 0.0, 1.0], [0.0, 0.4, 0.3, 0.0]],   # 3 rows, 4 adapters used in the batch
    [[0.6, 0.5, 0.0, 0.0], [0.0, 0.0, 0.3, 0.9]],                         # 2 rows, disjoint adapters
])
def test_both_decode_paths_agree_with_the_reference(fresh, tiny_model_path, adapters, w_step):
    """Rows on different adapters: a cached decode step gives the naive reference's logits (1e-5) on the per-row
    path (what "auto" picks for these small batches) and on the union path (``state.decode_path``)."""
    model, tok = fresh
    ref_model, _ = load_model(tiny_model_path, device="cpu", dtype="fp32")
    w_step = torch.tensor(w_step)
    bsz = w_step.shape[0]
    batch = _batch(tok, PROMPTS[:bsz])
    fused = fuse_adapters(model, adapters)
    nxt = torch.tensor([[42], [7], [1000]])[:bsz]
    mask = torch.cat([batch["attention_mask"], torch.ones(bsz, 1, dtype=torch.long)], 1)
    steps = {}
    with torch.no_grad():
        for union in (False, True):
            fused.state.decode_path = "union" if union else "auto"   # a preference kept across set_weights
            fused.set_weights(w_step)
            assert fused.state.row_idx is not None             # rows differ: prefill takes the per-row path
            assert fused.state.rows_decode is not union
            out = model(**batch, use_cache=True)
            steps[union] = model(input_ids=nxt, attention_mask=mask,
                                 position_ids=batch["position_ids"][:, -1:] + 1,
                                 past_key_values=out.past_key_values, use_cache=True).logits[:, -1]
        fused.clear_weights()
        fused.state.decode_path = "auto"
    full = {"input_ids": torch.cat([batch["input_ids"], nxt], 1), "attention_mask": mask,
            "position_ids": torch.cat([batch["position_ids"], batch["position_ids"][:, -1:] + 1], 1)}
    want = _naive_logits(ref_model, adapters, w_step, full)[:, -1]
    assert torch.allclose(steps[False], want, atol=1e-5, rtol=0)
    assert torch.allclose(steps[True], want, atol=1e-5, rtol=0)


def test_decode_paths_agree_on_one_layer_with_many_adapters():
    """A 16-row batch of different <=3-adapter mixtures out of 26 (the benchmark's P2 shape, small dims): "auto"
    picks the per-row decode path; per-row and union outputs agree within 1e-5 and equal the einsum reference."""
    from dlp_lora.fusion import MixtureState

    gen = torch.Generator().manual_seed(0)
    n, r, d_in, d_out, bsz = 26, 4, 32, 24, 16
    state = MixtureState(n, torch.device("cpu"))
    base = torch.nn.Linear(d_in, d_out)
    layer = FusedLoRALinear(base, torch.randn(n, r, d_in, generator=gen), torch.randn(n, r, d_out, generator=gen),
                            [r] * n, state)
    w = torch.zeros(bsz, n)
    for b in range(bsz):
        idx = torch.randperm(21, generator=gen)[: 1 + b % 3]
        w[b, idx] = torch.rand(len(idx), generator=gen) + 0.1
    state.set(w)
    assert state.k_row == 3 and state.rows_decode           # 16*3 <= 5 * n_union (<= 21)
    x = torch.randn(bsz, 1, d_in, generator=gen)
    want = base(x) + torch.einsum("bn,nrd,nre,bse->bsd", w, layer.Bt, layer.A, x)
    with torch.no_grad():
        rows = layer(x)
        state.decode_path = "union"
        state.set(w)
        assert not state.rows_decode
        union = layer(x)
    assert torch.allclose(union, rows, atol=1e-5, rtol=0)
    assert torch.allclose(rows, want, atol=1e-4, rtol=0)


def test_auto_decode_path_switches_to_the_union_for_large_batches_of_few_adapters():
    """Many rows sharing a few adapters: per-row copies would read batch * k_row adapters for n_union distinct
    ones, so "auto" takes the union path beyond ROWS_DECODE_LIMIT; a bad preference is a DLPError."""
    from dlp_lora.fusion import ROWS_DECODE_LIMIT, MixtureState

    state = MixtureState(4, torch.device("cpu"))
    few = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.0, 0.5, 0.5, 0.0], [0.5, 0.0, 0.5, 0.0]])
    state.set(few)                                               # 3 rows x 2 <= 5 x 3 -> per-row
    assert state.row_idx is not None and state.rows_decode
    state.set(few.repeat(8, 1))                                  # 24 rows x 2 = 48 > 5 x 3 -> union
    assert state.row_idx is not None and not state.rows_decode and 24 * 2 > ROWS_DECODE_LIMIT * 3
    state.decode_path = "rows"
    state.set(few.repeat(8, 1))
    assert state.rows_decode
    state.decode_path = "fast"
    with pytest.raises(DLPError, match="decode_path"):
        state.set(few)


def test_merge_equals_unmerged_and_unmerge_restores_exactly(fresh, adapters):
    model, tok = fresh
    batch = _batch(tok, PROMPTS[:1])
    fused = fuse_adapters(model, adapters)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    w = torch.tensor([0.6, 0.0, 0.25, 0.15])
    with fused.mixture(w.view(1, -1)):
        want = _logits(model, batch)
    fused.merge(w)
    got = _logits(model, batch)
    assert torch.allclose(got, want, atol=1e-5, rtol=0)
    fused.merge({"task1": 1.0})  # re-merging replaces the mixture
    fused.unmerge()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_detach_restores_the_base_model_bit_for_bit(fresh, adapters):
    model, tok = fresh
    originals = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fused = fuse_adapters(model, adapters)
    assert sum(isinstance(m, FusedLoRALinear) for m in model.modules()) == len(fused.layers) > 0
    fused.merge(torch.ones(len(SPECS)))
    fused.set_weights(torch.ones(1, len(SPECS)))
    fused.detach()
    assert not any(isinstance(m, FusedLoRALinear) for m in model.modules())
    now = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert all(now[n] is m for n, m in originals.items())
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(DLPError):
        fused.set_weights(torch.ones(1, len(SPECS)))


def test_export_mixture_loads_in_peft_and_reproduces_the_fused_output(fresh, tiny_model_path, adapters, tmp_path):
    from peft import PeftModel

    model, tok = fresh
    batch = _batch(tok)
    fused = fuse_adapters(model, adapters)
    w = torch.tensor([0.5, 0.2, 0.0, 0.3])
    with fused.mixture(w.view(1, -1)):
        want = _logits(model, batch)
    out = fused.export_mixture(w, tmp_path / "mix")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert not cfg["use_rslora"] and cfg["lora_alpha"] == cfg["r"]
    sd = load_file(str(out / "adapter_model.safetensors"))
    q = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    assert sd[q].shape[0] == 8 + 4 + 2  # Σ r_i of the used adapters that target q_proj
    peft_model = PeftModel.from_pretrained(load_model(tiny_model_path, device="cpu", dtype="fp32")[0], out).eval()
    got = _logits(peft_model, batch)
    assert torch.allclose(got, want, atol=1e-5, rtol=0)
    with pytest.raises(DLPError, match="all weights are zero"):
        fused.export_mixture(torch.zeros(len(SPECS)), tmp_path / "zero")
    assert not (tmp_path / "zero").exists()


def test_bf16_model_runs_close_to_fp32(tiny_model_path, adapters):
    m32, tok = load_model(tiny_model_path, device="cpu", dtype="fp32")
    m16, _ = load_model(tiny_model_path, device="cpu", dtype="bf16")
    batch = _batch(tok)
    w = torch.tensor([[0.5, 0.5, 0, 0], [0, 0, 1, 0], [0.3, 0, 0, 0.7]])
    outs = []
    for m in (m32, m16):
        f = fuse_adapters(m, adapters)
        assert f.layers["model.layers.0.self_attn.q_proj"].A.dtype == m.dtype
        with f.mixture(w):
            outs.append(_logits(m, batch).float())
    assert (outs[0] - outs[1]).abs().max() < 0.1


# ---------------------------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------------------------

def test_adapter_from_another_base_model_names_the_module(fresh, tmp_path):
    model, _ = fresh
    other_path = make_tiny_model(tmp_path / "other", hidden=32)
    other, _ = load_model(other_path, device="cpu", dtype="fp32")
    d = make_random_adapter(other, tmp_path / "foreign")
    with pytest.raises(DLPError, match=r"foreign: module model\.layers\.0\.self_attn\.q_proj: .*another base model"):
        fuse_adapters(model, [d])
    assert not any(isinstance(m, FusedLoRALinear) for m in model.modules())


def test_folder_without_peft_files(fresh, tmp_path, adapters):
    model, _ = fresh
    (tmp_path / "empty").mkdir()
    with pytest.raises(DLPError, match="not a PEFT LoRA folder"):
        fuse_adapters(model, [adapters[0], tmp_path / "empty"])
    with pytest.raises(DLPError, match="not found"):
        fuse_adapters(model, [tmp_path / "missing"])
    assert not any(isinstance(m, FusedLoRALinear) for m in model.modules())


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_adapter_with_nan_or_inf_is_refused_at_load(fresh, tmp_path, adapters, bad):
    import shutil

    from safetensors.torch import save_file

    model, _ = fresh
    d = tmp_path / "poisoned"
    shutil.copytree(adapters[0], d)
    sd = load_file(str(d / "adapter_model.safetensors"))
    key = sorted(k for k in sd if "lora_B" in k)[1]
    sd[key][3, 1] = bad
    save_file(sd, str(d / "adapter_model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(DLPError) as err:
        fuse_adapters(model, [adapters[1], d])
    msg = str(err.value)
    assert "\n" not in msg and "poisoned/adapter_model.safetensors" in msg and key in msg and "NaN or infinite" in msg
    assert not any(isinstance(m, FusedLoRALinear) for m in model.modules())


@pytest.mark.parametrize("w, needle", [
    (torch.ones(2, 3), "expected shape"),
    (torch.ones(4), "expected shape"),
    (torch.tensor([[1.0, -0.5, 0.0, 0.0]]), ">= 0"),
    (torch.tensor([[float("nan"), 0.0, 0.0, 0.0]]), ">= 0"),
    (torch.tensor([[float("inf"), 0.0, 0.0, 0.0]]), ">= 0"),
])
def test_bad_weights(fresh, adapters, w, needle):
    model, _ = fresh
    fused = fuse_adapters(model, adapters)
    with pytest.raises(DLPError, match=needle):
        fused.set_weights(w)
    with pytest.raises(DLPError):
        fused.merge(torch.tensor([1.0, -1.0, 0, 0]))
    with pytest.raises(DLPError, match="unknown task"):
        fused.weights_vector({"nope": 1.0})


def test_weights_batch_must_match_the_input(fresh, adapters):
    model, tok = fresh
    fused = fuse_adapters(model, adapters)
    with fused.mixture(torch.ones(2, len(SPECS))), pytest.raises(DLPError, match="batch 2"):
        _logits(model, _batch(tok))
