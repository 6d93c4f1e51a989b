"""Exact contrastive losses and top-k over a torch.distributed process group.

Reached through `group=` on xfast.clip_loss / simcse_loss / cyclip_loss, through
xfast.ClipLoss(world_size > 1), and xfast.similarity_topk. Every rank passes its own slice
of the global batch; the result equals the single-process one on the concatenation of the
slices (in rank order) for any world size, up to float rounding.

The math (CLIP; SimCSE is its row half, see below)
--------------------------------------------------
Global batch N = sum_r n_r; rank r holds rows x_r, y_r starting at global index o_r.
With Z = s X Y^T (N x N), the loss is

    L = 1/(2N) sum_i (row_lse_i - Z_ii) + 1/(2N) sum_j (col_lse_j - Z_jj).

Rank r can only score its own rows, Z_r = s x_r Y^T (n_r x N). That gives row_lse exactly
for its rows, but only a *partial* column logsumexp p_rj = lse_{i in r} Z_ij; the true one is
col_lse_j = lse_r p_rj, an O(N) exchange (all-reduce of the max, then of sum exp(p - max)).
Rank r's share of L is

    l_r = 1/(2N) [sum_{i in r} (row_lse_i - Z_ii) + sum_{j in r} (col_lse_j - Z_jj)],

so sum_r l_r = L. Backward: dL/dZ_ij = g_row_i softmax_row + g_col_j softmax_col with every
logsumexp and g_col_j = dl/dcol_lse_j known once the O(N) column gradients are exchanged,
so rank r's kernel backward on its tile yields dx_r exactly, a partial dY (its rows'
contribution to every column, summed over ranks by a reduce-scatter to each column's
owner), and its share of dL/ds (the sum of the shares is dL/ds).

Mode "allgather" gathers Y once (N x d per rank). Mode "ring" passes the column blocks
around the ranks instead (send/recv overlapped with the kernel), the partial column
logsumexps and, in backward, the dY accumulators travelling behind them, so a rank holds
at most two blocks (see ring.py). Both are exact; uneven local batch sizes (the last batch
of an epoch) work in both. 16-bit inputs travel and reach the kernels in 16 bits; the kernels
accumulate in float32 and return float32 dx/dy partials, summed over blocks and ranks in
float32, rounded to the input dtype once (the logsumexp vectors are float32 throughout). Label smoothing adds s x_i . mean(Y), an all-reduce of d-vectors.
backend="reference" with a group gathers both towers with gradient and materialises the
whole N x N (N x 2N) logits on every rank: open_clip's gather_with_grad baseline, kept as
an oracle and for the benchmark.

SimCSE: anchors are rows and each rank's column block is [z2_r | hard_negatives_r]; the
hard-negative bias of anchor i sits in its own rank's block at n_r + i (row direction only).
CyCLIP: Gx = sum_r x_r^T x_r etc. are all-reduced (d x d, with gradient: the backward of
an all-reduce-sum is the all-reduce-sum of the gradients), then every rank evaluates the
whole (tiny) loss.

Reduction convention (grad_reduction=)
--------------------------------------
Value: every rank returns the global loss L (what single-process training on the
concatenated batch reports; log it on any rank).

Gradient: what you call backward on is, across ranks, differentiated as a whole, and each
rank receives the gradient for the tensors it owns. DDP and DeepSpeed then *average* the
parameter gradients over the W ranks. With grad_reduction="mean" (default) each rank's
local gradient is scaled so that this average is exactly the single-process gradient of L:
rank r's inputs receive W * dL/dx_r (W times its slice of the single-process gradient), and
its logit_scale (or temperature) receives W times its share, so the average over ranks is
dL/ds. With grad_reduction="sum" rank r receives dL/dx_r and its share of dL/ds: use it when
gradients are summed over ranks afterwards, or to read gradients directly.

So under DDP/DeepSpeed the result does not depend on the world size, for the towers and the
temperature alike (unlike open_clip without gather_with_grad, whose tower gradients shrink
by 1/W relative to logit_scale's). The per-rank logit_scale gradient is a share, not the
whole: a replicated parameter must be synchronised (as DDP and DeepSpeed do) like any other.

All ranks must call the loss and its backward together. Before any heavy exchange the
ranks check one another's inputs (width, dtype, settings and scalars such as logit_scale,
whether backward will run) and all
raise the same ValueError on a mismatch; see checks.py for the timeout.

Code: each loss is written once (xfast/ops/*_loss.py) against the batch of batch.py, local or
of a group; gathered_lse.py is the exchange similarity_lse runs over the group, by way of
allgather.py or ring.py; exchange.py holds the collectives, checks.py the agreement check.
"""
from __future__ import annotations

from xfast._lazy import lazy_exports

__all__ = ["similarity_topk", "default_group"]
# Imported on first use: launchers that only need rendezvous.free_port do not load torch.
__getattr__, __dir__ = lazy_exports(__name__, {"similarity_topk": "xfast.distributed.topk"})


def default_group(group, rank: int, world_size: int):
    """The process group open_clip-style (rank, world_size) arguments refer to, or None for
    a single process. Checks them against torch.distributed so a wrong pair fails clearly."""
    if group is None and world_size == 1:
        return None
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"world_size={world_size} but torch.distributed is not initialised "
                           f"(call torch.distributed.init_process_group first)")
    group = dist.group.WORLD if group is None else group
    actual_rank, actual_world = dist.get_rank(group), dist.get_world_size(group)
    if (rank, world_size) != (actual_rank, actual_world):
        raise ValueError(f"rank={rank}, world_size={world_size} do not match the process group "
                         f"(rank {actual_rank} of {actual_world})")
    return group
