"""Evaluate every run of a study on the same data and write the report: a markdown table (arm x
metric, mean +- std over seeds), the alignment-vs-uniformity scatter and the JSON behind them.

Each metric is what `xfast eval` prints for the run folder with the same task (the command is
recorded next to each value in report.json); results are cached per run in study_eval.json
and recomputed when the evaluation spec changes.
"""
from __future__ import annotations

import json
import math
import os
import statistics
from dataclasses import asdict
from pathlib import Path

from matplotlib.figure import Figure

from xfast.study.runner import EvalSpec, Run, StudyPlan

EVAL_CACHE = "study_eval.json"


def eval_tasks(spec: EvalSpec, modality: str) -> dict[str, dict]:
    """Named xfast.eval tasks of one run, with the `xfast eval` options each one takes."""
    tasks = {}
    heldout = spec.heldout.get(modality)
    if heldout:
        tasks["retrieval"] = {"task": "retrieval", "data": heldout, "ks": [1, 5]}
        tasks["geometry"] = {"task": "geometry", "data": heldout}
    if spec.zeroshot and spec.zeroshot.get("modality", modality) == modality:
        tasks["zeroshot"] = {"task": "zeroshot", **{k: v for k, v in spec.zeroshot.items() if k != "modality"}}
    if spec.sts:
        tasks["sts"] = {"task": "sts", "data": spec.sts, "space": "sentence"}
        tasks["sentence_geometry"] = {"task": "geometry", "data": spec.sts, "space": "sentence"}
    return tasks


def eval_command(run: Run, task: dict, spec: EvalSpec) -> str:
    """The `xfast eval` command line that prints the same numbers for this run."""
    parts = ["xfast eval", f"--ckpt {run.folder}", f"--task {task['task']}", f"--data '{task['data']}'"]
    if "space" in task:
        parts.append(f"--space {task['space']}")
    if "ks" in task:
        parts.append("--ks " + " ".join(map(str, task["ks"])))
    for key, flag in (("classnames", "--classnames"), ("templates", "--templates")):
        value = task.get(key)
        if value:
            parts.append(flag + " " + " ".join(f"'{v}'" for v in ([value] if isinstance(value, str) else value)))
    if task.get("label_key"):
        parts.append(f"--label-key {task['label_key']}")
    parts += [f"--batch-size {spec.batch_size}", f"--block {spec.block}"]
    return " ".join(parts)


def evaluate_run(run: Run, spec: EvalSpec) -> dict[str, dict[str, float]]:
    """{task name: metrics} of one finished run, exactly as `xfast eval --ckpt RUN` computes them."""
    import torch

    from xfast.eval import runner
    from xfast.eval.cli import load_checkpoint

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer, data_config = load_checkpoint(str(run.folder), device)
    out = {}
    for name, task in eval_tasks(spec, model.modality).items():
        result = runner.run_task(model, tokenizer, runner.parse_task(task, name), batch_size=spec.batch_size,
                                 block=spec.block, load_batches=runner.xfast_data_batches,
                                 data_config=data_config)
        out[name] = result.metrics
    return out


def evaluate_runs(runs: list[Run], spec: EvalSpec, say=print) -> dict[str, dict]:
    """{run label: {"arm", "seed", "metrics": {task: metrics}, "commands": {task: command}}}."""
    results = {}
    for index, run in enumerate(runs, start=1):
        cache = run.folder / EVAL_CACHE
        key = json.dumps(asdict(spec), sort_keys=True)
        cached = json.loads(cache.read_text()) if cache.is_file() else {}
        if cached.get("spec") != key or cached.get("trained") != _trained_stamp(run):
            say(f"[{index}/{len(runs)}] {run.label}: evaluating")
            cached = {"spec": key, "trained": _trained_stamp(run), "metrics": evaluate_run(run, spec)}
            partial = cache.with_name(f".{cache.name}.{os.getpid()}")
            partial.write_text(json.dumps(cached, indent=1) + "\n")
            os.replace(partial, cache)
        tasks = eval_tasks(spec, run.arm.modality)
        results[run.label] = {"arm": run.arm.name, "seed": run.seed, "folder": str(run.folder),
                              "metrics": cached["metrics"],
                              "commands": {name: eval_command(run, task, spec) for name, task in tasks.items()}}
    return results


def _trained_stamp(run: Run) -> str:
    """Changes whenever the run is trained again (its done marker is rewritten)."""
    return (run.folder / "study_done.json").read_text()


