"""The Triton backend of similarity_lse against plain float64 PyTorch.

Without a GPU the kernels run on CPU tensors in Triton's interpreter (TRITON_INTERPRET=1,
which must be set before xfast's kernel module is imported); a last test compiles them for
real sm_80/sm_90 GPUs with Triton's compiler and ptxas.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import contextlib  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import xfast  # noqa: E402
from tests.loss_cases import assert_close64, assert_within_torch_error, embeddings, leaf  # noqa: E402
from xfast import reference  # noqa: E402
from xfast.kernels import triton_similarity_lse as triton_kernel  # noqa: E402
from xfast.ops.similarity_lse import similarity_lse  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() and not triton_kernel._INTERPRETED else "cpu")
pytestmark = pytest.mark.skipif(triton_kernel.unavailable_reason(DEVICE) is not None,
                                reason=str(triton_kernel.unavailable_reason(DEVICE)))
OUTPUTS = ("row_lse", "col_lse", "dx", "dy", "dscale")


def torch_lse_grads(x, y, s, *, diag_bias=0.0, diag_offset=0, grad_row=None, grad_col=None):
    """Plain PyTorch in x's dtype: materialise Z, torch.logsumexp, autograd."""
    x, y, s = leaf(x), leaf(y), leaf(s)
    z = s * (x @ y.T)
    if diag_bias:
        rows = torch.arange(x.shape[0], device=x.device)
        bias = torch.zeros_like(z)
        bias[rows, rows + diag_offset] = diag_bias
        z = z + bias
    row_lse, col_lse = torch.logsumexp(z, 1), torch.logsumexp(z, 0)
    loss = z.new_zeros(())
    if grad_row is not None:
        loss = loss + (row_lse * grad_row.to(z.dtype)).sum()
    if grad_col is not None:
        loss = loss + (col_lse * grad_col.to(z.dtype)).sum()
    loss.backward()
    return row_lse.detach(), col_lse.detach(), x.grad, y.grad, s.grad


def triton_lse_grads(x, y, s, *, diag_bias=0.0, diag_offset=0, grad_row=None, grad_col=None, with_cols=True):
    """The kernel contract: forward, then backward from the saved logsumexps."""
    row_lse, col_lse = triton_kernel.forward(x, y, s, diag_bias, diag_offset, with_cols)
    dx, dy, dscale = triton_kernel.backward(x, y, s, diag_bias, diag_offset, row_lse, col_lse, grad_row, grad_col)
    return row_lse, col_lse, dx, dy, dscale


def inputs(n, m, d, *, dtype=torch.float32, norm=1.0, scale=14.0, seed=0):
    x = embeddings(n, d, scale=norm, seed=seed).to(DEVICE, dtype)
    y = embeddings(m, d, scale=norm, seed=seed + 1).to(DEVICE, dtype)
    g = torch.Generator().manual_seed(seed + 2)
    grad_row = torch.randn(n, generator=g, dtype=torch.float64).to(DEVICE)
    grad_col = torch.randn(m, generator=g, dtype=torch.float64).to(DEVICE)
    return x, y, torch.tensor(scale, dtype=torch.float64, device=DEVICE), grad_row, grad_col


