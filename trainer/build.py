"""Building a dataset: scan folders, cache VAE latents and caption embeddings, write the manifest and report.

Build (once per content, on the machine with the encoders):
  every dataset of a BackendConfig (databackend.py; one folder given directly is a BackendConfig of one)
  -> scan_image_folder (scan.py) -> per image: size limits, bucket + crop (buckets.py), its references
  -> VAE latents cached by image content (cache_fill.py) -> caption embeddings cached by caption text (plus ""
  for caption dropout and the validation prompts) -> out_dir/manifest.json + out_dir/report.json.
Train (any number of processes, no encoder needed): manifest.load_manifest -> sampler.BucketBatchSampler ->
manifest.load_batch; merge.resolve_training_manifest gives a run its manifest (building or merging it first).

The manifest lists data *sources* (image folders with their own settings, SimpleTuner's
multidatabackend.json) and items that name their source. Cache paths in the manifest are relative to the
manifest's folder, so the dataset folder can be copied to another machine as a whole; image paths are
relative to their source's image_dir (stored absolute).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import model_files
from .buckets import CropPlan
from .build_report import BuildReport, dataset_entry, write_build_report
from .cache import atomic_write_bytes, check_writable_dir, hash_json
from .cache_fill import (
    PREPROCESS_VERSION,
    PendingLatent,
    encoder_identities,
    fill_latent_cache,
    fill_text_cache,
    latent_key,
)
from .captions import CaptionStrategy
from .config import OffloadConfig, QuantizationConfig
from .databackend import BackendConfig, ImageDatasetSpec, single_folder_config
from .manifest import MANIFEST_FILE, MANIFEST_FORMAT, MANIFEST_VERSION
from .model_files import ModelFolder
from .scan import (
    IMAGE_EXTENSIONS,
    BuildProgress,
    ScannedImage,
    ScanResult,
    scan_image_folder,
)

log = logging.getLogger(__name__)

LATENT_DIR = "latents"
TEXT_DIR = "text"

Row = tuple[PendingLatent, list[PendingLatent]]
"""One training item while building: the target image's latent and its references' latents."""
Planned = list[tuple[ImageDatasetSpec, list[Row]]]
"""Each image dataset with its rows, in the config's order."""


@dataclass(kw_only=True, slots=True)
class _Build:
    """What every step of one build shares."""

    config: BackendConfig
    out: Path
    report: BuildReport
    identities: dict[str, str]
    """encoder_identities of the model: 'vae', 'text', 'model'."""
    latent_dirs: dict[str, Path]
    """Latent cache folder per dataset id (image and conditioning datasets)."""
    text_dirs: dict[str, Path]
    """Embedding cache folder per text_embeds id."""
    vae_precision: str
    bucket_step: int
    min_side_px: int
    progress: BuildProgress | None

    def stored(self, path: Path) -> str:
        """A cache path as the manifest stores it: relative to the dataset folder when inside it."""
        return path.relative_to(self.out).as_posix() if path.is_relative_to(self.out) else str(path)


def build_dataset(
    *,
    image_dir: str | Path,
    model: ModelFolder,
    out_dir: str | Path,
    resolution: int = 512,
    repeats: int = 1,
    caption_strategy: CaptionStrategy = "textfile",
    instance_prompt: str | None = None,
    disable_multiline_split: bool = False,
    text_batch_size: int = 4,
    **build_options: Any,
) -> Path:
    """Scan one image folder, fill the latent and caption caches under out_dir, write manifest.json; return its path.

    build_datasets (which takes build_options: precisions, device, extra_prompts, batch sizes, encoder
    settings, progress) over databackend.single_folder_config: repeats counts appearances per epoch (1 = once);
    latents go to out_dir/latents, embeddings to out_dir/text, center crops to the nearest bucket of about
    resolution^2 pixels. Each non-empty line of a textfile caption is a caption of its own unless
    disable_multiline_split is set.
    """
    config = single_folder_config(image_dir, resolution=resolution, repeats=repeats, caption_strategy=caption_strategy,
                                  instance_prompt=instance_prompt, disable_multiline_split=disable_multiline_split,
                                  text_batch_size=text_batch_size)
    return build_datasets(config, model=model, out_dir=out_dir, **build_options)


