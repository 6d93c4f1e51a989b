"""Data wait around epoch starts: xfast's loader over the demo data (the demo config's workers,
bench_train's loader) next to a busy step of --step-ms of CPU on 1 thread, for --steps steps
(three epoch starts at the tiny sizes' 64 batches per epoch). Per process: the wait for the first
batch of each epoch, and the wait share of the 10-step intervals that hold an epoch start against
the mean share of the others (the first interval, the workers' start, is left out).

With --before DIR (a checkout of another xfast, e.g. `git worktree add /tmp/old <commit>` with
the built extension copied in) each round runs that checkout and this one, alternating.

    python benchmarks/bench_epoch_wait.py --before /tmp/old --rounds 4
    python benchmarks/bench_epoch_wait.py ... --save      # also benchmarks/results/epoch_wait.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
INTERVAL = 10


def worker(model: str, steps: int, step_ms: float) -> dict:
    sys.path.insert(0, str(HERE))
    import bench_train
    import torch
    from transformers import AutoTokenizer

    from xfast.training import demo_data
    torch.set_num_threads(1)
    root, _ = demo_data.ensure()
    size = bench_train.SIZES[f"tiny_{model}"]
    tokenizer = AutoTokenizer.from_pretrained(str(root / "tokenizer"))
    source = bench_train._loader(size, size["batch"], root, tokenizer, rank=0, world=1)
    batches = iter(source)
    starts: list[int] = []
    waits: list[float] = []

    def next_batch():
        nonlocal batches
        try:
            return next(batches)
        except StopIteration:
            starts.append(len(waits))
            batches = iter(source)
            return next(batches)

    x = torch.randn(64, 64)
    for _ in range(steps):
        start = time.perf_counter()
        next_batch()
        waits.append(time.perf_counter() - start)
        end = time.perf_counter() + step_ms / 1e3
        while time.perf_counter() < end:  # the step: CPU work in this process, as a training step
            x = (x @ x).tanh_()
    with_start, others = [], []
    for k in range(1, steps // INTERVAL):
        wait = sum(waits[k * INTERVAL:(k + 1) * INTERVAL])
        share = wait / (wait + INTERVAL * step_ms / 1e3)
        (with_start if any(k * INTERVAL <= s < (k + 1) * INTERVAL for s in starts) else others).append(share)
    del batches
    source.close()
    return {"epoch_starts": starts, "first_wait_ms": [round(waits[s] * 1e3, 1) for s in starts],
            "share_with_start_pct": [round(v * 100, 2) for v in with_start],
            "share_others_mean_pct": round(100 * sum(others) / len(others), 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("clip", "clap"), default="clip", help="demo data (default clip)")
    parser.add_argument("--steps", type=int, default=230, help="steps per process (default 230)")
    parser.add_argument("--step-ms", type=float, default=25.0, help="CPU time of the simulated step (default 25)")
    parser.add_argument("--rounds", type=int, default=4, help="processes per checkout (default 4)")
    parser.add_argument("--before", type=Path, help="another xfast checkout, run alternately with this one")
    parser.add_argument("--save", action="store_true", help="write benchmarks/results/epoch_wait.json")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(worker(args.model, args.steps, args.step_ms)), flush=True)
        os._exit(0)  # the loader's worker must not hold the exit
    checkouts = {"this": HERE.parent, **({"before": args.before.resolve()} if args.before else {})}
    runs: dict[str, list[dict]] = {name: [] for name in checkouts}
    for r in range(args.rounds):
        for name in (list(checkouts) if r % 2 else list(checkouts)[::-1]):
            root = checkouts[name]
            env = dict(os.environ, PYTHONPATH=str(root), TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
            # this script and bench_train's loader recipe in both; xfast from the checkout's PYTHONPATH
            out = subprocess.run([sys.executable, __file__, "--worker", "--model", args.model, "--steps",
                                  str(args.steps), "--step-ms", str(args.step_ms)], capture_output=True, text=True,
                                 env=env, cwd=root, timeout=600)
            line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
            if line is None:
                raise SystemExit(f"{name} failed: {out.stderr[-3000:]}")
            runs[name].append(json.loads(line[len("RESULT "):]))
            print(f"round {r} {name:6s} {runs[name][-1]}", flush=True)
    if args.save:
        (HERE / "results" / "epoch_wait.json").write_text(json.dumps({
            "command": "python benchmarks/bench_epoch_wait.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "runs": runs}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
