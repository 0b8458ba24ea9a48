"""The dataset manifest a build writes and every training process reads, and batches loaded from its caches.

A manifest (manifest.json, written by trainer/build.py) lists data sources (image folders with their
settings) and items (an image, its captions, bucket, crop, repeats and references) with the cache file of each
latent and caption embedding. Cache paths are relative to the manifest's folder (or absolute when a cache
directory lies elsewhere), so a dataset folder can be copied to another machine as a whole.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import flux2
from .cache import CacheEntryError, read_entry

MANIFEST_FORMAT = "flux2-lora-dataset"
MANIFEST_VERSION = 3
"""3 added several captions per item (captions/texts, written when an item has more than one) and a
probability per source; 2 added references (edit LoRAs), several sources and cache paths outside the
manifest's folder. Versions 1 and 2 are read too."""
MANIFEST_FILE = "manifest.json"
LATENT_TENSOR = "latents"
"""The tensor name inside a latent cache file."""
TEXT_TENSOR = "prompt_embeds"
"""The tensor name inside a caption-embedding cache file."""


# ---------------------------------------------------------------------------------------------- manifest


@dataclass(frozen=True, kw_only=True, slots=True)
class DataSource:
    """One dataset (image folder) and the settings it was built with."""

    id: str
    image_dir: Path
    caption_strategy: str
    instance_prompt: str | None
    resolution: float
    bucket_step: int
    repeats: int
    dataset_type: str = "image"
    resolution_type: str = "pixel_area"
    conditioning_data: tuple[str, ...] = ()
    conditioning_multidataset_sampling: str = "combined"
    conditioning_type: str | None = None
    probability: float = 1.0
    """Relative weight of the dataset when an epoch's batches are ordered; 0 = never sampled (1 before version 3)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class CachedImage:
    """An image as a build cached it: its dataset, file, content hash, size, bucket, crop and latent file."""

    source: str
    """Id of the dataset it belongs to."""
    image: str
    """Path relative to that dataset's image_dir."""
    image_sha256: str
    width: int
    height: int
    bucket: tuple[int, int]
    resized: tuple[int, int]
    crop: tuple[int, int]
    latent: str
    """Latent cache file: relative to the manifest's folder, or absolute when cache_dir_vae is elsewhere."""


@dataclass(frozen=True, kw_only=True, slots=True)
class ReferenceItem(CachedImage):
    """A reference image of an edit item (source: its conditioning dataset), with its own latent, bucket and crop."""


@dataclass(frozen=True, kw_only=True, slots=True)
class ManifestItem(CachedImage):
    """A training image with its captions and, for edit LoRAs, its references."""

    caption: str
    text: str
    """Caption embedding cache file, relative to the manifest's folder (or absolute)."""
    repeats: int
    """Appearances per epoch (SimpleTuner's repeats + 1)."""
    references: tuple[ReferenceItem, ...] = ()
    """One per conditioning dataset of its source, in conditioning_data order (edit LoRAs)."""
    captions: tuple[str, ...] = ()
    """Every caption of the item, the first being caption; () means (caption,). A sample trains with one."""
    texts: tuple[str, ...] = ()
    """The embedding cache file of each caption, in the same order; () means (text,)."""

    def __post_init__(self) -> None:
        # Items of version 1 and 2 manifests (and tests) give one caption: captions/texts mirror it.
        if not self.captions:
            object.__setattr__(self, "captions", (self.caption,))
        if not self.texts:
            object.__setattr__(self, "texts", (self.text,))


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

    def reference_latent_path(self, index: int, k: int) -> Path:
        return self.root / self.items[index].references[k].latent

    def probability(self, source: str) -> float:
        """The relative sampling weight of a dataset (1 for an unknown source, as in version 1 manifests)."""
        known = self.sources.get(source)
        return known.probability if known is not None else 1.0

    def sampling_mode(self, index: int) -> str:
        """combined or random: how the references of an item with several are used."""
        source = self.sources.get(self.items[index].source)
        return source.conditioning_multidataset_sampling if source is not None else "combined"

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


def cache_file_path(root: Path, rel: str, *, path: Path, what: str) -> Path:
    """The file a manifest names: relative to its folder (refused when it points outside), or absolute."""
    if Path(rel).is_absolute():
        # Written by a build for a cache_dir_vae / text cache_dir outside the dataset folder.
        return Path(rel)
    target = (root / rel).resolve()
    if not target.is_relative_to(root.resolve()):
        raise _manifest_error(path, f"{what} {rel!r} points outside the dataset folder")
    return target


