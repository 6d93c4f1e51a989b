"""Triton backend of the similarity-logsumexp primitive (see xfast/ops/similarity_lse.py).

Z = s * X Y^T + B (B is zero except B[i, diag_offset + i] = diag_bias) is only ever held one
BLOCK_N x BLOCK_M tile at a time; s and the bias are read from device memory, so no call
synchronises with the host. Both kernels compute a tile's S = X_i Y_j^T with the same code,
tile shape and d chunking, so the backward sees bitwise the logits the forward normalised.

Forward (1 GEMM-equivalent, 2 N M d FLOPs): grid (row groups, column groups), each program
owns a rectangle of tiles (a bounded number of programs: about two per SM, and enough column
groups to fill the GPU when N is small). It walks its row blocks, and for each the column
tiles of its group: the row logsumexp is kept online in registers and written once per
(row, column group) to row_part [column groups, N]; each column's logsumexp over the
program's rows is merged into col_part [row groups, M], which the program alone writes.
torch.logsumexp over the group axis combines the parts in a fixed order.

Backward (3 GEMM-equivalents), one fused launch: grid (column tiles, d slices, row groups).
A program owns one column tile j, walks the row blocks i of its row group, recomputes S_ij
once and from it dZ_ij = g_row_i P_ij + g_col_j Q_ij, then
  - dY_j += dZ^T X_i, accumulated in registers for the whole walk (written once at the end);
  - dX_i += dZ Y_j, added to an fp32 [N, d] buffer in a fixed order: per row block a counter
    says which column tile's turn it is; a program spins until it equals j, adds, and hands
    over to j + 1 (flash-attention 3's deterministic mode). A program only ever waits for one
    launched before it (also under the interpreter, which runs programs one by one in grid
    order). Programs compute their tiles concurrently and queue only for the add.
  No unordered atomics: results are bitwise reproducible for a given launch configuration.

What the accumulators cost, and why:
  - dY_j is a BLOCK_M x BLOCK_DV fp32 register tile, held as two halves (each half's X
    operand is then half as large). On tensor cores (bf16, fp16, fp32 with TF32) it holds
    32 x 512 elements: 64 registers per thread at 8 warps, the most that leaves room for the
    S tile, dZ and the operands without spills on sm_80 and sm_90 (measured by
    tests/triton_compile_report.py). So d <= 512 is one d slice: forward 1 + backward 3 =
    4 GEMM-equivalents. Exact (IEEE) fp32 dots run on the FMA units, whose operand layouts
    need far more registers: one slice holds 128 columns of d (32 x 128), fp64 64.
  - Past that width, d is split into exactly two slices (grid axis 1) and the column tile
    shrinks to keep the accumulator's size (BLOCK_M >= 16): each slice recomputes S over the
    full d, so the backward costs 4 and the op 5 GEMM-equivalents, not growing with d up to
    4 times the width (2048 in 16-bit). The dX and dY GEMMs are split, not repeated.
  - The dX partial dZ Y_j is never held whole: it is computed and added in BLOCK_DX-wide
    chunks of d (BLOCK_N x BLOCK_DX fp32), inside the program's turn for that row block.
  - Row groups > 1 in the backward (only when the column tiles alone cannot fill the GPU, at
    most MAX_BWD_ROW_GROUPS) write fp32 dY partials [row groups, M, d] summed in fixed order.

Extra memory: forward (row groups * M + column groups * N) floats, the groups bounded by the
program count; backward an fp32 [N, d] dX buffer (fp32 inputs: dX itself), at most
MAX_BWD_ROW_GROUPS fp32 [M, d] dY partials and a counter per (row block, d slice):
O((N + M) d + programs (N + M)), never O(N M / BLOCK). Offsets that scale with N, M or d are
64-bit (base pointers in scalar int64 arithmetic); per-element offsets inside a tile are
int32 unless a stride makes them reach 2^31, then the INT64 specialisation is compiled.

Exponentials: 2 per logit. The forward needs the row and the column sums of exp(Z): when
every row and column max of a tile lies within MARGIN of the tile max, one exp(Z - tile max)
serves both (the terms that matter stay normal floats: the CPU kernel's rule); otherwise the
tile takes two. The backward writes dZ = exp(Z - ref) (g_row e^(ref - row_lse) +
g_col e^(ref - col_lse)) under the same margin condition on the logsumexps, else two exps.
Each exp is one exp2 of (difference) * log2(e): the factor multiplies the small difference
Z - lse, not the scale, because logits of ~1000 rounded in log2 units would shift every
probability by ~1e-4 (the fp32 tests at scale 100 see it); it costs one FMUL next to the
exp2's MUFU. Masks exist only in the EVEN_N / EVEN_M / EVEN_K = False specialisations.

Precision: tl.dot on the input dtype with an fp32 accumulator (fp64 for fp64 inputs); dZ is
rounded to the input dtype before the dX/dY dots only for 16-bit inputs, as flash-attention
does. fp32 dots follow torch.get_float32_matmul_precision(): "highest" (torch's default) is
exact IEEE fp32, "high"/"medium" allow TF32.
"""
import contextlib
import functools
import os
import types
from dataclasses import dataclass

