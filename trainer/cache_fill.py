"""Filling a dataset's caches: the keys of VAE latents and caption embeddings, and encoding the missing ones.

A latent is keyed by the image's content, the VAE, its precision, the bucket/resize/crop and the
preprocessing version; an embedding by the caption's text, the text encoder (weights, tokenizer and the
FLUX.2 text conventions) and its precision. Entries are files of trainer/cache.py named by their key, so a
rebuild with the same inputs loads no encoder and a damaged entry is rebuilt.
"""

from __future__ import annotations

import gc
import hashlib
import logging
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch

from . import flux2, model_files
from .buckets import CropPlan
from .build_report import BuildReport
from .cache import CacheEntryError, hash_json, read_entry, write_entry
from .config import OffloadConfig, QuantizationConfig
from .manifest import LATENT_TENSOR, TEXT_TENSOR
from .model_files import ModelFolder
from .scan import BuildProgress, ScannedImage, load_training_image

log = logging.getLogger(__name__)

PREPROCESS_VERSION = 1
"""Bump when decoding, EXIF rotation, alpha handling, resize or crop change: old latents become misses."""
TEXT_CONVENTIONS = {
    "version": 1,
    "system_message_sha256": hashlib.sha256(flux2.SYSTEM_MESSAGE.encode()).hexdigest(),
    "hidden_layers": list(flux2.TEXT_HIDDEN_LAYERS),
    "max_length": flux2.MAX_TEXT_TOKENS,
}
"""Everything about how a caption becomes an embedding besides the weights (FLUX.2-dev); part of each text cache key."""


def text_conventions(flavour: str) -> dict:
    """TEXT_CONVENTIONS of a flavour: dev's as they always were (its caches stay valid); klein's name its own
    chat template and hidden layers, so a caption cache of one flavour is never read for another."""
    if flavour == "dev":
        return TEXT_CONVENTIONS
    return {"version": 1, "template": "qwen3-user-turn-generation-prompt-no-thinking", "flavour": flavour,
            "hidden_layers": list(flux2.text_hidden_layers(flavour)), "max_length": flux2.MAX_TEXT_TOKENS}


# ------------------------------------------------------------------------------------------------ keys


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
        "conventions": text_conventions(model.flavour),
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


@dataclass(kw_only=True, slots=True)
class PendingLatent:
    """One image of one dataset, planned into its bucket: where its latent lives in that dataset's cache."""

    image: ScannedImage
    plan: CropPlan
    latent_key: str
    latent_dir: Path
    dataset: str = "default"

    @property
    def latent_path(self) -> Path:
        return self.latent_dir / f"{self.latent_key}.safetensors"


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


def _free_memory(model: weakref.ref, device: str) -> None:
    """After the last name of a model is deleted: a model without reference cycles is already freed (its reference
    count reached zero); only one that survives (cycles, e.g. through offload hooks) costs a full gc pass, which takes
    0.3-0.7 s once diffusers and transformers are imported, a large share of a small run's start."""
    if model() is not None:
        gc.collect()
    if str(device).startswith("cuda") and torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------- latents


def _latent_misses(pending: list[PendingLatent], *, report: BuildReport) -> dict[str, list[PendingLatent]]:
    """The pending latents without a valid cache entry: latent key -> one per cache folder that lacks it (the same
    image in datasets with different cache_dir_vae is encoded once and written to each). Counts the hits."""
    misses: dict[str, list[PendingLatent]] = {}
    seen: set[tuple[str, Path]] = set()
    for p in pending:
        if (p.latent_key, p.latent_dir) in seen:
            continue
        seen.add((p.latent_key, p.latent_dir))
        if _cached_entry(p.latent_path, kind="latent", key=p.latent_key, report=report) is not None:
            report.latents_reused += 1
        else:
            misses.setdefault(p.latent_key, []).append(p)
    return misses


def _load_pixels(group: list[PendingLatent], *,
                 failed: dict[str, str]) -> tuple[list[PendingLatent], list[torch.Tensor]]:
    """The images of group that decode, with their pixels; the others go to failed with the reason."""
    chunk, pixels = [], []
    for p in group:
        try:
            pixels.append(load_training_image(p.image.path, plan=p.plan))
            chunk.append(p)
        except (OSError, ValueError, SyntaxError) as exc:
            failed[p.latent_key] = f"failed to decode ({type(exc).__name__}: {exc})"
    return chunk, pixels


