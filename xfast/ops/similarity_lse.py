"""The primitive under every xfast contrastive loss.

For x [N, d], y [M, d] and a scale s, with Z = s * x @ y.T + B where B is zero except
B[i, diag_offset + i] = diag_bias, returns

    row_lse[i] = logsumexp_j Z[i, j]      (N values)
    col_lse[j] = logsumexp_i Z[i, j]      (M values, only if with_cols)

without storing Z. InfoNCE in both directions, SimCSE with weighted hard negatives and label
smoothing are these two vectors plus O(N*d) terms (see clip_loss.py, simcse_loss.py).
Gradients flow to x, y and s; a backend kernel only ever needs the saved logsumexps. Rows
only on one process (SimCSE): a kernel that has forward_rows_with_gradients (the CPU one)
computes the gradients for unit row weights in the forward when a gradient will be wanted (3
GEMMs instead of 4); backward scales them when every row's upstream gradient is the same (a
sum or mean over rows) and recomputes them otherwise. Not twice differentiable (a clear error).

Precision: x and y reach the kernels (and, with a process group, the wire) in their own
dtype, 16-bit included; the kernels accumulate in float32 (float64 for float64). The
exchanges ask the kernels for dx/dy in that accumulation dtype, sum the partial gradients
over column blocks and ranks in it, add the positives' term, and the result is rounded to the
input dtype once, at the end of backward.
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from xfast.backends import accumulation_dtype, local_backend
from xfast.kernels import kernel_for
from xfast.ops.dense_lse import dense_similarity_lse


class LocalExchange:
    """Where the logsumexps come from when the whole matrix is local: one kernel call.

    The distributed exchanges (xfast/distributed/gathered_lse.py) have the same two methods
    and get the same logsumexps from the blocks of every rank.
    """

    collective = False

    @staticmethod
    def forward(kernel, x, y, scale, diag_bias, diag_offset, with_cols):
        """(row_lse, col_lse | None, state): the tensors (or None) that backward needs."""
        row_lse, col_lse = kernel.forward(x, y, scale, diag_bias, diag_offset, with_cols)
        return row_lse, col_lse, (col_lse,)

    @staticmethod
    def backward(kernel, x, y, scale, diag_bias, diag_offset, row_lse, state, grad_row, grad_col):
        """(dx, dy, dscale), all in the accumulation dtype."""
        return kernel.backward(x, y, scale, diag_bias, diag_offset, row_lse, state[0], grad_row, grad_col,
                               grad_dtype=accumulation_dtype(x))


LOCAL = LocalExchange()


class SimilarityLSE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, scale, diag_bias, diag_offset, with_cols, target_offset, kernel, exchange, operand_dtype,
                eager_rows):
        ctx.set_materialize_grads(False)
        ctx.grad_dtypes = (x.dtype, y.dtype)
        x, y = x.detach().to(operand_dtype), y.detach().to(operand_dtype)  # no copy when already so
        if eager_rows:
            # Rows only, local, gradients wanted: the kernel gives the gradients for unit row
            # weights with the logsumexps (3 GEMMs instead of 4); backward scales them.
            row_lse, *eager = kernel.forward_rows_with_gradients(x, y, scale.detach(), diag_bias, diag_offset)
            col_lse, state = None, (None,)
        else:
            row_lse, col_lse, state = exchange.forward(kernel, x, y, scale.detach(), diag_bias, diag_offset, with_cols)
            eager = (None,) * 3
        target_dot = None
        if target_offset is not None:
            # <x_i, y_{offset+i}> as a batched dot: no N x d temporary.
            acc = row_lse.dtype
            y_t = y.narrow(0, target_offset, x.shape[0]).to(acc)
            target_dot = torch.bmm(x.to(acc).unsqueeze(1), y_t.unsqueeze(2)).view(-1)
        # The state may hold outputs (col_lse): save_for_backward keeps them without a cycle.
        ctx.save_for_backward(x, y, scale, row_lse, target_dot, *eager, *state)
        ctx.args = (diag_bias, diag_offset, with_cols, target_offset, kernel, exchange)
        target = None if target_dot is None else scale.detach() * target_dot
        return row_lse, col_lse, target

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_row, grad_col, grad_target):
        x, y, scale, row_lse, target_dot, *saved = ctx.saved_tensors
        eager, state = saved[:3], saved[3:]
        diag_bias, diag_offset, with_cols, target_offset, kernel, exchange = ctx.args
        x, y = x.detach(), y.detach()
        if exchange.collective:
            # Every rank must run the same exchange, whichever outputs it used.
            grad_row = row_lse.new_zeros(row_lse.shape) if grad_row is None else grad_row
            if with_cols and grad_col is None:
                grad_col = row_lse.new_zeros(y.shape[0])
        acc = row_lse.dtype
        if grad_row is None and grad_col is None:
            if grad_target is None:
                return (None,) * 11
            dx, dy, dscale = torch.zeros_like(x, dtype=acc), torch.zeros_like(y, dtype=acc), scale.new_zeros((), dtype=acc)
        elif eager[0] is not None and grad_row.numel() and bool((grad_row == grad_row[0]).all()):
            # Every row weighed the same (a mean or sum over rows): scale the forward's
            # gradients, out of place (a retained graph may run backward again).
            weight = grad_row[0].to(acc)
            dx, dy, dscale = (t * weight for t in eager)
        else:
            contiguous = lambda t: None if t is None else t.contiguous()
            dx, dy, dscale = exchange.backward(kernel, x, y, scale.detach(), diag_bias, diag_offset, row_lse,
                                               state, contiguous(grad_row), contiguous(grad_col))
        if grad_target is not None:
            # d(s <x_i, y_{o+i}>): added in place so no N x d temporaries appear.
            n, s = x.shape[0], scale.detach()
            g = (grad_target * s).unsqueeze(1).to(acc)
            dx.addcmul_(y.narrow(0, target_offset, n), g)
            dy.narrow(0, target_offset, n).addcmul_(x, g)
            dscale = dscale + (grad_target * target_dot).sum()
        dscale = dscale.reshape(scale.shape).to(scale.dtype) if ctx.needs_input_grad[2] else None
        # The one rounding of the gradients to the input dtype.
        return dx.to(ctx.grad_dtypes[0]), dy.to(ctx.grad_dtypes[1]), dscale, *(None,) * 8


def similarity_lse(x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, *, diag_bias: float = 0.0,
                   diag_offset: int = 0, with_cols: bool = True, target_offset: int | None = None,
                   backend: str = "auto", exchange=None, operand_dtype: torch.dtype | None = None):
    """(row_lse, col_lse or None) of scale * x @ y.T + diagonal bias; see the module docstring.

    With target_offset=o, also returns target[i] = scale * <x_i, y_{o+i}> (the logit of each
    row's positive, without bias) as a third output; its gradient is added in place, which
    keeps a whole loss at O(N*d) memory with no N x d temporaries.
    `scale` is a 0-dim float tensor on x's device (it may require grad). Inputs are not
    validated here: the public losses do that.
    backend: as in the losses; "auto" on CPU computes a local call whose logits are at most
    xfast.backends.DENSE_MAX_CELLS with the dense path (xfast/ops/dense_lse.py), else the fused kernel.
    exchange: None (the whole matrix is here), or a process group's exchange
    (xfast.distributed.gathered_lse), where x holds this rank's rows, y its column block, the
    diagonal and the target are within that block, and col_lse covers every rank's rows.
    operand_dtype: what the kernels (and the wire) get, default x's dtype. A loss that also
    uses float32 copies of 16-bit inputs elsewhere passes those copies with operand_dtype set
    to the 16-bit dtype: the kernels see 16 bits, the gradients stay float32 until the copies'
    backward rounds their sum once.
    """
    if target_offset is not None and not 0 <= target_offset <= y.shape[0] - x.shape[0]:
        raise ValueError(f"target_offset {target_offset} leaves no column for every row of x")
    # "auto" sizes a local call (a distributed exchange calls its kernel on gathered blocks).
    name = local_backend(backend, x.device, x.shape[0] * y.shape[0] if exchange is None else None)
    if name == "dense":
        if exchange is not None:
            raise ValueError("backend 'dense' computes a local batch only, not a distributed exchange")
        row_lse, col_lse, target = dense_similarity_lse(
            x, y, scale, diag_bias=float(diag_bias), diag_offset=int(diag_offset), with_cols=bool(with_cols),
            target_offset=target_offset, operand_dtype=operand_dtype or x.dtype)
        return (row_lse, col_lse) if target_offset is None else (row_lse, col_lse, target)
    kernel = kernel_for(name, x.device)
    # Rows only on one process with a gradient to come: the kernel can compute the gradients
    # in the forward (see SimilarityLSE.forward); without a gradient it does no gradient work.
    # The price: dX and dY are held from forward to backward, and scaling them there holds both
    # copies for a moment; a loss computed with grad enabled but never backpropagated costs 3
    # GEMMs instead of 1 (compute such losses under torch.no_grad()).
    eager_rows = (not with_cols and exchange is None and hasattr(kernel, "forward_rows_with_gradients")
                  and kernel.eager_rows_pays(x.shape[1], y.shape[0])
                  and torch.is_grad_enabled() and any(t.requires_grad for t in (x, y, scale)))
    row_lse, col_lse, target = SimilarityLSE.apply(
        x, y, scale, float(diag_bias), int(diag_offset), bool(with_cols), target_offset, kernel, exchange or LOCAL,
        operand_dtype or x.dtype, eager_rows)
    return (row_lse, col_lse) if target_offset is None else (row_lse, col_lse, target)
