"""The similarity-logsumexp primitive over a process group (autograd-aware)."""
from __future__ import annotations

import torch

from xfast.distributed import allgather, ring
from xfast.distributed.checks import Layout

MODES = {"allgather": allgather, "ring": ring}


class GatheredSimilarityLSE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, scale, diag_bias, diag_offset, with_cols, kernel, layout, mode):
        # On one rank both modes are the plain kernel call; allgather's is the copy-free one.
        impl = MODES[mode] if layout.world > 1 else allgather
        row_lse, col_lse, state = impl.forward(kernel, x.detach(), y.detach(), scale.detach(), diag_bias,
                                               diag_offset, with_cols, layout)
        ctx.save_for_backward(x, y, scale, row_lse)
        ctx.state = state
        ctx.args = (diag_bias, diag_offset, with_cols, kernel, layout, impl)
        return row_lse, col_lse

    @staticmethod
    def backward(ctx, grad_row, grad_col):
        # Grads are materialised (zeros when unused) so every rank runs the same exchange.
        x, y, scale, row_lse = ctx.saved_tensors
        diag_bias, diag_offset, with_cols, kernel, layout, impl = ctx.args
        dx, dy, dscale = impl.backward(kernel, x.detach(), y.detach(), scale.detach(), diag_bias, diag_offset,
                                       row_lse, ctx.state, grad_row.contiguous(),
                                       grad_col.contiguous() if with_cols else None, layout)
        dscale = dscale.reshape(scale.shape).to(scale.dtype) if ctx.needs_input_grad[2] else None
        return dx, dy, dscale, None, None, None, None, None, None


def gathered_similarity_lse(x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, layout: Layout, kernel, *,
                            mode: str, diag_bias: float = 0.0, diag_offset: int = 0, with_cols: bool = True):
    """Rank-local pieces of similarity_lse over the global rows and columns.

    Rank r passes its rows x_r and its column block y_r; the global matrix is
    Z = scale * X Y^T + B with X, Y the concatenations over ranks and B[i, j] = diag_bias
    where column j is entry diag_offset + i of row i's own rank's block. Returns
    (row_lse for x_r's rows, col_lse for y_r's columns over *all* ranks' rows, or None).
    x, y must already be in the kernel's accumulation dtype and contiguous.
    """
    return GatheredSimilarityLSE.apply(x, y, scale, float(diag_bias), int(diag_offset), bool(with_cols), kernel,
                                       layout, mode)