def summary_metrics(modality: str) -> list[tuple[str, str, str]]:
    """(column, task, metric key) of the report table, in order."""
    return [
        (f"text→{modality} R@1", "retrieval", f"text_to_{modality}/R@1"),
        (f"text→{modality} R@5", "retrieval", f"text_to_{modality}/R@5"),
        (f"{modality}→text R@1", "retrieval", f"{modality}_to_text/R@1"),
        (f"{modality}→text R@5", "retrieval", f"{modality}_to_text/R@5"),
        ("zero-shot top-1", "zeroshot", "top1"),
        ("STS Spearman", "sts", "spearman"),
        ("text uniformity", "geometry", "text/uniformity"),
        ("cross-modal alignment", "geometry", "cross/alignment"),
        ("sentence uniformity", "sentence_geometry", "text/uniformity"),
    ]


def aggregate(results: dict[str, dict], runs: list[Run]) -> dict[str, dict[str, dict]]:
    """{arm: {column: {"mean", "std", "n", "values"}}} over the arm's seeds (std with n - 1; 0 for one seed)."""
    table: dict[str, dict[str, dict]] = {}
    for arm in dict.fromkeys(r.arm for r in runs):
        labels = [r.label for r in runs if r.arm == arm]
        row = {}
        for column, task, key in summary_metrics(arm.modality):
            values = [results[label]["metrics"].get(task, {}).get(key) for label in labels]
            values = [v for v in values if v is not None and not math.isnan(v)]
            if values:
                std = statistics.stdev(values) if len(values) > 1 else 0.0
                row[column] = {"mean": statistics.fmean(values), "std": std, "n": len(values), "values": values}
        table[arm.name] = row
    return table


def markdown_table(table: dict[str, dict[str, dict]]) -> str:
    columns = list(dict.fromkeys(c for row in table.values() for c in row))
    lines = ["| arm | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for arm, row in table.items():
        cells = []
        for column in columns:
            cell = row.get(column)
            if cell is None:
                cells.append("-")
            elif "R@" in column or "top-1" in column:
                cells.append(f"{100 * cell['mean']:.1f} ± {100 * cell['std']:.1f}")
            else:
                cells.append(f"{cell['mean']:.3f} ± {cell['std']:.3f}")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_geometry(table: dict[str, dict[str, dict]], path: Path) -> Path | None:
    """Cross-modal alignment (x) vs text uniformity (y): each arm's mean with std bars, its seeds as
    small dots. Lower-left is better on both axes."""
    x_key, y_key = "cross-modal alignment", "text uniformity"
    arms = [arm for arm, row in table.items() if x_key in row and y_key in row]
    if not arms:
        return None
    fig = Figure(figsize=(6.5, 5))
    ax = fig.subplots()
    for i, arm in enumerate(arms):
        x, y = table[arm][x_key], table[arm][y_key]
        colour = f"C{i % 10}"
        ax.scatter(x["values"], y["values"], s=14, color=colour, alpha=0.45)
        ax.errorbar([x["mean"]], [y["mean"]], xerr=[x["std"]], yerr=[y["std"]], fmt="o", color=colour,
                    markersize=8, capsize=3, label=arm)
    ax.set_xlabel("cross-modal alignment (E‖text − media‖², lower = better aligned)")
    ax.set_ylabel("text uniformity (log E exp(−2‖x − y‖²), lower = more uniform)")
    ax.set_title("arms: mean ± std over seeds (dots: single seeds)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def write_report(results: dict[str, dict], runs: list[Run], plan: StudyPlan, say=print) -> dict:
    table = aggregate(results, runs)
    seeds = ", ".join(map(str, plan.seeds))
    text = (f"# Study report\n\nArms x metrics, mean ± std over seeds {seeds} (recall and accuracy in %).\n"
            f"Bases: {', '.join(f'{m}: {b}' for m, b in plan.bases.items())}.\n\n" + markdown_table(table) + "\n")
    costs = [json.loads((r.folder / "study_done.json").read_text()) for r in runs]
    wall, cpu = sum(c["seconds"] for c in costs), sum(c.get("cpu_seconds", 0.0) for c in costs)
    text += f"\nTraining: {len(runs)} runs, {wall:.0f} s wall clock, {cpu:.0f} CPU seconds in all.\n"
    out = plan.out
    figure = plot_geometry(table, out / "alignment_uniformity.png")
    if figure is not None:
        text += f"\n![alignment vs uniformity]({figure.name})\n"
    record = {"bases": plan.bases, "arms": [a.name for a in plan.arms], "seeds": plan.seeds,
              "overrides": plan.overrides, "evaluation": asdict(plan.evaluation), "table": table, "runs": results,
              "training_seconds": {r.label: c for r, c in zip(runs, costs)}}
    (out / "report.json").write_text(json.dumps(record, indent=1) + "\n")
    (out / "report.md").write_text(text)
    say("\n" + markdown_table(table))
    say(f"\nwrote {out / 'report.md'}, {out / 'report.json'}" + (f", {figure}" if figure else ""))
    return record
