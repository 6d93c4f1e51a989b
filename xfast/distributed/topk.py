"""Blockwise top-k of query-key dot products, optionally over keys spread across ranks.

Scores are computed block x block (at most `block` queries by `block` keys at a time) and
merged into a running top-k, so nothing of size queries x keys exists. With a group, each
rank passes its own queries and its own shard of the keys; the answer for its queries is
over the keys of every rank, with global indices (shard offset = the key counts of the
preceding ranks), identical to torch.topk on the concatenated keys.

Ties are broken deterministically: equal scores are ordered by lower global key index.
"""
from __future__ import annotations

import torch

from xfast._checks import check_alike, check_finite, check_float_matrix
from xfast.backends import accumulation_dtype
from xfast.distributed.checks import LocalShape, agree
from xfast.distributed.exchange import Ring, gather_rows

TOPK_MODES = ("allgather", "ring")


def _check_matrix(name: str, t) -> None:
    """Like the losses' checks, but a rank may hold no rows."""
    check_float_matrix(name, t, rows="count")
    if t.shape[1] == 0:
        raise ValueError(f"{name} must have dim > 0, got shape {tuple(t.shape)}")
    check_finite(name, t)


def _check_local(queries, keys, k, block, mode) -> None:
    _check_matrix("queries", queries)
    _check_matrix("keys", keys)
    check_alike(("queries", "keys"), (queries, keys), same_rows=False)
    for name, v in (("k", k), ("block", block)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if mode not in TOPK_MODES:
        raise ValueError(f"mode must be one of {TOPK_MODES}, got {mode!r}")


def _ordered(scores: torch.Tensor, index: torch.Tensor, k: int):
    """The k best per row by (score descending, index ascending)."""
    by_index = torch.argsort(index, dim=1, stable=True)
    scores, index = scores.gather(1, by_index), index.gather(1, by_index)
    by_score = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
    return scores.gather(1, by_score), index.gather(1, by_score)


class RunningTopK:
    """Top-k of every query over the key blocks fed so far."""

    def __init__(self, queries: torch.Tensor, k: int, block: int):
        self.queries, self.k, self.block = queries, k, block
        # Without queries there is nothing to merge: the result is already final, [0, k].
        width = k if queries.shape[0] == 0 else 0
        self.scores = queries.new_empty((queries.shape[0], width))
        self.index = torch.empty((queries.shape[0], width), dtype=torch.int64, device=queries.device)

    def add(self, keys: torch.Tensor, first_index: int) -> None:
        """Merges keys whose global indices are first_index, first_index + 1, ..."""
        if self.queries.shape[0] == 0:
            return
        for k0 in range(0, keys.shape[0], self.block):
            kb = keys[k0:k0 + self.block].to(self.queries.dtype)  # 16-bit keys widened one block at a time
            take = min(self.k, kb.shape[0])
            new_scores, new_index = [], []
            for q0 in range(0, self.queries.shape[0], self.block):
                s = self.queries[q0:q0 + self.block] @ kb.T
                # A stable sort keeps equal scores in index order within the block.
                order = torch.sort(s, dim=1, descending=True, stable=True)
                new_scores.append(order.values[:, :take])
                new_index.append(order.indices[:, :take] + (first_index + k0))
            self.scores, self.index = _ordered(torch.cat([self.scores, torch.cat(new_scores)], 1),
                                               torch.cat([self.index, torch.cat(new_index)], 1), self.k)


@torch.no_grad()
def similarity_topk(queries: torch.Tensor, keys: torch.Tensor, k: int, *, group=None, block: int = 4096,
                    mode: str = "allgather") -> tuple[torch.Tensor, torch.Tensor]:
    """(scores [Nq, k], indices [Nq, k]) of the k largest queries @ keys.T per query.

    queries [Nq, d], keys [Nk, d] (normalise them first for cosine similarity); scores are
    float32 (float64 for float64 inputs), indices int64 into the keys (global across ranks
    when group is given), sorted best first, ties by lower index. block: queries and keys
    per score tile (memory block**2 scores). With group, mode "allgather" gathers all keys
    on every rank; "ring" passes the key shards around the ranks so each holds at most two.
    Keys travel in their own dtype (16-bit keys as 16 bits) and are widened block by block.
    A rank may have no queries, or no keys, as long as the keys of all ranks number >= k.
    """
    if group is None:
        _check_local(queries, keys, k, block, mode)
        if k > keys.shape[0]:
            raise ValueError(f"k={k} is larger than the number of keys ({keys.shape[0]})")
        acc = accumulation_dtype(queries)
        top = RunningTopK(queries.to(acc), k, block)
        top.add(keys, 0)
        return top.scores, top.index

    def describe():
        _check_local(queries, keys, k, block, mode)
        return LocalShape(queries.shape[0], keys.shape[0], queries.shape[1], queries.dtype, False)

    layout = agree("similarity_topk", group, describe,
                   {"k": k, "mode": mode})
    if k > layout.total_cols:
        raise ValueError(f"similarity_topk: k={k} is larger than the number of keys over all ranks "
                         f"({layout.total_cols}: " + ", ".join(f"rank {r} has {n}" for r, n in enumerate(layout.cols))
                         + ")")
    acc = accumulation_dtype(queries)
    top = RunningTopK(queries.to(acc), k, block)
    keys = keys.contiguous()  # 16-bit keys travel in 16 bits
    if mode == "allgather":
        top.add(gather_rows(keys, layout.cols, group), 0)
        return top.scores, top.index
    for owner, shard in Ring(group).blocks(keys, layout.cols):
        top.add(shard, layout.col_start(owner))
    return top.scores, top.index
