"""Scanning an image folder: the folder walk, image inspection (without decoding huge files) and loading
one training image into its bucket's pixels.

Every file the walk meets is either a usable image (ScannedImage, with its captions from trainer/captions.py
and its content hash) or a skip with the reason; nothing is dropped silently.
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .buckets import CropPlan
from .captions import CaptionStrategy, captions_for, check_caption_args

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# Camera JPEGs with preview frames open as MPO through the JPEG opener; MPO is no opener of its own.
_PIL_FORMATS = ("PNG", "JPEG", "WEBP", "BMP")
MAX_IMAGE_PIXELS = 178_956_970
"""Larger images are skipped, never decoded: Pillow's own hard limit (2 x Image.MAX_IMAGE_PIXELS), kept
here so the scan stays safe even where another node pack switched Pillow's guard off."""
_EXIF_ORIENTATION = 0x0112

BuildProgress = Callable[[str, int, int], None]
"""progress(phase, done, total) during a build: phase "scan" (total 0: not known yet), "latents" or "captions".
Called before each phase's encoder loads and after every batch; it may raise to cancel the build (the cache
entries written so far stay valid and the next build reuses them; no manifest is written)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class ScannedImage:
    path: Path
    """Absolute path of the image file."""
    relpath: str
    """Path relative to the scanned folder, with forward slashes."""
    captions: tuple[str, ...]
    """Its captions, at least one: each non-empty line of a textfile caption (unless the split is off)."""
    width: int
    """Width as displayed, after the EXIF orientation is applied."""
    height: int
    sha256: str
    """sha256 of the file's bytes: the image's identity in every cache key."""

    @property
    def caption(self) -> str:
        """The first caption (the only one unless the caption file has several lines)."""
        return self.captions[0]


@dataclass(frozen=True, kw_only=True, slots=True)
class SkippedFile:
    path: Path
    reason: str


@dataclass(kw_only=True, slots=True)
class ScanResult:
    folder: Path
    images: list[ScannedImage] = field(default_factory=list)
    skipped: list[SkippedFile] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _walk(root: Path, *, exclude: set[Path]) -> Iterator[Path]:
    """Files under root in sorted order; follows symbolic links but visits each real folder once (no loops).

    Hidden entries (.git, .DS_Store, editor backups) are not part of a dataset and are not reported.
    """
    seen: set[tuple[int, int]] = set()

    def visit(folder: Path) -> Iterator[Path]:
        st = folder.stat()
        if (st.st_dev, st.st_ino) in seen:
            return
        seen.add((st.st_dev, st.st_ino))
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            if entry.name.startswith("."):
                continue
            path = Path(entry.path)
            try:
                is_dir = entry.is_dir(follow_symlinks=True)
            except OSError:
                is_dir = False
            if is_dir:
                if path.resolve() not in exclude:
                    yield from visit(path)
            else:
                yield path

    yield from visit(root)


def _open_image(source: Path | bytes):
    from PIL import Image

    fp = io.BytesIO(source) if isinstance(source, bytes) else source
    return Image.open(fp, formats=_PIL_FORMATS)


def _displayed_size(im) -> tuple[int, int]:
    w, h = im.size
    # EXIF orientations 5-8 rotate by 90 degrees: the displayed image is h x w.
    if im.getexif().get(_EXIF_ORIENTATION, 1) in (5, 6, 7, 8):
        return h, w
    return w, h


def _inspect_image(data: bytes, *, max_pixels: int) -> tuple[int, int] | str:
    """(width, height) as displayed, or the reason the image cannot be used. Never decodes a huge image."""
    from PIL import Image, UnidentifiedImageError

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with _open_image(data) as im:
                w, h = im.size
                if w * h > max_pixels:
                    return f"too large: {w}x{h} = {w * h} pixels is above {max_pixels}; downscale it first"
                size = _displayed_size(im)
                fmt = im.format
            # A second open: verify() must come straight after open, and getexif() has read on.
            with _open_image(data) as im:
                if fmt == "PNG":
                    # Checks every chunk's CRC up to IEND without inflating: catches truncation and bit rot.
                    im.verify()
                else:
                    if fmt in ("JPEG", "MPO"):
                        # DCT-domain downscale: still reads the whole stream (so truncation shows) at 1/64 the work.
                        im.draft(im.mode, (max(1, w // 8), max(1, h // 8)))
                    im.load()
            return size
        except Image.DecompressionBombError as exc:
            return f"too large to decode safely ({exc}); downscale it first"
        except UnidentifiedImageError:
            return f"not an image Pillow can read as {'/'.join(_PIL_FORMATS)}"
        except (OSError, SyntaxError, ValueError, EOFError, IndexError) as exc:
            return f"corrupt or truncated image ({type(exc).__name__}: {exc})"


def _read_image_file(path: Path, *, max_pixels: int, min_side_px: int) -> tuple[bytes, int, int] | str:
    """(file bytes, width, height) of an image file, or the reason it is skipped."""
    suffix = path.suffix.lower()
    if suffix not in IMAGE_EXTENSIONS:
        return f"not an image file (supported: {', '.join(IMAGE_EXTENSIONS)})"
    if not path.exists():
        return "broken symbolic link"
    if not path.is_file():
        # A named pipe or device would block or never end when read.
        return "not a regular file"
    try:
        data = path.read_bytes()
    except OSError as exc:
        return f"unreadable ({exc.strerror or exc})"
    if not data:
        return "zero-byte file"
    size = _inspect_image(data, max_pixels=max_pixels)
    if isinstance(size, str):
        return size
    width, height = size
    if min(width, height) < min_side_px:
        return f"too small: {width}x{height}, a side is under min_side_px={min_side_px}"
    return data, width, height


def _is_orphan_caption(path: Path) -> bool:
    return not any(
        path.with_suffix(ext).is_file() or path.with_suffix(ext.upper()).is_file() for ext in IMAGE_EXTENSIONS
    )


def scan_image_folder(
    folder: str | Path,
    *,
    caption_strategy: CaptionStrategy = "textfile",
    instance_prompt: str | None = None,
    min_side_px: int = 16,
    max_pixels: int = MAX_IMAGE_PIXELS,
    exclude: Sequence[str | Path] = (),
    disable_multiline_split: bool = False,
    progress: BuildProgress | None = None,
) -> ScanResult:
    """Every usable image under folder (recursively, sorted by relative path) with its captions.

    With caption_strategy "textfile" each non-empty line of the caption file is a caption of its own
    (SimpleTuner's multi-caption files); disable_multiline_split=True keeps the whole file as one caption.

    Unusable files are listed in ScanResult.skipped with a reason, never silently dropped: zero-byte files,
    files that are not PNG/JPEG/WebP/BMP or are truncated or corrupt, images with a side under min_side_px or
    more than max_pixels pixels (decided from the header, before decoding), and, with caption_strategy
    "textfile", images without a same-name .txt or with a caption that is not UTF-8. Folders in exclude
    (e.g. the cache folder) are not entered. Raises ValueError naming the folder when nothing is usable.
    """
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise ValueError(
            f"image folder {str(folder)!r} is not a folder; give the folder that holds your training images."
        )
    root = root.resolve()
    if min_side_px < 1:
        raise ValueError(f"min_side_px must be >= 1, got {min_side_px}.")
    result = ScanResult(folder=root, warnings=check_caption_args(caption_strategy, instance_prompt))
    excluded = {Path(p).expanduser().resolve() for p in exclude}
    seen_content: dict[str, str] = {}
    for count, path in enumerate(_walk(root, exclude=excluded)):
        if progress is not None:
            progress("scan", count, 0)
        rel = path.relative_to(root).as_posix()
        if path.suffix.lower() == ".txt":
            if caption_strategy == "textfile" and _is_orphan_caption(path):
                result.warnings.append(f"caption {rel} has no image next to it")
            continue
        read = _read_image_file(path, max_pixels=max_pixels, min_side_px=min_side_px)
        if isinstance(read, str):
            result.skipped.append(SkippedFile(path=path, reason=read))
            continue
        data, width, height = read
        captions, reason = captions_for(path, caption_strategy=caption_strategy, instance_prompt=instance_prompt,
                                        disable_multiline_split=disable_multiline_split)
        if captions is None:
            result.skipped.append(SkippedFile(path=path, reason=str(reason)))
            continue
        if captions == ("",) and caption_strategy == "textfile":
            result.warnings.append(f"{rel} has an empty caption (trained as unconditional)")
        digest = hashlib.sha256(data).hexdigest()
        if digest in seen_content:
            result.warnings.append(f"{rel} has the same contents as {seen_content[digest]}")
        seen_content.setdefault(digest, rel)
        result.images.append(
            ScannedImage(path=path, relpath=rel, captions=captions, width=width, height=height, sha256=digest)
        )
    result.images.sort(key=lambda im: im.relpath)
    if not result.images:
        _raise_nothing_usable(result, caption_strategy=caption_strategy)
    return result


def _raise_nothing_usable(result: ScanResult, *, caption_strategy: str) -> None:
    detail = "; ".join(f"{s.path.name}: {s.reason}" for s in result.skipped[:5]) or "the folder has no image files"
    raise ValueError(
        f"image folder {result.folder} has no usable images ({len(result.skipped)} skipped: {detail}). Add "
        f"{'/'.join(e.lstrip('.') for e in IMAGE_EXTENSIONS)} images"
        + (" with same-name .txt captions." if caption_strategy == "textfile" else ".")
    )


# ----------------------------------------------------------------------------------------- image pipeline


def _to_rgb(im):
    from PIL import Image

    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit greyscale: Pillow's direct conversion clips instead of scaling.
        im = im.point(lambda v: v / 257).convert("L")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        # Transparent pixels become white, not the arbitrary colour stored under them.
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        background.alpha_composite(rgba)
        return background.convert("RGB")
    return im.convert("RGB")


def load_training_image(path: str | Path, *, plan: CropPlan) -> torch.Tensor:
    """(3, bucket_h, bucket_w) float32 in [-1, 1]: EXIF-rotated, alpha on white, Lanczos-resized, center-cropped."""
    import numpy as np
    from PIL import Image, ImageOps

    bw, bh = plan.bucket
    rw, rh = plan.resized
    left, top = plan.crop
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with _open_image(Path(path)) as im:
            if im.format in ("JPEG", "MPO"):
                rotated = im.getexif().get(_EXIF_ORIENTATION, 1) in (5, 6, 7, 8)
                im.draft(im.mode, (rh, rw) if rotated else (rw, rh))  # decode at >= the size we resize to
            im.load()
            im = ImageOps.exif_transpose(im)
    im = _to_rgb(im)
    if im.size != (rw, rh):
        im = im.resize((rw, rh), resample=Image.Resampling.LANCZOS)
    im = im.crop((left, top, left + bw, top + bh))
    array = np.asarray(im, dtype=np.uint8).copy()
    return torch.from_numpy(array).permute(2, 0, 1).float().div_(127.5).sub_(1.0)
