"""The similarity-logsumexp primitive with the N x M logits materialised, in plain autograd.

Same outputs as xfast.ops.similarity_lse for a local batch (row_lse, col_lse | None, target),
from Z = s * X Y^T + B formed whole in the accumulation dtype and torch.logsumexp; torch's
autograd differentiates it (x, y and a scale that requires grad). No custom autograd Function
and no kernel call: at a small batch the fused kernel's fixed cost per call (its Python
wrapper, the extension call, the tile plan) is most of the loss's time, and a few whole-matrix
ops are cheaper. Memory is O(N*M), so "auto" picks it on CPU only while N*M is at most
xfast.backends.DENSE_MAX_CELLS (measured: benchmarks/bench_dense_crossover.py).
"""
from __future__ import annotations

import math

import torch

from xfast.backends import accumulation_dtype


def _in_compute_dtype(value: float, dtype: torch.dtype) -> tuple[float, str]:
    """`value` rounded to the kernels' compute dtype, and that dtype's name for messages."""
    return torch.tensor(value, dtype=dtype).item(), "float64" if dtype == torch.float64 else "float32"


def check_kernel_scale(scale: torch.Tensor, dtype: torch.dtype) -> None:
    """The fused kernels' own check of the scale, in their compute dtype, with their message: a
    zero scale would make dscale NaN and a negative one flip the logits (the public checks skip
    a tensor scale's value on a trusted repeated step). Reads the value: CPU tensors only (the
    "dense" backend refuses other devices)."""
    value = float(scale)
    rounded, name = _in_compute_dtype(value, dtype)
    if not (math.isfinite(rounded) and rounded > 0):
        raise RuntimeError(f"scale must be positive and finite in {name}, got {value:g}")


def check_kernel_bias(diag_bias: float, dtype: torch.dtype) -> None:
    """The fused kernels' check of the diagonal bias in their compute dtype (1e39 is inf in float32)."""
    rounded, name = _in_compute_dtype(diag_bias, dtype)
    if not math.isfinite(rounded):
        raise RuntimeError(f"diag_bias must be finite in {name}, got {diag_bias:g}")


def dense_similarity_lse(x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, *, diag_bias: float,
                         diag_offset: int, with_cols: bool, target_offset: int | None, operand_dtype: torch.dtype):
    """(row_lse, col_lse | None, target | None) as similarity_lse returns them (see there)."""
    acc = accumulation_dtype(x)
    check_kernel_scale(scale.detach(), acc)
    if diag_bias:
        check_kernel_bias(diag_bias, acc)
    # Operands rounded to operand_dtype first, as the kernels see them (a no-op unless a loss passes
    # float32 copies of 16-bit inputs); gradients stay in the accumulation dtype until the inputs.
    xa, ya = (t if t.dtype == operand_dtype else t.to(operand_dtype) for t in (x, y))
    xa, ya = xa.to(acc), ya.to(acc)
    dots = xa @ ya.T
    s = scale.to(acc).reshape(())
    z = dots * s
    if diag_bias:
        # entries (i, diag_offset + i) that exist; out of place, so autograd sees it
        bias = torch.zeros_like(z)
        bias.diagonal(diag_offset).fill_(diag_bias)
        z = z + bias
    row_lse = torch.logsumexp(z, 1)
    col_lse = torch.logsumexp(z, 0) if with_cols else None
    target = None if target_offset is None else dots.diagonal(target_offset) * s
    return row_lse, col_lse, target
