"""A rank with mismatched or broken input gets a clear error on every rank, not a hang."""
from __future__ import annotations

import os
import re
import time

import pytest
import torch
import torch.distributed as dist

import xfast
from tests.dist_utils import run_ranks
from xfast import reference
from xfast.distributed import checks

N, D = 4, 8


def inputs(rank, *, d=D, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed + rank)
    return (torch.randn(N, d, generator=g, dtype=torch.float64).to(dtype).requires_grad_(True),
            torch.randn(N, d, generator=g, dtype=torch.float64).to(dtype).requires_grad_(True))


def expect_everywhere(match, fn):
    """Each rank checks that fn raises the ValueError `match` describes."""
    with pytest.raises(ValueError, match=match):
        fn()


def two_ranks(rank, world):
    group = dist.group.WORLD
    s = torch.tensor(10.0, dtype=torch.float64)
    x, y = inputs(rank)
    expect_everywhere("the embedding dim differs across ranks: rank 0 has 8, rank 1 has 6",
                      lambda: xfast.clip_loss(*inputs(rank, d=D - 2 * rank), s, group=group))
    expect_everywhere("the dtype differs across ranks: rank 0 has torch.float64, rank 1 has torch.float32",
                      lambda: xfast.clip_loss(*inputs(rank, dtype=torch.float32 if rank else torch.float64),
                                              s, group=group))
    broken = torch.full_like(x, float("nan")) if rank == 1 else x
    expect_everywhere(r"invalid input on (rank 1|this rank) \(of 2\): x contains NaN",
                      lambda: xfast.clip_loss(broken, y, s, group=group))
    expect_everywhere("invalid input on .*mode must be one of",
                      lambda: xfast.clip_loss(x, y, s, group=group, mode="rng" if rank else "ring"))
    expect_everywhere("invalid input on .*label_smoothing must be a number",
                      lambda: xfast.clip_loss(x, y, s, group=group, label_smoothing="0.1" if rank else 0.1))
    expect_everywhere("mode must be the same on every rank, got rank 0: 'allgather', rank 1: 'ring'",
                      lambda: xfast.clip_loss(x, y, s, group=group, mode="ring" if rank else "allgather"))
    expect_everywhere("hard_negatives must be the same on every rank, got rank 0: False, rank 1: True",
                      lambda: xfast.simcse_loss(x, y, y if rank else None, group=group))
    # Shared scalars: a mismatch would silently mix two different losses.
    expect_everywhere(r"logit_scale must be the same on every rank, got rank 0: 10.0, rank 1: 10.000000000000002",
                      lambda: xfast.clip_loss(x, y, torch.nextafter(s, s + 1) if rank else s, group=group))
    expect_everywhere(r"label_smoothing must be the same on every rank, got rank 0: 0.1, rank 1: 0.2",
                      lambda: xfast.clip_loss(x, y, s, group=group, label_smoothing=0.2 if rank else 0.1))
    expect_everywhere(r"temperature must be the same on every rank, got rank 0: 0.05, rank 1: 0.07",
                      lambda: xfast.simcse_loss(x, y, group=group, temperature=0.07 if rank else 0.05))
    expect_everywhere(r"hard_negative_weight must be the same on every rank, got rank 0: 0.0, rank 1: 1.0",
                      lambda: xfast.simcse_loss(x, y, y, group=group, hard_negative_weight=float(rank)))
    expect_everywhere("the ranks reached different calls: rank 0 is in clip_loss, rank 1 is in simcse_loss",
                      lambda: xfast.simcse_loss(x, y, group=group) if rank else xfast.clip_loss(x, y, s, group=group))
    expect_everywhere("backward would run on some ranks only",
                      lambda: xfast.cyclip_loss(x if rank else x.detach(), y.detach(), group=group))
    expect_everywhere("group must be a torch.distributed.ProcessGroup",
                      lambda: xfast.clip_loss(x, y, s, group="world"))
    # After all that the group is in step: a correct call still gives the exact loss.
    full = [torch.cat([inputs(r)[i].detach() for r in range(world)]) for i in (0, 1)]
    torch.testing.assert_close(xfast.clip_loss(x, y, s, group=group), reference.clip_loss(*full, s))

    # A rank that never calls: the others get a RuntimeError after XFAST_DIST_TIMEOUT_S that
    # says how long they really waited and which rank did not arrive.
    os.environ["XFAST_DIST_TIMEOUT_S"] = "2"
    if rank == 0:
        start = time.monotonic()
        with pytest.raises(RuntimeError, match=r"clip_loss: rank 0 waited \d+\.\d s .*; rank 1 \(its last call "
                                               r"was clip_loss\) did not arrive") as caught:
            xfast.clip_loss(x, y, s, group=group)
        waited = float(re.search(r"waited (\d+\.\d) s", str(caught.value)).group(1))
        assert 1.5 <= waited < 30 and waited <= time.monotonic() - start
        assert "XFAST_DIST_TIMEOUT_S=2 s" in str(caught.value)
    else:
        time.sleep(4)
        # Join the check rank 0 left pending (records have one size) so the group ends in step.
        checks.agree("clip_loss", group, lambda: checks.LocalShape(N, N, D, torch.float64, True))
    dist.barrier()


@pytest.mark.multiprocess
def test_mismatches_raise_on_every_rank_and_a_missing_rank_times_out():
    run_ranks(2, two_ranks)


def test_group_needs_an_initialised_process_group():
    if dist.is_initialized():
        pytest.skip("this process already has a default process group")
    with pytest.raises(RuntimeError, match="torch.distributed is not initialised"):
        xfast.clip_loss(torch.randn(2, 4), torch.randn(2, 4), 1.0, group=object())
    with pytest.raises(RuntimeError, match="world_size=2 but torch.distributed is not initialised"):
        xfast.ClipLoss(rank=0, world_size=2)(torch.randn(2, 4), torch.randn(2, 4), 1.0)
