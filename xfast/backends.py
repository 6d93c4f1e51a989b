"""The backend registry: names of the similarity-logsumexp backends, the kernel module behind
each fused one, and the accumulation dtype every backend shares.

A leaf module (it imports torch only): kernels, ops, distributed and eval import it and it
imports none of them, so no import cycle can run through it. A new fused backend is a module
in xfast/kernels/ exposing forward, backward and unavailable_reason (see xfast/kernels/__init__.py)
plus one entry in KERNEL_MODULES.
"""
from __future__ import annotations

import torch

# Fused backends: name -> module under xfast.kernels.
KERNEL_MODULES = {"cpu": "cpu_similarity_lse", "triton": "triton_similarity_lse"}
# "auto" picks a backend by device and size; "dense" materialises the logits of a local batch in
# plain autograd ops (xfast/ops/dense_lse.py); "reference" is the plain-PyTorch loss (the oracle).
BACKENDS = ("auto", *KERNEL_MODULES, "dense", "reference")
# Below this many logits (N x M, one local batch) "auto" on CPU takes "dense": there the fused
# kernel's fixed cost per call outweighs its work. Measured (benchmarks/bench_dense_crossover.py,
# results/dense_crossover.md; forward + backward, paired, AMD EPYC 2 cores, 1 and 2 threads): dense
# takes 0.72-0.96x the fused time up to 96 x 96 logits in every measured row (clip, and simcse
# with hard negatives; float32 and float64, d 32-512); the narrowest margins are at d = 32, float32: clip 0.96x at N = 128, simcse
# with hard negatives (N x 2N) 0.96x at N = 96 and 1.00x at N = 128. At
# d = 512 dense stays ahead to N = 256: the bound is set by the small d. On CUDA "auto" keeps
# Triton at every size: no GPU crossover was measured (no GPU was lent).
DENSE_MAX_CELLS = 96 * 96
# Losses that are a few GEMMs and nothing else (CyCLIP) have no kernel to choose.
GEMM_BACKENDS = ("auto", "reference")


def check_backend(backend, choices: tuple[str, ...] = BACKENDS, *, op: str | None = None) -> None:
    if backend not in choices:
        where = f" for {op}" if op else ""
        raise ValueError(f"backend must be one of {choices}{where}, got {backend!r}")


def local_backend(backend: str, device: torch.device, cells: int | None) -> str:
    """What runs `backend` for one call: 'auto' is triton on CUDA; on CPU "dense" when the call's
    logits are local and at most DENSE_MAX_CELLS (`cells`: N * M, None: not local), else cpu."""
    check_backend(backend)
    if backend == "auto" and torch.device(device).type == "cpu" and cells is not None and cells <= DENSE_MAX_CELLS:
        return "dense"
    return fused_backend(backend, device) if backend == "auto" else backend


def fused_backend(backend: str, device: torch.device) -> str:
    """The fused backend that runs `backend` on `device`: 'auto' is triton on CUDA, cpu otherwise."""
    check_backend(backend)
    if backend in ("reference", "dense"):
        raise ValueError(f"the {backend} backend materialises the logits and has no fused kernel")
    if backend == "auto":
        return "triton" if torch.device(device).type == "cuda" else "cpu"
    return backend


def accumulation_dtype(t: torch.Tensor) -> torch.dtype:
    """Kernels, losses and metrics accumulate in float32, or float64 for float64 inputs
    (half types are never accumulated in their 8- or 11-bit mantissas)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32
