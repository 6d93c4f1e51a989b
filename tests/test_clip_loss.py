"""xfast.clip_loss and xfast.ClipLoss: every backend against the float64 reference."""
from __future__ import annotations

import itertools

import pytest
import torch

import xfast
from tests.loss_cases import SIZES_D, SIZES_N, assert_close64, assert_within_torch_error, backends_for, embeddings, leaf
from xfast import reference


def loss_and_grads(fn, x, y, s, **kw):
    x, y, s = leaf(x), leaf(y), leaf(s)
    loss = fn(x, y, s, **kw)
    loss.backward()
    return loss.detach(), x.grad, y.grad, s.grad


def reference64(x, y, s, label_smoothing=0.0):
    return loss_and_grads(reference.clip_loss, x.double(), y.double(), s.double(), label_smoothing=label_smoothing)


CASES = [
    pytest.param(n, d, backend, id=f"N{n}-d{d}-{backend}", marks=[pytest.mark.slow] if n >= 300 else [])
    for n, d in itertools.product(SIZES_N, SIZES_D)
    for backend in backends_for(n, d)
]


@pytest.mark.parametrize("n,d,backend", CASES)
def test_matches_float64_reference(n, d, backend):
    seed = 1000 * n + d
    x, y = embeddings(n, d, seed=seed), embeddings(n, d, seed=seed + 1)
    s = torch.tensor([100.0, 14.3, 1.0][seed % 3], dtype=torch.float64)
    ls = 0.1 if seed % 2 else 0.0
    got = loss_and_grads(xfast.clip_loss, x, y, s, label_smoothing=ls, backend=backend)
    for what, a, e in zip(("loss", "dx", "dy", "dlogit_scale"), got, reference64(x, y, s, ls)):
        assert_close64(a, e, what)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("n,d,norm,scale", [(7, 45, 3.0, 100.0), (64, 128, 0.2, 30.0), (300, 45, 2.0, 50.0)])
def test_unnormalised_inputs(backend, n, d, norm, scale):
    if backend == "triton" and n > 64:
        pytest.skip("interpreter: small sizes only")
    x = embeddings(n, d, normalised=False, scale=norm, seed=n)
    y = embeddings(n, d, normalised=False, scale=norm, seed=n + 7)
    s = torch.tensor([scale], dtype=torch.float64)  # open_clip keeps logit_scale with shape (1,)
    got = loss_and_grads(xfast.clip_loss, x, y, s, backend=backend)
    assert got[3].shape == (1,)
    for what, a, e in zip(("loss", "dx", "dy", "dlogit_scale"), got, reference64(x, y, s)):
        assert_close64(a, e, what)


