"""Paired A/B of builds of xfast._C (README "Tried on 2026-11-29 (17:29-17:54 UTC)"): each round
runs every build's floor (tile_gemm_floor, 4 GEMMs per tile) and kernel (forward+backward)
once, in rotating order; per-round ratios, median over rounds (lowest-highest round).

    git apply benchmarks/experiments/own_gemm/own_gemm_fused_backward.patch   # in a scratch clone
    python setup.py -q build_ext --inplace
    python ab_builds.py OLD.so,NEW.so clip:8192:512,simcse:8192:512,clip:8192:64 8   # on a quiet machine
"""
import argparse
import importlib.util
import statistics
import time

import torch

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("builds", help="comma-separated paths of built xfast._C libraries; the first is the reference")
parser.add_argument("cases", help="comma-separated LOSS:N:D, LOSS clip or simcse (hard negatives), e.g. clip:8192:512")
parser.add_argument("rounds", type=int, help="rounds; each runs every build's floor and kernel once")
args = parser.parse_args()
paths = args.builds.split(",")
cases = [c.split(":") for c in args.cases.split(",")]
if any(len(c) != 3 or c[0] not in ("clip", "simcse") for c in cases):
    parser.error(f"cases must be LOSS:N:D with LOSS clip or simcse, got {args.cases!r}")
rounds = args.rounds
mods = []
for p in paths:
    spec = importlib.util.spec_from_file_location("_C", p)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mods.append(mod)
BR, BC = 256, 512


def measure(loss, n, d):
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1)
    y = torch.nn.functional.normalize(torch.randn(n if loss == "clip" else 2 * n, d, generator=g), dim=-1)
    scale = 1 / 0.07 if loss == "clip" else 1 / 0.05
    off, cols, bias = (0, True, 0.0) if loss == "clip" else (n, False, 1.0)
    gr = torch.full((n,), 1.0 / n)
    gc = torch.full((y.shape[0],), 1.0 / n) if cols else None

    def step(m):
        rl, cl = m.similarity_lse_forward(x, y, scale, bias, off, cols, BR, BC)
        m.similarity_lse_backward(x, y, scale, bias, off, rl, cl if cols else None, gr, gc, BR, BC)

    fns = {}
    for i, m in enumerate(mods):
        fns[f"floor{i}"] = lambda m=m: m.tile_gemm_floor(x, y, 4, BR, BC)
        fns[f"v{i}"] = lambda m=m: step(m)
    names = list(fns)
    for f in fns.values():
        f()
    res = {k: [] for k in names}
    for r in range(rounds):
        for k in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            fns[k]()
            res[k].append(time.perf_counter() - t0)
    print(f"{loss} N={n} d={d} medians (s): " + " ".join(f"{k} {statistics.median(v):.3f}" for k, v in res.items()),
          flush=True)

    def cmp(a, b):
        q = [s / t for s, t in zip(res[a], res[b])]
        return f"{a}/{b} {statistics.median(q):.3f} ({min(q):.3f}-{max(q):.3f})"

    for i in range(len(mods)):
        print("   ", cmp(f"v{i}", f"floor{i}"), "|", cmp(f"v{i}", "floor0"), flush=True)
    for i in range(1, len(mods)):
        print("   ", cmp(f"v{i}", "v0"), "|", cmp(f"floor{i}", "floor0"), flush=True)


print(open("/proc/loadavg").read().strip(), flush=True)
for loss, n, d in cases:
    measure(loss, int(n), int(d))
