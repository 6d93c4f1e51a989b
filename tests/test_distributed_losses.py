"""Distributed clip/simcse/cyclip losses on spawned gloo groups against the single-process
float64 reference on the concatenated batch: the value on every rank, every rank's input
gradients and the logit_scale/temperature gradient, for both gradient reductions."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import xfast
from tests.dist_utils import run_ranks
from xfast import reference

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


@pytest.mark.multiprocess
def test_three_ranks_uneven_batches():
    run_ranks(3, three_ranks, (3, 5, 4))


@pytest.mark.multiprocess
def test_two_ranks_triton_ddp_and_single_rank_groups():
    pytest.importorskip("triton")
    run_ranks(2, two_ranks, (6, 6))
