"""CyCLIP's cyclic-consistency regularisers through d x d Gram matrices."""
from __future__ import annotations

import torch

from xfast import reference
from xfast._checks import check_embeddings
from xfast.backends import GEMM_BACKENDS, accumulation_dtype, check_backend
from xfast.distributed.batch import local_shape, open_batch


def cyclip_loss(x: torch.Tensor, y: torch.Tensor, *, backend: str = "auto", group=None,
                grad_reduction: str = "mean") -> tuple[torch.Tensor, torch.Tensor]:
    """(in_modal, cross_modal) = ((1/N) sum_jk (<x_j,x_k> - <y_j,y_k>)^2,
                                  (1/N) sum_jk (<x_j,y_k> - <x_k,y_j>)^2).

    With Gx = X^T X, Gy = Y^T Y and C = X^T Y (all d x d), the sums are traces:
    in_modal = (|Gx|^2 - 2|C|^2 + |Gy|^2) / N and cross_modal = 2 (<Gx, Gy> - <C, C^T>) / N,
    so the cost is three N x d x d GEMMs and no N x N matrix exists. Those GEMMs are all the
    work there is, so both devices use BLAS/cuBLAS ("auto"); "reference" materialises N x N.
    Note: the CyCLIP paper scales these by its logit scale; multiply by lambda1/lambda2 outside.
    group, grad_reduction: as in clip_loss; with a group the Grams are summed over ranks.
    Precision: the Grams are float32 (float64 for float64 inputs), also for 16-bit inputs:
    the traces cancel (|Gx|^2 - 2|C|^2 + |Gy|^2 is small when x ~ y), so Grams rounded to 16
    bits would swamp the result. Only these d x d float32 matrices cross the wire.
    """
    def validate():
        check_backend(backend, GEMM_BACKENDS, op="cyclip_loss")
        check_embeddings(("x", "y"), (x, y))
        return (), local_shape(x.shape[0], y.shape[0], x, x, y)

    batch, _ = open_batch("cyclip_loss", validate, group=group, grad_reduction=grad_reduction,
                          shared={"backend": backend})
    acc = accumulation_dtype(x)
    xa, ya = x.to(acc), y.to(acc)
    if backend == "reference":
        return tuple(batch.replicated(t) for t in reference.cyclip_loss(*batch.gather(xa, ya)))
    gx, gy, c = batch.sum(torch.stack([xa.T @ xa, ya.T @ ya, xa.T @ ya])).unbind(0)
    n = batch.total_rows
    in_modal = (gx.square().sum() - 2 * c.square().sum() + gy.square().sum()) / n
    cross_modal = 2 * ((gx * gy).sum() - (c * c.T).sum()) / n
    return batch.replicated(in_modal), batch.replicated(cross_modal)
