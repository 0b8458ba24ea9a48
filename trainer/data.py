"""The training dataset: scan a folder, cache VAE latents and caption embeddings, sample bucketed batches.

Build (once per content, on the machine with the encoders):
  scan_image_folder -> per image: bucket + crop (trainer/buckets.py) -> VAE latents cached by image content
  -> caption embeddings cached by caption text (plus "" for caption dropout and the validation prompts)
  -> out_dir/manifest.json + out_dir/report.json.
Train (any number of processes, no encoder needed): load_manifest -> BucketBatchSampler -> load_batch.

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
import os
import random
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from . import flux2, model_files
from .buckets import CropPlan, assign_bucket, plan_crop
from .cache import CacheEntryError, atomic_write_bytes, check_writable_dir, hash_json, read_entry, write_entry
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

MANIFEST_FORMAT = "flux2-lora-dataset"
MANIFEST_VERSION = 1
MANIFEST_FILE = "manifest.json"
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
LATENT_TENSOR = "latents"
TEXT_TENSOR = "prompt_embeds"
_EXIF_ORIENTATION = 0x0112


# ------------------------------------------------------------------------------------------------- scanning


@dataclass(frozen=True, kw_only=True, slots=True)
class ScannedImage:
    path: Path
    """Absolute path of the image file."""
    relpath: str
    """Path relative to the scanned folder, with forward slashes."""
    caption: str
    width: int
    """Width as displayed, after the EXIF orientation is applied."""
    height: int
    sha256: str
    """sha256 of the file's bytes: the image's identity in every cache key."""


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


def _caption_for(
    image: Path, *, caption_strategy: str, instance_prompt: str | None
) -> tuple[str | None, str | None]:
    """(caption, None) or (None, skip reason)."""
    if caption_strategy == "instanceprompt":
        return str(instance_prompt).strip(), None
    if caption_strategy == "filename":
        return " ".join(image.stem.replace("_", " ").split()), None
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
        return raw.decode("utf-8-sig").strip(), None
    except UnicodeDecodeError as exc:
        return None, (
            f"caption file {caption_file.name} is not UTF-8 (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
            "re-save it as UTF-8"
        )


def scan_image_folder(
    folder: str | Path,
    *,
    caption_strategy: CaptionStrategy = "textfile",
    instance_prompt: str | None = None,
    min_side_px: int = 16,
    max_pixels: int = MAX_IMAGE_PIXELS,
    exclude: Sequence[str | Path] = (),
) -> ScanResult:
    """Every usable image under folder (recursively, sorted by relative path) with its caption.

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
    for path in _walk(root, exclude=excluded):
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
        caption, reason = _caption_for(path, caption_strategy=caption_strategy, instance_prompt=instance_prompt)
        if caption is None:
            result.skipped.append(SkippedFile(path=path, reason=str(reason)))
            continue
        if caption == "" and caption_strategy == "textfile":
            result.warnings.append(f"{rel} has an empty caption (trained as unconditional)")
        digest = hashlib.sha256(data).hexdigest()
        if digest in seen_content:
            result.warnings.append(f"{rel} has the same contents as {seen_content[digest]}")
        seen_content.setdefault(digest, rel)
        result.images.append(
            ScannedImage(path=path, relpath=rel, caption=caption, width=width, height=height, sha256=digest)
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
    """What a build did; saved as out_dir/report.json. The counters prove cache reuse in tests."""

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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        lines = [
            f"{self.usable_images} usable images in {len(self.buckets)} buckets "
            f"({', '.join(f'{b}: {n}' for b, n in self.buckets.items())}); {len(self.skipped)} skipped.",
            f"latents: {self.vae_images_encoded} encoded, {self.latents_reused} reused; "
            f"captions: {self.prompts_encoded} encoded, {self.prompts_reused} reused.",
        ]
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


def _check_build_args(*, resolution: int, repeats: int, bucket_step: int, extra_prompts: Sequence[str],
                      vae_batch_size: int, text_batch_size: int) -> None:
    if not isinstance(resolution, int) or resolution < bucket_step or resolution % 16:
        raise ValueError(
            f"resolution {resolution!r} must be a multiple of 16 and >= {bucket_step}; FLUX.2 LoRAs train at 512-1024."
        )
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats {repeats!r} must be an integer >= 1 (how often each image appears per epoch).")
    if isinstance(extra_prompts, str) or not all(isinstance(p, str) for p in extra_prompts):
        raise ValueError(
            f"extra_prompts must be a list of strings, got {extra_prompts!r}; wrap one prompt as [prompt]."
        )
    for name, value in (("vae_batch_size", vae_batch_size), ("text_batch_size", text_batch_size)):
        if value < 1:
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
) -> Path:
    """Scan image_dir, fill the latent and caption caches under out_dir, write manifest.json; return its path.

    Only cache misses touch the encoders: the VAE is loaded only if some latent is missing, used, and released
    before the text encoder loads (only if some caption is missing), so the two never share memory. A second
    build with the same inputs loads neither. The text cache always holds "" (caption dropout) and
    extra_prompts (validation), so training never needs the text encoder. report.json records skips,
    warnings, truncated captions, rebuilt cache files and the encode/reuse counters.
    """
    _check_build_args(resolution=resolution, repeats=repeats, bucket_step=bucket_step, extra_prompts=extra_prompts,
                      vae_batch_size=vae_batch_size, text_batch_size=text_batch_size)
    for name, value in (("vae_precision", vae_precision), ("text_precision", text_precision)):
        if value not in model_files.PRECISIONS:
            raise ValueError(
                f"{name} {value!r} is not one of {', '.join(model_files.PRECISIONS)}; fp32 is the safe choice "
                "for the VAE."
            )
    images_path, out_path = Path(image_dir).expanduser().resolve(), Path(out_dir).expanduser().resolve()
    if images_path == out_path:
        raise ValueError(
            f"out_dir {str(out_dir)!r} is the image folder itself; write the dataset to a separate folder "
            "(a subfolder of the image folder works: it is left out of the scan)."
        )
    out = check_writable_dir(Path(out_dir), what="dataset output folder (out_dir)")
    (out / LATENT_DIR).mkdir(exist_ok=True)
    (out / TEXT_DIR).mkdir(exist_ok=True)
    scan = scan_image_folder(
        image_dir, caption_strategy=caption_strategy, instance_prompt=instance_prompt, min_side_px=min_side_px,
        exclude=[out],
    )
    report = BuildReport(image_dir=str(scan.folder), out_dir=str(out), warnings=list(scan.warnings))
    report.skipped = [{"path": str(s.path), "reason": s.reason} for s in scan.skipped]
    ids = encoder_identities(model)

    pending: list[_PendingItem] = []
    for image in scan.images:
        bucket = assign_bucket(image.width, image.height, resolution=resolution, step=bucket_step)
        plan = plan_crop(image.width, image.height, bucket=bucket)
        if plan.scale > 2.0:
            report.warnings.append(
                f"{image.relpath} ({image.width}x{image.height}) is upscaled {plan.scale:.1f}x to "
                f"{bucket[0]}x{bucket[1]}; use larger images or a lower resolution"
            )
        key = latent_key(image_sha256=image.sha256, vae_identity=ids["vae"], precision=vae_precision, plan=plan)
        pending.append(_PendingItem(image=image, plan=plan, latent_key=key))

    failed = _fill_latent_cache(pending, model=model, out=out, precision=vae_precision, device=device,
                                batch_size=vae_batch_size, report=report)
    items = [p for p in pending if p.latent_key not in failed]
    for p in pending:
        if p.latent_key in failed:
            report.skipped.append({"path": str(p.image.path), "reason": failed[p.latent_key]})
    if not items:
        _write_report(report, out)
        raise ValueError(
            f"image folder {scan.folder} has no usable images: every image failed to decode ({report.skipped[:3]})."
        )

    captions = sorted({p.image.caption for p in items} | {""} | set(extra_prompts))
    text_paths = _fill_text_cache(captions, model=model, out=out, text_identity=ids["text"], precision=text_precision,
                                  device=device, batch_size=text_batch_size, report=report)

    source_id = "default"
    manifest_items = []
    for p in items:
        manifest_items.append(
            {
                "image": p.image.relpath,
                "source": source_id,
                "caption": p.image.caption,
                "image_sha256": p.image.sha256,
                "width": p.image.width,
                "height": p.image.height,
                "bucket": list(p.plan.bucket),
                "resized": list(p.plan.resized),
                "crop": list(p.plan.crop),
                "latent": f"{LATENT_DIR}/{p.latent_key}.safetensors",
                "text": text_paths[p.image.caption],
                "repeats": repeats,
            }
        )
        key = f"{p.plan.bucket[0]}x{p.plan.bucket[1]}"
        report.buckets[key] = report.buckets.get(key, 0) + 1
    report.buckets = dict(sorted(report.buckets.items()))
    report.usable_images = len(manifest_items)
    manifest = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "fingerprint": dataset_fingerprint(manifest_items, model_identity=ids["model"]),
        "model_identity": ids["model"],
        "vae_identity": ids["vae"],
        "text_identity": ids["text"],
        "vae_precision": vae_precision,
        "text_precision": text_precision,
        "resolution": resolution,
        "sources": [
            {
                "id": source_id,
                "type": "local",
                "image_dir": str(scan.folder),
                "caption_strategy": caption_strategy,
                "instance_prompt": instance_prompt,
                "resolution": resolution,
                "bucket_step": bucket_step,
                "repeats": repeats,
                "min_side_px": min_side_px,
            }
        ],
        "items": manifest_items,
        "text_cache": {c: text_paths[c] for c in captions},
        "empty_caption": "",
        "extra_prompts": list(dict.fromkeys(extra_prompts)),
    }
    manifest_path = out / MANIFEST_FILE
    atomic_write_bytes(manifest_path, json.dumps(manifest, indent=1, ensure_ascii=False).encode("utf-8"))
    _write_report(report, out)
    log.info("dataset built: %s", report.summary().splitlines()[0])
    return manifest_path


