"""Kernel-level properties of the C++ CPU kernel (csrc/similarity_lse*.cpp).

The tile kernels are compiled once per instruction set; these tests check the built
extension itself: every float32 variant's exp loops are vectorised (read off its
disassembly, so a scalar fallback cannot return unnoticed), the dispatcher picks the best
variant this CPU supports by feature (AMD and Intel alike), every variant this CPU runs
matches a float64 reference, and the kernel's working memory does not grow with copies of
dY per thread.
"""
from __future__ import annotations

import platform
import re
import shutil
import subprocess
from functools import lru_cache

import pytest
import torch

from tests.loss_cases import assert_within_torch_error, embeddings
from xfast.kernels import cpu_similarity_lse
from xfast.ops.similarity_lse import similarity_lse

_C = cpu_similarity_lse._C
X86 = platform.machine() in ("x86_64", "AMD64", "i686")
pytestmark = pytest.mark.skipif(_C is None, reason="xfast._C is not built")

# Calls of exp_nonpos inside the tile loops of csrc/similarity_lse_tiles.cpp. Each
# vectorised call converts its exponent with one packed float->int instruction (cvttps2dq);
# a scalar loop uses cvttss2si instead. forward_tile: one-exp, row-only and column exp
# loops, and the column merge (2 calls); backward_tile: column weights, one-exp, two-exp
# (2 calls), row-only and column-only loops.
EXP_CALLS = {"forward": 5, "backward": 6}
# Packed maxima of forward_tile's vectorised max loops: rows and columns together (2), rows
# alone (1), the column merge (1). gcc 12 left the rows-alone max reduction scalar, unseen,
# until this count covered it. The count can only catch that in the ymm/zmm variants: baseline's
# xmm count also holds the horizontal reductions' maxps (9 in all), so a scalar loop there still
# passes; all variants compile from one source, so the wide ones stand for it. backward_tile
# has no max loop over the tile (only over the O(rows + cols) logsumexps), so nothing to count.
MAX_LOOPS = {"forward": 4}
# Packed minima of forward_tile's one min loop (the lowest column max). No horizontal min
# elsewhere in it, so the count catches a scalar loop in every variant, baseline included.
MIN_LOOPS = {"forward": 1}
# Register of each variant's main loops; baseline x86-64 has SSE2 and no FMA.
VECTOR_REGISTER = {"avx512": "zmm", "avx2_fma": "ymm", "baseline": "xmm"}
POLYNOMIAL_FMAS = 5  # FMAs of exp's polynomial (Estrin's order), where the variant has FMA


@lru_cache(maxsize=1)
def disassembly() -> dict[str, list[str]]:
    """Instructions of each xfast_*_tile_f32_* function in the built extension."""
    objdump = shutil.which("objdump")
    if objdump is None:
        pytest.fail("objdump (binutils) is needed to check the extension's vectorisation; install binutils")
    text = subprocess.run([objdump, "-d", "--no-show-raw-insn", _C.__file__], capture_output=True, text=True,
                          check=True).stdout
    functions = {}
    for block in re.split(r"\n(?=[0-9a-f]+ <)", text):
        head = re.match(r"[0-9a-f]+ <(xfast_\w+_tile_f32_\w+)>:", block)
        if head:
            functions[head.group(1)] = block.splitlines()[1:]
    return functions


def count(instructions: list[str], pattern: str) -> int:
    return sum(1 for line in instructions if re.search(pattern, line))


