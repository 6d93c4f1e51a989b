"""Where DeepSpeed's fixed cost per optimizer step goes, at the tiny sizes (no profiler).

One process per rank holds plain-torch (xfast_torch), ZeRO-0, ZeRO-2 and ZeRO-2 without xfast's
fast path (xfast.training.zero_fastpath; "ZeRO-2 DeepSpeed's own") copies of one model (as
bench_train's paired measurement) and runs one step of each per round on the same in-memory
batch, in a balanced order (benchmarks/rounds.py; rounds rounded up to whole orders). Each step is timed in three parts: forward + loss, engine.backward,
engine.step; the table gives each part's median difference to the torch step of the same round
(with a distribution-free 95% interval), and the fast path's saving is the paired difference of the
two ZeRO-2 engines. With --compile on every copy's towers are compiled (as train.compile). Inside
the ZeRO-2 engines, timers around its optimizer's
per-step methods (instance attributes of this process's engine: measurement only) say which
DeepSpeed code the difference is spent in; nested methods overlap (reduce_ipg_grads runs inside
independent_gradient_partition_epilogue), and each timer costs about a microsecond per call.
On 2 ranks a part's difference also holds the wait for the other rank at its first collective
(ZeRO reduces in backward, the torch step in step): compare totals there. --variant adds further
ZeRO-2 engines with DeepSpeed config keys over xfast's (same process, same rounds): their total
difference to the torch step is reported next to xfast's config's.

    python benchmarks/bench_deepspeed_step.py                       # tiny_clip, 1 and 2 ranks
    python benchmarks/bench_deepspeed_step.py --sizes tiny_clap --ranks 1 --rounds 60 --save
    python benchmarks/bench_deepspeed_step.py --sizes tiny_clap --compile on --save deepspeed_step_fastpath
    python benchmarks/bench_deepspeed_step.py --variant overlap='{"zero_optimization": {"overlap_comm": true}}'
"""
from __future__ import annotations

import argparse
import copy
import functools
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_train  # noqa: E402
from rounds import balanced_rounds, median_interval, round_order  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
ENGINES = (("torch", "xfast_torch", True), ("zero0", "xfast_zero0", True), ("zero2", "xfast", True),
           ("zero2_ds", "xfast", False))  # (name, bench_train method, fast path)
LABELS = {"zero0": "ZeRO-0", "zero2": "ZeRO-2", "zero2_ds": "ZeRO-2 DeepSpeed's own"}
PARTS = ("forward_loss", "backward", "step")
# DeepSpeed 0.19 ZeRO-1/2 optimizer methods that run every step (deepspeed/runtime/zero/stage_1_and_2.py)
ZERO2_METHODS = ("process_gradients", "update_hook_state_and_maybe_run_epilogue",
                 "independent_gradient_partition_epilogue", "reduce_ipg_grads", "get_all_grad_tensors",
                 "get_flat_partition", "scaled_global_norm", "get_grad_norm_direct", "unscale_and_clip_grads",
                 "flatten", "flatten_dense_tensors_aligned", "free_grad_in_param_list", "_optimizer_step",
                 "_update_model_bit16_weights", "zero_grad")
ZERO2_FUNCTIONS = ("count_used_parameters_in_backward", "all_gather_dp_groups")  # module functions it calls


def _interval(diffs: list[float]) -> dict:
    median, ci95 = median_interval(diffs)
    return {"median": median, "ci95": ci95, "rounds": diffs}


