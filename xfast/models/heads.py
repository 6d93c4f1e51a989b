"""Small heads on top of the HF backbones: SimCSE's CLS MLP and the projections to the shared space."""
from __future__ import annotations

import torch
from torch import nn


class ClsMlp(nn.Module):
    """SimCSE's pooler MLP over the CLS vector: tanh(W h + b), width unchanged."""

    def __init__(self, hidden: int):
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)
        self.activation = nn.Tanh()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.dense(x))


def projection_head(kind: str, in_dim: int, out_dim: int) -> nn.Module:
    """'linear': CLIP's bias-free matrix; 'mlp': LAION-CLAP's Linear-ReLU-Linear; 'none': identity."""
    if kind == "linear":
        return nn.Linear(in_dim, out_dim, bias=False)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(in_dim, out_dim), nn.ReLU(), nn.Linear(out_dim, out_dim))
    if kind == "none":
        if in_dim != out_dim:
            raise ValueError(f"projection 'none' needs in_dim == out_dim, got {in_dim} and {out_dim}")
        return nn.Identity()
    raise ValueError(f"projection must be 'linear', 'mlp' or 'none', got {kind!r}")