@pytest.mark.skipif(not X86, reason="the per-ISA variants exist on x86 only")
@pytest.mark.parametrize("isa", ["avx512", "avx2_fma", "baseline"])
@pytest.mark.parametrize("kind", ["forward", "backward"])
def test_every_variant_vectorises_its_exp_loops(kind, isa):
    name = f"xfast_{kind}_tile_f32_{isa}"
    instructions = disassembly().get(name)
    assert instructions, f"{name} is missing from {_C.__file__}"
    reg = VECTOR_REGISTER[isa]
    packed_converts = count(instructions, rf"\bv?cvttps2dq\s.*%{reg}")
    assert packed_converts >= EXP_CALLS[kind], (
        f"{name}: {packed_converts} packed exp loops on {reg} registers, expected {EXP_CALLS[kind]} "
        "(gcc left some scalar; see -fno-trapping-math in setup.py)")
    if kind in MAX_LOOPS:
        packed_maxima = count(instructions, rf"\bv?maxps\s.*%{reg}")
        assert packed_maxima >= MAX_LOOPS[kind], f"{name}: {packed_maxima} packed max loops, expected {MAX_LOOPS[kind]}"
    if kind in MIN_LOOPS:
        packed_minima = count(instructions, rf"\bv?minps\s.*%{reg}")
        assert packed_minima >= MIN_LOOPS[kind], f"{name}: {packed_minima} packed min loops, expected {MIN_LOOPS[kind]}"
    if isa == "baseline":
        assert count(instructions, r"\bv?fmadd") == 0, "the baseline variant must run on any x86-64"
        assert count(instructions, r"%[yz]mm") == 0, "the baseline variant must run on any x86-64"
    else:
        fmas = count(instructions, rf"\bvfn?madd\w*ps\s.*%{reg}")
        assert fmas >= POLYNOMIAL_FMAS * EXP_CALLS[kind], f"{name}: only {fmas} packed FMAs on {reg}"
        if isa == "avx2_fma":
            assert count(instructions, r"%zmm") == 0, "the AVX2 variant must run on CPUs without AVX-512"


# The tile kernels' float32 exp (csrc/similarity_lse_tiles.cpp): polynomial error 3.8e-9, the
# reduction ~1e-8 and three float32 roundings (3 * 2^-24) in evaluating it add up to less than
# 2^-22 relative; below -87 it flushes to exactly 0.
EXP_RELATIVE_ERROR = 2.0**-22


def test_every_variant_keeps_the_exp_error_bound(restore_isa):
    g = torch.Generator().manual_seed(0)
    x = torch.cat([
        torch.linspace(-87.0, 0.0, 1_000_001),
        -87.0 * torch.rand(1_000_000, generator=g),
        -(10.0 ** torch.empty(1_000_000).uniform_(-30, 1.9, generator=g)),  # small magnitudes
        torch.tensor([0.0, -0.0, -1e-45, -87.0]),
    ])
    exact = torch.exp(x.double())
    for isa in _C.supported_tile_isas():
        _C.select_tile_isa(isa)
        rel = ((_C.tile_exp(x).double() - exact).abs() / exact).max().item()
        assert rel <= EXP_RELATIVE_ERROR, f"{isa}: exp relative error {rel:.3g} > {EXP_RELATIVE_ERROR:.3g}"
        flushed = _C.tile_exp(torch.tensor([-87.5, -100.0, -1e30, -float("inf")]))
        assert torch.equal(flushed, torch.zeros(4)), f"{isa}: exp below -87 gave {flushed.tolist()}, not 0"


