"""Rows of several [n_k, d] tensors scaled to unit L2 norm, stacked in one [sum n_k, d] tensor.

Equal to torch.cat([F.normalize(t, dim=-1) for t in tensors]) in value and gradient, but the
forward writes one buffer and the backward one gradient buffer whose row slices become the
inputs' gradients: no per-input normalised copies, no concatenation and none of
F.normalize's N x d backward temporaries. SimCSE feeds its cosine-similarity columns through it.
"""
from __future__ import annotations

import torch

EPS = 1e-12  # F.normalize's default: rows shorter than this are divided by EPS instead


def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[n] row-wise dot products as a batched matmul: no N x d temporary."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


class _UnitRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, dtype, *tensors):
        d = tensors[0].shape[1]
        out = torch.empty((sum(t.shape[0] for t in tensors), d), dtype=dtype, device=tensors[0].device)
        norms = torch.empty((out.shape[0], 1), dtype=dtype, device=out.device)
        start = 0
        for t in tensors:
            rows = slice(start, start + t.shape[0])
            out[rows].copy_(t)
            torch.linalg.vector_norm(out[rows], dim=1, keepdim=True, out=norms[rows])
            start += t.shape[0]
        norms.clamp_min_(EPS)
        out.div_(norms)
        ctx.save_for_backward(out, norms)
        ctx.input_dtypes = [t.dtype for t in tensors]
        ctx.sizes = [t.shape[0] for t in tensors]
        return out

    @staticmethod
    def backward(ctx, grad):
        unit, norms = ctx.saved_tensors
        # d(x / |x|) = (g - u <u, g>) / |x|; below EPS the divisor is constant: g / EPS.
        projection = _row_dot(unit, grad).unsqueeze(1) * (norms > EPS)
        grad_in = torch.addcmul(grad, unit, projection, value=-1).div_(norms)
        grads, start = [], 0
        for size, dtype in zip(ctx.sizes, ctx.input_dtypes):
            grads.append(grad_in[start:start + size].to(dtype))
            start += size
        return (None, *grads)


def unit_rows(*tensors: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """torch.cat of the row-normalised tensors (computed in `dtype`), memory-lean; see module doc."""
    return _UnitRows.apply(dtype, *tensors)
