"""Distributed clip/simcse/cyclip losses on spawned gloo groups against the single-process
float64 reference on the concatenated batch: the value on every rank, every rank's input
gradients and the logit_scale/temperature gradient, for both gradient reductions; 16-bit
inputs against float64 by flash-attention's rule, and what travels between the ranks."""
from __future__ import annotations

import contextlib
import importlib.util
import itertools
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import xfast
from tests.dist_utils import run_ranks
from tests.loss_cases import assert_within_torch_error
from xfast import reference
from xfast.distributed.exchange import Ring

D = 8


def global_batch(sizes, seed, count=3, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [F.normalize(torch.randn(sum(sizes), D, generator=g, dtype=torch.float64), dim=-1).to(dtype)
            for _ in range(count)]


def local_slice(t, sizes, rank):
    start = sum(sizes[:rank])
    return t[start:start + sizes[rank]]


def grads_of(fn, tensors, scalar):
    """(loss or losses, grads of tensors, grad of scalar) of fn(*tensors, scalar)."""
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    s = scalar.detach().clone().requires_grad_(True) if scalar is not None else None
    out = fn(*leaves, s) if s is not None else fn(*leaves)
    total = sum(out) if isinstance(out, tuple) else out
    total.backward()
    values = tuple(o.detach() for o in out) if isinstance(out, tuple) else out.detach()
    return values, [t.grad for t in leaves], (s.grad if s is not None else None)


def check_case(what, rank, world, sizes, group, fused, single, tensors, scalar, grad_reduction, tol):
    """fused runs on rank-local slices under `group`; single on the whole batch in float64."""
    rtol, atol = tol
    value, grads, scalar_grad = grads_of(fused, [local_slice(t, sizes, rank) for t in tensors], scalar)
    ref_value, ref_grads, ref_scalar_grad = grads_of(
        single, [t.double() for t in tensors], None if scalar is None else scalar.double())
    factor = world if grad_reduction == "mean" else 1
    msg = lambda part: (lambda m: f"{what} ({grad_reduction}) rank {rank}/{world}, {part}: {m}")
    for v, rv in zip(value if isinstance(value, tuple) else (value,),
                     ref_value if isinstance(ref_value, tuple) else (ref_value,)):
        torch.testing.assert_close(v.double(), rv, rtol=rtol, atol=atol, msg=msg("loss value"))
    for i, (g, rg) in enumerate(zip(grads, ref_grads)):
        torch.testing.assert_close(g.double(), factor * local_slice(rg, sizes, rank), rtol=rtol, atol=atol,
                                   msg=msg(f"grad of input {i}"))
    if scalar is not None:
        # A replicated parameter: its gradients, reduced over ranks as `grad_reduction` says,
        # must give the single-process one.
        total = scalar_grad.double().clone()
        dist.all_reduce(total, group=group)
        if grad_reduction == "mean":
            total /= world
        torch.testing.assert_close(total, ref_scalar_grad, rtol=rtol, atol=atol, msg=msg("scale grad"))


def check_all_losses(rank, world, sizes, group, backends, modes, seed):
    x, y, h = global_batch(sizes, seed)
    logit_scale = torch.tensor([14.3], dtype=torch.float64)
    temperature = torch.tensor(0.07, dtype=torch.float64)
    tol = (1e-9, 1e-11)
    for backend, mode, reduction in itertools.product(backends, modes, ("mean", "sum")):
        kw = dict(group=group, backend=backend, grad_reduction=reduction, mode=mode)
        for eps in (0.0, 0.1):
            check_case(f"clip {backend} {mode} eps={eps}", rank, world, sizes, group,
                       lambda a, b, s, eps=eps, kw=kw: xfast.clip_loss(a, b, s, label_smoothing=eps, **kw),
                       lambda a, b, s, eps=eps: reference.clip_loss(a, b, s, label_smoothing=eps),
                       [x, y], logit_scale, reduction, tol)
        check_case(f"simcse {backend} {mode}", rank, world, sizes, group,
                   lambda a, b, t, kw=kw: xfast.simcse_loss(a, b, temperature=t, **kw),
                   lambda a, b, t: reference.simcse_loss(a, b, temperature=t),
                   [x, y], temperature, reduction, tol)
        check_case(f"simcse+hard negatives {backend} {mode}", rank, world, sizes, group,
                   lambda a, b, c, t, kw=kw: xfast.simcse_loss(a, b, c, temperature=t, hard_negative_weight=0.7, **kw),
                   lambda a, b, c, t: reference.simcse_loss(a, b, c, temperature=t, hard_negative_weight=0.7),
                   [x, y, h], temperature, reduction, tol)
    for backend, reduction in itertools.product(("auto", "reference"), ("mean", "sum")):
        check_case(f"cyclip {backend}", rank, world, sizes, group,
                   lambda a, b, backend=backend, reduction=reduction: xfast.cyclip_loss(
                       a, b, group=group, backend=backend, grad_reduction=reduction),
                   reference.cyclip_loss, [x, y], None, reduction, tol)


def check_float32(rank, world, sizes, group):
    x, y = global_batch(sizes, 5, count=2, dtype=torch.float32)
    for mode in ("allgather", "ring"):
        check_case(f"clip float32 {mode}", rank, world, sizes, group,
                   lambda a, b, s, mode=mode: xfast.clip_loss(a, b, s, group=group, mode=mode),
                   reference.clip_loss, [x, y], torch.tensor(20.0), "mean", (2e-5, 2e-6))


def check_clip_module(rank, world, sizes):
    """open_clip's constructor arguments on the default group: all four settings are exact."""
    x, y = global_batch(sizes, 9, count=2)
    s = torch.tensor([30.0], dtype=torch.float64)
    for local_loss, gather_with_grad in itertools.product((False, True), repeat=2):
        loss_fn = xfast.ClipLoss(local_loss=local_loss, gather_with_grad=gather_with_grad, rank=rank,
                                 world_size=world, mode="ring" if local_loss else "allgather")
        check_case(f"ClipLoss(local_loss={local_loss}, gather_with_grad={gather_with_grad})", rank, world, sizes,
                   dist.group.WORLD, loss_fn, reference.clip_loss, [x, y], s, "mean", (1e-9, 1e-11))
    with pytest.raises(ValueError, match="do not match the process group"):
        xfast.ClipLoss(rank=rank, world_size=world + 1)(x[:2], y[:2], s)


def three_ranks(rank, world, sizes):
    check_all_losses(rank, world, sizes, dist.group.WORLD, ("cpu", "reference"), ("allgather", "ring"), seed=1)
    check_float32(rank, world, sizes, dist.group.WORLD)
    check_clip_module(rank, world, sizes)
    # A subgroup whose ranks are not the global ones (global 1, 2 are group ranks 0, 1).
    sub = dist.new_group([1, 2])
    if rank > 0:
        check_all_losses(rank - 1, 2, sizes[1:], sub, ("cpu",), ("allgather", "ring"), seed=2)
    dist.barrier()


def two_ranks(rank, world, sizes):
    check_all_losses(rank, world, sizes, dist.group.WORLD, ("triton",), ("allgather", "ring"), seed=3)
    check_ddp(rank, world, sizes)
    # World size 1: a group of one rank per process.
    singles = [dist.new_group([r]) for r in range(world)]
    check_all_losses(0, 1, sizes[rank:rank + 1], singles[rank], ("cpu",), ("allgather", "ring"), seed=4 + rank)


class Towers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.image, self.text = torch.nn.Linear(5, D).double(), torch.nn.Linear(6, D).double()
        self.logit_scale = torch.nn.Parameter(torch.tensor([2.5], dtype=torch.float64))

    def forward(self, images, texts, **kw):
        x, y = F.normalize(self.image(images), dim=-1), F.normalize(self.text(texts), dim=-1)
        return xfast.clip_loss(x, y, self.logit_scale.exp(), label_smoothing=0.1, **kw)


def check_ddp(rank, world, sizes):
    """The default reduction under DistributedDataParallel gives the single-process parameter
    gradients of the global batch, towers and temperature alike."""
    g = torch.Generator().manual_seed(7)
    images, texts = torch.randn(sum(sizes), 5, generator=g, dtype=torch.float64), torch.randn(
        sum(sizes), 6, generator=g, dtype=torch.float64)
    single = Towers()
    single(images, texts, backend="reference").backward()
    ddp = torch.nn.parallel.DistributedDataParallel(Towers())
    for mode in ("allgather", "ring"):
        ddp.zero_grad()
        loss = ddp(local_slice(images, sizes, rank), local_slice(texts, sizes, rank), group=dist.group.WORLD,
                   mode=mode)
        loss.backward()
        for (name, p), q in zip(ddp.module.named_parameters(), single.parameters()):
            what = f"DDP {mode} rank {rank}: grad of {name}"
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-12, msg=lambda m, what=what: f"{what}: {m}")


