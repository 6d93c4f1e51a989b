"""xfast.simcse_loss and xfast.SimCSELoss: every backend against the float64 reference."""
from __future__ import annotations

import itertools

import pytest
import torch

import xfast
from tests.loss_cases import SIZES_D, SIZES_N, assert_close64, assert_within_torch_error, backends_for, embeddings, leaf
from xfast import reference


def loss_and_grads(fn, z1, z2, z3, tau, **kw):
    z1, z2, tau = leaf(z1), leaf(z2), leaf(tau)
    z3 = None if z3 is None else leaf(z3)
    loss = fn(z1, z2, z3, temperature=tau, **kw)
    loss.backward()
    return (loss.detach(), z1.grad, z2.grad, tau.grad) + (() if z3 is None else (z3.grad,))


def reference64(z1, z2, z3, tau, **kw):
    z3 = None if z3 is None else z3.double()
    return loss_and_grads(reference.simcse_loss, z1.double(), z2.double(), z3, tau.double(), **kw)


NAMES = ("loss", "dz1", "dz2", "dtemperature", "dhard_negatives")
CASES = [
    pytest.param(n, d, backend, id=f"N{n}-d{d}-{backend}", marks=[pytest.mark.slow] if n >= 300 else [])
    for n, d in itertools.product(SIZES_N, SIZES_D)
    for backend in backends_for(n, d)
]


@pytest.mark.parametrize("n,d,backend", CASES)
@pytest.mark.parametrize("supervised", [False, True], ids=["unsup", "sup"])
def test_matches_float64_reference(n, d, backend, supervised):
    seed = 7 * n + d
    # SimCSE normalises inside (cosine similarity): feed unnormalised embeddings.
    z1 = embeddings(n, d, normalised=False, seed=seed)
    z2 = embeddings(n, d, normalised=False, scale=2.0, seed=seed + 1)
    z3 = embeddings(n, d, normalised=False, seed=seed + 2) if supervised else None
    kw = {"hard_negative_weight": 0.7} if supervised else {}
    tau = torch.tensor(0.05 if seed % 2 else 0.5, dtype=torch.float64)
    got = loss_and_grads(xfast.simcse_loss, z1, z2, z3, tau, backend=backend, **kw)
    for what, a, e in zip(NAMES, got, reference64(z1, z2, z3, tau, **kw)):
        assert_close64(a, e, what)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("weight", [-2.0, 0.0, 3.0])
def test_hard_negative_weight(backend, weight):
    z1, z2, z3 = (embeddings(20, 16, seed=s) for s in (1, 2, 3))
    tau = torch.tensor(0.05, dtype=torch.float64)
    got = loss_and_grads(xfast.simcse_loss, z1, z2, z3, tau, hard_negative_weight=weight, backend=backend)
    for what, a, e in zip(NAMES, got, reference64(z1, z2, z3, tau, hard_negative_weight=weight)):
        assert_close64(a, e, what)