def test_exp_float64_is_plain_libm():
    # float64 has no polynomial: std::exp, like torch.exp within 1 ulp of exp each, so within
    # 2 ulp (2^-51 relative) of each other on any libm.
    x = torch.cat([torch.linspace(-745.0, 0.0, 100_001, dtype=torch.float64), torch.tensor([-0.0, -1e-300])])
    got, expected = _C.tile_exp(x), torch.exp(x)
    assert got.dtype == torch.float64
    normal = expected > torch.finfo(torch.float64).tiny  # subnormal results carry fewer bits
    rel = ((got - expected).abs() / expected)[normal].max().item()
    assert rel <= 2.0**-51, f"float64 tile_exp relative error {rel:.3g}"
    assert torch.equal(got[~normal] == 0, expected[~normal] == 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bad", [1e-3, 88.0, float("inf"), float("nan")])
def test_exp_refuses_values_above_zero_or_nan(bad, dtype):
    with pytest.raises(RuntimeError, match="values <= 0"):
        _C.tile_exp(torch.tensor([-1.0, bad, -2.0], dtype=dtype))


@pytest.mark.parametrize("scale", [0.0, -20.0, float("nan"), float("inf")])
def test_kernel_entries_refuse_a_scale_that_is_not_positive(scale):
    # scale 0 would give dscale = sum(D * Z) / 0 = NaN; the public losses refuse it first.
    x, y = embeddings(40, 16, seed=3).float(), embeddings(48, 16, seed=4).float()
    row_lse, col_lse = _C.similarity_lse_forward(x, y, 20.0, 0.0, 0, True, 256, 512)
    with pytest.raises(RuntimeError, match="scale must be positive and finite"):
        _C.similarity_lse_forward(x, y, scale, 0.0, 0, True, 256, 512)
    with pytest.raises(RuntimeError, match="scale must be positive and finite"):
        _C.similarity_lse_backward(x, y, scale, 0.0, 0, row_lse, col_lse, torch.ones(40), torch.ones(48), 256, 512)


# Positive and finite as a double, but 0 (below float32's smallest subnormal, 1.4e-45) or inf
# (above its largest finite value, 3.4e38) once cast to the float32 the kernel computes in.
@pytest.mark.parametrize("scale", [1e-50, 1e39])
def test_kernel_entries_check_the_scale_in_their_dtype(scale):
    x, y = embeddings(40, 16, seed=3), embeddings(48, 16, seed=4)
    row_lse, col_lse = _C.similarity_lse_forward(x, y, scale, 0.0, 0, True, 256, 512)  # float64: valid
    assert torch.isfinite(row_lse).all() and torch.isfinite(col_lse).all()
    dx, dy, dscale = _C.similarity_lse_backward(x, y, scale, 0.0, 0, row_lse, col_lse, torch.ones(40, dtype=x.dtype),
                                                torch.ones(48, dtype=x.dtype), 256, 512)
    assert torch.isfinite(dx).all() and torch.isfinite(dy).all() and torch.isfinite(dscale)
    x32, y32 = x.float(), y.float()
    row32, col32 = _C.similarity_lse_forward(x32, y32, 20.0, 0.0, 0, True, 256, 512)
    with pytest.raises(RuntimeError, match="scale must be positive and finite in float32"):
        _C.similarity_lse_forward(x32, y32, scale, 0.0, 0, True, 256, 512)
    with pytest.raises(RuntimeError, match="scale must be positive and finite in float32"):
        _C.similarity_lse_backward(x32, y32, scale, 0.0, 0, row32, col32, torch.ones(40), torch.ones(48), 256, 512)


# SimCSE's hard-negative log-weight: finite as a double, inf once cast to float32 (and the
# float64 path takes it as it is).
def test_kernel_entries_check_the_diag_bias_in_their_dtype():
    x, y = embeddings(40, 16, seed=3), embeddings(80, 16, seed=4)
    row_lse, _ = _C.similarity_lse_forward(x, y, 20.0, 1e39, 40, False, 256, 512)  # float64: valid
    assert torch.isfinite(row_lse).all()
    x32, y32 = x.float(), y.float()
    row32, _ = _C.similarity_lse_forward(x32, y32, 20.0, 1.0, 40, False, 256, 512)
    for bias in (1e39, -1e39, float("nan")):
        with pytest.raises(RuntimeError, match="diag_bias must be finite in float32"):
            _C.similarity_lse_forward(x32, y32, 20.0, bias, 40, False, 256, 512)
        with pytest.raises(RuntimeError, match="diag_bias must be finite in float32"):
            _C.similarity_lse_backward(x32, y32, 20.0, bias, 40, row32, None, torch.ones(40), None, 256, 512)


def cpu_flags() -> set[str]:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    return set()


@pytest.mark.skipif(not X86 or platform.system() != "Linux", reason="reads /proc/cpuinfo")
def test_dispatch_picks_the_best_variant_by_cpu_feature():
    flags = cpu_flags()
    expected = ["baseline"]
    if {"avx2", "fma"} <= flags:
        expected.insert(0, "avx2_fma")
    if {"avx512f", "fma"} <= flags:
        expected.insert(0, "avx512")
    assert _C.supported_tile_isas() == expected
    assert _C.tile_isa() == expected[0]


def test_select_refuses_unknown_or_unsupported_variants():
    with pytest.raises(ValueError, match="unknown tile kernel variant"):
        _C.select_tile_isa("sse9")
    unsupported = sorted({"avx512", "avx2_fma"} - set(_C.supported_tile_isas()))
    for isa in unsupported:
        with pytest.raises(ValueError, match="cannot run"):
            _C.select_tile_isa(isa)


def lse_reference(x, y, scale, bias, offset, g_row, g_col):
    """Row/column logsumexps and gradients, materialising Z (any dtype)."""
    x, y, scale = (t.detach().clone().requires_grad_() for t in (x, y, scale))
    z = scale * x @ y.T
    if bias:
        rows = torch.arange(x.shape[0])
        z = z.index_put((rows, rows + offset), z[rows, rows + offset] + bias)
    row, col = torch.logsumexp(z, 1), torch.logsumexp(z, 0)
    ((row * g_row).sum() + (col * g_col).sum()).backward()
    return row.detach(), col.detach(), x.grad, y.grad, scale.grad


def lse_kernel(x, y, scale, bias, offset, g_row, g_col, with_cols=True):
    x, y, scale = (t.detach().clone().requires_grad_() for t in (x, y, scale))
    row, col = similarity_lse(x, y, scale, diag_bias=bias, diag_offset=offset, with_cols=with_cols, backend="cpu")
    loss = (row * g_row).sum() + ((col * g_col).sum() if with_cols else 0)
    loss.backward()
    return row.detach(), None if col is None else col.detach(), x.grad, y.grad, scale.grad


# Ragged sizes (not multiples of the 256 x 512 tile or of any vector width); scale 100 on
# inputs of norm up to 3 spreads each tile's maxima beyond the one-exp margin, so the exact
# two-exp paths run too.
CASES = [(300, 531, 45, 20.0, 1.0, 0.0), (77, 154, 128, 20.0, 1.0, 1.5), (260, 520, 64, 100.0, 3.0, -2.0)]


@pytest.fixture
def restore_isa():
    before = _C.tile_isa()
    yield
    _C.select_tile_isa(before)


@pytest.mark.parametrize("with_cols", [True, False], ids=["rows+cols", "rows"])  # rows alone: SimCSE's path
@pytest.mark.parametrize("n,m,d,scale,norm,bias", CASES)
def test_every_supported_variant_matches_float64(n, m, d, scale, norm, bias, with_cols, restore_isa):
    g = torch.Generator().manual_seed(n * m + d)

    def rows(count, seed):  # unit rows, or norms spread over (0, norm)
        t = embeddings(count, d, seed=seed)
        return t if norm == 1.0 else t * (norm * torch.rand(count, 1, generator=g, dtype=torch.float64))

    x, y = rows(n, n), rows(m, m)
    s = torch.tensor(scale, dtype=torch.float64)
    offset = m - n if bias else 0
    g_row, g_col = torch.rand(n, generator=g, dtype=torch.float64), torch.rand(m, generator=g, dtype=torch.float64)
    if not with_cols:
        g_col = torch.zeros_like(g_col)  # the references still compute col_lse; it gets no gradient
    exact = lse_reference(x, y, s, bias, offset, g_row, g_col)
    f32 = [t.float() for t in (x, y, s, g_row, g_col)]
    plain = lse_reference(*f32[:3], bias, offset, *f32[3:])
    for isa in _C.supported_tile_isas():
        _C.select_tile_isa(isa)
        ours = lse_kernel(*f32[:3], bias, offset, *f32[3:], with_cols=with_cols)
        assert (ours[1] is None) == (not with_cols)
        for what, a, p, e in zip(("row_lse", "col_lse", "dx", "dy", "dscale"), ours, plain, exact):
            if a is not None:
                assert_within_torch_error(a, p, e, f"{isa} {what}", floor=1e-5 * (1 + e.abs().max().item()))


def allocated_bytes(fn) -> int:
    """Bytes allocated through PyTorch's CPU allocator while fn runs (frees not subtracted,
    so a buffer allocated and freed inside the kernel still counts)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return sum(max(event.self_cpu_memory_usage, 0) for event in prof.events())


def allocated_bytes_per_thread_count(step, thread_counts) -> dict[int, int]:
    """allocated_bytes(step) at each torch thread count (forced, even above the core count),
    each after one warm-up step outside the profiler."""
    threads = torch.get_num_threads()
    try:
        allocated = {}
        for t in thread_counts:
            torch.set_num_threads(t)
            step()
            allocated[t] = allocated_bytes(step)
    finally:
        torch.set_num_threads(threads)
    return allocated


def test_allocations_do_not_grow_with_dy_copies_per_thread():
    # 8 row blocks and 8 threads (forced, even on 2 cores): a kernel giving each thread its own
    # dY accumulator would allocate 7 more copies of dY (M * d * 4 bytes each).
    n, m, d = 2048, 512, 1024
    x, y = embeddings(n, d, seed=1).float().requires_grad_(), embeddings(m, d, seed=2).float().requires_grad_()
    s = torch.tensor(20.0, requires_grad=True)

    def step():
        row, col = similarity_lse(x, y, s, backend="cpu")
        (row.sum() + col.sum()).backward()

    allocated = allocated_bytes_per_thread_count(step, (1, 8))
    one_dy = m * d * 4
    assert allocated[1] >= (n + m) * d * 4, f"the profiler missed the gradients: {allocated[1]} bytes"
    assert allocated[8] - allocated[1] < one_dy / 2, f"8 threads allocate {allocated[8] - allocated[1]} more bytes than 1"


@pytest.mark.parametrize("threads", [2, 3, 8])
def test_cell_schedule_is_bitwise_reproducible(threads):
    # The cells run as soon as their row and column predecessors are done, taken from a shared
    # counter: which thread runs which cell changes from run to run, more so with more threads
    # than cores, but each row and column must see its cells in the same order every time.
    # 1024 x 2048 with 128 x 256 tiles: 8 x 8 tiles, so every thread count here gets several
    # cells per thread (up to 4 x 4 x threads^2 / threads).
    n, m, d = 1024, 2048, 32
    x, y = embeddings(n, d, seed=11).float(), embeddings(m, d, seed=12).float()
    g = torch.Generator().manual_seed(13)
    g_row, g_col = torch.rand(n, generator=g), torch.rand(m, generator=g)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        runs = []
        for _ in range(4):
            row, col = _C.similarity_lse_forward(x, y, 20.0, 1.5, n, True, 128, 256)
            runs.append((row, col, *_C.similarity_lse_backward(x, y, 20.0, 1.5, n, row, col, g_row, g_col, 128, 256)))
    finally:
        torch.set_num_threads(before)
    for run in runs[1:]:
        for what, a, b in zip(("row_lse", "col_lse", "dx", "dy", "dscale"), runs[0], run):
            assert torch.equal(a, b), f"{threads} threads: {what} differs between two runs"
    # and they are the right values (the order is fixed, not wrong)
    exact = lse_reference(x.double(), y.double(), torch.tensor(20.0, dtype=torch.float64), 1.5, n, g_row.double(),
                          g_col.double())
    plain = lse_reference(x, y, torch.tensor(20.0), 1.5, n, g_row, g_col)
    for what, a, p, e in zip(("row_lse", "col_lse", "dx", "dy", "dscale"), runs[0], plain, exact):
        assert_within_torch_error(a, p, e, what, floor=1e-5 * (1 + e.abs().max().item()))


# Rows only (SimCSE): with a gradient to come, the kernel computes the row logsumexps and the
# gradients for unit row weights in one pass over a slab of logits (3 GEMMs, not 4), and
# backward scales them by the rows' common upstream gradient; any other upstream gradient
# takes the recompute path.
@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts the CPU kernel's calls by entry: eager (rows with gradients), forward, backward;
    the rows path with gradients is taken at every size and thread count (by default only where
    it is faster: test_rows_path_gate)."""
    calls = {"eager": 0, "forward": 0, "backward": 0}
    monkeypatch.setattr(cpu_similarity_lse, "eager_rows_pays", lambda d, m: True)

    def spy(name, fn):
        def wrapped(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapped

    for name, attr in (("eager", "forward_rows_with_gradients"), ("forward", "forward"), ("backward", "backward")):
        monkeypatch.setattr(cpu_similarity_lse, attr, spy(name, getattr(cpu_similarity_lse, attr)))
    return calls


def rows_case(n, m, d, scale, norm, seed):
    g = torch.Generator().manual_seed(seed)
    x, y = embeddings(n, d, seed=seed), embeddings(m, d, seed=seed + 1)
    if norm != 1.0:
        x = x * (norm * torch.rand(n, 1, generator=g, dtype=torch.float64))
        y = y * (norm * torch.rand(m, 1, generator=g, dtype=torch.float64))
    return x, y, torch.tensor(scale, dtype=torch.float64)


# d = 256: the branch that accumulates dY untransposed (the one the library takes, d >= 256).
@pytest.mark.parametrize("n,m,d,scale,norm,bias", CASES + [(140, 600, 256, 20.0, 1.0, 1.0)])
def test_rows_with_gradients_match_float64(n, m, d, scale, norm, bias, kernel_calls, restore_isa):
    # A common upstream gradient that is not 1 (a mean over rows times a loss weight).
    x, y, s = rows_case(n, m, d, scale, norm, seed=n + m + d)
    offset = m - n if bias else 0
    weight = 0.37
    g_row = torch.full((n,), weight, dtype=torch.float64)
    exact = lse_reference(x, y, s, bias, offset, g_row, torch.zeros(m, dtype=torch.float64))
    f32 = [t.float() for t in (x, y, s)]
    plain = lse_reference(*f32, bias, offset, g_row.float(), torch.zeros(m))
    for isa in _C.supported_tile_isas():
        _C.select_tile_isa(isa)
        before = dict(kernel_calls)
        ours = lse_kernel(*f32, bias, offset, g_row.float(), None, with_cols=False)
        assert kernel_calls["eager"] == before["eager"] + 1 and kernel_calls["backward"] == before["backward"], \
            "the rows-only loss did not take the 3-GEMM path"
        for what, a, p, e in zip(("row_lse", "col_lse", "dx", "dy", "dscale"), ours, plain, exact):
            if a is not None:
                assert_within_torch_error(a, p, e, f"{isa} {what}", floor=1e-5 * (1 + e.abs().max().item()))
    # float64 through the same path agrees with the reference to rounding.
    ours64 = lse_kernel(x, y, s, bias, offset, g_row, None, with_cols=False)
    for what, a, e in zip(("row_lse", "col_lse", "dx", "dy", "dscale"), ours64, exact):
        if a is not None:
            torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12, msg=lambda msg, what=what: f"{what}: {msg}")


@pytest.mark.parametrize("d", [40, 256], ids=["dy-transposed", "dy"])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_rows_with_gradients_slabs_and_chunks(threads, d):
    # Small slabs and chunks so that every step runs over several ragged slabs, chunks and dX
    # pieces (100 rows per slab: 64 + 36; 300 columns per chunk), the biased diagonal crossing
    # chunk borders; bitwise the same on every run at a given thread count.
    n, m = 333, 1001
    x, y, s = rows_case(n, m, d, 20.0, 1.0, seed=21)
    xf, yf = x.float(), y.float()
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        runs = [_C.similarity_lse_rows_with_gradients(xf, yf, 20.0, 1.5, m - n, 100, 300) for _ in range(3)]
    finally:
        torch.set_num_threads(before)
    for run in runs[1:]:
        for what, a, b in zip(("row_lse", "dx", "dy", "dscale"), runs[0], run):
            assert torch.equal(a, b), f"{threads} threads: {what} differs between two runs"
    ones = torch.ones(n, dtype=torch.float64)
    exact = lse_reference(x, y, s, 1.5, m - n, ones, torch.zeros(m, dtype=torch.float64))
    plain = lse_reference(xf, yf, s.float(), 1.5, m - n, ones.float(), torch.zeros(m))
    ours = runs[0]
    for what, a, p, e in zip(("row_lse", "dx", "dy", "dscale"), ours, (plain[0], *plain[2:]), (exact[0], *exact[2:])):
        assert_within_torch_error(a, p, e, what, floor=1e-5 * (1 + e.abs().max().item()))
    # float64: to rounding.
    ours64 = _C.similarity_lse_rows_with_gradients(x, y, 20.0, 1.5, m - n, 100, 300)
    for what, a, e in zip(("row_lse", "dx", "dy", "dscale"), ours64, (exact[0], *exact[2:])):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12, msg=lambda msg, what=what: f"{what}: {msg}")


