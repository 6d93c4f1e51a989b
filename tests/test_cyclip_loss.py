"""xfast.cyclip_loss: the Gram-matrix path against the N x N reference."""
from __future__ import annotations

import pytest
import torch

import xfast
from tests.loss_cases import assert_close64, embeddings, leaf
from xfast import reference


@pytest.mark.parametrize("n,d", [(1, 3), (2, 45), (7, 128), (64, 512), (300, 45), (1000, 128)])
@pytest.mark.parametrize("normalised", [True, False])
def test_matches_float64_reference(n, d, normalised):
    x = embeddings(n, d, normalised=normalised, seed=n + d)
    y = embeddings(n, d, normalised=normalised, seed=n + d + 1)
    xs, ys = leaf(x), leaf(y)
    xr, yr = leaf(x), leaf(y)
    ours, expected = xfast.cyclip_loss(xs, ys), reference.cyclip_loss(xr, yr)
    for what, a, e in zip(("in_modal", "cross_modal"), ours, expected):
        assert_close64(a, e, what)
    (ours[0] + 3 * ours[1]).backward()
    (expected[0] + 3 * expected[1]).backward()
    assert_close64(xs.grad, xr.grad, "dx")
    assert_close64(ys.grad, yr.grad, "dy")


def test_float32_matches_reference_to_float32_rounding():
    x, y = embeddings(500, 64, seed=1), embeddings(500, 64, seed=2)
    ours = xfast.cyclip_loss(x.float(), y.float())
    expected = reference.cyclip_loss(x, y)
    for a, e in zip(ours, expected):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.double(), e, rtol=1e-4, atol=1e-4)


def test_identical_towers_are_perfectly_consistent():
    x = embeddings(50, 16, seed=3)
    in_modal, cross_modal = xfast.cyclip_loss(x, x.clone())
    assert abs(in_modal.item()) < 1e-10 and abs(cross_modal.item()) < 1e-10


def test_bad_input():
    x = torch.randn(5, 4)
    with pytest.raises(ValueError, match="y has batch size"):
        xfast.cyclip_loss(x, x[:4])
    with pytest.raises(ValueError, match="backend must be one of"):
        xfast.cyclip_loss(x, x, backend="cpu")
