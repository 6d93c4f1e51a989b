"""The exchange that gives xfast.ops.similarity_lse its logsumexps over a process group.

Rank r passes its rows x_r and its column block y_r; the global matrix is
Z = scale * X Y^T + B with X, Y the concatenations over ranks and B[i, j] = diag_bias where
column j is entry diag_offset + i of row i's own rank's block. similarity_lse then returns
row_lse for x_r's rows and col_lse for y_r's columns over *all* ranks' rows. x and y travel
in their own dtype (16-bit stays 16-bit); backward returns gradients in the accumulation dtype.
"""
from __future__ import annotations

from dataclasses import dataclass

from xfast.distributed import allgather, ring
from xfast.distributed.checks import Layout

MODES = {"allgather": allgather, "ring": ring}


@dataclass(frozen=True)
class GroupExchange:
    layout: Layout
    mode: str
    collective = True

    @property
    def _impl(self):
        # On one rank both modes are the plain kernel call; allgather's is the copy-free one.
        return MODES[self.mode] if self.layout.world > 1 else allgather

    def forward(self, kernel, x, y, scale, diag_bias, diag_offset, with_cols):
        return self._impl.forward(kernel, x, y, scale, diag_bias, diag_offset, with_cols, self.layout)

    def backward(self, kernel, x, y, scale, diag_bias, diag_offset, row_lse, state, grad_row, grad_col):
        return self._impl.backward(kernel, x, y, scale, diag_bias, diag_offset, row_lse, state, grad_row, grad_col,
                                   self.layout)
