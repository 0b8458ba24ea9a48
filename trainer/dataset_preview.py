"""The preview of a built dataset: the crops it trains, a few per bucket with their captions, the bucket table
and the skipped files with their reasons, drawn as one sheet (Build Dataset's IMAGE output and on-node preview).

Each tile is what load_training_image returns for a manifest item (its cached resize and crop), the pixels the
latent cache was encoded from; tiles larger than tile_size are scaled down for display only. Nothing here loads
an encoder, so a second Run that reuses every cache entry still draws the preview from the manifest.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .buckets import CropPlan
from .build_report import BuildReport
from .manifest import Manifest

PREVIEW_TILE_SIZE = 256
"""Longest side of a tile on the sheet; a larger crop is scaled down for display (never up)."""
MAX_SHEET_WIDTH = 2048
"""Tiles of one bucket wrap onto a new line past this width."""
MAX_TILE_BUCKETS = 32
"""Buckets that get tiles (crop_aspect preserve can make one bucket per image); the table lists more."""
MAX_TABLE_LINES = 64
MAX_SKIPPED_LINES = 100

_MARGIN, _GAP, _CAPTION_MIN_WIDTH, _CAPTION_LINES, _MIN_WIDTH = 12, 8, 160, 3, 640
_BACKGROUND, _TEXT, _DIM = (32, 32, 32), (225, 225, 225), (150, 150, 150)
_HEAD, _WARN = (255, 205, 120), (255, 110, 100)


@dataclass(frozen=True, kw_only=True, slots=True)
class PreviewTile:
    """One trained crop on the sheet."""

    index: int
    """The manifest item it shows."""
    bucket: tuple[int, int]
    box: tuple[int, int, int, int]
    """(left, top, right, bottom) of its pixels on the sheet."""
    caption: str
    """The item's first caption (the label also counts the others)."""
    problem: str | None = None
    """Why the tile is not the trained crop (file unreadable, or changed since the build); None when it is."""


@dataclass(frozen=True, kw_only=True, slots=True)
class BucketRow:
    bucket: tuple[int, int]
    images: int
    samples_per_epoch: int
    """Images times their repeats."""
    shown: int
    """Tiles drawn for it."""


@dataclass(frozen=True, kw_only=True, slots=True)
class SkippedRow:
    dataset: str
    path: str
    """Relative to the dataset's folder when inside it."""
    reason: str


@dataclass(frozen=True, kw_only=True, slots=True)
class DatasetPreview:
    image: Any
    """The sheet, a PIL RGB image."""
    tiles: tuple[PreviewTile, ...]
    buckets: tuple[BucketRow, ...]
    skipped: tuple[SkippedRow, ...]
    scale: dict[tuple[int, int], float]
    """Display scale per bucket with tiles (1.0: pixel for pixel)."""

    def to_tensor(self):
        """(1, H, W, 3) float32 in [0, 1]: a ComfyUI IMAGE."""
        import numpy as np
        import torch

        return torch.from_numpy(np.asarray(self.image, dtype=np.float32) / 255.0).unsqueeze(0)