def _write_report(report: BuildReport, out: Path) -> None:
    atomic_write_bytes(out / REPORT_FILE, json.dumps(report.to_dict(), indent=1, ensure_ascii=False).encode("utf-8"))


def dataset_fingerprint(items: Sequence[dict[str, Any]], *, model_identity: str) -> str:
    """The dataset's identity for caching training runs: what the trainer sees, independent of file names.

    sha256 over the sorted (image sha256, caption, bucket, crop, repeats) of every item, the encoders'
    identity (other encoders mean other latents) and the preprocessing version.
    """
    rows = sorted(
        [it["image_sha256"], it["caption"], list(it["bucket"]), list(it["crop"]), int(it["repeats"])] for it in items
    )
    return hash_json({"preprocess": PREPROCESS_VERSION, "model": model_identity, "items": rows})


def _fill_latent_cache(pending: list[_PendingItem], *, model: ModelFolder, out: Path, precision: str, device: str,
                       batch_size: int, report: BuildReport) -> dict[str, str]:
    """Encode every missing latent; return {latent key: reason} for images that failed to decode."""
    misses: dict[str, _PendingItem] = {}
    for p in pending:
        if p.latent_key in misses:
            continue
        path = out / LATENT_DIR / f"{p.latent_key}.safetensors"
        if _cached_entry(path, kind="latent", key=p.latent_key, report=report) is not None:
            report.latents_reused += 1
        else:
            misses[p.latent_key] = p
    failed: dict[str, str] = {}
    if not misses:
        return failed
    by_bucket: dict[tuple[int, int], list[_PendingItem]] = {}
    for p in misses.values():
        by_bucket.setdefault(p.plan.bucket, []).append(p)
    vae = model_files.load_vae(model, precision=precision, device=device)
    report.vae_loaded = True
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
                if not chunk:
                    continue
                with torch.no_grad():
                    latents = flux2.encode_images(vae, torch.stack(pixels)).cpu()
                for p, latent in zip(chunk, latents):
                    write_entry(
                        out / LATENT_DIR / f"{p.latent_key}.safetensors",
                        {LATENT_TENSOR: latent},
                        kind="latent",
                        key=p.latent_key,
                        metadata={"image_sha256": p.image.sha256, "bucket": f"{bucket[0]}x{bucket[1]}"},
                    )
                report.vae_images_encoded += len(chunk)
    finally:
        # Free the VAE before the text encoder loads: on a GPU the two need not fit together.
        del vae
        _free_memory(device)
    return failed


