"""backend="auto" on CPU: the dense path below xfast.backends.DENSE_MAX_CELLS, the fused kernel above.

Both sides of the crossover against the float64 reference (values and gradients, the learnable
scale / temperature included, ragged sizes), which path ran, and the errors both paths share.
"""
from __future__ import annotations

import math

import pytest
import torch

import xfast
from tests.loss_cases import assert_close64, embeddings, leaf
from xfast import reference
from xfast._checks import trusted_values
from xfast.backends import DENSE_MAX_CELLS, local_backend
from xfast.kernels import check_available, cpu_similarity_lse
from xfast.ops import similarity_lse as similarity_lse_module

EDGE = math.isqrt(DENSE_MAX_CELLS)  # the largest square batch the dense path takes
HN_EDGE = math.isqrt(DENSE_MAX_CELLS // 2)  # the largest simcse batch with hard negatives (n x 2n logits) it takes


class Paths:
    """Counts the calls of the dense path and of the fused CPU kernel."""

    def __init__(self, monkeypatch):
        self.dense = self.fused = 0
        dense, fused = similarity_lse_module.dense_similarity_lse, cpu_similarity_lse.forward

        def counted_dense(*args, **kwargs):
            self.dense += 1
            return dense(*args, **kwargs)

        def counted_fused(*args, **kwargs):
            self.fused += 1
            return fused(*args, **kwargs)

        monkeypatch.setattr(similarity_lse_module, "dense_similarity_lse", counted_dense)
        monkeypatch.setattr(cpu_similarity_lse, "forward", counted_fused)

    def ran(self) -> str:
        assert self.dense + self.fused == 1, (self.dense, self.fused)
        return "dense" if self.dense else "cpu"


def clip_case(n, d, seed, **kw):
    x, y = embeddings(n, d, seed=seed), embeddings(n, d, seed=seed + 1)
    s = torch.tensor([30.0], dtype=torch.float64)
    xs, ys, ss = leaf(x), leaf(y), leaf(s)
    loss = xfast.clip_loss(xs, ys, ss, **kw)
    loss.backward()
    xr, yr, sr = leaf(x), leaf(y), leaf(s)
    expected = reference.clip_loss(xr, yr, sr, label_smoothing=kw.get("label_smoothing", 0.0))
    expected.backward()
    return (loss, xs.grad, ys.grad, ss.grad), (expected, xr.grad, yr.grad, sr.grad)


def simcse_case(n, d, seed, hard_negatives, **kw):
    zs = [embeddings(n, d, seed=seed + i, normalised=False, scale=3.0) for i in range(3 if hard_negatives else 2)]
    tau = torch.tensor(0.05, dtype=torch.float64)
    weight = 0.4 if hard_negatives else 0.0
    ours = [leaf(z) for z in (*zs, tau)]
    loss = xfast.simcse_loss(*ours[:-1], temperature=ours[-1], hard_negative_weight=weight, **kw) \
        if hard_negatives else xfast.simcse_loss(ours[0], ours[1], temperature=ours[-1], **kw)
    loss.backward()
    ref = [leaf(z) for z in (*zs, tau)]
    expected = reference.simcse_loss(ref[0], ref[1], ref[2] if hard_negatives else None, temperature=ref[-1],
                                     hard_negative_weight=weight)
    expected.backward()
    return (loss, *(t.grad for t in ours)), (expected, *(t.grad for t in ref))


# (n, expected path): ragged sizes on both sides of the crossover
CLIP_SIZES = [(1, "dense"), (7, "dense"), (EDGE - 3, "dense"), (EDGE, "dense"), (EDGE + 1, "cpu"), (2 * EDGE + 5, "cpu")]


@pytest.mark.parametrize("n,path", CLIP_SIZES)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_clip_both_sides_of_the_crossover_match_float64(monkeypatch, n, path, label_smoothing):
    paths = Paths(monkeypatch)
    got, expected = clip_case(n, 19, seed=n, label_smoothing=label_smoothing)
    assert paths.ran() == path
    for what, a, e in zip(("loss", "dx", "dy", "dlogit_scale"), got, expected):
        assert_close64(a, e, what)


# simcse's logit block is n x n (unsupervised) or n x 2n (with hard negatives)
SIMCSE_SIZES = [(3, False), (EDGE, False), (EDGE + 1, False), (5, True), (HN_EDGE, True), (HN_EDGE + 1, True)]


@pytest.mark.parametrize("n,hard_negatives", SIMCSE_SIZES)
def test_simcse_both_sides_of_the_crossover_match_float64(monkeypatch, n, hard_negatives):
    paths = Paths(monkeypatch)
    got, expected = simcse_case(n, 23, seed=3 * n, hard_negatives=hard_negatives)
    assert paths.ran() == ("dense" if n <= (HN_EDGE if hard_negatives else EDGE) else "cpu")
    for what, a, e in zip(("loss", "dz1", "dz2", "dz3", "dtemperature"), got, expected):
        assert_close64(a, e, what)


def test_explicit_backends_force_their_path_at_any_size(monkeypatch):
    paths = Paths(monkeypatch)
    clip_case(4, 8, seed=1, backend="cpu")  # existing kernel tests rely on this at small N
    assert paths.ran() == "cpu"
    paths.dense = paths.fused = 0
    clip_case(EDGE + 7, 8, seed=2, backend="dense")
    assert paths.ran() == "dense"


def test_dispatch_rule():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert local_backend("auto", cpu, DENSE_MAX_CELLS) == "dense"
    assert local_backend("auto", cpu, DENSE_MAX_CELLS + 1) == "cpu"
    assert local_backend("auto", cpu, None) == "cpu"  # a distributed exchange: blocks of unknown size
    assert local_backend("auto", cuda, 1) == "triton"  # no GPU crossover measured: Triton at every size
    assert local_backend("cpu", cpu, 1) == "cpu" and local_backend("dense", cpu, 10**9) == "dense"


@pytest.mark.parametrize("backend", ["dense", "cpu"])
@pytest.mark.parametrize("dtype,value,shown", [(torch.float64, -2.0, "float64, got -2"),
                                               (torch.float32, 1e-50, "float32, got 0")])
def test_both_paths_refuse_a_bad_scale_the_public_checks_skip(backend, dtype, value, shown):
    # Under trusted_values (a repeated training step) the loss does not read a tensor scale; the
    # kernels check it in their compute dtype (1e-50 rounds to 0 in float32), the dense path alike.
    x, y = torch.randn(6, 4, dtype=dtype), torch.randn(6, 4, dtype=dtype)
    with trusted_values(), pytest.raises(RuntimeError, match=f"scale must be positive and finite in {shown}"):
        xfast.clip_loss(x, y, torch.tensor(value, dtype=torch.float64).to(dtype), backend=backend)


@pytest.mark.parametrize("backend", ["dense", "cpu"])
def test_both_paths_refuse_a_bias_that_overflows_the_compute_dtype(backend):
    z = [torch.randn(5, 4) for _ in range(3)]  # float32: a weight of 1e39 is inf there
    with pytest.raises(RuntimeError, match="diag_bias must be finite in float32, got 1e\\+39"):
        xfast.simcse_loss(*z, hard_negative_weight=1e39, backend=backend)


def test_dense_needs_a_local_batch():
    with pytest.raises(ValueError, match="backend 'dense' computes a local batch only"):
        check_available("dense", torch.device("cpu"), group=object(), cells=4)


def test_dense_refuses_a_gpu_device():
    # No GPU here: the check needs only the device, and refuses before any tensor reaches it.
    with pytest.raises(ValueError, match="backend 'dense' runs on CPU only .* on cuda:0 use 'auto' or 'triton'"):
        check_available("dense", torch.device("cuda", 0), group=None, cells=4)
    check_available("dense", torch.device("cpu"), group=None, cells=4)


def test_auto_needs_the_cpu_kernel_only_where_it_runs_it(monkeypatch):
    # A batch that runs dense must not need the C++ extension (which may fail to build).
    def unavailable(device):
        return "the C++ extension did not build"
    monkeypatch.setattr(cpu_similarity_lse, "unavailable_reason", unavailable)
    cpu = torch.device("cpu")
    check_available("auto", cpu, None, DENSE_MAX_CELLS)
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randn(8, 4, dtype=torch.float64)
    xfast.clip_loss(x, y, torch.tensor(2.0, dtype=torch.float64))
    xfast.simcse_loss(x, y, hard_negatives=torch.randn(8, 4, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="backend 'cpu' is unavailable: the C\\+\\+ extension did not build"):
        check_available("auto", cpu, None, DENSE_MAX_CELLS + 1)
