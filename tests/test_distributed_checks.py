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


class CountAllGathers:
    """Counts torch.distributed.all_gather calls (the agreement records; the losses' own
    exchange uses all_gather_single) while installed."""

    def __init__(self):
        self.calls, self._real = 0, dist.all_gather

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self._real(*args, **kwargs)


def repeated_steps(rank, world):
    group = dist.group.WORLD
    s = torch.tensor([10.0], dtype=torch.float64, requires_grad=True)
    x, y = inputs(rank)
    full = [torch.cat([inputs(r)[i].detach() for r in range(world)]) for i in (0, 1)]

    def step_losses(x, y, scale, smoothing=0.0):
        return (xfast.clip_loss(x, y, scale, group=group, label_smoothing=smoothing)
                + xfast.simcse_loss(x, y, group=group, temperature=0.05))

    expected = reference.clip_loss(*full, s.detach()[0]) + reference.simcse_loss(*full, temperature=0.05)
    checked = step_losses(x, y, s)
    grads = torch.autograd.grad(checked, (x, y, s))
    torch.testing.assert_close(checked, expected)

    repeats = checks.RepeatedSteps()
    counter = CountAllGathers()
    dist.all_gather = counter
    try:
        per_step = []
        for step in range(3):
            before, stored = counter.calls, dict(checks._arrivals.calls)
            with repeats.step("pairs"):
                loss = step_losses(x, y, s)
                torch.testing.assert_close(loss, checked, rtol=0, atol=0)
                for got, want in zip(torch.autograd.grad(loss, (x, y, s)), grads):
                    torch.testing.assert_close(got, want, rtol=0, atol=0)
            per_step.append(counter.calls - before)
            assert (checks._arrivals.calls != stored) == (step == 0)  # the store is written on step 1 only
        # Two loss calls: two agreement all-gathers on the first step, none on the repeats.
        assert per_step == [2, 0, 0]

        # A rank-local change raises on that rank, before any collective: the other rank makes
        # no call (it would wait in the loss's exchange), and a fallback to an agreement
        # all-gather would show in the count or hang instead of raising.
        if rank == 1:
            before = counter.calls
            with pytest.raises(ValueError, match=r"clip_loss: in a repeated step of kind 'pairs', call 1: this "
                                                 r"rank's local shape changed from LocalShape\(rows=4.* to "
                                                 r"LocalShape\(rows=3.*data.drop_last"):
                with repeats.step("pairs"):
                    step_losses(x[:3], y[:3], s)
            assert counter.calls == before
        dist.barrier()
        # The same on both ranks (no hang either way): a changed setting, an extra call, a missing call.
        with pytest.raises(ValueError, match=r"call 1: this rank's settings changed from .*'label_smoothing', "
                                             r"0.0.* to .*'label_smoothing', 0.1"):
            with repeats.step("pairs"):
                step_losses(x, y, s, smoothing=0.1)
        with pytest.raises(ValueError, match=r"cyclip_loss: in a repeated step of kind 'pairs', call 3 was not "
                                             r"made by the first step of that kind \(2 calls\)"):
            with repeats.step("pairs"):
                step_losses(x, y, s)
                xfast.cyclip_loss(x, y, group=group)
        with pytest.raises(ValueError, match="a repeated step of kind 'pairs' made 1 agreement calls, the first "
                                             "step of that kind 2"):
            with repeats.step("pairs"):
                xfast.clip_loss(x, y, s, group=group)
        # Repeats skip the value checks: NaN embeddings and a negative scale pass (the losses are
        # NaN); the first step of a new kind still checks them, alike on every rank.
        broken = torch.full_like(x, float("nan")) if rank == 1 else x
        with repeats.step("pairs"):
            assert torch.isnan(xfast.clip_loss(broken, y, s, group=group)).item()
            assert torch.isfinite(xfast.simcse_loss(x, y, group=group, temperature=0.05))
        before = counter.calls
        with pytest.raises(ValueError, match=r"invalid input on (rank 1|this rank) \(of 2\): x contains NaN"):
            with repeats.step("other"):
                xfast.clip_loss(broken, y, s, group=group)
        # A first step that failed is not recorded: the next step of that kind agrees again.
        with repeats.step("other"):
            torch.testing.assert_close(xfast.clip_loss(x, y, s, group=group), reference.clip_loss(*full, s.detach()[0]))
        assert counter.calls - before == 2
    finally:
        dist.all_gather = counter._real


@pytest.mark.multiprocess
def test_repeated_steps_agree_on_the_first_step_only_and_a_changed_rank_raises_alone():
    run_ranks(2, repeated_steps)


def test_repeated_steps_skip_the_value_checks_in_one_process():
    x, y = torch.randn(4, 8, dtype=torch.float64), torch.randn(4, 8, dtype=torch.float64)
    nan = torch.full_like(x, float("nan"))
    repeats = checks.RepeatedSteps()
    with repeats.step("pairs"):
        xfast.clip_loss(x, y, torch.tensor(2.0))
        with pytest.raises(ValueError, match="x contains NaN"):
            xfast.clip_loss(nan, y, torch.tensor(2.0))
        with pytest.raises(ValueError, match="logit_scale must be positive and finite, got -2.0"):
            xfast.clip_loss(x, y, torch.tensor(-2.0))
    with repeats.step("pairs"):
        assert torch.isnan(xfast.clip_loss(nan, y, torch.tensor(2.0)))
        # Not read by the public checks (no device wait); the CPU kernel, which takes the scale
        # as a number anyway, still refuses it.
        with pytest.raises(RuntimeError, match="scale must be positive and finite in float64, got -2"):
            xfast.clip_loss(x, y, torch.tensor(-2.0))
        # Structure is still checked, and a python scale costs no wait: still checked.
        with pytest.raises(ValueError, match="y has embedding dim 6 but x has 8"):
            xfast.clip_loss(x, y[:, :6], torch.tensor(2.0))
        with pytest.raises(ValueError, match="logit_scale must be positive and finite, got -2.0"):
            xfast.clip_loss(x, y, -2.0)
    with pytest.raises(ValueError, match="x contains NaN"):
        xfast.clip_loss(nan, y, torch.tensor(2.0))


def test_group_needs_an_initialised_process_group():
    if dist.is_initialized():
        pytest.skip("this process already has a default process group")
    with pytest.raises(RuntimeError, match="torch.distributed is not initialised"):
        xfast.clip_loss(torch.randn(2, 4), torch.randn(2, 4), 1.0, group=object())
    with pytest.raises(RuntimeError, match="world_size=2 but torch.distributed is not initialised"):
        xfast.ClipLoss(rank=0, world_size=2)(torch.randn(2, 4), torch.randn(2, 4), 1.0)