def _fill_text_cache(captions: list[str], *, model: ModelFolder, out: Path, text_identity: str, precision: str,
                     device: str, batch_size: int, report: BuildReport) -> dict[str, str]:
    """Encode every missing caption once; return {caption: cache path relative to out}."""
    paths: dict[str, str] = {}
    misses: list[tuple[str, str]] = []
    for caption in captions:
        key = text_key(caption=caption, text_identity=text_identity, precision=precision)
        paths[caption] = f"{TEXT_DIR}/{key}.safetensors"
        meta = _cached_entry(out / paths[caption], kind="text", key=key, report=report)
        if meta is None:
            misses.append((caption, key))
            continue
        report.prompts_reused += 1
        if meta.get("truncated") == "1":
            report.truncated_captions.append(caption)
    if misses:
        tokenizer = model_files.load_tokenizer(model)
        text_encoder = model_files.load_text_encoder(model, precision=precision, device=device)
        report.text_encoder_loaded = True
        try:
            for start in range(0, len(misses), batch_size):
                chunk = misses[start : start + batch_size]
                prompts = [c for c, _ in chunk]
                _, _, truncated = flux2.tokenize_prompts(tokenizer, prompts)
                embeds = flux2.encode_prompts(text_encoder, tokenizer, prompts, device="cpu")
                for (caption, key), embed, cut in zip(chunk, embeds, truncated):
                    write_entry(out / paths[caption], {TEXT_TENSOR: embed}, kind="text", key=key,
                                metadata={"truncated": "1" if cut else "0"})
                    if cut:
                        report.truncated_captions.append(caption)
                report.prompts_encoded += len(chunk)
        finally:
            del text_encoder
            _free_memory(device)
    for caption in report.truncated_captions:
        report.warnings.append(
            f"caption longer than {flux2.MAX_TEXT_TOKENS} tokens is truncated: {caption[:80]!r}"
            + ("..." if len(caption) > 80 else "")
        )
        log.warning("caption truncated at %d tokens: %.80r", flux2.MAX_TEXT_TOKENS, caption)
    return paths