def worker(size_name: str, rounds: int, warmup: int, variants: dict[str, dict], compile_flag: str) -> dict | None:
    """Runs in the subprocess (one per rank)."""
    import deepspeed.runtime.zero.stage_1_and_2 as zero12
    import torch

    from xfast.config import parse
    from xfast.models import Objective, ObjectiveConfig
    from xfast.training import demo_data
    from xfast.training.engine import init_distributed
    from xfast.training.process import keep_freed_memory
    from xfast.training.task import ContrastiveTask

    keep_freed_memory()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    size = bench_train.SIZES[size_name]
    root, _ = demo_data.ensure()
    rank, world = init_distributed()
    model = bench_train._xfast_model(size, root / "tokenizer")
    objective = Objective(parse(ObjectiveConfig, {}, "objective"))
    plan = objective.plan(0)
    compile_with = bench_train.compile_options(size, compile_flag)
    engines = {}

    def copy_of_model():
        towers = copy.deepcopy(model)
        if compile_with is not None:
            towers.compile_towers(mode=compile_with.mode, dynamic=compile_with.dynamic, backend=compile_with.backend)
        return ContrastiveTask(towers, objective)

    for name, method, fast_path in ENGINES:
        task = copy_of_model()
        engines[name] = task, bench_train._xfast_engine(task, size, method, world, {}, fast_path=fast_path)
    for label, extra in variants.items():
        task = copy_of_model()
        engines[f"zero2 {label}"] = task, bench_train._xfast_engine(task, size, "xfast", world, extra)
    timed_engines = ("zero2", "zero2_ds")
    spent: dict[str, dict[str, float]] = {name: {} for name in timed_engines}
    running = [""]  # the engine stepping now: the module functions' time goes to it

    def timed(owner, attr: str) -> None:
        inner = getattr(owner, attr)  # the fast path's replacement where it has one

        @functools.wraps(inner)
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                if running[0] in spent:
                    spent[running[0]][attr] = spent[running[0]].get(attr, 0.0) + time.perf_counter() - start
        setattr(owner, attr, wrapper)

    for name in timed_engines:
        for attr in ZERO2_METHODS:
            timed(engines[name][1].optimizer, attr)
    for attr in ZERO2_FUNCTIONS:  # looked up in the module at each call
        timed(zero12, attr)
    source = bench_train._loader(size, size["batch"] // world, root, model.tokenizer, rank=rank, world=world)
    stream = iter(source)
    batches = list(itertools.islice(stream, 4))
    stream.close()
    source.close()
    group = torch.distributed.group.WORLD if world > 1 else None

    def step(name: str, batch) -> tuple[float, float, float]:
        task, engine = engines[name]
        running[0] = name
        t0 = time.perf_counter()
        features, shared = engine({"pairs": batch, "plan": plan})
        loss, _ = task.loss(features, shared, plan, group=group)
        t1 = time.perf_counter()
        engine.backward(loss, scale_wrt_gas=False)
        t2 = time.perf_counter()
        engine.step()
        t3 = time.perf_counter()
        float(loss.detach())
        return t1 - t0, t2 - t1, t3 - t2

    names = list(engines)
    for i in range(warmup):
        for name in names:
            step(name, batches[i % len(batches)])
    for methods in spent.values():
        methods.clear()
    times: dict[str, list[tuple[float, float, float]]] = {name: [] for name in names}
    rounds = balanced_rounds(rounds, len(names))
    for i in range(rounds):
        for name in round_order(names, i):
            times[name].append(step(name, batches[i % len(batches)]))
    if rank != 0:
        return None
    result = {"size": size_name, "ranks": world, "rounds": rounds, "compiled": compile_with is not None,
              "parameter_tensors": sum(1 for _ in model.parameters()),
              "parameter_elements": sum(p.numel() for p in model.parameters()),
              "ms": {name: {part: 1e3 * statistics.median(t[k] for t in times[name]) for k, part in enumerate(PARTS)}
                     | {"total": 1e3 * statistics.median(sum(t) for t in times[name])} for name in names},
              **{f"{name}_methods_ms_per_step": {k: 1e3 * v / rounds for k, v in sorted(spent[name].items(),
                                                                                      key=lambda kv: -kv[1])}
                 for name in timed_engines}}
    result["variants"] = {label: {"extra": extra, "total_minus_torch_ms": _interval(
        [1e3 * (sum(a) - sum(b)) for a, b in zip(times[f"zero2 {label}"], times["torch"])])}
        for label, extra in variants.items()}
    for name, reference in (("zero0", "torch"), ("zero2", "torch"), ("zero2_ds", "torch"), ("zero2", "zero2_ds")):
        result[f"{name}_minus_{reference}_ms"] = {
            part: _interval([1e3 * (a[k] - b[k]) for a, b in zip(times[name], times[reference])])
            for k, part in enumerate(PARTS)} | {
            "total": _interval([1e3 * (sum(a) - sum(b)) for a, b in zip(times[name], times[reference])])}
    return result


def run(size_name: str, ranks: int, rounds: int, warmup: int, variants: dict[str, dict], compile_flag: str) -> dict:
    return bench_train.run_ranks(["--worker", size_name, "--rounds", str(rounds), "--warmup", str(warmup),
                                  "--compile", compile_flag,
                                  *(f"--variant={label}={json.dumps(extra)}" for label, extra in variants.items())],
                                 ranks, f"{size_name} on {ranks} ranks", script=__file__)


def table(results: list[dict]) -> str:
    lines = ["| size | ranks | compiled | torch step ms | engine | forward + loss | backward | step | total |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        for name, reference in (("zero0", "torch"), ("zero2", "torch"), ("zero2_ds", "torch"), ("zero2", "zero2_ds")):
            key = f"{name}_minus_{reference}_ms"
            if key not in r:  # a result saved before the fast path
                continue
            cells = [f"{d['median']:+.2f} [{d['ci95'][0]:+.2f}, {d['ci95'][1]:+.2f}]"
                     for d in (r[key][part] for part in (*PARTS, "total"))]
            lines.append(f"| {r['size']} | {r['ranks']} | {'yes' if r.get('compiled') else 'no'} | "
                         f"{r['ms']['torch']['total']:.1f} | {LABELS[name]} - {LABELS.get(reference, reference)} | "
                         + " | ".join(cells) + " |")
    for r in results:
        for label, v in r.get("variants", {}).items():
            d = v["total_minus_torch_ms"]
            lines.append(f"| {r['size']} | {r['ranks']} | {'yes' if r.get('compiled') else 'no'} | "
                         f"{r['ms']['torch']['total']:.1f} | ZeRO-2 {label} - torch | | | | "
                         f"{d['median']:+.2f} [{d['ci95'][0]:+.2f}, {d['ci95'][1]:+.2f}] |")
    labels = {label: v["extra"] for r in results for label, v in r.get("variants", {}).items()}
    lines += [""] + [f"- ZeRO-2 {label}: xfast's config + `{json.dumps(extra)}`" for label, extra in labels.items()]
    keys = results[0].get("zero2_ds_methods_ms_per_step", results[0]["zero2_methods_ms_per_step"])
    lines += ["", "ZeRO-2 optimizer methods, ms per step (nested ones overlap; fast path = xfast's replacement "
              "where it has one, else DeepSpeed's method):", "",
              "| size | ranks | engine | " + " | ".join(f"`{k}`" for k in keys) + " |",
              "|---|---|---|" + "---|" * len(keys)]
    for r in results:
        for name, label in (("zero2_ds", "DeepSpeed's own"), ("zero2", "fast path")):
            if f"{name}_methods_ms_per_step" in r:
                lines.append(f"| {r['size']} | {r['ranks']} | {label} | "
                             + " | ".join(f"{r[f'{name}_methods_ms_per_step'].get(k, 0.0):.2f}" for k in keys) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["tiny_clip"], choices=("tiny_clip", "tiny_clap"),
                        help="model sizes of bench_train (default tiny_clip)")
    parser.add_argument("--ranks", nargs="+", type=int, default=[1, 2], help="rank counts (default 1 2)")
    parser.add_argument("--rounds", type=int, default=40, help="timed rounds, rounded up to whole balanced orders (default 40)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed rounds first (default 5)")
    parser.add_argument("--variant", action="append", default=[], metavar="LABEL=JSON",
                        help="a further ZeRO-2 engine with these DeepSpeed config keys over xfast's (repeatable), "
                             "e.g. overlap='{\"zero_optimization\": {\"overlap_comm\": true}}'")
    parser.add_argument("--compile", choices=("config", "on", "off"), default="config",
                        help="compile every copy's towers: on, off, or (config, default) as the size's demo config")
    parser.add_argument("--save", nargs="?", const="deepspeed_step", metavar="NAME",
                        help="write benchmarks/results/NAME.{json,md} (default NAME: deepspeed_step)")
    parser.add_argument("--worker", metavar="SIZE", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rounds < 2 or any(r < 1 for r in args.ranks):
        parser.error("--rounds must be >= 2 and --ranks >= 1")
    variants = {}
    for text in args.variant:
        label, sep, extra = text.partition("=")
        try:
            variants[label] = json.loads(extra)
        except json.JSONDecodeError as err:
            parser.error(f"--variant {text!r}: not LABEL=JSON ({err})")
        if not sep or not label or not isinstance(variants[label], dict):
            parser.error(f"--variant {text!r}: not LABEL=JSON with a JSON object")
    if args.worker:
        result = worker(args.worker, args.rounds, args.warmup, variants, args.compile)
        if result is not None:
            print("RESULT " + json.dumps(result), flush=True)
        return 0
    command = " ".join(["python", "benchmarks/bench_deepspeed_step.py", *(argv if argv is not None else sys.argv[1:])])
    results = []
    for size_name in args.sizes:
        for ranks in args.ranks:
            load = Path("/proc/loadavg").read_text().split()[0] if Path("/proc/loadavg").exists() else "?"
            result = run(size_name, ranks, args.rounds, args.warmup, variants, args.compile)
            result.update(load_at_start=load, date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
            results.append(result)
            print(table([result]), flush=True)
    text = table(results) + f"\n\n`{command}` on {bench_train.machine()}, {results[-1]['date']}\n"
    print(text)
    if args.save:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / f"{args.save}.json").write_text(json.dumps({"command": command, "machine": bench_train.machine(),
                                                                "results": results}, indent=1) + "\n")
        (RESULTS / f"{args.save}.md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
