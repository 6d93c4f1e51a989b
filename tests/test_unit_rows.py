"""xfast.ops.unit_rows against torch.cat of F.normalize, values and gradients."""
import pytest
import torch
import torch.nn.functional as F

from xfast.ops.unit_rows import unit_rows


@pytest.mark.parametrize("sizes", [(1,), (7,), (5, 3), (64, 64, 2)])
def test_matches_cat_of_normalize_in_float64(sizes):
    g = torch.Generator().manual_seed(sum(sizes))
    inputs = [torch.randn(n, 13, generator=g, dtype=torch.float64) * 3 for n in sizes]
    inputs[0][0] = 0.0  # a zero row: F.normalize divides by eps there
    inputs[-1][-1] *= 1e-14  # norm ~1e-13, shorter than eps
    ours = [t.clone().requires_grad_() for t in inputs]
    theirs = [t.clone().requires_grad_() for t in inputs]
    out = unit_rows(*ours, dtype=torch.float64)
    expected = torch.cat([F.normalize(t, dim=-1) for t in theirs])
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    weights = torch.randn(out.shape, generator=g, dtype=torch.float64)
    (out * weights).sum().backward()
    (expected * weights).sum().backward()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-10)


def test_low_precision_inputs_compute_in_the_given_dtype():
    x = torch.randn(6, 8, dtype=torch.bfloat16, requires_grad=True)
    out = unit_rows(x, dtype=torch.float32)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, F.normalize(x.float(), dim=-1))
    out.sum().backward()
    assert x.grad.dtype == torch.bfloat16
