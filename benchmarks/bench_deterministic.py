"""What train.deterministic costs on CPU: the xfast training step (tiny CLIP, 1 rank, ZeRO-2 as
in the demo configs; bench_train.py's setup) with and without deterministic algorithms.

  default          torch's default kernels
  deterministic    train.deterministic as xfast sets it (xfast.training.engine.make_deterministic:
                   deterministic algorithms, no NaN fill of uninitialised memory)
  deterministic_fill  torch.use_deterministic_algorithms(True) alone, which also fills every
                   torch.empty with NaN; DeepSpeed's ~5e8-element ZeRO buckets then cost seconds
                   per step (what train.deterministic did before)

Each measurement runs in its own subprocess; modes alternate over --repeat rounds and the best
round is reported (every round is kept in the JSON). The fill mode runs --fill-steps steps only.

    python benchmarks/bench_deterministic.py                 # prints the table
    python benchmarks/bench_deterministic.py --save          # also writes results/deterministic.{json,md}
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

RESULTS = Path(__file__).resolve().parent / "results"
MODES = ("default", "deterministic", "deterministic_fill")


def worker(mode: str, batch_size: int, steps: int, warmup: int, root: Path) -> dict:
    import torch
    from bench_train import _loader, _xfast_step_fn

    from xfast.training.engine import make_deterministic

    torch.manual_seed(0)
    torch.set_num_threads(1)
    if mode == "deterministic":
        make_deterministic()
    elif mode == "deterministic_fill":
        torch.use_deterministic_algorithms(True)
    size = dict(model="clip", hidden=32, batch=batch_size, micro_batches=1)
    tokenizer, step, parameters = _xfast_step_fn(size, "xfast", root / "tokenizer", 1, {})
    batches = list(iter(_loader(size, batch_size, root, tokenizer, rank=0, world=1)))[:4]  # the step, not the loader
    for i in range(warmup):
        step([batches[i % len(batches)]])
    start = time.perf_counter()
    for i in range(steps):
        step([batches[i % len(batches)]])
    return {"seconds_per_step": (time.perf_counter() - start) / steps, "parameters": parameters}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=32, help="samples per step (default 32)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per measurement (default 20)")
    parser.add_argument("--fill-steps", type=int, default=3, help="timed steps of deterministic_fill (default 3)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    parser.add_argument("--repeat", type=int, default=3, help="alternating rounds; the best is kept (default 3)")
    parser.add_argument("--save", action="store_true", help="write results/deterministic.{json,md}")
    parser.add_argument("--worker", metavar="MODE", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("batch_size", "steps", "fill_steps", "repeat"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")

    from xfast.training import demo_data
    root, _ = demo_data.ensure()
    if args.worker:
        steps = args.fill_steps if args.worker == "deterministic_fill" else args.steps
        print("RESULT " + json.dumps(worker(args.worker, args.batch_size, steps, args.warmup, root)))
        return 0

    from tqdm.auto import tqdm
    env = dict(os.environ, DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    runs: dict[str, list[dict]] = {mode: [] for mode in MODES}
    for mode in tqdm([m for _ in range(args.repeat) for m in MODES], desc="bench_deterministic", unit="run"):
        command = [sys.executable, __file__, "--worker", mode, "--batch-size", str(args.batch_size),
                   "--steps", str(args.steps), "--fill-steps", str(args.fill_steps), "--warmup", str(args.warmup)]
        out = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1800)
        line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
        if out.returncode != 0 or line is None:
            print(out.stdout[-3000:], out.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"{mode} failed (exit {out.returncode})")
        runs[mode].append(json.loads(line[len("RESULT "):]))

    best = {mode: min(r["seconds_per_step"] for r in results) for mode, results in runs.items()}
    parameters = runs["default"][0]["parameters"]
    lines = [f"train.deterministic on CPU (tiny CLIP, {parameters / 1e3:.0f}k parameters, 1 rank, ZeRO-2, 1 thread, "
             f"batch {args.batch_size}; best of {args.repeat} alternating runs)", "",
             "| mode | s/step | / default |", "|---|---|---|"]
    for mode in MODES:
        lines.append(f"| {mode} | {best[mode]:.4f} | {best[mode] / best['default']:.2f}x |")
    table = "\n".join(lines)
    print(table)
    if args.save:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "deterministic.json").write_text(json.dumps(
            {"args": {k: v for k, v in vars(args).items() if k != "worker"}, "best_seconds_per_step": best,
             "runs": runs}, indent=1) + "\n")
        (RESULTS / "deterministic.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
