"""Minor page faults and time per step of one bench_train method, with and without
xfast.training.process.freeze_objects_before_fork, in fresh processes.

A loader worker is forked from the training process and shares its pages until one side writes
to one. CPython's full (generation 2) collection writes into every tracked object's header, so
the first one after the fork copies every page holding Python objects, all in one step. This
runs bench_train's step and loader (xfast's malloc settings in both arms; only the freeze
differs) for --steps timed steps after --warmup, records each step's wall time and minor faults
(getrusage) and when full collections ran, in --rounds rounds of one process per arm (the order
alternates). Reported per arm: mean faults and ms per step over the window (the mean is what a
throughput figure sees), the median step, the largest step and its faults; and the median over
rounds of the per-round difference of the means, with a 95% interval.

    python benchmarks/bench_fork_faults.py --size tiny_clip --method xfast --rounds 6 --steps 60
    python benchmarks/bench_fork_faults.py ... --save     # also benchmarks/results/fork_faults.json
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_train  # noqa: E402
from rounds import median_interval, round_order  # noqa: E402

ARMS = ("freeze", "no_freeze")


def worker(size_name: str, method: str, steps: int, warmup: int, freeze: bool) -> dict:
    import gc

    import torch

    from xfast.training import demo_data
    from xfast.training.process import freeze_objects_before_fork, keep_freed_memory
    keep_freed_memory()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    root, _ = demo_data.ensure()
    size = bench_train.SIZES[size_name]
    if method == "transformers":
        tokenizer, step, _ = bench_train._transformers_step_fn(size, root / "tokenizer")
    else:
        tokenizer, step, _ = bench_train._xfast_step_fn(size, method, root / "tokenizer", 1, {})
    source = bench_train._loader(size, size["batch"], root, tokenizer, rank=0, world=1)
    if freeze:
        freeze_objects_before_fork()
    next_batch = bench_train.endless(source)

    collections: list[list] = []
    started = [0.0]

    def on_gc(phase, info):
        if info["generation"] == 2 and phase == "start":
            started[0] = time.perf_counter()
        elif info["generation"] == 2:
            collections.append([len(ms) - warmup, round((time.perf_counter() - started[0]) * 1e3, 1)])

    ms: list[float] = []
    faults: list[int] = []
    gc.callbacks.append(on_gc)
    for _ in range(warmup + steps):
        batch = [next_batch()]
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start = time.perf_counter()
        float(step(batch))
        ms.append((time.perf_counter() - start) * 1e3)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    gc.callbacks.remove(on_gc)
    ms, faults = ms[warmup:], faults[warmup:]
    worst = max(range(steps), key=ms.__getitem__)
    return {"ms_mean": statistics.fmean(ms), "ms_median": statistics.median(ms), "faults_mean": statistics.fmean(faults),
            "faults_median": statistics.median(faults), "worst_step": [worst, round(ms[worst], 1), faults[worst]],
            "full_collections": [c for c in collections if c[0] >= 0]}  # [timed step, ms]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=[s for s in bench_train.SIZES if s.startswith("tiny_c")], default="tiny_clip",
                        help="bench_train size (default tiny_clip)")
    parser.add_argument("--method", choices=("xfast", "xfast_zero0", "xfast_torch", "transformers"), default="xfast",
                        help="bench_train method on 1 rank (default xfast: ZeRO-2)")
    parser.add_argument("--rounds", type=int, default=6, help="processes per arm, alternating (default 6)")
    parser.add_argument("--steps", type=int, default=60, help="timed steps per process (default 60)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (default 5)")
    parser.add_argument("--save", action="store_true", help="write benchmarks/results/fork_faults.json")
    parser.add_argument("--worker", choices=ARMS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        result = worker(args.size, args.method, args.steps, args.warmup, args.worker == "freeze")
        print("RESULT " + json.dumps(result), flush=True)
        os._exit(0)  # the loader's worker must not hold the exit
    script_args = ["--size", args.size, "--method", args.method, "--steps", str(args.steps), "--warmup", str(args.warmup)]
    runs: dict[str, list[dict]] = {arm: [] for arm in ARMS}
    load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else None
    for r in range(args.rounds):
        for arm in round_order(ARMS, r):
            result = bench_train.run_ranks([*script_args, "--worker", arm], 1, f"{args.size}/{args.method}/{arm}",
                                           script=__file__)
            runs[arm].append(result)
            print(f"round {r} {arm:9s} {result['ms_mean']:6.1f} ms/step (median {result['ms_median']:.1f}), "
                  f"{result['faults_mean']:7.1f} faults/step, worst step {result['worst_step']}, "
                  f"full collections {result['full_collections']}", flush=True)
    diff, ci95 = median_interval([a["ms_mean"] - b["ms_mean"] for a, b in zip(runs["no_freeze"], runs["freeze"])])
    summary = {"size": args.size, "method": args.method, "rounds": args.rounds, "steps": args.steps,
               "machine": bench_train.machine(), "load_at_start": load, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "command": "python benchmarks/bench_fork_faults.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               "ms_saved_per_step": {"median": diff, "ci95": ci95}, "runs": runs}
    for arm in ARMS:
        print(f"{arm:9s} faults/step {[round(r['faults_mean'], 1) for r in runs[arm]]}, "
              f"ms/step {[round(r['ms_mean'], 1) for r in runs[arm]]}")
    print(f"freeze saves {diff:.1f} ms per step [{ci95[0]:.1f}, {ci95[1]:.1f}] (median of per-round differences)")
    if args.save:
        out = bench_train.RESULTS / "fork_faults.json"
        rows = json.loads(out.read_text()) if out.exists() else []
        rows = [row for row in rows if (row["size"], row["method"]) != (args.size, args.method)] + [summary]
        out.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
