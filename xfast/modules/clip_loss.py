"""open_clip-compatible ClipLoss module over xfast.clip_loss."""
from __future__ import annotations

import torch
from torch import nn

from xfast.distributed import default_group
from xfast.ops.clip_loss import clip_loss


class ClipLoss(nn.Module):
    """Drop-in for open_clip.loss.ClipLoss: same constructor arguments, same call.

    `loss = ClipLoss()(image_features, text_features, logit_scale)` gives open_clip's value
    and gradients without the N x N logits. cache_labels is accepted for compatibility and
    has nothing to cache. Extra keyword arguments: label_smoothing, backend, and for
    world_size > 1: mode ("allgather" | "ring"), grad_reduction ("mean" | "sum") and group
    (default: torch.distributed's default group, which rank and world_size must match).

    With world_size > 1 every rank passes its own features and gets the exact loss of the
    global batch (the same value on every rank), with gradients that are right after DDP's
    or DeepSpeed's averaging (see xfast/distributed/__init__.py). open_clip's options:
    - gather_with_grad: open_clip without it drops the gradient through the other ranks'
      features, which leaves tower gradients W times too small relative to logit_scale's.
      xfast always returns that gradient to the owner (reduce-scatter), so both settings
      give the exact gradient; the flag is accepted and changes nothing.
    - local_loss: open_clip scored only local rows against all columns, to save the W^2
      blowup of every rank computing the full matrix. xfast always works that way, so the
      flag changes nothing either; the returned value is the global loss in both cases
      (open_clip's local_loss value was the mean over the local rows, which differs by
      rank and is not the loss being optimised once batches are uneven).
    """

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = False, cache_labels: bool = False,
                 rank: int = 0, world_size: int = 1, use_horovod: bool = False, *,
                 label_smoothing: float = 0.0, backend: str = "auto", mode: str = "allgather",
                 grad_reduction: str = "mean", group=None):
        super().__init__()
        if use_horovod:
            raise NotImplementedError("xfast does not support horovod; use torch.distributed")
        self.mode, self.grad_reduction, self.group = mode, grad_reduction, group
        self.local_loss, self.gather_with_grad, self.cache_labels = local_loss, gather_with_grad, cache_labels
        self.rank, self.world_size = rank, world_size
        self.label_smoothing, self.backend = label_smoothing, backend

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale,
                output_dict: bool = False):
        loss = clip_loss(image_features, text_features, logit_scale,
                         label_smoothing=self.label_smoothing, backend=self.backend,
                         group=default_group(self.group, self.rank, self.world_size), mode=self.mode,
                         grad_reduction=self.grad_reduction)
        return {"contrastive_loss": loss} if output_dict else loss
