"""Mode "allgather": every rank gathers the other tower once and scores its rows against all
columns with the fused kernel (see xfast/distributed/__init__.py for the math).

Traffic per rank: the column blocks (M x d, in the inputs' dtype: 16-bit inputs travel as
16 bits) and two O(M) vectors forward; the O(M) column gradients and a reduce-scatter of the
M x d column gradient backward (in the accumulation dtype, so the sum over ranks is not
rounded to 16 bits). Memory: M x d for the gathered columns (kept for backward) plus the
kernel's O(tile) workspace.
"""
from __future__ import annotations

from xfast.backends import accumulation_dtype
from xfast.distributed.checks import Layout
from xfast.distributed.exchange import gather_rows, logsumexp_over_ranks, reduce_scatter_rows


def forward(kernel, x, y, scale, diag_bias, diag_offset, with_cols, layout: Layout):
    """(row_lse of local rows, global col_lse of the local column block, state for backward)."""
    y_all = gather_rows(y, layout.cols, layout.group)
    start = layout.col_start(layout.rank)
    row_lse, col_partial = kernel.forward(x, y_all, scale, diag_bias, start + diag_offset, with_cols)
    if not with_cols:
        return row_lse, None, (y_all, None)
    col_lse_all = logsumexp_over_ranks(col_partial, layout.group)
    return row_lse, col_lse_all[start:start + layout.cols[layout.rank]], (y_all, col_lse_all)


def backward(kernel, x, y, scale, diag_bias, diag_offset, row_lse, state, grad_row, grad_col, layout: Layout):
    """(dx, dy, dscale share) for the local rows and the local column block, in the
    accumulation dtype."""
    y_all, col_lse_all = state
    grad_col_all = None if grad_col is None else gather_rows(grad_col.contiguous(), layout.cols, layout.group)
    start = layout.col_start(layout.rank)
    dx, dy_all, dscale = kernel.backward(x, y_all, scale, diag_bias, start + diag_offset, row_lse, col_lse_all,
                                         grad_row, grad_col_all, grad_dtype=accumulation_dtype(x))
    return dx, reduce_scatter_rows(dy_all.contiguous(), layout.cols, layout.group), dscale
