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
"""
from __future__ import annotations

import torch

from xfast.distributed.checks import Layout
from xfast.distributed.exchange import Ring


def _own_diag(ring: Ring, owner: int, diag_bias: float, diag_offset: int) -> tuple[float, int]:
    # The diagonal bias (SimCSE's hard negatives) lives in the rank's own block only.
    return (diag_bias, diag_offset) if owner == ring.rank else (0.0, 0)


def forward(kernel, x, y, scale, diag_bias, diag_offset, with_cols, layout: Layout):
    ring = Ring(layout.group)
    block, row_lse, col_lse = y.contiguous(), None, None
    incoming_col = pending_col = None
    for step in range(ring.world):
        owner = ring.owner(step)
        last = step == ring.world - 1
        if not last:
            next_block = y.new_empty((layout.cols[(owner - 1) % ring.world], y.shape[1]))
            pending_block = ring.shift(block, next_block, Ring.TAG_BLOCK)
        row_part, col_part = kernel.forward(x, block, scale, *_own_diag(ring, owner, diag_bias, diag_offset),
                                            with_cols)
        row_lse = row_part if row_lse is None else torch.logaddexp(row_lse, row_part)
        if with_cols:
            if step > 0:
                Ring.wait(pending_col)
                col_part = torch.logaddexp(incoming_col, col_part)
            if ring.world == 1:
                col_lse = col_part
            else:
                # At the last step this receives the rank's own, now complete, column block.
                outgoing_col = col_part.contiguous()
                incoming_col = y.new_empty(layout.cols[(owner - 1) % ring.world])
                pending_col = ring.shift(outgoing_col, incoming_col, Ring.TAG_ACCUMULATOR)
        if not last:
            Ring.wait(pending_block)
            block = next_block
    if with_cols and ring.world > 1:
        Ring.wait(pending_col)
        col_lse = incoming_col
    return row_lse, col_lse, col_lse


def backward(kernel, x, y, scale, diag_bias, diag_offset, row_lse, state, grad_row, grad_col, layout: Layout):
    ring = Ring(layout.group)
    d = y.shape[1]
    with_cols = grad_col is not None
    block = torch.cat([y, state[:, None], grad_col[:, None]], 1) if with_cols else y.contiguous()
    dx = dscale = dy = None
    incoming_dy = pending_dy = None
    for step in range(ring.world):
        owner = ring.owner(step)
        last = step == ring.world - 1
        if not last:
            next_block = block.new_empty((layout.cols[(owner - 1) % ring.world], block.shape[1]))
            pending_block = ring.shift(block, next_block, Ring.TAG_BLOCK)
        y_q = block[:, :d].contiguous()
        col_q, grad_col_q = (block[:, d].contiguous(), block[:, d + 1].contiguous()) if with_cols else (None, None)
        dx_part, dy_part, ds_part = kernel.backward(x, y_q, scale, *_own_diag(ring, owner, diag_bias, diag_offset),
                                                    row_lse, col_q, grad_row, grad_col_q)
        dx = dx_part if dx is None else dx.add_(dx_part)
        dscale = ds_part if dscale is None else dscale + ds_part
        if step > 0:
            Ring.wait(pending_dy)
            dy_part = incoming_dy + dy_part
        if ring.world == 1:
            dy = dy_part
        else:
            # At the last step this receives the rank's own, now complete, dy.
            outgoing_dy = dy_part.contiguous()
            incoming_dy = y.new_empty((layout.cols[(owner - 1) % ring.world], d))
            pending_dy = ring.shift(outgoing_dy, incoming_dy, Ring.TAG_ACCUMULATOR)
        if not last:
            Ring.wait(pending_block)
            block = next_block
    if ring.world > 1:
        Ring.wait(pending_dy)
        dy = incoming_dy
    return dx, dy, dscale
