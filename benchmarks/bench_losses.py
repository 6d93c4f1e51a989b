"""Forward+backward time and peak memory of the fused losses on CPU, side by side.

For each loss and batch size N (d = 512 by default) this measures, each in a fresh
subprocess so peak memory is clean:
  xfast      the fused CPU backend (tiled C++ kernel, never stores N x N)
  reference  plain PyTorch materialising the logits (what open_clip / sentence-transformers do)
  floor      four N x M x d GEMMs: the least work a recompute-in-backward loss does
Time is the best of --repeat runs; "extra memory" is the growth of the process's peak RSS
during one forward+backward, after the inputs exist (it includes the N x d gradients).
Writes benchmarks/results/losses.{json,csv,png} and prints a markdown table.

    python benchmarks/bench_losses.py                 # N = 1024, 4096, 8192
    python benchmarks/bench_losses.py --sizes 65536 --methods xfast --repeat 1
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def worker(loss: str, method: str, n: int, d: int, repeat: int) -> dict:
    """Runs inside the subprocess: one (loss, method, N) measurement."""
    import resource

    import torch

    import xfast

    torch.manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(n, d), dim=-1).requires_grad_()
    y = torch.nn.functional.normalize(torch.randn(n, d), dim=-1).requires_grad_()
    hn = torch.nn.functional.normalize(torch.randn(n, d), dim=-1).requires_grad_()
    scale = torch.tensor(1 / 0.07, requires_grad=True)
    backend = "cpu" if method == "xfast" else "reference"
    columns = 2 * n if loss == "simcse_hn" else n

    def step():
        if method == "floor":
            with torch.no_grad():
                cols = torch.cat([y, hn]) if loss == "simcse_hn" else y
                s = x @ cols.T
                s @ cols, s.T @ x, x @ cols.T
            return
        if loss == "clip":
            out = xfast.clip_loss(x, y, scale, backend=backend)
        else:
            out = xfast.simcse_loss(x, y, hn, temperature=0.05, hard_negative_weight=1.0, backend=backend)
        out.backward()
        x.grad = y.grad = hn.grad = scale.grad = None

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step()
    extra_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"loss": loss, "method": method, "N": n, "columns": columns, "d": d, "seconds": min(times),
            "extra_mb": extra_mb, "threads": torch.get_num_threads()}


def available_bytes() -> int:
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    return int(info["MemAvailable"].split()[0]) * 1024


def run_one(loss, method, n, d, repeat) -> dict:
    columns = 2 * n if loss == "simcse_hn" else n
    # Materialising methods hold several N x M float32 matrices at once (logits, softmax,
    # their gradients): skip them rather than let the OOM killer pick a process.
    if method != "xfast" and 4 * 4 * n * columns > 0.8 * available_bytes():
        return {"loss": loss, "method": method, "N": n, "d": d,
                "error": f"skipped: needs about {16 * n * columns / 2**30:.0f} GiB for N x M matrices"}
    cmd = [sys.executable, __file__, "--worker", loss, method, str(n), str(d), str(repeat)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        # Most often the materialising reference running out of memory at large N.
        reason = (proc.stderr.strip().splitlines() or ["killed (out of memory?)"])[-1]
        return {"loss": loss, "method": method, "N": n, "d": d, "error": f"failed: {reason[:200]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    lines = ["| loss | N | method | time (s) | x floor | extra memory (MB) |", "|---|---|---|---|---|---|"]
    floors = {(r["loss"], r["N"]): r["seconds"] for r in rows if r["method"] == "floor" and "seconds" in r}
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['loss']} | {r['N']} | {r['method']} | {r['error']} | | |")
            continue
        floor = floors.get((r["loss"], r["N"]))
        ratio = f"{r['seconds'] / floor:.2f}" if floor else "-"
        lines.append(f"| {r['loss']} | {r['N']} | {r['method']} | {r['seconds']:.3f} | {ratio} | {r['extra_mb']:.0f} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """Time and peak extra memory against N, one panel each, per loss."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    losses = sorted({r["loss"] for r in rows})
    fig, axes = plt.subplots(len(losses), 2, figsize=(10, 3.6 * len(losses)), squeeze=False)
    for row_axes, loss in zip(axes, losses):
        for method, style in (("xfast", "o-"), ("reference", "s--"), ("floor", "^:")):
            pts = sorted((r["N"], r["seconds"], r["extra_mb"]) for r in rows
                         if r["loss"] == loss and r["method"] == method and "seconds" in r)
            if not pts:
                continue
            n, sec, mb = zip(*pts)
            row_axes[0].plot(n, sec, style, label=method)
            row_axes[1].plot(n, mb, style, label=method)
        for ax, ylabel in zip(row_axes, ("forward+backward time (s)", "peak extra memory (MB)")):
            ax.set(xscale="log", yscale="log", xlabel="batch size N", ylabel=ylabel, title=loss)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096, 8192], help="batch sizes N")
    parser.add_argument("--dim", type=int, default=512, help="embedding dim d")
    parser.add_argument("--losses", nargs="+", default=["clip", "simcse_hn"], choices=["clip", "simcse_hn"],
                        help="clip: symmetric InfoNCE over N x N; simcse_hn: SimCSE with hard negatives, N x 2N")
    parser.add_argument("--methods", nargs="+", default=["floor", "xfast", "reference"],
                        choices=["floor", "xfast", "reference"], help="what to measure (floor first for ratios)")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per measurement (best is kept)")
    parser.add_argument("--quick", action="store_true", help="small sizes only (N = 1024, 2048), one repeat")
    parser.add_argument("--out", default=str(RESULTS / "losses"), help="output path prefix (.json and .csv)")
    parser.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        loss, method, n, d, repeat = args.worker
        print(json.dumps(worker(loss, method, int(n), int(d), int(repeat))))
        return 0
    if args.quick:
        args.sizes, args.repeat = [1024, 2048], 1

    rows = []
    for loss in args.losses:
        for n in args.sizes:
            for method in args.methods:
                row = run_one(loss, method, n, args.dim, args.repeat)
                rows.append(row)
                status = row.get("error") or f"{row['seconds']:.3f} s, {row['extra_mb']:.0f} MB"
                print(f"{loss:>9} N={n:<6} {method:<9} {status}", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"command": " ".join([Path(sys.executable).name] + sys.argv), "cpu_count": os.cpu_count()}
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    with out.with_suffix(".csv").open("w", newline="") as f:
        keys = ["loss", "method", "N", "columns", "d", "seconds", "extra_mb", "threads", "error"]
        writer = csv.DictWriter(f, fieldnames=keys, restval="")
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, out.with_suffix(".png"))
    print()
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