def test_rows_with_uneven_upstream_gradients_recompute(kernel_calls):
    # similarity_lse is generic: rows weighed differently cannot use the unit-weight gradients,
    # and backward recomputes them (correctly) from the saved logsumexps.
    x, y, s = rows_case(120, 250, 24, 20.0, 1.0, seed=5)
    g_row = torch.rand(120, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    exact = lse_reference(x, y, s, 0.8, 130, g_row, torch.zeros(250, dtype=torch.float64))
    ours = lse_kernel(x, y, s, 0.8, 130, g_row, None, with_cols=False)
    assert kernel_calls == {"eager": 1, "forward": 0, "backward": 1}
    for what, a, e in zip(("row_lse", "col_lse", "dx", "dy", "dscale"), ours, exact):
        if a is not None:
            torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12, msg=lambda msg, what=what: f"{what}: {msg}")


def test_rows_without_a_gradient_do_no_gradient_work(kernel_calls):
    x, y, s = rows_case(50, 90, 16, 20.0, 1.0, seed=8)
    expected = lse_reference(x, y, s, 0.0, 0, torch.ones(50, dtype=torch.float64), torch.zeros(90, dtype=torch.float64))
    with torch.no_grad():
        row, _ = similarity_lse(x.requires_grad_(), y, s, with_cols=False, backend="cpu")
    row2, _ = similarity_lse(x.detach(), y, s, with_cols=False, backend="cpu")  # nothing requires grad
    assert kernel_calls == {"eager": 0, "forward": 2, "backward": 0}
    for r in (row, row2):
        torch.testing.assert_close(r, expected[0], rtol=1e-10, atol=1e-12)