def check_against_float64(x, y, s, *, floor_rel=1e-6, **kw):
    """float64 inputs: agree with the float64 reference to rounding. Others: error vs float64
    at most twice that of plain torch in the same precision (flash-attention's rule)."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    with_cols = kw.pop("with_cols", True)
    ours = triton_lse_grads(x, y, s.to(acc), with_cols=with_cols, **kw)
    exact = torch_lse_grads(x.double(), y.double(), s.double(), **kw)
    plain = torch_lse_grads(x, y, s.to(x.dtype), **kw) if x.dtype != torch.float64 else None
    for i, (what, a, e) in enumerate(zip(OUTPUTS, ours, exact)):
        if what == "col_lse" and not with_cols:
            assert a is None
            continue
        assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} vs {tuple(e.shape)}"
        assert torch.isfinite(a).all(), f"{what} is not finite"
        if what in ("dx", "dy"):
            assert a.dtype == x.dtype, f"{what} has dtype {a.dtype}"
        if plain is None:
            assert_close64(a, e, what, rtol=1e-10, atol=1e-10 * (1 + e.abs().max().item()))
        else:
            floor = floor_rel * (1 + e.abs().max().item())
            if what == "dscale":
                floor = max(floor, dscale_rounding_floor(x, y, s, **kw))
            assert_within_torch_error(a, plain[i], e, what, floor=floor)


def dscale_rounding_floor(x, y, s, *, diag_bias=0.0, diag_offset=0, grad_row=None, grad_col=None):
    """dscale = sum_ij dZ_ij S_ij inherits the rounding of every S_ij = x_i . y_j, which in
    x's precision is up to ~sqrt(d) u |x_i| |y_j| (a random walk over d products): its floor is
    sqrt(d) u sum_ij |dZ_ij| |x_i| |y_j|, with dZ from float64. (Plain torch can land far below
    it when its errors happen to cancel; no summation order is owed that luck.)"""
    xd, yd = x.double(), y.double()
    z = s.double() * xd @ yd.T
    if diag_bias:
        rows = torch.arange(x.shape[0], device=x.device)
        z[rows, rows + diag_offset] += diag_bias
    dz = torch.zeros_like(z)
    if grad_row is not None:
        dz += grad_row.double()[:, None] * torch.softmax(z, 1)
    if grad_col is not None:
        dz += grad_col.double()[None, :] * torch.softmax(z, 0)
    u = torch.finfo(x.dtype).eps / 2
    return u * x.shape[1] ** 0.5 * (dz.abs() * xd.norm(dim=1)[:, None] * yd.norm(dim=1)[None, :]).sum().item()


# Ragged everywhere; 40 x 70 x 150 takes two d slices in fp32 and fp64.
SIZES = [(1, 1, 3), (7, 7, 45), (64, 64, 128), (50, 150, 45), (40, 70, 150)]


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("n,m,d", SIZES, ids=[f"{n}x{m}x{d}" for n, m, d in SIZES])
def test_ragged_sizes_both_directions(n, m, d, dtype):
    x, y, s, g_row, g_col = inputs(n, m, d, dtype=dtype, seed=n + m + d)
    check_against_float64(x, y, s, grad_row=g_row, grad_col=g_col)


@pytest.mark.slow
@pytest.mark.parametrize("grads", ["row", "col", "both"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_gradient_terms_independently(grads, dtype):
    x, y, s, g_row, g_col = inputs(70, 90, 45, dtype=dtype, norm=3.0, scale=100.0, seed=5)
    check_against_float64(x, y, s, grad_row=g_row if grads != "col" else None,
                          grad_col=g_col if grads != "row" else None)


@pytest.mark.slow
@pytest.mark.parametrize("with_cols", [True, False], ids=["cols", "rows_only"])
@pytest.mark.parametrize("offset", ["0", "N"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_diagonal_bias(offset, with_cols, dtype):
    # offset N: SimCSE's layout, y = [positives | hard negatives] and anchor i's hard negative at N + i.
    n, d = 50, 45
    m = n if offset == "0" else 2 * n
    x, y, s, g_row, g_col = inputs(n, m, d, dtype=dtype, norm=2.0, scale=20.0, seed=9)
    check_against_float64(x, y, s, diag_bias=1.7, diag_offset=0 if offset == "0" else n, grad_row=g_row,
                          grad_col=g_col if with_cols else None, with_cols=with_cols)


def test_without_cols_returns_none():
    x, y, s, _, _ = inputs(5, 9, 16)
    row_lse, col_lse = triton_kernel.forward(x, y, s.float(), 0.0, 0, False)
    assert col_lse is None and row_lse.shape == (5,) and row_lse.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("n,m,d", [(64, 96, 128), (50, 40, 300)], ids=["64x96x128", "50x40x300"])
def test_low_precision_error_within_twice_torch(n, m, d, dtype):
    x, y, s, g_row, g_col = inputs(n, m, d, dtype=dtype, scale=30.0, seed=d)
    # Gradients of a mean over the batch, as the losses produce them.
    check_against_float64(x, y, s, floor_rel=1e-5, grad_row=g_row.abs() / n, grad_col=g_col.abs() / m)


def test_no_overflow_when_naive_exp_would():
    x, y, s, g_row, g_col = inputs(40, 24, 32, norm=10.0, scale=100.0, seed=3)
    assert torch.isinf(torch.exp(s.float() * x @ y.T)).any()
    check_against_float64(x, y, s, grad_row=g_row, grad_col=g_col)


@pytest.mark.slow
def test_non_contiguous_inputs():
    x, y, s, g_row, g_col = inputs(80, 48, 64, seed=4)
    x_t = x.T.contiguous().T                          # column-major
    y_strided = torch.stack([y, -y], dim=2)[:, :, 0]  # stride 2 along d
    assert not x_t.is_contiguous() and not y_strided.is_contiguous()
    ours = triton_lse_grads(x_t, y_strided, s.float(), grad_row=g_row.float(), grad_col=g_col.float())
    dense = triton_lse_grads(x, y, s.float(), grad_row=g_row.float(), grad_col=g_col.float())
    for what, a, b in zip(OUTPUTS, ours, dense):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=lambda m, what=what: f"{what}: {m}")


def test_autograd_through_similarity_lse():
    x, y, s, g_row, g_col = inputs(33, 65, 40, dtype=torch.float64, scale=10.0, seed=6)
    x, y, s = leaf(x), leaf(y), leaf(s)
    row_lse, col_lse = similarity_lse(x, y, s, diag_bias=0.5, diag_offset=3, backend="triton")
    ((row_lse * g_row).sum() + (col_lse * g_col).sum()).backward()
    z = s.detach() * x.detach() @ y.detach().T
    rows = torch.arange(33, device=DEVICE)
    z[rows, rows + 3] += 0.5
    exact = torch_lse_grads(x.detach(), y.detach(), s.detach(), diag_bias=0.5, diag_offset=3,
                            grad_row=g_row, grad_col=g_col)
    for what, a, e in zip(OUTPUTS, (row_lse, col_lse, x.grad, y.grad, s.grad), exact):
        assert_close64(a, e, what)
    assert_close64(row_lse, torch.logsumexp(z, 1), "row_lse vs explicit logits")


# End to end: the losses with backend="triton" against backend="reference", float64.

@pytest.mark.slow
@pytest.mark.parametrize("n,d,label_smoothing", [(1, 3, 0.0), (7, 45, 0.1), (64, 128, 0.0), (100, 45, 0.2)])
def test_clip_loss_end_to_end(n, d, label_smoothing):
    x = embeddings(n, d, normalised=False, scale=2.0, seed=n).to(DEVICE)
    y = embeddings(n, d, normalised=False, scale=2.0, seed=n + 1).to(DEVICE)
    results = []
    for backend in ("triton", "reference"):
        xl, yl, sl = leaf(x), leaf(y), torch.tensor([30.0], dtype=torch.float64, device=DEVICE, requires_grad=True)
        loss = xfast.clip_loss(xl, yl, sl, label_smoothing=label_smoothing, backend=backend)
        loss.backward()
        results.append((loss.detach(), xl.grad, yl.grad, sl.grad))
    for what, a, e in zip(("loss", "dx", "dy", "dlogit_scale"), *results):
        assert_close64(a, e, what)


@pytest.mark.slow
@pytest.mark.parametrize("n,d,weight", [(1, 3, 0.0), (7, 45, 0.0), (16, 64, 0.0), (16, 64, 1.5), (50, 128, -2.0)])
def test_simcse_loss_end_to_end(n, d, weight):
    z1 = embeddings(n, d, normalised=False, scale=3.0, seed=d).to(DEVICE)
    z2 = embeddings(n, d, normalised=False, scale=3.0, seed=d + 1).to(DEVICE)
    hard = embeddings(n, d, normalised=False, scale=3.0, seed=d + 2).to(DEVICE) if n > 1 or weight else None
    results = []
    for backend in ("triton", "reference"):
        a, p, tau = leaf(z1), leaf(z2), torch.tensor(0.05, dtype=torch.float64, device=DEVICE, requires_grad=True)
        h = None if hard is None else leaf(hard)
        loss = xfast.simcse_loss(a, p, h, temperature=tau, hard_negative_weight=weight, backend=backend)
        loss.backward()
        results.append((loss.detach(), a.grad, p.grad, tau.grad) + (() if h is None else (h.grad,)))
    for what, a, e in zip(("loss", "dz1", "dz2", "dtemperature", "dhard_negatives"), *results):
        assert_close64(a, e, what)


def test_low_precision_clip_loss_end_to_end():
    n, d = 48, 64
    x = embeddings(n, d, seed=21).to(DEVICE, torch.bfloat16)
    y = embeddings(n, d, seed=22).to(DEVICE, torch.bfloat16)

    def run(fn, xx, yy, s, **kw):
        xx, yy, s = leaf(xx), leaf(yy), leaf(s)
        loss = fn(xx, yy, s, **kw)
        loss.backward()
        return loss.detach(), xx.grad, yy.grad, s.grad

    s = torch.tensor(50.0, device=DEVICE)
    ours = run(xfast.clip_loss, x, y, s, backend="triton")
    plain = run(reference.clip_loss, x, y, s.to(torch.bfloat16))
    exact = run(reference.clip_loss, x.double(), y.double(), s.double())
    for what, a, p, e in zip(("loss", "dx", "dy", "dlogit_scale"), ours, plain, exact):
        assert_within_torch_error(a, p, e, what, floor=1e-5 * (1 + e.abs().max().item()))


# Availability and bad input.

def test_unavailable_reason_reads_the_environment_at_call_time(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    reason = triton_kernel.unavailable_reason(cpu)
    assert reason is not None and "needs CUDA tensors (got cpu)" in reason and "TRITON_INTERPRET=1" in reason
    monkeypatch.delenv("TRITON_INTERPRET")
    assert triton_kernel.unavailable_reason(cpu) == reason
    with pytest.raises(RuntimeError, match="backend 'triton' is unavailable: backend 'triton' needs CUDA"):
        xfast.clip_loss(torch.randn(4, 3), torch.randn(4, 3), 10.0, backend="triton")
    assert "needs CUDA tensors (got meta)" in triton_kernel.unavailable_reason(torch.device("meta"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert triton_kernel.unavailable_reason(cpu) is None


def test_interpreter_switched_on_after_import_is_reported(monkeypatch):
    monkeypatch.setattr(triton_kernel, "_INTERPRETED", False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert "set after" in triton_kernel.unavailable_reason(torch.device("cpu"))


@pytest.mark.parametrize("args,message", [
    (lambda x, y, s: (x, y[:, :-1], s), "must be \\[N, d\\], \\[M, d\\]"),
    (lambda x, y, s: (x, y.double(), s), "must share a float dtype"),
    (lambda x, y, s: (x.long(), y.long(), s), "must share a float dtype"),
    (lambda x, y, s: (x[:0], y, s), "must be non-empty"),
    (lambda x, y, s: (x, y, s.to("meta")), "must be on one device"),
    (lambda x, y, s: (x, y, s.repeat(2)), "scale must hold one value"),
])
def test_bad_input_is_named(args, message):
    x, y, s = torch.randn(4, 3, device=DEVICE), torch.randn(5, 3, device=DEVICE), torch.tensor(2.0, device=DEVICE)
    with pytest.raises(ValueError, match=message):
        triton_kernel.forward(*args(x, y, s), 0.0, 0, True)


def test_grad_col_needs_col_lse():
    x, y, s, g_row, g_col = inputs(4, 5, 3)
    row_lse, _ = triton_kernel.forward(x, y, s.float(), 0.0, 0, False)
    with pytest.raises(ValueError, match="grad_col needs col_lse"):
        triton_kernel.backward(x, y, s.float(), 0.0, 0, row_lse, None, None, g_col.float())


@pytest.mark.skipif(DEVICE.type != "cuda", reason="host synchronisation is only observable on CUDA")
def test_no_host_sync_on_cuda():
    x, y, s, g_row, g_col = inputs(300, 200, 64, seed=8)
    s, g_row, g_col = s.float(), g_row.float(), g_col.float()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        triton_lse_grads(x, y, s, diag_bias=0.5, diag_offset=0, grad_row=g_row, grad_col=g_col)
    finally:
        torch.cuda.set_sync_debug_mode("default")


# Triton's real compiler (with its bundled ptxas) needs no GPU: tests/triton_compile_report.py
# compiles every kernel variant for Ampere and Hopper as the JIT specialises full tiles, and
# runs ptxas -v on the PTX. One process per arch compiles every case; both archs compile at
# the same time (ptxas is single-threaded, the imports cost seconds per process).
COMPILE_CASES = [("bf16", 512), ("bf16", 1024), ("fp16", 128), ("tf32", 512), ("fp32", 512), ("fp64", 128)]
COMPILE_ARCHS = (80, 90)


@pytest.fixture(scope="module")
def compiles():
    """arch -> the report script's process, started for every arch at once on first use."""
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    script = os.path.join(os.path.dirname(__file__), "triton_compile_report.py")
    cases = [f"{dtype}:{d}" for dtype, d in COMPILE_CASES]
    processes = {arch: subprocess.Popen([sys.executable, script, "--arch", str(arch), "--case", *cases], env=env,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for arch in COMPILE_ARCHS}
    yield processes
    for process in processes.values():
        if process.poll() is None:
            process.kill()
            process.communicate()


@pytest.mark.slow  # ~12 compiles per arch: about a minute on 2 cores
@pytest.mark.parametrize("arch", COMPILE_ARCHS)
def test_kernels_compile_without_spills_on_tensor_cores(arch, compiles):
    stdout, stderr = compiles[arch].communicate(timeout=900)
    assert compiles[arch].returncode == 0, stderr[-3000:]
    reports = [json.loads(line) for line in stdout.splitlines()]
    assert len(reports) == 2 * len(COMPILE_CASES)
    for r in reports:
        where = f"sm_{arch} {r['dtype']} d={r['d']} {r['kernel']}"
        assert r["spill_bytes"] == 0, f"{where}: {r['spill_bytes']} bytes of register spills ({r['registers']} registers)"
        assert r["shared"] <= SHARED_LIMIT[arch], f"{where}: {r['shared']} bytes of shared memory"
        if r["dtype"] in ("bf16", "fp16", "tf32"):
            # Every tt.dot must be lowered to tensor cores: none left on the FMA units.
            assert r["fma_dots"] == 0 and r["mma_dots"] > 0, f"{where}: dots not on tensor cores: {r}"
            if arch == 90 and r["kernel"] == "backward" and r["dtype"] != "tf32":
                # Hopper's backward tiles are shaped for wgmma (64-row dY operand).
                assert r["wgmma"] > 0, f"{where}: no wgmma in the PTX"
            assert r["mma_sync"] + r["wgmma"] > 0, f"{where}: no MMA instruction in the PTX"


SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}  # opt-in maximum per block