# ---------------------------------------------------------------------------------------------- manifest


@dataclass(frozen=True, kw_only=True, slots=True)
class DataSource:
    """One image folder and the settings it was built with (several once multidatabackend.json lands)."""

    id: str
    image_dir: Path
    caption_strategy: str
    instance_prompt: str | None
    resolution: int
    bucket_step: int
    repeats: int


@dataclass(frozen=True, kw_only=True, slots=True)
class ManifestItem:
    image: str
    """Path relative to its source's image_dir."""
    source: str
    caption: str
    image_sha256: str
    width: int
    height: int
    bucket: tuple[int, int]
    resized: tuple[int, int]
    crop: tuple[int, int]
    latent: str
    """Latent cache file, relative to the manifest's folder."""
    text: str
    """Caption embedding cache file, relative to the manifest's folder."""
    repeats: int


@dataclass(frozen=True, kw_only=True, slots=True)
class Manifest:
    path: Path
    version: int
    fingerprint: str
    model_identity: str
    vae_identity: str
    text_identity: str
    resolution: int
    sources: dict[str, DataSource]
    items: tuple[ManifestItem, ...]
    text_cache: dict[str, str]
    empty_caption: str
    extra_prompts: tuple[str, ...]

    @property
    def root(self) -> Path:
        return self.path.parent

    def image_path(self, index: int) -> Path:
        item = self.items[index]
        return self.sources[item.source].image_dir / item.image

    def latent_path(self, index: int) -> Path:
        return self.root / self.items[index].latent

    def text_path(self, caption: str) -> Path:
        if caption not in self.text_cache:
            raise ValueError(
                f"caption {caption[:80]!r} is not in the text cache of dataset {self.path}; the cache holds the "
                "dataset's captions, the empty caption and the prompts given with --prompt / extra_prompts when "
                "it was built. Rebuild the dataset with this prompt added."
            )
        return self.root / self.text_cache[caption]

    def buckets(self) -> dict[tuple[int, int], list[int]]:
        """Item indices per bucket, buckets sorted."""
        out: dict[tuple[int, int], list[int]] = {}
        for i, item in enumerate(self.items):
            out.setdefault(item.bucket, []).append(i)
        return dict(sorted(out.items()))


def _manifest_error(path: Path, problem: str) -> ValueError:
    return ValueError(
        f"dataset manifest {path}: {problem}. Rebuild it with `python -m trainer build-dataset` or the "
        "Build Dataset node (unchanged images and captions are reused from the cache)."
    )


