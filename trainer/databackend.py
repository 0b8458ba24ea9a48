"""SimpleTuner's multidatabackend.json: parse and check it into typed dataset specs.

The file is a JSON list of datasets. Three kinds are understood:

- image datasets (dataset_type "image", the default): the training images, with their captions, crop and
  bucket settings, repeats and VAE cache folder; conditioning_data may name conditioning datasets;
- conditioning datasets (dataset_type "conditioning", conditioning_type reference_strict or reference_loose):
  reference images for edit LoRAs, matched to the image dataset's files by relative path without extension;
- text_embeds datasets: where caption embeddings are cached (cache_dir; text_encoder_batch_size captions per encoder
  call, write_batch_size embeddings per round of writes); the one marked
  default (or the only one) is used by image datasets that do not name one with text_embeds.

Differences from SimpleTuner, each deliberate:
- Relative paths are read without the process's working directory (the file is read by ComfyUI, the CLI and
  torchrun workers, which run in different folders): for a file in SimpleTuner's layout (config/ or
  config/<env>/) against the folder that holds config/, where SimpleTuner runs and reads them from; elsewhere
  against the file's own folder. A path that exists only beside the file is read there; one that names two
  existing places is refused, naming both.
- crop_style "random" draws one offset per image (from its content hash), so its latent can be cached.
- crop_aspect "random" draws one aspect per image from crop_aspect_buckets, keyed by the dataset id and the
  image's content hash instead of a stored random draw: a rebuild picks the same aspect and hits the cache.
  Aspects may be ints or floats; weighted entries use only the keys "aspect" and "weight".
- crop_aspect "closest" without crop_aspect_buckets picks the nearest of this trainer's own bucket list
  (SimpleTuner requires the list); with it, the nearest listed aspect, as SimpleTuner does, measured in log
  space (SimpleTuner compares plain differences).
- Each non-empty line of a textfile caption is its own caption, as in SimpleTuner (disable_multiline_split
  keeps the whole file as one), but the one a sample trains with is drawn from a hash of (seed, epoch, item,
  copy) instead of a global random.choice, so runs are reproducible and resumable.
- probability orders an epoch's batches rather than drawing forever: each epoch still holds every batch of
  every dataset once (SimpleTuner also runs each dataset to exhaustion per epoch); the next batch comes from
  a dataset drawn among those with batches left, weighted by probability (seeded by seed and epoch).
  probability 0 leaves the dataset out of training.

Unknown keys, SimpleTuner options this trainer does not implement and bad values raise ValueError naming the
dataset id and the key. This module imports only the standard library and captions.py (ComfyUI imports it at
start-up).
"""

from __future__ import annotations

import difflib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .captions import CAPTION_STRATEGIES

DATASET_TYPES: tuple[str, ...] = ("image", "conditioning", "text_embeds")
CONDITIONING_TYPES: tuple[str, ...] = ("reference_strict", "reference_loose")
CONDITIONING_SAMPLING: tuple[str, ...] = ("combined", "random")
RESOLUTION_TYPES: tuple[str, ...] = ("pixel_area", "area", "pixel")
CROP_ASPECTS: tuple[str, ...] = ("square", "preserve", "closest", "random")
CROP_STYLES: tuple[str, ...] = ("center", "random", "corner")
DEFAULT_WRITE_BATCH_SIZE = 128
DEFAULT_TEXT_ENCODER_BATCH_SIZE = 4
CROP_ASPECT_LIMITS: tuple[float, float] = (0.25, 4.0)
"""Smallest and largest aspect (width / height) a crop_aspect_buckets entry may ask for: the bucket limits."""


