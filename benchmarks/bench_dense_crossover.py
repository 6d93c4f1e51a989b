"""Where the dense kernel stops being cheaper than the fused CPU kernel (xfast.backends.DENSE_MAX_CELLS).

For each loss (clip, simcse), dtype, embedding dim d, batch size N and thread count, one process
times a forward+backward of the loss with backend="dense" and with backend="cpu" (the fused
kernel), in rounds: each round runs both once (each as many calls as fill about 2 ms), in a
balanced order (benchmarks/rounds.py), and the figure is the median over rounds of the per-round
ratio dense / cpu (below 1: dense is faster). The crossover of a row is the largest N whose
ratio is below 1 with every smaller N also below 1. CyCLIP has no kernel to choose (its Grams are
plain GEMMs at every size), so it is not here.

    python benchmarks/bench_dense_crossover.py                 # prints the table, writes nothing
    python benchmarks/bench_dense_crossover.py --save          # also results/dense_crossover.{json,md}
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_losses import machine  # noqa: E402
from rounds import round_order  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
BACKENDS = ("dense", "cpu")


def make_step(loss: str, backend: str, n: int, d: int, dtype):
    """A forward+backward of `loss` on fixed unit-norm inputs, temperature / scale learnable."""
    import torch

    import xfast

    g = torch.Generator().manual_seed(n * 1000 + d)
    rows = 3 if loss == "simcse" else 2
    leaves = [torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=-1).requires_grad_()
              for _ in range(rows)]
    scale = torch.tensor(20.0 if loss == "clip" else 0.05, dtype=dtype, requires_grad=True)

    def step():
        if loss == "clip":
            out = xfast.clip_loss(leaves[0], leaves[1], scale, backend=backend)
        else:
            out = xfast.simcse_loss(leaves[0], leaves[1], leaves[2], temperature=scale, hard_negative_weight=0.2,
                                    backend=backend)
        out.backward()
        for t in (*leaves, scale):
            t.grad = None

    return step


def worker(loss: str, dtype_name: str, d: int, sizes: list[int], threads: int, rounds: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    dtype = getattr(torch, dtype_name)
    out = {}
    for n in sizes:
        steps = {b: make_step(loss, b, n, d, dtype) for b in BACKENDS}
        calls = {}
        for b, step in steps.items():
            step()
            start = time.perf_counter()
            step()
            calls[b] = max(1, int(2e-3 / max(time.perf_counter() - start, 1e-7)))
        reps = min(calls.values())
        times = {b: [] for b in BACKENDS}
        for r in range(rounds):
            for b in round_order(BACKENDS, r):
                start = time.perf_counter()
                for _ in range(reps):
                    steps[b]()
                times[b].append((time.perf_counter() - start) / reps)
        ratios = [a / c for a, c in zip(times["dense"], times["cpu"])]
        out[n] = {"dense_us": statistics.median(times["dense"]) * 1e6, "cpu_us": statistics.median(times["cpu"]) * 1e6,
                  "ratio": statistics.median(ratios), "ratio_low": min(ratios), "ratio_high": max(ratios),
                  "round_ratios": ratios}
    return out


def crossover(cells: dict) -> int | None:
    """The largest N whose dense/cpu ratio is below 1 with every smaller N below 1 too."""
    best = None
    for n in sorted(cells, key=int):
        if cells[n]["ratio"] >= 1:
            break
        best = int(n)
    return best


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--losses", nargs="+", default=["clip", "simcse"], choices=["clip", "simcse"],
                   help="losses to time (default both)")
    p.add_argument("--dtypes", nargs="+", default=["float32", "float64"], choices=["float32", "float64"],
                   help="input dtypes (default both)")
    p.add_argument("--dims", nargs="+", type=int, default=[32, 128, 512], help="embedding dims d")
    p.add_argument("--sizes", nargs="+", type=int, default=[16, 32, 64, 96, 128, 192, 256, 384],
                   help="batch sizes N (logits N x N, N x 2N for simcse with hard negatives)")
    p.add_argument("--threads", nargs="+", type=int, default=[1, 2], help="torch thread counts")
    p.add_argument("--rounds", type=int, default=10, help="paired rounds per cell (default 10)")
    p.add_argument("--save", action="store_true", help="write results/dense_crossover.{json,md}")
    p.add_argument("--worker", nargs=6, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        loss, dtype, d, sizes, threads, rounds = args.worker
        print("RESULT " + json.dumps(worker(loss, dtype, int(d), json.loads(sizes), int(threads), int(rounds))))
        return 0
    env = dict(os.environ, OMP_NUM_THREADS="2")
    load = open("/proc/loadavg").read().split()[0]
    rows = []
    for loss in args.losses:
        for dtype in args.dtypes:
            for d in args.dims:
                for threads in args.threads:
                    proc = subprocess.run([sys.executable, __file__, "--worker", loss, dtype, str(d),
                                           json.dumps(args.sizes), str(threads), str(args.rounds)],
                                          capture_output=True, text=True, env=env, check=False)
                    line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
                    if proc.returncode or line is None:
                        print(proc.stderr[-3000:], file=sys.stderr)
                        return 1
                    cells = json.loads(line[len("RESULT "):])
                    rows.append({"loss": loss, "dtype": dtype, "d": d, "threads": threads, "cells": cells,
                                 "crossover_n": crossover(cells)})
                    print(f"{loss} {dtype} d={d} threads={threads}: " + " ".join(
                        f"N{n}:{c['ratio']:.2f}" for n, c in cells.items()) + f"  largest N dense faster={rows[-1]['crossover_n']}",
                          flush=True)
    header = ("dense / fused CPU kernel time, forward+backward (median of per-round ratios, "
              f"{args.rounds} rounds); < 1: dense is faster. clip: N x N logits; simcse with hard negatives: N x 2N")
    lines = [header, "", "| loss | dtype | d | threads | " + " | ".join(f"N={n}" for n in args.sizes)
             + " | largest N dense faster |", "|---" * (5 + len(args.sizes)) + "|"]
    for r in rows:
        lines.append(f"| {r['loss']} | {r['dtype']} | {r['d']} | {r['threads']} | "
                     + " | ".join(f"{r['cells'][str(n)]['ratio']:.2f}" for n in args.sizes) + f" | {r['crossover_n']} |")
    command = "python benchmarks/bench_dense_crossover.py " + " ".join(sys.argv[1:])
    host = machine()
    lines += ["", f"`{command}`, {host['cpu']} ({host['cpu_count']} cores, kernel {host['tile_isa']}), load {load} at "
              f"start, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"]
    print("\n".join(lines))
    if args.save:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "dense_crossover.json").write_text(json.dumps({"command": command, "machine": host, "load": load, "rows": rows},
                                                                 indent=1))
        (RESULTS / "dense_crossover.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
