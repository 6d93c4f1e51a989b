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

The module that the engine wraps must return `(per_sample, shared)` from `forward(batch)`:
two dicts of tensors, per_sample ones [b, ...] over the micro-batch, shared ones (e.g. the
logit scale) without a batch dimension. Shared tensors must be computed inside forward (not
a raw parameter returned as-is, which ZeRO-3 repartitions on exit).
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


def _check_features(per_sample: Features, shared: Features, batch: int, index: int):
    if not per_sample:
        raise ValueError("the model returned no per-sample features")
    for name, value in per_sample.items():
        if not isinstance(value, torch.Tensor) or value.dim() == 0 or value.shape[0] != batch:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"micro-batch {index}: feature {name!r} must be [{batch}, ...], got {shape}")
    for name, value in shared.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"shared output {name!r} must be a tensor, got {type(value).__name__}")


def batch_size_of(batch: dict) -> int:
    """Number of samples in a batch dict (length of its first tensor or list)."""
    for value in batch.values():
        if isinstance(value, (torch.Tensor, list)):
            return len(value)
    raise ValueError(f"cannot tell the batch size of a batch with keys {sorted(batch)}")


def whole_batch_step(engine, micro_batches: Sequence[dict], loss_fn: LossFn):
    """Accumulate the gradient of ONE contrastive loss over all micro-batches (all ranks).

    engine: a DeepSpeed engine (or anything with __call__, backward(loss, scale_wrt_gas=False)
    and step()) whose module returns (per_sample, shared) feature dicts. loss_fn maps the
    whole-batch (per_sample, shared) dicts to (loss, parts). Calls engine.step() once per
    micro-batch as DeepSpeed expects; the optimizer steps at the last one. Returns the
    detached (loss, parts) of the whole batch.
    """
    if not micro_batches:
        raise ValueError("whole_batch_step needs at least one micro-batch")
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    rank = dist.get_rank() if world > 1 else 0

    # Pass 1: features without autograd.
    snapshots, cached, shared0 = [], [], None
    for index, batch in enumerate(micro_batches):
        snapshots.append(_RngSnapshot())
        with torch.no_grad():
            per_sample, shared = engine(batch)
        _check_features(per_sample, shared, batch_size_of(batch), index)
        cached.append(per_sample)
        if shared0 is None:
            shared0 = shared
    after_pass1 = _RngSnapshot()

    # Whole-batch loss on leaf copies of the features of every rank.
    local = {k: torch.cat([c[k] for c in cached]) for k in cached[0]}
    local_n = next(iter(local.values())).shape[0]
    sizes = [local_n] * world
    if world > 1:
        counts = torch.tensor([local_n], dtype=torch.long)
        gathered = [torch.zeros_like(counts) for _ in range(world)]
        dist.all_gather(gathered, counts)
        sizes = [int(c) for c in gathered]
    leaves = {k: _gather_rows(v.detach(), sizes).requires_grad_(True) for k, v in local.items()}
    shared_leaves = {k: v.detach().clone().requires_grad_(v.is_floating_point())
                     for k, v in shared0.items()}
    with torch.enable_grad():
        loss, parts = loss_fn(leaves, shared_leaves)
        inputs = list(leaves.values()) + [v for v in shared_leaves.values() if v.requires_grad]
        grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    names = list(leaves) + [k for k, v in shared_leaves.items() if v.requires_grad]
    grad_of = {k: g for k, g in zip(names, grads) if g is not None}

    # Pass 2: replay each micro-batch with autograd and push the cached gradients through it.
    offset = sum(sizes[:rank])
    for index, batch in enumerate(micro_batches):
        snapshots[index].restore()
        per_sample, shared = engine(batch)
        n = batch_size_of(batch)
        terms = [(value.float() * grad_of[key][offset:offset + n].float()).sum() * world
                 for key, value in per_sample.items() if key in grad_of]
        if index == 0:
            terms += [(value.float() * grad_of[key].float()).sum()
                      for key, value in shared.items() if key in grad_of]
        if not terms:
            raise ValueError("the loss does not depend on any model output")
        surrogate = torch.stack(terms).sum()
        offset += n
        engine.backward(surrogate, scale_wrt_gas=False)
        engine.step()
    # Leave the RNG where an uninterrupted pass 1 left it, so the stream does not depend on replay.
    after_pass1.restore()
    return loss.detach(), {k: v.detach() for k, v in parts.items()}
