"""Forward+backward time of the fused CPU losses against their compute floor, and peak memory.

For each loss, batch size N and embedding dim d, one subprocess times these methods in
rounds: each round runs every method once, in a balanced order (every method runs in every
position, and right after every other method, equally often; the rounds are rounded up to a
whole number of such orders), so the methods of a round share the machine's state. The ratio
to the tiled floor is taken per round and its median over the rounds is the reported figure,
with the lowest and highest round (on this kind of machine the same code runs up to 20% slower from one minute to the next, so a
best-of over separate timings mostly measures luck); best / best is kept as a second figure:
  xfast         the fused CPU backend (tiled C++ kernel, never stores N x M)
  xfast_rows    xfast with SimCSE's rows path (gradients in the forward, 3 GEMMs) forced on,
  xfast_recompute  and forced off (the 4-GEMM path); xfast takes the rows path where
                cpu_similarity_lse.eager_rows_pays says so. Each method's ratio to
                xfast_recompute is the x_recompute column (the A/B behind that rule)
  tiled_floor   the same FLOPs as the kernel's four N x M x d GEMMs, done as the kernel does
                them: 4 * (N/256) * (M/512) GEMMs of 256 x d x 512 into one reused 256 x 512
                tile per thread (cache-resident outputs, same threads, cells and tiles;
                its cells share nothing, so they never wait for one another, unlike the
                kernel's). A loss that recomputes its logits in the backward cannot do
                less work.
  tiled_floor_3 the same with 3 GEMMs per tile: the least work of a loss that computes its
                gradients in the forward from one stored slab of logits, as xfast's rows-only
                SimCSE does on CPU (the kernel's forward_rows_with_gradients); its ratio is
                the x_tiled_floor_3 column, filled where xfast takes that path
  materialised  the same four GEMMs with N x M outputs in memory (DRAM traffic and page
                faults): not a floor, the cost of writing the logits out
  reference     plain PyTorch materialising the logits (what open_clip and
                sentence-transformers do)
Times are the best round in wall seconds and, separately, in CPU seconds of the process (all
threads; it leaves out time spent waiting for a core on a busy machine); every round's times
are in the JSON.
GFLOP/s counts the flops each method does (wall time): 8 * N * M * d for four GEMMs, 6 * N * M * d
for tiled_floor_3 and for xfast's SimCSE where it takes the rows path; "peak" is the best rate this
machine's sgemm reaches on cache-resident shapes (the kernel's tile with d = 64 ... 1024,
one 1024^3 product). "Extra MB" is the growth of peak RSS during one forward+backward in a
fresh process (it includes the N x d gradients).

    python benchmarks/bench_losses.py                         # quick look, written to a temp folder
    python benchmarks/bench_losses.py --sizes 8192 16384 --dims 64 512 --methods xfast tiled_floor --rounds 9 --save

Results go to --out (default: a temp folder); only --save overwrites the committed
benchmarks/results/losses.{json,csv,png}. --merge keeps the cells of the existing results
that this run does not measure, so a long table can be measured in several invocations
(each run's command, load average and sgemm peak are kept with its rows).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rounds import balanced_orders, balanced_rounds  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("xfast", "xfast_rows", "xfast_recompute", "tiled_floor", "tiled_floor_3", "materialised", "reference")
FORCED_ROWS_PATH = {"xfast_rows": True, "xfast_recompute": False}
FLOOR_GEMMS = {"tiled_floor": 4,  # forward S, backward S (recomputed), dX, dY
               "tiled_floor_3": 3}  # S once (stored), dX, dY


def machine() -> dict:
    """CPU model (as lscpu names it), threads, and the kernel variant in use."""
    import torch

    from xfast.kernels import cpu_similarity_lse

    model = "unknown"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        pass
    return {"cpu": model, "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
            "tile_isa": cpu_similarity_lse.tile_isa(), "torch": torch.__version__}


def best_seconds(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def peak_gflops() -> dict:
    """sgemm rate on cache-resident operands: the kernel's tile shapes through the floor
    routine (each thread reusing its own small blocks), and one 1024^3 product."""
    import torch

    from xfast.kernels import cpu_similarity_lse as cpu

    threads = torch.get_num_threads()
    rates = {}
    for d in (64, 128, 256, 512, 1024):
        x, y = torch.randn(cpu.BLOCK_ROWS * threads, d), torch.randn(cpu.BLOCK_COLS * threads, d)
        reps = max(4, 2048 // d)
        flops = 2 * x.shape[0] * y.shape[0] * d * reps
        cpu.tile_gemm_floor(x, y, 1)
        rates[f"tile 256x{d}x512"] = flops / best_seconds(lambda x=x, y=y, reps=reps: cpu.tile_gemm_floor(x, y, reps), 3) / 1e9
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    rates["mm 1024^3"] = 2 * 1024**3 / best_seconds(lambda: a @ b, 5) / 1e9
    best = max(rates, key=rates.get)
    return {"gflops": rates[best], "shape": best, "all": rates}


def make_step(loss: str, method: str, n: int, d: int):
    """One forward+backward of `method` on fresh unit-norm inputs."""
    import torch

    import xfast
    from xfast.kernels import cpu_similarity_lse as cpu

    g = torch.Generator().manual_seed(0)
    x, y, hn = (torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1).requires_grad_()
                for _ in range(3))
    scale = torch.tensor(1 / 0.07, requires_grad=True)
    if method in ("tiled_floor", "tiled_floor_3", "materialised"):
        cols = (torch.cat([y, hn]) if loss == "simcse_hn" else y).detach()
        xd = x.detach()
        if method in FLOOR_GEMMS:
            return lambda: cpu.tile_gemm_floor(xd, cols, FLOOR_GEMMS[method])

        def materialised():
            s = xd @ cols.T
            s @ cols, s.T @ xd, xd @ cols.T
        return materialised

    backend = "reference" if method == "reference" else "cpu"
    rows_path = cpu.eager_rows_pays

    def step():
        if method in FORCED_ROWS_PATH:
            cpu.eager_rows_pays = lambda d, m: FORCED_ROWS_PATH[method]
        try:
            if loss == "clip":
                out = xfast.clip_loss(x, y, scale, backend=backend)
            else:
                out = xfast.simcse_loss(x, y, hn, temperature=0.05, hard_negative_weight=1.0, backend=backend)
            out.backward()
        finally:
            cpu.eager_rows_pays = rows_path
        x.grad = y.grad = hn.grad = scale.grad = None
    return step


def time_worker(loss: str, methods: list[str], n: int, d: int, rounds: int) -> dict:
    """Subprocess: wall and CPU seconds of every method in every round; each round runs the
    methods once, in the next of the balanced orders, so a round is a paired comparison (rounds
    rounded up to a whole number of orders). CPU seconds (all threads) leave out the time the
    process waits for a core, which on a shared machine is most of the noise."""
    steps = {m: make_step(loss, m, n, d) for m in methods}
    for step in steps.values():
        step()  # warm-up
    orders = balanced_orders(len(methods))
    wall, cpu = {m: [] for m in methods}, {m: [] for m in methods}
    for r in range(balanced_rounds(rounds, len(methods))):
        for m in (methods[i] for i in orders[r % len(orders)]):
            t0, c0 = time.perf_counter(), time.process_time()
            steps[m]()
            wall[m].append(time.perf_counter() - t0)
            cpu[m].append(time.process_time() - c0)
    return {m: {"seconds": min(wall[m]), "cpu_seconds": min(cpu[m]), "round_seconds": wall[m],
                "round_cpu_seconds": cpu[m]} for m in methods}


def paired_ratios(row: dict, floor: dict) -> dict:
    """Ratios to the floor: median, lowest and highest of the per-round ratios (wall and CPU
    time), and best round / best round (both)."""
    wall = [a / b for a, b in zip(row["round_seconds"], floor["round_seconds"])]
    cpu = [a / b for a, b in zip(row["round_cpu_seconds"], floor["round_cpu_seconds"])]
    return {"x_tiled_floor": statistics.median(wall), "x_tiled_floor_low": min(wall), "x_tiled_floor_high": max(wall),
            "cpu_x_tiled_floor": statistics.median(cpu), "cpu_x_tiled_floor_low": min(cpu),
            "cpu_x_tiled_floor_high": max(cpu), "x_tiled_floor_best": row["seconds"] / floor["seconds"],
            "cpu_x_tiled_floor_best": row["cpu_seconds"] / floor["cpu_seconds"], "round_ratios": wall}


def memory_worker(loss: str, method: str, n: int, d: int) -> dict:
    """Subprocess: growth of peak RSS over one forward+backward, after the inputs exist."""
    import resource

    step = make_step(loss, method, n, d)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step()
    return {"extra_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024}


def available_bytes() -> int:
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    return int(info["MemAvailable"].split()[0]) * 1024


def subprocess_json(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        reason = (proc.stderr.strip().splitlines() or ["killed (out of memory?)"])[-1]
        return {"error": f"failed: {reason[:200]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(loss: str, n: int, d: int, methods: list[str], rounds: int, memory: bool) -> list[dict]:
    from xfast.kernels import cpu_similarity_lse as cpu

    columns = 2 * n if loss == "simcse_hn" else n
    # SimCSE is rows only: where the kernel takes its rows path, xfast does 3 GEMMs, not 4.
    rows_path = loss == "simcse_hn" and cpu.eager_rows_pays(d, columns)
    took_rows_path = {"xfast_rows"} | ({"xfast"} if rows_path else set()) if loss == "simcse_hn" else set()
    rows, timed = [], []
    for m in methods:
        row = {"loss": loss, "method": m, "N": n, "columns": columns, "d": d}
        # Materialising methods hold several N x M float32 matrices at once (logits, softmax,
        # their gradients): skip them rather than let the OOM killer pick a process.
        if m in ("materialised", "reference") and 4 * 4 * n * columns > 0.8 * available_bytes():
            row["error"] = f"skipped: needs about {16 * n * columns / 2**30:.0f} GiB for N x M matrices"
        else:
            timed.append(m)
        rows.append(row)
    seconds = subprocess_json(["--time-worker", loss, ",".join(timed), str(n), str(d), str(rounds)]) if timed else {}
    for row in rows:
        if "error" in row:
            continue
        if "error" in seconds:
            row["error"] = seconds["error"]
            continue
        row.update(seconds[row["method"]])
        gemms = FLOOR_GEMMS.get(row["method"], 3 if row["method"] in took_rows_path else 4)
        row["gflops"] = 2 * gemms * n * columns * d / row["seconds"] / 1e9
        if memory and row["method"] not in FLOOR_GEMMS:  # a floor holds one tile per thread
            row.update(subprocess_json(["--memory-worker", loss, row["method"], str(n), str(d)]))
    floor = next((r for r in rows if r["method"] == "tiled_floor" and "seconds" in r), None)
    floor3 = next((r for r in rows if r["method"] == "tiled_floor_3" and "seconds" in r), None)
    recompute = next((r for r in rows if r["method"] == "xfast_recompute" and "seconds" in r), None)
    median_ratio = lambda row, other: statistics.median(a / b for a, b in zip(row["round_seconds"], other["round_seconds"]))
    for row in rows:
        if floor and "seconds" in row:
            row.update(paired_ratios(row, floor))
        if floor3 and "seconds" in row and (row["method"] in took_rows_path or row["method"] in FLOOR_GEMMS
                                            and took_rows_path & set(methods)):  # the floor of the rows path
            row["x_tiled_floor_3"] = median_ratio(row, floor3)
        if recompute and "seconds" in row:
            row["x_recompute"] = median_ratio(row, recompute)
    return rows


def table(rows: list[dict], runs: list[dict]) -> str:
    lines = ["| loss | N | d | method | best round (s) | x tiled floor, median of rounds | lowest-highest round "
             "| best / best | x tiled floor in CPU time, median | x 3-GEMM floor, median | GFLOP/s (best round) | extra MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda r, key, spec=".2f": format(r[key], spec) if key in r else "-"
    for r in rows:
        if "seconds" not in r:
            lines.append(f"| {r['loss']} | {r['N']} | {r['d']} | {r['method']} | {r.get('error', '')} | | | | | | | |")
            continue
        spread = f"{r['x_tiled_floor_low']:.2f}-{r['x_tiled_floor_high']:.2f}" if "x_tiled_floor_low" in r else "-"
        lines.append(f"| {r['loss']} | {r['N']} | {r['d']} | {r['method']} | {r['seconds']:.3f} | {fmt(r, 'x_tiled_floor')} "
                     f"| {spread} | {fmt(r, 'x_tiled_floor_best')} | {fmt(r, 'cpu_x_tiled_floor')} | {fmt(r, 'x_tiled_floor_3')} "
                     f"| {r['gflops']:.0f} "
                     f"| {fmt(r, 'extra_mb', '.0f')} |")
    lines.append("")
    for i, run in enumerate(runs):
        if any(r.get("run") == i for r in rows):
            peak, meta = run["peak"], run["meta"]
            lines.append(f"run {i}: `{meta['command']}`, load average {meta.get('load_average_1min', '?')}, "
                         f"sgemm peak (cache-resident, {peak['shape']}) {peak['gflops']:.0f} GFLOP/s")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """Time against N per loss and d, one panel each."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["loss"], r["d"]) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.8), squeeze=False)
    for ax, (loss, d) in zip(axes[0], panels):
        for method, style in zip(METHODS, ("o-", "o--", "o:", "^:", "<:", "v:", "s--")):
            pts = sorted((r["N"], r["seconds"]) for r in rows
                         if (r["loss"], r["d"], r["method"]) == (loss, d, method) and "seconds" in r)
            if pts:
                ax.plot(*zip(*pts), style, label=method.replace("_", " "))
        ax.set(xscale="log", yscale="log", xlabel="batch size N", ylabel="forward+backward (s)", title=f"{loss}, d = {d}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096], help="batch sizes N")
    parser.add_argument("--dims", type=int, nargs="+", default=[512], help="embedding dims d")
    parser.add_argument("--losses", nargs="+", default=["clip", "simcse_hn"], choices=["clip", "simcse_hn"],
                        help="clip: symmetric InfoNCE over N x N; simcse_hn: SimCSE with hard negatives, N x 2N")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, help="what to time")
    parser.add_argument("--rounds", "--repeat", dest="rounds", type=positive_int, default=4,
                        help="rounds; each runs every method once, in a balanced order; rounded up to a whole "
                             "number of orders: a multiple of the method count (of twice it for an odd count above 1; default 4)")
    parser.add_argument("--no-memory", dest="memory", action="store_false",
                        help="skip the peak-memory subprocesses (one extra step per method)")
    parser.add_argument("--out", help="output path prefix for .json/.csv/.png (default: a temp folder)")
    parser.add_argument("--save", action="store_true", help="write benchmarks/results/losses.* (the committed results)")
    parser.add_argument("--merge", action="store_true",
                        help="keep the existing results' cells (loss, N, d) that this run does not measure")
    parser.add_argument("--time-worker", nargs=5, help=argparse.SUPPRESS)
    parser.add_argument("--memory-worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.time_worker:
        loss, methods, n, d, rounds = args.time_worker
        print(json.dumps(time_worker(loss, methods.split(","), int(n), int(d), int(rounds))))
        return 0
    if args.memory_worker:
        loss, method, n, d = args.memory_worker
        print(json.dumps(memory_worker(loss, method, int(n), int(d))))
        return 0
    if args.save and args.out:
        parser.error("--save writes benchmarks/results/losses.*; leave out --out")
    out = RESULTS / "losses" if args.save else Path(args.out or Path(tempfile.gettempdir()) / "xfast-bench" / "losses")

    load = os.getloadavg()[0]
    meta = {"command": " ".join(["python", "benchmarks/bench_losses.py", *(argv if argv is not None else sys.argv[1:])]),
            "load_average_1min": load, **machine()}
    peak = peak_gflops()
    print(f"{meta['cpu']}, {meta['threads']} threads, tile kernels: {meta['tile_isa']}; load average {load:.2f}; "
          f"sgemm peak {peak['gflops']:.0f} GFLOP/s ({peak['shape']})", flush=True)
    if balanced_rounds(args.rounds, len(args.methods)) != args.rounds:
        print(f"rounds: {balanced_rounds(args.rounds, len(args.methods))} (--rounds {args.rounds} rounded up to "
              f"whole balanced orders of {len(args.methods)} methods)", flush=True)
    runs, kept = [], []
    if args.merge and out.with_suffix(".json").exists():
        runs, kept = previous_results(out.with_suffix(".json"))
        measured = {(loss, n, d) for loss in args.losses for n in args.sizes for d in args.dims}
        kept = [r for r in kept if (r["loss"], r["N"], r["d"]) not in measured]
        used = sorted({r["run"] for r in kept})  # runs whose cells were all measured again go
        runs = [runs[i] for i in used]
        kept = [dict(r, run=used.index(r["run"])) for r in kept]
    run = len(runs)
    runs.append({"meta": meta, "peak": peak})
    rows = []
    # Smallest work first; results are rewritten after each cell, so a long run that is
    # stopped keeps what it measured.
    for n in args.sizes:
        for d in args.dims:
            for loss in args.losses:
                for row in measure(loss, n, d, args.methods, args.rounds, args.memory):
                    row["run"] = run
                    rows.append(row)
                    status = row.get("error") or f"{row['seconds']:.3f} s, {row['gflops']:.0f} GFLOP/s" + (
                        f", {row['x_tiled_floor']:.2f}x tiled floor (median of rounds, {row['x_tiled_floor_low']:.2f}-"
                        f"{row['x_tiled_floor_high']:.2f}; best/best {row['x_tiled_floor_best']:.2f}; "
                        f"{row['cpu_x_tiled_floor']:.2f}x in CPU time)"
                        if "x_tiled_floor" in row else "") + (
                        f", {row['x_tiled_floor_3']:.2f}x 3-GEMM floor" if "x_tiled_floor_3" in row else "") + (
                        f", {row['x_recompute']:.3f}x xfast_recompute" if "x_recompute" in row else "")
                    print(f"{loss:>9} N={n:<6} d={d:<5} {row['method']:<12} {status}", flush=True)
                write(out, runs, kept + rows)
    print()
    print(table(kept + rows, runs))
    print(f"\nwritten: {out.with_suffix('.json')}, .csv, .png")
    return 0


def previous_results(path: Path) -> tuple[list[dict], list[dict]]:
    """Runs and rows of an existing results file (also the older formats: one run per file, and
    rows whose only ratio was best / best, which keep it under that name)."""
    data = json.loads(path.read_text())
    runs, rows = (data["runs"], data["rows"]) if "runs" in data else (
        [{"meta": data["meta"], "peak": data["peak"]}], [dict(r, run=0) for r in data["rows"]])
    for r in rows:
        if "x_tiled_floor_best" not in r:
            for key in ("x_tiled_floor", "cpu_x_tiled_floor"):
                if key in r:
                    r[key + "_best"] = r.pop(key)
    return runs, rows


def write(out: Path, runs: list[dict], rows: list[dict]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"runs": runs, "rows": rows}, indent=1))
    with out.with_suffix(".csv").open("w", newline="") as f:
        keys = ["loss", "method", "N", "columns", "d", "seconds", "x_tiled_floor", "x_tiled_floor_low",
                "x_tiled_floor_high", "x_tiled_floor_best", "cpu_seconds", "cpu_x_tiled_floor",
                "cpu_x_tiled_floor_low", "cpu_x_tiled_floor_high", "cpu_x_tiled_floor_best", "x_tiled_floor_3", "x_recompute",
                "gflops", "extra_mb", "error", "run"]
        writer = csv.DictWriter(f, fieldnames=keys, restval="", extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, out.with_suffix(".png"))


if __name__ == "__main__":
    sys.exit(main())