def preview_indices(manifest: Manifest, *, per_bucket: int) -> dict[tuple[int, int], list[int]]:
    """Up to per_bucket item indices of every bucket, spread evenly over its items (in manifest order)."""
    if per_bucket < 0:
        raise ValueError(f"preview per_bucket must be >= 0, got {per_bucket}.")
    picks = {}
    for bucket, indices in manifest.buckets().items():
        n = min(per_bucket, len(indices))
        picks[bucket] = [indices[k * (len(indices) - 1) // (n - 1)] for k in range(n)] if n > 1 else indices[:n]
    return picks


def crop_plan(manifest: Manifest, index: int) -> CropPlan:
    """The resize and crop the build cached for an item."""
    item = manifest.items[index]
    scale = max(item.resized[0] / item.width, item.resized[1] / item.height)
    return CropPlan(bucket=item.bucket, resized=item.resized, crop=item.crop, scale=scale)


def trained_crop(manifest: Manifest, index: int):
    """The item's training pixels as a PIL RGB image: load_training_image's output, back in 0..255."""
    import numpy as np
    import torch
    from PIL import Image

    from .scan import load_training_image

    pixels = load_training_image(manifest.image_path(index), plan=crop_plan(manifest, index))
    array = pixels.add(1.0).mul(127.5).round().clamp(0, 255).to(dtype=torch.uint8)
    return Image.fromarray(np.ascontiguousarray(array.permute(1, 2, 0).numpy()))


def display_size(bucket: tuple[int, int], *, tile_size: int) -> tuple[tuple[int, int], float]:
    """(width, height) of a bucket's tiles on the sheet and the scale: shrunk to tile_size, never enlarged."""
    scale = min(1.0, tile_size / max(bucket))
    return (max(1, round(bucket[0] * scale)), max(1, round(bucket[1] * scale))), scale


def skipped_rows(report: BuildReport) -> list[SkippedRow]:
    """Every skipped file of the build with its reason, by dataset."""
    rows = []
    for dataset, info in report.datasets.items():
        folder = Path(info.get("folder", ""))
        for entry in info.get("skipped", ()):
            path = Path(entry["path"])
            shown = path.relative_to(folder).as_posix() if path.is_relative_to(folder) else str(path)
            rows.append(SkippedRow(dataset=dataset, path=shown, reason=str(entry["reason"])))
    return rows


def render_dataset_preview(manifest: Manifest, report: BuildReport | None, *, per_bucket: int = 4,
                           tile_size: int = PREVIEW_TILE_SIZE) -> DatasetPreview:
    """The preview sheet of a built dataset; report (its report.json) gives the skipped files, None leaves them out.

    per_bucket: tiles per bucket (0: only the tables). tile_size: longest side of a tile in pixels.
    """
    if tile_size < 16:
        raise ValueError(f"preview tile_size must be >= 16 pixels, got {tile_size}.")
    picks = preview_indices(manifest, per_bucket=per_bucket)
    buckets = manifest.buckets()
    table = tuple(BucketRow(bucket=b, images=len(ix), samples_per_epoch=sum(manifest.items[i].repeats for i in ix),
                            shown=len(picks[b]) if n < MAX_TILE_BUCKETS else 0)
                  for n, (b, ix) in enumerate(buckets.items()))
    skipped = tuple(skipped_rows(report)) if report is not None else ()
    sheet = _Sheet(width=_sheet_width(table, tile_size=tile_size))
    sheet.line(f"Dataset {manifest.root.name}: {_plural(len(manifest.items), 'image')} in "
               f"{_plural(len(buckets), 'bucket')}"
               + (f", {len(skipped)} skipped" if report is not None else " (no report.json: skipped files unknown)"),
               colour=_HEAD)
    sheet.line("Tiles are the crops trained (resized and cropped as cached), with their captions.", colour=_DIM)
    tiles, scales = [], {}
    for row in (r for r in table if r.shown):
        size, scales[row.bucket] = display_size(row.bucket, tile_size=tile_size)
        sheet.gap()
        sheet.line(f"bucket {row.bucket[0]}x{row.bucket[1]}: {_plural(row.images, 'image')}, "
                   f"{_plural(row.samples_per_epoch, 'sample')} per epoch; {row.shown} shown"
                   + ("" if scales[row.bucket] == 1 else f" at {scales[row.bucket]:.0%}"), colour=_HEAD)
        tiles += sheet.tiles(manifest, picks[row.bucket], size=size, label_source=len(manifest.sources) > 1)
    if len(table) > MAX_TILE_BUCKETS:
        sheet.line(f"... {len(table) - MAX_TILE_BUCKETS} more buckets without tiles (see the table)", colour=_DIM)
    _draw_tables(sheet, table, skipped if report is not None else None, label_dataset=len(manifest.sources) > 1)
    return DatasetPreview(image=sheet.render(), tiles=tuple(tiles), buckets=table, skipped=skipped, scale=scales)


def _draw_tables(sheet: _Sheet, table: tuple[BucketRow, ...], skipped: tuple[SkippedRow, ...] | None, *,
                 label_dataset: bool) -> None:
    """The bucket table, then the skipped files with their reasons (None: no report to list them from)."""
    sheet.gap()
    sheet.line("Buckets (width x height: images, samples per epoch)", colour=_HEAD)
    sheet.lines([f"{r.bucket[0]}x{r.bucket[1]}: {_plural(r.images, 'image')}, "
                 f"{_plural(r.samples_per_epoch, 'sample')} per epoch" for r in table],
                limit=MAX_TABLE_LINES, what="buckets")
    if skipped is None:
        return
    sheet.gap()
    sheet.line(f"Skipped files ({len(skipped)})", colour=_HEAD)
    sheet.lines([f"{f'{s.dataset}: ' if label_dataset else ''}{s.path}: {s.reason}" for s in skipped] or ["none"],
                limit=MAX_SKIPPED_LINES, what="skipped files", colour=_WARN if skipped else _DIM)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _sheet_width(table: tuple[BucketRow, ...], *, tile_size: int) -> int:
    width = _MIN_WIDTH
    for row in table:
        if row.shown:
            cell = max(display_size(row.bucket, tile_size=tile_size)[0][0], _CAPTION_MIN_WIDTH)
            cols = _columns(cell, row.shown)
            width = max(width, 2 * _MARGIN + cols * cell + (cols - 1) * _GAP)
    return width


def _columns(cell: int, count: int) -> int:
    return max(1, min(count, (MAX_SHEET_WIDTH - 2 * _MARGIN + _GAP) // (cell + _GAP)))


def _font():
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=12)
    except TypeError:  # Pillow < 10.1: the bitmap font, one size
        return ImageFont.load_default()


class _Sheet:
    """Collects text and tiles top to bottom at a fixed width, then draws them on one image."""

    def __init__(self, *, width: int) -> None:
        from PIL import Image, ImageDraw

        self.width, self.y, self.font, self.ops = width, _MARGIN, _font(), []
        self._measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
        self.line_height = self._measure.textbbox((0, 0), "Ag", font=self.font)[3] + 4

    def _text(self, text: str) -> str:
        from PIL import ImageFont

        text = " / ".join(part.strip() for part in text.splitlines() if part.strip())
        if isinstance(self.font, ImageFont.FreeTypeFont):
            return text
        # The bitmap font of old Pillow draws Latin-1 only (and raises on anything else).
        return text.encode("latin-1", "replace").decode("latin-1")

    def _fit(self, text: str, width: int) -> str:
        """text cut to width pixels, with an ellipsis when cut."""
        if self._measure.textlength(text, font=self.font) <= width:
            return text
        low, high = 0, len(text)  # the longest prefix that fits with the ellipsis: a bisection (captions run long)
        while low < high:
            mid = (low + high + 1) // 2
            if self._measure.textlength(text[:mid] + "...", font=self.font) <= width:
                low = mid
            else:
                high = mid - 1
        return text[:low].rstrip() + "..."

    def _wrap(self, text: str, width: int, lines: int) -> list[str]:
        """text on at most `lines` lines of width pixels; the last one cut with an ellipsis when it does not fit."""
        out, current, words = [], "", text.split()
        for i, word in enumerate(words):
            candidate = f"{current} {word}".strip()
            if not current or self._measure.textlength(candidate, font=self.font) <= width:
                current = candidate
            elif len(out) == lines - 1:
                current = " ".join([current, *words[i:]])
                break
            else:
                out.append(current)
                current = word
        if current:
            out.append(current)
        return [self._fit(line, width) for line in out]

    def gap(self) -> None:
        self.y += self.line_height // 2

    def line(self, text: str, *, colour=_TEXT, x: int = _MARGIN) -> None:
        self.ops.append(("text", (x, self.y), self._fit(self._text(text), self.width - x - _MARGIN), colour))
        self.y += self.line_height

    def lines(self, texts: list[str], *, limit: int, what: str, colour=_TEXT) -> None:
        for text in texts[:limit]:
            # A long line (a skipped file's reason) wraps onto indented continuation lines.
            first, *rest = self._wrap(self._text(text), self.width - 4 * _MARGIN, 3) or [""]
            self.line(first, colour=colour, x=2 * _MARGIN)
            for more in rest:
                self.line(more, colour=colour, x=3 * _MARGIN)
        if len(texts) > limit:
            self.line(f"... and {len(texts) - limit} more {what} (the report output lists all)", colour=_DIM,
                      x=2 * _MARGIN)

    def tiles(self, manifest: Manifest, indices: list[int], *, size: tuple[int, int],
              label_source: bool) -> list[PreviewTile]:
        from PIL import Image

        cell = max(size[0], _CAPTION_MIN_WIDTH)
        cols = _columns(cell, len(indices))
        captions = {i: self._wrap(self._caption(manifest.items[i]), cell, _CAPTION_LINES) or ["(empty caption)"]
                    for i in indices}
        cell_height = size[1] + 4 + (1 + max(len(c) for c in captions.values())) * self.line_height
        out = []
        for k, index in enumerate(indices):
            x = _MARGIN + (k % cols) * (cell + _GAP)
            y = self.y + (k // cols) * (cell_height + _GAP)
            item = manifest.items[index]
            crop, problem = _tile_pixels(manifest, index)
            if crop is None:
                self.ops.append(("box", (x, y, x + size[0] - 1, y + size[1] - 1), None, _WARN))
            else:
                if crop.size != size:
                    crop = crop.resize(size, resample=Image.Resampling.LANCZOS)
                self.ops.append(("image", (x, y), crop, None))
            name = f"{item.source}: {item.image}" if label_source else item.image
            if item.references:  # edit LoRAs: the tile is the target; its references train beside it
                name += f" (+{_plural(len(item.references), 'reference')})"
            self.ops.append(("text", (x, y + size[1] + 4), self._fit(self._text(problem or name), cell),
                             _WARN if problem else _DIM))
            for n, text in enumerate(captions[index]):
                self.ops.append(("text", (x, y + size[1] + 4 + (n + 1) * self.line_height), text, _TEXT))
            out.append(PreviewTile(index=index, bucket=item.bucket, box=(x, y, x + size[0], y + size[1]),
                                   caption=item.caption, problem=problem))
        rows = -(-len(indices) // cols)
        self.y += rows * (cell_height + _GAP)
        return out

    def _caption(self, item) -> str:
        more = len(item.captions) - 1
        return self._text(item.caption) + (f" (+{more} more caption{'s' if more > 1 else ''})" if more else "")

    def render(self):
        from PIL import Image, ImageDraw

        image = Image.new("RGB", (self.width, self.y + _MARGIN), _BACKGROUND)
        draw = ImageDraw.Draw(image)
        for kind, where, what, colour in self.ops:
            if kind == "image":
                image.paste(what, where)
            elif kind == "box":
                draw.rectangle(where, outline=colour, width=2)
            else:
                draw.text(where, what, fill=colour, font=self.font)
        return image


def _tile_pixels(manifest: Manifest, index: int):
    """(the trained crop, None), or (None, why it cannot be shown) when the file is gone, unreadable or changed."""
    path = manifest.image_path(index)
    try:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as exc:
        return None, f"cannot read {path.name}: {exc.strerror or exc}"
    if digest != manifest.items[index].image_sha256:
        # Its cached latent is of the old contents: the new pixels are not what trains.
        return None, f"{path.name} changed since the build; run Build Dataset again"
    try:
        return trained_crop(manifest, index), None
    except (OSError, ValueError, SyntaxError) as exc:
        return None, f"cannot decode {path.name}: {type(exc).__name__}"
