"""Building the training dataset: scan folders, cache VAE latents and caption embeddings, write the manifest.

Build (once per content, on the machine with the encoders):
  scan_image_folder -> per image: bucket + crop (trainer/buckets.py) -> VAE latents cached by image content
  -> caption embeddings cached by caption text (plus "" for caption dropout and the validation prompts)
  -> out_dir/manifest.json + out_dir/report.json.
Train (any number of processes, no encoder needed): manifest.load_manifest -> sampler.BucketBatchSampler ->
manifest.load_batch; resolve_training_manifest here gives a run its manifest (building or merging it first).

The manifest lists data *sources* (today one image folder) and items that name their source, so several
folders with their own settings (SimpleTuner's multidatabackend.json) slot in without changing the items.
Cache paths in the manifest are relative to the manifest's folder, so the dataset folder can be copied to
another machine as a whole; image paths are relative to their source's image_dir (stored absolute).
"""

from __future__ import annotations

import gc
import hashlib
import io
import json
import logging
import math
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from . import flux2, model_files
from .buckets import CropPlan
from .cache import (
    CacheEntryError,
    atomic_write_bytes,
    check_writable_dir,
    hash_json,
    read_entry,
    write_entry,
)
from .manifest import (
    LATENT_TENSOR,
    MANIFEST_FILE,
    MANIFEST_FORMAT,
    MANIFEST_VERSION,
    TEXT_TENSOR,
    Manifest,
    cache_file_path,
    load_manifest,
)
from .model_files import ModelFolder

log = logging.getLogger(__name__)

CaptionStrategy = Literal["textfile", "filename", "instanceprompt"]
CAPTION_STRATEGIES: tuple[str, ...] = ("textfile", "filename", "instanceprompt")
IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# Camera JPEGs with preview frames open as MPO through the JPEG opener; MPO is no opener of its own.
_PIL_FORMATS = ("PNG", "JPEG", "WEBP", "BMP")
MAX_IMAGE_PIXELS = 178_956_970
"""Larger images are skipped, never decoded: Pillow's own hard limit (2 x Image.MAX_IMAGE_PIXELS), kept
here so the scan stays safe even where another node pack switched Pillow's guard off."""


BuildProgress = Callable[[str, int, int], None]
"""progress(phase, done, total) during a build: phase "scan" (total 0: not known yet), "latents" or "captions".
Called before each phase's encoder loads and after every batch; it may raise to cancel the build (the cache
entries written so far stay valid and the next build reuses them; no manifest is written)."""
REPORT_FILE = "report.json"
LATENT_DIR = "latents"
TEXT_DIR = "text"
PREPROCESS_VERSION = 1
"""Bump when decoding, EXIF rotation, alpha handling, resize or crop change: old latents become misses."""
TEXT_CONVENTIONS = {
    "version": 1,
    "system_message_sha256": hashlib.sha256(flux2.SYSTEM_MESSAGE.encode()).hexdigest(),
    "hidden_layers": list(flux2.TEXT_HIDDEN_LAYERS),
    "max_length": flux2.MAX_TEXT_TOKENS,
}
"""Everything about how a caption becomes an embedding besides the weights; part of each text cache key."""
_EXIF_ORIENTATION = 0x0112


# ------------------------------------------------------------------------------------------------- scanning


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


def _check_caption_args(caption_strategy: str, instance_prompt: str | None) -> list[str]:
    if caption_strategy not in CAPTION_STRATEGIES:
        raise ValueError(
            f"caption_strategy {caption_strategy!r} is not one of {', '.join(CAPTION_STRATEGIES)}: textfile reads "
            "same-name .txt files, filename uses the file name, instanceprompt uses instance_prompt for every image."
        )
    if caption_strategy == "instanceprompt" and not (instance_prompt or "").strip():
        raise ValueError(
            "caption_strategy 'instanceprompt' needs a non-empty instance_prompt (the caption used for every "
            "image, e.g. 'a photo of sks dog')."
        )
    if caption_strategy != "instanceprompt" and instance_prompt:
        msg = f"instance_prompt {instance_prompt!r} is ignored with caption_strategy {caption_strategy!r}"
        log.warning(msg)
        return [msg]
    return []


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


def _find_caption_file(image: Path) -> Path | None:
    for suffix in (".txt", ".TXT", ".Txt"):
        candidate = image.with_suffix(suffix)
        if candidate.is_file():
            return candidate
    return None


def split_caption_lines(text: str) -> tuple[str, ...]:
    """Each non-empty line of a caption file, stripped (\\r of Windows line ends included); ("",) for none."""
    lines = tuple(line.strip() for line in text.splitlines())
    return tuple(line for line in lines if line) or ("",)


def _caption_for(
    image: Path, *, caption_strategy: str, instance_prompt: str | None, disable_multiline_split: bool = False
) -> tuple[tuple[str, ...] | None, str | None]:
    """(captions, None) or (None, skip reason)."""
    if caption_strategy == "instanceprompt":
        return (str(instance_prompt).strip(),), None
    if caption_strategy == "filename":
        return (" ".join(image.stem.replace("_", " ").split()),), None
    caption_file = _find_caption_file(image)
    if caption_file is None:
        return None, (
            f"missing caption: no {image.with_suffix('.txt').name} next to it; add one, or use caption_strategy "
            "filename or instanceprompt"
        )
    try:
        raw = caption_file.read_bytes()
    except OSError as exc:
        return None, f"caption file {caption_file.name} is unreadable ({exc.strerror or exc})"
    try:
        # utf-8-sig: Windows editors often prepend a byte-order mark.
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        return None, (
            f"caption file {caption_file.name} is not UTF-8 (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
            "re-save it as UTF-8"
        )
    return ((text.strip(),) if disable_multiline_split else split_caption_lines(text)), None


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
    result = ScanResult(folder=root, warnings=_check_caption_args(caption_strategy, instance_prompt))
    excluded = {Path(p).expanduser().resolve() for p in exclude}
    seen_content: dict[str, str] = {}
    for count, path in enumerate(_walk(root, exclude=excluded)):
        if progress is not None:
            progress("scan", count, 0)
        rel = path.relative_to(root).as_posix()
        suffix = path.suffix.lower()
        if suffix == ".txt":
            if caption_strategy == "textfile" and not any(
                path.with_suffix(ext).is_file() or path.with_suffix(ext.upper()).is_file() for ext in IMAGE_EXTENSIONS
            ):
                result.warnings.append(f"caption {rel} has no image next to it")
            continue
        if suffix not in IMAGE_EXTENSIONS:
            result.skipped.append(
                SkippedFile(path=path, reason=f"not an image file (supported: {', '.join(IMAGE_EXTENSIONS)})")
            )
            continue
        if not path.exists():
            result.skipped.append(SkippedFile(path=path, reason="broken symbolic link"))
            continue
        if not path.is_file():
            # A named pipe or device would block or never end when read.
            result.skipped.append(SkippedFile(path=path, reason="not a regular file"))
            continue
        try:
            data = path.read_bytes()
        except OSError as exc:
            result.skipped.append(SkippedFile(path=path, reason=f"unreadable ({exc.strerror or exc})"))
            continue
        if not data:
            result.skipped.append(SkippedFile(path=path, reason="zero-byte file"))
            continue
        size = _inspect_image(data, max_pixels=max_pixels)
        if isinstance(size, str):
            result.skipped.append(SkippedFile(path=path, reason=size))
            continue
        width, height = size
        if min(width, height) < min_side_px:
            result.skipped.append(
                SkippedFile(path=path, reason=f"too small: {width}x{height}, a side is under min_side_px={min_side_px}")
            )
            continue
        captions, reason = _caption_for(path, caption_strategy=caption_strategy, instance_prompt=instance_prompt,
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
        detail = "; ".join(f"{s.path.name}: {s.reason}" for s in result.skipped[:5]) or "the folder has no image files"
        raise ValueError(
            f"image folder {root} has no usable images ({len(result.skipped)} skipped: {detail}). Add "
            f"{'/'.join(e.lstrip('.') for e in IMAGE_EXTENSIONS)} images"
            + (" with same-name .txt captions." if caption_strategy == "textfile" else ".")
        )
    return result


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


# -------------------------------------------------------------------------------------------- identities


def _files_signature(folder: Path) -> list[tuple[str, int, int]]:
    return sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir() if p.is_file())