def build_datasets(
    config: BackendConfig,
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
    quantization: QuantizationConfig | None = None,
    offload: OffloadConfig | None = None,
    progress: BuildProgress | None = None,
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
    _check_build_inputs(config, out_dir=Path(out_dir), vae_precision=vae_precision, text_precision=text_precision,
                        device=device, extra_prompts=extra_prompts, vae_batch_size=vae_batch_size,
                        quantization=quantization, offload=offload)
    out = check_writable_dir(Path(out_dir), what="dataset output folder (out_dir)")
    used_cond = _used_conditioning(config)
    build = _Build(config=config, out=out, report=_new_report(config, out), identities=encoder_identities(model),
                   latent_dirs=_latent_dirs([*config.datasets, *used_cond], out=out),
                   text_dirs=_text_dirs(config, out=out), vae_precision=vae_precision, bucket_step=bucket_step,
                   min_side_px=min_side_px, progress=progress)
    references = _scan_references(build, used_cond)
    planned: Planned = [(spec, _plan_dataset(build, spec, references)) for spec in config.datasets]
    encoded, failed = fill_latent_cache(
        [p for _, rows in planned for target, refs in rows for p in [target, *refs]], model=model,
        precision=vae_precision, device=device, batch_size=vae_batch_size, report=build.report, offload=offload,
        progress=progress,
    )
    usable: Planned = [(spec, _drop_failed(build, spec, rows, failed)) for spec, rows in planned]
    default_text = config.default_text_embeds()
    text_paths = fill_text_cache(
        _text_jobs(config, usable, extra_prompts=extra_prompts, text_dirs=build.text_dirs), text_dirs=build.text_dirs,
        batch_sizes={t.id: t.encoder_batch_size for t in (config.text_embeds or (default_text,))},
        write_batch_sizes={t.id: t.write_batch_size for t in (config.text_embeds or (default_text,))}, model=model,
        text_identity=build.identities["text"], precision=text_precision, device=device, report=build.report,
        quantization=quantization, offload=offload, progress=progress,
    )
    items = [_manifest_item(build, spec, target, refs, texts=text_paths[config.text_spec_for(spec).id])
             for spec, rows in usable for target, refs in rows]
    _count_usage(build.report, usable, encoded=encoded)
    _count_totals(build.report, text_paths=text_paths, usable_images=len(items))
    sources = [_source_record(s) for s in [*config.datasets, *used_cond]]
    manifest = _manifest_record(build, items, sources=sources, default_texts=text_paths[default_text.id],
                                text_precision=text_precision, extra_prompts=extra_prompts)
    manifest_path = out / MANIFEST_FILE
    atomic_write_bytes(manifest_path, json.dumps(manifest, indent=1, ensure_ascii=False).encode("utf-8"))
    write_build_report(build.report, out)
    log.info("dataset built: %s", build.report.summary().splitlines()[0])
    return manifest_path


# ---------------------------------------------------------------------------------------------- set-up


def _check_build_inputs(config: BackendConfig, *, out_dir: Path, vae_precision: str, text_precision: str,
                        device: str, extra_prompts: Sequence[str], vae_batch_size: int,
                        quantization: QuantizationConfig | None, offload: OffloadConfig | None) -> None:
    if isinstance(extra_prompts, str) or not all(isinstance(p, str) for p in extra_prompts):
        raise ValueError(
            f"extra_prompts must be a list of strings, got {extra_prompts!r}; wrap one prompt as [prompt]."
        )
    if vae_batch_size < 1:
        raise ValueError(f"vae_batch_size must be >= 1, got {vae_batch_size}.")
    if quantization is not None or offload is not None:  # quantized / group-offloaded encoders
        from .offload import check_encoders

        check_encoders(quantization=quantization or QuantizationConfig(), offload=offload or OffloadConfig(),
                       device=device)
    for name, value in (("vae_precision", vae_precision), ("text_precision", text_precision)):
        if value not in model_files.PRECISIONS:
            raise ValueError(
                f"{name} {value!r} is not one of {', '.join(model_files.PRECISIONS)}; fp32 is the safe choice "
                "for the VAE."
            )
    out = out_dir.expanduser().resolve()
    if any(spec.instance_data_dir.expanduser().resolve() == out for spec in config.datasets):
        raise ValueError(
            f"out_dir {str(out_dir)!r} is the image folder itself; write the dataset to a separate folder "
            "(a subfolder of the image folder works: it is left out of the scan)."
        )
    for spec in config.datasets:
        if not (math.isfinite(spec.probability) and spec.probability >= 0):
            raise ValueError(f"dataset {spec.id!r}: probability is {spec.probability!r}; give a finite weight >= 0 "
                             "(1 is the default, 0 leaves the dataset out of training).")
    if all(spec.probability == 0 for spec in config.datasets):
        raise ValueError(f"every image dataset has probability 0 ({', '.join(s.id for s in config.datasets)}), so "
                         "nothing would be trained on; give at least one a probability above 0 (the default is 1).")


def _used_conditioning(config: BackendConfig) -> list[ImageDatasetSpec]:
    """The conditioning datasets some image dataset names, each once, in the order they are first named."""
    return [config.conditioning[c] for c in dict.fromkeys(c for d in config.datasets for c in d.conditioning_data)]


def _latent_dirs(specs: Sequence[ImageDatasetSpec], *, out: Path) -> dict[str, Path]:
    return {spec.id: _cache_dir(out / LATENT_DIR, configured=spec.cache_dir_vae,
                                what=f"dataset {spec.id!r} cache_dir_vae") for spec in specs}


def _text_dirs(config: BackendConfig, *, out: Path) -> dict[str, Path]:
    return {t.id: _cache_dir(out / TEXT_DIR, configured=t.cache_dir, what=f"text_embeds dataset {t.id!r} cache_dir")
            for t in config.text_embeds or (config.default_text_embeds(),)}


def _cache_dir(default: Path, *, configured: Path | None, what: str) -> Path:
    """A dataset's cache folder: the build's own (created), or the one its config names (checked writable)."""
    if configured is None:
        default.mkdir(exist_ok=True)
        return default
    return check_writable_dir(configured, what=what)


def _new_report(config: BackendConfig, out: Path) -> BuildReport:
    first_folder = config.datasets[0].instance_data_dir.expanduser().resolve()
    report = BuildReport(image_dir=str(first_folder), out_dir=str(out), warnings=list(config.warnings),
                         disabled_datasets=list(config.disabled))
    report.warnings += [f"dataset {s.id!r} has probability 0: it is built but never sampled (left out of training)"
                        for s in config.datasets if s.probability == 0]
    return report


# ---------------------------------------------------------------------------------------------- planning


def _scan(build: _Build, spec: ImageDatasetSpec) -> ScanResult:
    """Scan one dataset's folder and record what it found and skipped in the report."""
    conditioning = spec.dataset_type == "conditioning"
    try:
        result = scan_image_folder(
            spec.instance_data_dir, caption_strategy="filename" if conditioning else spec.caption_strategy,
            instance_prompt=None if conditioning else spec.instance_prompt, min_side_px=build.min_side_px,
            exclude=[build.out, *build.latent_dirs.values(), *build.text_dirs.values()],
            disable_multiline_split=spec.disable_multiline_split, progress=build.progress,
        )
    except ValueError as exc:
        if build.config.from_folder:
            raise
        raise ValueError(f"dataset {spec.id!r} (instance_data_dir): {exc}") from None
    report = build.report
    entry = report.datasets.setdefault(spec.id, dataset_entry(spec.dataset_type, result.folder, spec.copies,
                                                              probability=spec.probability))
    entry["found"] = len(result.images) + sum(1 for s in result.skipped if s.path.suffix.lower() in IMAGE_EXTENSIONS)
    for s in result.skipped:
        entry["skipped"].append({"path": str(s.path), "reason": s.reason})
    report.warnings.extend(w if build.config.from_folder else f"{spec.id}: {w}" for w in result.warnings)
    return result


def _skip(build: _Build, spec: ImageDatasetSpec, path: Path, reason: str) -> None:
    build.report.datasets[spec.id]["skipped"].append({"path": str(path), "reason": reason})


def _keep(build: _Build, spec: ImageDatasetSpec, image: ScannedImage) -> bool:
    """Whether the image is inside the dataset's size and aspect limits (if not, it is recorded as skipped)."""
    reason = size_limit_reason(image, spec)
    if reason is not None:
        _skip(build, spec, image.path, reason)
    return reason is None


def _pending(build: _Build, spec: ImageDatasetSpec, image: ScannedImage, plan: CropPlan) -> PendingLatent:
    if plan.scale > 2.0:
        build.report.warnings.append(
            f"{image.relpath} ({image.width}x{image.height}) is upscaled {plan.scale:.1f}x to "
            f"{plan.bucket[0]}x{plan.bucket[1]}; use larger images or a lower resolution"
        )
    key = latent_key(image_sha256=image.sha256, vae_identity=build.identities["vae"],
                     precision=build.vae_precision, plan=plan)
    return PendingLatent(image=image, plan=plan, latent_key=key, latent_dir=build.latent_dirs[spec.id],
                         dataset=spec.id)


def size_limit_reason(image: ScannedImage, spec: ImageDatasetSpec) -> str | None:
    """Why an image is outside the dataset's size or aspect limits, or None. As in SimpleTuner, no image is
    skipped for being large: maximum_image_size only switches on target_downsample_size (plan_for)."""
    from .buckets import image_size_measure

    unit = {"pixel_area": "sqrt(w*h) px", "area": "megapixels", "pixel": "px shorter side"}[spec.resolution_type]
    size = image_size_measure(image.width, image.height, resolution_type=spec.resolution_type)
    if spec.minimum_image_size is not None and size < spec.minimum_image_size:
        return (f"too small: {image.width}x{image.height} is {size:.4g} {unit}, under minimum_image_size "
                f"{spec.minimum_image_size:g}")
    aspect = image.width / image.height
    if spec.minimum_aspect_ratio is not None and aspect < spec.minimum_aspect_ratio:
        return f"aspect {aspect:.3g} ({image.width}x{image.height}) is under minimum_aspect_ratio {spec.minimum_aspect_ratio:g}"
    if spec.maximum_aspect_ratio is not None and aspect > spec.maximum_aspect_ratio:
        return f"aspect {aspect:.3g} ({image.width}x{image.height}) is above maximum_aspect_ratio {spec.maximum_aspect_ratio:g}"
    return None


def plan_for(image: ScannedImage, spec: ImageDatasetSpec, *, step: int) -> CropPlan:
    """The image's bucket, resize and crop under its dataset's settings."""
    from .buckets import choose_bucket, downsample_scale, plan_crop_styled

    # crop_aspect random draws from the dataset id and the image's content: a rebuild gets the same aspect,
    # hence the same latent cache key; the same file in two datasets may get different aspects.
    bucket = choose_bucket(image.width, image.height, resolution=spec.resolution,
                           resolution_type=spec.resolution_type, crop=spec.crop, crop_aspect=spec.crop_aspect,
                           crop_aspect_buckets=spec.crop_aspect_buckets, random_key=f"{spec.id}/{image.sha256}",
                           step=step)
    style = spec.crop_style if spec.crop else "center"
    min_scale = 0.0
    if spec.crop and spec.maximum_image_size is not None and spec.target_downsample_size is not None:
        # SimpleTuner's downsample before the crop: the bucket is cut from the image at that size
        min_scale = downsample_scale(image.width, image.height, size=spec.target_downsample_size,
                                     resolution_type=spec.resolution_type)
    return plan_crop_styled(image.width, image.height, bucket=bucket, crop_style=style, random_key=image.sha256,
                            min_scale=min_scale)


def _stem_key(relpath: str) -> str:
    """The name references are matched by: the relative path without its extension."""
    return relpath.rsplit(".", 1)[0] if "." in relpath.rsplit("/", 1)[-1] else relpath


@dataclass(kw_only=True, slots=True)
class _References:
    """The usable images of every conditioning dataset in use, and why the others were skipped, by stem."""

    images: dict[str, dict[str, ScannedImage]]
    skipped: dict[str, dict[str, str]]


def _scan_references(build: _Build, used_cond: Sequence[ImageDatasetSpec]) -> _References:
    refs = _References(images={}, skipped={})
    for c in used_cond:
        result = _scan(build, c)
        refs.images[c.id] = {_stem_key(im.relpath): im for im in result.images if _keep(build, c, im)}
        refs.skipped[c.id] = {_stem_key(s.path.relative_to(result.folder).as_posix()): s.reason
                              for s in result.skipped}
        refs.skipped[c.id].update({_stem_key(s["path"][len(str(result.folder)) + 1:]): s["reason"]
                                   for s in build.report.datasets[c.id]["skipped"]})
    return refs


def _plan_dataset(build: _Build, spec: ImageDatasetSpec, references: _References) -> list[Row]:
    """Scan one image dataset and plan each usable image with its references; skips are recorded."""
    rows: list[Row] = []
    missing: dict[str, list[str]] = {}
    for image in _scan(build, spec).images:
        if not _keep(build, spec, image):
            continue
        plan = plan_for(image, spec, step=build.bucket_step)
        refs, reason = _plan_references(build, spec, image, plan, references, missing=missing)
        if reason is not None:
            _skip(build, spec, image.path, reason)
            continue
        rows.append((_pending(build, spec, image, plan), refs))
    if missing:
        _raise_missing_strict_references(build.config, spec, missing)
    return rows


def _plan_references(build: _Build, spec: ImageDatasetSpec, image: ScannedImage, plan: CropPlan,
                     references: _References, *,
                     missing: dict[str, list[str]]) -> tuple[list[PendingLatent], str | None]:
    """(the image's reference latents, None), or ([], why it is skipped); a missing reference_strict file goes
    to missing (an error once the dataset is scanned)."""
    from .buckets import plan_matching_crop

    refs: list[PendingLatent] = []
    stem = _stem_key(image.relpath)
    for cid in spec.conditioning_data:
        cspec = build.config.conditioning[cid]
        strict = cspec.conditioning_type == "reference_strict"
        ref = references.images[cid].get(stem)
        if ref is None:
            why = references.skipped[cid].get(stem)
            if why is None and strict:
                missing.setdefault(cid, []).append(image.relpath)
            return [], (f"unmatched reference: conditioning dataset {cid!r} has no usable "
                        f"{stem}.* ({why or 'no such file'})")
        if strict and abs(math.log((ref.width / ref.height) / (image.width / image.height))) > 0.02:
            return [], (f"reference {cid}/{ref.relpath} is {ref.width}x{ref.height} but "
                        f"reference_strict needs the edit image's aspect ({image.width}x{image.height})")
        ref_plan = plan_matching_crop(ref.width, ref.height, like=plan) if strict else plan_for(
            ref, cspec, step=build.bucket_step)
        refs.append(_pending(build, cspec, ref, ref_plan))
    return refs, None


def _raise_missing_strict_references(config: BackendConfig, spec: ImageDatasetSpec,
                                     missing: dict[str, list[str]]) -> None:
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


def _drop_failed(build: _Build, spec: ImageDatasetSpec, rows: list[Row], failed: dict[str, str]) -> list[Row]:
    """The rows whose target and references all encoded; ValueError when none of the dataset's did."""
    kept = []
    for target, refs in rows:
        bad = next((p for p in [target, *refs] if p.latent_key in failed), None)
        if bad is None:
            kept.append((target, refs))
            continue
        what = "" if bad is target else f"reference {bad.image.path}: "
        _skip(build, spec, target.image.path, what + failed[bad.latent_key])
    if not kept:
        write_build_report(build.report, build.out)
        skipped = build.report.datasets[spec.id]["skipped"]
        raise ValueError(
            f"dataset {spec.id!r} ({spec.instance_data_dir}) has no usable images "
            f"({len(skipped)} skipped: {'; '.join(Path(s['path']).name + ': ' + s['reason'] for s in skipped[:5])})."
        )
    return kept


def _text_jobs(config: BackendConfig, usable: Planned, *, extra_prompts: Sequence[str],
               text_dirs: dict[str, Path]) -> dict[str, list[str]]:
    """The distinct captions per text cache, sorted; "" and the validation prompts go to the default one."""
    jobs: dict[str, list[str]] = {t: [] for t in text_dirs}
    for spec, rows in usable:
        jobs[config.text_spec_for(spec).id].extend(c for t, _ in rows for c in t.image.captions)
    jobs[config.default_text_embeds().id].extend(["", *extra_prompts])
    return {t: sorted(set(c)) for t, c in jobs.items() if c}


# ---------------------------------------------------------------------------------------- manifest, report


def _manifest_item(build: _Build, spec: ImageDatasetSpec, target: PendingLatent, refs: list[PendingLatent], *,
                   texts: dict[str, Path]) -> dict[str, Any]:
    image = target.image
    # caption/text hold the first caption; captions/texts (all of them) only when there are several.
    several = {"captions": list(image.captions),
               "texts": [build.stored(texts[c]) for c in image.captions]} if len(image.captions) > 1 else {}
    return {
        "image": image.relpath,
        "source": spec.id,
        "caption": image.caption,
        "image_sha256": image.sha256,
        "width": image.width,
        "height": image.height,
        "bucket": list(target.plan.bucket),
        "resized": list(target.plan.resized),
        "crop": list(target.plan.crop),
        "latent": build.stored(target.latent_path),
        "text": build.stored(texts[image.caption]),
        "repeats": spec.copies,
        "references": [
            {"source": r.dataset, "image": r.image.relpath, "image_sha256": r.image.sha256,
             "width": r.image.width, "height": r.image.height, "bucket": list(r.plan.bucket),
             "resized": list(r.plan.resized), "crop": list(r.plan.crop), "latent": build.stored(r.latent_path)}
            for r in refs
        ],
    } | several


def _count_usage(report: BuildReport, usable: Planned, *, encoded: set[str]) -> None:
    """Per dataset: latents encoded or reused, images used, buckets, caption statistics, latent bytes."""
    latent_sizes: dict[str, list[int]] = {}
    for spec, rows in usable:
        for target, refs in rows:
            for p in [target, *refs]:
                entry = report.datasets[p.dataset]
                entry["latents_encoded" if p.latent_key in encoded else "latents_reused"] += 1
                latent_sizes.setdefault(p.dataset, []).append(p.latent_path.stat().st_size)
                entry["used"] += 1
                key = f"{p.plan.bucket[0]}x{p.plan.bucket[1]}"
                entry["buckets"][key] = entry["buckets"].get(key, 0) + 1
            key = f"{target.plan.bucket[0]}x{target.plan.bucket[1]}"
            report.buckets[key] = report.buckets.get(key, 0) + 1
        _count_captions(report, report.datasets[spec.id], rows)
    for ds, sizes in latent_sizes.items():
        report.datasets[ds]["latent_bytes_per_image"] = sum(sizes) / len(sizes)
        report.datasets[ds]["buckets"] = dict(sorted(report.datasets[ds]["buckets"].items()))
    all_sizes = [s for sizes in latent_sizes.values() for s in sizes]
    report.latent_bytes_per_image = sum(all_sizes) / len(all_sizes)


def _count_captions(report: BuildReport, entry: dict[str, Any], rows: list[Row]) -> None:
    words = [len(c.split()) for t, _ in rows for c in t.image.captions]  # every caption, not just the first
    entry["caption_words"] = {"min": min(words), "mean": round(sum(words) / len(words), 2), "max": max(words),
                              "empty": sum(1 for w in words if w == 0)}
    entry["captions"] = len(words)
    entry["images_with_several_captions"] = sum(1 for t, _ in rows if len(t.image.captions) > 1)
    report.captions += entry["captions"]
    report.multi_caption_images += entry["images_with_several_captions"]


def _count_totals(report: BuildReport, *, text_paths: dict[str, dict[str, Path]], usable_images: int) -> None:
    text_files = {p for paths in text_paths.values() for p in paths.values()}
    report.text_bytes_per_caption = sum(p.stat().st_size for p in text_files) / max(1, len(text_files))
    report.buckets = dict(sorted(report.buckets.items()))
    report.usable_images = usable_images
    for info in report.datasets.values():
        report.skipped.extend(info["skipped"])


def _manifest_record(build: _Build, items: list[dict[str, Any]], *, sources: list[dict[str, Any]],
                     default_texts: dict[str, Path], text_precision: str,
                     extra_prompts: Sequence[str]) -> dict[str, Any]:
    text_cache: dict[str, str] = {c: build.stored(p) for c, p in default_texts.items()}
    for item in items:
        for caption, text in zip(item.get("captions", [item["caption"]]), item.get("texts", [item["text"]])):
            text_cache.setdefault(caption, text)
    first = build.config.datasets[0]
    ids = build.identities
    return {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "fingerprint": dataset_fingerprint(items, model_identity=ids["model"],
                                           probabilities={s["id"]: s["probability"] for s in sources}),
        "model_identity": ids["model"],
        "vae_identity": ids["vae"],
        "text_identity": ids["text"],
        "vae_precision": build.vae_precision,
        "text_precision": text_precision,
        "resolution": int(first.resolution) if first.resolution_type != "area" else int(
            round(math.sqrt(first.resolution * 1_000_000))),
        "sources": sources,
        "items": items,
        "text_cache": dict(sorted(text_cache.items())),
        "empty_caption": "",
        "extra_prompts": list(dict.fromkeys(extra_prompts)),
        "backend_config": str(build.config.path) if build.config.path else None,
    }


def _source_record(spec: ImageDatasetSpec) -> dict[str, Any]:
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