def _write_latents(vae, chunk: list[PendingLatent], pixels: list[torch.Tensor], *, bucket: tuple[int, int],
                   copies: dict[str, list[PendingLatent]]) -> None:
    """Encode chunk and write each latent to every cache folder that lacks it (copies: _latent_misses' result)."""
    with torch.no_grad():
        latents = flux2.encode_images(vae, torch.stack(pixels)).cpu()
    for p, latent in zip(chunk, latents):
        for target in copies[p.latent_key]:
            write_entry(target.latent_path, {LATENT_TENSOR: latent}, kind="latent", key=p.latent_key,
                        metadata={"image_sha256": p.image.sha256, "bucket": f"{bucket[0]}x{bucket[1]}"})


def fill_latent_cache(pending: list[PendingLatent], *, model: ModelFolder, precision: str, device: str,
                      batch_size: int, report: BuildReport, offload: OffloadConfig | None = None,
                      progress: BuildProgress | None = None) -> tuple[set[str], dict[str, str]]:
    """Encode every missing latent; return (keys encoded now, {latent key: reason} for images that failed).

    The VAE loads only when something is missing, once, and is freed before returning.
    """
    misses = _latent_misses(pending, report=report)
    failed: dict[str, str] = {}
    if not misses:
        return set(), failed
    by_bucket: dict[tuple[int, int], list[PendingLatent]] = {}
    for first, *_ in misses.values():
        by_bucket.setdefault(first.plan.bucket, []).append(first)
    from .offload import load_vae

    total = len(misses)
    if progress is not None:
        progress("latents", 0, total)  # a Cancel pressed during the scan stops before the VAE loads
    vae = load_vae(model, precision=precision, device=device, offload=offload)
    report.vae_loaded = True
    encoded: set[str] = set()
    done = 0
    try:
        for bucket in sorted(by_bucket):
            group = by_bucket[bucket]
            for start in range(0, len(group), batch_size):
                chunk, pixels = _load_pixels(group[start : start + batch_size], failed=failed)
                done += len(group[start : start + batch_size])
                if chunk:
                    _write_latents(vae, chunk, pixels, bucket=bucket, copies=misses)
                    encoded.update(p.latent_key for p in chunk)
                    report.vae_images_encoded += len(chunk)
                if progress is not None:
                    progress("latents", done, total)
    finally:
        # Free the VAE before the text encoder loads: on a GPU the two need not fit together.
        freed = weakref.ref(vae)
        del vae
        _free_memory(freed, device)
    return encoded, failed


# ---------------------------------------------------------------------------------------------- captions


def _text_misses(jobs: dict[str, list[str]], *, text_dirs: dict[str, Path], keys: dict[str, str],
                 report: BuildReport, paths: dict[str, dict[str, Path]],
                 truncated: list[str]) -> dict[str, list[tuple[str, str]]]:
    """Fill paths with every caption's cache file; return the captions without a valid entry per cache id."""
    misses: dict[str, list[tuple[str, str]]] = {}
    for tid, captions in jobs.items():
        paths[tid] = {}
        for caption in captions:
            key = keys[caption]
            paths[tid][caption] = text_dirs[tid] / f"{key}.safetensors"
            meta = _cached_entry(paths[tid][caption], kind="text", key=key, report=report)
            if meta is None:
                misses.setdefault(tid, []).append((caption, key))
                continue
            report.prompts_reused += 1
            if meta.get("truncated") == "1":
                truncated.append(caption)
    return misses


