"""Figures of the evaluation report (pyplot-free Agg figures, so they work headless and in threads).

The Pareto plot must stay readable with the demo's 27 methods, many of them at nearly the same
point: each method is a numbered marker, numbers are placed where they overlap neither another
number nor a marker and stay inside the axes, and a key beside the plot maps numbers to names.
Each axis is zoomed to the methods' range (with the ceiling and floor noted, as lines or as edge notes),
every point carries its 95 % interval, and a digit panel (both digit scorers) sits beside the semantic one.
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


BOUND_COLORS = ("tab:green", "tab:gray")  # ceiling, floor
DIGIT_SCORERS = (("digit_acc", "CNN", "o"), ("digit2_acc", "2nd scorer", "D"))  # key, name, marker


def _interval(row: dict, key: str) -> tuple[float, float] | None:
    """(below, above) distances of a row's 95 % interval from its value, in %; None without one."""
    if row.get(f"{key}_lo") is None or row.get(f"{key}_hi") is None:
        return None
    return 100 * (row[key] - row[f"{key}_lo"]), 100 * (row[f"{key}_hi"] - row[key])


def _speed_bar(row: dict) -> tuple[float, float] | None:
    """(below, above) distances of the measured speedup's interquartile range from its median; None without one."""
    if row.get("speedup_q1") is None or row.get("speedup_q3") is None:
        return None
    return max(row["speedup"] - row["speedup_q1"], 0.0), max(row["speedup_q3"] - row["speedup"], 0.0)


def _zoom(values: list[tuple[float, float]], pad: float = 0.08, min_span: float = 2.0) -> tuple[float, float]:
    """Axis limits around [low, high] ranges: the methods' range plus `pad` of it on each side, at least
    `min_span` wide (so near-equal methods are not blown up into noise)."""
    low, high = min(v[0] for v in values), max(v[1] for v in values)
    span = max(high - low, min_span)
    mid = (low + high) / 2
    return mid - span * (0.5 + pad), mid + span * (0.5 + pad)


def _bounds_lines(ax, bounds: dict[str, dict], key: str, scorer: str = "", used: dict | None = None,
                  linestyle: str = "--") -> None:
    """Each bound (ceiling, floor) of `key` as a dashed line where it lies inside the zoomed axis, else as a
    note at the axis edge it lies beyond, with its value (`used`: notes already at each edge, shared by calls
    on one axis)."""
    low, high = ax.get_ylim()
    edge = {"above": 0.985, "below": 0.015}
    used = {"above": 0, "below": 0} if used is None else used
    for (name, b), color in zip(bounds.items(), BOUND_COLORS):
        if b.get(key) is None:
            continue
        value = 100 * b[key]
        text = f"{name}{scorer}: {value:.1f} %"
        if low <= value <= high:
            ax.axhline(value, color=color, linestyle=linestyle, linewidth=1, label=text)
            continue
        side = "above" if value > high else "below"
        y = edge[side] - (0.045 if side == "above" else -0.045) * used[side]
        used[side] += 1
        ax.text(0.01, y, f"{'↑' if side == 'above' else '↓'} {text} (off the zoomed axis)", transform=ax.transAxes,
                fontsize=6.5, color=color, ha="left", va="top" if side == "above" else "bottom")


def _scatter_with_bars(ax, rows: list[dict], key: str, colors: list[str], marker: str = "o", hollow: bool = False,
                       x_scale: float = 1.0) -> list[tuple[float, float]]:
    """Each row at (speedup, 100 key) with its 95 % interval (y) and the speedup's IQR (x) as error bars;
    returns the plotted points."""
    xy = []
    for r, color in zip(rows, colors):
        if r.get(key) is None:
            continue
        x, y = r["speedup"] * x_scale, 100 * r[key]
        yerr, xerr = _interval(r, key), _speed_bar(r)
        ax.errorbar(x, y, yerr=None if yerr is None else [[yerr[0]], [yerr[1]]],
                    xerr=None if xerr is None else [[xerr[0] * x_scale], [xerr[1] * x_scale]],
                    fmt=marker, ms=4.5, color=color, mfc="white" if hollow else color, elinewidth=0.7, capsize=1.5,
                    zorder=3, alpha=0.9)
        xy.append((x, y))
    return xy


def _y_ranges(rows: list[dict], keys: tuple[str, ...]) -> list[tuple[float, float]]:
    return [(100 * r.get(f"{k}_lo", r[k]), 100 * r.get(f"{k}_hi", r[k])) for r in rows for k in keys
            if r.get(k) is not None]


