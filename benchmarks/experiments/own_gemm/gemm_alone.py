"""Go/no-go of the own GEMM (README "Tried on 2026-11-29 (17:29-17:54 UTC)"): one thread, the
kernel's 256 x 512 tile, gemm_alone.cpp's 6 x 16 AVX2+FMA micro-kernel against ATen's addmm
into a resident tile, in alternating rounds; prints GFLOP/s and the median per-round rate
ratio. Needs an AVX2+FMA CPU; builds gemm_alone.cpp with torch's JIT extension loader.

    python benchmarks/experiments/own_gemm/gemm_alone.py [--rounds 15]   # on a quiet machine

kc: the k-block of the packed A (-1: A not packed, read in place, k over the whole d, the shape
the patch builds); order 0: column panels outer, 1: row panels outer.
"""
import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.cpp_extension import load

args_parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                      formatter_class=argparse.RawDescriptionHelpFormatter)
args_parser.add_argument("--rounds", type=int, default=15, help="alternating rounds per shape (default 15)")
args = args_parser.parse_args()
if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
    sys.exit(f"gemm_alone.py needs an AVX2+FMA CPU; this one reports {torch.backends.cpu.get_cpu_capability()}")
torch.set_num_threads(1)
m = load("xfast_gemm_alone", [str(Path(__file__).with_name("gemm_alone.cpp"))], extra_cflags=["-O3"],
         build_directory=tempfile.mkdtemp(), verbose=False)
torch.manual_seed(0)


def run(d, kc, order, rounds, blocks=8):
    x = torch.randn(256 * blocks, d)
    y = torch.randn(512, d)
    z = torch.empty(256, 512)
    m.gemm_nt(z, x[:256], y, 0.5, kc, True, order)
    err = (z.double() - (x[:256].double() @ y.double().t()) * 0.5).abs().max().item()

    def aten():
        for b in range(blocks):
            torch.addmm(z, x[b * 256:(b + 1) * 256], y.t(), beta=0, alpha=0.5, out=z)

    def own(repack):
        def f():
            for b in range(blocks):
                m.gemm_nt(z, x[b * 256:(b + 1) * 256], y, 0.5, kc, repack or b == 0, order)
        return f

    fns = {"aten": aten, "own_pack_once": own(False), "own_repack": own(True)}
    t = {k: [] for k in fns}
    for f in fns.values():
        f()
    for r in range(rounds):
        for k in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            t0 = time.perf_counter()
            fns[k]()
            t[k].append(time.perf_counter() - t0)
    flop = 2 * 256 * 512 * d * blocks
    med = {k: statistics.median(v) for k, v in t.items()}
    ratio = {k: statistics.median([a / b for a, b in zip(t["aten"], t[k])]) for k in fns}
    print(f"d={d} kc={kc} order={order} max err {err:.2e} " + " ".join(
        f"{k}: {flop / med[k] / 1e9:.1f} GFLOP/s ({ratio[k]:.3f}x ATen's rate)" for k in fns), flush=True)


for d in (512, 64):
    for kc in ((512, 256, -1) if d == 512 else (64, -1)):
        for order in (0, 1):
            run(d, kc, order, args.rounds)
