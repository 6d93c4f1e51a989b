"""xfast's own training step against the plain transformers loop, paired, in one process, in memory.

One process builds xfast without DeepSpeed (bench_train's xfast_torch step: towers, Objective,
whole_batch_step under RepeatedSteps, clipping, AdamW) and the transformers loop (bench_train's
transformers step) over the same tiny model size, takes 4 batches from the loader, closes it, and
runs one step of each per round on the same batch, the order alternating (AB, BA, ...). Reported:
median step time of each, the median of per-round ratios (loop time / xfast time: > 1 means
xfast is faster) and the median of per-round differences (xfast - loop, ms) with its
distribution-free 95% interval. No loader and no DeepSpeed run during the timed steps, so this is
the cost of the step itself; run it from two checkouts (PYTHONPATH) alternately to compare them.
--adamw default gives both torch's default AdamW (xfast's engine otherwise takes the fused kernel
on CPU; the loop's is torch's default unless --adamw fused). --compile on compiles xfast's towers
(as train.compile; in the untimed warmup) and leaves the loop eager.

    python benchmarks/bench_step_inmem.py --size tiny_clip --adamw fused --rounds 60 [--compile on] [--label COMMIT --save]
"""
from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_train  # noqa: E402
from rounds import median_interval  # noqa: E402


def build(size_name: str, adamw_kind: str, compiled: bool = False):
    """({"xfast_torch": step, "transformers": step}, 4 batches), warmed up (compiled first if asked)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    import torch

    import xfast.training.engine as engine
    from xfast.training import demo_data
    from xfast.training.process import keep_freed_memory

    keep_freed_memory()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    if adamw_kind == "default":  # xfast's parameter groups with torch's default AdamW kernel
        def default_adamw(module, *, lr, weight_decay, betas, eps, tower_lr=None, device_type=None):
            groups = engine.param_groups(module, lr=lr, weight_decay=weight_decay, tower_lr=tower_lr)
            for group in groups:
                del group["names"]
            return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        engine.adamw = default_adamw
    size = bench_train.SIZES[size_name]
    root, _ = demo_data.ensure()
    engine.init_distributed()
    model = bench_train._xfast_model(size, root / "tokenizer")
    compile_with = bench_train.compile_options(size, "on" if compiled else "off")
    steps = {"xfast_torch": bench_train._xfast_step(copy.deepcopy(model), size, "xfast_torch", 1, {}, compile_with)}
    _, steps["transformers"], _ = bench_train._transformers_step_fn(size, root / "tokenizer", adamw_kind)
    source = bench_train._loader(size, size["batch"], root, model.tokenizer, rank=0, world=1)
    stream = iter(source)
    batches = list(itertools.islice(stream, 4))
    stream.close()  # no loader worker may run during the timed steps (nor block the exit)
    source.close()
    for i in range(5):
        for step in steps.values():
            float(step([batches[i % 4]]))
    return steps, batches


def measure(size_name: str, adamw_kind: str, rounds: int, compiled: bool = False) -> dict:
    steps, batches = build(size_name, adamw_kind, compiled)
    names = list(steps)
    times: dict[str, list[float]] = {m: [] for m in names}
    for i in range(rounds):
        for m in (names if i % 2 == 0 else names[::-1]):
            start = time.perf_counter()
            float(steps[m]([batches[i % 4]]))
            times[m].append(time.perf_counter() - start)
    ratios = [b / a for a, b in zip(times["xfast_torch"], times["transformers"])]
    diffs = [1e3 * (a - b) for a, b in zip(times["xfast_torch"], times["transformers"])]
    median, ci95 = median_interval(diffs)
    return {"size": size_name, "adamw": adamw_kind, "rounds": rounds, "compiled": compiled,
            "xfast_ms": statistics.median(times["xfast_torch"]) * 1e3,
            "transformers_ms": statistics.median(times["transformers"]) * 1e3,
            "speed_ratio": statistics.median(ratios), "diff_ms": median, "diff_ci95": ci95, "round_diffs_ms": diffs}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="tiny_clip", choices=["tiny_clip", "tiny_clap"], help="model size (bench_train.SIZES)")
    p.add_argument("--adamw", default="fused", choices=["fused", "default"],
                   help="AdamW kernel of both steps: fused (xfast's choice) or torch's default (the plain loop's)")
    p.add_argument("--rounds", type=int, default=60, help="paired rounds (default 60)")
    p.add_argument("--compile", choices=("on", "off"), default="off",
                   help="compile xfast's towers as train.compile does (the loop stays eager); compiled in warmup")
    p.add_argument("--label", default="", help="names the checkout measured (e.g. a commit) in the saved row")
    p.add_argument("--save", action="store_true",
                   help="add the result (with every round's difference) to benchmarks/results/step_inmem.json")
    args = p.parse_args(argv)
    load = open("/proc/loadavg").read().split()[0]
    result = measure(args.size, args.adamw, args.rounds, args.compile == "on")
    result.update(label=args.label, machine=bench_train.machine(), load_at_start=load,
                  date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                  command="python benchmarks/bench_step_inmem.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    print("RESULT " + json.dumps(result), flush=True)
    if args.save:  # appended: runs of two checkouts alternate, each adds its row
        out = bench_train.RESULTS / "step_inmem.json"
        rows = json.loads(out.read_text()) if out.exists() else []
        out.write_text(json.dumps(rows + [result], indent=1) + "\n")
    os._exit(0)  # torch/DeepSpeed threads left by init_distributed must not hold the exit


if __name__ == "__main__":
    sys.exit(main())
