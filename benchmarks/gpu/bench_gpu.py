"""xfast's Triton CLIP loss on a GPU, side by side with Inf-CL, open_clip and the cuBLAS floor.

    python3 benchmarks/gpu/bench_gpu.py RESULTS_DIR [--dry-run] [--budget-s 420]

(benchmarks/gpu/run.sh wraps it; see the README's "GPU benchmark" section.)

1. Correctness on the device: clip_loss and simcse_loss (hard negatives) with
   backend="triton" against the float64 reference, ragged sizes, bf16 and fp32; error vs
   float64 within twice plain PyTorch's in the same precision (flash-attention's rule), and
   two identical launches bitwise equal.
2. Forward + backward time (median of CUDA-event timed runs) and peak extra memory for
   N in {16k, 64k, 256k}, d in {512, 1024}, bf16 and fp32 with TF32 allowed, of
     xfast       xfast.clip_loss(backend="triton")
     inf_cl      Inf-CL's cal_inf_loss in both directions (the symmetric loss), from the
                 wheel in .gpu_carry/ (it computes in fp32/TF32 whatever the input dtype)
     open_clip   open_clip's ClipLoss (materialises the N x N logits), from the loss.py
                 extracted into .gpu_carry/
     floor       cuBLAS: the 4 GEMMs of the same shapes (S = X Y^T, again in the backward,
                 dS Y, dS^T X) in row chunks of <= 16k, so that it fits at any N
   A cell that cannot fit in device memory, a missing peer, or the time budget running out
   is reported as skipped, with the reason.
Writes RESULTS_DIR/{results.csv, results.md, correctness.json, environment.json}.

--dry-run runs all of it on CPU under TRITON_INTERPRET=1 at toy sizes (the kernels in
Triton's interpreter, Inf-CL skipped as it needs CUDA, times meaningless), so the script is
known to work before a GPU is at hand.
"""
from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path

DRY_RUN = "--dry-run" in sys.argv
if DRY_RUN:  # must precede the import of xfast's kernels
    os.environ["TRITON_INTERPRET"] = "1"

REPO = Path(__file__).resolve().parents[2]
CARRY = REPO / ".gpu_carry"
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

import xfast  # noqa: E402
from xfast import reference  # noqa: E402

SIZES = [16384, 65536, 262144]
DIMS = [512, 1024]
DRY_SIZES, DRY_DIMS = [64, 96], [32, 64]
DTYPES = {"bf16": torch.bfloat16, "tf32": torch.float32}
METHODS = ["xfast", "inf_cl", "open_clip", "floor"]
FLOOR_CHUNK = 16384


def load_peers() -> dict:
    """Inf-CL and open_clip's loss module from .gpu_carry/, or the reason they are missing."""
    peers = {}
    site = CARRY / "site"
    if site.is_dir() and str(site) not in sys.path:
        sys.path.insert(0, str(site))
    try:
        from inf_cl import cal_inf_loss
        peers["inf_cl"] = cal_inf_loss
    except Exception as err:  # noqa: BLE001 - any failure means the peer is unavailable
        peers["inf_cl"] = f"Inf-CL unavailable ({type(err).__name__}: {err}); see benchmarks/gpu/run.sh"
    loss_py = CARRY / "open_clip_loss.py"
    if loss_py.is_file():
        spec = importlib.util.spec_from_file_location("open_clip_loss", loss_py)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        peers["open_clip"] = module.ClipLoss
    else:
        peers["open_clip"] = f"open_clip's loss.py not found at {loss_py}; see benchmarks/gpu/run.sh"
    return peers


def make_inputs(n: int, d: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1).to(device, dtype)
    y = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1).to(device, dtype)
    s = torch.tensor(30.0, device=device)
    return x.requires_grad_(), y.requires_grad_(), s.requires_grad_()


def grads_of(loss_fn, x, y, s):
    """Forward + backward without accumulating into .grad."""
    loss = loss_fn(x, y, s)
    return (loss,) + torch.autograd.grad(loss, (x, y, s))


def step_fn(method: str, peers: dict, x, y, s):
    """A callable running one forward + backward of `method`, or a skip reason."""
    if method == "xfast":
        return lambda: grads_of(lambda a, b, c: xfast.clip_loss(a, b, c, backend="triton"), x, y, s)
    if method == "inf_cl":
        peer = peers["inf_cl"]
        if isinstance(peer, str):
            return peer
        if x.device.type != "cuda":
            return "needs CUDA (Inf-CL's Triton kernels; not in a dry run)"
        head_dim = 256 if x.shape[1] % 256 == 0 else x.shape[1]
        return lambda: grads_of(lambda a, b, c: (peer(a, b, scale=c, head_dim=head_dim)
                                                 + peer(b, a, scale=c, head_dim=head_dim)) / 2, x, y, s)
    if method == "open_clip":
        peer = peers["open_clip"]
        if isinstance(peer, str):
            return peer
        loss = peer()
        return lambda: grads_of(lambda a, b, c: loss(a, b, c), x, y, s)
    if method == "floor":
        return lambda: gemm_floor(x.detach(), y.detach())
    raise ValueError(method)


