"""Gradient accumulation that keeps the contrastive batch whole (GradCache, Gao et al. 2021).

A contrastive loss couples every sample with every other, so k small independent losses over
micro-batches are a different (weaker) objective than one loss over the whole batch. One
optimizer step here:

1. forward every micro-batch without autograd and keep its features (cheap: no activations);
2. compute the loss once on the whole batch with the features as leaf tensors, and take the
   gradient of the loss w.r.t. the features;
3. forward each micro-batch again with autograd, replaying the RNG state of pass 1 so dropout
   draws the same masks, and backpropagate the cached feature gradients through it with the
   surrogate sum(features * cached_grad): its parameter gradient is exactly that micro-batch's
   share of the whole-batch gradient.

With DeepSpeed, step 3 is one `engine.backward` per micro-batch with DeepSpeed's
gradient_accumulation_steps equal to the number of micro-batches, so ZeRO 1/2/3 partition,
reduce and clip the accumulated gradient as usual (checked against a plain full-batch torch
computation at stages 0, 2 and 3 in tests/test_train_accumulation.py). The surrogate is passed
with scale_wrt_gas=False because it already carries the exact whole-batch gradient.

Across ranks the loss function is called with group=<the default process group> on this rank's
features only, and must pass it to xfast's losses: each rank scores just its own rows (O(N n_r d)
work instead of O(N^2 d)), every rank gets the global loss value, and with grad_reduction="mean"
this rank's features get W times their gradient and shared tensors (the logit scale) W times
this rank's share, so DeepSpeed's averaging over ranks yields the single-process gradient.
A single micro-batch needs no cache: it is one ordinary forward/backward of that loss.

The module that the engine wraps must return `(per_sample, shared)` from `forward(batch)`:
two dicts of tensors, per_sample ones [rows, ...] (rows may differ between keys, e.g. captions
and an extra sentence stream, and between ranks), shared ones (e.g. the logit scale) used whole.
Shared tensors must be computed inside forward (not a raw parameter returned as-is, which ZeRO-3
repartitions on exit).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.distributed as dist

Features = dict[str, torch.Tensor]
# loss_fn(per_sample, shared, group=...) -> (loss, parts); group is None in a single process.
LossFn = Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]


class _RngSnapshot:
    """CPU and accelerator RNG state, to replay dropout identically in the second forward."""

    def __init__(self):
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None

    def restore(self):
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)


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


def _single_pass_step(engine, batch: dict, loss_fn: LossFn, group):
    """One micro-batch: a plain forward/backward (nothing to cache)."""
    per_sample, shared = engine(batch)
    _check_features(per_sample, shared, None, 0)
    loss, parts = loss_fn(per_sample, shared, group=group)
    engine.backward(loss, scale_wrt_gas=False)
    engine.step()
    return loss.detach(), {k: v.detach() for k, v in parts.items()}, {k: v.detach() for k, v in shared.items()}


def whole_batch_step(engine, micro_batches: Sequence[dict], loss_fn: LossFn):
    """Accumulate the gradient of ONE contrastive loss over all micro-batches (all ranks).

    engine: a DeepSpeed engine (or anything with __call__, backward(loss, scale_wrt_gas=False)
    and step()) whose module returns (per_sample, shared) feature dicts. loss_fn maps this
    rank's (per_sample, shared) dicts and group= (the default process group across ranks, None
    in one process; pass it to xfast's losses) to (loss, parts) of the whole global batch.
    Calls engine.step() once per micro-batch as DeepSpeed expects; the optimizer steps at the
    last one. Returns the detached (loss, parts, shared) of the whole batch (shared as the loss
    saw them); every rank returns the same global loss.
    """
    if not micro_batches:
        raise ValueError("whole_batch_step needs at least one micro-batch")
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    group = dist.group.WORLD if world > 1 else None
    if len(micro_batches) == 1:
        return _single_pass_step(engine, micro_batches[0], loss_fn, group)

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

    # Whole-batch loss on leaf copies of this rank's features (the group brings in the other
    # ranks'). Each feature key has its own row count (e.g. captions vs an extra sentence stream).
    keys = list(cached[0])
    leaves = {k: torch.cat([c[k] for c in cached]).detach().requires_grad_(True) for k in keys}
    shared_leaves = {k: v.detach().clone().requires_grad_(v.is_floating_point())
                     for k, v in shared0.items()}
    with torch.enable_grad():
        loss, parts = loss_fn(leaves, shared_leaves, group=group)
        inputs = list(leaves.values()) + [v for v in shared_leaves.values() if v.requires_grad]
        grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    names = keys + [k for k, v in shared_leaves.items() if v.requires_grad]
    grad_of = {k: g for k, g in zip(names, grads) if g is not None}

    # Pass 2: replay each micro-batch with autograd and push the cached gradients through it.
    offset = dict.fromkeys(keys, 0)
    for index, batch in enumerate(micro_batches):
        snapshots[index].restore()
        per_sample, shared = engine(batch)
        terms = []
        for key, value in per_sample.items():
            n = value.shape[0]
            if key in grad_of:
                terms.append((value.float() * grad_of[key][offset[key]:offset[key] + n].float()).sum())
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
