"""PNG plots of evaluation results.

Figures are drawn on matplotlib.figure.Figure (Agg canvas) without pyplot, so no display is
needed and a notebook's pyplot backend is left alone.
"""
from __future__ import annotations

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