def _encode_captions(misses: dict[str, list[tuple[str, str]]], *, paths: dict[str, dict[str, Path]],
                     batch_sizes: dict[str, int], write_batch_sizes: dict[str, int], model: ModelFolder,
                     precision: str, device: str, report: BuildReport, quantization: QuantizationConfig | None,
                     offload: OffloadConfig | None, progress: BuildProgress | None, truncated: list[str]) -> None:
    """Load the text encoder once and encode every missing embedding, a cache's text_encoder_batch_size captions
    per call; they are written write_batch_size at a time (CacheWriter), and what is encoded is written even when
    the build stops (Cancel, an error)."""
    total, done = sum(len(todo) for todo in misses.values()), 0
    if progress is not None:
        progress("captions", 0, total)
    tokenizer = model_files.load_tokenizer(model)
    from .offload import load_text_encoder

    text_encoder = load_text_encoder(model, precision=precision, device=device, quantization=quantization,
                                     offload=offload)
    report.text_encoder_loaded = True
    try:
        for tid, todo in misses.items():
            size = batch_sizes.get(tid, 4)
            with CacheWriter(group_size=write_batch_sizes.get(tid, size)) as writer:
                for start in range(0, len(todo), size):
                    chunk = todo[start : start + size]
                    prompts = [c for c, _ in chunk]
                    _, _, cut_flags = flux2.tokenize_prompts(tokenizer, prompts, flavour=model.flavour)
                    embeds = flux2.encode_prompts(text_encoder, tokenizer, prompts, device="cpu", flavour=model.flavour)
                    for (caption, key), embed, cut in zip(chunk, embeds, cut_flags):
                        writer.add(paths[tid][caption], {TEXT_TENSOR: embed}, kind="text", key=key,
                                   metadata={"truncated": "1" if cut else "0"})
                        if cut:
                            truncated.append(caption)
                    report.prompts_encoded += len(chunk)
                    done += len(chunk)
                    if progress is not None:
                        progress("captions", done, total)
    finally:
        freed = weakref.ref(text_encoder)
        del text_encoder
        _free_memory(freed, device)


class CacheWriter:
    """Cache entries written group_size at a time, each group by a few threads at once (SimpleTuner's
    write_batch_size). Leaving the block writes what is still pending, also when the block raised."""

    THREADS = 8

    def __init__(self, *, group_size: int) -> None:
        if group_size < 1:
            raise ValueError(f"write_batch_size must be >= 1, got {group_size}.")
        self.group_size = group_size
        self.pending: list[tuple[Path, dict[str, torch.Tensor], dict]] = []
        self.groups_written: list[int] = []
        """Size of each group written, in order (for tests and the build report's reader)."""

    def add(self, path: Path, tensors: dict[str, torch.Tensor], **entry) -> None:
        self.pending.append((path, tensors, entry))
        if len(self.pending) >= self.group_size:
            self.flush()

    def flush(self) -> None:
        group, self.pending = self.pending, []
        if not group:
            return
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=min(self.THREADS, len(group))) as pool:
            for future in [pool.submit(write_entry, path, tensors, **entry) for path, tensors, entry in group]:
                future.result()  # the first failed write raises here, naming its file
        self.groups_written.append(len(group))

    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        self.flush()


def fill_text_cache(jobs: dict[str, list[str]], *, text_dirs: dict[str, Path], batch_sizes: dict[str, int],
                    model: ModelFolder, write_batch_sizes: dict[str, int] | None = None, text_identity: str, precision: str, device: str,
                    report: BuildReport, quantization: QuantizationConfig | None = None,
                    offload: OffloadConfig | None = None,
                    progress: BuildProgress | None = None) -> dict[str, dict[str, Path]]:
    """Encode every missing caption of every text cache with one encoder load; {cache id: {caption: path}}."""
    # A quantized text encoder gives other embeddings: its precision tag keeps them apart.
    tag = precision if quantization is None else quantization.text_cache_tag(precision)
    keys = {c: text_key(caption=c, text_identity=text_identity, precision=tag) for cs in jobs.values() for c in cs}
    paths: dict[str, dict[str, Path]] = {}
    truncated: list[str] = []
    misses = _text_misses(jobs, text_dirs=text_dirs, keys=keys, report=report, paths=paths, truncated=truncated)
    if misses:
        _encode_captions(misses, paths=paths, batch_sizes=batch_sizes, write_batch_sizes=write_batch_sizes or {},
                         model=model, precision=precision,
                         device=device, report=report, quantization=quantization, offload=offload, progress=progress,
                         truncated=truncated)
    for caption in dict.fromkeys(truncated):
        report.truncated_captions.append(caption)
        report.warnings.append(
            f"caption longer than {flux2.MAX_TEXT_TOKENS} tokens is truncated: {caption[:80]!r}"
            + ("..." if len(caption) > 80 else "")
        )
        log.warning("caption truncated at %d tokens: %.80r", flux2.MAX_TEXT_TOKENS, caption)
    return paths
