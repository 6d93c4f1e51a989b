"""Backends of the similarity-logsumexp primitive, one module each (named in xfast/backends.py).

Every backend module exposes the same three functions (see xfast/ops/similarity_lse.py):

    unavailable_reason(device) -> None, or why the backend cannot run on that device
    forward(x, y, scale, diag_bias, diag_offset, with_cols) -> (row_lse, col_lse | None)
    backward(x, y, scale, diag_bias, diag_offset, row_lse, col_lse, grad_row, grad_col, *, grad_dtype=None)
        -> (dx, dy, dscale)

and may add (the CPU backend does) a rows-only forward that also returns the gradients for
unit row weights, used by similarity_lse when eager_rows_pays(d, m) (embedding dim, columns):

    forward_rows_with_gradients(x, y, scale, diag_bias, diag_offset) -> (row_lse, dx, dy, dscale)
    eager_rows_pays(d, m) -> bool

x and y may be bfloat16/float16 (the kernels accumulate in float32), float32 or float64.
dx and dy come back in grad_dtype, default the input dtype: callers that add them to other
partial gradients (a ring's blocks, a reduce-scatter over ranks, the positives' term) ask for
the accumulation dtype and round to the input dtype once at the end. dscale is always in the
accumulation dtype.
"""
from __future__ import annotations

import importlib

import torch

from xfast.backends import KERNEL_MODULES, fused_backend, local_backend


def kernel_for(backend: str, device: torch.device):
    """The kernel module for a fused backend; 'auto' is triton on CUDA, cpu otherwise.

    A requested backend that cannot run here raises RuntimeError saying why: there is no
    silent fallback. Modules load on first use (importing triton is slow).
    """
    name = fused_backend(backend, device)
    try:
        module = importlib.import_module(f"{__name__}.{KERNEL_MODULES[name]}")
    except ImportError as err:
        raise RuntimeError(f"backend {name!r} is unavailable: {err}") from err
    reason = module.unavailable_reason(device)
    if reason is not None:
        raise RuntimeError(f"backend {name!r} is unavailable: {reason}")
    return module


def check_available(backend: str, device: torch.device, group, cells: int) -> None:
    """Raise now (inside a loss's input checks) if `backend` cannot run this call of `cells` = N x M
    logits: a fused backend must be available on `device` (kernel_for's error), "dense" runs on CPU
    without a process group only. "auto" needs the fused kernel only where it will run it (a local
    call small enough for dense on CPU does not load or build the C++ extension)."""
    if backend == "auto" and group is None and local_backend(backend, device, cells) == "dense":
        return
    if backend == "dense":
        if torch.device(device).type != "cpu":
            # Its checks read the scale on the host: a device sync on every call.
            raise ValueError(f"backend 'dense' runs on CPU only (its checks read the scale on the host, a device "
                             f"sync per call); on {device} use 'auto' or 'triton'")
        if group is not None:
            raise ValueError("backend 'dense' computes a local batch only; with a process group use 'auto', 'cpu' "
                             "or 'triton'")
    elif backend != "reference":
        kernel_for(backend, device)