def _inside(root: Path, rel: str, *, path: Path, what: str) -> Path:
    target = (root / rel).resolve()
    if not target.is_relative_to(root.resolve()):
        raise _manifest_error(path, f"{what} {rel!r} points outside the dataset folder")
    return target


def load_manifest(path: str | Path) -> Manifest:
    """Read and check a manifest: its format and version, every field, and that every cache file exists."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / MANIFEST_FILE
    if not path.is_file():
        raise ValueError(
            f"dataset manifest {path} does not exist; build the dataset first (build-dataset / Build Dataset)."
        )
    path = path.resolve()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _manifest_error(path, f"not valid JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        raise _manifest_error(path, f"not a {MANIFEST_FORMAT} manifest")
    if data.get("version") != MANIFEST_VERSION:
        raise _manifest_error(
            path, f"version {data.get('version')!r}, this trainer reads version {MANIFEST_VERSION}"
        )
    root = path.parent
    try:
        sources = {
            s["id"]: DataSource(
                id=str(s["id"]),
                image_dir=Path(s["image_dir"]),
                caption_strategy=str(s["caption_strategy"]),
                instance_prompt=s.get("instance_prompt"),
                resolution=int(s["resolution"]),
                bucket_step=int(s["bucket_step"]),
                repeats=int(s["repeats"]),
            )
            for s in data["sources"]
        }
        items = tuple(
            ManifestItem(
                image=str(it["image"]),
                source=str(it["source"]),
                caption=str(it["caption"]),
                image_sha256=str(it["image_sha256"]),
                width=int(it["width"]),
                height=int(it["height"]),
                bucket=(int(it["bucket"][0]), int(it["bucket"][1])),
                resized=(int(it["resized"][0]), int(it["resized"][1])),
                crop=(int(it["crop"][0]), int(it["crop"][1])),
                latent=str(it["latent"]),
                text=str(it["text"]),
                repeats=int(it["repeats"]),
            )
            for it in data["items"]
        )
        text_cache = {str(k): str(v) for k, v in data["text_cache"].items()}
        manifest = Manifest(
            path=path,
            version=int(data["version"]),
            fingerprint=str(data["fingerprint"]),
            model_identity=str(data["model_identity"]),
            vae_identity=str(data["vae_identity"]),
            text_identity=str(data["text_identity"]),
            resolution=int(data["resolution"]),
            sources=sources,
            items=items,
            text_cache=text_cache,
            empty_caption=str(data["empty_caption"]),
            extra_prompts=tuple(str(p) for p in data.get("extra_prompts", [])),
        )
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
        raise _manifest_error(path, f"malformed ({type(exc).__name__}: {exc})") from None
    if not items:
        raise _manifest_error(path, "it lists no items")
    missing: list[str] = []
    for i, item in enumerate(items):
        if item.source not in sources:
            raise _manifest_error(path, f"item {i} ({item.image}) names unknown source {item.source!r}")
        if item.repeats < 1 or item.bucket[0] % 16 or item.bucket[1] % 16:
            raise _manifest_error(path, f"item {i} ({item.image}) has repeats {item.repeats} / bucket {item.bucket}")
        if text_cache.get(item.caption) != item.text:
            raise _manifest_error(path, f"item {i} ({item.image}): its caption is not in text_cache")
    for rel in [it.latent for it in items] + list(text_cache.values()):
        if not _inside(root, rel, path=path, what="cache file").is_file():
            missing.append(rel)
    if manifest.empty_caption not in text_cache:
        raise _manifest_error(path, "the empty caption (for caption dropout) is not in text_cache")
    if missing:
        raise _manifest_error(
            path, f"{len(missing)} cache files are missing (first: {', '.join(sorted(set(missing))[:3])})"
        )
    return manifest


# ---------------------------------------------------------------------------------------------- sampling


@dataclass(frozen=True, kw_only=True, slots=True)
class BatchRef:
    indices: tuple[int, ...]
    """Manifest item indices, all from one bucket."""
    bucket: tuple[int, int]
    epoch: int
    position: int
    """This rank's batch index within the epoch (0-based)."""


def _derived_seed(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "little")