@pytest.mark.parametrize("backend", ["cpu", "dense", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_error_within_twice_torch(backend, dtype):
    n, d = (64, 128) if backend == "triton" else (300, 128)
    z1, z2, z3 = (embeddings(n, d, seed=s).to(dtype) for s in (4, 5, 6))
    tau = torch.tensor(0.05)
    exact = reference64(z1, z2, z3, tau, hard_negative_weight=0.5)
    ours = loss_and_grads(xfast.simcse_loss, z1, z2, z3, tau, hard_negative_weight=0.5, backend=backend)
    plain = loss_and_grads(reference.simcse_loss, z1, z2, z3, tau.to(dtype), hard_negative_weight=0.5)
    for what, a, p, e in zip(NAMES, ours, plain, exact):
        assert_within_torch_error(a, p, e, what, floor=1e-5 * (1 + e.abs().max().item()))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_rows_path_low_precision_error_within_twice_torch(dtype, monkeypatch):
    # d >= 256: the CPU kernel's rows path (gradients computed in the forward, 3 GEMMs), with
    # 16-bit inputs computed in float32; the loss's mean gives every row the same weight.
    from xfast.kernels import cpu_similarity_lse

    calls = []
    eager = cpu_similarity_lse.forward_rows_with_gradients
    monkeypatch.setattr(cpu_similarity_lse, "forward_rows_with_gradients", lambda *a: calls.append(1) or eager(*a))
    monkeypatch.setattr(cpu_similarity_lse, "eager_rows_pays", lambda d, m: True)  # whatever the thread count
    n, d = 300, 256
    z1, z2, z3 = (embeddings(n, d, seed=s).to(dtype) for s in (14, 15, 16))
    tau = torch.tensor(0.05)
    exact = reference64(z1, z2, z3, tau, hard_negative_weight=0.5)
    ours = loss_and_grads(xfast.simcse_loss, z1, z2, z3, tau, hard_negative_weight=0.5, backend="cpu")
    plain = loss_and_grads(reference.simcse_loss, z1, z2, z3, tau.to(dtype), hard_negative_weight=0.5)
    assert calls == [1], "the rows path was not taken"
    assert all(g.dtype == dtype for g in (ours[1], ours[2], ours[4])), "embedding gradients in the input dtype"
    for what, a, p, e in zip(NAMES, ours, plain, exact):
        assert_within_torch_error(a, p, e, what, floor=1e-5 * (1 + e.abs().max().item()))


@pytest.mark.parametrize("backend", ["cpu", "dense", "triton"])
def test_no_overflow_at_tiny_temperature(backend):
    z1, z2, z3 = (embeddings(16, 8, seed=s).float() for s in (7, 8, 9))
    tau = torch.tensor(1e-3)  # logits up to 1000
    got = loss_and_grads(xfast.simcse_loss, z1, z2, z3, tau, backend=backend)
    exact = reference64(z1, z2, z3, tau)
    for what, a, e in zip(NAMES, got, exact):
        assert torch.isfinite(a).all(), what
        torch.testing.assert_close(a.double(), e, rtol=1e-3, atol=1e-3 * (1 + e.abs().max().item()))


def test_module_matches_sentence_transformers_convention():
    # MultipleNegativesRankingLoss(scale=20) == SimCSE with temperature 1/20.
    z1, z2 = embeddings(12, 10, seed=1), embeddings(12, 10, seed=2)
    module = xfast.SimCSELoss(temperature=1 / 20)
    assert "temperature=0.05" in repr(module)
    logits = 20 * torch.nn.functional.normalize(z1, dim=-1) @ torch.nn.functional.normalize(z2, dim=-1).T
    expected = torch.nn.functional.cross_entropy(logits, torch.arange(12))
    assert_close64(module(z1, z2), expected, "loss")


def test_bad_input_names_the_argument():
    z = torch.randn(6, 4)
    with pytest.raises(ValueError, match="hard_negatives has batch size"):
        xfast.simcse_loss(z, z, z[:5])
    with pytest.raises(ValueError, match="hard_negatives has embedding dim"):
        xfast.simcse_loss(z, z, z[:, :3])
    with pytest.raises(ValueError, match="z2 must be 2-D"):
        xfast.simcse_loss(z, z[0])
    with pytest.raises(ValueError, match="z1 contains NaN"):
        xfast.simcse_loss(z / 0 * 0, z)
    with pytest.raises(ValueError, match="temperature must be positive"):
        xfast.simcse_loss(z, z, temperature=0.0)
    with pytest.raises(ValueError, match="temperature must be positive"):
        xfast.simcse_loss(z, z, temperature=torch.tensor(-0.1))
    with pytest.raises(ValueError, match="hard_negative_weight is set but no hard_negatives"):
        xfast.simcse_loss(z, z, hard_negative_weight=1.0)
    with pytest.raises(ValueError, match="hard_negative_weight must be finite"):
        xfast.simcse_loss(z, z, z, hard_negative_weight=float("inf"))
    with pytest.raises(ValueError, match="z1 is empty"):
        xfast.simcse_loss(z[:0], z[:0])
