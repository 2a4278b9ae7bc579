"""Top-p selection (paper §3.2, Eq. 5): property tests against a naive per-row reference + hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dlp_lora.config import DLPError
from dlp_lora.router import select_top_p
from dlp_lora.router.select import REACH_TOL


def naive(probs: list[float], top_p: float, weighting: str, max_adapters=None, min_confidence=None) -> list[float]:
    """Per-row reference written from the definition: walk tasks by probability (ties: lower index first),
    keep each one until the kept mass reaches top_p."""
    n = len(probs)
    order = sorted(range(n), key=lambda i: (-probs[i], i))
    kept, mass = [], 0.0
    for i in order:
        if kept and (mass >= top_p - REACH_TOL or probs[i] == 0):
            break
        kept.append(i)
        mass += probs[i]
    if max_adapters:
        kept = kept[:max_adapters]
    if min_confidence and probs[order[0]] < min_confidence:
        kept = []
    w = [0.0] * n
    if not kept:
        return w
    if weighting == "paper":
        z = sum(math.exp(probs[i]) for i in kept)
        for i in kept:
            w[i] = math.exp(probs[i]) / z
    else:
        z = sum(probs[i] for i in kept)
        for i in kept:
            w[i] = probs[i] / z
    return w


@st.composite
def prob_batches(draw):
    n = draw(st.integers(1, 12))
    b = draw(st.integers(1, 6))
    logits = draw(st.lists(st.lists(st.floats(-6, 6, allow_nan=False), min_size=n, max_size=n), min_size=b, max_size=b))
    probs = torch.softmax(torch.tensor(logits, dtype=torch.float32), -1)
    if draw(st.booleans()):   # exact ties and exact zeros
        probs = torch.round(probs * 4) / 4
        probs[:, 0] += 1 - probs.sum(-1)
        probs = probs.clamp_min(0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


@settings(max_examples=150, deadline=None)
@given(prob_batches(), st.floats(0.01, 1.0), st.sampled_from(["paper", "renorm"]),
       st.sampled_from([None, 0, 1, 2, 3]), st.sampled_from([None, 0.0, 0.3, 0.6]))
def test_matches_naive_reference(probs, top_p, weighting, max_adapters, min_confidence):
    w = select_top_p(probs, top_p, weighting, max_adapters=max_adapters, min_confidence=min_confidence)
    assert w.shape == probs.shape and w.dtype == torch.float32
    ref = torch.tensor([naive(row, top_p, weighting, max_adapters, min_confidence) for row in probs.tolist()])
    assert torch.allclose(w, ref, atol=1e-6), (probs, w, ref)


@settings(max_examples=150, deadline=None)
@given(prob_batches(), st.floats(0.01, 1.0), st.sampled_from(["paper", "renorm"]))
def test_kept_set_is_smallest_prefix_reaching_top_p(probs, top_p, weighting):
    w = select_top_p(probs, top_p, weighting)
    for p, row in zip(probs, w):
        kept = row > 0
        k = int(kept.sum())
        assert k >= 1
        assert torch.allclose(row.sum(), torch.tensor(1.0), atol=1e-5)
        # the kept tasks are the k most probable ones
        assert p[kept].min() >= p[~kept].max() if k < len(p) else True
        mass = float(p[kept].double().sum())
        nonzero = int((p > 0).sum())
        assert mass >= top_p - 1e-5 or k == nonzero          # reaches top_p (or every non-zero task is kept)
        assert mass - float(p[kept].min()) < top_p            # minus its smallest member it would not: smallest
        if weighting == "renorm":
            assert torch.allclose(row[kept], p[kept] / p[kept].sum(), atol=1e-6)
        else:
            assert torch.allclose(row[kept], torch.softmax(p[kept], -1), atol=1e-6)


@settings(max_examples=100, deadline=None)
@given(prob_batches(), st.floats(0.01, 0.99), st.floats(0.01, 0.99))
def test_more_top_p_never_keeps_fewer(probs, a, b):
    lo, hi = sorted((a, b))
    assert ((select_top_p(probs, lo) > 0).sum(-1) <= (select_top_p(probs, hi) > 0).sum(-1)).all()


@settings(max_examples=100, deadline=None)
@given(prob_batches())
def test_rows_are_independent_and_1d_input(probs):
    w = select_top_p(probs, 0.7, "renorm")
    for i in range(len(probs)):
        assert torch.equal(select_top_p(probs[i], 0.7, "renorm"), w[i])


def test_hand_computed_cases():
    p = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [0.25, 0.25, 0.5]])
    # 0.5 + 0.3 reaches 0.8 exactly (float32 rounding included): two kept; the third row needs all three
    r = select_top_p(p, 0.8, "renorm")
    assert torch.allclose(r, torch.tensor([[0.625, 0.375, 0.0], [0.0, 2 / 3, 1 / 3], [0.25, 0.25, 0.5]]), atol=1e-6)
    e = math.exp
    w = select_top_p(p, 0.8, "paper")
    z = e(0.5) + e(0.3)
    assert torch.allclose(w[0], torch.tensor([e(0.5) / z, e(0.3) / z, 0.0]), atol=1e-6)
    # paper Eq. 5 is a softmax over probabilities: 0.6/0.3 become 0.574/0.426, flatter than renorm's 2/3, 1/3
    assert torch.allclose(w[1], torch.tensor([0.0, 0.5744425, 0.4255575]), atol=1e-6)
    z3 = 2 * e(0.25) + e(0.5)
    assert torch.allclose(w[2], torch.tensor([e(0.25) / z3, e(0.25) / z3, e(0.5) / z3]), atol=1e-6)


def test_crossing_item_kept_and_tiny_top_p_keeps_top1():
    p = torch.tensor([[0.4, 0.35, 0.25]])
    assert (select_top_p(p, 0.5) > 0).tolist() == [[True, True, False]]      # 0.4 < 0.5: the crossing 0.35 is kept
    assert (select_top_p(p, 1e-9) > 0).tolist() == [[True, False, False]]
    assert (select_top_p(p, 0.4) > 0).tolist() == [[True, False, False]]      # reaching exactly is enough


def test_top_p_one_keeps_every_nonzero_task():
    p = torch.tensor([[0.5, 0.0, 0.3, 0.2, 0.0]])
    w = select_top_p(p, 1.0, "renorm")
    assert torch.allclose(w, p)
    assert (select_top_p(p, 1.0, "paper") > 0).tolist() == [[True, False, True, True, False]]


def test_ties_are_deterministic_lower_index_first():
    p = torch.full((2, 4), 0.25)
    w = select_top_p(p, 0.5, "renorm")
    assert w.tolist() == [[0.5, 0.5, 0.0, 0.0]] * 2
    assert (select_top_p(p, 0.3) > 0).tolist() == [[True, True, False, False]] * 2
    assert (select_top_p(p, 0.2) > 0).tolist() == [[True, False, False, False]] * 2


def test_max_adapters_and_min_confidence():
    p = torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.9, 0.05, 0.05, 0.0]])
    w = select_top_p(p, 1.0, "renorm", max_adapters=2)
    assert torch.allclose(w[0], torch.tensor([0.5, 0.5, 0.0, 0.0]))
    w = select_top_p(p, 0.8, "renorm", min_confidence=0.5)
    assert w[0].tolist() == [0.0, 0.0, 0.0, 0.0]                  # top-1 0.3 < 0.5: base model
    assert w[1].tolist() == [1.0, 0.0, 0.0, 0.0]
    assert select_top_p(p, 0.8, max_adapters=0).shape == (2, 4)   # 0 = no cap


def test_large_batch_is_vectorised_and_consistent():
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(2000, 100, generator=g) * 3, -1)
    w = select_top_p(probs, 0.9)
    assert torch.allclose(w.sum(-1), torch.ones(2000), atol=1e-5)
    ref = torch.tensor([naive(r, 0.9, "paper") for r in probs[:50].tolist()])
    assert torch.allclose(w[:50], ref, atol=1e-6)


@pytest.mark.parametrize("kwargs, needle", [
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_p": 0.5, "weighting": "softmax"}, "weighting"),
    ({"top_p": 0.5, "max_adapters": -1}, "max_adapters"),
    ({"top_p": 0.5, "min_confidence": 2.0}, "min_confidence"),
])
def test_bad_arguments(kwargs, needle):
    with pytest.raises(DLPError, match=needle):
        select_top_p(torch.tensor([[0.5, 0.5]]), **kwargs)


@pytest.mark.parametrize("probs, needle", [
    (torch.tensor([[1.0, 2.0]]), "sums to"),
    (torch.tensor([[1.5, -0.5]]), "negative"),
    (torch.tensor([[float("nan"), 1.0]]), "NaN"),
    (torch.zeros(2, 3, 4), "shape"),
    (torch.zeros(1, 0), "shape"),
])
def test_bad_probs(probs, needle):
    with pytest.raises(DLPError, match=needle):
        select_top_p(probs, 0.5)
