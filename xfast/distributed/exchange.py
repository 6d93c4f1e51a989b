"""Collectives for the distributed losses, plain and autograd-aware.

Gradient convention of every autograd collective here: the objective being differentiated is
the sum over ranks of the tensors each rank calls backward on, F = sum_r l_r. So the backward
of a gather is a reduce-scatter (the owner of a row receives the sum of everybody's gradient
for it), and the backward of an all-reduce-sum is an all-reduce-sum of the gradients.

Uneven row counts are handled by padding every rank's rows to the largest count (the
single-tensor collectives want equal sizes); equal counts need no copy at all.
"""
from __future__ import annotations

from typing import Callable, Iterator

import torch
import torch.distributed as dist


def rank_and_world(group) -> tuple[int, int]:
    return dist.get_rank(group), dist.get_world_size(group)


def offsets(sizes: tuple[int, ...]) -> list[int]:
    """Start of each rank's rows in the concatenation over ranks."""
    out, total = [], 0
    for n in sizes:
        out.append(total)
        total += n
    return out


def gather_rows(t: torch.Tensor, sizes: tuple[int, ...], group) -> torch.Tensor:
    """Concatenation over ranks of each rank's t (rank r holds sizes[r] rows)."""
    if len(sizes) == 1:
        return t
    width = max(sizes)
    if t.shape[0] == width:
        padded = t.contiguous()
    else:
        padded = t.new_zeros((width,) + tuple(t.shape[1:]))
        padded[: t.shape[0]] = t
    out = t.new_empty((len(sizes) * width,) + tuple(t.shape[1:]))
    dist.all_gather_single(out, padded, group=group)
    if min(sizes) == width:
        return out
    return torch.cat([out[r * width: r * width + n] for r, n in enumerate(sizes)])


def reduce_scatter_rows(t: torch.Tensor, sizes: tuple[int, ...], group) -> torch.Tensor:
    """Rank r's rows of the sum over ranks of t ([sum(sizes), ...] on every rank)."""
    if len(sizes) == 1:
        return t
    width = max(sizes)
    if min(sizes) == width:
        padded = t.contiguous()
    else:
        padded = t.new_zeros((len(sizes) * width,) + tuple(t.shape[1:]))
        for r, (start, n) in enumerate(zip(offsets(sizes), sizes)):
            padded[r * width: r * width + n] = t[start:start + n]
    out = t.new_empty((width,) + tuple(t.shape[1:]))
    dist.reduce_scatter_single(out, padded, group=group)
    return out[: sizes[dist.get_rank(group)]]


def logsumexp_over_ranks(partial: torch.Tensor, group) -> torch.Tensor:
    """Elementwise log(sum_r exp(partial_r)): two all-reduces of the vector, max then sum."""
    if dist.get_world_size(group) == 1:
        return partial
    peak = partial.clone()
    dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=group)
    # Each partial is a finite logsumexp over a non-empty set of rows, so peak is finite.
    total = torch.exp(partial - peak)
    dist.all_reduce(total, group=group)
    return peak + torch.log(total)


class GatherRows(torch.autograd.Function):
    """gather_rows with gradient: backward reduce-scatters to each row's owner."""

    @staticmethod
    def forward(ctx, t, sizes, group):
        ctx.sizes, ctx.group = sizes, group
        return gather_rows(t, sizes, group)

    @staticmethod
    def backward(ctx, grad):
        return reduce_scatter_rows(grad.contiguous(), ctx.sizes, ctx.group), None, None


class AllReduceSum(torch.autograd.Function):
    """Sum over ranks; each rank's term receives the sum of all ranks' output gradients."""

    @staticmethod
    def forward(ctx, t, group):
        ctx.group = group
        out = t.detach().clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class SumOverRanks(torch.autograd.Function):
    """Value: the sum over ranks of the per-rank parts (every rank gets the total).

    Backward: the local part's gradient times `factor`, with no communication. The parts
    are the local shares of one global loss, so differentiating part_r on every rank already
    differentiates the total (F = sum_r part_r, see the module docstring); factor then
    rescales for the gradient reduction that follows (world size for DDP's average).
    """

    @staticmethod
    def forward(ctx, part, group, factor):
        ctx.factor = factor
        total = part.detach().clone()
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None, None