def gemm_floor(x, y):
    """The four GEMMs of a recompute-in-backward loss, in row chunks (same FLOPs at any N)."""
    dx = torch.empty_like(x)
    dy = torch.zeros_like(y)
    for r in range(0, x.shape[0], FLOOR_CHUNK):
        xc = x[r:r + FLOOR_CHUNK]
        xc @ y.T                       # forward S
        s = xc @ y.T                   # backward recomputes S; dS stands in for it
        torch.mm(s, y, out=dx[r:r + FLOOR_CHUNK])
        dy.addmm_(s.T, xc)
    return dx, dy


def fits(method: str, n: int, d: int, dtype: torch.dtype, device: torch.device) -> str | None:
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    elem = torch.finfo(dtype).bits // 8
    need = {"xfast": 8 * n * d * 4, "inf_cl": 12 * n * d * 4,
            # logits, their softmax for each direction and the gradient, fp32 inside cross_entropy
            "open_clip": 4 * n * n * max(elem, 4) + 8 * n * d * 4,
            "floor": 2 * FLOOR_CHUNK * n * elem + 4 * n * d * 4}[method]
    if need > 0.9 * free:
        return f"needs ~{need / 2**30:.0f} GiB, {free / 2**30:.0f} GiB free"
    return None


def time_it(fn, device: torch.device, repeat: int) -> float:
    """Median seconds of `repeat` runs after one warm-up (which also compiles)."""
    fn()
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def peak_extra_bytes(fn, device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    torch.cuda.synchronize(device)
    del out
    return torch.cuda.max_memory_allocated(device) - base


def check_correctness(device: torch.device) -> list[dict]:
    """backend="triton" vs float64 on the device, with plain torch's error as the yardstick."""
    rows = []
    cases = [(100, 48), (1000, 512), (777, 1024)] if not DRY_RUN else [(50, 48), (64, 32)]
    for dtype_name, dtype in [("bf16", torch.bfloat16), ("fp32", torch.float32)]:
        for n, d in cases:
            for loss_name in ("clip", "simcse_hard_negatives"):
                g = torch.Generator().manual_seed(n + d)
                t = [torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
                     for _ in range(3)]

                def run(fn, ts, scale, loss_name=loss_name):
                    ts = [a.detach().clone().requires_grad_() for a in ts]
                    sc = scale.detach().clone().requires_grad_()
                    if loss_name == "clip":
                        loss = fn["clip"](ts[0], ts[1], sc)
                        ts = ts[:2]
                    else:
                        loss = fn["simcse"](ts[0], ts[1], ts[2], sc)
                    grads = torch.autograd.grad(loss, ts + [sc])
                    return [loss.detach()] + [gr.detach() for gr in grads]

                fused = {"clip": lambda a, b, c: xfast.clip_loss(a, b, c, backend="triton"),
                         "simcse": lambda a, b, h, c: xfast.simcse_loss(a, b, h, temperature=c, hard_negative_weight=0.5,
                                                                        backend="triton")}
                plain = {"clip": lambda a, b, c: reference.clip_loss(a, b, c),
                         "simcse": lambda a, b, h, c: reference.simcse_loss(a, b, h, temperature=c,
                                                                            hard_negative_weight=0.5)}
                scale = torch.tensor(30.0 if loss_name == "clip" else 0.05)
                on = [a.to(device, dtype) for a in t]
                ours = run(fused, on, scale.to(device))
                again = run(fused, on, scale.to(device))
                torch_same = run(plain, on, scale.to(device, dtype))
                exact = run(plain, [a.to(device) for a in t], scale.to(device, torch.float64))
                names = ["loss", "d_first", "d_second", "d_hard"][:len(ours) - 1] + ["d_scale"]
                for what, a, b, p, e in zip(names, ours, again, torch_same, exact):
                    err = (a.double() - e).abs().max().item()
                    torch_err = (p.double() - e).abs().max().item()
                    floor = 1e-5 * (1 + e.abs().max().item())
                    rows.append(dict(loss=loss_name, dtype=dtype_name, n=n, d=d, output=what, err=err,
                                     torch_err=torch_err, ok=err <= 2 * torch_err + floor,
                                     bitwise_reproducible=bool(torch.equal(a, b))))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, help="folder to write results.csv/.md, correctness.json into")
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU, TRITON_INTERPRET=1, toy sizes: proves the script runs end to end")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="stop timing new cells after this many seconds (default 420)")
    parser.add_argument("--sizes", type=int, nargs="+", help="batch sizes N (default 16k 64k 256k)")
    parser.add_argument("--dims", type=int, nargs="+", help="embedding sizes d (default 512 1024)")
    args = parser.parse_args()
    started = time.monotonic()
    device = torch.device("cpu" if args.dry_run else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --dry-run to check the script on CPU", file=sys.stderr)
        return 2
    args.results.mkdir(parents=True, exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = True  # fp32 cells are "fp32 with TF32 allowed"
    torch.set_float32_matmul_precision("high")
    import triton
    env = dict(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), torch=torch.__version__,
               triton=triton.__version__, dry_run=args.dry_run,
               device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (Triton interpreter)")
    (args.results / "environment.json").write_text(json.dumps(env, indent=1))
    print(json.dumps(env))

    torch.set_float32_matmul_precision("highest")  # correctness of exact fp32 first
    rows = check_correctness(device)
    torch.set_float32_matmul_precision("high")
    (args.results / "correctness.json").write_text(json.dumps(rows, indent=1))
    bad = [r for r in rows if not (r["ok"] and r["bitwise_reproducible"])]
    print(f"correctness: {len(rows) - len(bad)}/{len(rows)} outputs within 2x plain torch's error and reproducible")
    for r in bad:
        print("  FAILED", r)

    peers = load_peers()
    sizes = args.sizes or (DRY_SIZES if args.dry_run else SIZES)
    dims = args.dims or (DRY_DIMS if args.dry_run else DIMS)
    results = []
    for dtype_name, dtype in DTYPES.items():
        for d in dims:
            for n in sizes:
                x, y, s = make_inputs(n, d, dtype, device)
                for method in METHODS:
                    row = dict(method=method, dtype=dtype_name, n=n, d=d, ms=None, extra_mib=None, note="")
                    reason = fits(method, n, d, dtype, device)
                    fn = step_fn(method, peers, x, y, s) if reason is None else reason
                    if time.monotonic() - started > args.budget_s:
                        fn = f"time budget of {args.budget_s:.0f} s spent"
                    if isinstance(fn, str):
                        row["note"] = "skipped: " + fn
                    else:
                        try:
                            row["ms"] = 1e3 * time_it(fn, device, repeat=3 if n <= 65536 else 2)
                            extra = peak_extra_bytes(fn, device)
                            row["extra_mib"] = None if extra is None else extra / 2**20
                        except torch.cuda.OutOfMemoryError as err:
                            row["note"] = f"skipped: out of memory ({str(err).splitlines()[0]})"
                        if device.type == "cuda":
                            torch.cuda.empty_cache()
                    results.append(row)
                    print(json.dumps(row), flush=True)
                del x, y, s
    write_tables(args.results, results, env)
    print(f"done in {time.monotonic() - started:.0f} s; results in {args.results}")
    return 1 if bad else 0


def write_tables(folder: Path, results: list[dict], env: dict) -> None:
    with open(folder / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(results[0]))
        writer.writeheader()
        writer.writerows(results)
    by_cell = {}
    for r in results:
        by_cell.setdefault((r["dtype"], r["d"], r["n"]), {})[r["method"]] = r
    lines = [f"fwd+bwd of the symmetric CLIP loss on {env['device']} ({env['date']}, torch {env['torch']}, "
             f"triton {env['triton']}); time in ms (x = ratio to the cuBLAS 4-GEMM floor), extra memory in MiB",
             "", "| dtype | d | N | " + " | ".join(METHODS) + " |", "|---|---|---|" + "---|" * len(METHODS)]
    for (dtype, d, n), cell in by_cell.items():
        floor = cell.get("floor", {}).get("ms")
        parts = []
        for m in METHODS:
            r = cell.get(m)
            if r is None or r["ms"] is None:
                parts.append("skipped" if r is None else r["note"].replace("|", "/")[:60])
                continue
            ratio = f" ({r['ms'] / floor:.2f}x)" if floor else ""
            mem = "" if r["extra_mib"] is None else f", {r['extra_mib']:.0f} MiB"
            parts.append(f"{r['ms']:.1f}{ratio}{mem}")
        lines.append(f"| {dtype} | {d} | {n} | " + " | ".join(parts) + " |")
    (folder / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