class BucketBatchSampler:
    """Deterministic, resumable, rank-sharded single-bucket batches of manifest item indices.

    Each epoch, for every rank alike: items expanded by their repeats, shuffled by (seed, epoch), split per
    bucket into *global* batches of batch_size x world_size items, the list of global batches shuffled by
    (seed, epoch); at each step rank r takes slice [r * batch_size, (r + 1) * batch_size) of the global batch.
    So all ranks step together on one bucket, and a run on 1 process with batch 2 sees exactly the samples a
    run on 2 processes with batch 1 sees (the trainer's noise is keyed by the sample's place in the global
    batch, so their losses agree too).

    A bucket's last global batch may be short. With drop_last=False (default) it is kept: on one process as a
    smaller batch (no image is left out, none repeated); on several processes it is filled up with the first
    items of the same bucket, as torch's DistributedSampler pads, so every rank gets batch_size items. With
    drop_last=True it is dropped. With repeats > 1 two copies of one image can share a batch.

    state_dict() is (epoch, position): position counts the global batches handed out in that epoch. Use one
    iter_batches() iterator at a time; it advances the state as it yields.
    """

    STATE_VERSION = 2

    def __init__(self, manifest: Manifest, *, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 drop_last: bool = False) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} / world_size {world_size}: need world_size >= 1 and 0 <= rank < world_size.")
        self.manifest = manifest
        self.batch_size = batch_size
        self.seed = int(seed)
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last
        self.epoch = 0
        self.position = 0
        self._plan_cache: tuple[int, list[tuple[int, ...]]] | None = None
        counts: dict[tuple[int, int], int] = {}
        for item in manifest.items:
            counts[item.bucket] = counts.get(item.bucket, 0) + item.repeats
        size = self.global_batch_size
        per_bucket = [n // size if drop_last else -(-n // size) for n in counts.values()]
        self.batches_per_epoch = sum(per_bucket)
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"dataset {manifest.path} gives no full batch per epoch (batch_size {batch_size} x {world_size} "
                f"processes, {sum(counts.values())} item copies in {len(counts)} buckets, drop_last=True); lower "
                "batch_size, raise repeats, add images or set drop_last off."
            )

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    def __len__(self) -> int:
        """Steps per epoch (the same for every rank)."""
        return self.batches_per_epoch

    def epoch_plan(self, epoch: int) -> list[tuple[int, ...]]:
        """The global batches of an epoch, in order (length batches_per_epoch)."""
        order = [i for i, item in enumerate(self.manifest.items) for _ in range(item.repeats)]
        random.Random(_derived_seed(self.seed, epoch, "items")).shuffle(order)
        by_bucket: dict[tuple[int, int], list[int]] = {}
        for i in order:
            by_bucket.setdefault(self.manifest.items[i].bucket, []).append(i)
        size = self.global_batch_size
        batches = []
        for indices in by_bucket.values():
            for start in range(0, len(indices), size):
                batch = indices[start : start + size]
                if len(batch) < size:
                    if self.drop_last:
                        continue
                    if self.world_size > 1:  # pad like DistributedSampler so every rank gets a full batch
                        batch = batch + [indices[k % len(indices)] for k in range(size - len(batch))]
                batches.append(tuple(batch))
        random.Random(_derived_seed(self.seed, epoch, "batches")).shuffle(batches)
        return batches

    def rank_batches(self, epoch: int) -> list[tuple[int, ...]]:
        """This rank's batches of an epoch, in order (length len(self))."""
        if self._plan_cache is None or self._plan_cache[0] != epoch:
            lo = self.rank * self.batch_size
            self._plan_cache = (epoch, [b[lo : lo + self.batch_size] for b in self.epoch_plan(epoch)])
        return self._plan_cache[1]

    def iter_batches(self) -> Iterator[BatchRef]:
        """Batches forever, from the current state on; the state advances as each batch is handed out."""
        while True:
            batches = self.rank_batches(self.epoch)
            if self.position >= len(batches):
                self.epoch += 1
                self.position = 0
                continue
            indices = batches[self.position]
            ref = BatchRef(indices=indices, bucket=self.manifest.items[indices[0]].bucket, epoch=self.epoch,
                           position=self.position)
            self.position += 1
            yield ref

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable position, plus what must match on resume."""
        return {
            "version": self.STATE_VERSION,
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "drop_last": self.drop_last,
            "fingerprint": self.manifest.fingerprint,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where state_dict() was taken. The dataset, seed, batch size, world size and drop_last must
        match: each of them changes the batch plan, so resuming across a change would repeat or skip data."""
        if state.get("version") != self.STATE_VERSION:
            raise ValueError(f"sampler state version {state.get('version')!r} is not {self.STATE_VERSION}.")
        mine = self.state_dict()
        for key in ("fingerprint", "seed", "batch_size", "world_size", "drop_last"):
            if state.get(key) != mine[key]:
                raise ValueError(
                    f"cannot resume: the checkpoint's data {key} is {state.get(key)!r} but this run has {mine[key]!r}; "
                    f"resume with the same {key} (or start a new run)."
                )
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or position < 0:
            raise ValueError(f"sampler state epoch {epoch} / position {position} must be >= 0.")
        self.epoch, self.position = epoch, position


