"""Input validation for the metrics: every error is a ValueError naming the argument at fault."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from xfast._checks import check_finite, check_float_matrix


def check_matrix(name: str, x, *, dim: int | None = None, min_rows: int = 1) -> torch.Tensor:
    """A finite floating 2-D tensor [rows, dim] with at least `min_rows` rows."""
    check_float_matrix(name, x, rows="items")
    if x.shape[0] < min_rows or x.shape[1] == 0:
        need = "at least one row" if min_rows == 1 else f"at least {min_rows} rows"
        raise ValueError(f"{name} is empty or too small (shape {tuple(x.shape)}); it needs {need} and a non-zero dim")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{name} has embedding dim {x.shape[1]}, expected {dim}")
    check_finite(name, x)
    return x


def check_same_device(names: Sequence[str], tensors: Sequence[torch.Tensor]) -> None:
    for name, t in zip(names[1:], tensors[1:]):
        if t.device != tensors[0].device:
            raise ValueError(f"{name} is on {t.device} but {names[0]} is on {tensors[0].device}")


def check_index(name: str, idx, *, length: int, upper: int, upper_name: str, device: torch.device) -> torch.Tensor:
    """A 1-D integer tensor (or sequence) of `length` values in [0, upper), as int64 on `device`."""
    if not isinstance(idx, torch.Tensor):
        try:
            idx = torch.as_tensor(idx)
        except (TypeError, ValueError, RuntimeError) as err:
            raise ValueError(f"{name} must be a 1-D sequence of integers: {err}") from None
    if idx.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(idx.shape)}")
    if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
        raise ValueError(f"{name} must hold integers, got {idx.dtype}")
    if idx.shape[0] != length:
        raise ValueError(f"{name} has {idx.shape[0]} entries but there are {length} rows to index")
    if length and (int(idx.min()) < 0 or int(idx.max()) >= upper):
        raise ValueError(f"{name} values must lie in [0, {upper}) ({upper_name}), got range [{int(idx.min())}, {int(idx.max())}]")
    return idx.to(device=device, dtype=torch.int64)


def check_block(block) -> int:
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"block must be a positive integer, got {block!r}")
    return block


def check_ks(ks) -> tuple[int, ...]:
    ks = tuple(ks)
    if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
        raise ValueError(f"ks must be a non-empty sequence of positive integers, got {ks!r}")
    return ks


def unit_rows(name: str, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Rows scaled to unit L2 norm in `dtype`; an all-zero row cannot define a direction."""
    x = x.to(dtype)
    norms = x.norm(dim=1, keepdim=True)
    zero = (norms.squeeze(1) == 0).nonzero().flatten()
    if zero.numel():
        raise ValueError(f"{name} row {int(zero[0])} is all zeros, so it has no direction to normalise")
    return x / norms

