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
        rows.append({"name": f"m{i}", "label": f"method {i} ({kind}, interval {i % 5 + 1})", "kind": kind,
                     "speedup": float(speedup), "semantic": float(semantic)})
    rows[5]["speedup"], rows[5]["semantic"] = rows[9]["speedup"], rows[9]["semantic"]  # two identical points
    return rows


def test_pareto_labels_do_not_overlap_or_leave_the_canvas(tmp_path):
    rows = demo_like_rows()
    fig = pareto_figure(rows, {"ground truth": {"semantic": 0.93}, "noise": {"semantic": 0.05}})
    fig.savefig(tmp_path / "pareto.png")
    renderer = fig.canvas.get_renderer()
    ax, key = fig.axes
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
