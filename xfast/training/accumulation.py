"""Gradient accumulation that keeps the contrastive batch whole (GradCache, Gao et al. 2021).

A contrastive loss couples every sample with every other, so k small independent losses over
micro-batches are a different (weaker) objective than one loss over the whole batch. One
optimizer step here:

1. forward every micro-batch without autograd and keep its features (cheap: no activations);
2. gather the features of all ranks, compute the loss once on the whole batch with the
   features as leaf tensors, and take the gradient of the loss w.r.t. the features;
3. forward each micro-batch again with autograd, replaying the RNG state of pass 1 so dropout
   draws the same masks, and backpropagate the cached feature gradients through it with the
   surrogate sum(features * cached_grad): its parameter gradient is exactly that micro-batch's
   share of the whole-batch gradient.

With DeepSpeed, step 3 is one `engine.backward` per micro-batch with DeepSpeed's
gradient_accumulation_steps equal to the number of micro-batches, so ZeRO 1/2/3 partition,
reduce and clip the accumulated gradient as usual (checked against a plain full-batch torch
computation at stages 0, 2 and 3 in tests/test_train_accumulation.py). The surrogate is passed
with scale_wrt_gas=False because it already carries the exact whole-batch gradient.

Across ranks every rank computes the same whole-batch loss on the all-gathered features and
keeps the rows of its own samples. DeepSpeed averages gradients over ranks, so per-sample
surrogates are multiplied by the world size; tensors shared by all samples (the logit scale)
get the same gradient on every rank and are not.

A single micro-batch needs no cache: it is one ordinary forward/backward, with the other
ranks' features gathered as constants around this rank's rows (whose gradient is scaled by the
world size for the same reason).

The module that the engine wraps must return `(per_sample, shared)` from `forward(batch)`:
two dicts of tensors, per_sample ones [rows, ...] (rows may differ between keys, e.g. captions
and an extra sentence stream), shared ones (e.g. the logit scale) used whole. Shared tensors
must be computed inside forward (not a raw parameter returned as-is, which ZeRO-3 repartitions
on exit).

Every rank computes the whole-batch loss on all gathered features: O(N^2 d) work per rank for a
global batch of N. The fused losses keep memory O(N d); splitting that work over ranks is what
xfast.distributed's losses do, and is not wired in here yet.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.distributed as dist

Features = dict[str, torch.Tensor]
LossFn = Callable[[Features, Features], tuple[torch.Tensor, dict[str, torch.Tensor]]]


class _RngSnapshot:
    """CPU and accelerator RNG state, to replay dropout identically in the second forward."""

    def __init__(self):
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None

    def restore(self):
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)


def _gather_rows(local: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """All-gather [b_r, ...] tensors of possibly different b_r into one [sum b_r, ...]."""
    if len(sizes) == 1:
        return local
    pad = max(sizes) - local.shape[0]
    padded = torch.cat([local, local.new_zeros((pad, *local.shape[1:]))]) if pad else local
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([part[:n] for part, n in zip(parts, sizes)])


def _check_features(per_sample: Features, shared: Features, keys, index: int):
    if not per_sample:
        raise ValueError("the model returned no per-sample features")
    if keys is not None and set(per_sample) != set(keys):
        raise ValueError(f"micro-batch {index} has features {sorted(per_sample)}, micro-batch 0 had {sorted(keys)}")
    for name, value in per_sample.items():
        if not isinstance(value, torch.Tensor) or value.dim() == 0:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"micro-batch {index}: feature {name!r} must be a [rows, ...] tensor, got {shape}")
    for name, value in shared.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"shared output {name!r} must be a tensor, got {type(value).__name__}")


def _rows_per_rank(features: Features, world: int) -> dict[str, list[int]]:
    """{key: [rows on rank 0, rows on rank 1, ...]}."""
    device = next(iter(features.values())).device  # NCCL only moves accelerator tensors
    local_rows = torch.tensor([v.shape[0] for v in features.values()], dtype=torch.long, device=device)
    if world > 1:
        gathered = [torch.zeros_like(local_rows) for _ in range(world)]
        dist.all_gather(gathered, local_rows)
        rows = torch.stack(gathered)  # [world, keys]
    else:
        rows = local_rows[None]
    return {k: [int(n) for n in rows[:, i]] for i, k in enumerate(features)}


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the gradient by `factor` on the way back."""

    @staticmethod
    def forward(ctx, x, factor: float):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


