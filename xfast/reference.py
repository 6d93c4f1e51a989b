"""Plain-PyTorch losses that materialise the N x M logits.

This is backend="reference" and the oracle every fused backend is tested against (in
float64). It follows the published formulas as directly as possible and shares no code with
the fused path.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def clip_loss(x, y, logit_scale, *, label_smoothing: float = 0.0):
    logits = logit_scale.reshape(()) * x @ y.T
    labels = torch.arange(x.shape[0], device=x.device)
    return (F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
            + F.cross_entropy(logits.T, labels, label_smoothing=label_smoothing)) / 2


def simcse_loss(z1, z2, hard_negatives=None, *, temperature=0.05, hard_negative_weight: float = 0.0):
    cos = F.normalize(z1, dim=-1) @ F.normalize(z2, dim=-1).T
    if hard_negatives is not None:
        cos_hn = F.normalize(z1, dim=-1) @ F.normalize(hard_negatives, dim=-1).T
        # SimCSE's code adds the weight to the logit of each anchor's own hard negative.
        weights = torch.zeros_like(cos_hn)
        weights.fill_diagonal_(hard_negative_weight)
        logits = torch.cat([cos / temperature, cos_hn / temperature + weights], dim=1)
    else:
        logits = cos / temperature
    return F.cross_entropy(logits, torch.arange(z1.shape[0], device=z1.device))


def cyclip_loss(x, y):
    n = x.shape[0]
    in_modal = (x @ x.T - y @ y.T).square().sum() / n
    cross = x @ y.T
    cross_modal = (cross - cross.T).square().sum() / n
    return in_modal, cross_modal
