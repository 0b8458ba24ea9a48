"""Several built datasets as one, and the manifest a training run uses.

merge_manifests joins built datasets without copying their caches (each keeps its own buckets and repeats);
resolve_training_manifest gives a run its manifest: a built one, several merged, or a data_backend_config
built into the run folder first; the run folder gets a copy of the build report's summary.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .build import build_datasets
from .build_report import (
    REPORT_FILE,
    BuildReport,
    load_build_report,
    write_build_report,
)
from .cache import atomic_write_bytes, hash_json
from .config import OffloadConfig, QuantizationConfig
from .manifest import (
    MANIFEST_FILE,
    MANIFEST_FORMAT,
    MANIFEST_VERSION,
    Manifest,
    cache_file_path,
    load_manifest,
)
from .model_files import ModelFolder

RUN_DATASET_DIR = "dataset"
"""Subfolder of a run's output_dir where a data_backend_config is built (manifest and report)."""
RUN_SUMMARY_FILE = "dataset_summary.txt"
RUN_REPORT_FILE = "dataset_report.json"
_REPORT_COUNTERS = ("vae_images_encoded", "latents_reused", "prompts_encoded", "prompts_reused")


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
    for n, m in enumerate(manifests, start=1):
        data = json.loads(m.path.read_text(encoding="utf-8"))
        renamed = _rename_sources(data["sources"], n=n, manifest=m, taken=taken)
        sources += [record | {"id": renamed[record["id"]],
                              "conditioning_data": [renamed[c] for c in record.get("conditioning_data", ())],
                              "probability": m.sources[record["id"]].probability}
                    for record in data["sources"]]
        items += [_absolute_item(m, i, record, renamed=renamed) for i, record in enumerate(data["items"])]
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
    write_build_report(_merged_report(manifests, out_dir=out_dir, renamed_sources=[s["id"] for s in sources]),
                       out_dir)
    path = out_dir / MANIFEST_FILE
    atomic_write_bytes(path, json.dumps(merged, indent=1, ensure_ascii=False).encode("utf-8"))
    return path


def _rename_sources(records: list[dict[str, Any]], *, n: int, manifest: Manifest, taken: set[str]) -> dict[str, str]:
    """{source id: its id in the merged manifest}: unchanged, or with "-n" when an earlier dataset took it."""
    renamed = {}
    for record in records:
        new_id = record["id"] if record["id"] not in taken else f"{record['id']}-{n}"
        if new_id in taken:
            raise ValueError(f"dataset {n} ({manifest.path}): dataset id {record['id']!r} clashes with another "
                             "dataset's id even with a suffix; rename it in its data_backend_config.")
        taken.add(new_id)
        renamed[record["id"]] = new_id
    return renamed


def _absolute_item(m: Manifest, i: int, record: dict[str, Any], *, renamed: dict[str, str]) -> dict[str, Any]:
    """Item i of manifest m with its source renamed and every cache path absolute."""
    item = m.items[i]
    # Several captions: every one of their cache files, made absolute like the rest.
    several = {"captions": list(item.captions),
               "texts": [str(cache_file_path(m.root, t, path=m.path, what="cache file")) for t in item.texts]
               } if len(item.captions) > 1 else {}
    return record | {
        "source": renamed[item.source],
        "latent": str(m.latent_path(i)),
        "text": str(cache_file_path(m.root, item.text, path=m.path, what="cache file")),
        "references": [
            ref | {"source": renamed[ref["source"]], "latent": str(m.reference_latent_path(i, k))}
            for k, ref in enumerate(record.get("references", ()))
        ],
    } | several


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
        _add_report(merged, r, own_ids=own_ids)
        weighted_latent += r.latent_bytes_per_image * r.usable_images
        weighted_text += r.text_bytes_per_caption
    merged.buckets = dict(sorted(merged.buckets.items()))
    merged.latent_bytes_per_image = weighted_latent / max(1, merged.usable_images)
    merged.text_bytes_per_caption = weighted_text / max(1, sum(r is not None for r in reports))
    return merged


def _add_report(merged: BuildReport, r: BuildReport, *, own_ids: dict[str, str]) -> None:
    """Add one dataset's report to the merged one (its datasets under their merged ids)."""
    merged.usable_images += r.usable_images
    merged.skipped += r.skipped
    merged.warnings += r.warnings
    for bucket, count in r.buckets.items():
        merged.buckets[bucket] = merged.buckets.get(bucket, 0) + count
    for counter in _REPORT_COUNTERS:
        setattr(merged, counter, getattr(merged, counter) + getattr(r, counter))
    merged.truncated_captions += r.truncated_captions
    merged.rebuilt_cache_files += r.rebuilt_cache_files
    merged.vae_loaded |= r.vae_loaded
    merged.text_encoder_loaded |= r.text_encoder_loaded
    merged.datasets |= {own_ids.get(ds, ds): info for ds, info in r.datasets.items()}
    merged.disabled_datasets += r.disabled_datasets
    merged.captions += r.captions
    merged.multi_caption_images += r.multi_caption_images


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
    quantization: QuantizationConfig | None = None,
    offload: OffloadConfig | None = None,
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
                           quantization=quantization, offload=offload)
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