LOW_PRECISION = (torch.bfloat16, torch.float16)
# Unit roundoff of one rounding to nearest: 8 and 11 significant bits.
UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


@contextlib.contextmanager
def recorded_messages():
    """Records (kind, dtype, shape) of every tensor this rank hands to the exchanges'
    collectives: 'gather' (all-gather), 'scatter' (reduce-scatter), 'block' (a ring block sent
    on), 'accumulator' (a ring accumulator sent on)."""
    log = []
    gather, scatter, p2p = dist.all_gather_single, dist.reduce_scatter_single, dist.batch_isend_irecv

    def all_gather_single(out, t, **kw):
        log.append(("gather", t.dtype, tuple(t.shape)))
        return gather(out, t, **kw)

    def reduce_scatter_single(out, t, **kw):
        log.append(("scatter", t.dtype, tuple(t.shape)))
        return scatter(out, t, **kw)

    def batch_isend_irecv(ops):
        for op in ops:
            if op.op is dist.isend:
                log.append(("block" if op.tag == Ring.TAG_BLOCK else "accumulator", op.tensor.dtype,
                            tuple(op.tensor.shape)))
        return p2p(ops)

    with mock.patch.multiple(dist, all_gather_single=all_gather_single, reduce_scatter_single=reduce_scatter_single,
                             batch_isend_irecv=batch_isend_irecv):
        yield log


