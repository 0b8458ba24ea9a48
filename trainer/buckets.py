"""Aspect-ratio buckets: which training size an image gets and how it is cropped to it.

A bucket is a (width, height) in pixels, both multiples of `step` (16 or a multiple of it: one FLUX.2
latent token covers 16 x 16 pixels), whose area is as close to resolution^2 as those steps allow without
exceeding it. Every image goes to the bucket whose aspect ratio is closest to its own (compared in log
space, so 2:1 and 1:2 are equally far from 1:1), is resized to cover the bucket and is center-cropped.
Everything here is pure arithmetic and deterministic; a test pins exact assignments.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
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
def _maximal_buckets(area: int, step: int, min_aspect: float, max_aspect: float) -> tuple[tuple[int, int], ...]:
    """Shapes with sides in multiples of step and at most area pixels, sorted by aspect ratio.

    Maximal: neither side can grow by one step without passing the area, which keeps one bucket per shape
    instead of many near-duplicates (e.g. 1008x256 next to 1024x256).
    """
    buckets = []
    for h in range(step, area // step + 1, step):
        w = (area // h) // step * step
        if w < step:
            break
        if (w + step) * h <= area or w * (h + step) <= area:
            continue
        if min_aspect <= w / h <= max_aspect:
            buckets.append((w, h))
    return tuple(sorted(set(buckets), key=lambda b: (b[0] / b[1], b[0])))


def _bucket_sizes(resolution: int, step: int, min_aspect: float, max_aspect: float) -> tuple[tuple[int, int], ...]:
    return _maximal_buckets(resolution * resolution, step, min_aspect, max_aspect)


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


def plan_crop(width: int, height: int, *, bucket: tuple[int, int], min_scale: float = 0.0) -> CropPlan:
    """Resize (width, height) to cover bucket with the aspect ratio kept, then center-crop: the geometry.

    The scale is max(bw / width, bh / height), so one side matches the bucket exactly and the other side
    is at least as long; the excess is split evenly, the odd pixel going to the right or bottom. min_scale
    (downsample_scale's, for target_downsample_size) keeps more of the image's resolution: the crop then takes
    the bucket from a larger resize.
    """
    bw, bh = bucket
    scale = max(bw / width, bh / height, min_scale)
    rw = max(bw, round(width * scale))
    rh = max(bh, round(height * scale))
    return CropPlan(bucket=(bw, bh), resized=(rw, rh), crop=((rw - bw) // 2, (rh - bh) // 2), scale=scale)


# ----------------------------------------------------------------------------- SimpleTuner dataset geometry

RESOLUTION_TYPES: tuple[str, ...] = ("pixel_area", "area", "pixel")
CROP_ASPECTS: tuple[str, ...] = ("square", "preserve", "closest", "random")
CROP_STYLES: tuple[str, ...] = ("center", "random", "corner")


def target_area(resolution: float, *, resolution_type: str) -> int:
    """Pixels a bucket holds for SimpleTuner's resolution / resolution_type.

    pixel_area: resolution is a side, the area resolution^2 (1024 -> 1,048,576 pixels); area: resolution is in
    megapixels (1.05 -> 1,050,000 pixels); pixel: resolution is the shorter side, so the square area.
    """
    if resolution_type == "area":
        return int(round(float(resolution) * 1_000_000))
    if resolution_type in ("pixel_area", "pixel"):
        return int(round(float(resolution))) ** 2
    raise ValueError(f"resolution_type {resolution_type!r} is not one of {', '.join(RESOLUTION_TYPES)}.")


def image_size_measure(width: int, height: int, *, resolution_type: str) -> float:
    """An image's size in the unit of minimum_image_size / maximum_image_size for resolution_type.

    pixel_area: the side of the equal-area square (sqrt(w*h)), compared with a pixel side such as 1024;
    area: megapixels (w*h / 1e6); pixel: the shorter side.
    """
    if resolution_type == "pixel_area":
        return math.sqrt(width * height)
    if resolution_type == "area":
        return width * height / 1_000_000
    if resolution_type == "pixel":
        return float(min(width, height))
    raise ValueError(f"resolution_type {resolution_type!r} is not one of {', '.join(RESOLUTION_TYPES)}.")


def downsample_scale(width: int, height: int, *, size: float, resolution_type: str) -> float:
    """The factor that brings an image to SimpleTuner's target_downsample_size, in resolution_type's unit
    (pixel_area: the side of the equal-area square; area: megapixels; pixel: the shorter side), aspect kept."""
    if resolution_type == "pixel":
        return size / min(width, height)
    return math.sqrt(target_area(size, resolution_type=resolution_type) / (width * height))


def _floor_step(value: float, step: int) -> int:
    return max(step, int(value // step) * step)


def _round_step(value: float, step: int) -> int:
    return max(step, int(round(value / step)) * step)


def choose_bucket(
    width: int,
    height: int,
    *,
    resolution: float,
    resolution_type: str = "pixel_area",
    crop: bool = True,
    crop_aspect: str = "closest",
    crop_aspect_buckets: Sequence[tuple[float, float]] = (),
    random_key: str = "",
    step: int = TOKEN_PIXELS,
    min_aspect: float = 0.25,
    max_aspect: float = 4.0,
) -> tuple[int, int]:
    """The training size of one image under SimpleTuner-style dataset settings.

    - crop_aspect "closest" (with pixel_area / area): the bucket of the fixed list with the nearest aspect
      (assign_bucket), so many images share a bucket.
    - crop_aspect "square": one square bucket whose side is the largest multiple of step within the area.
    - crop_aspect "preserve", crop false, and resolution_type "pixel": the image's own aspect (clamped to the
      aspect limits) scaled to the area, each side rounded to the nearest multiple of step; with "pixel" the
      shorter side is resolution rounded down to a multiple of step. Only the rounding is cropped away.
    - crop_aspect "random", or "closest" with crop_aspect_buckets ((aspect, weight) pairs; crop must be true):
      the aspect select_crop_aspect picks from that list (random: drawn from random_key; closest: the nearest
      listed one) replaces the image's own, then sized as preserve (or as "pixel") does.
    """
    if width < 1 or height < 1:
        raise ValueError(f"image size {width}x{height} must be at least 1x1 pixel.")
    if crop_aspect not in CROP_ASPECTS:
        raise ValueError(f"crop_aspect {crop_aspect!r} is not one of {', '.join(CROP_ASPECTS)}.")
    if crop_aspect == "random" and not (crop and crop_aspect_buckets):
        raise ValueError("crop_aspect 'random' needs crop true and a non-empty crop_aspect_buckets list to draw from.")
    area = target_area(resolution, resolution_type=resolution_type)
    if area < step * step:
        raise ValueError(f"resolution {resolution!r} ({resolution_type}) is below one {step}x{step} bucket.")
    if crop and crop_aspect == "square":
        side = _floor_step(resolution, step) if resolution_type == "pixel" else _floor_step(math.sqrt(area), step)
        return side, side
    aspect = min(max(width / height, min_aspect), max_aspect)
    listed = crop and crop_aspect in ("random", "closest") and bool(crop_aspect_buckets)
    if listed:
        aspect = select_crop_aspect(width, height, crop_aspect=crop_aspect, crop_aspect_buckets=crop_aspect_buckets,
                                    random_key=random_key)
        if not min_aspect <= aspect <= max_aspect:
            raise ValueError(f"crop_aspect_buckets aspect {aspect:g} is outside [{min_aspect:g}, {max_aspect:g}].")
    if resolution_type == "pixel":
        short = _floor_step(resolution, step)
        long = _round_step(short * max(aspect, 1 / aspect), step)
        return (long, short) if aspect >= 1 else (short, long)
    if crop and crop_aspect == "closest" and not listed:
        return min(
            _bucket_sizes_for_area(area, step, float(min_aspect), float(max_aspect)),
            key=lambda b: (round(abs(math.log(b[0] / b[1]) - math.log(aspect)), 12), -b[0] * b[1], -b[0]),
        )
    # preserve (or no crop): the own aspect at the target area; random / listed closest: the chosen one.
    h = math.sqrt(area / aspect)
    return _round_step(h * aspect, step), _round_step(h, step)


def select_crop_aspect(
    width: int,
    height: int,
    *,
    crop_aspect: str,
    crop_aspect_buckets: Sequence[tuple[float, float]],
    random_key: str = "",
) -> float:
    """The aspect ratio (width / height) one image is cropped to, picked from crop_aspect_buckets.

    crop_aspect_buckets holds (aspect, weight) pairs with positive weights (a plain list of aspects gives each
    the weight 1 / n).
    - random: one weighted draw from sha256("aspect|" + random_key); the image's own aspect plays no part.
      Keyed by content (e.g. dataset id + image sha256) rather than a global RNG, a rebuild picks the same
      aspect, so the crop and its cached latent stay the same, as SimpleTuner's stored metadata does.
    - closest: the listed aspect nearest the image's, compared in log space (2:1 and 1:2 are equally far from
      1:1); an exact tie goes to the wider aspect. Weights play no part.
    """
    if not crop_aspect_buckets:
        raise ValueError("crop_aspect_buckets is empty; give at least one aspect ratio (width / height).")
    if crop_aspect == "closest":
        target = math.log(width / height)
        return min((a for a, _ in crop_aspect_buckets),
                   key=lambda a: (round(abs(math.log(a) - target), 12), -a))
    if crop_aspect != "random":
        raise ValueError(f"crop_aspect {crop_aspect!r} does not pick from crop_aspect_buckets; use random or closest.")
    import hashlib

    digest = hashlib.sha256(f"aspect|{random_key}".encode()).digest()
    # 53 bits: a float in [0, 1) with every value exactly representable.
    u = (int.from_bytes(digest[:8], "little") >> 11) / float(1 << 53)
    point = u * math.fsum(w for _, w in crop_aspect_buckets)
    running = 0.0
    for aspect, weight in crop_aspect_buckets:
        running += weight
        if point < running:
            return aspect
    return crop_aspect_buckets[-1][0]  # only reached through float rounding of the running sum


def _bucket_sizes_for_area(area: int, step: int, min_aspect: float, max_aspect: float) -> tuple[tuple[int, int], ...]:
    buckets = _maximal_buckets(area, step, min_aspect, max_aspect)
    if not buckets:  # too small an area for any maximal shape: one square bucket
        side = _floor_step(math.sqrt(area), step)
        buckets = ((side, side),)
    return buckets


def plan_crop_styled(
    width: int, height: int, *, bucket: tuple[int, int], crop_style: str = "center", random_key: str = "",
    min_scale: float = 0.0,
) -> CropPlan:
    """plan_crop with SimpleTuner's crop_style: center, corner (top-left, as SimpleTuner's current code) or
    random (an offset drawn from random_key, e.g. the image's sha256, so one image always gets one crop and
    its cached latent stays valid)."""
    if crop_style not in CROP_STYLES:
        raise ValueError(f"crop_style {crop_style!r} is not one of {', '.join(CROP_STYLES)}.")
    plan = plan_crop(width, height, bucket=bucket, min_scale=min_scale)
    if crop_style == "center":
        return plan
    if crop_style == "corner":
        return CropPlan(bucket=plan.bucket, resized=plan.resized, crop=(0, 0), scale=plan.scale)
    import hashlib

    digest = hashlib.sha256(f"crop|{random_key}|{bucket}".encode()).digest()
    spare_x, spare_y = plan.resized[0] - bucket[0], plan.resized[1] - bucket[1]
    left = int.from_bytes(digest[:4], "little") % (spare_x + 1)
    top = int.from_bytes(digest[4:8], "little") % (spare_y + 1)
    return CropPlan(bucket=plan.bucket, resized=plan.resized, crop=(left, top), scale=plan.scale)


def plan_matching_crop(width: int, height: int, *, like: CropPlan) -> CropPlan:
    """The crop of a reference image that covers the same part of the scene as `like` (reference_strict).

    The reference is resized to cover like.bucket and cropped at the same relative offset; for a reference
    of the same size as the edit image this is exactly `like`.
    """
    plan = plan_crop(width, height, bucket=like.bucket)
    def offset(spare_like: int, spare: int, value: int) -> int:
        return 0 if spare_like == 0 else min(spare, round(value * spare / spare_like))
    left = offset(like.resized[0] - like.bucket[0], plan.resized[0] - plan.bucket[0], like.crop[0])
    top = offset(like.resized[1] - like.bucket[1], plan.resized[1] - plan.bucket[1], like.crop[1])
    if like.resized[0] - like.bucket[0] == 0:
        left = (plan.resized[0] - plan.bucket[0]) // 2
    if like.resized[1] - like.bucket[1] == 0:
        top = (plan.resized[1] - plan.bucket[1]) // 2
    return CropPlan(bucket=plan.bucket, resized=plan.resized, crop=(left, top), scale=plan.scale)
