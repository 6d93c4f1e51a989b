"""The main job: train a tiny CLAP and a tiny CLIP on the built-in demo data and show that they learn.

    python -m xfast.training.demo            # (what `make demo` runs)

1. generates the procedural demo dataset if absent (seconds; $XFAST_DEMO_DATA or
   ~/.cache/xfast/demo-data);
2. runs `deepspeed --num_gpus 2 xfast/train.py --cfg demo_clap_tiny` and the same for
   demo_clip_tiny: 2 ranks (CPU processes without GPUs), ZeRO-2, whole-batch accumulation;
3. prints held-out retrieval before vs after training (the trainer evaluates at step 0 and at the
   end) and the losses, next to the chance level, for each run as soon as it ends.

Runs live in OUT/<config> and are never deleted: an interrupted demo resumes where its
checkpoints left off, a finished run is not trained again (its result is read back), and
`--fresh` starts over. A time estimate is printed before anything starts.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from xfast.distributed.rendezvous import free_port
from xfast.training import demo_data

TRAIN_PY = Path(__file__).resolve().parent.parent / "train.py"
RUNS = ("demo_clap_tiny", "demo_clip_tiny")
# Wall time of each run through the deepspeed launcher with 2 CPU ranks (the README's table,
# 2-core AMD EPYC): seconds in all, the start-up part of them (launcher, imports, process group,
# model, first evaluation), and the steps trained.
MEASURED = {"demo_clap_tiny": (117.0, 25.0, 1000), "demo_clip_tiny": (138.0, 25.0, 2000)}
GENERATE_S = 10.0


def launch(config: str, output_dir: Path, ranks: int, overrides: list[str]) -> tuple[int, float]:
    """Run the trainer through the deepspeed launcher; returns (exit code, seconds)."""
    launcher = Path(sys.executable).with_name("deepspeed")
    command = [str(launcher) if launcher.exists() else "deepspeed", "--num_gpus", str(ranks),
               "--master_port", str(free_port()), str(TRAIN_PY), "--cfg", config,
               "--set", f"output_dir={output_dir}"]
    for override in overrides:
        command += ["--set", override]
    print("$ " + " ".join(command), flush=True)
    start = time.perf_counter()
    code = subprocess.call(command, env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
    return code, time.perf_counter() - start


def plan_run(config: str, overrides: list[str], run_dir: Path):
    """(its TrainConfig, the checkpoint's step or 0, whether it is complete), or None when the
    config does not load (the run itself then reports why)."""
    from xfast.config import ConfigError
    from xfast.training.config import load_config
    from xfast.training.run_dir import plan_resume

    try:
        cfg = load_config(config, [*overrides, f"output_dir={run_dir}"])
        plan = plan_resume(cfg)
    except ConfigError:
        return None
    complete = plan is not None and plan.complete and (not cfg.checkpoint.export_fp32 or (run_dir / "final").is_dir())
    return cfg, (plan.step if plan is not None else 0), complete


def estimate_seconds(config: str, steps_left: int, ranks: int) -> float:
    """Expected wall time of one run from MEASURED, scaled to the steps it has left to train."""
    total_s, startup_s, steps_measured = MEASURED.get(config, (60.0, 25.0, 1000))
    # Two ranks were measured; a step's work is split between them (on 2 or more free cores).
    per_step = (total_s - startup_s) / steps_measured * 2 / min(ranks, 2)
    return startup_s + steps_left * per_step


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
                        help="folder for the runs, one subfolder each (default runs/demo); a run found there "
                             "resumes, or is only reported when it is complete")
    parser.add_argument("--fresh", action="store_true", help="delete the runs under --out first and train anew")
    parser.add_argument("--data", type=Path, default=None,
                        help="demo dataset folder (default $XFAST_DEMO_DATA or ~/.cache/xfast/demo-data)")
    parser.add_argument("--ranks", type=int, default=2, help="training processes per run (default 2)")
    parser.add_argument("--only", choices=RUNS, action="append", help="run only this config (repeatable)")
    parser.add_argument("--set", metavar="KEY=VALUE", action="append", default=[], dest="overrides",
                        help="config override passed to both runs, e.g. --set train.steps=50")
    args = parser.parse_args(argv)
    if args.ranks < 1:
        parser.error("--ranks must be >= 1")

    configs = args.only or RUNS
    if args.fresh:
        for config in configs:
            shutil.rmtree(args.out / config, ignore_errors=True)
    if args.data is not None:
        os.environ["XFAST_DEMO_DATA"] = str(args.data)  # the demo configs read their paths from it
    data_ready = (demo_data.default_root() / "manifest.json").is_file()
    plans = {c: plan_run(c, args.overrides, args.out / c) for c in configs}
    estimates = {c: 0.0 if p and p[2] else estimate_seconds(c, p[0].train.steps - p[1] if p else 0, args.ranks)
                 for c, p in plans.items()}
    parts = ", ".join(f"{c} ~{s:.0f} s" if s else f"{c} complete" for c, s in estimates.items())
    total = sum(estimates.values()) + (0 if data_ready else GENERATE_S)
    print(f"demo: about {total / 60:.1f} min ({parts}{'' if data_ready else ', data generation'}; measured on 2 "
          f"CPU cores, longer on a busy machine)", flush=True)

    root, manifest = demo_data.ensure(args.data)
    os.environ["XFAST_DEMO_DATA"] = str(root)
    test_items = manifest["images"]["test"]["count"]
    results = {}
    for config in configs:
        run_dir = args.out / config
        timing = run_dir / "demo_seconds.txt"
        if plans[config] and plans[config][2]:
            print(f"demo: {run_dir} is complete; reporting it (--fresh trains it again)", flush=True)
            seconds = float(timing.read_text()) if timing.is_file() else float("nan")
        else:
            code, seconds = launch(config, run_dir, args.ranks, args.overrides)
            if code != 0:
                hint = (f" ({run_dir} may hold a run of another config: see the message above; --fresh starts over)"
                        if code == 2 else "")
                print(f"demo: training {config} failed with exit code {code}{hint}", file=sys.stderr)
                return code
            timing.write_text(f"{seconds:.1f}\n")
        results[config] = dict(summarize(run_dir), seconds=seconds)
        print("\n" + table({config: results[config]}, test_items) + "\n", flush=True)
    report = table(results, test_items)
    if len(results) > 1:
        print(report)
    (args.out / "results.md").write_text(report + "\n")
    chance = 5 / manifest["images"]["test"]["count"]
    learned = all(r[f"text_to_{r['media']}/R@5/after"] > 2 * chance for r in results.values())
    print(f"\ntraining {'works' if learned else 'did NOT reach twice the chance R@5'}; "
          f"runs and TensorBoard logs in {args.out}")
    return 0 if learned else 1


if __name__ == "__main__":
    raise SystemExit(main())