def whole_batch_grads(grads, sizes, group):
    """Every rank's gradient slices (grad_reduction='sum') concatenated in rank order."""
    slices = [None] * len(sizes)
    dist.all_gather_object(slices, [g.double() for g in grads], group=group)
    return [torch.cat(parts) for parts in zip(*slices)]


def check_16bit_case(what, rank, sizes, group, dtype, fused, single, tensors, scalar, one_rounding):
    """fused on 16-bit rank slices (grad_reduction='sum') against float64 on the whole batch
    of the same 16-bit values, by flash-attention's rule: the error is at most twice that of
    plain torch computing the whole batch in that dtype (plus a floor at float32 rounding).

    one_rounding: the backend computes in float32 and rounds the gradients to 16 bits once
    (the CPU kernel), so each entry lies within one rounding of the exact value plus float32
    error. Partial gradients summed in 16 bits (over blocks or ranks) break this."""
    low = [t.to(dtype) for t in tensors]
    value, grads, scalar_grad = grads_of(fused, [local_slice(t, sizes, rank) for t in low], scalar.float())
    assert all(g.dtype == dtype for g in grads), f"{what}: gradients {[g.dtype for g in grads]}, inputs {dtype}"
    grads = whole_batch_grads(grads, sizes, group)
    scalar_grad = scalar_grad.double()
    dist.all_reduce(scalar_grad, group=group)  # the shares sum to dL/ds
    exact = grads_of(single, [t.double() for t in low], scalar.double())
    plain = grads_of(single, low, scalar.to(dtype))
    named = lambda out: [("loss", out[0])] + [(f"grad of input {i}", g) for i, g in enumerate(out[1])] + [
        ("scale grad", out[2])]
    for (part, a), (_, p), (_, e) in zip(named((value, grads, scalar_grad)), named(plain), named(exact)):
        assert_within_torch_error(a, p, e.reshape(a.shape), f"{what} rank {rank}: {part}",
                                  floor=1e-5 * (1 + e.abs().max().item()))
    if one_rounding:
        for i, (g, e) in enumerate(zip(grads, exact[1])):
            bound = UNIT_ROUNDOFF[dtype] * e.abs() + 1e-4 * e.abs().max()
            excess = ((g - e).abs() - bound).max().item()
            assert excess <= 0, f"{what} rank {rank}: grad of input {i} is more than one rounding off ({excess:.3g})"