@dataclass(frozen=True, kw_only=True, slots=True)
class ImageDatasetSpec:
    """One image or conditioning dataset of multidatabackend.json, checked and with paths resolved."""

    id: str
    """Unique name; used in reports, the manifest and error messages."""
    dataset_type: str = "image"
    """image (training targets) or conditioning (reference images paired by file name)."""
    instance_data_dir: Path
    """Folder of images, searched recursively."""
    caption_strategy: str = "textfile"
    """textfile: same-name .txt; filename: the file name; instanceprompt: instance_prompt for every image.
    Conditioning datasets carry no captions: their caption_strategy is ignored."""
    instance_prompt: str | None = None
    crop: bool = True
    """Crop to the bucket; false keeps the image's own aspect (only rounding to 16 pixels is trimmed)."""
    crop_aspect: str = "closest"
    """square: one square bucket; closest: the nearest bucket of a fixed list (or the nearest aspect of
    crop_aspect_buckets when given); preserve: the own aspect; random: an aspect drawn from crop_aspect_buckets
    once per image (fixed by the dataset id and the image's content hash)."""
    crop_aspect_buckets: tuple[tuple[float, float], ...] = ()
    """(aspect, weight) pairs for crop_aspect random or closest; aspect = width / height. A plain list of
    aspects gives each the weight 1 / n; weights sum to 1 and only steer random."""
    crop_style: str = "center"
    """Where the crop sits: center, corner (top-left) or random (one fixed offset per image)."""
    resolution: float = 1024
    """With resolution_type pixel_area a side (1024: buckets of about 1024^2 pixels); area: megapixels;
    pixel: the shorter side."""
    resolution_type: str = "pixel_area"
    minimum_image_size: float | None = None
    """Skip smaller images, in resolution_type's unit (pixel_area: sqrt(w*h); area: megapixels; pixel: shorter side)."""
    maximum_image_size: float | None = None
    """As in SimpleTuner, no image is skipped for being large (each is resized to cover its bucket, then cropped);
    with crop and target_downsample_size, it switches on the downsample before the crop. Its value is not compared."""
    target_downsample_size: float | None = None
    """With crop and maximum_image_size: each image is first resized to this size (resolution_type's unit, aspect
    kept; never below what covers the bucket), then the bucket is cropped from it, as SimpleTuner does."""
    minimum_aspect_ratio: float | None = None
    """Skip images whose width / height is below this."""
    maximum_aspect_ratio: float | None = None
    """Skip images whose width / height is above this."""
    repeats: int = 0
    """Extra passes per epoch, SimpleTuner's way: 0 = each image once, 9 = ten times."""
    probability: float = 1.0
    """Relative weight for which dataset the next batch comes from (image datasets only); the heavier
    dataset's batches come earlier in the epoch. 0 leaves the dataset out of training."""
    disable_multiline_split: bool = False
    """textfile captions: true keeps the whole file as one caption; false (default) makes each non-empty line
    a caption of its own, one of which is drawn per sample."""
    cache_dir_vae: Path | None = None
    """Folder of this dataset's latent cache; None = latents/ next to the built manifest."""
    text_embeds: str | None = None
    """id of the text_embeds dataset for its captions; None = the default one."""
    conditioning_data: tuple[str, ...] = ()
    """ids of conditioning datasets whose images are this dataset's references (edit LoRAs)."""
    conditioning_multidataset_sampling: str = "combined"
    """With several conditioning datasets: combined gives every reference to every sample (reference k gets
    time position 10 + 10k); random gives one, chosen per sample and epoch."""
    conditioning_type: str | None = None
    """For conditioning datasets: reference_strict (same bucket and crop as the edit image; a missing
    reference is an error) or reference_loose (own aspect and bucket; an edit image without its reference
    is skipped with the reason)."""
    source_dataset_id: str | None = None
    """For conditioning datasets: the image dataset they belong to (optional; checked when given)."""

    def __post_init__(self) -> None:
        if self.crop_aspect == "random" and not self.crop:
            raise _err(self.id, "crop", "is false, but crop_aspect random crops every image to an aspect drawn "
                       "from crop_aspect_buckets; set crop true, or use crop_aspect preserve to keep each aspect.")
        if self.crop_aspect == "random" and not self.crop_aspect_buckets:
            raise _err(self.id, "crop_aspect_buckets", "is required with crop_aspect random: give the aspect "
                       "ratios (width / height) to draw from, e.g. [0.75, 1.0, 1.5], or weighted entries "
                       '[{"aspect": 1.0, "weight": 0.7}, {"aspect": 1.5, "weight": 0.3}] (weights sum to 1).')
        if self.crop_aspect_buckets and self.crop_aspect not in ("random", "closest"):
            raise _err(self.id, "crop_aspect_buckets", f"is only used by crop_aspect random or closest, but "
                       f"crop_aspect is {self.crop_aspect!r}; remove crop_aspect_buckets or change crop_aspect.")
        if self.crop_aspect_buckets and not self.crop:
            raise _err(self.id, "crop", f"is false, but crop_aspect {self.crop_aspect} with crop_aspect_buckets "
                       "crops each image to a listed aspect; set crop true or remove crop_aspect_buckets.")

    @property
    def copies(self) -> int:
        """How many times each image appears per epoch."""
        return self.repeats + 1


