"""The Pareto plot stays readable with the demo's 27 methods (issue 13 item 7): no two point labels
overlap, none covers a marker or leaves the axes, and the key lists every method inside the canvas."""
from __future__ import annotations

import itertools

import numpy as np
from matplotlib.text import Text

from evaluation.plots import pareto_figure


def demo_like_rows(n: int = 27) -> list[dict]:
    """27 methods as in the demo: the reference, and clusters of caches/DisCa rows at almost the same point."""
    rng = np.random.default_rng(0)
    kinds = ["teacher_cfg", "cfg_distilled", "meanflow"] + ["cache"] * 15 + ["disca"] * (n - 18)
    rows = []
    for i, kind in enumerate(kinds):
        cluster = i % 4
        speedup = 1.0 if i == 0 else [1.6, 2.1, 4.8, 9.5][cluster] + 0.01 * rng.standard_normal()
        semantic = [0.62, 0.55, 0.31, 0.58][cluster] + 0.002 * rng.standard_normal()
        digit = semantic + 0.1 * cluster - 0.05
        rows.append({"name": f"m{i}", "label": f"method {i} ({kind}, interval {i % 5 + 1})", "kind": kind,
                     "speedup": float(speedup), "semantic": float(semantic), "semantic_lo": semantic - 0.02,
                     "semantic_hi": semantic + 0.015, "digit_acc": digit, "digit_acc_lo": digit - 0.03,
                     "digit_acc_hi": digit + 0.03, "digit2_acc": digit - 0.04, "digit2_acc_lo": digit - 0.07,
                     "digit2_acc_hi": digit - 0.01, "speedup_q1": float(speedup) * 0.97,
                     "speedup_q3": float(speedup) * 1.02})
    rows[5]["speedup"], rows[5]["semantic"] = rows[9]["speedup"], rows[9]["semantic"]  # two identical points
    return rows


BOUNDS = {"ground truth (ceiling)": {"semantic": 0.93, "digit_acc": 0.94, "digit2_acc": 0.955},
          "noise (floor)": {"semantic": 0.05, "digit_acc": 0.1, "digit2_acc": 0.09}}


def test_pareto_labels_do_not_overlap_or_leave_the_canvas(tmp_path):
    rows = demo_like_rows()
    fig = pareto_figure(rows, BOUNDS)
    fig.savefig(tmp_path / "pareto.png")
    renderer = fig.canvas.get_renderer()
    ax, _, key = fig.axes
    numbers = [t for t in ax.texts if t.get_text().isdigit()]
    assert sorted(int(t.get_text()) for t in numbers) == list(range(1, len(rows) + 1))
    boxes = [Text.get_window_extent(t, renderer) for t in numbers]  # the number, without its leader line
    for a, b in itertools.combinations(boxes, 2):
        assert not a.overlaps(b), (a, b)
    inside = ax.get_window_extent(renderer)
    for box in boxes:
        assert inside.x0 <= box.x0 and box.x1 <= inside.x1 and inside.y0 <= box.y0 and box.y1 <= inside.y1
    markers = ax.transData.transform([(r["speedup"], 100 * r["semantic"]) for r in rows])
    for box in boxes:
        assert not any(box.contains(x, y) for x, y in markers)
    canvas = fig.bbox
    key_texts = [t for t in key.texts]
    for r in rows:
        assert any(t.get_text().startswith(r["label"]) for t in key_texts), r["label"]
    key_boxes = [t.get_window_extent(renderer) for t in key_texts]
    for box in key_boxes:
        assert canvas.x0 <= box.x0 and box.x1 <= canvas.x1 and canvas.y0 <= box.y0 and box.y1 <= canvas.y1
    for a, b in itertools.combinations(key_boxes, 2):
        assert not (a.overlaps(b) and abs(a.y0 - b.y0) > 1), (a, b)  # lines of the key do not collide


def test_pareto_axes_are_zoomed_with_intervals_bounds_and_a_digit_panel():
    """Issue 25 item 7: each panel zoomed to the methods' range (not 0-100), a 95 % interval bar per point,
    the ceiling and floor noted although they lie off the zoomed axis, and a digit panel with both scorers."""
    from matplotlib.container import ErrorbarContainer

    rows = demo_like_rows()
    fig = pareto_figure(rows, BOUNDS)
    ax, digit_ax, _ = fig.axes
    low, high = ax.get_ylim()
    sem = [100 * r["semantic"] for r in rows]
    assert min(sem) - 5 < low < min(sem) - 2 and max(sem) + 1.5 < high < max(sem) + 6  # zoomed, not 0-100
    bars = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    assert len(bars) == len(rows) and all(c.has_yerr and c.has_xerr for c in bars)
    notes = [t.get_text() for t in ax.texts if "off the zoomed axis" in t.get_text()]
    assert any("ceiling" in t and "93.0" in t for t in notes) and any("floor" in t and "5.0" in t for t in notes)
    assert "Digit" in digit_ax.get_title()
    digit_bars = [c for c in digit_ax.containers if isinstance(c, ErrorbarContainer)]
    assert len(digit_bars) == 2 * len(rows)  # the CNN's and the second scorer's point per method
    d_low, d_high = digit_ax.get_ylim()
    digits = [100 * r[k] for r in rows for k in ("digit_acc_lo", "digit_acc_hi", "digit2_acc_lo", "digit2_acc_hi")]
    assert min(digits) - 8 < d_low <= min(digits) and max(digits) <= d_high < max(digits) + 8
    digit_notes = " ".join(t.get_text() for t in digit_ax.texts)
    assert "(CNN): 94.0" in digit_notes and "(2nd scorer): 95.5" in digit_notes and "(2nd scorer): 9.0" in digit_notes
    # a row written before the second scorer existed (no digit2_acc, no intervals) still plots
    old = [{k: v for k, v in r.items() if k in ("name", "label", "kind", "speedup", "semantic", "digit_acc")}
           for r in rows[:4]]
    fig = pareto_figure(old, {"ground truth (ceiling)": {"semantic": 0.93, "digit_acc": 0.94}})
    assert len([c for c in fig.axes[1].containers if isinstance(c, ErrorbarContainer)]) == 4
