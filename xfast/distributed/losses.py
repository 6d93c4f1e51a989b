"""clip_loss, simcse_loss and cyclip_loss over a process group (reached through group=).

See xfast/distributed/__init__.py for the math and the reduction convention.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from xfast import reference
from xfast._checks import check_embeddings, check_float, check_positive_scalar
from xfast.distributed.checks import Layout, LocalShape, agree
from xfast.distributed.exchange import AllReduceSum, GatherRows, ScaleGrad, SumOverRanks
from xfast.distributed.gathered_lse import MODES, gathered_similarity_lse
from xfast.ops.similarity_lse import BACKENDS, accumulation_dtype, check_backend, kernel_for

GRAD_REDUCTIONS = ("mean", "sum")


def check_mode(mode) -> None:
    if mode not in tuple(MODES):
        raise ValueError(f"mode must be one of {tuple(MODES)}, got {mode!r}")


def check_grad_reduction(grad_reduction) -> None:
    if grad_reduction not in GRAD_REDUCTIONS:
        raise ValueError(f"grad_reduction must be 'mean' (gradients averaged over ranks afterwards, as DDP and "
                         f"DeepSpeed do) or 'sum', got {grad_reduction!r}")


def grad_factor(grad_reduction: str, world: int) -> float:
    """What the local gradients are multiplied by so that the reduction that follows yields
    the gradient of the global loss: the mean over ranks divides by the world size."""
    return float(world) if grad_reduction == "mean" else 1.0


def _code(value, choices) -> float:
    return float(choices.index(value)) if value in choices else -1.0


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


def _shape(rows: int, cols: int, t: torch.Tensor, *grad_inputs) -> LocalShape:
    return LocalShape(rows, cols, t.shape[1], t.dtype, _needs_grad(*grad_inputs))


def _finish_replicated(loss: torch.Tensor, layout: Layout, grad_reduction: str) -> torch.Tensor:
    """For a loss every rank computed whole: backward on W ranks counts it W times."""
    return ScaleGrad.apply(loss, grad_factor(grad_reduction, layout.world) / layout.world)


def clip_loss(x, y, logit_scale, *, label_smoothing=0.0, backend="auto", group, mode="allgather",
              grad_reduction="mean"):
    """xfast.clip_loss over the global batch (the concatenation of every rank's x, y)."""
    def describe():
        check_backend(backend)
        check_mode(mode)
        check_grad_reduction(grad_reduction)
        check_embeddings(("x", "y"), (x, y))
        check_positive_scalar("logit_scale", logit_scale, x.device)
        check_float("label_smoothing", label_smoothing, low=0.0, high=1.0)
        if backend != "reference":
            kernel_for(backend, x.device)
        return _shape(x.shape[0], y.shape[0], x, x, y, logit_scale)

    layout = agree("clip_loss", group, describe,
                   {"mode": _code(mode, tuple(MODES)), "grad_reduction": _code(grad_reduction, GRAD_REDUCTIONS),
                    "backend": _code(backend, BACKENDS), "label_smoothing": label_smoothing})
    logit_scale = check_positive_scalar("logit_scale", logit_scale, x.device)
    eps = float(label_smoothing)
    acc = accumulation_dtype(x)
    xa, ya = x.to(acc), y.to(acc)
    s = logit_scale.to(acc).reshape(())
    if backend == "reference":
        full_x, full_y = (GatherRows.apply(t, layout.rows, group) for t in (xa, ya))
        loss = reference.clip_loss(full_x, full_y, s, label_smoothing=eps)
        return _finish_replicated(loss, layout, grad_reduction).reshape(())
    kernel = kernel_for(backend, x.device)
    row_lse, col_lse = gathered_similarity_lse(xa.contiguous(), ya.contiguous(), s, layout, kernel, mode=mode)
    diag = (xa * ya).sum(-1)
    if eps:
        # Smoothing needs each row's mean logit: s * x_i . mean(Y) over the global batch.
        means = AllReduceSum.apply(torch.stack([xa.sum(0), ya.sum(0)]), group) / layout.total_rows
        target_row = (1 - eps) * diag + eps * (xa @ means[1])
        target_col = (1 - eps) * diag + eps * (ya @ means[0])
    else:
        target_row = target_col = diag
    part = ((row_lse - s * target_row).sum() + (col_lse - s * target_col).sum()) / (2 * layout.total_rows)
    return SumOverRanks.apply(part, group, grad_factor(grad_reduction, layout.world))


def simcse_loss(z1, z2, hard_negatives=None, *, temperature=0.05, hard_negative_weight=0.0, backend="auto", group,
                mode="allgather", grad_reduction="mean"):
    """xfast.simcse_loss with the columns [z2 | hard_negatives] of every rank: anchor i's
    positive and hard negative stay at its own (global) index."""
    names, tensors = ("z1", "z2"), (z1, z2)
    if hard_negatives is not None:
        names, tensors = names + ("hard_negatives",), tensors + (hard_negatives,)

    def describe():
        check_backend(backend)
        check_mode(mode)
        check_grad_reduction(grad_reduction)
        check_embeddings(names, tensors)
        check_positive_scalar("temperature", temperature, z1.device)
        weight = check_float("hard_negative_weight", hard_negative_weight)
        if weight and hard_negatives is None:
            raise ValueError("hard_negative_weight is set but no hard_negatives were given")
        if backend != "reference":
            kernel_for(backend, z1.device)
        return _shape(z1.shape[0], z1.shape[0] * len(tensors[1:]), z1, *tensors, temperature)

    layout = agree("simcse_loss", group, describe,
                   {"mode": _code(mode, tuple(MODES)), "grad_reduction": _code(grad_reduction, GRAD_REDUCTIONS),
                    "backend": _code(backend, BACKENDS), "hard_negatives": float(hard_negatives is not None),
                    "hard_negative_weight": hard_negative_weight})
    temperature = check_positive_scalar("temperature", temperature, z1.device)
    weight = float(hard_negative_weight)
    acc = accumulation_dtype(z1)
    tau = temperature.to(acc).reshape(())
    if backend == "reference":
        full = [GatherRows.apply(t.to(acc), layout.rows, group) for t in tensors]
        loss = reference.simcse_loss(full[0], full[1], full[2] if len(full) == 3 else None, temperature=tau,
                                     hard_negative_weight=weight)
        return _finish_replicated(loss, layout, grad_reduction).reshape(())
    kernel = kernel_for(backend, z1.device)
    a, p = F.normalize(z1.to(acc), dim=-1), F.normalize(z2.to(acc), dim=-1)
    block = p if hard_negatives is None else torch.cat([p, F.normalize(hard_negatives.to(acc), dim=-1)])
    s = 1 / tau
    # In a rank's own block [p_r | h_r], anchor i's hard negative is entry n_r + i.
    row_lse, _ = gathered_similarity_lse(a.contiguous(), block.contiguous(), s, layout, kernel, mode=mode,
                                         diag_bias=weight, diag_offset=z1.shape[0], with_cols=False)
    part = (row_lse - s * (a * p).sum(-1)).sum() / layout.total_rows
    return SumOverRanks.apply(part, group, grad_factor(grad_reduction, layout.world))


def cyclip_loss(x, y, *, backend="auto", group, grad_reduction="mean"):
    """xfast.cyclip_loss over the global batch: the d x d Grams are sums over ranks."""
    def describe():
        if backend not in ("auto", "reference"):
            raise ValueError(f"backend must be one of ('auto', 'reference') for cyclip_loss, got {backend!r}")
        check_grad_reduction(grad_reduction)
        check_embeddings(("x", "y"), (x, y))
        return _shape(x.shape[0], y.shape[0], x, x, y)

    layout = agree("cyclip_loss", group, describe,
                   {"grad_reduction": _code(grad_reduction, GRAD_REDUCTIONS),
                    "backend": _code(backend, ("auto", "reference"))})
    acc = accumulation_dtype(x)
    xa, ya = x.to(acc), y.to(acc)
    if backend == "reference":
        losses = reference.cyclip_loss(*(GatherRows.apply(t, layout.rows, group) for t in (xa, ya)))
    else:
        gx, gy, c = AllReduceSum.apply(torch.stack([xa.T @ xa, ya.T @ ya, xa.T @ ya]), group).unbind(0)
        n = layout.total_rows
        losses = ((gx.square().sum() - 2 * c.square().sum() + gy.square().sum()) / n,
                  2 * ((gx * gy).sum() - (c * c.T).sum()) / n)
    return tuple(_finish_replicated(t, layout, grad_reduction) for t in losses)