class ScaleGrad(torch.autograd.Function):
    """Identity whose gradient is multiplied by `factor`."""

    @staticmethod
    def forward(ctx, t, factor):
        ctx.factor = factor
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


class Ring:
    """Point-to-point shifts around the ranks of a group: send to rank+1, receive from rank-1."""

    # Tags keep the different messages of one step apart (gloo matches on them).
    TAG_BLOCK, TAG_ACCUMULATOR = 17, 18

    def __init__(self, group):
        self.group = group
        self.rank, self.world = rank_and_world(group)

    def shift(self, send: torch.Tensor, recv: torch.Tensor, tag: int) -> list:
        """Posts the send of `send` and the receive into `recv`; wait() on the result.

        Empty tensors are not sent (both ends know every size; gloo mishandles 0-byte
        messages, aborting at exit)."""
        ops = []
        if send.numel():
            ops.append(dist.P2POp(dist.isend, send.contiguous(), group=self.group, tag=tag,
                                  group_peer=(self.rank + 1) % self.world))
        if recv.numel():
            ops.append(dist.P2POp(dist.irecv, recv, group=self.group, tag=tag,
                                  group_peer=(self.rank - 1) % self.world))
        return dist.batch_isend_irecv(ops) if ops else []

    @staticmethod
    def wait(works: list) -> None:
        for w in works:
            w.wait()

    def owner(self, step: int) -> int:
        """Whose block this rank holds at `step` (its own at step 0)."""
        return (self.rank - step) % self.world

    def blocks(self, own: torch.Tensor, sizes: tuple[int, ...]) -> Iterator[tuple[int, torch.Tensor]]:
        """Yields (owner, block) for every rank's block, this rank's own first: block q is
        received from rank-1 while the caller works on the one before. Rank q's block has
        sizes[q] rows; every rank must walk the whole ring."""
        block = own.contiguous()
        for step in range(self.world):
            owner = self.owner(step)
            last = step == self.world - 1
            if not last:
                incoming = block.new_empty((sizes[(owner - 1) % self.world],) + tuple(block.shape[1:]))
                pending = self.shift(block, incoming, Ring.TAG_BLOCK)
            yield owner, block
            if not last:
                Ring.wait(pending)
                block = incoming


class RingAccumulator:
    """A per-block accumulator that travels behind the blocks of Ring.blocks.

    At each step a rank merges its part for the block it holds into what arrived from rank-1
    for that block and sends the result on to rank+1; after the last step every rank holds
    the total of its own block (merged over all ranks). merge: e.g. torch.logaddexp for
    partial logsumexps, torch.add for gradient sums."""

    def __init__(self, ring: Ring, sizes: tuple[int, ...], merge: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
        self.ring, self.sizes, self.merge = ring, sizes, merge
        self.incoming = self.pending = self.result = None

    def add(self, owner: int, part: torch.Tensor) -> None:
        """Adds this rank's part for the block of `owner` (called once per step, in order)."""
        if self.pending is not None:
            Ring.wait(self.pending)
            part = self.merge(self.incoming, part)
        if self.ring.world == 1:
            self.result = part
            return
        # At the last step this receives the rank's own, now complete, total.
        self.incoming = part.new_empty((self.sizes[(owner - 1) % self.ring.world],) + tuple(part.shape[1:]))
        self.pending = self.ring.shift(part.contiguous(), self.incoming, Ring.TAG_ACCUMULATOR)

    def total(self) -> torch.Tensor:
        if self.ring.world == 1:
            return self.result
        Ring.wait(self.pending)
        return self.incoming