def test_module_imports_without_triton(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)
    monkeypatch.setitem(sys.modules, "triton.language", None)
    spec = importlib.util.spec_from_file_location("triton_similarity_lse_without_triton", triton_kernel.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert "triton is not importable" in module.unavailable_reason(torch.device("cuda"))


# What the kernels execute, counted under the interpreter: properties, not timings.

@contextlib.contextmanager
def counting(op):
    """Counts what the interpreter's builder op `create_<op>` processes: for dot the FLOPs
    (2 m n k per call), for elementwise ops a list of argument shapes."""
    from triton.runtime import interpreter
    original = getattr(interpreter.InterpreterBuilder, f"create_{op}")
    seen = {"flops": 0, "shapes": []}

    def counted(self, a, *args):
        if op == "dot":
            b = args[0]
            seen["flops"] += 2 * a.data.shape[-2] * a.data.shape[-1] * b.data.shape[-1]
        else:
            seen["shapes"].append(a.data.shape)
        return original(self, a, *args)

    setattr(interpreter.InterpreterBuilder, f"create_{op}", counted)
    try:
        yield seen
    finally:
        setattr(interpreter.InterpreterBuilder, f"create_{op}", original)


def run_loss(loss, dtype, n, d):
    """fwd + bwd of clip (N x N) or SimCSE with hard negatives (N x 2N) on the triton backend."""
    xs = [leaf(embeddings(n, d, seed=d + k).to(DEVICE, dtype)) for k in range(3)]
    if loss == "clip":
        xs = xs[:2]
        out = xfast.clip_loss(xs[0], xs[1], torch.tensor(20.0, device=DEVICE), backend="triton")
        m = n
    else:
        out = xfast.simcse_loss(xs[0], xs[1], xs[2], temperature=0.05, hard_negative_weight=0.5, backend="triton")
        m = 2 * n
    out.backward()
    return m, xs


# GEMM-equivalents (one = 2 N M d FLOPs) of fwd + bwd at full tiles: 4 while one d slice holds
# the dY accumulator, 5 past that (two slices each recompute S), never more.
GEMMS = {"bf16": {128: 4, 512: 4, 1024: 5}, "tf32": {128: 4, 512: 4, 1024: 5}, "fp32": {128: 4, 512: 5, 1024: 5}}


@pytest.mark.slow
@pytest.mark.parametrize("d", [128, 512, 1024])
@pytest.mark.parametrize("dtype", ["bf16", "tf32", "fp32"])
@pytest.mark.parametrize("loss", ["clip", "simcse_hard_negatives"])
def test_gemm_equivalents_executed(loss, dtype, d):
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if dtype == "tf32" else "highest")
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    try:
        blocks = triton_kernel.blocks_for(torch_dtype, d)
        n = max(blocks.n, blocks.m)  # full tiles in both directions
        with counting("dot") as seen:
            m, xs = run_loss(loss, torch_dtype, n, d)
    finally:
        torch.set_float32_matmul_precision(precision)
    assert all(x.grad.dtype == xs[0].dtype for x in xs)
    assert seen["flops"] == GEMMS[dtype][d] * 2 * n * m * d, seen["flops"] / (2 * n * m * d)


