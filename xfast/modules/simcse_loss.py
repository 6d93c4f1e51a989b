"""SimCSELoss module over xfast.simcse_loss."""
from __future__ import annotations

import torch
from torch import nn

from xfast.ops.simcse_loss import simcse_loss


class SimCSELoss(nn.Module):
    """SimCSE / MultipleNegativesRankingLoss on embeddings.

    `SimCSELoss(temperature=0.05)(z1, z2)` is unsupervised SimCSE (two dropout views);
    `SimCSELoss(hard_negative_weight=w)(anchor, positive, negative)` is the supervised
    objective. sentence-transformers' MultipleNegativesRankingLoss(scale=20) equals
    temperature=1/20.
    """

    def __init__(self, temperature: float = 0.05, hard_negative_weight: float = 0.0, backend: str = "auto"):
        super().__init__()
        self.temperature, self.hard_negative_weight, self.backend = temperature, hard_negative_weight, backend

    def forward(self, z1: torch.Tensor, z2: torch.Tensor, hard_negatives: torch.Tensor | None = None):
        return simcse_loss(z1, z2, hard_negatives, temperature=self.temperature,
                           hard_negative_weight=self.hard_negative_weight, backend=self.backend)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, hard_negative_weight={self.hard_negative_weight}, backend={self.backend!r}"
