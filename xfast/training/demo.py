"""The main job: train a tiny CLAP and a tiny CLIP on the built-in demo data and show that they learn.

    python -m xfast.training.demo            # (what `make demo` runs)

1. generates the procedural demo dataset if absent (seconds; $XFAST_DEMO_DATA or
   ~/.cache/xfast/demo-data);
2. runs `deepspeed --num_gpus 2 xfast/train.py --cfg demo_clap_tiny` and the same for
   demo_clip_tiny: 2 ranks (CPU processes without GPUs), ZeRO-2, whole-batch accumulation;
3. prints held-out retrieval before vs after training (the trainer evaluates at step 0 and at the
   end) and the losses, next to the chance level.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from xfast.training import demo_data

TRAIN_PY = Path(__file__).resolve().parent.parent / "train.py"
RUNS = ("demo_clap_tiny", "demo_clip_tiny")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(config: str, output_dir: Path, ranks: int, overrides: list[str]) -> tuple[int, float]:
    """Run the trainer through the deepspeed launcher; returns (exit code, seconds)."""
    launcher = Path(sys.executable).with_name("deepspeed")
    command = [str(launcher) if launcher.exists() else "deepspeed", "--num_gpus", str(ranks),
               "--master_port", str(_free_port()), str(TRAIN_PY), "--cfg", config,
               "--set", f"output_dir={output_dir}"]
    for override in overrides:
        command += ["--set", override]
    print("$ " + " ".join(command), flush=True)
    start = time.perf_counter()
    code = subprocess.call(command, env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
    return code, time.perf_counter() - start


def summarize(run_dir: Path) -> dict:
    """Retrieval before/after, first/last loss and mean throughput from a run's metrics.jsonl."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    evals = [r for r in rows if any(k.startswith("eval/") for k in r)]
    if not train_rows or len(evals) < 2:
        raise RuntimeError(f"{run_dir}/metrics.jsonl lacks training rows or the before/after evaluations")

    def recall(row, direction, k):
        key = next(key for key in row if key.startswith("eval/") and key.endswith(f"{direction}/R@{k}"))
        return row[key]

    media = next(k for k in evals[0] if k.startswith("eval/")).split("/")[2].split("_to_")[-1]
    out = {"media": media, "steps": train_rows[-1]["step"], "loss_first": train_rows[0]["loss"],
           "loss_last": train_rows[-1]["loss"],
           "samples_per_s": sum(r["samples_per_s"] for r in train_rows[1:] or train_rows) / max(1, len(train_rows) - 1),
           "data_wait_share": sum(r["data_wait_share"] for r in train_rows) / len(train_rows)}
    for when, row in (("before", evals[0]), ("after", evals[-1])):
        for direction in (f"text_to_{media}", f"{media}_to_text"):
            for k in (1, 5):
                out[f"{direction}/R@{k}/{when}"] = recall(row, direction, k)
    return out


def table(results: dict[str, dict], test_items: int) -> str:
    lines = [f"Held-out retrieval on {test_items} items with distinct captions "
             f"(chance R@1 = {1 / test_items:.1%}, R@5 = {5 / test_items:.1%}); before -> after training",
             "",
             "| run | direction | R@1 | R@5 | loss (first -> last step) | steps | samples/s | data wait | time |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        media = r["media"]
        for i, direction in enumerate((f"text_to_{media}", f"{media}_to_text")):
            tail = (f"{r['loss_first']:.3f} -> {r['loss_last']:.3f} | {r['steps']} | {r['samples_per_s']:.0f} | "
                    f"{r['data_wait_share']:.0%} | {r['seconds']:.0f} s") if i == 0 else "| | | | "
            lines.append(f"| {name if i == 0 else ''} | {direction.replace('_to_', ' -> ')} | "
                         f"{r[f'{direction}/R@1/before']:.1%} -> {r[f'{direction}/R@1/after']:.1%} | "
                         f"{r[f'{direction}/R@5/before']:.1%} -> {r[f'{direction}/R@5/after']:.1%} | {tail} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m xfast.training.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/demo"),
                        help="folder for the two runs (replaced on every demo; default runs/demo)")
    parser.add_argument("--data", type=Path, default=None,
                        help="demo dataset folder (default $XFAST_DEMO_DATA or ~/.cache/xfast/demo-data)")
    parser.add_argument("--ranks", type=int, default=2, help="training processes per run (default 2)")
    parser.add_argument("--only", choices=RUNS, action="append", help="run only this config (repeatable)")
    parser.add_argument("--set", metavar="KEY=VALUE", action="append", default=[], dest="overrides",
                        help="config override passed to both runs, e.g. --set train.steps=50")
    args = parser.parse_args(argv)
    if args.ranks < 1:
        parser.error("--ranks must be >= 1")

    root, manifest = demo_data.ensure(args.data)
    os.environ["XFAST_DEMO_DATA"] = str(root)  # the demo configs read their paths from it
    results = {}
    for config in args.only or RUNS:
        run_dir = args.out / config
        shutil.rmtree(run_dir, ignore_errors=True)  # a demo always trains from scratch
        code, seconds = launch(config, run_dir, args.ranks, args.overrides)
        if code != 0:
            print(f"demo: training {config} failed with exit code {code}", file=sys.stderr)
            return code
        results[config] = dict(summarize(run_dir), seconds=seconds)
    report = table(results, manifest["images"]["test"]["count"])
    print("\n" + report)
    (args.out / "results.md").write_text(report + "\n")
    chance = 5 / manifest["images"]["test"]["count"]
    learned = all(r[f"text_to_{r['media']}/R@5/after"] > 2 * chance for r in results.values())
    print(f"\ntraining {'works' if learned else 'did NOT reach twice the chance R@5'}; "
          f"runs and TensorBoard logs in {args.out}")
    return 0 if learned else 1


if __name__ == "__main__":
    raise SystemExit(main())