def encoder_identities(model: ModelFolder) -> dict[str, str]:
    """Hashes of what the caches depend on: 'vae' (latents), 'text' (embeddings) and 'model' (both).

    The transformer is not part of them: swapping it (e.g. a single-file fine-tune) keeps the dataset valid.
    """
    ident = model.identity()
    vae = {k: ident[k] for k in ("vae", "vae_weights", "vae_file") if k in ident}
    text = {
        "text_encoder": ident["text_encoder"],
        "text_encoder_weights": ident["text_encoder_weights"],
        "tokenizer": _files_signature(model.tokenizer_dir),
        "conventions": TEXT_CONVENTIONS,
    }
    vae_hash, text_hash = hash_json(vae), hash_json(text)
    return {"vae": vae_hash, "text": text_hash, "model": hash_json([vae_hash, text_hash])}


def latent_key(*, image_sha256: str, vae_identity: str, precision: str, plan: CropPlan) -> str:
    return hash_json(
        {
            "image": image_sha256,
            "vae": vae_identity,
            "precision": precision,
            "bucket": plan.bucket,
            "resized": plan.resized,
            "crop": plan.crop,
            "preprocess": PREPROCESS_VERSION,
        }
    )


def text_key(*, caption: str, text_identity: str, precision: str) -> str:
    return hash_json(
        {
            "caption_sha256": hashlib.sha256(caption.encode("utf-8")).hexdigest(),
            "text": text_identity,
            "precision": precision,
        }
    )


def _free_memory(device: str) -> None:
    gc.collect()
    if str(device).startswith("cuda") and torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------- building