@dataclass(frozen=True, kw_only=True, slots=True)
class TextEmbedsSpec:
    id: str
    cache_dir: Path | None = None
    """Folder of caption embeddings; None = text/ next to the built manifest."""
    write_batch_size: int = DEFAULT_WRITE_BATCH_SIZE
    """Embeddings written to the cache together, by a few threads at once (SimpleTuner's meaning: fewer, larger
    rounds of writes for network or object storage). Until this version it was also the text-encoder batch."""
    encoder_batch_size: int = DEFAULT_TEXT_ENCODER_BATCH_SIZE
    """Captions per text-encoder call (SimpleTuner's text_encoder_batch_size): more is faster, and needs more
    memory (each caption is 512 tokens)."""
    default: bool = False


@dataclass(frozen=True, kw_only=True, slots=True)
class BackendConfig:
    path: Path | None
    """The JSON file (None when built from widgets)."""
    datasets: tuple[ImageDatasetSpec, ...]
    """Enabled image datasets, in file order."""
    conditioning: dict[str, ImageDatasetSpec]
    """Enabled conditioning datasets by id."""
    text_embeds: tuple[TextEmbedsSpec, ...]
    disabled: tuple[str, ...] = ()
    """ids of datasets marked disabled (listed in the report, not built)."""
    warnings: tuple[str, ...] = field(default=())
    from_folder: bool = False
    """One image folder given directly (single_folder_config) rather than a file: the build's messages leave
    out the dataset id, which the user never chose."""

    def text_spec_for(self, dataset: ImageDatasetSpec) -> TextEmbedsSpec:
        if dataset.text_embeds is not None:
            return next(t for t in self.text_embeds if t.id == dataset.text_embeds)
        return self.default_text_embeds()

    def default_text_embeds(self) -> TextEmbedsSpec:
        for t in self.text_embeds:
            if t.default:
                return t
        return self.text_embeds[0] if self.text_embeds else TextEmbedsSpec(id="text-embeds", default=True)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary of what was resolved (for the manifest and the report)."""
        def spec(d: ImageDatasetSpec) -> dict[str, Any]:
            out = {k: getattr(d, k) for k in d.__slots__}
            return {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v) for k, v in out.items()}
        return {
            "path": str(self.path) if self.path else None,
            "datasets": [spec(d) for d in self.datasets],
            "conditioning": [spec(d) for d in self.conditioning.values()],
            "text_embeds": [{"id": t.id, "cache_dir": str(t.cache_dir) if t.cache_dir else None,
                             "write_batch_size": t.write_batch_size, "text_encoder_batch_size": t.encoder_batch_size,
                             "default": t.default} for t in self.text_embeds],
            "disabled": list(self.disabled),
        }


def single_folder_config(
    image_dir: str | Path,
    *,
    resolution: int = 512,
    repeats: int = 1,
    caption_strategy: str = "textfile",
    instance_prompt: str | None = None,
    crop_aspect: str = "closest",
    crop_style: str = "center",
    minimum_image_size: float | None = None,
    disable_multiline_split: bool = False,
    text_batch_size: int = 4,
) -> BackendConfig:
    """One image folder as a BackendConfig of one dataset (id "default"): Build Dataset's widgets, the CLI's
    --images. repeats counts appearances per epoch (1 = once); resolution is a side in pixels (buckets of
    about resolution^2 pixels); minimum_image_size 0 or None keeps every size; its embeddings go to the build's
    text/ folder, text_batch_size at a time."""
    if not isinstance(resolution, int) or resolution < 16 or resolution % 16:
        raise ValueError(
            f"resolution {resolution!r} must be a multiple of 16 and >= 16; FLUX.2 LoRAs train at 512-1024."
        )
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats {repeats!r} must be an integer >= 1 (how often each image appears per epoch).")
    if text_batch_size < 1:
        raise ValueError(f"text_batch_size must be >= 1, got {text_batch_size}.")
    spec = ImageDatasetSpec(id="default", instance_data_dir=Path(image_dir).expanduser(),
                            caption_strategy=caption_strategy, instance_prompt=instance_prompt,
                            resolution=resolution, repeats=repeats - 1, crop_aspect=crop_aspect, crop_style=crop_style,
                            minimum_image_size=float(minimum_image_size) if minimum_image_size else None,
                            disable_multiline_split=disable_multiline_split)
    return BackendConfig(path=None, datasets=(spec,), conditioning={}, from_folder=True,
                         text_embeds=(TextEmbedsSpec(id="text", encoder_batch_size=text_batch_size, default=True),))


# ------------------------------------------------------------------------------------------------ keys

_COMMON = {"id", "type", "dataset_type", "disabled", "disable"}
_IMAGE_KEYS = _COMMON | {
    "instance_data_dir", "caption_strategy", "instance_prompt", "crop", "crop_aspect", "crop_aspect_buckets",
    "crop_style", "resolution",
    "resolution_type", "minimum_image_size", "maximum_image_size", "target_downsample_size", "minimum_aspect_ratio",
    "maximum_aspect_ratio", "repeats", "cache_dir_vae", "metadata_backend", "text_embeds", "conditioning_data",
    "conditioning_multidataset_sampling", "probability", "disable_multiline_split",
}
_CONDITIONING_KEYS = (_IMAGE_KEYS - {"conditioning_data", "conditioning_multidataset_sampling", "text_embeds",
                                     "probability"}) | {
    "conditioning_type", "source_dataset_id",
}
_TEXT_KEYS = _COMMON | {"default", "cache_dir", "write_batch_size", "text_encoder_batch_size"}

_UNSUPPORTED: dict[str, str] = {
    "max_upscale_threshold": "upscaled images are reported as warnings; use minimum_image_size to skip small ones",
    "prepend_instance_prompt": "use caption_strategy instanceprompt, or write the trigger word into the captions",
    "only_instance_prompt": "use caption_strategy instanceprompt",
    "caption_shuffle": "caption shuffling is not implemented",
    "vae_cache_clear_each_epoch": "latents are cached once per image and crop",
    "vae_cache_ondemand": "latents are always cached before training",
    "vae_cache_disable": "latents are always cached before training",
    "text_cache_ondemand": "caption embeddings are always cached before training",
    "text_cache_disable": "caption embeddings are always cached before training",
    "skip_file_discovery": "files are always scanned (unchanged files hit the cache)",
    "preserve_data_backend_cache": "the manifest is rebuilt from the caches on every build",
    "is_regularisation_data": "regularisation data is not implemented",
    "is_regularization_data": "regularisation data is not implemented",
    "max_num_samples": "use a folder with the images you want",
    "start_epoch": "dataset scheduling is not implemented", "start_step": "dataset scheduling is not implemented",
    "end_epoch": "dataset scheduling is not implemented", "end_step": "dataset scheduling is not implemented",
    "image_embeds": "latents go to cache_dir_vae", "parquet": "use type local with caption files",
    "huggingface": "use type local", "aws_bucket_name": "use type local", "aws_data_prefix": "use type local",
    "video": "video datasets are not implemented", "audio": "audio datasets are not implemented",
    "conditioning": "generated conditioning datasets are not implemented; give a conditioning dataset folder",
    "timestep_sampling_offset": "per-dataset timestep offsets are not implemented",
    "hash_filenames": "cache files are named by content hash already",
}


def _err(ds: str, key: str, problem: str) -> ValueError:
    return ValueError(f"data_backend_config dataset {ds!r}: {key} {problem}")


def _check_keys(raw: dict[str, Any], *, ds: str, allowed: set[str], kind: str) -> None:
    if "probability" in raw and "probability" not in allowed:
        raise _err(ds, "probability", f"applies to image datasets only; remove it from this {kind} dataset "
                   "(references follow their image dataset; text_embeds datasets are never sampled).")
    for key in raw:
        if key in allowed:
            continue
        if key in _UNSUPPORTED:
            raise _err(ds, key, f"is a SimpleTuner option this trainer does not implement: {_UNSUPPORTED[key]}.")
        close = difflib.get_close_matches(key, sorted(allowed), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise _err(ds, key, f"is not a key of a {kind} dataset (known: {', '.join(sorted(allowed))}).{hint}")


def _choice(raw: dict[str, Any], key: str, choices: tuple[str, ...], default: str | None, *, ds: str) -> str | None:
    value = raw.get(key, default)
    if value is None:
        return None
    if not isinstance(value, str) or value not in choices:
        raise _err(ds, key, f"is {value!r}; choose one of {', '.join(choices)}.")
    return value


def _bool(raw: dict[str, Any], key: str, default: bool, *, ds: str) -> bool:
    value = raw.get(key, default)
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    if not isinstance(value, bool):
        raise _err(ds, key, f"is {value!r}; use true or false.")
    return value


def _number(raw: dict[str, Any], key: str, default: float | None, *, ds: str, minimum: float = 0.0,
            integer: bool = False, allow_equal: bool = True) -> float | int | None:
    value = raw.get(key, default)
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = float(value) if not integer else int(value)
        except ValueError:
            raise _err(ds, key, f"is {raw[key]!r}, not a number.") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _err(ds, key, f"is {value!r}, not a number.")
    if integer and (not float(value).is_integer()):
        raise _err(ds, key, f"is {value!r}; it must be a whole number.")
    if value < minimum or (not allow_equal and value == minimum):
        raise _err(ds, key, f"is {value!r}; it must be {'>=' if allow_equal else '>'} {minimum:g}.")
    return int(value) if integer else float(value)


def _path(raw: dict[str, Any], key: str, *, ds: str, base: Path, required: bool) -> Path | None:
    value = raw.get(key)
    if value is None or value == "":
        if required:
            raise _err(ds, key, "is required: give the folder path.")
        return None
    if not isinstance(value, str):
        raise _err(ds, key, f"is {value!r}; give a folder path as a string.")
    path = Path(value).expanduser()
    if path.is_absolute():
        return path
    project = _project_folder(base)
    if project is None:
        return base / path
    # SimpleTuner layout: SimpleTuner reads these paths from its working directory, the folder holding config/.
    here, there = project / path, base / path
    if here.exists() and there.exists() and here.resolve() != there.resolve():
        raise _err(ds, key, f"{value!r} names both {here} (from the folder that holds config/, where SimpleTuner "
                            f"runs) and {there} (beside the file); give an absolute path.")
    return there if there.exists() and not here.exists() else here


def _project_folder(base: Path) -> Path | None:
    """The folder SimpleTuner would run from when the file lies in its layout (config/multidatabackend.json or
    config/<env>/multidatabackend.json): the one holding config/. None elsewhere."""
    if base.name == "config":
        return base.parent
    if base.parent.name == "config":
        return base.parent.parent
    return None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _aspect_buckets(raw: dict[str, Any], *, ds: str, crop_aspect: str,
                    warnings: list[str]) -> tuple[tuple[float, float], ...]:
    """crop_aspect_buckets as (aspect, weight) pairs: a list of aspects (equal weights) or of
    {"aspect": a, "weight": w} objects (weights > 0 summing to 1); whether it fits crop_aspect is checked by
    ImageDatasetSpec."""
    key = "crop_aspect_buckets"
    value = raw.get(key)
    if value is None:
        return ()
    example = ('e.g. [0.75, 1.0, 1.5] or [{"aspect": 1.0, "weight": 0.7}, {"aspect": 1.5, "weight": 0.3}]')
    if not isinstance(value, list) or not value:
        raise _err(ds, key, f"is {value!r}; give a non-empty list of aspect ratios (width / height), {example}.")
    lo, hi = CROP_ASPECT_LIMITS
    weighted = isinstance(value[0], dict)
    pairs: list[tuple[float, float]] = []
    for index, entry in enumerate(value):
        where = f"{key}[{index}]"
        if isinstance(entry, dict) != weighted:
            raise _err(ds, where, f"is {entry!r}, but {key}[0] is {'an object' if weighted else 'a number'}; "
                       f"use only numbers or only {{\"aspect\", \"weight\"}} objects, {example}.")
        if weighted:
            unknown = sorted(set(entry) - {"aspect", "weight"})
            if unknown:
                raise _err(ds, f"{where}.{unknown[0]}", f"is not a key of a {key} entry; the keys are aspect and "
                           "weight (SimpleTuner's aspect_ratio / aspect_bucket spellings are not read).")
            if "aspect" not in entry:
                raise _err(ds, f"{where}.aspect", f"is missing in {entry!r}; give the aspect ratio (width / height).")
            aspect = entry["aspect"]
            if "weight" not in entry:
                if crop_aspect == "random":
                    raise _err(ds, f"{where}.weight", f"is missing in {entry!r}; give each entry a weight > 0, "
                               "all summing to 1 (or use a plain list of aspects for equal odds).")
                weight: Any = 1.0
            else:
                weight = entry["weight"]
            if not _is_number(weight) or not math.isfinite(weight) or weight <= 0:
                raise _err(ds, f"{where}.weight", f"is {weight!r}; give a number > 0 (how often the aspect is drawn).")
            aspect_key = f"{where}.aspect"
        else:
            aspect, weight, aspect_key = entry, 1.0, where
        if not _is_number(aspect) or not math.isfinite(aspect) or aspect <= 0:
            raise _err(ds, aspect_key, f"is {aspect!r}; give an aspect ratio (width / height) as a finite number "
                       "> 0, e.g. 1.5 for 3:2 landscape or 0.75 for 3:4 portrait.")
        if not lo <= aspect <= hi:
            raise _err(ds, aspect_key, f"is {aspect!r}; aspect ratios must lie in [{lo:g}, {hi:g}] (the bucket "
                       "limits; width / height, so 4 is 4:1 landscape and 0.25 is 1:4 portrait).")
        if any(float(aspect) == a for a, _ in pairs):
            raise _err(ds, aspect_key, f"repeats aspect {aspect!r}; list each aspect once (use weights to favour one).")
        pairs.append((float(aspect), float(weight)))
    if weighted and crop_aspect == "random":
        total = math.fsum(w for _, w in pairs)
        if abs(total - 1.0) > 1e-6:
            raise _err(ds, key, f"weights sum to {total:.9g}; they must sum to 1 (within 1e-6), as SimpleTuner "
                       "requires, e.g. 0.7 and 0.3.")
    elif weighted and any("weight" in e for e in value):
        warnings.append(f"dataset {ds!r}: {key} weights are not used by crop_aspect {crop_aspect} (only random "
                        "draws by weight)")
    if not weighted:  # equal odds, stored as weights summing to 1
        pairs = [(a, 1.0 / len(pairs)) for a, _ in pairs]
    return tuple(pairs)


def _parse_image(raw: dict[str, Any], *, ds: str, base: Path, conditioning: bool,
                 warnings: list[str]) -> ImageDatasetSpec:
    _check_keys(raw, ds=ds, allowed=_CONDITIONING_KEYS if conditioning else _IMAGE_KEYS,
                kind="conditioning" if conditioning else "image")
    folder = _path(raw, "instance_data_dir", ds=ds, base=base, required=True)
    assert folder is not None
    if not folder.is_dir():
        raise _err(ds, "instance_data_dir", f"{str(folder)!r} is not a folder; give the folder of its images.")
    caption_strategy = _choice(raw, "caption_strategy", CAPTION_STRATEGIES, "textfile", ds=ds)
    instance_prompt = raw.get("instance_prompt")
    if instance_prompt is not None and not isinstance(instance_prompt, str):
        raise _err(ds, "instance_prompt", f"is {instance_prompt!r}; give a string.")
    if not conditioning and caption_strategy == "instanceprompt" and not (instance_prompt or "").strip():
        raise _err(ds, "instance_prompt", "is required with caption_strategy instanceprompt (the caption of every image).")
    resolution_type = _choice(raw, "resolution_type", RESOLUTION_TYPES, "pixel_area", ds=ds)
    default_res = 1.0 if resolution_type == "area" else 1024
    resolution = _number(raw, "resolution", default_res, ds=ds, allow_equal=False)
    if resolution_type != "area" and (resolution < 16 or not float(resolution).is_integer()):
        raise _err(ds, "resolution", f"is {resolution!r}; with resolution_type {resolution_type} give whole pixels "
                   ">= 16 (e.g. 1024), or use resolution_type area for megapixels.")
    if resolution_type == "area" and resolution > 64:
        raise _err(ds, "resolution", f"is {resolution:g} megapixels with resolution_type area; did you mean "
                   "resolution_type pixel_area (a side in pixels such as 1024)?")
    min_size = _number(raw, "minimum_image_size", None, ds=ds)
    max_size = _number(raw, "maximum_image_size", None, ds=ds, allow_equal=False)
    if min_size is not None and max_size is not None and min_size > max_size:
        raise _err(ds, "minimum_image_size", f"{min_size:g} is above maximum_image_size {max_size:g}.")
    downsample = _number(raw, "target_downsample_size", None, ds=ds, allow_equal=False)
    if downsample is not None and (max_size is None or not _bool(raw, "crop", True, ds=ds)):
        warnings.append(f"dataset {ds!r}: target_downsample_size takes effect only with crop true and "
                        "maximum_image_size set (as in SimpleTuner); it is not used here")
    min_ar = _number(raw, "minimum_aspect_ratio", None, ds=ds, allow_equal=False)
    max_ar = _number(raw, "maximum_aspect_ratio", None, ds=ds, allow_equal=False)
    if min_ar is not None and max_ar is not None and min_ar > max_ar:
        raise _err(ds, "minimum_aspect_ratio", f"{min_ar:g} is above maximum_aspect_ratio {max_ar:g}.")
    metadata = raw.get("metadata_backend", "discovery")
    if metadata != "discovery":
        raise _err(ds, "metadata_backend", f"is {metadata!r}; only 'discovery' (scan the files) is implemented.")
    conditioning_data = raw.get("conditioning_data", ())
    if isinstance(conditioning_data, str):
        conditioning_data = (conditioning_data,)
    if not isinstance(conditioning_data, (list, tuple)) or not all(isinstance(c, str) for c in conditioning_data):
        raise _err(ds, "conditioning_data", f"is {conditioning_data!r}; give a dataset id or a list of ids.")
    if len(set(conditioning_data)) != len(conditioning_data):
        raise _err(ds, "conditioning_data", f"{list(conditioning_data)} names a dataset twice.")
    text_embeds = raw.get("text_embeds")
    if text_embeds is not None and not isinstance(text_embeds, str):
        raise _err(ds, "text_embeds", f"is {text_embeds!r}; give the id of a text_embeds dataset.")
    source = raw.get("source_dataset_id")
    if source is not None and not isinstance(source, str):
        raise _err(ds, "source_dataset_id", f"is {source!r}; give the id of an image dataset.")
    conditioning_type = None
    if conditioning:
        if "conditioning_type" not in raw:
            raise _err(ds, "conditioning_type", f"is required for a conditioning dataset: {' or '.join(CONDITIONING_TYPES)}.")
        conditioning_type = _choice(raw, "conditioning_type", CONDITIONING_TYPES, None, ds=ds)
    crop_aspect = str(_choice(raw, "crop_aspect", CROP_ASPECTS, "closest", ds=ds))
    crop_aspect_buckets = _aspect_buckets(raw, ds=ds, crop_aspect=crop_aspect, warnings=warnings)
    if conditioning_type == "reference_strict" and crop_aspect_buckets:
        warnings.append(f"dataset {ds!r}: crop_aspect_buckets is not used by a reference_strict dataset (each "
                        "reference takes its edit image's bucket and crop)")
    return ImageDatasetSpec(
        id=ds,
        dataset_type="conditioning" if conditioning else "image",
        instance_data_dir=folder,
        caption_strategy=str(caption_strategy),
        instance_prompt=instance_prompt,
        crop=_bool(raw, "crop", True, ds=ds),
        crop_aspect=crop_aspect,
        crop_aspect_buckets=crop_aspect_buckets,
        crop_style=str(_choice(raw, "crop_style", CROP_STYLES, "center", ds=ds)),
        resolution=float(resolution) if resolution_type == "area" else int(resolution),
        resolution_type=str(resolution_type),
        minimum_image_size=min_size,
        maximum_image_size=max_size,
        target_downsample_size=downsample,
        minimum_aspect_ratio=min_ar,
        maximum_aspect_ratio=max_ar,
        repeats=int(_number(raw, "repeats", 0, ds=ds, integer=True)),
        probability=1.0 if conditioning else float(_number(raw, "probability", 1.0, ds=ds)),
        disable_multiline_split=_bool(raw, "disable_multiline_split", False, ds=ds),
        cache_dir_vae=_path(raw, "cache_dir_vae", ds=ds, base=base, required=False),
        text_embeds=text_embeds,
        conditioning_data=tuple(conditioning_data),
        conditioning_multidataset_sampling=str(
            _choice(raw, "conditioning_multidataset_sampling", CONDITIONING_SAMPLING, "combined", ds=ds)
        ),
        conditioning_type=conditioning_type,
        source_dataset_id=source,
    )


def _parse_text(raw: dict[str, Any], *, ds: str, base: Path) -> TextEmbedsSpec:
    _check_keys(raw, ds=ds, allowed=_TEXT_KEYS, kind="text_embeds")
    return TextEmbedsSpec(
        id=ds,
        cache_dir=_path(raw, "cache_dir", ds=ds, base=base, required=False),
        write_batch_size=int(_number(raw, "write_batch_size", DEFAULT_WRITE_BATCH_SIZE, ds=ds, integer=True,
                                     minimum=1)),
        encoder_batch_size=int(_number(raw, "text_encoder_batch_size", DEFAULT_TEXT_ENCODER_BATCH_SIZE, ds=ds,
                                       integer=True, minimum=1)),
        default=_bool(raw, "default", False, ds=ds),
    )


def parse_backend_config(data: Any, *, base_dir: str | Path, path: Path | None = None) -> BackendConfig:
    """Check a multidatabackend.json value (a list of dataset objects); relative paths are under base_dir."""
    base = Path(base_dir).expanduser().resolve()
    where = f"data_backend_config {path}" if path else "data_backend_config"
    if not isinstance(data, list) or not data:
        raise ValueError(f"{where} must be a non-empty JSON list of datasets (SimpleTuner's multidatabackend.json).")
    images: list[ImageDatasetSpec] = []
    conditioning: dict[str, ImageDatasetSpec] = {}
    texts: list[TextEmbedsSpec] = []
    disabled: list[str] = []
    notes: list[str] = []
    seen: set[str] = set()
    for index, raw in enumerate(data):
        if not isinstance(raw, dict):
            raise ValueError(f"{where}: entry {index} is {raw!r}; each dataset is a JSON object.")
        ds = raw.get("id")
        if not isinstance(ds, str) or not ds.strip():
            raise ValueError(f"{where}: entry {index} has no id; give every dataset a unique non-empty id.")
        if ds in seen:
            raise _err(ds, "id", "is used twice; dataset ids must be unique.")
        seen.add(ds)
        kind = raw.get("dataset_type", "image")
        if kind not in DATASET_TYPES:
            raise _err(ds, "dataset_type", f"is {kind!r}; choose one of {', '.join(DATASET_TYPES)}.")
        backend = raw.get("type", "local")
        if backend != "local":
            raise _err(ds, "type", f"is {backend!r}; only 'local' (a folder on this machine) is implemented.")
        if "disabled" in raw and "disable" in raw:
            raise _err(ds, "disable", "and disabled are both set; keep one.")
        is_disabled = _bool(raw, "disabled" if "disabled" in raw else "disable", False, ds=ds)
        if is_disabled:
            disabled.append(ds)
            continue
        if kind == "text_embeds":
            texts.append(_parse_text(raw, ds=ds, base=base))
        elif kind == "conditioning":
            conditioning[ds] = _parse_image(raw, ds=ds, base=base, conditioning=True, warnings=notes)
        else:
            images.append(_parse_image(raw, ds=ds, base=base, conditioning=False, warnings=notes))
    if not images:
        raise ValueError(f"{where} has no enabled image dataset; add one with instance_data_dir (and disabled false).")
    if all(d.probability == 0 for d in images):
        raise ValueError(f"{where}: every image dataset has probability 0 ({', '.join(d.id for d in images)}), so "
                         "nothing would be trained on; give at least one a probability above 0 (the default is 1).")
    if sum(t.default for t in texts) > 1:
        raise ValueError(f"{where}: text_embeds datasets {[t.id for t in texts if t.default]} are all default; mark one.")
    if len(texts) > 1 and not any(t.default for t in texts):
        raise ValueError(f"{where}: several text_embeds datasets and none has default true; mark one default.")
    text_ids = {t.id for t in texts}
    image_ids = {d.id for d in images}
    used: set[str] = set()
    for d in images:
        if d.text_embeds is not None and d.text_embeds not in text_ids:
            raise _err(d.id, "text_embeds", f"names {d.text_embeds!r}, which is not an enabled text_embeds dataset.")
        for c in d.conditioning_data:
            if c not in conditioning:
                why = "disabled" if c in disabled else "not a conditioning dataset of this file"
                raise _err(d.id, "conditioning_data", f"names {c!r}, which is {why}.")
            used.add(c)
    for c in conditioning.values():
        if c.source_dataset_id is not None and c.source_dataset_id not in image_ids:
            raise _err(c.id, "source_dataset_id", f"names {c.source_dataset_id!r}, which is not an enabled image dataset.")
    warnings = tuple(notes) + tuple(
        f"conditioning dataset {c!r} is named by no image dataset's conditioning_data; it is not used"
        for c in conditioning if c not in used)
    return BackendConfig(path=path, datasets=tuple(images), conditioning=conditioning, text_embeds=tuple(texts),
                         disabled=tuple(disabled), warnings=warnings)


def load_backend_config(path: str | Path) -> BackendConfig:
    """Read and check multidatabackend.json (relative paths inside it are under its folder)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ValueError(f"data_backend_config {str(path)!r} is not a file; give the path of multidatabackend.json.")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"data_backend_config {file} is not valid JSON ({exc}).") from None
    return parse_backend_config(data, base_dir=file.resolve().parent, path=file.resolve())
