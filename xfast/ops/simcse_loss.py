"""SimCSE's contrastive objective (unsupervised and supervised) without the N x 2N logits."""
from __future__ import annotations

import torch

from xfast import reference
from xfast._checks import check_embeddings, check_float, check_positive_scalar
from xfast.ops.similarity_lse import accumulation_dtype, check_backend, similarity_lse
from xfast.ops.unit_rows import unit_rows


def simcse_loss(z1: torch.Tensor, z2: torch.Tensor, hard_negatives: torch.Tensor | None = None, *,
                temperature=0.05, hard_negative_weight: float = 0.0, backend: str = "auto", group=None,
                mode: str = "allgather", grad_reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of cos(z1_i, .) / temperature against the columns [z2 | hard_negatives].

    Unsupervised SimCSE: z1, z2 are two dropout views of the same sentences. Supervised: z2
    are entailment positives and hard_negatives the contradictions; hard_negative_weight is
    added (as a log-weight) to the logit of each anchor's own hard negative, as in the
    SimCSE paper's code. temperature may be a tensor that requires grad.
    group, mode, grad_reduction: as in clip_loss; with a group the columns are every rank's
    [z2 | hard_negatives] (see xfast/distributed/__init__.py).
    """
    if group is not None:
        from xfast import distributed
        return distributed.simcse_loss(z1, z2, hard_negatives, temperature=temperature,
                                       hard_negative_weight=hard_negative_weight, backend=backend, group=group,
                                       mode=mode, grad_reduction=grad_reduction)
    check_backend(backend)
    names, tensors = ("z1", "z2"), (z1, z2)
    if hard_negatives is not None:
        names, tensors = names + ("hard_negatives",), tensors + (hard_negatives,)
    check_embeddings(names, tensors)
    temperature = check_positive_scalar("temperature", temperature, z1.device)
    weight = check_float("hard_negative_weight", hard_negative_weight)
    if weight and hard_negatives is None:
        raise ValueError("hard_negative_weight is set but no hard_negatives were given")
    acc = accumulation_dtype(z1)
    tau = temperature.to(acc).reshape(())
    if backend == "reference":
        hn = None if hard_negatives is None else hard_negatives.to(acc)
        return reference.simcse_loss(z1.to(acc), z2.to(acc), hn, temperature=tau, hard_negative_weight=weight)
    a = unit_rows(z1, dtype=acc)
    columns = unit_rows(z2, dtype=acc) if hard_negatives is None else unit_rows(z2, hard_negatives, dtype=acc)
    s = 1 / tau
    # The hard negative of anchor i is column N + i.
    row_lse, _, target = similarity_lse(a, columns, s, diag_bias=weight, diag_offset=z1.shape[0],
                                        with_cols=False, target_offset=0, backend=backend)
    return (row_lse - target).mean()
