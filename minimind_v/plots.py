"""Pictures of a run: the loss curve as a PNG, drawn with Pillow (a runtime dependency; no matplotlib).

Where it sits: at the end of `train`, which writes `loss.png` beside the metrics.
"""
from __future__ import annotations

import math
from pathlib import Path


def draw_loss_curve(steps: list[int], losses: list[float], path: Path, title: str = "training loss") -> None:
    """A small line chart of (step, loss); non-finite losses are left out."""
    from PIL import Image, ImageDraw

    W, H, L, R, T, B = 640, 400, 60, 20, 30, 40
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    d.text((L, 8), title, fill="black")
    d.rectangle([L, T, W - R, H - B], outline="black")
    finite = [(s, v) for s, v in zip(steps, losses) if math.isfinite(v)]
    if finite:
        s0, s1 = finite[0][0], max(finite[-1][0], finite[0][0] + 1)
        lo, hi = min(v for _, v in finite), max(v for _, v in finite)
        hi = hi if hi > lo else lo + 1.0
        sx = lambda s: L + (W - R - L) * (s - s0) / (s1 - s0)
        sy = lambda v: H - B - (H - B - T) * (v - lo) / (hi - lo)
        for frac in (0.0, 0.5, 1.0):
            v = lo + frac * (hi - lo)
            d.text((4, sy(v) - 6), f"{v:.3g}", fill="black")
            d.line([L - 4, sy(v), L, sy(v)], fill="black")
        d.text((L, H - B + 6), str(s0), fill="black")
        d.text((W - R - 40, H - B + 6), str(s1), fill="black")
        d.text(((W - 30) // 2, H - B + 20), "step", fill="black")
        d.line([(sx(s), sy(v)) for s, v in finite] if len(finite) > 1 else [(sx(s0), sy(finite[0][1]))] * 2,
               fill=(31, 119, 180), width=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
