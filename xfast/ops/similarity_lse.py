"""The primitive under every xfast contrastive loss.

For x [N, d], y [M, d] and a scale s, with Z = s * x @ y.T + B where B is zero except
B[i, diag_offset + i] = diag_bias, returns

    row_lse[i] = logsumexp_j Z[i, j]      (N values)
    col_lse[j] = logsumexp_i Z[i, j]      (M values, only if with_cols)

without storing Z. InfoNCE in both directions, SimCSE with weighted hard negatives and label
smoothing are these two vectors plus O(N*d) terms (see clip_loss.py, simcse_loss.py).
Gradients flow to x, y and s; a backend kernel only ever needs the saved logsumexps.
"""
from __future__ import annotations

import importlib

import torch

BACKENDS = ("auto", "cpu", "triton", "reference")
_KERNEL_MODULES = {"cpu": "xfast.kernels.cpu_similarity_lse", "triton": "xfast.kernels.triton_similarity_lse"}


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def kernel_for(backend: str, device: torch.device):
    """The kernel module for a fused backend; 'auto' is triton on CUDA, cpu otherwise.

    A requested backend that cannot run here raises RuntimeError saying why: there is no
    silent fallback.
    """
    check_backend(backend)
    if backend == "reference":
        raise ValueError("the reference backend materialises the logits and has no fused kernel")
    if backend == "auto":
        backend = "triton" if device.type == "cuda" else "cpu"
    try:
        module = importlib.import_module(_KERNEL_MODULES[backend])
    except ImportError as err:
        raise RuntimeError(f"backend {backend!r} is unavailable: {err}") from err
    reason = module.unavailable_reason(device)
    if reason is not None:
        raise RuntimeError(f"backend {backend!r} is unavailable: {reason}")
    return module


class SimilarityLSE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, scale, diag_bias, diag_offset, with_cols, target_offset, kernel):
        ctx.set_materialize_grads(False)
        row_lse, col_lse = kernel.forward(x, y, scale.detach(), diag_bias, diag_offset, with_cols)
        target_dot = None
        if target_offset is not None:
            # <x_i, y_{offset+i}> as a batched dot: no N x d temporary.
            acc = row_lse.dtype
            y_t = y.narrow(0, target_offset, x.shape[0]).to(acc)
            target_dot = torch.bmm(x.to(acc).unsqueeze(1), y_t.unsqueeze(2)).view(-1)
        ctx.save_for_backward(x, y, scale, row_lse, col_lse, target_dot)
        ctx.diag, ctx.target_offset, ctx.kernel = (diag_bias, diag_offset), target_offset, kernel
        target = None if target_dot is None else scale.detach() * target_dot
        return row_lse, col_lse, target

    @staticmethod
    def backward(ctx, grad_row, grad_col, grad_target):
        x, y, scale, row_lse, col_lse, target_dot = ctx.saved_tensors
        if grad_row is None and grad_col is None and grad_target is None:
            return (None,) * 8
        if grad_row is None and grad_col is None:
            dx, dy, dscale = torch.zeros_like(x), torch.zeros_like(y), scale.new_zeros(())
        else:
            dx, dy, dscale = ctx.kernel.backward(
                x, y, scale.detach(), *ctx.diag, row_lse, col_lse, grad_row, grad_col)
        if grad_target is not None:
            # d(s <x_i, y_{o+i}>): added in place so no N x d temporaries appear.
            n, off, s = x.shape[0], ctx.target_offset, scale.detach()
            g = (grad_target * s).unsqueeze(1).to(dx.dtype)
            dx.addcmul_(y.narrow(0, off, n), g)
            dy.narrow(0, off, n).addcmul_(x, g)
            dscale = dscale + (grad_target * target_dot).sum()
        dscale = dscale.reshape(scale.shape).to(scale.dtype) if ctx.needs_input_grad[2] else None
        return dx, dy, dscale, None, None, None, None, None


def similarity_lse(x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, *, diag_bias: float = 0.0,
                   diag_offset: int = 0, with_cols: bool = True, target_offset: int | None = None,
                   backend: str = "auto"):
    """(row_lse, col_lse or None) of scale * x @ y.T + diagonal bias; see the module docstring.

    With target_offset=o, also returns target[i] = scale * <x_i, y_{o+i}> (the logit of each
    row's positive, without bias) as a third output; its gradient is added in place, which
    keeps a whole loss at O(N*d) memory with no N x d temporaries.
    `scale` is a 0-dim float tensor on x's device (it may require grad). Inputs are not
    validated here: the public losses do that.
    """
    kernel = kernel_for(backend, x.device)
    if target_offset is not None and not 0 <= target_offset <= y.shape[0] - x.shape[0]:
        raise ValueError(f"target_offset {target_offset} leaves no column for every row of x")
    row_lse, col_lse, target = SimilarityLSE.apply(
        x, y, scale, float(diag_bias), int(diag_offset), bool(with_cols), target_offset, kernel)
    return (row_lse, col_lse) if target_offset is None else (row_lse, col_lse, target)


def accumulation_dtype(t: torch.Tensor) -> torch.dtype:
    """Kernels accumulate in float32, or float64 for float64 inputs."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32
