"""Shared inputs and tolerance rules for the loss tests."""
from __future__ import annotations

import torch
import torch.nn.functional as F

SIZES_N = (1, 2, 7, 64, 300, 1000)
SIZES_D = (3, 45, 128, 512)
# The Triton interpreter runs kernels in numpy: keep its cases small.
TRITON_SIZES = ((1, 3), (2, 45), (7, 128), (64, 45), (100, 512))


def backends_for(n: int, d: int) -> list[str]:
    """cpu (the fused kernel, forced at every size), dense and reference always, triton on small sizes only."""
    return ["cpu", "dense", "reference"] + (["triton"] if (n, d) in TRITON_SIZES else [])


def embeddings(n: int, d: int, *, normalised: bool = True, scale: float = 1.0, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(n, d, generator=g, dtype=torch.float64)
    if normalised:
        t = F.normalize(t, dim=-1)
    return t * scale


def leaf(t: torch.Tensor, dtype=None) -> torch.Tensor:
    return t.detach().to(dtype or t.dtype).clone().requires_grad_(True)


def assert_close64(actual: torch.Tensor, expected: torch.Tensor, what: str, *, rtol=1e-9, atol=1e-11):
    """Float64 fused results must agree with the float64 reference to rounding."""
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def max_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return (a.double() - ref.double()).abs().max().item()


def assert_within_torch_error(ours: torch.Tensor, torch_same_precision: torch.Tensor, exact: torch.Tensor,
                              what: str, *, floor: float):
    """flash-attention's rule: our error vs float64 is at most twice that of plain PyTorch
    computing the same thing in the same low precision (plus a floor at fp32 rounding)."""
    err, torch_err = max_err(ours, exact), max_err(torch_same_precision, exact)
    assert err <= 2 * torch_err + floor, f"{what}: error {err:.3g} vs plain torch {torch_err:.3g}"
