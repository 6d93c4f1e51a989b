"""torch AdamW's three CPU kernels on the tiny towers' parameters: what xfast's fused choice saves.

One process, 1 thread: the parameters (and random gradients) of bench_train's tiny models, one
optimizer per kernel over the same tensors' copies; each round steps every optimizer once, in a
balanced order (benchmarks/rounds.py; rounds rounded up to whole orders); median ms per step and the median per-round difference to the fused kernel.

    default  torch.optim.AdamW(params) as a plain loop writes it (on CPU a Python loop over them)
    foreach  foreach=True (one multi-tensor call per group; xfast before the fused choice)
    fused    fused=True (xfast.training.engine.adamw on CPU and CUDA)

    python benchmarks/bench_adamw.py                 # prints the table
    python benchmarks/bench_adamw.py --save          # also benchmarks/results/adamw.{json,md}
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_train  # noqa: E402
from rounds import balanced_rounds, round_order  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
KERNELS = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def measure(size_name: str, rounds: int) -> dict:
    import torch

    from xfast.training import demo_data

    torch.manual_seed(0)
    torch.set_num_threads(1)
    root, _ = demo_data.ensure()
    model = bench_train._xfast_model(bench_train.SIZES[size_name], root / "tokenizer")
    params = [p.detach() for p in model.parameters()]
    optimizers = {}
    for name, kernel in KERNELS.items():
        copies = [torch.nn.Parameter(p.clone()) for p in params]
        for c in copies:
            c.grad = torch.randn_like(c)
        optimizers[name] = torch.optim.AdamW(copies, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.98), eps=1e-6, **kernel)
    names = list(KERNELS)
    times: dict[str, list[float]] = {n: [] for n in names}
    rounds = balanced_rounds(rounds, len(names))
    for i in range(rounds + 5):
        for name in round_order(names, i):
            start = time.perf_counter()
            optimizers[name].step()
            if i >= 5:  # the first rounds create the optimizer state
                times[name].append(time.perf_counter() - start)
    result = {"size": size_name, "tensors": len(params), "elements": sum(p.numel() for p in params), "rounds": rounds,
              "ms_per_step": {n: 1e3 * statistics.median(t) for n, t in times.items()}}
    result["minus_fused_ms"] = {n: 1e3 * statistics.median(a - b for a, b in zip(times[n], times["fused"]))
                                for n in names if n != "fused"}
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["tiny_clip", "tiny_clap"], choices=("tiny_clip", "tiny_clap"),
                        help="bench_train sizes whose parameters are stepped (default both)")
    parser.add_argument("--rounds", type=int, default=200, help="timed rounds, rounded up to whole balanced orders (default 200)")
    parser.add_argument("--save", action="store_true", help="write benchmarks/results/adamw.{json,md}")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    command = " ".join(["python", "benchmarks/bench_adamw.py", *(argv if argv is not None else sys.argv[1:])])
    results = [measure(size, args.rounds) for size in args.sizes]
    lines = ["| size | tensors | default (loop) ms | foreach ms | fused ms | default - fused | foreach - fused |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        ms, d = r["ms_per_step"], r["minus_fused_ms"]
        lines.append(f"| {r['size']} | {r['tensors']} | {ms['default']:.2f} | {ms['foreach']:.2f} | {ms['fused']:.2f} | "
                     f"{d['default']:+.2f} | {d['foreach']:+.2f} |")
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    text = "\n".join(lines) + f"\n\n`{command}` on {bench_train.machine()}, 1 thread, {date}\n"
    print(text)
    if args.save:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "adamw.json").write_text(json.dumps({"command": command, "machine": bench_train.machine(),
                                                         "date": date, "results": results}, indent=1) + "\n")
        (RESULTS / "adamw.md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
