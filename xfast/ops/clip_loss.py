"""CLIP's symmetric InfoNCE without the N x N logits."""
from __future__ import annotations

import torch

from xfast import reference
from xfast._checks import check_embeddings, check_float, check_positive_scalar
from xfast.ops.similarity_lse import accumulation_dtype, check_backend, similarity_lse


def clip_loss(x: torch.Tensor, y: torch.Tensor, logit_scale, *, label_smoothing: float = 0.0,
              backend: str = "auto", group=None, mode: str = "allgather", grad_reduction: str = "mean") -> torch.Tensor:
    """(CE(s X Y^T, I) + CE(s Y X^T, I)) / 2, averaged over the batch.

    x, y: [N, d] embeddings (normalised, as open_clip's ClipLoss takes them; any values work).
    logit_scale: the multiplier s (already exponentiated), a float or a 1-element tensor that
    may require grad. label_smoothing as in torch.nn.functional.cross_entropy.
    backend: "auto" (triton on CUDA, cpu otherwise), "cpu", "triton" or "reference".
    Returns a 0-dim float32 tensor (float64 for float64 inputs).
    group: a torch.distributed process group; each rank passes its slice of the global batch
    and gets the loss of the whole batch. mode ("allgather" or "ring") and grad_reduction
    ("mean": right under DDP/DeepSpeed gradient averaging, or "sum") apply only with a group;
    see xfast/distributed/__init__.py.
    """
    if group is not None:
        from xfast import distributed
        return distributed.clip_loss(x, y, logit_scale, label_smoothing=label_smoothing, backend=backend,
                                     group=group, mode=mode, grad_reduction=grad_reduction)
    check_backend(backend)
    check_embeddings(("x", "y"), (x, y))
    logit_scale = check_positive_scalar("logit_scale", logit_scale, x.device)
    eps = check_float("label_smoothing", label_smoothing, low=0.0, high=1.0)
    acc = accumulation_dtype(x)
    if backend == "reference":
        return reference.clip_loss(x.to(acc), y.to(acc), logit_scale.to(acc), label_smoothing=eps)
    s = logit_scale.to(acc).reshape(())
    row_lse, col_lse, target = similarity_lse(x, y, s, with_cols=True, target_offset=0, backend=backend)
    if not eps:
        return ((row_lse - target).mean() + (col_lse - target).mean()) / 2
    # Cross-entropy with smoothing eps is lse - (1 - eps) * z_target - eps * mean_j z_j, and
    # the mean logit of row i is s * x_i . mean(y): O(N*d).
    xa, ya = x.to(acc), y.to(acc)
    target_row = (1 - eps) * target + eps * s * (xa @ ya.mean(0))
    target_col = (1 - eps) * target + eps * s * (ya @ xa.mean(0))
    return ((row_lse - target_row).mean() + (col_lse - target_col).mean()) / 2