def test_rows_with_gradients_retain_graph_and_double_backward(kernel_calls):
    x, y, s = rows_case(60, 130, 12, 20.0, 1.0, seed=9)
    x, y, s = (t.clone().requires_grad_() for t in (x, y, s))
    row, _, target = similarity_lse(x, y, s, with_cols=False, target_offset=0, diag_bias=0.5, diag_offset=60,
                                    backend="cpu")
    loss = (row - target).mean()
    first = torch.autograd.grad(loss, (x, y, s), retain_graph=True)
    second = torch.autograd.grad(3 * loss, (x, y, s))  # the retained gradients, not scaled in place
    for a, b in zip(first, second):
        torch.testing.assert_close(3 * a, b, rtol=1e-12, atol=1e-15)
    # A second derivative is refused, not silently wrong: scaling the unit-weight gradients by
    # an upstream gradient that itself depends on s would record only part of the graph.
    row, _ = similarity_lse(x, y, s, with_cols=False, backend="cpu")
    (gx,) = torch.autograd.grad(row.mean() * s, x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        gx.sum().backward()
    assert kernel_calls["eager"] == 2 and kernel_calls["backward"] == 0


def test_rows_path_memory_is_one_slab_whatever_the_thread_count(kernel_calls):
    # The rows path stores one slab of 256 x M logits, never N x M, and nothing per thread but
    # the tile kernels' O(512) scratch: 8 threads (forced, even on 2 cores) allocate what 1 does.
    n, m, d = 4096, 4096, 256
    x, y = embeddings(n, d, seed=3).float().requires_grad_(), embeddings(m, d, seed=4).float().requires_grad_()
    s = torch.tensor(20.0, requires_grad=True)

    def step():
        x.grad = y.grad = s.grad = None
        row, _ = similarity_lse(x, y, s, with_cols=False, backend="cpu")
        row.mean().backward()

    allocated = allocated_bytes_per_thread_count(step, (1, 8))
    assert kernel_calls["eager"] == 4 and kernel_calls["backward"] == 0
    gradients, slab = (n + m) * d * 4, cpu_similarity_lse.BLOCK_ROWS * m * 4
    # the unit-weight gradients kept by the forward, their scaled copies, the slab, O(N + M) rest
    assert 2 * gradients <= allocated[1] < 2 * gradients + slab + 2**20, f"{allocated[1]} bytes (N x M: {n * m * 4})"
    assert allocated[8] - allocated[1] < 2**16, f"8 threads allocate {allocated[8] - allocated[1]} more bytes than 1"


def test_rows_path_gate(monkeypatch):
    # Taken where it was measured faster (d >= 256, 2 threads), never where threads would idle.
    monkeypatch.setattr(cpu_similarity_lse, "_C", _C)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert cpu_similarity_lse.eager_rows_pays(512, 16384) and cpu_similarity_lse.eager_rows_pays(256, 1024)
        assert not cpu_similarity_lse.eager_rows_pays(128, 16384)  # the exps and the slab's traffic weigh more
        assert not cpu_similarity_lse.eager_rows_pays(512, 512)  # one chunk: one thread would idle
        torch.set_num_threads(8)
        assert not cpu_similarity_lse.eager_rows_pays(512, 16384)  # dX in 4 tasks per slab
    finally:
        torch.set_num_threads(before)
    monkeypatch.setattr(cpu_similarity_lse, "_C", object())  # an extension built before the entry
    assert not cpu_similarity_lse.eager_rows_pays(512, 16384)
