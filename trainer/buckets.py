"""Aspect-ratio buckets: which training size an image gets and how it is cropped to it.

A bucket is a (width, height) in pixels, both multiples of `step` (16 or a multiple of it: one FLUX.2
latent token covers 16 x 16 pixels), whose area is as close to resolution^2 as those steps allow without
exceeding it. Every image goes to the bucket whose aspect ratio is closest to its own (compared in log
space, so 2:1 and 1:2 are equally far from 1:1), is resized to cover the bucket and is center-cropped.
Everything here is pure arithmetic and deterministic; a test pins exact assignments.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

TOKEN_PIXELS = 16
"""Pixels per latent token side (VAE 8x down, then 2x2 patchify): bucket sides must be multiples of it."""


@dataclass(frozen=True, kw_only=True, slots=True)
class CropPlan:
    """How one image becomes one bucket: resize to (resized_width, resized_height), then crop the bucket out."""

    bucket: tuple[int, int]
    """(width, height) of the training image."""
    resized: tuple[int, int]
    """(width, height) after the aspect-preserving resize that covers the bucket."""
    crop: tuple[int, int]
    """(left, top) of the bucket inside the resized image."""
    scale: float
    """Resize factor (> 1 means the image is upscaled)."""


def _check_bucket_args(resolution: int, *, step: int, min_aspect: float, max_aspect: float) -> None:
    if not isinstance(step, int) or step < TOKEN_PIXELS or step % TOKEN_PIXELS:
        raise ValueError(f"bucket step {step!r} must be a positive multiple of {TOKEN_PIXELS} (one latent token).")
    if not isinstance(resolution, int) or resolution < step:
        raise ValueError(
            f"resolution {resolution!r} must be an integer >= the bucket step ({step}); FLUX.2 trains at 512-1024."
        )
    if not (0 < min_aspect <= 1 <= max_aspect):
        raise ValueError(
            f"min_aspect={min_aspect} and max_aspect={max_aspect} must satisfy 0 < min_aspect <= 1 <= max_aspect "
            "(aspect = width / height); the defaults are 0.25 and 4."
        )


@lru_cache(maxsize=64)
def _bucket_sizes(resolution: int, step: int, min_aspect: float, max_aspect: float) -> tuple[tuple[int, int], ...]:
    area = resolution * resolution
    buckets = []
    for h in range(step, area // step + 1, step):
        w = (area // h) // step * step
        if w < step:
            break
        # Maximal: neither side can grow by one step without passing the area, which keeps one bucket per
        # shape instead of many near-duplicates (e.g. 1008x256 next to 1024x256).
        if (w + step) * h <= area or w * (h + step) <= area:
            continue
        if min_aspect <= w / h <= max_aspect:
            buckets.append((w, h))
    return tuple(sorted(set(buckets), key=lambda b: (b[0] / b[1], b[0])))


def bucket_sizes(
    resolution: int, *, step: int = TOKEN_PIXELS, min_aspect: float = 0.25, max_aspect: float = 4.0
) -> list[tuple[int, int]]:
    """All (width, height) buckets for a resolution, sorted from tallest to widest.

    A bucket has both sides multiples of step, area <= resolution^2, and is maximal: adding one step to either
    side would pass the area. Aspect ratios (width / height) lie in [min_aspect, max_aspect]. The set is
    symmetric: (w, h) is a bucket exactly when (h, w) is (for symmetric aspect limits).
    """
    _check_bucket_args(resolution, step=step, min_aspect=min_aspect, max_aspect=max_aspect)
    return list(_bucket_sizes(resolution, step, float(min_aspect), float(max_aspect)))


def assign_bucket(
    width: int,
    height: int,
    *,
    resolution: int,
    step: int = TOKEN_PIXELS,
    min_aspect: float = 0.25,
    max_aspect: float = 4.0,
) -> tuple[int, int]:
    """The bucket (width, height) whose aspect ratio is closest to width / height.

    Distance is |log(bucket aspect) - log(image aspect)|; an exact tie goes to the larger area, then to the
    wider bucket, so the choice never depends on iteration order. Images beyond the aspect limits go to the
    most extreme bucket and lose more to the crop.
    """
    if width < 1 or height < 1:
        raise ValueError(f"image size {width}x{height} must be at least 1x1 pixel.")
    target = math.log(width / height)

    def distance(bucket: tuple[int, int]) -> tuple[float, int, int]:
        bw, bh = bucket
        # Rounded so that mathematically equal distances (e.g. 1:2 vs 2:1 around 1:1) compare equal.
        return (round(abs(math.log(bw / bh) - target), 12), -bw * bh, -bw)

    return min(bucket_sizes(resolution, step=step, min_aspect=min_aspect, max_aspect=max_aspect), key=distance)


def plan_crop(width: int, height: int, *, bucket: tuple[int, int]) -> CropPlan:
    """Resize (width, height) to cover bucket with the aspect ratio kept, then center-crop: the geometry.

    The scale is max(bw / width, bh / height), so one side matches the bucket exactly and the other side
    is at least as long; the excess is split evenly, the odd pixel going to the right or bottom.
    """
    bw, bh = bucket
    scale = max(bw / width, bh / height)
    rw = max(bw, round(width * scale))
    rh = max(bh, round(height * scale))
    return CropPlan(bucket=(bw, bh), resized=(rw, rh), crop=((rw - bw) // 2, (rh - bh) // 2), scale=scale)
