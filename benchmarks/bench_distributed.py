"""Per-rank peak memory and time of the distributed CLIP loss on CPU ranks (gloo).

At a fixed global batch N x d (default 8192 x 512) split over W = 1, 2, 4 ranks, each
measured in a freshly spawned process group so peak memory is clean:
  allgather    xfast, mode="allgather": gather the other tower (N x d), fused kernel on the
               local rows, O(N) logsumexp exchange, reduce-scatter of its gradient
  ring         xfast, mode="ring": the other tower travels in blocks, <= 2 blocks per rank
  materialise  gather both towers with gradient and build the full N x N logits on every
               rank (open_clip's gather_with_grad=True, local_loss=False)
Time: forward + backward of the loss, barrier to barrier (the slowest rank), best of
--repeat. Memory: growth of each rank's peak RSS (getrusage ru_maxrss) over one forward +
backward, after the inputs exist and a first full-size call has warmed up connections and
thread pools; on Linux the peak is reset after that call (writing 5 to /proc/self/clear_refs),
elsewhere it is the growth over the warm-up's peak. glibc is told to mmap every allocation
over 64 KiB (MALLOC_MMAP_THRESHOLD_) so freed tensors leave the RSS and the peak follows
the live tensors rather than what malloc kept cached. The table shows the largest rank. Threads per rank: cores // W (at least 1); W ranks on fewer
cores are oversubscribed and their times say little about scaling.
Writes benchmarks/results/distributed.json and prints a markdown table.

    python benchmarks/bench_distributed.py
    python benchmarks/bench_distributed.py --batch 4096 --worlds 1 2 --methods allgather ring
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("allgather", "ring", "materialise")


def rank_main(rank: int, world: int, port: int, method: str, n: int, d: int, repeat: int, threads: int, queue):
    """One rank: measures and puts {rank, extra_mb, seconds} on the queue."""
    import resource

    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    import xfast

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(minutes=20))
    group = dist.group.WORLD
    local = n // world + (1 if rank < n % world else 0)
    g = torch.Generator().manual_seed(rank)
    x = F.normalize(torch.randn(local, d, generator=g), dim=-1).requires_grad_()
    y = F.normalize(torch.randn(local, d, generator=g), dim=-1).requires_grad_()
    scale = torch.tensor([1 / 0.07], requires_grad=True)
    kw = dict(backend="reference") if method == "materialise" else dict(mode=method)

    def step(a, b):
        xfast.clip_loss(a, b, scale, group=group, **kw).backward()
        a.grad = b.grad = scale.grad = None

    step(x, y)
    dist.barrier()
    reset_peak_rss()
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step(x, y)
    extra_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
    times = []
    for _ in range(repeat):
        dist.barrier()
        t0 = time.perf_counter()
        step(x, y)
        dist.barrier()
        times.append(time.perf_counter() - t0)
    queue.put({"rank": rank, "extra_mb": extra_mb, "seconds": min(times)})
    dist.destroy_process_group()


def reset_peak_rss() -> None:
    """Lowers the peak RSS to the current RSS (Linux); a no-op where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def run_one(method: str, world: int, n: int, d: int, repeat: int) -> dict:
    import torch.multiprocessing as mp

    from xfast.distributed.rendezvous import free_port

    threads = max(1, (os.cpu_count() or 1) // world)
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")  # read by glibc when a rank starts
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    row = {"method": method, "world": world, "N": n, "d": d, "threads_per_rank": threads}
    try:
        mp.start_processes(rank_main, args=(world, free_port(), method, n, d, repeat, threads, queue), nprocs=world,
                           start_method="spawn")
    except Exception as err:  # most often the materialising loss running out of memory
        return row | {"error": f"failed: {str(err).strip().splitlines()[-1][:200]}"}
    ranks = sorted((queue.get() for _ in range(world)), key=lambda r: r["rank"])
    return row | {"seconds": max(r["seconds"] for r in ranks), "peak_extra_mb": max(r["extra_mb"] for r in ranks),
                  "per_rank_extra_mb": [round(r["extra_mb"], 1) for r in ranks]}


def table(rows: list[dict]) -> str:
    lines = ["| ranks | method | time (s) | x materialise | peak extra memory per rank (MiB) |",
             "|---|---|---|---|---|"]
    base = {r["world"]: r["seconds"] for r in rows if r["method"] == "materialise" and "seconds" in r}
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['world']} | {r['method']} | {r['error']} | | |")
            continue
        ratio = f"{r['seconds'] / base[r['world']]:.2f}" if r["world"] in base else "-"
        lines.append(f"| {r['world']} | {r['method']} | {r['seconds']:.2f} | {ratio} | {r['peak_extra_mb']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8192, help="global batch N, split over the ranks")
    parser.add_argument("--dim", type=int, default=512, help="embedding dim d")
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4], help="numbers of ranks W")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, help="what to measure")
    parser.add_argument("--repeat", type=int, default=2, help="timed runs per measurement (best is kept)")
    parser.add_argument("--out", default=str(RESULTS / "distributed.json"), help="output JSON path")
    args = parser.parse_args(argv)
    for name in ("batch", "dim", "repeat"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be positive")
    if min(args.worlds) < 1 or args.batch < max(args.worlds):
        parser.error("--worlds must be positive and at most --batch")

    rows = []
    for world in args.worlds:
        for method in args.methods:
            row = run_one(method, world, args.batch, args.dim, args.repeat)
            rows.append(row)
            status = row.get("error") or f"{row['seconds']:.2f} s, peak +{row['peak_extra_mb']:.0f} MiB per rank"
            print(f"W={world} {method:<12} {status}", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"command": " ".join([Path(sys.executable).name] + sys.argv), "cpu_count": os.cpu_count()}
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print()
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