def sixteen_bit(rank, world, sizes, backends):
    group = dist.group.WORLD
    x, y, h = global_batch(sizes, 21)
    logit_scale, temperature = torch.tensor([14.3]), torch.tensor(0.07)
    for backend, dtype, mode in itertools.product(backends, LOW_PRECISION, ("allgather", "ring")):
        kw = dict(group=group, backend=backend, mode=mode, grad_reduction="sum")
        where = f"{backend} {dtype} {mode}"
        with recorded_messages() as log:
            check_16bit_case(f"clip {where}", rank, sizes, group, dtype,
                             lambda a, b, s, kw=kw: xfast.clip_loss(a, b, s, label_smoothing=0.1, **kw),
                             lambda a, b, s: reference.clip_loss(a, b, s, label_smoothing=0.1),
                             [x, y], logit_scale, one_rounding=backend == "cpu")
        check_16bit_case(f"simcse+hard negatives {where}", rank, sizes, group, dtype,
                         lambda a, b, c, t, kw=kw: xfast.simcse_loss(a, b, c, temperature=t, hard_negative_weight=0.7,
                                                                     **kw),
                         lambda a, b, c, t: reference.simcse_loss(a, b, c, temperature=t, hard_negative_weight=0.7),
                         [x, y, h], temperature, one_rounding=False)
        # One clip forward + backward on 2 ranks: the tower rows cross the wire once per pass
        # in 16 bits (2 bytes per entry; the ring's backward block carries its column
        # logsumexps and gradients as 8 raw bytes per row), half what float32 sends.
        towers = sorted(t[2][0] * t[2][1] * torch.finfo(t[1]).bits // 8 for t in log
                        if t[0] == "block" or (t[0] == "gather" and len(t[2]) == 2))
        if mode == "allgather":
            expected = [max(sizes) * D * 2]
        else:
            expected = sorted([sizes[rank] * D * 2, sizes[rank] * (D * 2 + 8)])
        assert towers == expected, f"{where}: tower bytes sent {towers}, expected {expected}; log {log}"
        # Partial sums (column logsumexps, the dY of every rank's rows) travel in float32.
        partials = [t for t in log if t[0] in ("scatter", "accumulator")]
        assert any(len(t[2]) == 2 for t in partials), f"{where}: no dY partial sent; log {log}"
        assert all(t[1] == torch.float32 for t in partials), f"{where}: partials sent as {partials}"


@pytest.mark.multiprocess
def test_two_ranks_16bit_inputs_stay_16bit():
    backends = ("cpu",) + (("triton",) if importlib.util.find_spec("triton") else ())
    run_ranks(2, sixteen_bit, (5, 7), backends)


@pytest.mark.multiprocess
def test_three_ranks_uneven_batches():
    run_ranks(3, three_ranks, (3, 5, 4))


@pytest.mark.multiprocess
def test_two_ranks_triton_ddp_and_single_rank_groups():
    pytest.importorskip("triton")
    run_ranks(2, two_ranks, (6, 6))
