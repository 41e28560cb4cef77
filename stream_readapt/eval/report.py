"""What `evaluate` leaves behind: results.json, generations.jsonl, heatmap.png, a stdout table."""

from __future__ import annotations

import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)
METRICS = (("rougeL_recall", "ROUGE-L recall"), ("exact_match", "exact match"))


def write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2, allow_nan=False) + "\n", encoding="utf-8")


def _axis(points: list[dict], key: str) -> list[float]:
    return sorted({p[key] for p in points})


def write_heatmap(path: Path, points: list[dict]) -> bool:
    """One panel per metric over the α × β grid (α rows, β columns); False when there is no grid."""
    if not points or points[0]["alpha"] is None:
        return False
    import matplotlib

    matplotlib.use("Agg")  # files only: never a display
    import matplotlib.pyplot as plt

    alphas, betas = _axis(points, "alpha"), _axis(points, "beta")
    fig, axes = plt.subplots(1, len(METRICS), figsize=(4.2 * len(METRICS), 3.6), squeeze=False)
    for ax, (key, title) in zip(axes[0], METRICS):
        grid = [[float("nan")] * len(betas) for _ in alphas]
        for p in points:
            grid[alphas.index(p["alpha"])][betas.index(p["beta"])] = p[key]
        im = ax.imshow(grid, origin="lower", cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
        _annotate(ax, grid)
        ax.set(xticks=range(len(betas)), xticklabels=[f"{b:g}" for b in betas], xlabel="β (RE-Adapter)",
               yticks=range(len(alphas)), yticklabels=[f"{a:g}" for a in alphas], ylabel="α (knowledge)", title=title)
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _annotate(ax, grid) -> None:
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            if value == value:  # not NaN
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", color="w" if value < 0.6 else "k", fontsize=8)


def _fmt(value) -> str:
    return "-" if value is None else f"{value:g}"


def format_table(results: dict) -> str:
    """The grid as aligned text: one line per point, then retrieval and task figures."""
    lines = [f"{'alpha':>6} {'beta':>6} {'rougeL_recall':>14} {'exact_match':>12} {'n':>5}"]
    for p in results["points"]:
        lines.append(f"{_fmt(p['alpha']):>6} {_fmt(p['beta']):>6} {p['rougeL_recall']:>14.4f} "
                     f"{p['exact_match']:>12.4f} {p['n']:>5}")
        for task, metrics in (p.get("tasks") or {}).items():
            shown = ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, (int, float)))
            lines.append(f"{'':>14} {task}: {shown}")
    retrieval = results.get("retrieval")
    if retrieval and retrieval.get("recall_at_1") is not None:
        lines.append(f"retrieval {retrieval['method']}: recall@1 = {retrieval['recall_at_1']:.4f} "
                     f"({retrieval['n_with_gold']} questions with a gold passage)")
    lines.append(f"wrote {results.get('output')}")
    return "\n".join(lines)