@pytest.mark.parametrize("backend", ["cpu", "dense", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_error_within_twice_torch(backend, dtype):
    n, d = (64, 128) if backend == "triton" else (300, 128)
    x = embeddings(n, d, seed=11).to(dtype)
    y = embeddings(n, d, seed=12).to(dtype)
    s = torch.tensor(50.0, dtype=torch.float32)
    exact = reference64(x, y, s)
    ours = loss_and_grads(xfast.clip_loss, x, y, s, backend=backend)
    plain = loss_and_grads(reference.clip_loss, x, y, s.to(dtype))
    assert ours[1].dtype == dtype and ours[2].dtype == dtype
    for what, a, p, e in zip(("loss", "dx", "dy", "dlogit_scale"), ours, plain, exact):
        assert_within_torch_error(a, p, e, what, floor=1e-5 * (1 + e.abs().max().item()))


@pytest.mark.parametrize("backend", ["cpu", "dense", "triton"])
def test_no_overflow_when_naive_exp_would(backend):
    # logits up to 100 * 10 * 10 = 1e4: exp overflows float32 and float64 alike.
    n, d = 16, 32
    x = embeddings(n, d, scale=10.0, seed=3).float()
    y = embeddings(n, d, scale=10.0, seed=4).float()
    s = torch.tensor(100.0)
    assert torch.isinf(torch.exp(s * x @ y.T)).any()
    got = loss_and_grads(xfast.clip_loss, x, y, s, backend=backend)
    exact = reference64(x, y, s)
    for what, a, e in zip(("loss", "dx", "dy", "dlogit_scale"), got, exact):
        assert torch.isfinite(a).all(), what
        torch.testing.assert_close(a.double(), e, rtol=1e-4, atol=1e-3 * (1 + e.abs().max().item()))


def test_cpu_backend_is_deterministic():
    x, y = embeddings(700, 64, seed=5).float(), embeddings(700, 64, seed=6).float()
    s = torch.tensor(20.0)
    first = loss_and_grads(xfast.clip_loss, x, y, s, backend="cpu")
    second = loss_and_grads(xfast.clip_loss, x, y, s, backend="cpu")
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_cpu_thread_count_changes_only_rounding():
    x, y = embeddings(600, 64, seed=8).float(), embeddings(600, 64, seed=9).float()
    s = torch.tensor(20.0)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = loss_and_grads(xfast.clip_loss, x, y, s, backend="cpu")
    finally:
        torch.set_num_threads(threads)
    many = loss_and_grads(xfast.clip_loss, x, y, s, backend="cpu")
    for a, b in zip(one, many):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_clip_loss_module_is_open_clip_compatible():
    x, y = embeddings(32, 16, seed=1), embeddings(32, 16, seed=2)
    s = torch.tensor([14.0], dtype=torch.float64)
    module = xfast.ClipLoss(local_loss=False, gather_with_grad=False, cache_labels=True, rank=0, world_size=1)
    out = module(x, y, s, output_dict=True)
    assert set(out) == {"contrastive_loss"}
    assert_close64(out["contrastive_loss"], reference.clip_loss(x, y, s), "loss")
    assert_close64(module(x, y, s), out["contrastive_loss"], "loss")


BAD_INPUTS = [
    ("batch", lambda x, y, s: (x, y[:-1], s), "y has batch size"),
    ("dim", lambda x, y, s: (x, y[:, :-1], s), "y has embedding dim"),
    ("1-D", lambda x, y, s: (x[0], y, s), "x must be 2-D"),
    ("int", lambda x, y, s: (x, y.long(), s), "y must be float32"),
    ("dtype mix", lambda x, y, s: (x, y.double(), s), "y has dtype"),
    ("device", lambda x, y, s: (x, y.to("meta"), s), "y is on meta"),
    ("nan", lambda x, y, s: (x.masked_fill(x > 1, float("nan")), y, s), "x contains NaN"),
    ("inf", lambda x, y, s: (x, y.masked_fill(y > 1, float("inf")), s), "y contains NaN or inf"),
    ("empty", lambda x, y, s: (x[:0], y[:0], s), "x is empty"),
    ("zero scale", lambda x, y, s: (x, y, s * 0), "logit_scale must be positive"),
    ("negative scale", lambda x, y, s: (x, y, -s), "logit_scale must be positive"),
    ("nan scale", lambda x, y, s: (x, y, s * float("nan")), "logit_scale must be positive"),
    ("vector scale", lambda x, y, s: (x, y, s.repeat(2)), "logit_scale must hold a single value"),
]


@pytest.mark.parametrize("case,mutate,message", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_names_the_argument(case, mutate, message):
    x, y = torch.randn(8, 4), torch.randn(8, 4)
    args = mutate(x, y, torch.tensor(10.0))
    with pytest.raises(ValueError, match=message):
        xfast.clip_loss(*args)


def test_bad_options():
    x, y, s = torch.randn(8, 4), torch.randn(8, 4), torch.tensor(10.0)
    with pytest.raises(ValueError, match="backend must be one of"):
        xfast.clip_loss(x, y, s, backend="cuda")
    with pytest.raises(ValueError, match="label_smoothing"):
        xfast.clip_loss(x, y, s, label_smoothing=1.5)


def test_unavailable_backend_says_why(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="backend 'triton' is unavailable"):
        xfast.clip_loss(torch.randn(4, 3), torch.randn(4, 3), 10.0, backend="triton")
