"""Small synthetic images for dataset tests (imported by test modules: tests/ is put on sys.path)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def noise_png(path: Path, size: tuple[int, int], *, seed: int, caption: str | None = None) -> Path:
    """A (width, height) RGB noise PNG, deterministic per seed, with a same-name .txt caption when given.

    The caption is written byte for byte (UTF-8, line ends as given), so tests control \\r\\n exactly.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    if caption is not None:
        path.with_suffix(".txt").write_bytes(caption.encode("utf-8"))
    return path