def _cached_image_fields(record: dict[str, Any]) -> dict[str, Any]:
    """CachedImage's fields from a manifest record of an item or a reference."""

    def pair(key: str) -> tuple[int, int]:
        return int(record[key][0]), int(record[key][1])

    return {"source": str(record["source"]), "image": str(record["image"]),
            "image_sha256": str(record["image_sha256"]), "width": int(record["width"]),
            "height": int(record["height"]), "bucket": pair("bucket"), "resized": pair("resized"),
            "crop": pair("crop"), "latent": str(record["latent"])}


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
    if data.get("version") not in (1, 2, MANIFEST_VERSION):
        raise _manifest_error(
            path, f"version {data.get('version')!r}, this trainer reads versions 1 to {MANIFEST_VERSION}"
        )
    root = path.parent
    try:
        sources = {
            s["id"]: DataSource(
                id=str(s["id"]),
                image_dir=Path(s["image_dir"]),
                caption_strategy=str(s["caption_strategy"]),
                instance_prompt=s.get("instance_prompt"),
                resolution=float(s["resolution"]),
                bucket_step=int(s["bucket_step"]),
                repeats=int(s["repeats"]),
                dataset_type=str(s.get("dataset_type", "image")),
                resolution_type=str(s.get("resolution_type", "pixel_area")),
                conditioning_data=tuple(str(c) for c in s.get("conditioning_data", ())),
                conditioning_multidataset_sampling=str(s.get("conditioning_multidataset_sampling", "combined")),
                conditioning_type=s.get("conditioning_type"),
                probability=float(s.get("probability", 1.0)),
            )
            for s in data["sources"]
        }
        items = tuple(
            ManifestItem(
                **_cached_image_fields(it),
                caption=str(it["caption"]),
                text=str(it["text"]),
                repeats=int(it["repeats"]),
                references=tuple(ReferenceItem(**_cached_image_fields(r)) for r in it.get("references", ())),
                captions=tuple(str(c) for c in it.get("captions", ())),
                texts=tuple(str(t) for t in it.get("texts", ())),
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
        if len(item.captions) != len(item.texts) or item.captions[0] != item.caption or item.texts[0] != item.text:
            raise _manifest_error(path, f"item {i} ({item.image}) has {len(item.captions)} captions and "
                                        f"{len(item.texts)} texts, or their first is not caption/text")
        if any(c not in text_cache for c in item.captions):
            raise _manifest_error(path, f"item {i} ({item.image}): a caption of it is not in text_cache")
        source = sources[item.source]
        if len(item.references) != len(source.conditioning_data):
            raise _manifest_error(path, f"item {i} ({item.image}) has {len(item.references)} references, its "
                                        f"source {item.source!r} names {len(source.conditioning_data)}")
        for ref in item.references:
            if ref.source not in sources or ref.bucket[0] % 16 or ref.bucket[1] % 16:
                raise _manifest_error(path, f"item {i} ({item.image}) reference {ref.image} is malformed")
    for source in sources.values():
        if not (math.isfinite(source.probability) and source.probability >= 0):
            raise _manifest_error(path, f"source {source.id!r} has probability {source.probability!r} (need >= 0)")
    files = ([it.latent for it in items] + [t for it in items for t in it.texts]
             + [r.latent for it in items for r in it.references])
    for rel in files + list(text_cache.values()):
        if not cache_file_path(root, rel, path=path, what="cache file").is_file():
            missing.append(rel)
    if manifest.empty_caption not in text_cache:
        raise _manifest_error(path, "the empty caption (for caption dropout) is not in text_cache")
    if missing:
        raise _manifest_error(
            path, f"{len(set(missing))} cache files are missing (first: {', '.join(sorted(set(missing))[:3])})"
        )
    return manifest



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
    reference_latents: list[torch.Tensor] = field(default_factory=list)
    """Reference k of every sample, (B, 128, h_k, w_k), for objective.prepare_batch; empty without references."""


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
    references: Sequence[Sequence[int]] | None = None,
    captions: Sequence[int] | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    verify: bool = False,
) -> Batch:
    """Latents, caption embeddings and reference latents of items that share one bucket, in the order given.

    references: per sample, which of its item's references to load (BatchRef.references); None loads all of
    them. captions: per sample, which of its item's captions to train with (BatchRef.captions); None (or an
    empty tuple) takes each item's first caption. verify=True also re-hashes every byte (the structural checks
    always run; build-dataset verifies fully).
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
    picks = tuple(captions) if captions else (0,) * len(items)
    if len(picks) != len(items):
        raise ValueError(f"load_batch got {len(picks)} caption choices for {len(items)} items.")
    for i, item, pick in zip(indices, items, picks):
        if not 0 <= pick < len(item.captions):
            raise ValueError(f"item {i} has {len(item.captions)} captions; caption choice {pick} is out of range.")
    texts: dict[str, torch.Tensor] = {}  # by cache file: one read per distinct caption
    for item, pick in zip(items, picks):
        if item.texts[pick] not in texts:
            texts[item.texts[pick]] = _read_cached(
                manifest, manifest.root / item.texts[pick], kind="text", name=TEXT_TENSOR, verify=verify
            )
    choices = [tuple(range(len(it.references))) for it in items] if references is None else [tuple(c) for c in references]
    if len(choices) != len(items):
        raise ValueError(f"load_batch got {len(choices)} reference choices for {len(items)} items.")
    if len({len(c) for c in choices}) > 1:
        raise ValueError(f"items {list(indices)} use different numbers of references {choices}; a batch needs one.")
    reference_latents = []
    for k in range(len(choices[0]) if choices else 0):
        refs = []
        for i, item, choice in zip(indices, items, choices):
            ref = item.references[choice[k]]
            latent = _read_cached(manifest, manifest.reference_latent_path(i, choice[k]), kind="latent",
                                  name=LATENT_TENSOR, verify=verify)
            want = (flux2.PATCHIFIED_CHANNELS, ref.bucket[1] // flux2.PIXELS_PER_TOKEN,
                    ref.bucket[0] // flux2.PIXELS_PER_TOKEN)
            if tuple(latent.shape) != want:
                raise ValueError(f"dataset {manifest.path}: reference latent {ref.latent} has shape "
                                 f"{tuple(latent.shape)}, expected {want}; rebuild the dataset.")
            refs.append(latent)
        if len({tuple(r.shape) for r in refs}) > 1:
            raise ValueError(f"items {list(indices)}: reference {k} has different shapes in one batch; batches "
                             "from BucketBatchSampler group references by bucket.")
        reference_latents.append(torch.stack(refs).to(device=device, dtype=dtype))
    return Batch(
        reference_latents=reference_latents,
        latents=torch.stack(latents).to(device=device, dtype=dtype),
        prompt_embeds=torch.stack([texts[it.texts[p]] for it, p in zip(items, picks)]).to(device=device, dtype=dtype),
        captions=[it.captions[p] for it, p in zip(items, picks)],
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


