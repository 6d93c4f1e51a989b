"""Backends of the similarity-logsumexp primitive, one module each.

Every backend module exposes the same two functions (see xfast/ops/similarity_lse.py):

    forward(x, y, scale, diag_bias, diag_offset, with_cols) -> (row_lse, col_lse | None)
    backward(x, y, scale, diag_bias, diag_offset, row_lse, col_lse, grad_row, grad_col)
        -> (dx, dy, dscale)
"""