@dataclass(kw_only=True, slots=True)
class BuildReport:
    """What a build did; saved as out_dir/report.json. The counters prove cache reuse in tests.

    The top-level fields total over all datasets; `datasets` holds one entry per dataset id with what was
    found, used and skipped (each with its reason), its buckets, caption length statistics, cache hits and
    the latent cache's bytes per image.
    """

    image_dir: str
    out_dir: str
    usable_images: int = 0
    skipped: list[dict[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    buckets: dict[str, int] = field(default_factory=dict)
    vae_images_encoded: int = 0
    latents_reused: int = 0
    prompts_encoded: int = 0
    prompts_reused: int = 0
    truncated_captions: list[str] = field(default_factory=list)
    rebuilt_cache_files: list[str] = field(default_factory=list)
    vae_loaded: bool = False
    text_encoder_loaded: bool = False
    datasets: dict[str, dict[str, Any]] = field(default_factory=dict)
    disabled_datasets: list[str] = field(default_factory=list)
    latent_bytes_per_image: float = 0.0
    text_bytes_per_caption: float = 0.0
    captions: int = 0
    """Training captions of all usable images (an image with a multi-line caption file counts each line)."""
    multi_caption_images: int = 0
    """Usable images with several captions (one is drawn per sample)."""

    @property
    def cache_hit_rate(self) -> float:
        """Share of latents and caption embeddings that came from the cache (1.0 when nothing was needed)."""
        total = self.vae_images_encoded + self.latents_reused + self.prompts_encoded + self.prompts_reused
        return 1.0 if total == 0 else (self.latents_reused + self.prompts_reused) / total

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        lines = [
            f"{self.usable_images} usable images in {len(self.buckets)} buckets "
            f"({', '.join(f'{b}: {n}' for b, n in self.buckets.items())}); {len(self.skipped)} skipped.",
            f"latents: {self.vae_images_encoded} encoded, {self.latents_reused} reused; "
            f"captions: {self.prompts_encoded} encoded, {self.prompts_reused} reused.",
        ]
        if self.multi_caption_images:
            several = "1 image has" if self.multi_caption_images == 1 else f"{self.multi_caption_images} images have"
            lines.append(f"{self.captions} training captions; {several} several "
                         "(one line of the caption file is drawn per sample).")
        if len(self.datasets) > 1 or any(d.get("type") == "conditioning" for d in self.datasets.values()):
            for ds, info in self.datasets.items():
                buckets = ", ".join(f"{b}: {n}" for b, n in info["buckets"].items())
                weight = info.get("probability", 1.0)
                lines.append(
                    f"dataset {ds} ({info['type']}): {info['found']} found, {info['used']} used, "
                    f"{len(info['skipped'])} skipped; x{info['copies']} per epoch; "
                    + (f"probability {weight:g}; " if weight != 1.0 else "")
                    + f"buckets {buckets or 'none'}; {info['latent_bytes_per_image']:.0f} latent bytes per image"
                )
        lines.append(
            f"cache hit rate {self.cache_hit_rate:.0%}; {self.latent_bytes_per_image:.0f} latent bytes per image, "
            f"{self.text_bytes_per_caption:.0f} text bytes per caption."
        )
        for d in self.disabled_datasets:
            lines.append(f"dataset {d}: disabled, not built")
        lines += [f"skipped {s['path']}: {s['reason']}" for s in self.skipped]
        lines += [f"warning: {w}" for w in self.warnings]
        lines += [f"rebuilt damaged cache file {p}" for p in self.rebuilt_cache_files]
        return "\n".join(lines)


def load_build_report(path: str | Path) -> BuildReport:
    """The report.json of a build (path to the file or to the dataset folder)."""
    path = Path(path)
    if path.is_dir():
        path = path / REPORT_FILE
    return BuildReport(**json.loads(path.read_text(encoding="utf-8")))


@dataclass(kw_only=True, slots=True)
class _PendingItem:
    image: ScannedImage
    plan: CropPlan
    latent_key: str
    latent_dir: Path
    dataset: str = "default"

    @property
    def latent_path(self) -> Path:
        return self.latent_dir / f"{self.latent_key}.safetensors"


def _check_build_args(*, resolution: int, repeats: int, bucket_step: int, extra_prompts: Sequence[str],
                      vae_batch_size: int, text_batch_size: int) -> None:
    if not isinstance(resolution, int) or resolution < bucket_step or resolution % 16:
        raise ValueError(
            f"resolution {resolution!r} must be a multiple of 16 and >= {bucket_step}; FLUX.2 LoRAs train at 512-1024."
        )
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats {repeats!r} must be an integer >= 1 (how often each image appears per epoch).")
    _check_common_args(extra_prompts=extra_prompts, vae_batch_size=vae_batch_size, text_batch_size=text_batch_size)


def _check_common_args(*, extra_prompts: Sequence[str], vae_batch_size: int, text_batch_size: int | None) -> None:
    if isinstance(extra_prompts, str) or not all(isinstance(p, str) for p in extra_prompts):
        raise ValueError(
            f"extra_prompts must be a list of strings, got {extra_prompts!r}; wrap one prompt as [prompt]."
        )
    for name, value in (("vae_batch_size", vae_batch_size), ("text_batch_size", text_batch_size)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}.")


def _cached_entry(path: Path, *, kind: str, key: str, report: BuildReport) -> dict[str, str] | None:
    """Metadata of a valid cache entry, or None (a damaged entry is deleted and recorded for rebuilding)."""
    if not path.exists():
        return None
    try:
        return read_entry(path, kind=kind, key=key, verify_digest=True)[1]
    except CacheEntryError as exc:
        log.warning("%s; rebuilding it", exc)
        path.unlink(missing_ok=True)
        report.rebuilt_cache_files.append(str(path))
        return None


def build_dataset(
    *,
    image_dir: str | Path,
    model: ModelFolder,
    out_dir: str | Path,
    resolution: int = 512,
    repeats: int = 1,
    caption_strategy: CaptionStrategy = "textfile",
    instance_prompt: str | None = None,
    vae_precision: str = "fp32",
    text_precision: str = "bf16",
    device: str = "cpu",
    extra_prompts: Sequence[str] = (),
    bucket_step: int = 16,
    min_side_px: int = 16,
    vae_batch_size: int = 4,
    text_batch_size: int = 4,
    encoders: Any = None,
    progress: BuildProgress | None = None,
    disable_multiline_split: bool = False,
) -> Path:
    """Scan one image folder, fill the latent and caption caches under out_dir, write manifest.json; return its path.

    repeats counts appearances per epoch (1 = once). The one-folder form of build_datasets (see there for the
    cache and encoder rules): latents go to out_dir/latents, embeddings to out_dir/text, center crops to the
    nearest bucket of about resolution^2 pixels. Each non-empty line of a textfile caption is a caption of its
    own unless disable_multiline_split is set.
    """
    _check_build_args(resolution=resolution, repeats=repeats, bucket_step=bucket_step, extra_prompts=extra_prompts,
                      vae_batch_size=vae_batch_size, text_batch_size=text_batch_size)
    from .databackend import BackendConfig, ImageDatasetSpec, TextEmbedsSpec

    images_path = Path(image_dir).expanduser()
    if images_path.resolve() == Path(out_dir).expanduser().resolve():
        raise ValueError(
            f"out_dir {str(out_dir)!r} is the image folder itself; write the dataset to a separate folder "
            "(a subfolder of the image folder works: it is left out of the scan)."
        )
    spec = ImageDatasetSpec(id="default", instance_data_dir=images_path, caption_strategy=caption_strategy,
                            instance_prompt=instance_prompt, resolution=resolution, repeats=repeats - 1,
                            disable_multiline_split=disable_multiline_split)
    config = BackendConfig(path=None, datasets=(spec,), conditioning={},
                           text_embeds=(TextEmbedsSpec(id="text", write_batch_size=text_batch_size, default=True),))
    return build_datasets(config, model=model, out_dir=out_dir, vae_precision=vae_precision,
                          text_precision=text_precision, device=device, extra_prompts=extra_prompts,
                          bucket_step=bucket_step, min_side_px=min_side_px, vae_batch_size=vae_batch_size,
                          encoders=encoders, progress=progress, _strict_folder_errors=True)


def _size_reason(image: ScannedImage, spec: Any) -> str | None:
    """Why an image is outside the dataset's size or aspect limits, or None."""
    from .buckets import image_size_measure

    unit = {"pixel_area": "sqrt(w*h) px", "area": "megapixels", "pixel": "px shorter side"}[spec.resolution_type]
    size = image_size_measure(image.width, image.height, resolution_type=spec.resolution_type)
    if spec.minimum_image_size is not None and size < spec.minimum_image_size:
        return (f"too small: {image.width}x{image.height} is {size:.4g} {unit}, under minimum_image_size "
                f"{spec.minimum_image_size:g}")
    if spec.maximum_image_size is not None and size > spec.maximum_image_size:
        return (f"too large: {image.width}x{image.height} is {size:.4g} {unit}, above maximum_image_size "
                f"{spec.maximum_image_size:g}")
    aspect = image.width / image.height
    if spec.minimum_aspect_ratio is not None and aspect < spec.minimum_aspect_ratio:
        return f"aspect {aspect:.3g} ({image.width}x{image.height}) is under minimum_aspect_ratio {spec.minimum_aspect_ratio:g}"
    if spec.maximum_aspect_ratio is not None and aspect > spec.maximum_aspect_ratio:
        return f"aspect {aspect:.3g} ({image.width}x{image.height}) is above maximum_aspect_ratio {spec.maximum_aspect_ratio:g}"
    return None


def _plan_for(image: ScannedImage, spec: Any, *, step: int) -> CropPlan:
    from .buckets import choose_bucket, plan_crop_styled

    # crop_aspect random draws from the dataset id and the image's content: a rebuild gets the same aspect,
    # hence the same latent cache key; the same file in two datasets may get different aspects.
    bucket = choose_bucket(image.width, image.height, resolution=spec.resolution,
                           resolution_type=spec.resolution_type, crop=spec.crop, crop_aspect=spec.crop_aspect,
                           crop_aspect_buckets=spec.crop_aspect_buckets, random_key=f"{spec.id}/{image.sha256}",
                           step=step)
    style = spec.crop_style if spec.crop else "center"
    return plan_crop_styled(image.width, image.height, bucket=bucket, crop_style=style, random_key=image.sha256)


def _stem_key(relpath: str) -> str:
    """The name references are matched by: the relative path without its extension."""
    return relpath.rsplit(".", 1)[0] if "." in relpath.rsplit("/", 1)[-1] else relpath


def _dataset_entry(kind: str, folder: Path, copies: int, *, probability: float = 1.0) -> dict[str, Any]:
    return {"type": kind, "folder": str(folder), "found": 0, "used": 0, "skipped": [], "buckets": {},
            "copies": copies, "probability": probability, "caption_words": {}, "captions": 0,
            "images_with_several_captions": 0, "latents_encoded": 0, "latents_reused": 0,
            "latent_bytes_per_image": 0.0}


def build_datasets(
    config: Any,
    *,
    model: ModelFolder,
    out_dir: str | Path,
    vae_precision: str = "fp32",
    text_precision: str = "bf16",
    device: str = "cpu",
    extra_prompts: Sequence[str] = (),
    bucket_step: int = 16,
    min_side_px: int = 16,
    vae_batch_size: int = 4,
    encoders: Any = None,
    progress: BuildProgress | None = None,
    _strict_folder_errors: bool = False,
) -> Path:
    """Build every dataset of a BackendConfig (databackend.py) into one manifest under out_dir; return its path.

    Each image dataset is scanned (unusable files skipped with the reason), filtered by its size and aspect
    limits, bucketed and cropped by its own settings; conditioning datasets named by its conditioning_data
    give each image its references, matched by relative path without extension. A reference_strict dataset
    that lacks a file the image dataset needs is an error naming the files (training on unpaired edit images
    would be wrong); under reference_loose that image is skipped with the reason.

    Only cache misses touch the encoders: the VAE is loaded at most once for all datasets and released
    before the text encoder loads (at most once, for every caption of every text_embeds cache); a second
    build with the same inputs loads neither. The text cache always holds "" (caption dropout) and
    extra_prompts (validation), so training never needs the text encoder. report.json records everything.
    progress: see BuildProgress (a node's progress bar and its Cancel).
    """
    _check_common_args(extra_prompts=extra_prompts, vae_batch_size=vae_batch_size, text_batch_size=None)
    if encoders is not None:  # offload.EncoderSettings: quantization / group offload of the encoders
        encoders.check(device=device)
    for name, value in (("vae_precision", vae_precision), ("text_precision", text_precision)):
        if value not in model_files.PRECISIONS:
            raise ValueError(
                f"{name} {value!r} is not one of {', '.join(model_files.PRECISIONS)}; fp32 is the safe choice "
                "for the VAE."
            )
    out = check_writable_dir(Path(out_dir), what="dataset output folder (out_dir)")
    specs = list(config.datasets)
    for spec in specs:
        if not (math.isfinite(spec.probability) and spec.probability >= 0):
            raise ValueError(f"dataset {spec.id!r}: probability is {spec.probability!r}; give a finite weight >= 0 "
                             "(1 is the default, 0 leaves the dataset out of training).")
    if all(spec.probability == 0 for spec in specs):
        raise ValueError(f"every image dataset has probability 0 ({', '.join(s.id for s in specs)}), so nothing would "
                         "be trained on; give at least one a probability above 0 (the default is 1).")
    used_cond = [config.conditioning[c] for c in dict.fromkeys(c for d in specs for c in d.conditioning_data)]
    latent_dirs: dict[str, Path] = {}
    for spec in specs + used_cond:
        if spec.cache_dir_vae is None:
            latent_dirs[spec.id] = out / LATENT_DIR
            latent_dirs[spec.id].mkdir(exist_ok=True)
        else:
            latent_dirs[spec.id] = check_writable_dir(spec.cache_dir_vae, what=f"dataset {spec.id!r} cache_dir_vae")
    text_dirs: dict[str, Path] = {}
    for t in config.text_embeds or (config.default_text_embeds(),):
        if t.cache_dir is None:
            text_dirs[t.id] = out / TEXT_DIR
            text_dirs[t.id].mkdir(exist_ok=True)
        else:
            text_dirs[t.id] = check_writable_dir(t.cache_dir, what=f"text_embeds dataset {t.id!r} cache_dir")
    excluded = [out, *latent_dirs.values(), *text_dirs.values()]
    first_folder = specs[0].instance_data_dir.expanduser().resolve()
    report = BuildReport(image_dir=str(first_folder), out_dir=str(out), warnings=list(config.warnings),
                         disabled_datasets=list(config.disabled))
    report.warnings += [f"dataset {s.id!r} has probability 0: it is built but never sampled (left out of training)"
                        for s in specs if s.probability == 0]
    ids = encoder_identities(model)

    def scan(spec) -> ScanResult:
        conditioning = spec.dataset_type == "conditioning"
        try:
            result = scan_image_folder(
                spec.instance_data_dir, caption_strategy="filename" if conditioning else spec.caption_strategy,
                instance_prompt=None if conditioning else spec.instance_prompt, min_side_px=min_side_px,
                exclude=excluded, disable_multiline_split=spec.disable_multiline_split, progress=progress,
            )
        except ValueError as exc:
            if _strict_folder_errors:
                raise
            raise ValueError(f"dataset {spec.id!r} (instance_data_dir): {exc}") from None
        entry = report.datasets.setdefault(spec.id, _dataset_entry(spec.dataset_type, result.folder, spec.copies,
                                                                   probability=spec.probability))
        entry["found"] = len(result.images) + sum(1 for s in result.skipped if s.path.suffix.lower() in IMAGE_EXTENSIONS)
        for s in result.skipped:
            entry["skipped"].append({"path": str(s.path), "reason": s.reason})
        report.warnings.extend(f"{spec.id}: {w}" if not _strict_folder_errors else w for w in result.warnings)
        return result

    def keep(spec, image: ScannedImage) -> bool:
        reason = _size_reason(image, spec)
        if reason is not None:
            report.datasets[spec.id]["skipped"].append({"path": str(image.path), "reason": reason})
        return reason is None

    def pending_for(spec, image: ScannedImage, plan: CropPlan) -> _PendingItem:
        if plan.scale > 2.0:
            report.warnings.append(
                f"{image.relpath} ({image.width}x{image.height}) is upscaled {plan.scale:.1f}x to "
                f"{plan.bucket[0]}x{plan.bucket[1]}; use larger images or a lower resolution"
            )
        key = latent_key(image_sha256=image.sha256, vae_identity=ids["vae"], precision=vae_precision, plan=plan)
        return _PendingItem(image=image, plan=plan, latent_key=key, latent_dir=latent_dirs[spec.id], dataset=spec.id)

    cond_images: dict[str, dict[str, ScannedImage]] = {}
    cond_skipped: dict[str, dict[str, str]] = {}
    for c in used_cond:
        result = scan(c)
        cond_images[c.id] = {_stem_key(im.relpath): im for im in result.images if keep(c, im)}
        cond_skipped[c.id] = {_stem_key(s.path.relative_to(result.folder).as_posix()): s.reason
                              for s in result.skipped}
        cond_skipped[c.id].update({_stem_key(s["path"][len(str(result.folder)) + 1:]): s["reason"]
                                   for s in report.datasets[c.id]["skipped"]})

    # Per image dataset: (spec, [(target pending, [reference pendings])]).
    planned: list[tuple[Any, list[tuple[_PendingItem, list[_PendingItem]]]]] = []
    for spec in specs:
        result = scan(spec)
        rows: list[tuple[_PendingItem, list[_PendingItem]]] = []
        missing: dict[str, list[str]] = {}
        for image in result.images:
            if not keep(spec, image):
                continue
            plan = _plan_for(image, spec, step=bucket_step)
            refs: list[_PendingItem] = []
            reason = None
            for cid in spec.conditioning_data:
                cspec = config.conditioning[cid]
                ref = cond_images[cid].get(_stem_key(image.relpath))
                if ref is None:
                    why = cond_skipped[cid].get(_stem_key(image.relpath))
                    if why is None and cspec.conditioning_type == "reference_strict":
                        missing.setdefault(cid, []).append(image.relpath)
                    reason = (f"unmatched reference: conditioning dataset {cid!r} has no usable "
                              f"{_stem_key(image.relpath)}.* ({why or 'no such file'})")
                    break
                if cspec.conditioning_type == "reference_strict":
                    if abs(math.log((ref.width / ref.height) / (image.width / image.height))) > 0.02:
                        reason = (f"reference {cid}/{ref.relpath} is {ref.width}x{ref.height} but "
                                  f"reference_strict needs the edit image's aspect ({image.width}x{image.height})")
                        break
                    from .buckets import plan_matching_crop

                    ref_plan = plan_matching_crop(ref.width, ref.height, like=plan)
                else:
                    ref_plan = _plan_for(ref, cspec, step=bucket_step)
                refs.append(pending_for(cspec, ref, ref_plan))
            if reason is not None:
                report.datasets[spec.id]["skipped"].append({"path": str(image.path), "reason": reason})
                continue
            rows.append((pending_for(spec, image, plan), refs))
        if missing:
            detail = "; ".join(
                f"{cid} ({config.conditioning[cid].instance_data_dir}) lacks {len(names)}: "
                + ", ".join(_stem_key(n) + ".*" for n in names[:10]) + (" ..." if len(names) > 10 else "")
                for cid, names in missing.items()
            )
            raise ValueError(
                f"dataset {spec.id!r} conditioning_data: reference_strict needs a reference for every image, matched "
                f"by relative path without extension; {detail}. Add the reference images, remove the edit images "
                "without one, or use conditioning_type reference_loose to skip unpaired images."
            )
        planned.append((spec, rows))

    everything = [p for _, rows in planned for target, refs in rows for p in [target, *refs]]
    encoded_keys, failed = _fill_latent_cache(everything, model=model, precision=vae_precision, device=device,
                                              batch_size=vae_batch_size, report=report, encoders=encoders,
                                              progress=progress)

    # Captions per text cache; "" and the validation prompts go to the default one.
    default_text = config.default_text_embeds()
    text_jobs: dict[str, list[str]] = {t: [] for t in text_dirs}
    usable: list[tuple[Any, list[tuple[_PendingItem, list[_PendingItem]]]]] = []
    for spec, rows in planned:
        keep_rows = []
        for target, refs in rows:
            bad = next((p for p in [target, *refs] if p.latent_key in failed), None)
            if bad is not None:
                what = "" if bad is target else f"reference {bad.image.path}: "
                report.datasets[spec.id]["skipped"].append(
                    {"path": str(target.image.path), "reason": what + failed[bad.latent_key]})
                continue
            keep_rows.append((target, refs))
        if not keep_rows:
            _finish_report(report, out)
            skipped = report.datasets[spec.id]["skipped"]
            raise ValueError(
                f"dataset {spec.id!r} ({spec.instance_data_dir}) has no usable images "
                f"({len(skipped)} skipped: {'; '.join(Path(s['path']).name + ': ' + s['reason'] for s in skipped[:5])})."
            )
        usable.append((spec, keep_rows))
        text_jobs[config.text_spec_for(spec).id].extend(c for t, _ in keep_rows for c in t.image.captions)
    text_jobs[default_text.id].extend(["", *extra_prompts])
    batch_sizes = {t.id: t.write_batch_size for t in (config.text_embeds or (default_text,))}
    text_paths = _fill_text_cache(
        {t: sorted(set(c)) for t, c in text_jobs.items() if c}, text_dirs=text_dirs, batch_sizes=batch_sizes,
        model=model, text_identity=ids["text"], precision=text_precision, device=device, report=report,
        encoders=encoders, progress=progress,
    )

    def stored(path: Path) -> str:
        return path.relative_to(out).as_posix() if path.is_relative_to(out) else str(path)

    manifest_items = []
    latent_sizes: dict[str, list[int]] = {}
    for spec, rows in usable:
        entry = report.datasets[spec.id]
        tid = config.text_spec_for(spec).id
        for target, refs in rows:
            image = target.image
            # caption/text hold the first caption; captions/texts (all of them) only when there are several.
            several = {"captions": list(image.captions),
                       "texts": [stored(text_paths[tid][c]) for c in image.captions]} if len(image.captions) > 1 else {}
            manifest_items.append({
                "image": image.relpath,
                "source": spec.id,
                "caption": image.caption,
                "image_sha256": image.sha256,
                "width": image.width,
                "height": image.height,
                "bucket": list(target.plan.bucket),
                "resized": list(target.plan.resized),
                "crop": list(target.plan.crop),
                "latent": stored(target.latent_path),
                "text": stored(text_paths[tid][image.caption]),
                "repeats": spec.copies,
                "references": [
                    {"source": r.dataset, "image": r.image.relpath, "image_sha256": r.image.sha256,
                     "width": r.image.width, "height": r.image.height, "bucket": list(r.plan.bucket),
                     "resized": list(r.plan.resized), "crop": list(r.plan.crop), "latent": stored(r.latent_path)}
                    for r in refs
                ],
            } | several)
            for p in [target, *refs]:
                ds_entry = report.datasets[p.dataset]
                if p.latent_key in encoded_keys:
                    ds_entry["latents_encoded"] += 1
                else:
                    ds_entry["latents_reused"] += 1
                latent_sizes.setdefault(p.dataset, []).append(p.latent_path.stat().st_size)
                ds_entry["used"] += 1
                key = f"{p.plan.bucket[0]}x{p.plan.bucket[1]}"
                ds_entry["buckets"][key] = ds_entry["buckets"].get(key, 0) + 1
            key = f"{target.plan.bucket[0]}x{target.plan.bucket[1]}"
            report.buckets[key] = report.buckets.get(key, 0) + 1
        words = [len(c.split()) for t, _ in rows for c in t.image.captions]  # every caption, not just the first
        entry["caption_words"] = {"min": min(words), "mean": round(sum(words) / len(words), 2), "max": max(words),
                                  "empty": sum(1 for w in words if w == 0)}
        entry["captions"] = len(words)
        entry["images_with_several_captions"] = sum(1 for t, _ in rows if len(t.image.captions) > 1)
        report.captions += entry["captions"]
        report.multi_caption_images += entry["images_with_several_captions"]
    for ds, sizes in latent_sizes.items():
        report.datasets[ds]["latent_bytes_per_image"] = sum(sizes) / len(sizes)
        report.datasets[ds]["buckets"] = dict(sorted(report.datasets[ds]["buckets"].items()))
    all_sizes = [s for sizes in latent_sizes.values() for s in sizes]
    report.latent_bytes_per_image = sum(all_sizes) / len(all_sizes)
    text_files = {p for paths in text_paths.values() for p in paths.values()}
    report.text_bytes_per_caption = sum(p.stat().st_size for p in text_files) / max(1, len(text_files))
    report.buckets = dict(sorted(report.buckets.items()))
    report.usable_images = len(manifest_items)
    for info in report.datasets.values():
        report.skipped.extend(info["skipped"])

    default_paths = text_paths[default_text.id]
    text_cache: dict[str, str] = {c: stored(p) for c, p in default_paths.items()}
    for item in manifest_items:
        for caption, text in zip(item.get("captions", [item["caption"]]), item.get("texts", [item["text"]])):
            text_cache.setdefault(caption, text)
    sources = [_source_record(s) for s in specs + used_cond]
    first = specs[0]
    manifest = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "fingerprint": dataset_fingerprint(manifest_items, model_identity=ids["model"],
                                           probabilities={s["id"]: s["probability"] for s in sources}),
        "model_identity": ids["model"],
        "vae_identity": ids["vae"],
        "text_identity": ids["text"],
        "vae_precision": vae_precision,
        "text_precision": text_precision,
        "resolution": int(first.resolution) if first.resolution_type != "area" else int(
            round(math.sqrt(first.resolution * 1_000_000))),
        "sources": sources,
        "items": manifest_items,
        "text_cache": dict(sorted(text_cache.items())),
        "empty_caption": "",
        "extra_prompts": list(dict.fromkeys(extra_prompts)),
        "backend_config": str(config.path) if config.path else None,
    }
    manifest_path = out / MANIFEST_FILE
    atomic_write_bytes(manifest_path, json.dumps(manifest, indent=1, ensure_ascii=False).encode("utf-8"))
    _finish_report(report, out)
    log.info("dataset built: %s", report.summary().splitlines()[0])
    return manifest_path


def _source_record(spec: Any) -> dict[str, Any]:
    return {
        "id": spec.id,
        "type": "local",
        "dataset_type": spec.dataset_type,
        "image_dir": str(spec.instance_data_dir.expanduser().resolve()),
        "caption_strategy": spec.caption_strategy,
        "instance_prompt": spec.instance_prompt,
        "resolution": spec.resolution,
        "resolution_type": spec.resolution_type,
        "crop": spec.crop,
        "crop_aspect": spec.crop_aspect,
        "crop_aspect_buckets": [list(pair) for pair in spec.crop_aspect_buckets],
        "crop_style": spec.crop_style,
        "bucket_step": 16,
        "repeats": spec.copies,
        "probability": spec.probability,
        "disable_multiline_split": spec.disable_multiline_split,
        "conditioning_data": list(spec.conditioning_data),
        "conditioning_multidataset_sampling": spec.conditioning_multidataset_sampling,
        "conditioning_type": spec.conditioning_type,
    }


def _finish_report(report: BuildReport, out: Path) -> None:
    _write_report(report, out)


def _write_report(report: BuildReport, out: Path) -> None:
    data = report.to_dict() | {}
    atomic_write_bytes(out / REPORT_FILE, json.dumps(data, indent=1, ensure_ascii=False).encode("utf-8"))


def dataset_fingerprint(items: Sequence[dict[str, Any]], *, model_identity: str,
                        probabilities: dict[str, float] | None = None) -> str:
    """The dataset's identity for caching training runs: what the trainer sees, independent of file names.

    sha256 over the sorted (image sha256, caption, bucket, crop, repeats[, references][, {all captions,
    probability}]) of every item, the encoders' identity (other encoders mean other latents) and the
    preprocessing version. The captions of an item with several and its dataset's probability (from
    probabilities, by source id) enter only when they differ from a single caption and 1, so datasets
    without either keep the fingerprint they had before those existed.
    """
    rows = []
    for it in items:
        row = [it["image_sha256"], it["caption"], list(it["bucket"]), list(it["crop"]), int(it["repeats"])]
        if it.get("references"):
            row.append([[r["image_sha256"], list(r["bucket"]), list(r["crop"])] for r in it["references"]])
        extra: dict[str, Any] = {}
        if len(it.get("captions", ())) > 1:
            extra["captions"] = list(it["captions"])
        weight = (probabilities or {}).get(it.get("source", ""), 1.0)
        if weight != 1.0:
            extra["probability"] = float(weight)
        if extra:
            row.append(extra)
        rows.append(row)
    # Ties on the plain fields (duplicate images) are broken by the JSON of the rest: dicts do not compare.
    rows.sort(key=lambda r: (r[:5], json.dumps(r[5:], sort_keys=True)))
    return hash_json({"preprocess": PREPROCESS_VERSION, "model": model_identity, "items": rows})


def _fill_latent_cache(pending: list[_PendingItem], *, model: ModelFolder, precision: str, device: str,
                       batch_size: int, report: BuildReport, encoders: Any = None,
                       progress: BuildProgress | None = None) -> tuple[set[str], dict[str, str]]:
    """Encode every missing latent; return (keys encoded now, {latent key: reason} for images that failed)."""
    misses: dict[str, _PendingItem] = {}
    seen: set[tuple[str, Path]] = set()
    for p in pending:
        if (p.latent_key, p.latent_dir) in seen:
            continue
        seen.add((p.latent_key, p.latent_dir))
        if _cached_entry(p.latent_path, kind="latent", key=p.latent_key, report=report) is not None:
            report.latents_reused += 1
        else:
            misses[p.latent_key] = p
    failed: dict[str, str] = {}
    if not misses:
        return set(), failed
    by_bucket: dict[tuple[int, int], list[_PendingItem]] = {}
    for p in misses.values():
        by_bucket.setdefault(p.plan.bucket, []).append(p)
    from . import offload

    total = len(misses)
    if progress is not None:
        progress("latents", 0, total)  # a Cancel pressed during the scan stops before the VAE loads
    vae = offload.load_vae(model, precision=precision, device=device, encoders=encoders)
    report.vae_loaded = True
    encoded: set[str] = set()
    done = 0
    try:
        for bucket in sorted(by_bucket):
            group = by_bucket[bucket]
            for start in range(0, len(group), batch_size):
                chunk, pixels = [], []
                for p in group[start : start + batch_size]:
                    try:
                        pixels.append(load_training_image(p.image.path, plan=p.plan))
                        chunk.append(p)
                    except (OSError, ValueError, SyntaxError) as exc:
                        failed[p.latent_key] = f"failed to decode ({type(exc).__name__}: {exc})"
                done += len(group[start : start + batch_size])
                if not chunk:
                    if progress is not None:
                        progress("latents", done, total)
                    continue
                with torch.no_grad():
                    latents = flux2.encode_images(vae, torch.stack(pixels)).cpu()
                for p, latent in zip(chunk, latents):
                    write_entry(
                        p.latent_path,
                        {LATENT_TENSOR: latent},
                        kind="latent",
                        key=p.latent_key,
                        metadata={"image_sha256": p.image.sha256, "bucket": f"{bucket[0]}x{bucket[1]}"},
                    )
                    encoded.add(p.latent_key)
                report.vae_images_encoded += len(chunk)
                if progress is not None:
                    progress("latents", done, total)
    finally:
        # Free the VAE before the text encoder loads: on a GPU the two need not fit together.
        del vae
        _free_memory(device)
    return encoded, failed


def _fill_text_cache(jobs: dict[str, list[str]], *, text_dirs: dict[str, Path], batch_sizes: dict[str, int],
                     model: ModelFolder, text_identity: str, precision: str, device: str,
                     report: BuildReport, encoders: Any = None,
                     progress: BuildProgress | None = None) -> dict[str, dict[str, Path]]:
    """Encode every missing caption of every text cache with one encoder load; {cache id: {caption: path}}."""
    paths: dict[str, dict[str, Path]] = {}
    misses: dict[str, list[tuple[str, str]]] = {}
    truncated: list[str] = []
    for tid, captions in jobs.items():
        paths[tid] = {}
        for caption in captions:
            # A quantized text encoder gives other embeddings: its precision tag keeps them apart.
            tag = precision if encoders is None else encoders.text_cache_tag(precision)
            key = text_key(caption=caption, text_identity=text_identity, precision=tag)
            paths[tid][caption] = text_dirs[tid] / f"{key}.safetensors"
            meta = _cached_entry(paths[tid][caption], kind="text", key=key, report=report)
            if meta is None:
                misses.setdefault(tid, []).append((caption, key))
                continue
            report.prompts_reused += 1
            if meta.get("truncated") == "1":
                truncated.append(caption)
    if misses:
        total, done = sum(len(todo) for todo in misses.values()), 0
        if progress is not None:
            progress("captions", 0, total)
        tokenizer = model_files.load_tokenizer(model)
        from . import offload

        text_encoder = offload.load_text_encoder(model, precision=precision, device=device, encoders=encoders)
        report.text_encoder_loaded = True
        try:
            for tid, todo in misses.items():
                size = batch_sizes.get(tid, 4)
                for start in range(0, len(todo), size):
                    chunk = todo[start : start + size]
                    prompts = [c for c, _ in chunk]
                    _, _, cut_flags = flux2.tokenize_prompts(tokenizer, prompts)
                    embeds = flux2.encode_prompts(text_encoder, tokenizer, prompts, device="cpu")
                    for (caption, key), embed, cut in zip(chunk, embeds, cut_flags):
                        write_entry(paths[tid][caption], {TEXT_TENSOR: embed}, kind="text", key=key,
                                    metadata={"truncated": "1" if cut else "0"})
                        if cut:
                            truncated.append(caption)
                    report.prompts_encoded += len(chunk)
                    done += len(chunk)
                    if progress is not None:
                        progress("captions", done, total)
        finally:
            del text_encoder
            _free_memory(device)
    for caption in dict.fromkeys(truncated):
        report.truncated_captions.append(caption)
        report.warnings.append(
            f"caption longer than {flux2.MAX_TEXT_TOKENS} tokens is truncated: {caption[:80]!r}"
            + ("..." if len(caption) > 80 else "")
        )
        log.warning("caption truncated at %d tokens: %.80r", flux2.MAX_TEXT_TOKENS, caption)
    return paths


# ------------------------------------------------------------------------------------------- for the trainer

RUN_DATASET_DIR = "dataset"
"""Subfolder of a run's output_dir where a data_backend_config is built (manifest and report)."""
RUN_SUMMARY_FILE = "dataset_summary.txt"
RUN_REPORT_FILE = "dataset_report.json"


def check_mergeable(manifests: Sequence[Manifest]) -> None:
    """Refuse datasets that cannot train together: one given twice, or built with another VAE or text encoder.

    Cheap (no tensors read), so the Train LoRA node runs it before it launches anything.
    """
    seen: dict[Path, int] = {}
    for n, m in enumerate(manifests, start=1):
        if m.path in seen:
            raise ValueError(
                f"dataset {n} and dataset {seen[m.path]} are the same dataset ({m.path}); give each dataset once "
                "(raise its repeats in Build Dataset to weight it more)."
            )
        seen[m.path] = n
    first = manifests[0]
    for n, m in enumerate(manifests[1:], start=2):
        for what, attr in (("VAE", "vae_identity"), ("text encoder", "text_identity")):
            if getattr(m, attr) != getattr(first, attr):
                raise ValueError(
                    f"dataset {n} ({m.path}) was built with another {what} than dataset 1 ({first.path}); build "
                    "every dataset with the same Load FLUX.2 model (Build Dataset reuses unchanged cache entries)."
                )


def merge_manifests(paths: Sequence[Path], *, out_dir: Path) -> Path:
    """One manifest over several built datasets, written to out_dir/manifest.json with its merged report.

    Each dataset keeps its own caches (the merged manifest points at them by absolute path, nothing is
    copied) and its own buckets: a batch never mixes datasets, and each dataset's repeats weight it. A
    dataset id used by two of them gets the dataset's position as a suffix ("default" and "default-2").
    All of them must have been built with the same VAE and text encoder (their latents and embeddings are
    trained on together).
    """
    if len(paths) < 2:
        raise ValueError(f"merge_manifests needs at least two manifests, got {len(paths)}.")
    manifests = [load_manifest(p) for p in paths]  # each checked in full: errors name its file
    check_mergeable(manifests)
    first = manifests[0]
    sources: list[dict[str, Any]] = []
    items: list[dict[str, Any]] = []
    text_cache: dict[str, str] = {}
    taken: set[str] = set()
    raw = [json.loads(m.path.read_text(encoding="utf-8")) for m in manifests]
    for n, (m, data) in enumerate(zip(manifests, raw), start=1):
        renamed = {}
        for record in data["sources"]:
            new_id = record["id"] if record["id"] not in taken else f"{record['id']}-{n}"
            if new_id in taken:
                raise ValueError(f"dataset {n} ({m.path}): dataset id {record['id']!r} clashes with another "
                                 "dataset's id even with a suffix; rename it in its data_backend_config.")
            taken.add(new_id)
            renamed[record["id"]] = new_id
        for record in data["sources"]:
            sources.append(record | {"id": renamed[record["id"]],
                                     "conditioning_data": [renamed[c] for c in record.get("conditioning_data", ())],
                                     "probability": m.sources[record["id"]].probability})
        for i, record in enumerate(data["items"]):
            item = m.items[i]
            # Several captions: every one of their cache files, made absolute like the rest.
            several = {"captions": list(item.captions),
                       "texts": [str(cache_file_path(m.root, t, path=m.path, what="cache file")) for t in item.texts]
                       } if len(item.captions) > 1 else {}
            items.append(record | {
                "source": renamed[item.source],
                "latent": str(m.latent_path(i)),
                "text": str(cache_file_path(m.root, item.text, path=m.path, what="cache file")),
                "references": [
                    ref | {"source": renamed[ref["source"]], "latent": str(m.reference_latent_path(i, k))}
                    for k, ref in enumerate(record.get("references", ()))
                ],
            } | several)
        for caption, rel in m.text_cache.items():
            text_cache.setdefault(caption, str(cache_file_path(m.root, rel, path=m.path, what="cache file")))
    merged = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "fingerprint": hash_json({"merged": [m.fingerprint for m in manifests]}),
        "model_identity": first.model_identity,
        "vae_identity": first.vae_identity,
        "text_identity": first.text_identity,
        "resolution": max(m.resolution for m in manifests),
        "sources": sources,
        "items": items,
        "text_cache": dict(sorted(text_cache.items())),
        "empty_caption": first.empty_caption,
        "extra_prompts": list(dict.fromkeys(p for m in manifests for p in m.extra_prompts)),
        "merged_from": [str(m.path) for m in manifests],
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = _merged_report(manifests, out_dir=out_dir, renamed_sources=[s["id"] for s in sources])
    _write_report(report, out_dir)
    path = out_dir / MANIFEST_FILE
    atomic_write_bytes(path, json.dumps(merged, indent=1, ensure_ascii=False).encode("utf-8"))
    return path


def _merged_report(manifests: Sequence[Manifest], *, out_dir: Path, renamed_sources: Sequence[str]) -> BuildReport:
    """The build reports of merged datasets as one (counts summed, datasets listed under their merged ids)."""
    reports = []
    for m in manifests:
        path = m.root / REPORT_FILE
        reports.append(load_build_report(path) if path.is_file() else None)
    merged = BuildReport(image_dir="; ".join(r.image_dir if r else str(m.root) for r, m in zip(reports, manifests)),
                         out_dir=str(out_dir))
    ids = iter(renamed_sources)
    weighted_latent = weighted_text = 0.0
    for m, r in zip(manifests, reports):
        own_ids = {s: next(ids) for s in m.sources}
        if r is None:
            merged.usable_images += len(m.items)
            merged.warnings.append(f"{m.root} has no {REPORT_FILE}: its counts are not in this report")
            continue
        merged.usable_images += r.usable_images
        merged.skipped += r.skipped
        merged.warnings += r.warnings
        for bucket, count in r.buckets.items():
            merged.buckets[bucket] = merged.buckets.get(bucket, 0) + count
        for counter in ("vae_images_encoded", "latents_reused", "prompts_encoded", "prompts_reused"):
            setattr(merged, counter, getattr(merged, counter) + getattr(r, counter))
        merged.truncated_captions += r.truncated_captions
        merged.rebuilt_cache_files += r.rebuilt_cache_files
        merged.vae_loaded |= r.vae_loaded
        merged.text_encoder_loaded |= r.text_encoder_loaded
        merged.datasets |= {own_ids.get(ds, ds): info for ds, info in r.datasets.items()}
        merged.disabled_datasets += r.disabled_datasets
        merged.captions += r.captions
        merged.multi_caption_images += r.multi_caption_images
        weighted_latent += r.latent_bytes_per_image * r.usable_images
        weighted_text += r.text_bytes_per_caption
    merged.buckets = dict(sorted(merged.buckets.items()))
    merged.latent_bytes_per_image = weighted_latent / max(1, merged.usable_images)
    merged.text_bytes_per_caption = weighted_text / max(1, sum(r is not None for r in reports))
    return merged


def resolve_training_manifest(
    *,
    dataset_manifests: Sequence[Path],
    data_backend_config: Path | None,
    model: ModelFolder,
    out_dir: Path,
    is_main: bool,
    barrier: Callable[[], None],
    device: str = "cpu",
    vae_batch_size: int = 4,
    encoders: Any = None,
) -> Manifest:
    """The manifest a run trains on, with its summary written into the run folder by rank 0.

    With data_backend_config, rank 0 builds it into out_dir/dataset before any transformer loads (only
    missing cache entries are encoded; a complete cache loads no encoder) while the other ranks wait on the
    barrier; several dataset_manifests are merged there the same way. Then every rank loads the manifest.
    """
    if bool(dataset_manifests) == (data_backend_config is not None):
        raise ValueError("give exactly one of dataset_manifest and data_backend_config.")
    path = Path(out_dir) / RUN_DATASET_DIR / MANIFEST_FILE
    if data_backend_config is not None:
        from .databackend import load_backend_config

        config = load_backend_config(data_backend_config)  # every rank checks it: errors show on all of them
        if is_main:
            build_datasets(config, model=model, out_dir=path.parent, device=device, vae_batch_size=vae_batch_size,
                           vae_precision="fp32", text_precision="fp32" if device == "cpu" else "bf16",
                           encoders=encoders)
        barrier()
    elif len(dataset_manifests) > 1:
        if is_main:
            merge_manifests(dataset_manifests, out_dir=path.parent)
        barrier()
    else:
        path = Path(dataset_manifests[0])
    manifest = load_manifest(path)
    if is_main:
        write_run_summary(manifest, out_dir=Path(out_dir))
    return manifest


def write_run_summary(manifest: Manifest, *, out_dir: Path) -> None:
    """Copy the build report (used/skipped per dataset, buckets, cache bytes per image) into the run folder."""
    report_path = manifest.root / REPORT_FILE
    if report_path.is_file():
        report = load_build_report(report_path)
        text, record = report.summary(), report.to_dict() | {"cache_hit_rate": report.cache_hit_rate}
    else:
        text = f"{len(manifest.items)} items in {len(manifest.buckets())} buckets (no report.json next to the manifest)"
        record = {"usable_images": len(manifest.items)}
    record |= {"manifest": str(manifest.path), "fingerprint": manifest.fingerprint}
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out_dir / RUN_REPORT_FILE, json.dumps(record, indent=1, ensure_ascii=False).encode("utf-8"))
    atomic_write_bytes(out_dir / RUN_SUMMARY_FILE, (f"manifest: {manifest.path}\n" + text + "\n").encode("utf-8"))
