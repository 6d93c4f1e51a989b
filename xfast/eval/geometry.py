"""Geometry of embedding spaces: alignment and uniformity (Wang & Isola, 2020) and CyCLIP's
consistency gaps (Goel et al., 2022). Embeddings are L2-normalised first (the hypersphere the
definitions live on); everything is accumulated in float64.
"""
from __future__ import annotations

import math

import torch

from xfast.eval._checks import check_block, check_index, check_matrix, check_same_device, unit_rows
from xfast.eval.retrieval import caption_table
from xfast.ops.cyclip_loss import cyclip_loss


def _check_pairs(x: torch.Tensor, y: torch.Tensor) -> None:
    check_matrix("x", x)
    check_matrix("y", y, dim=x.shape[1])
    check_same_device(("x", "y"), (x, y))
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"y has {y.shape[0]} rows but x has {x.shape[0]}: positive pairs are rows with the same index")


def alignment(x: torch.Tensor, y: torch.Tensor, alpha: float = 2) -> float:
    """Mean over positive pairs (x[i], y[i]) of ||x_i - y_i||_2^alpha (lower = better aligned)."""
    _check_pairs(x, y)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0 or not math.isfinite(alpha):
        raise ValueError(f"alpha must be a positive number, got {alpha!r}")
    diff = unit_rows("x", x, torch.float64) - unit_rows("y", y, torch.float64)
    return float(diff.norm(dim=1).pow(alpha).mean())


def uniformity(x: torch.Tensor, t: float = 2, *, block: int = 256) -> float:
    """log of the mean over distinct pairs i != j of exp(-t ||x_i - x_j||^2) (lower = more uniform).

    Streamed `block` rows at a time as a running log-sum-exp, so memory is O(block * N).
    Needs at least 2 rows.
    """
    check_matrix("x", x, min_rows=2)
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0 or not math.isfinite(t):
        raise ValueError(f"t must be a positive number, got {t!r}")
    block = check_block(block)
    unit = unit_rows("x", x, torch.float64)
    n = unit.shape[0]
    block_lse = []
    for start in range(0, n, block):
        rows = unit[start : start + block]
        # ||a - b||^2 = 2 - 2 <a, b> on the unit sphere.
        sq_dist = (2 - 2 * rows @ unit.T).clamp(min=0)
        logits = -t * sq_dist
        own = torch.arange(rows.shape[0], device=unit.device)
        logits[own, own + start] = float("-inf")
        block_lse.append(torch.logsumexp(logits.flatten(), 0))
    return float(torch.logsumexp(torch.stack(block_lse), 0) - math.log(n * (n - 1)))


def consistency_gaps(x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """CyCLIP's consistency gaps of N pairs (x[i], y[i]) as mean squared differences over all
    N^2 ordered pairs (j, k):
      in_modal_gap    = mean_jk (<x_j, x_k> - <y_j, y_k>)^2
      cross_modal_gap = mean_jk (<x_j, y_k> - <x_k, y_j>)^2
    (CyCLIP's losses divided by N; computed through d x d Gram matrices by xfast.cyclip_loss)."""
    _check_pairs(x, y)
    in_modal, cross_modal = cyclip_loss(unit_rows("x", x, torch.float64), unit_rows("y", y, torch.float64))
    n = x.shape[0]
    return {"in_modal_gap": float(in_modal) / n, "cross_modal_gap": float(cross_modal) / n}


def caption_pairs(text_to_media: torch.Tensor, num_media: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(first, second) caption indices of every unordered pair of distinct captions of one item."""
    table = caption_table(text_to_media, num_media)
    firsts, seconds = [], []
    for a in range(table.shape[1]):
        for b in range(a + 1, table.shape[1]):
            both = (table[:, a] >= 0) & (table[:, b] >= 0)
            firsts.append(table[both, a])
            seconds.append(table[both, b])
    if not firsts:
        empty = torch.empty(0, dtype=torch.int64, device=table.device)
        return empty, empty
    return torch.cat(firsts), torch.cat(seconds)


def geometry_metrics(
    media_emb: torch.Tensor,
    text_emb: torch.Tensor,
    text_to_media,
    *,
    block: int = 256,
    media_name: str = "media",
) -> dict[str, float]:
    """Alignment, uniformity and consistency gaps of a paired media/caption set.

    "text/uniformity", "{media}/uniformity", "joint/uniformity" (texts and media together: a
    modality gap lowers it less than a shared space does): uniformity with t = 2.
    "text/alignment": alpha = 2 over every pair of captions of the same item (absent when no item
    has two captions). "cross/alignment": each caption against its item.
    "cross/in_modal_gap", "cross/cross_modal_gap": `consistency_gaps` of each item with its first
    caption (lowest index), so every item counts once.
    """
    check_matrix("media_emb", media_emb)
    check_matrix("text_emb", text_emb, dim=media_emb.shape[1])
    check_same_device(("media_emb", "text_emb"), (media_emb, text_emb))
    owner = check_index(
        "text_to_media", text_to_media, length=text_emb.shape[0], upper=media_emb.shape[0],
        upper_name="media_emb rows", device=media_emb.device,
    )
    table = caption_table(owner, media_emb.shape[0])
    out: dict[str, float] = {}
    if text_emb.shape[0] >= 2:
        out["text/uniformity"] = uniformity(text_emb, block=block)
    if media_emb.shape[0] >= 2:
        out[f"{media_name}/uniformity"] = uniformity(media_emb, block=block)
    joint = torch.cat([unit_rows("media_emb", media_emb, torch.float64), unit_rows("text_emb", text_emb, torch.float64)])
    out["joint/uniformity"] = uniformity(joint, block=block)
    first, second = caption_pairs(owner, media_emb.shape[0])
    if first.numel():
        out["text/alignment"] = alignment(text_emb[first], text_emb[second])
    out["cross/alignment"] = alignment(text_emb, media_emb[owner])
    gaps = consistency_gaps(media_emb, text_emb[table[:, 0]])
    out["cross/in_modal_gap"] = gaps["in_modal_gap"]
    out["cross/cross_modal_gap"] = gaps["cross_modal_gap"]
    return out
