"""Figures of the evaluation report (pyplot-free Agg figures, so they work headless and in threads).

The Pareto plot must stay readable with the demo's 27 methods, many of them at nearly the same
point: each method is a numbered marker, numbers are placed where they overlap neither another
number nor a marker and stay inside the axes, and a key beside the plot maps numbers to names.
"""
from __future__ import annotations

import math

KIND_COLORS = {"teacher_cfg": "black", "cfg_distilled": "tab:purple", "meanflow": "tab:orange",
               "cache": "tab:blue", "disca": "tab:red"}
LABEL_OFFSETS = [(r * math.cos(a), r * math.sin(a)) for r in (6, 11, 17, 24, 32, 41, 51)
                 for a in (math.pi / 4 * k + (math.pi / 8 if r % 2 else 0) for k in range(8))]  # points


def _overlap(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def _place_numbers(ax, xy: list[tuple[float, float]], texts: list[str], fontsize: float, renderer) -> list:
    """Annotate each point with its text at the first offset (nearest first) whose box overlaps no placed
    label and no marker and lies inside the axes; far labels get a thin leader line."""
    inside = ax.get_window_extent(renderer)
    markers = [ax.transData.transform(p) for p in xy]
    placed, boxes = [], []
    pad = 3.0  # pixels around a marker that labels keep clear of

    def cost(box) -> float:
        clash = sum(_overlap(box, b) for b in boxes)
        clash += sum(box.x0 - pad < mx < box.x1 + pad and box.y0 - pad < my < box.y1 + pad for mx, my in markers)
        outside = box.x0 < inside.x0 or box.x1 > inside.x1 or box.y0 < inside.y0 or box.y1 > inside.y1
        return clash + 100 * outside

    for (x, y), text in zip(xy, texts):
        best = None
        for dx, dy in LABEL_OFFSETS:
            ann = ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", ha="center", va="center",
                              fontsize=fontsize)
            box = ann.get_window_extent(renderer)
            c = cost(box)
            ann.remove()
            if best is None or c < best[0]:
                best = (c, dx, dy, box)
            if c == 0:
                break
        _, dx, dy, box = best
        far = math.hypot(dx, dy) > 8
        placed.append(ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", ha="center",
                                  va="center", fontsize=fontsize,
                                  arrowprops=dict(arrowstyle="-", lw=0.4, color="0.5", shrinkA=0, shrinkB=2)
                                  if far else None))
        boxes.append(box)
    return placed


def pareto_figure(rows: list[dict], bounds: dict[str, dict] | None = None):
    """Semantic score vs measured speedup: one numbered marker per method (coloured by kind), the key
    (number -> method) beside the axes, and the ground-truth ceiling and noise floor as dashed lines."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = len(rows)
    fig = Figure(figsize=(11, max(5.0, 0.16 * n + 1.2)), dpi=120)
    canvas = FigureCanvasAgg(fig)
    grid = fig.add_gridspec(1, 2, width_ratios=(2.6, 1.4), left=0.07, right=0.99, bottom=0.1, top=0.92, wspace=0.04)
    ax, key = fig.add_subplot(grid[0]), fig.add_subplot(grid[1])
    key.axis("off")
    xy = [(r["speedup"], 100 * r["semantic"]) for r in rows]
    colors = [KIND_COLORS.get(r["kind"], "tab:gray") for r in rows]
    ax.scatter([p[0] for p in xy], [p[1] for p in xy], s=18, c=colors, zorder=3)
    for (name, b), color in zip((bounds or {}).items(), ("tab:green", "tab:gray")):
        ax.axhline(100 * b["semantic"], color=color, linestyle="--", linewidth=1, label=name)
    if bounds:
        ax.legend(fontsize=7, loc="lower right")
    ax.margins(0.15)
    ax.set_xlabel("measured speedup (×, vs reference)")
    ax.set_ylabel("semantic score (%)")
    ax.set_title("Semantic score vs speedup")
    ax.grid(alpha=0.3)

    ax.set_xlim(ax.get_xlim())  # freeze the autoscaled limits: label placement works in pixels
    ax.set_ylim(ax.get_ylim())
    renderer = canvas.get_renderer()
    fontsize = 7 if n <= 40 else 5
    _place_numbers(ax, xy, [str(i) for i in range(1, n + 1)], fontsize, renderer)
    step = 1.0 / max(n, 26)  # one line per method, top to bottom
    for i, (r, color) in enumerate(zip(rows, colors)):
        key.text(0.0, 1.0 - (i + 0.5) * step, f"{i + 1:>2}", color=color, fontsize=fontsize, fontweight="bold",
                 va="center", ha="left", transform=key.transAxes)
        key.text(0.07, 1.0 - (i + 0.5) * step, f"{r['label']}  ({r['speedup']:.2f}×, {100 * r['semantic']:.1f}%)",
                 fontsize=fontsize, va="center", ha="left", transform=key.transAxes, clip_on=False)
    return fig
