"""A loss curve drawn with PIL (no plotting library), as a ComfyUI IMAGE tensor."""

from __future__ import annotations

import math


def smooth(values: list[float], *, factor: float) -> list[float]:
    """Exponential moving average with bias correction, as TensorBoard draws it."""
    out, avg = [], 0.0
    for i, v in enumerate(values, start=1):
        avg = factor * avg + (1 - factor) * v
        out.append(avg / (1 - factor**i) if factor > 0 else v)
    return out


def render_loss_plot(history: list[tuple[int, float]], *, width: int = 768, height: int = 384,
                     smoothing: float = 0.9):
    """(1, height, width, 3) float tensor in [0, 1]: raw loss in light blue, smoothed in dark blue."""
    import numpy as np
    import torch
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    points = [(int(s), float(l)) for s, l in history if math.isfinite(float(l))]
    left, right, top, bottom = 56, width - 16, 16, height - 32
    draw.rectangle([left, top, right, bottom], outline=(160, 160, 160))
    if not points:
        draw.text((left + 8, top + 8), "no loss values yet", fill=(80, 80, 80))
    else:
        steps = [p[0] for p in points]
        losses = [p[1] for p in points]
        smoothed = smooth(losses, factor=smoothing)
        lo, hi = min(losses), max(losses)
        if hi - lo < 1e-12:
            lo, hi = lo - 0.5, hi + 0.5
        s0, s1 = min(steps), max(max(steps), min(steps) + 1)

        def xy(step: int, loss: float) -> tuple[float, float]:
            x = left + (step - s0) / (s1 - s0) * (right - left)
            y = bottom - (loss - lo) / (hi - lo) * (bottom - top)
            return x, y

        for series, colour, w in ((losses, (150, 190, 235), 1), (smoothed, (20, 70, 160), 2)):
            coords = [xy(s, l) for s, l in zip(steps, series)]
            if len(coords) == 1:
                x, y = coords[0]
                draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
            else:
                draw.line(coords, fill=colour, width=w)
        draw.text((4, top), f"{hi:.4g}", fill=(60, 60, 60))
        draw.text((4, bottom - 10), f"{lo:.4g}", fill=(60, 60, 60))
        draw.text((left, bottom + 8), f"step {s0}", fill=(60, 60, 60))
        draw.text((right - 70, bottom + 8), f"step {max(steps)}", fill=(60, 60, 60))
        draw.text((left + 8, top + 4), f"loss (last {losses[-1]:.4f}, smoothed {smoothed[-1]:.4f})", fill=(20, 70, 160))
    array = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(array).unsqueeze(0)
