"""PNG plots of evaluation results and of a run's training curves (metrics.jsonl).

Figures are drawn on matplotlib.figure.Figure (Agg canvas) without pyplot, so no display is
needed and a notebook's pyplot backend is left alone.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from matplotlib.figure import Figure

from xfast.eval.retrieval import RetrievalRanks

# (panel title, x = alignment key, y = uniformity key) of geometry_metrics / the STS geometry task.
GEOMETRY_PANELS = (
    ("text space", "text/alignment", "text/uniformity"),
    ("across modalities", "cross/alignment", "joint/uniformity"),
)


def plot_alignment_uniformity(metrics: Mapping[str, Mapping[str, float]], path: str | Path, *, panels=GEOMETRY_PANELS) -> Path:
    """Alignment (x) vs uniformity (y), one labelled point per checkpoint, one panel per space
    that some checkpoint has both values for. Lower-left is better on both axes."""
    drawn = [p for p in panels if any(p[1] in m and p[2] in m for m in metrics.values())]
    if not drawn:
        wanted = ", ".join(f"{x} + {y}" for _, x, y in panels)
        raise ValueError(f"no checkpoint has alignment and uniformity values to plot (looked for {wanted})")
    fig = Figure(figsize=(5.5 * len(drawn), 4.5))
    axes = fig.subplots(1, len(drawn), squeeze=False)
    for ax, (title, x_key, y_key) in zip(axes[0], drawn):
        points = [(name, m[x_key], m[y_key]) for name, m in metrics.items() if x_key in m and y_key in m]
        for i, (name, x, y) in enumerate(points):
            ax.scatter([x], [y], s=60, color=f"C{i % 10}", zorder=3)
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(6, 6), fontsize=9)
        ax.set_title(title)
        ax.set_xlabel(f"alignment ({x_key}, lower is better)")
        ax.set_ylabel(f"uniformity ({y_key}, lower is better)")
        ax.grid(True, alpha=0.3)
        ax.margins(0.25)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    return path


def plot_recall_curves(ranks: Mapping[str, RetrievalRanks], path: str | Path, *, max_k: int = 50,
                       media_name: str = "media") -> Path:
    """Recall@K for K = 1..max_k in both retrieval directions, one line per checkpoint."""
    if not ranks:
        raise ValueError("ranks is empty: nothing to plot")
    if isinstance(max_k, bool) or not isinstance(max_k, int) or max_k < 1:
        raise ValueError(f"max_k must be a positive integer, got {max_k!r}")
    ks = torch.arange(1, max_k + 1)
    fig = Figure(figsize=(11, 4.5))
    axes = fig.subplots(1, 2, sharey=True)
    directions = ((f"text → {media_name}", "text_to_media"), (f"{media_name} → text", "media_to_text"))
    for ax, (title, attr) in zip(axes, directions):
        for i, (name, r) in enumerate(ranks.items()):
            r_at = getattr(r, attr)
            curve = (r_at[None, :] <= ks[:, None]).double().mean(1) * 100
            # Markers at R@1/5/10 keep overlapping curves (e.g. all at 100%) visible.
            ax.plot(ks.numpy(), curve.numpy(), label=name, color=f"C{i % 10}", marker="o", markersize=4,
                    markevery=[k - 1 for k in (1, 5, 10) if k <= max_k])
        ax.set_title(title)
        ax.set_xscale("log")
        ticks = [k for k in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000) if k <= max_k]
        ax.set_xticks(ticks, [str(k) for k in ticks])
        ax.set_xlabel("K")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("recall@K (%)")
    axes[0].set_ylim(0, 100)
    axes[1].legend(loc="lower right")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    return path


def read_metrics(path: str | Path) -> list[dict]:
    """Rows of a run's metrics.jsonl; a step logged twice (a resumed run) keeps its last row per kind."""
    rows: dict[tuple[int, bool], dict] = {}
    lines = Path(path).read_text().splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                continue  # a last line cut short by a crash
            raise ValueError(f"{path}:{number}: not a JSON line") from None
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows[(row["step"], any(k.startswith("eval/") for k in row))] = row
    return [rows[k] for k in sorted(rows)]


def plot_training_curves(metrics_path: str | Path, path: str | Path) -> Path:
    """Loss (and its parts), logit scale and evaluation recall@K against step, from metrics.jsonl."""
    rows = read_metrics(metrics_path)
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if any(k.startswith("eval/") for k in r)]
    if not train and not evals:
        raise ValueError(f"{metrics_path}: no training or evaluation rows to plot")
    eval_keys = sorted({k for r in evals for k in r if k.startswith("eval/") and "/R@" in k}) or \
        sorted({k for r in evals for k in r if k.startswith("eval/")})
    panels = [("loss", [k for k in ("loss",) if any(k in r for r in train)] +
               sorted({k for r in train for k in r if k.startswith("loss/")}), train),
              ("logit scale", ["logit_scale"] if any("logit_scale" in r for r in train) else [], train),
              ("evaluation", eval_keys, evals)]
    panels = [p for p in panels if p[1]]
    fig = Figure(figsize=(5 * len(panels), 4))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, keys, source) in zip(axes, panels):
        for i, key in enumerate(keys):
            points = [(r["step"], r[key]) for r in source if isinstance(r.get(key), (int, float))]
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, label=key.removeprefix("eval/"), color=f"C{i % 10}",
                        marker="o" if source is evals else None, markersize=3)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
        if len(keys) > 1:
            ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    return path
