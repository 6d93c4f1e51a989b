"""SimCSE's contrastive objective (unsupervised and supervised) without the N x 2N logits."""
from __future__ import annotations

import torch

from xfast import reference
from xfast._checks import check_embeddings, check_float, check_positive_scalar
from xfast.backends import accumulation_dtype, check_backend
from xfast.distributed.batch import local_shape, open_batch
from xfast.kernels import check_available
from xfast.ops.similarity_lse import similarity_lse
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
    On CPU at d >= 256 (one process), a call with grad enabled and inputs that require grad
    computes the gradients in its forward (3 GEMM-equivalents for loss and gradients, not 4):
    compute a loss you will not backpropagate under torch.no_grad().
    """
    columns = (z2,) if hard_negatives is None else (z2, hard_negatives)

    def validate():
        check_backend(backend)
        check_embeddings(("z1", "z2", "hard_negatives")[:1 + len(columns)], (z1, *columns))
        tau = check_positive_scalar("temperature", temperature, z1.device)
        weight = check_float("hard_negative_weight", hard_negative_weight)
        if weight and hard_negatives is None:
            raise ValueError("hard_negative_weight is set but no hard_negatives were given")
        check_available(backend, z1.device, group, z1.shape[0] * z1.shape[0] * len(columns))
        return (tau, weight), local_shape(z1.shape[0], z1.shape[0] * len(columns), z1, z1, *columns, temperature)

    batch, (temperature, weight) = open_batch(
        "simcse_loss", validate, group=group, mode=mode, grad_reduction=grad_reduction,
        shared={"backend": backend, "temperature": temperature, "hard_negatives": hard_negatives is not None,
                "hard_negative_weight": hard_negative_weight})
    acc = accumulation_dtype(z1)
    tau = temperature.to(acc).reshape(())
    if backend == "reference":
        z1, *columns = batch.gather(*(t.to(acc) for t in (z1, *columns)))
        hn = columns[1] if len(columns) == 2 else None
        loss = reference.simcse_loss(z1, columns[0], hn, temperature=tau, hard_negative_weight=weight)
        return batch.replicated(loss).reshape(())
    # Cosine similarity: rows normalised into one buffer each (no per-input copies), in the
    # accumulation dtype. 16-bit embeddings reach the kernels (and the wire) as their unit rows
    # rounded once to 16 bits; the gradients stay float32 until unit_rows' backward rounds them.
    anchors, block = unit_rows(z1, dtype=acc), unit_rows(*columns, dtype=acc)
    # In a rank's own block [positives | hard negatives], anchor i's hard negative is entry n + i.
    # Rows only: on one process the CPU kernel computes the gradients with the logsumexps (3
    # GEMM-equivalents instead of 4, d >= 256); a process group keeps the 4-GEMM exchange.
    row_lse, _, target = similarity_lse(anchors, block, 1 / tau, diag_bias=weight, diag_offset=z1.shape[0],
                                        with_cols=False, target_offset=0, backend=backend, exchange=batch.exchange,
                                        operand_dtype=z1.dtype)
    return batch.reduce((row_lse - target).sum() / batch.total_rows)