# ---------------------------------------------------------------------------------------------- loading


@dataclass(frozen=True, kw_only=True, slots=True)
class Batch:
    latents: torch.Tensor
    """(B, 128, bucket_h / 16, bucket_w / 16) normalised, patchified VAE latents."""
    prompt_embeds: torch.Tensor
    """(B, 512, 3 * text hidden size) caption embeddings."""
    captions: list[str]
    image_paths: list[Path]
    indices: tuple[int, ...]
    bucket: tuple[int, int]


def _read_cached(manifest: Manifest, path: Path, *, kind: str, name: str, verify: bool) -> torch.Tensor:
    try:
        tensors, _ = read_entry(path, kind=kind, key=path.stem, verify_digest=verify)
    except CacheEntryError as exc:
        raise ValueError(
            f"dataset {manifest.path}: {exc}. Rebuild the dataset (build-dataset / Build Dataset): damaged cache "
            "files are detected and re-encoded, the rest is reused."
        ) from None
    if name not in tensors:
        raise ValueError(f"dataset {manifest.path}: cache file {path} has no {name!r} tensor; rebuild the dataset.")
    return tensors[name]


def load_batch(
    manifest: Manifest,
    indices: Sequence[int],
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    verify: bool = False,
) -> Batch:
    """Latents and caption embeddings of items that share one bucket, stacked in the order given.

    verify=True also re-hashes every byte (the structural checks always run; build-dataset verifies fully).
    """
    if not indices:
        raise ValueError("load_batch needs at least one item index.")
    items = [manifest.items[i] for i in indices]
    buckets = {it.bucket for it in items}
    if len(buckets) != 1:
        raise ValueError(f"items {list(indices)} span buckets {sorted(buckets)}; a batch must hold one bucket.")
    bucket = items[0].bucket
    expected = (flux2.PATCHIFIED_CHANNELS, bucket[1] // flux2.PIXELS_PER_TOKEN, bucket[0] // flux2.PIXELS_PER_TOKEN)
    latents = []
    for i, item in zip(indices, items):
        latent = _read_cached(manifest, manifest.latent_path(i), kind="latent", name=LATENT_TENSOR, verify=verify)
        if tuple(latent.shape) != expected:
            raise ValueError(
                f"dataset {manifest.path}: latent {item.latent} has shape {tuple(latent.shape)}, bucket "
                f"{bucket[0]}x{bucket[1]} needs {expected}; rebuild the dataset."
            )
        latents.append(latent)
    texts: dict[str, torch.Tensor] = {}
    for item in items:
        if item.caption not in texts:
            texts[item.caption] = _read_cached(
                manifest, manifest.root / item.text, kind="text", name=TEXT_TENSOR, verify=verify
            )
    return Batch(
        latents=torch.stack(latents).to(device=device, dtype=dtype),
        prompt_embeds=torch.stack([texts[it.caption] for it in items]).to(device=device, dtype=dtype),
        captions=[it.caption for it in items],
        image_paths=[manifest.image_path(i) for i in indices],
        indices=tuple(indices),
        bucket=bucket,
    )


def load_text_embedding(
    manifest: Manifest, caption: str, *, dtype: torch.dtype | None = None, device: torch.device | str | None = None,
    verify: bool = True,
) -> torch.Tensor:
    """(1, 512, F) embedding of a cached caption: the empty caption or a validation prompt given at build time."""
    embed = _read_cached(manifest, manifest.text_path(caption), kind="text", name=TEXT_TENSOR, verify=verify)
    return embed.unsqueeze(0).to(device=device, dtype=dtype or embed.dtype)
