"""Cross-modal retrieval with several captions per item (the AudioCaps / Clotho / COCO protocol).

Scores are cosine similarities. Queries are processed `block` rows at a time: each block is
scored against every key ([block, keys] memory, never the full queries x keys matrix) and only
ranks survive, obtained by counting keys that score at least as high as the positive. Counting
is exact, so every block size gives the same ranks.

Ties are resolved pessimistically and deterministically: a non-relevant key whose score equals a
relevant key's score is ranked ahead of it. A collapsed model whose embeddings are all equal
therefore gets the worst rank, never R@1 = 1.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from xfast.backends import accumulation_dtype
from xfast.eval._checks import check_block, check_index, check_ks, check_matrix, check_same_device, unit_rows


@dataclass
class RetrievalRanks:
    """1-based ranks (1 = the relevant key scored highest) and AP@map_k per query.

    text_to_media: [T] rank of each caption's own item among the N items.
    media_to_text: [N] rank of the best-ranked caption of each item among the T captions.
    text_to_media_ap / media_to_text_ap: [T] / [N] float64 AP@map_k (definitions in
    `retrieval_ranks`).
    """

    text_to_media: torch.Tensor
    media_to_text: torch.Tensor
    text_to_media_ap: torch.Tensor
    media_to_text_ap: torch.Tensor
    map_k: int


def caption_table(text_to_media: torch.Tensor, num_media: int) -> torch.Tensor:
    """[N, R_max] caption indices of each item in increasing order, padded with -1.

    Raises ValueError if an item has no caption: media->text retrieval is undefined for it.
    """
    counts = torch.bincount(text_to_media, minlength=num_media)
    missing = (counts == 0).nonzero().flatten()
    if missing.numel():
        shown = ", ".join(str(int(i)) for i in missing[:5])
        raise ValueError(
            f"text_to_media gives no caption to {missing.numel()} media item(s) (e.g. item {shown}); "
            "every item needs at least one caption"
        )
    order = torch.argsort(text_to_media, stable=True)
    owner = text_to_media[order]
    first = torch.cumsum(counts, 0) - counts
    slot = torch.arange(order.numel(), device=order.device) - first[owner]
    table = torch.full((num_media, int(counts.max())), -1, dtype=torch.int64, device=order.device)
    table[owner, slot] = order
    return table


def retrieval_ranks(
    media_emb: torch.Tensor,
    text_emb: torch.Tensor,
    text_to_media,
    *,
    block: int = 256,
    map_k: int = 10,
) -> RetrievalRanks:
    """Ranks for text->media and media->text retrieval, computed block by block.

    media_emb [N, D] and text_emb [T, D] are any finite vectors (they are L2-normalised here, so
    scores are cosines); text_to_media [T] holds the index of the item each caption describes.

    text->media: caption t has one relevant item g(t); rank = #{items j : s(t, j) >= s(t, g(t))}
    (the positive itself included, ties counted against it). AP@k = 1/rank if rank <= k else 0.

    media->text: item i has R_i relevant captions. Sorting all T captions by score, non-relevant
    before relevant on ties, gives relevant captions at ranks r_1 < ... < r_{R_i}; the reported
    rank is r_1 (the best caption, as in the AudioCaps/Clotho protocol) and
    AP@k = (1 / min(R_i, k)) * sum_{j : r_j <= k} j / r_j, i.e. precision at each relevant hit
    within the top k, normalised so a perfect ranking scores 1.
    """
    check_matrix("media_emb", media_emb)
    check_matrix("text_emb", text_emb, dim=media_emb.shape[1])
    check_same_device(("media_emb", "text_emb"), (media_emb, text_emb))
    block = check_block(block)
    if isinstance(map_k, bool) or not isinstance(map_k, int) or map_k < 1:
        raise ValueError(f"map_k must be a positive integer, got {map_k!r}")
    num_media, num_text = media_emb.shape[0], text_emb.shape[0]
    owner = check_index(
        "text_to_media", text_to_media, length=num_text, upper=num_media, upper_name="media_emb rows", device=media_emb.device
    )
    captions = caption_table(owner, num_media)
    dtype = accumulation_dtype(media_emb)
    media = unit_rows("media_emb", media_emb, dtype)
    text = unit_rows("text_emb", text_emb, dtype)

    t2m = torch.empty(num_text, dtype=torch.int64, device=media.device)
    for start in range(0, num_text, block):
        scores = text[start : start + block] @ media.T
        positive = scores.gather(1, owner[start : start + block, None])
        t2m[start : start + block] = (scores >= positive).sum(1)

    m2t = torch.empty(num_media, dtype=torch.int64, device=media.device)
    m2t_ap = torch.empty(num_media, dtype=torch.float64, device=media.device)
    hit_number = torch.arange(1, captions.shape[1] + 1, device=media.device)
    for start in range(0, num_media, block):
        stop = min(start + block, num_media)
        scores = media[start:stop] @ text.T
        relevant = captions[start:stop]
        valid = relevant >= 0
        positive = scores.gather(1, relevant.clamp(min=0)).masked_fill(~valid, float("-inf"))
        positive = positive.sort(dim=1, descending=True).values
        is_relevant = owner[None, :] == torch.arange(start, stop, device=media.device)[:, None]
        negatives = scores.masked_fill(is_relevant, float("-inf")).sort(dim=1).values
        # Non-relevant captions scoring >= each relevant one (the -inf fill is never >= a real score).
        beaten_by = num_text - torch.searchsorted(negatives, positive.contiguous(), right=False)
        ranks = hit_number + beaten_by
        m2t[start:stop] = ranks[:, 0]
        hits = valid & (ranks <= map_k)
        precision = torch.where(hits, hit_number.to(torch.float64) / ranks.to(torch.float64), 0.0)
        m2t_ap[start:stop] = precision.sum(1) / valid.sum(1).clamp(max=map_k)

    t2m_ap = torch.where(t2m <= map_k, 1.0 / t2m.to(torch.float64), 0.0)
    return RetrievalRanks(t2m, m2t, t2m_ap, m2t_ap, map_k)


def recall_at(ranks: torch.Tensor, ks) -> dict[int, float]:
    """Fraction of queries whose rank is <= k, for each k."""
    ks = check_ks(ks)
    return {k: float((ranks <= k).double().mean()) for k in ks}


def median_rank(ranks: torch.Tensor) -> float:
    """The usual median (mean of the two middle ranks when their count is even)."""
    ordered = ranks.sort().values.to(torch.float64)
    mid = ordered.numel() // 2
    return float(ordered[mid]) if ordered.numel() % 2 else float((ordered[mid - 1] + ordered[mid]) / 2)


def summarize_ranks(ranks: RetrievalRanks, *, ks=(1, 5, 10), media_name: str = "media") -> dict[str, float]:
    """Flat metric dict "text_to_{media}/R@k", ".../median_rank", ".../mean_rank", ".../mAP@k" and the reverse."""
    out: dict[str, float] = {}
    for direction, r, ap in (
        (f"text_to_{media_name}", ranks.text_to_media, ranks.text_to_media_ap),
        (f"{media_name}_to_text", ranks.media_to_text, ranks.media_to_text_ap),
    ):
        for k, value in recall_at(r, ks).items():
            out[f"{direction}/R@{k}"] = value
        out[f"{direction}/median_rank"] = median_rank(r)
        out[f"{direction}/mean_rank"] = float(r.double().mean())
        out[f"{direction}/mAP@{ranks.map_k}"] = float(ap.mean())
    return out


def retrieval_metrics(
    media_emb: torch.Tensor,
    text_emb: torch.Tensor,
    text_to_media,
    *,
    ks=(1, 5, 10),
    block: int = 256,
    map_k: int = 10,
    media_name: str = "media",
) -> dict[str, float]:
    """R@k (fractions in [0, 1]), median and mean rank and mAP@map_k in both directions.

    See `retrieval_ranks` for the protocol, the tie rule and the mAP definition. Keys are
    "text_to_{media_name}/R@1", ..., "{media_name}_to_text/mAP@10".
    """
    ks = check_ks(ks)
    ranks = retrieval_ranks(media_emb, text_emb, text_to_media, block=block, map_k=map_k)
    return summarize_ranks(ranks, ks=ks, media_name=media_name)