def tile_exps(shapes, blocks):
    return sum(n * m for n, m in (s for s in shapes if len(s) == 2) if (n, m) == (blocks.n, blocks.m))


@pytest.mark.parametrize("scale,per_logit", [(10.0, 2), (2000.0, 4)], ids=["within_margin", "wide_logits"])
def test_exps_per_logit(scale, per_logit):
    """One exp per logit in the forward and one in the backward while the tile's logits (and
    logsumexps) lie within the margin; the exact two-exp path otherwise."""
    n, m, d = 64, 128, 32
    x, y, s, g_row, g_col = inputs(n, m, d, scale=scale, seed=11)
    s = s.float()
    with counting("exp2") as seen:
        triton_lse_grads(x, y, s, grad_row=g_row.float(), grad_col=g_col.float())
    assert tile_exps(seen["shapes"], triton_kernel.blocks_for(x.dtype, d)) == per_logit * n * m


@pytest.mark.slow
def test_bitwise_reproducible_and_independent_of_the_split():
    x, y, s, g_row, g_col = inputs(70, 90, 40, seed=12)
    s, g_row, g_col = s.float(), g_row.float(), g_col.float()

    def run(programs):
        r, c = triton_kernel.forward(x, y, s, 0.5, 3, True, programs=programs)
        return (r, c) + triton_kernel.backward(x, y, s, 0.5, 3, r, c, g_row, g_col, programs=programs)

    first, again, single = run(7), run(7), run(1)
    plan = triton_kernel.plan_for(70, 90, 40, torch.float32, 7)
    assert plan.fwd_row_groups * plan.fwd_col_groups > 1 and plan.bwd_row_groups > 1
    for what, a, b, c in zip(OUTPUTS, first, again, single):
        assert torch.equal(a, b), f"{what} differs between two identical launches"
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5, msg=lambda m, what=what: f"{what}: {m}")


