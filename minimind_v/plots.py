"""Pictures of a run, drawn with Pillow (a runtime dependency; no matplotlib).

Where it sits: at the end of `train`, which writes `loss.png` beside the metrics, and in
`report.py`, which draws the charts of `report.md`: line charts (loss, lr, gradient norm,
throughput per step, one or more series) and grouped bar charts (accuracy per question type).
"""
from __future__ import annotations

import math
from pathlib import Path

PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (120, 120, 120)]


def draw_chart(series: dict, path: Path, title: str, xlabel: str = "step", log_y: bool = False) -> None:
    """A line chart of several series {name: (xs, ys)}; non-finite (and, with log_y, non-positive)
    values are left out."""
    from PIL import Image, ImageDraw

    W, H, L, R, T, B = 640, 400, 64, 20, 30, 40
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    d.text((L, 8), title, fill="black")
    d.rectangle([L, T, W - R, H - B], outline="black")
    f = (lambda v: math.log10(v)) if log_y else (lambda v: v)
    clean = {name: [(x, f(y)) for x, y in zip(xs, ys) if math.isfinite(y) and (y > 0 or not log_y)]
             for name, (xs, ys) in series.items()}
    points = [p for pts in clean.values() for p in pts]
    if points:
        x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
        x1 = x1 if x1 > x0 else x0 + 1
        lo, hi = min(p[1] for p in points), max(p[1] for p in points)
        hi = hi if hi > lo else lo + 1.0
        sx = lambda x: L + (W - R - L) * (x - x0) / (x1 - x0)                  # noqa: E731
        sy = lambda v: H - B - (H - B - T) * (v - lo) / (hi - lo)              # noqa: E731
        for frac in (0.0, 0.5, 1.0):
            v = lo + frac * (hi - lo)
            d.text((4, sy(v) - 6), f"{10 ** v if log_y else v:.3g}", fill="black")
            d.line([L - 4, sy(v), L, sy(v)], fill="black")
        d.text((L, H - B + 6), f"{x0:g}", fill="black")
        d.text((W - R - 40, H - B + 6), f"{x1:g}", fill="black")
        d.text(((W - 30) // 2, H - B + 20), xlabel, fill="black")
        for i, (name, pts) in enumerate(clean.items()):
            colour = PALETTE[i % len(PALETTE)]
            if pts:
                d.line([(sx(x), sy(v)) for x, v in pts] if len(pts) > 1 else [(sx(pts[0][0]), sy(pts[0][1]))] * 2,
                       fill=colour, width=2)
            if len(clean) > 1:
                d.text((W - R - 150, T + 6 + 14 * i), name, fill=colour)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def draw_loss_curve(steps: list[int], losses: list[float], path: Path, title: str = "training loss") -> None:
    """A small line chart of (step, loss)."""
    draw_chart({"loss": (steps, losses)}, path, title)


def draw_bars(groups: list[str], series: dict, path: Path, title: str) -> None:
    """Grouped bars of values in [0, 1]: one group per label in `groups`, one bar per series {name: values}."""
    from PIL import Image, ImageDraw

    W, H, L, R, T, B = 640, 360, 44, 20, 30, 50
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    d.text((L, 8), title, fill="black")
    d.line([L, H - B, W - R, H - B], fill="black")
    for frac in (0.0, 0.5, 1.0):
        y = H - B - (H - B - T) * frac
        d.text((4, y - 6), f"{frac:.0%}", fill="black")
        d.line([L - 4, y, W - R, y], fill=(220, 220, 220))
    n = max(len(series), 1)
    width = (W - R - L) / max(len(groups), 1)
    bar = width * 0.8 / n
    for g, label in enumerate(groups):
        x = L + g * width + width * 0.1
        for i, (name, values) in enumerate(series.items()):
            v = max(0.0, min(1.0, values[g]))
            d.rectangle([x + i * bar, H - B - (H - B - T) * v, x + (i + 1) * bar - 1, H - B],
                        fill=PALETTE[i % len(PALETTE)])
        d.text((x, H - B + 6), label[:12], fill="black")
    for i, name in enumerate(series):
        d.text((L + 110 * i, H - B + 26), name, fill=PALETTE[i % len(PALETTE)])
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