import torch

from xfast.backends import accumulation_dtype

try:
    import triton
    import triton.language as tl
except ImportError as err:  # triton is a Linux-only dependency
    IMPORT_ERROR = err
    # Stand-ins so the kernel definitions below still evaluate; unavailable_reason reports it.
    triton = types.SimpleNamespace(jit=lambda fn: fn, cdiv=lambda a, b: -(-a // b),
                                   next_power_of_2=lambda n: 1 << max(n - 1, 0).bit_length())
    tl = types.SimpleNamespace(constexpr=lambda value=None: value)
else:
    IMPORT_ERROR = None

# Triton decides between compiling and interpreting when a kernel is defined (at import).
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
_LOW_PRECISION = (torch.float16, torch.bfloat16)
LOG2E = tl.constexpr(1.4426950408889634)
# One-exp margins (natural units): e^50 (fp32; 50 + 30 < 87) and e^600 (fp64), as in csrc/.
_MARGIN = {torch.float32: 50.0, torch.float64: 600.0}
MAX_BWD_ROW_GROUPS = 4
# Programs per launch on CUDA: PROGRAMS_PER_SM per multiprocessor. Under the interpreter a
# small fixed count, so that tests exercise the group splits and their combine.
PROGRAMS_PER_SM = 2
INTERPRETER_PROGRAMS = 6
_INT32_LIMIT = 2**31


def unavailable_reason(device: torch.device) -> str | None:
    device = torch.device(device)
    if IMPORT_ERROR is not None:
        return f"triton is not importable ({IMPORT_ERROR}); install triton (Linux only)"
    interpret_now = os.environ.get("TRITON_INTERPRET") == "1"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and interpret_now:
        if not _INTERPRETED:
            return ("TRITON_INTERPRET=1 was set after xfast.kernels.triton_similarity_lse was imported, so its "
                    "kernels were built for a GPU; set it before importing xfast")
        return None
    return (f"backend 'triton' needs CUDA tensors (got {device.type}); set TRITON_INTERPRET=1 before importing "
            "xfast to run the kernels in Triton's interpreter")


@dataclass(frozen=True)
class Blocks:
    """Tile shapes, shared by the forward and the backward (same S tiles, bitwise)."""
    n: int        # rows of X per tile
    m: int        # rows of Y (columns of Z) per tile
    k: int        # d chunk of the S = X_i Y_j^T product
    dv: int       # d slice of one backward program's dY accumulator
    dx: int       # d chunk of the dX partial
    num_warps: int
    num_stages: int


def _accumulator(dtype: torch.dtype, capability: tuple[int, int]) -> tuple[int, int]:
    """(widest d slice, elements) of the dY register accumulator (BLOCK_M x BLOCK_DV) of one
    backward program: the largest that compile without spills (tests/triton_compile_report.py).
    On tensor cores 512 columns; 64 x 512 (128 registers per thread at 8 warps) on Hopper,
    where wgmma takes 64-row operands, 32 x 512 on Ampere's mma.sync and for TF32. Exact fp32
    dots run on the FMA units and fp64 on DMMA, whose operand layouts need far more registers."""
    if dtype in _LOW_PRECISION:
        return 512, (64 if capability >= (9, 0) else 32) * 512
    if dtype == torch.float32 and _dot_precision(dtype) == "tf32":
        return 512, 32 * 512
    return (128, 32 * 128) if dtype == torch.float32 else (64, 32 * 64)


def blocks_for(dtype: torch.dtype, d: int, capability: tuple[int, int] = (9, 0)) -> Blocks:
    """Tile shapes: powers of two >= 16 (the tensor-core minimum); chunks shrink for tiny d.

    One d slice while d fits the accumulator's width, else exactly two slices with the column
    tile shrunk to keep the accumulator's size. The interpreter takes Hopper's shapes."""
    d_pow2 = max(16, triton.next_power_of_2(d))
    width, budget = _accumulator(dtype, capability)
    # (a slice is at least 32 wide: its two halves are dot operands)
    dv = max(32, d_pow2) if d_pow2 <= width else d_pow2 // 2
    m = min(64, max(16, budget // dv))
    if dtype == torch.float32 and _dot_precision(dtype) == "ieee":
        n, k = 16, 16
    elif dtype == torch.float64:
        n, k = 32, 16
    else:  # a full accumulator leaves room for a 32-row S tile only
        n, k = (64 if m * dv <= budget // 2 else 32), (64 if dtype in _LOW_PRECISION else 32)
    return Blocks(n=n, m=m, k=min(k, d_pow2), dv=dv, dx=min(64, dv), num_warps=8, num_stages=2)


@dataclass(frozen=True)
class Plan:
    """Launch geometry of one (N, M, d, dtype) problem."""
    blocks: Blocks
    row_blocks: int
    col_blocks: int
    fwd_row_groups: int
    fwd_col_groups: int
    bwd_row_groups: int
    dv_slices: int

    def extra_bytes(self, n: int, m: int, d: int, dtype: torch.dtype) -> dict[str, int]:
        """Bytes of every buffer the kernels allocate beyond inputs and outputs."""
        acc = 8 if dtype == torch.float64 else 4
        out = {"row_part": self.fwd_col_groups * n * acc, "col_part": self.fwd_row_groups * m * acc,
               "dx_buffer": n * d * acc if dtype in _LOW_PRECISION else 0,
               "dy_partials": self.bwd_row_groups * m * d * acc if self.bwd_row_groups > 1 else 0,
               "counters": 4 * self.dv_slices * self.row_blocks,
               "dscale_partials": acc * self.bwd_row_groups * self.col_blocks}
        return out


def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device) if device.type == "cuda" else (9, 0)


def target_programs(device: torch.device) -> int:
    if device.type == "cuda":
        return PROGRAMS_PER_SM * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return INTERPRETER_PROGRAMS


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def plan_for(n: int, m: int, d: int, dtype: torch.dtype, programs: int,
             capability: tuple[int, int] = (9, 0)) -> Plan:
    b = blocks_for(dtype, d, capability)
    nb, mb = triton.cdiv(n, b.n), triton.cdiv(m, b.m)
    fwd_rows = min(nb, programs)
    fwd_cols = min(mb, max(1, programs // fwd_rows))
    slices = triton.cdiv(d, b.dv)
    bwd_rows = min(MAX_BWD_ROW_GROUPS, nb, max(1, triton.cdiv(programs, mb * slices)))
    return Plan(b, nb, mb, fwd_rows, fwd_cols, bwd_rows, slices)


def _dot_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"  # ignored by tl.dot for 16-bit inputs; float64 needs it


def _bf16_as_fp32(dtype: torch.dtype) -> bool:
    return _INTERPRETED and dtype == torch.bfloat16  # see _dot


def _tl_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _needs_int64(blocks: Blocks, *tensors: torch.Tensor) -> bool:
    """Whether an element offset inside one tile (row < block, any column) can reach 2^31."""
    rows = max(blocks.n, blocks.m)
    return any(rows * abs(t.stride(0)) + t.shape[1] * abs(t.stride(1)) >= _INT32_LIMIT for t in tensors)


def _device_function(fn):
    """@triton.jit for the compiler. The interpreter runs helpers as plain Python inside the
    interpreted kernel: a jitted helper would re-patch triton.language on every call (~10 ms),
    which dominates the interpreted kernels' time."""
    return fn if _INTERPRETED else triton.jit(fn)


@_device_function
def _dot(a, b, acc, PRECISION: tl.constexpr, BF16_AS_FP32: tl.constexpr):
    """acc + a @ b. Triton's interpreter multiplies bfloat16 blocks as their raw uint16 bits,
    so under the interpreter bf16 operands are widened first: bf16 products are exact in fp32,
    so this is the tensor-core result up to summation order."""
    if BF16_AS_FP32:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@_device_function
def _in_range(idx, bound, EVEN: tl.constexpr, BLOCK: tl.constexpr):
    """idx < bound, or a constant True the compiler folds away when the size is a multiple."""
    if EVEN:
        return tl.full([BLOCK], 1, tl.int1)
    else:
        return idx < bound


@_device_function
def _offsets(BLOCK: tl.constexpr, INT64: tl.constexpr):
    idx = tl.arange(0, BLOCK)
    if INT64:
        idx = tl.cast(idx, tl.int64)
    return idx


@_device_function
def _similarity_tile(x_blk, y_blk, row_ok, col_ok, D, stride_xn, stride_xd, stride_yn, stride_yd,
                     ACC: tl.constexpr, PRECISION: tl.constexpr, BF16_AS_FP32: tl.constexpr, EVEN_K: tl.constexpr,
                     INT64: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """S[i, j] = x_i . y_j for the BLOCK_N rows at x_blk and the BLOCK_M rows at y_blk."""
    i = _offsets(BLOCK_N, INT64)
    j = _offsets(BLOCK_M, INT64)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=ACC)
    for k0 in range(0, D, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = _in_range(k, D, EVEN_K, BLOCK_K)
        a = tl.load(x_blk + i[:, None] * stride_xn + k[None, :] * stride_xd, mask=row_ok[:, None] & k_ok[None, :],
                    other=0.0)
        b_t = tl.load(y_blk + j[None, :] * stride_yn + k[:, None] * stride_yd, mask=col_ok[None, :] & k_ok[:, None],
                      other=0.0)
        acc = _dot(a, b_t, acc, PRECISION, BF16_AS_FP32)
    return acc


@_device_function
def _exp(t):
    """e^t as one exp2 (the MUFU instruction) of t log2(e)."""
    return tl.exp2(t * LOG2E)


@_device_function
def _logits(S, scale, bias, r0, c0, rows, cols, row_ok, col_ok, diag_offset, HAS_BIAS: tl.constexpr,
            EVEN_N: tl.constexpr, EVEN_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    """Z = scale * S + bias on the shifted diagonal; -inf outside the matrix."""
    z = S * scale
    if HAS_BIAS:
        # Only tiles the shifted diagonal crosses pay for the comparison.
        if (c0 < r0 + BLOCK_N + diag_offset) & (r0 + diag_offset < c0 + BLOCK_M):
            z = tl.where(cols[None, :] == rows[:, None] + diag_offset, z + bias, z)
    if not (EVEN_N and EVEN_M):
        z = tl.where(row_ok[:, None] & col_ok[None, :], z, float("-inf"))
    return z


@triton.jit
def _forward_kernel(x_ptr, y_ptr, scale_ptr, bias_ptr, row_part_ptr, col_part_ptr,
                    N, M, D, diag_offset, stride_xn, stride_xd, stride_yn, stride_yd, ROW_GROUPS, COL_GROUPS,
                    HAS_BIAS: tl.constexpr, WITH_COLS: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
                    BF16_AS_FP32: tl.constexpr, EVEN_N: tl.constexpr, EVEN_M: tl.constexpr, EVEN_K: tl.constexpr,
                    INT64: tl.constexpr, MARGIN: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    row_group = tl.program_id(0)
    col_group = tl.program_id(1)
    n_blocks = tl.cdiv(N, BLOCK_N)
    m_blocks = tl.cdiv(M, BLOCK_M)
    scale = tl.load(scale_ptr).to(ACC)
    bias = tl.load(bias_ptr).to(ACC) if HAS_BIAS else 0.0
    col_part = col_part_ptr + tl.cast(row_group, tl.int64) * M
    row_part = row_part_ptr + tl.cast(col_group, tl.int64) * N
    for rb in range(row_group * n_blocks // ROW_GROUPS, (row_group + 1) * n_blocks // ROW_GROUPS):
        r0 = rb * BLOCK_N
        rows = r0 + tl.arange(0, BLOCK_N)
        row_ok = _in_range(rows, N, EVEN_N, BLOCK_N)
        x_blk = x_ptr + tl.cast(r0, tl.int64) * stride_xn
        run_max = tl.full((BLOCK_N,), float("-inf"), ACC)  # row logsumexp so far: run_max + log2(run_sum)
        run_sum = tl.zeros((BLOCK_N,), ACC)
        for cb in range(col_group * m_blocks // COL_GROUPS, (col_group + 1) * m_blocks // COL_GROUPS):
            c0 = cb * BLOCK_M
            cols = c0 + tl.arange(0, BLOCK_M)
            col_ok = _in_range(cols, M, EVEN_M, BLOCK_M)
            S = _similarity_tile(x_blk, y_ptr + tl.cast(c0, tl.int64) * stride_yn, row_ok, col_ok, D,
                                 stride_xn, stride_xd, stride_yn, stride_yd, ACC, PRECISION, BF16_AS_FP32, EVEN_K,
                                 INT64, BLOCK_N, BLOCK_M, BLOCK_K)
            z = _logits(S, scale, bias, r0, c0, rows, cols, row_ok, col_ok, diag_offset, HAS_BIAS, EVEN_N, EVEN_M,
                         BLOCK_N, BLOCK_M)
            row_max = tl.max(z, 1)
            if WITH_COLS:
                col_max = tl.max(z, 0)
                ref = tl.max(row_max, 0)
                lowest = tl.minimum(tl.min(tl.where(row_ok, row_max, float("inf")), 0),
                                    tl.min(tl.where(col_ok, col_max, float("inf")), 0))
                if ref - lowest <= MARGIN:
                    e = _exp(z - ref)
                    row_shift = tl.zeros((BLOCK_N,), ACC) + ref
                    row_sum = tl.sum(e, 1)
                    col_shift = tl.zeros((BLOCK_M,), ACC) + ref
                    col_sum = tl.sum(e, 0)
                else:
                    # Rows/columns outside the matrix have no finite entry: shift them by 0.
                    row_shift = tl.where(row_max == float("-inf"), 0.0, row_max)
                    row_sum = tl.sum(_exp(z - row_shift[:, None]), 1)
                    col_shift = tl.where(col_max == float("-inf"), 0.0, col_max)
                    col_sum = tl.sum(_exp(z - col_shift[None, :]), 0)
                # Merge this tile's column logsumexps into the program's own slice of col_part.
                old = tl.load(col_part + cols, mask=col_ok, other=0.0)
                new = col_shift + tl.log(tl.where(col_ok, col_sum, 1.0))
                hi = tl.maximum(old, new)
                merged = hi + tl.log(1.0 + _exp(tl.minimum(old, new) - hi))
                tl.store(col_part + cols, merged, mask=col_ok)
            else:
                row_shift = tl.where(row_max == float("-inf"), 0.0, row_max)
                row_sum = tl.sum(_exp(z - row_shift[:, None]), 1)
            new_max = tl.maximum(run_max, row_shift)
            run_sum = run_sum * _exp(run_max - new_max) + row_sum * _exp(row_shift - new_max)
            run_max = new_max
        tl.store(row_part + rows, run_max + tl.log(tl.where(row_ok, run_sum, 1.0)), mask=row_ok)


@triton.jit
def _backward_kernel(x_ptr, y_ptr, scale_ptr, bias_ptr, row_lse_ptr, col_lse_ptr, g_row_ptr, g_col_ptr,
                     dx_ptr, dy_ptr, dscale_part_ptr, turn_ptr,
                     N, M, D, diag_offset, stride_xn, stride_xd, stride_yn, stride_yd, stride_dxn, stride_dyg,
                     stride_dyn, ROW_GROUPS,
                     HAS_BIAS: tl.constexpr, HAS_ROW: tl.constexpr, HAS_COL: tl.constexpr, ACC: tl.constexpr,
                     PRECISION: tl.constexpr, BF16_AS_FP32: tl.constexpr, EVEN_N: tl.constexpr, EVEN_M: tl.constexpr,
                     EVEN_K: tl.constexpr, EVEN_DV: tl.constexpr, INT64: tl.constexpr, MARGIN: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DV: tl.constexpr,
                     BLOCK_DX: tl.constexpr):
    """For column tile j (axis 0), d slice v (axis 1) and row group (axis 2):
    dY[j, v] = scale sum_i dZ_ij^T X[i, v] and dX[i, v] += scale dZ_ij Y[j, v] in turn, where
    dZ_ij = g_row_i exp(Z_ij - row_lse_i) + g_col_j exp(Z_ij - col_lse_j); also the column
    sums of dZ * S for dscale."""
    cb = tl.program_id(0)
    v = tl.program_id(1)
    row_group = tl.program_id(2)
    n_blocks = tl.cdiv(N, BLOCK_N)
    scale = tl.load(scale_ptr).to(ACC)
    bias = tl.load(bias_ptr).to(ACC) if HAS_BIAS else 0.0
    c0 = cb * BLOCK_M
    cols = c0 + tl.arange(0, BLOCK_M)
    col_ok = _in_range(cols, M, EVEN_M, BLOCK_M)
    y_blk = y_ptr + tl.cast(c0, tl.int64) * stride_yn
    i = _offsets(BLOCK_N, INT64)
    j = _offsets(BLOCK_M, INT64)
    # The dY slice is two accumulators of BLOCK_DV / 2 columns: each dot's operand tile of X is
    # half as large, which keeps the transient registers of its load off the spill path.
    HALF: tl.constexpr = BLOCK_DV // 2
    dv_a = v * BLOCK_DV + tl.arange(0, HALF)
    dv_b = dv_a + HALF
    dv_a_ok = _in_range(dv_a, D, EVEN_DV, HALF)
    dv_b_ok = _in_range(dv_b, D, EVEN_DV, HALF)
    dx_end = tl.minimum((v + 1) * BLOCK_DV, D)
    if HAS_COL:
        g_col = tl.load(g_col_ptr + cols, mask=col_ok, other=0.0).to(ACC)
        col_lse = tl.load(col_lse_ptr + cols, mask=col_ok, other=0.0).to(ACC)
    dy_a = tl.zeros((BLOCK_M, HALF), dtype=ACC)
    dy_b = tl.zeros((BLOCK_M, HALF), dtype=ACC)
    dscale_cols = tl.zeros((BLOCK_M,), dtype=ACC)
    for rb in range(row_group * n_blocks // ROW_GROUPS, (row_group + 1) * n_blocks // ROW_GROUPS):
        r0 = rb * BLOCK_N
        rows = r0 + tl.arange(0, BLOCK_N)
        row_ok = _in_range(rows, N, EVEN_N, BLOCK_N)
        x_blk = x_ptr + tl.cast(r0, tl.int64) * stride_xn
        S = _similarity_tile(x_blk, y_blk, row_ok, col_ok, D, stride_xn, stride_xd, stride_yn, stride_yd,
                             ACC, PRECISION, BF16_AS_FP32, EVEN_K, INT64, BLOCK_N, BLOCK_M, BLOCK_K)
        # Outside the matrix z = -inf and the logsumexps read as 0, so exp2() gives exact zeros.
        z = _logits(S, scale, bias, r0, c0, rows, cols, row_ok, col_ok, diag_offset, HAS_BIAS, EVEN_N, EVEN_M,
                     BLOCK_N, BLOCK_M)
        if HAS_ROW:
            g_row = tl.load(g_row_ptr + rows, mask=row_ok, other=0.0).to(ACC)
            row_lse = tl.load(row_lse_ptr + rows, mask=row_ok, other=0.0).to(ACC)
        if HAS_ROW and HAS_COL:
            # Z <= both logsumexps, so exp2(z - ref) <= 1 and the factors below are <= 2^MARGIN.
            ref = tl.maximum(tl.max(tl.where(row_ok, row_lse, float("-inf")), 0),
                             tl.max(tl.where(col_ok, col_lse, float("-inf")), 0))
            lowest = tl.minimum(tl.min(tl.where(row_ok, row_lse, float("inf")), 0),
                                tl.min(tl.where(col_ok, col_lse, float("inf")), 0))
            if ref - lowest <= MARGIN:
                a = tl.where(row_ok, g_row * _exp(ref - row_lse), 0.0)
                b = tl.where(col_ok, g_col * _exp(ref - col_lse), 0.0)
                dz = _exp(z - ref) * (a[:, None] + b[None, :])
            else:
                dz = g_row[:, None] * _exp(z - row_lse[:, None]) + g_col[None, :] * _exp(z - col_lse[None, :])
        elif HAS_ROW:
            dz = g_row[:, None] * _exp(z - row_lse[:, None])
        else:
            dz = g_col[None, :] * _exp(z - col_lse[None, :])
        dscale_cols += tl.sum(dz * S, 0)
        # scale folded in before the (16-bit) rounding; a no-op cast for fp32/fp64.
        dzs = (dz * scale).to(x_ptr.dtype.element_ty)
        dzs_t = tl.trans(dzs)
        x_a = tl.load(x_blk + i[:, None] * stride_xn + dv_a[None, :] * stride_xd,
                      mask=row_ok[:, None] & dv_a_ok[None, :], other=0.0)
        dy_a = _dot(dzs_t, x_a, dy_a, PRECISION, BF16_AS_FP32)
        x_b = tl.load(x_blk + i[:, None] * stride_xn + dv_b[None, :] * stride_xd,
                      mask=row_ok[:, None] & dv_b_ok[None, :], other=0.0)
        dy_b = _dot(dzs_t, x_b, dy_b, PRECISION, BF16_AS_FP32)
        # dX[i, v] += dZ Y[j, v], in column-tile order: wait for this row block's turn.
        turn = turn_ptr + v * n_blocks + rb
        while tl.atomic_cas(turn, cb, cb) != cb:
            pass
        dx_blk = dx_ptr + tl.cast(r0, tl.int64) * stride_dxn
        for k0 in range(v * BLOCK_DV, dx_end, BLOCK_DX):
            k = k0 + tl.arange(0, BLOCK_DX)
            k_ok = _in_range(k, D, EVEN_DV, BLOCK_DX)
            y_k = tl.load(y_blk + j[:, None] * stride_yn + k[None, :] * stride_yd, mask=col_ok[:, None] & k_ok[None, :],
                          other=0.0)
            part = _dot(dzs, y_k, tl.zeros((BLOCK_N, BLOCK_DX), dtype=ACC), PRECISION, BF16_AS_FP32)
            dx_ptrs = dx_blk + i[:, None] * stride_dxn + k[None, :]
            dx_ok = row_ok[:, None] & k_ok[None, :]
            if cb > 0:  # the first contribution initialises the buffer
                part += tl.load(dx_ptrs, mask=dx_ok, other=0.0, cache_modifier=".cg")
            tl.store(dx_ptrs, part.to(dx_ptr.dtype.element_ty), mask=dx_ok)
        tl.debug_barrier()  # every thread's stores are issued before the turn moves on
        tl.atomic_xchg(turn, cb + 1)
    dy_blk = dy_ptr + tl.cast(row_group, tl.int64) * stride_dyg + tl.cast(c0, tl.int64) * stride_dyn
    tl.store(dy_blk + j[:, None] * stride_dyn + dv_a[None, :], dy_a.to(dy_ptr.dtype.element_ty),
             mask=col_ok[:, None] & dv_a_ok[None, :])
    tl.store(dy_blk + j[:, None] * stride_dyn + dv_b[None, :], dy_b.to(dy_ptr.dtype.element_ty),
             mask=col_ok[:, None] & dv_b_ok[None, :])
    if v == 0:
        tl.store(dscale_part_ptr + row_group * tl.num_programs(0) + cb, tl.sum(dscale_cols, 0))


def _check_pair(x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor) -> None:
    if x.dim() != 2 or y.dim() != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"x, y must be [N, d], [M, d]; got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.dtype != y.dtype or x.dtype not in (torch.float32, torch.float64) + _LOW_PRECISION:
        raise ValueError(f"x and y must share a float dtype (float32/64, bfloat16, float16); got {x.dtype}, {y.dtype}")
    if x.numel() == 0 or y.numel() == 0:
        raise ValueError(f"x and y must be non-empty; got {tuple(x.shape)} and {tuple(y.shape)}")
    if y.device != x.device or scale.device != x.device:
        raise ValueError(f"x, y and scale must be on one device; got {x.device}, {y.device}, {scale.device}")
    if scale.numel() != 1:
        raise ValueError(f"scale must hold one value, got shape {tuple(scale.shape)}")


def _device_scalars(x: torch.Tensor, scale: torch.Tensor, diag_bias: float):
    """scale (and the bias, if any) as device tensors of the accumulation dtype: no host sync."""
    acc = accumulation_dtype(x)
    scale = scale.detach().reshape(()).to(acc)
    bias = torch.full((), diag_bias, dtype=acc, device=x.device) if diag_bias != 0.0 else scale
    return scale, bias


def _on_device(device: torch.device):
    # Triton launches on the current CUDA device.
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _specialisation(x, y, plan: Plan, force_int64: bool = False) -> dict:
    n, d = x.shape
    b = plan.blocks
    return dict(ACC=_tl_dtype(accumulation_dtype(x)), PRECISION=_dot_precision(x.dtype),
                BF16_AS_FP32=_bf16_as_fp32(x.dtype), EVEN_N=n % b.n == 0, EVEN_M=y.shape[0] % b.m == 0,
                EVEN_K=d % b.k == 0, INT64=force_int64 or _needs_int64(b, x, y),
                MARGIN=_MARGIN[accumulation_dtype(x)], BLOCK_N=b.n, BLOCK_M=b.m, BLOCK_K=b.k,
                num_warps=b.num_warps, num_stages=b.num_stages)


def forward(x, y, scale, diag_bias, diag_offset, with_cols, *, programs=None, force_int64=False):
    _check_pair(x, y, scale)
    x, y = x.detach(), y.detach()
    n, d = x.shape
    m = y.shape[0]
    acc = accumulation_dtype(x)
    plan = plan_for(n, m, d, x.dtype, programs or target_programs(x.device), _capability(x.device))
    scale_t, bias_t = _device_scalars(x, scale, diag_bias)
    row_part = torch.empty((plan.fwd_col_groups, n), dtype=acc, device=x.device)
    col_part = (torch.full((plan.fwd_row_groups, m), float("-inf"), dtype=acc, device=x.device) if with_cols
                else row_part)
    with _on_device(x.device):
        _forward_kernel[(plan.fwd_row_groups, plan.fwd_col_groups)](
            x, y, scale_t, bias_t, row_part, col_part, n, m, d, int(diag_offset),
            x.stride(0), x.stride(1), y.stride(0), y.stride(1), plan.fwd_row_groups, plan.fwd_col_groups,
            HAS_BIAS=diag_bias != 0.0, WITH_COLS=bool(with_cols), **_specialisation(x, y, plan, force_int64))
    combine = lambda part: part[0] if part.shape[0] == 1 else torch.logsumexp(part, dim=0)  # fixed order
    return combine(row_part), (combine(col_part) if with_cols else None)


def backward(x, y, scale, diag_bias, diag_offset, row_lse, col_lse, grad_row, grad_col, *, grad_dtype=None,
             programs=None, force_int64=False):
    _check_pair(x, y, scale)
    if grad_col is not None and col_lse is None:
        raise ValueError("grad_col needs col_lse (run the forward with with_cols=True)")
    x, y = x.detach(), y.detach()
    acc = accumulation_dtype(x)
    out = grad_dtype or x.dtype
    if grad_row is None and grad_col is None:
        return (torch.zeros_like(x, dtype=out), torch.zeros_like(y, dtype=out),
                scale.new_zeros((), dtype=acc))
    n, d = x.shape
    m = y.shape[0]
    plan = plan_for(n, m, d, x.dtype, programs or target_programs(x.device), _capability(x.device))
    b = plan.blocks
    scale_t, bias_t = _device_scalars(x, scale, diag_bias)
    # grad_* often come from .mean()/.sum() as stride-0 expansions: materialise O(N) vectors.
    vec = lambda t: None if t is None else t.detach().to(acc).contiguous()
    row_lse, col_lse, grad_row, grad_col = vec(row_lse), vec(col_lse), vec(grad_row), vec(grad_col)
    dummy = row_lse  # stands in for absent vectors; never read (constexpr flags)
    dx_buf = torch.empty((n, d), dtype=acc, device=x.device)
    groups = plan.bwd_row_groups
    # One row group writes dY straight from its registers in the dtype asked for.
    dy = torch.empty((groups, m, d) if groups > 1 else (1, m, d), dtype=acc if groups > 1 else out,
                     device=y.device)
    dscale_part = torch.empty((groups, plan.col_blocks), dtype=acc, device=x.device)
    turns = torch.zeros((plan.dv_slices, plan.row_blocks), dtype=torch.int32, device=x.device)
    with _on_device(x.device):
        _backward_kernel[(plan.col_blocks, plan.dv_slices, groups)](
            x, y, scale_t, bias_t, row_lse, dummy if col_lse is None else col_lse,
            dummy if grad_row is None else grad_row, dummy if grad_col is None else grad_col,
            dx_buf, dy, dscale_part, turns, n, m, d, int(diag_offset),
            x.stride(0), x.stride(1), y.stride(0), y.stride(1), dx_buf.stride(0), dy.stride(0), dy.stride(1), groups,
            HAS_BIAS=diag_bias != 0.0, HAS_ROW=grad_row is not None, HAS_COL=grad_col is not None,
            EVEN_DV=d % b.dv == 0, BLOCK_DV=b.dv, BLOCK_DX=b.dx, **_specialisation(x, y, plan, force_int64))
    dy = dy[0] if groups == 1 else dy.sum(0).to(out)
    return dx_buf.to(out), dy, dscale_part.sum()
