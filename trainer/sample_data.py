"""A small generated dataset for the demo and the tests: coloured shapes on white, with captions.

Made by code (no files shipped, no licence questions): coloured squares and circles at random places,
each with a same-name .txt caption naming its colour and shape.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (40, 80, 220), "yellow": (230, 200, 40)}
SHAPES = ("square", "circle")


def make_sample_dataset(*, out_dir: str | os.PathLike, count: int = 8, size: int = 64, seed: int = 0,
                        shapes: tuple[str, ...] = ("square",)) -> Path:
    """Write count PNG images (size x size) with captions into out_dir; refuses to overwrite other files."""
    from PIL import Image, ImageDraw

    if count < 1 or size < 16:
        raise ValueError(f"make-sample-dataset: count must be >= 1 and size >= 16, got {count} and {size}.")
    unknown = set(shapes) - set(SHAPES)
    if unknown:
        raise ValueError(f"make-sample-dataset: unknown shapes {sorted(unknown)}; choose from {', '.join(SHAPES)}.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    foreign = [p.name for p in out.iterdir() if not (p.name.startswith("img") and p.suffix in (".png", ".txt"))]
    if foreign:
        raise ValueError(f"make-sample-dataset: {out} holds other files ({foreign[:3]}); choose an empty folder.")
    rng = random.Random(seed)
    names = list(COLOURS)
    half = size // 2
    for i in range(count):
        colour, shape = names[i % len(names)], shapes[(i // len(names)) % len(shapes)]
        image = Image.new("RGB", (size, size), (240, 240, 240))
        x, y = rng.randint(size // 16, half - 2), rng.randint(size // 16, half - 2)
        box = [x, y, x + half - size // 16, y + half - size // 16]
        draw = ImageDraw.Draw(image)
        (draw.rectangle if shape == "square" else draw.ellipse)(box, fill=COLOURS[colour])
        image.save(out / f"img{i}.png")
        (out / f"img{i}.txt").write_text(f"a {colour} {shape} on a white background", encoding="utf-8")
    return out