def _single_pass_step(engine, batch: dict, loss_fn: LossFn, world: int, rank: int):
    """One micro-batch: a plain forward/backward (nothing to cache), with the features of the
    other ranks gathered as constants around this rank's own rows."""
    per_sample, shared = engine(batch)
    _check_features(per_sample, shared, None, 0)
    features = per_sample
    if world > 1:
        sizes = _rows_per_rank(per_sample, world)
        features = {}
        for key, value in per_sample.items():
            everyone = _gather_rows(value.detach(), sizes[key])
            start, end = sum(sizes[key][:rank]), sum(sizes[key][:rank + 1])
            # x world: DeepSpeed averages over ranks, and only this rank sees its rows' gradient.
            features[key] = torch.cat([everyone[:start], _ScaleGrad.apply(value, float(world)), everyone[end:]])
    loss, parts = loss_fn(features, shared)
    engine.backward(loss, scale_wrt_gas=False)
    engine.step()
    return loss.detach(), {k: v.detach() for k, v in parts.items()}, {k: v.detach() for k, v in shared.items()}


def whole_batch_step(engine, micro_batches: Sequence[dict], loss_fn: LossFn):
    """Accumulate the gradient of ONE contrastive loss over all micro-batches (all ranks).

    engine: a DeepSpeed engine (or anything with __call__, backward(loss, scale_wrt_gas=False)
    and step()) whose module returns (per_sample, shared) feature dicts. loss_fn maps the
    whole-batch (per_sample, shared) dicts to (loss, parts). Calls engine.step() once per
    micro-batch as DeepSpeed expects; the optimizer steps at the last one. Returns the
    detached (loss, parts, shared) of the whole batch (shared as the loss saw them).
    """
    if not micro_batches:
        raise ValueError("whole_batch_step needs at least one micro-batch")
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    rank = dist.get_rank() if world > 1 else 0
    if len(micro_batches) == 1:
        return _single_pass_step(engine, micro_batches[0], loss_fn, world, rank)

    # Pass 1: features without autograd.
    snapshots, cached, shared0 = [], [], None
    for index, batch in enumerate(micro_batches):
        snapshots.append(_RngSnapshot())
        with torch.no_grad():
            per_sample, shared = engine(batch)
        _check_features(per_sample, shared, cached[0] if cached else None, index)
        cached.append(per_sample)
        if shared0 is None:
            shared0 = shared
    after_pass1 = _RngSnapshot()

    # Whole-batch loss on leaf copies of the features of every rank. Each feature key has its
    # own row count (e.g. captions vs an extra sentence stream); rows are laid out rank-major.
    keys = list(cached[0])
    local = {k: torch.cat([c[k] for c in cached]) for k in keys}
    sizes = _rows_per_rank(local, world)
    leaves = {k: _gather_rows(local[k].detach(), sizes[k]).requires_grad_(True) for k in keys}
    shared_leaves = {k: v.detach().clone().requires_grad_(v.is_floating_point())
                     for k, v in shared0.items()}
    with torch.enable_grad():
        loss, parts = loss_fn(leaves, shared_leaves)
        inputs = list(leaves.values()) + [v for v in shared_leaves.values() if v.requires_grad]
        grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    names = keys + [k for k, v in shared_leaves.items() if v.requires_grad]
    grad_of = {k: g for k, g in zip(names, grads) if g is not None}

    # Pass 2: replay each micro-batch with autograd and push the cached gradients through it.
    offset = {k: sum(sizes[k][:rank]) for k in keys}
    for index, batch in enumerate(micro_batches):
        snapshots[index].restore()
        per_sample, shared = engine(batch)
        terms = []
        for key, value in per_sample.items():
            n = value.shape[0]
            if key in grad_of:
                terms.append((value.float() * grad_of[key][offset[key]:offset[key] + n].float()).sum() * world)
            offset[key] += n
        if index == 0:
            terms += [(value.float() * grad_of[key].float()).sum()
                      for key, value in shared.items() if key in grad_of]
        if not terms:
            raise ValueError("the loss does not depend on any model output")
        engine.backward(torch.stack(terms).sum(), scale_wrt_gas=False)
        engine.step()
    # Leave the RNG where an uninterrupted pass 1 left it, so the stream does not depend on replay.
    after_pass1.restore()
    return loss.detach(), {k: v.detach() for k, v in parts.items()}, {k: v.detach() for k, v in shared0.items()}
