"""The batch a loss is computed over: this process's own, or the concatenation of every rank's
slice in a process group.

Each loss (xfast/ops/*_loss.py) is written once against this small interface; the local and
the distributed case differ only in where the logsumexps come from (`exchange`, passed to
similarity_lse) and how sums and the result are reduced. See xfast/distributed/__init__.py
for the math and the gradient convention.
"""
from __future__ import annotations

from typing import Callable

import torch

from xfast.distributed.checks import Layout, LocalShape, agree
from xfast.distributed.exchange import AllReduceSum, GatherRows, ScaleGrad, SumOverRanks
from xfast.distributed.gathered_lse import MODES, GroupExchange

GRAD_REDUCTIONS = ("mean", "sum")


def check_mode(mode) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {tuple(MODES)}, got {mode!r}")


def check_grad_reduction(grad_reduction) -> None:
    if grad_reduction not in GRAD_REDUCTIONS:
        raise ValueError(f"grad_reduction must be 'mean' (gradients averaged over ranks afterwards, as DDP and "
                         f"DeepSpeed do) or 'sum', got {grad_reduction!r}")


def grad_factor(grad_reduction: str, world: int) -> float:
    """What the local gradients are multiplied by so that the reduction that follows yields
    the gradient of the global loss: the mean over ranks divides by the world size."""
    return float(world) if grad_reduction == "mean" else 1.0


def local_shape(rows: int, cols: int, like: torch.Tensor, *grad_inputs) -> LocalShape:
    """This rank's part: `rows` rows, a column block of `cols`, like's width and dtype, and
    whether backward will run (some input requires grad with grad mode on)."""
    needs_grad = torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad
                                                 for t in grad_inputs)
    return LocalShape(rows, cols, like.shape[1], like.dtype, needs_grad)


class LocalBatch:
    """A single process's batch: nothing to exchange, every reduction is the identity."""

    exchange = None  # similarity_lse's default: the local kernel call

    def __init__(self, rows: int):
        self.total_rows = rows

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """The sum over ranks of t (with gradient)."""
        return t

    def gather(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Every rank's rows of each tensor, concatenated in rank order (with gradient)."""
        return tensors

    def reduce(self, part: torch.Tensor) -> torch.Tensor:
        """The loss from this rank's share of it (a sum over its rows / total_rows)."""
        return part

    def replicated(self, loss: torch.Tensor) -> torch.Tensor:
        """A loss every rank computed whole from gathered inputs."""
        return loss


class GroupBatch(LocalBatch):
    """The global batch of a process group, rank r holding layout.rows[r] of its rows."""

    def __init__(self, layout: Layout, mode: str, grad_reduction: str):
        super().__init__(layout.total_rows)
        self.layout, self.group = layout, layout.group
        self.exchange = GroupExchange(layout, mode)
        self.grad_factor = grad_factor(grad_reduction, layout.world)

    def sum(self, t):
        return AllReduceSum.apply(t, self.group)

    def gather(self, *tensors):
        return tuple(GatherRows.apply(t, self.layout.rows, self.group) for t in tensors)

    def reduce(self, part):
        return SumOverRanks.apply(part, self.group, self.grad_factor)

    def replicated(self, loss):
        # backward on W ranks counts a replicated loss W times.
        return ScaleGrad.apply(loss, self.grad_factor / self.layout.world)


def open_batch(op: str, validate: Callable[[], tuple[tuple, LocalShape]], *, group, shared: dict,
               mode: str = "allgather", grad_reduction: str = "mean") -> tuple[LocalBatch, tuple]:
    """(the batch, what validate returned) for loss `op`.

    validate() checks this rank's arguments and returns (checked values, local shape). Without
    a group its error is raised here; with one, every rank validates, and all raise the same
    error if any rank's input is invalid, or if the ranks disagree on the shape, dtype or any
    `shared` setting (values every rank must pass alike: mode, reduction, backend and the
    loss's scalars), before anything heavy is exchanged.
    """
    if group is None:
        values, shape = validate()
        return LocalBatch(shape.rows), values
    checked = []

    def describe():
        check_mode(mode)
        check_grad_reduction(grad_reduction)
        values, shape = validate()
        checked.append(values)
        return shape

    layout = agree(op, group, describe, {"mode": mode, "grad_reduction": grad_reduction, **shared})
    return GroupBatch(layout, mode, grad_reduction), checked[0]
