"""Mode "ring": column blocks travel around the ranks, so no rank holds all M columns.

Forward, step t = 0..W-1: rank r holds the block of owner q = r - t (its own at t = 0),
posts the send of that block to r+1 and the receive of the next one from r-1, and runs the
kernel on (local rows, block q) while they travel. Its row logsumexps are merged over the
steps; the block's partial column logsumexp arrives from r-1 (merged over ranks q..r-1),
absorbs this rank's rows and moves on to r+1. After the last step the complete column
logsumexp of block q = r+1 is sent on to r+1, its owner.

Backward is the same walk with the block packed as [y_q | col_lse_q | grad_col_q]; the
block's dy accumulator travels behind it like the column partials did and arrives complete
at its owner. Per-rank memory: the local rows, two blocks and two accumulators.
Uneven block sizes work: every rank knows every size from the agreement check.

Blocks travel in the inputs' dtype (16-bit inputs: half the bytes of float32); the two
float32 vectors ride in the same message as raw bytes, so they are not rounded. Partial
logsumexps and dy accumulators travel and are summed in the accumulation dtype.
"""
from __future__ import annotations

import torch

from xfast.backends import accumulation_dtype
from xfast.distributed.checks import Layout
from xfast.distributed.exchange import Ring, RingAccumulator


def _own_diag(ring: Ring, owner: int, diag_bias: float, diag_offset: int) -> tuple[float, int]:
    # The diagonal bias (SimCSE's hard negatives) lives in the rank's own block only.
    return (diag_bias, diag_offset) if owner == ring.rank else (0.0, 0)


def forward(kernel, x, y, scale, diag_bias, diag_offset, with_cols, layout: Layout):
    ring = Ring(layout.group)
    row_lse = None
    col_lse = RingAccumulator(ring, layout.cols, torch.logaddexp) if with_cols else None
    for owner, block in ring.blocks(y, layout.cols):
        row_part, col_part = kernel.forward(x, block, scale, *_own_diag(ring, owner, diag_bias, diag_offset),
                                            with_cols)
        row_lse = row_part if row_lse is None else torch.logaddexp(row_lse, row_part)
        if with_cols:
            col_lse.add(owner, col_part)
    col_lse = col_lse.total() if with_cols else None
    return row_lse, col_lse, (col_lse,)


def _with_vectors(y: torch.Tensor, *vectors: torch.Tensor) -> torch.Tensor:
    """[y | the vectors' bytes as y's dtype]: one message per step, the (accumulation-dtype)
    vectors bit-exact even when y is 16-bit."""
    return torch.cat([y, torch.stack(vectors, 1).view(y.dtype)], 1)


def backward(kernel, x, y, scale, diag_bias, diag_offset, row_lse, state, grad_row, grad_col, layout: Layout):
    """(dx, dy, dscale share), in the accumulation dtype."""
    ring = Ring(layout.group)
    d = y.shape[1]
    acc = accumulation_dtype(x)
    with_cols = grad_col is not None
    # The column logsumexps and gradients travel with their block.
    own = _with_vectors(y, state[0], grad_col) if with_cols else y
    dx = dscale = None
    dy = RingAccumulator(ring, layout.cols, torch.add)
    for owner, block in ring.blocks(own, layout.cols):
        y_q = block[:, :d].contiguous()
        col_q = grad_col_q = None
        if with_cols:
            col_q, grad_col_q = block[:, d:].contiguous().view(acc).unbind(1)
        dx_part, dy_part, ds_part = kernel.backward(x, y_q, scale, *_own_diag(ring, owner, diag_bias, diag_offset),
                                                    row_lse, col_q, grad_row, grad_col_q, grad_dtype=acc)
        dx = dx_part if dx is None else dx.add_(dx_part)
        dscale = ds_part if dscale is None else dscale + ds_part
        dy.add(owner, dy_part)
    return dx, dy.total(), dscale
