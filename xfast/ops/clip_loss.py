"""CLIP's symmetric InfoNCE without the N x N logits."""
from __future__ import annotations

import torch

from xfast import reference
from xfast._checks import check_embeddings, check_float, check_positive_scalar
from xfast.backends import accumulation_dtype, check_backend
from xfast.distributed.batch import local_shape, open_batch
from xfast.kernels import check_available
from xfast.ops.similarity_lse import similarity_lse


def clip_loss(x: torch.Tensor, y: torch.Tensor, logit_scale, *, label_smoothing: float = 0.0,
              backend: str = "auto", group=None, mode: str = "allgather", grad_reduction: str = "mean") -> torch.Tensor:
    """(CE(s X Y^T, I) + CE(s Y X^T, I)) / 2, averaged over the batch.

    x, y: [N, d] embeddings (normalised, as open_clip's ClipLoss takes them; any values work).
    logit_scale: the multiplier s (already exponentiated), a float or a 1-element tensor that
    may require grad. label_smoothing as in torch.nn.functional.cross_entropy.
    backend: "auto" (triton on CUDA; on CPU "dense" for a small local batch, see
    xfast.backends.DENSE_MAX_CELLS, else "cpu"), "cpu", "triton", "dense" (the N x N logits in
    plain autograd ops; no process group) or "reference".
    Returns a 0-dim float32 tensor (float64 for float64 inputs).
    group: a torch.distributed process group; each rank passes its slice of the global batch
    and gets the loss of the whole batch. mode ("allgather" or "ring") and grad_reduction
    ("mean": right under DDP/DeepSpeed gradient averaging, or "sum") apply only with a group;
    see xfast/distributed/__init__.py.
    """
    def validate():
        check_backend(backend)
        check_embeddings(("x", "y"), (x, y))
        scale = check_positive_scalar("logit_scale", logit_scale, x.device)
        eps = check_float("label_smoothing", label_smoothing, low=0.0, high=1.0)
        check_available(backend, x.device, group, x.shape[0] * y.shape[0])
        return (scale, eps), local_shape(x.shape[0], y.shape[0], x, x, y, logit_scale)

    batch, (logit_scale, eps) = open_batch(
        "clip_loss", validate, group=group, mode=mode, grad_reduction=grad_reduction,
        shared={"backend": backend, "logit_scale": logit_scale, "label_smoothing": label_smoothing})
    acc = accumulation_dtype(x)
    s = logit_scale.to(acc).reshape(())
    if backend == "reference":
        xa, ya = batch.gather(x.to(acc), y.to(acc))
        return batch.replicated(reference.clip_loss(xa, ya, s, label_smoothing=eps)).reshape(())
    # With label smoothing x and y feed two terms: both take the same float32 copies, so their
    # gradients are summed in float32 and rounded to a 16-bit input's dtype once (by the
    # copies' backward); the kernels still get the 16-bit values (the round trip is exact).
    xa, ya = (x.to(acc), y.to(acc)) if eps else (x, y)
    row_lse, col_lse, target = similarity_lse(xa, ya, s, with_cols=True, target_offset=0, backend=backend,
                                              exchange=batch.exchange, operand_dtype=x.dtype)
    target_row = target_col = target
    if eps:
        # Cross-entropy with smoothing eps is lse - (1 - eps) * z_target - eps * mean_j z_j, and
        # the mean logit of row i is s * x_i . mean(Y) over the (global) batch: O(N*d).
        means = batch.sum(torch.stack([xa.sum(0), ya.sum(0)])) / batch.total_rows
        target_row = (1 - eps) * target + eps * s * (xa @ means[1])
        target_col = (1 - eps) * target + eps * s * (ya @ means[0])
    part = ((row_lse - target_row).sum() + (col_lse - target_col).sum()) / (2 * batch.total_rows)
    return batch.reduce(part)