def test_grid_fills_the_gpu_at_small_n():
    """allgather mode at 4 ranks of 1024 rows: the GPU (132 SMs, 2 programs each) is filled."""
    programs = 264
    for dtype, d in [(torch.bfloat16, 512), (torch.bfloat16, 1024), (torch.float32, 512)]:
        plan = triton_kernel.plan_for(1024, 4096, d, dtype, programs)
        assert plan.fwd_row_groups * plan.fwd_col_groups >= programs // 2, plan
        assert plan.col_blocks * plan.dv_slices * plan.bwd_row_groups >= programs // 2, plan


def test_extra_memory_is_linear_in_n_and_bounded_at_a_million():
    """No buffer grows like N*M: at N = M = 2^20, d = 512 (bf16) the kernels' extra memory is
    the fp32 dX buffer plus O(programs (N + M)) parts; doubling N doubles it."""
    programs = 264
    sizes = {}
    for n in (2**19, 2**20):
        plan = triton_kernel.plan_for(n, n, 512, torch.bfloat16, programs)
        sizes[n] = plan.extra_bytes(n, n, 512, torch.bfloat16)
        parts = sizes[n]["row_part"] + sizes[n]["col_part"]
        assert parts <= 4 * programs * 2 * n
    total = {n: sum(b.values()) for n, b in sizes.items()}
    assert total[2**20] <= 2.01 * total[2**19]
    assert total[2**20] < 4 * 2**30  # 2 GiB of dX buffer + 0.5 GiB of parts


@pytest.mark.slow
def test_64bit_offsets_when_a_stride_needs_them():
    blocks = triton_kernel.blocks_for(torch.bfloat16, 512)
    million = torch.empty((2**20, 512), dtype=torch.bfloat16, device="meta")
    assert not triton_kernel._needs_int64(blocks, million, million)
    wide = torch.empty((4, 512), dtype=torch.bfloat16, device="meta").as_strided((4, 512), (2**26, 1))
    assert triton_kernel._needs_int64(blocks, million, wide)
    # The INT64 specialisation computes the same results.
    x, y, s, g_row, g_col = inputs(40, 70, 24, seed=13)
    s, g_row, g_col = s.float(), g_row.float(), g_col.float()
    outs = []
    for force in (False, True):
        r, c = triton_kernel.forward(x, y, s, 0.0, 0, True, force_int64=force)
        outs.append((r, c) + triton_kernel.backward(x, y, s, 0.0, 0, r, c, g_row, g_col, force_int64=force))
    for what, a, b in zip(OUTPUTS, *outs):
        assert torch.equal(a, b), what
