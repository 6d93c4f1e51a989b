"""open_clip-compatible ClipLoss module over xfast.clip_loss."""
from __future__ import annotations

import torch
from torch import nn

from xfast.ops.clip_loss import clip_loss


class ClipLoss(nn.Module):
    """Drop-in for open_clip.loss.ClipLoss: same constructor arguments, same call.

    `loss = ClipLoss()(image_features, text_features, logit_scale)` gives open_clip's value
    and gradients without the N x N logits. cache_labels is accepted for compatibility and
    has nothing to cache. Extra keyword arguments: label_smoothing, backend.
    """

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = False, cache_labels: bool = False,
                 rank: int = 0, world_size: int = 1, use_horovod: bool = False, *,
                 label_smoothing: float = 0.0, backend: str = "auto"):
        super().__init__()
        if use_horovod:
            raise NotImplementedError("xfast does not support horovod; use torch.distributed")
        if world_size > 1:
            raise NotImplementedError("ClipLoss with world_size > 1 needs xfast's distributed losses")
        self.local_loss, self.gather_with_grad, self.cache_labels = local_loss, gather_with_grad, cache_labels
        self.rank, self.world_size = rank, world_size
        self.label_smoothing, self.backend = label_smoothing, backend

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale,
                output_dict: bool = False):
        loss = clip_loss(image_features, text_features, logit_scale,
                         label_smoothing=self.label_smoothing, backend=self.backend)
        return {"contrastive_loss": loss} if output_dict else loss
