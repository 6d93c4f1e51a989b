"""CPU backend: the tiled C++/OpenMP kernel of csrc/similarity_lse.cpp.

bfloat16 and float16 inputs are widened to float32 here and computed in float32 (as the
Triton backend accumulates), float64 in float64; gradients come back in the input dtype, or in
grad_dtype (the accumulation dtype, when the caller sums them further).
"""
from __future__ import annotations

import torch

from xfast.backends import accumulation_dtype

try:
    from xfast import _C
except ImportError as err:  # the extension is built at install time
    _C = None
    IMPORT_ERROR = err
else:
    IMPORT_ERROR = None

# Tile shape: 256 x 512 float32 tiles (512 KiB) stay in L2 while the GEMMs stay efficient.
BLOCK_ROWS = 256
BLOCK_COLS = 512


def tile_isa() -> str:
    """Instruction set of the float32 tile kernels in use: avx512, avx2_fma or baseline."""
    return _C.tile_isa()


def tile_gemm_floor(x: torch.Tensor, y: torch.Tensor, gemms_per_tile: int = 4) -> None:
    """Only the kernel's GEMMs: gemms_per_tile products x_blk @ y_tile.T per tile, into one
    reused tile per thread, over the kernel's own cells. With 4 it is the compute floor of
    a forward+backward (benchmarks/bench_losses.py)."""
    _C.tile_gemm_floor(x.contiguous(), y.contiguous(), int(gemms_per_tile), BLOCK_ROWS, BLOCK_COLS)


def unavailable_reason(device: torch.device) -> str | None:
    if _C is None:
        return f"the native extension xfast._C is not built ({IMPORT_ERROR}); reinstall with `pip install --no-build-isolation -e .`"
    if device.type != "cpu":
        return f"backend 'cpu' runs on CPU tensors, got {device}"
    return None


def forward(x, y, scale, diag_bias, diag_offset, with_cols):
    dt = accumulation_dtype(x)
    row_lse, col_lse = _C.similarity_lse_forward(
        x.detach().to(dt).contiguous(), y.detach().to(dt).contiguous(), float(scale), float(diag_bias), int(diag_offset),
        bool(with_cols), BLOCK_ROWS, BLOCK_COLS)
    return row_lse, (col_lse if with_cols else None)


# The rows-only path with gradients in the forward (3 GEMMs instead of 4) stores a slab of logits
# and reads it back twice: it pays where the GEMMs dominate and costs more than it saves where
# the exps and that memory traffic weigh most. Measured (2 threads, AVX2, SimCSE with hard negatives,
# N = 8192, paired in one process): 0.81x the recompute path's time at d = 512, 0.94x at d = 256,
# 1.06x at d = 128 (`python benchmarks/bench_losses.py --sizes 8192 --dims 128 256 512 --losses
# simcse_hn --methods xfast_rows xfast_recompute --rounds 6 --no-memory --out
# benchmarks/results/losses_rows_ab`), 1.09x at d = 64 (benchmarks/README.md, "Loss benchmark (CPU)").
EAGER_ROWS_MIN_DIM = 256
# Its tasks: M / 512 column chunks (GEMM and exps) and 4 pieces of dX per 256-row slab, each on
# one thread. With more threads than that they would idle where the 4-GEMM cell schedule keeps
# every thread busy, and it was measured at 2 threads only: at most 4 threads, and at least one
# chunk per thread.
EAGER_ROWS_MAX_THREADS = 4


def eager_rows_pays(d: int, m: int) -> bool:
    """Whether forward_rows_with_gradients is the faster path for embedding dim d and m columns
    at the current thread count (False with an extension built before that entry existed: a
    checkout updated without rebuilding keeps working)."""
    threads = torch.get_num_threads()
    return (d >= EAGER_ROWS_MIN_DIM and threads <= EAGER_ROWS_MAX_THREADS and -(-m // BLOCK_COLS) >= threads
            and hasattr(_C, "similarity_lse_rows_with_gradients"))


def forward_rows_with_gradients(x, y, scale, diag_bias, diag_offset):
    """Row logsumexp (no columns) and, for every row weighed 1 (dL/drow_lse = 1), the gradients
    of x, y and scale from the same slab of logits: 3 GEMM-equivalents where forward + backward
    take 4. (row_lse, dx, dy, dscale), all in the accumulation dtype; a loss whose rows all get
    the same upstream gradient c scales them by c (xfast/ops/similarity_lse.py)."""
    dt = accumulation_dtype(x)
    return tuple(_C.similarity_lse_rows_with_gradients(
        x.detach().to(dt).contiguous(), y.detach().to(dt).contiguous(), float(scale), float(diag_bias),
        int(diag_offset), BLOCK_ROWS, BLOCK_COLS))


def backward(x, y, scale, diag_bias, diag_offset, row_lse, col_lse, grad_row, grad_col, *, grad_dtype=None):
    dt = accumulation_dtype(x)
    as_dt = lambda t: None if t is None else t.to(dt).contiguous()
    dx, dy, dscale = _C.similarity_lse_backward(
        x.detach().to(dt).contiguous(), y.detach().to(dt).contiguous(), float(scale), float(diag_bias), int(diag_offset),
        as_dt(row_lse), as_dt(col_lse), as_dt(grad_row), as_dt(grad_col), BLOCK_ROWS, BLOCK_COLS)
    out = grad_dtype or x.dtype
    return dx.to(out), dy.to(out), dscale