def pareto_figure(rows: list[dict], bounds: dict[str, dict] | None = None):
    """Two panels against the measured speedup, each zoomed to the methods' range: the semantic score, and
    the digit accuracy (the axis that separates methods) under both digit scorers (filled: the CNN; hollow
    diamonds: the second scorer). Every point carries its 95 % interval (vertical bar) and the speedup's
    interquartile range over timing rounds (horizontal bar); the ground-truth ceiling and noise floor are
    dashed lines (dotted: the second scorer's), or notes at the edge when they lie off the zoomed axis. Numbered markers, and the key
    (number -> method, speedup, semantic, digit) beside the panels."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    bounds = bounds or {}
    n = len(rows)
    fig = Figure(figsize=(17, max(5.5, 0.16 * n + 1.4)), dpi=120)
    canvas = FigureCanvasAgg(fig)
    grid = fig.add_gridspec(1, 3, width_ratios=(2.2, 2.2, 1.9), left=0.045, right=0.995, bottom=0.1, top=0.9,
                            wspace=0.2)
    ax, digit_ax, key = fig.add_subplot(grid[0]), fig.add_subplot(grid[1]), fig.add_subplot(grid[2])
    key.axis("off")
    colors = [KIND_COLORS.get(r["kind"], "tab:gray") for r in rows]
    speeds = [(r.get("speedup_q1", r["speedup"]), r.get("speedup_q3", r["speedup"])) for r in rows]
    x_low, x_high = _zoom(speeds, min_span=0.2)
    x_limits = (max(x_low, 0.0), x_high)

    xy = _scatter_with_bars(ax, rows, "semantic", colors)
    ax.set_ylim(*_zoom(_y_ranges(rows, ("semantic",))))
    ax.set_xlim(*x_limits)
    _bounds_lines(ax, bounds, "semantic")
    ax.set_ylabel("semantic score (%), bars: 95 % interval")
    ax.set_title("Semantic score vs speedup")

    digit_keys = tuple(k for k, _, _ in DIGIT_SCORERS if any(r.get(k) is not None for r in rows))
    digit_xy = []
    for k, name, marker in DIGIT_SCORERS:
        if k in digit_keys:  # the second scorer's points a hair to the right, so both bars show
            pts = _scatter_with_bars(digit_ax, rows, k, colors, marker, hollow=k != "digit_acc",
                                     x_scale=1.0 if k == "digit_acc" else 1.015)
            digit_xy = digit_xy or pts
            digit_ax.plot([], [], marker, color="0.3", mfc="white" if k != "digit_acc" else "0.3", label=name)
    if digit_keys:
        digit_ax.set_ylim(*_zoom(_y_ranges(rows, digit_keys)))
        used = {"above": 0, "below": 0}
        for k, name, _ in DIGIT_SCORERS:
            if k in digit_keys:
                _bounds_lines(digit_ax, bounds, k, f" ({name})", used, "--" if k == "digit_acc" else ":")
    else:
        digit_ax.text(0.5, 0.5, "no digit scores", transform=digit_ax.transAxes, ha="center")
    digit_ax.set_xlim(*x_limits)
    digit_ax.set_ylabel("digit accuracy (%), bars: 95 % interval")
    digit_ax.set_title("Digit accuracy vs speedup (both scorers)")

    for a in (ax, digit_ax):
        a.set_xlabel("measured speedup (×, vs reference; bars: IQR of timing rounds)")
        a.grid(alpha=0.3)
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=6.5, loc="lower right")
        a.set_xlim(a.get_xlim())  # freeze the limits: label placement works in pixels
        a.set_ylim(a.get_ylim())
    renderer = canvas.get_renderer()
    fontsize = 7 if n <= 40 else 5
    numbered = [i for i, r in enumerate(rows) if r.get("semantic") is not None]
    _place_numbers(ax, xy, [str(i + 1) for i in numbered], fontsize, renderer)
    if digit_keys:
        on_digit = [i for i, r in enumerate(rows) if r.get(digit_keys[0]) is not None]
        _place_numbers(digit_ax, digit_xy, [str(i + 1) for i in on_digit], fontsize, renderer)
    step = 1.0 / max(n + 1, 26)  # one line per method, top to bottom, under the key's header
    key.text(0.0, 1.0 - 0.5 * step, "#  method  (speedup, S = semantic %, D = digit %: CNN / 2nd scorer)",
             fontsize=fontsize, va="center", ha="left", transform=key.transAxes, style="italic")
    for i, (r, color) in enumerate(zip(rows, colors)):
        digit = " / ".join(f"{100 * r[k]:.1f}" for k, _, _ in DIGIT_SCORERS if r.get(k) is not None)
        key.text(0.0, 1.0 - (i + 1.5) * step, f"{i + 1:>2}", color=color, fontsize=fontsize, fontweight="bold",
                 va="center", ha="left", transform=key.transAxes)
        key.text(0.07, 1.0 - (i + 1.5) * step,
                 f"{r['label']}  ({r['speedup']:.2f}×, S {100 * r['semantic']:.1f}" + (f", D {digit}" if digit else "")
                 + ")",
                 fontsize=fontsize, va="center", ha="left", transform=key.transAxes, clip_on=False)
    return fig
