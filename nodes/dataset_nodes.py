"""Build Dataset (FLUX.2): the dataset node, and the FLUX2_DATASET handle it gives Train LoRA.

The node turns its widgets into one dataset spec (databackend.single_folder_config), or reads a
multidatabackend.json, and hands it to trainer.build.build_datasets, the builder the CLI's build-dataset uses.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from . import comfy_bridge
from .model_nodes import CATEGORY
from .paths import DATASET_ROOTS_ENV, check_inside, dataset_roots, run_roots

DATASETS_SUBDIR = Path("flux2_lora") / "datasets"
DEFAULT_LAYOUT = {"crop_aspect": "closest", "crop_style": "center", "minimum_image_size": 0,
                  "split_caption_lines": True}
"""The widgets added after the first release at their defaults: a dataset built with them keeps the folder name
(hence the caches) it had before they existed."""


@dataclass(frozen=True, kw_only=True, slots=True)
class DatasetHandle:
    """FLUX2_DATASET: a built dataset on disk (manifest + caches), never tensors."""

    manifest: str
    fingerprint: str
    num_images: int


_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")
_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)), *(f"LPT{i}" for i in range(1, 10))}


def sanitize_name(name: str, *, input_name: str) -> str:
    """A file-name-safe version of a user-given name; refuses names that would leave a folder."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"{input_name} is empty; give a short name such as 'my_style'.")
    if any(ord(c) < 32 for c in name):
        raise ValueError(f"{input_name} {name!r} contains control characters; use letters, digits, '-', '_' or '.'.")
    if "/" in name or "\\" in name or name.strip() in (".", ".."):
        raise ValueError(f"{input_name} {name!r} must be a plain name, not a path.")
    clean = _SAFE_NAME.sub("_", name.strip()).strip("._")[:80]
    if not clean or clean.split(".")[0].upper() in _RESERVED:
        raise ValueError(f"{input_name} {name!r} is not usable as a file name; choose another name.")
    return clean


def resolve_image_folder(image_folder: str) -> Path:
    """A folder path as typed; a relative one is taken inside ComfyUI's input directory. It must lie inside the
    input directory or FLUX2LORA_DATASET_ROOTS (nodes/paths.py)."""
    path = Path(image_folder.strip()).expanduser()
    path = path if path.is_absolute() else comfy_bridge.input_directory() / path
    return check_inside(path, roots=dataset_roots(), input_name="image_folder", env_name=DATASET_ROOTS_ENV)


def check_backend_paths(config) -> None:
    """The folders a multidatabackend.json names: images inside the dataset roots, caches there or in output."""
    for spec in list(config.datasets) + list(config.conditioning.values()):
        check_inside(spec.instance_data_dir, roots=dataset_roots(), env_name=DATASET_ROOTS_ENV,
                     input_name=f"data_backend_config dataset {spec.id!r} instance_data_dir")
        if spec.cache_dir_vae is not None:
            check_inside(spec.cache_dir_vae, roots=dataset_roots() + run_roots(), env_name=DATASET_ROOTS_ENV,
                         input_name=f"data_backend_config dataset {spec.id!r} cache_dir_vae")
    for text in config.text_embeds:
        if text.cache_dir is not None:
            check_inside(text.cache_dir, roots=dataset_roots() + run_roots(), env_name=DATASET_ROOTS_ENV,
                         input_name=f"data_backend_config text_embeds {text.id!r} cache_dir")


def resolve_backend_config(data_backend_config: str) -> Path:
    """A multidatabackend.json path as typed, checked like image_folder."""
    path = Path(data_backend_config.strip()).expanduser()
    path = path if path.is_absolute() else comfy_bridge.input_directory() / path
    return check_inside(path, roots=dataset_roots(), input_name="data_backend_config", env_name=DATASET_ROOTS_ENV)


class BuildProgressBar:
    """trainer.scan.BuildProgress for the node: one progress bar per phase (latents, then captions), and Cancel
    honoured between batches (and between files while scanning). Cache entries written before a Cancel are
    kept; the next Run reuses them."""

    def __init__(self) -> None:
        self._phase: str | None = None
        self._bar: comfy_bridge.Progress | None = None

    def __call__(self, phase: str, done: int, total: int) -> None:
        comfy_bridge.check_interrupted()
        if total <= 0:  # scanning: the count is not known yet
            return
        if phase != self._phase:
            self._phase, self._bar = phase, comfy_bridge.Progress(total, label=f"Build Dataset: {phase}")
        self._bar.update_absolute(done)


def _dataset_folder(name: str, key_parts: list, *, input_name: str) -> Path:
    """Where a dataset is built: output/flux2_lora/datasets/<name>-<hash of what it is built from>."""
    key = hashlib.sha256(json.dumps(key_parts).encode()).hexdigest()[:12]
    return comfy_bridge.output_directory() / DATASETS_SUBDIR / f"{sanitize_name(name, input_name=input_name)}-{key}"


class Flux2BuildDataset:
    TITLE = "Build Dataset (FLUX.2)"
    DESCRIPTION = (
        "Scans a folder of images with same-name .txt captions, sorts them into aspect buckets and caches their "
        "VAE latents and caption embeddings on disk (once per image/caption content). Reports what was skipped, "
        "and previews the crops it trains (a few per bucket, with captions), the bucket table and the skipped files."
    )
    CATEGORY = CATEGORY
    # New outputs go last: saved workflows link outputs by slot.
    RETURN_TYPES = ("FLUX2_DATASET", "INT", "STRING", "IMAGE")
    RETURN_NAMES = ("dataset", "num_images", "report", "preview")
    OUTPUT_TOOLTIPS = (
        "The built dataset (manifest and caches on disk) for Train LoRA.",
        "How many images are usable.",
        "Summary: usable images, buckets and every skipped file with its reason.",
        ("One sheet (1, height, width, 3): the crops trained, preview_per_bucket per bucket with their captions "
         "(scaled down past 256 px), the bucket table and the skipped files with their reasons; also on the node."),
    )
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls):
        from ..trainer.captions import CAPTION_STRATEGIES

        return {
            "required": {
                "model": ("FLUX2_MODEL", {"tooltip": "Model whose VAE and text encoder fill the caches."}),
                "image_folder": ("STRING", {"default": "", "tooltip": "Folder of training images (png, jpg, webp) with captions in same-name .txt files; a relative path is inside ComfyUI's input folder."}),
                "resolution": ("INT", {"default": 1024, "min": 64, "max": 4096, "step": 16, "tooltip": "Training resolution: buckets hold about resolution x resolution pixels, sides multiples of 16."}),
                "repeats": ("INT", {"default": 1, "min": 1, "max": 1000, "step": 1, "tooltip": "How many times each image appears per epoch."}),
                "caption_strategy": (list(CAPTION_STRATEGIES), {"default": "textfile", "tooltip": "textfile: captions from same-name .txt files; filename: the file name is the caption; instanceprompt: one caption for all."}),
            },
            "optional": {
                "instance_prompt": ("STRING", {"default": "", "tooltip": "The caption for every image when caption_strategy is instanceprompt."}),
                "crop_aspect": (["closest", "square", "preserve"], {"default": "closest", "tooltip": "closest: the nearest of a fixed set of aspect buckets (batches share shapes); square: every image cropped square; preserve: each image keeps its own aspect (only rounding to 16 px is cropped)."}),
                "crop_style": (["center", "random", "corner"], {"default": "center", "tooltip": "Where the crop sits: center, corner (top-left), or random (one fixed offset per image, so its latent is cached)."}),
                "minimum_image_size": ("INT", {"default": 0, "min": 0, "max": 8192, "step": 16, "tooltip": "Skip images smaller than this (sqrt(width x height) in pixels; 0 keeps all). Skips are listed in the report."}),
                "data_backend_config": ("STRING", {"default": "", "tooltip": "Optional path of a SimpleTuner multidatabackend.json (several datasets, reference/conditioning datasets for edit LoRAs, text_embeds cache). When set, it is built instead of image_folder and the widgets above."}),
                "vae_batch_size": ("INT", {"default": 4, "min": 1, "max": 64, "step": 1, "tooltip": "Images the VAE encodes at once while caching; lower it if caching runs out of memory."}),
                "split_caption_lines": ("BOOLEAN", {"default": True, "tooltip": "textfile captions: each non-empty line of a .txt file is a caption of its own and one is drawn per sample (SimpleTuner's multi-caption files). Off: the whole file is one caption."}),
                "preview_per_bucket": ("INT", {"default": 4, "min": 0, "max": 32, "step": 1, "tooltip": "Training crops shown per bucket in the preview (exactly the pixels the latents are encoded from, spread over the bucket's images); 0 shows only the bucket table and the skipped files. Changes only the preview, never the dataset."}),
            },
        }

    @classmethod
    def IS_CHANGED(cls, model=None, image_folder: str = "", **kwargs):
        # Re-run when any file in the folder changes (name, size or time); contents are hashed inside.
        try:
            root = resolve_image_folder(image_folder)
        except ValueError:
            return f"refused:{image_folder}"  # VALIDATE_INPUTS reports it
        if not root.is_dir():
            return f"missing:{image_folder}"
        h = hashlib.sha256()
        for p in sorted(root.iterdir()):
            if p.is_file():
                st = p.stat()
                h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
        return h.hexdigest()

    @classmethod
    def VALIDATE_INPUTS(cls, image_folder: str = "", **kwargs):
        config = str(kwargs.get("data_backend_config") or "").strip()
        try:
            if config and not resolve_backend_config(config).is_file():
                return f"data_backend_config {config!r} is not a file; give the path of a multidatabackend.json."
            folder = resolve_image_folder(image_folder) if image_folder.strip() and not config else None
        except ValueError as exc:
            return str(exc)
        if config:
            return True
        if folder is None or not folder.is_dir():
            return (f"image_folder {image_folder!r} is not a folder; give the folder that holds your training images "
                    "(absolute, or relative to ComfyUI's input folder).")
        return True

    def build(self, model, image_folder: str, resolution: int, repeats: int, caption_strategy: str,
              instance_prompt: str = "", crop_aspect: str = "closest", crop_style: str = "center",
              minimum_image_size: int = 0, data_backend_config: str = "", vae_batch_size: int = 4,
              split_caption_lines: bool = True, preview_per_bucket: int = 4):
        from ..trainer.build import build_datasets

        if data_backend_config.strip():
            config, out_dir = self._backend_config(model, data_backend_config)
        else:
            layout = {"crop_aspect": crop_aspect, "crop_style": crop_style, "minimum_image_size": minimum_image_size,
                      "split_caption_lines": split_caption_lines}
            config, out_dir = self._folder_config(model, image_folder, resolution=resolution, repeats=repeats,
                                                  caption_strategy=caption_strategy, instance_prompt=instance_prompt,
                                                  layout=layout)
        manifest_path = build_datasets(config, model=model.folder, out_dir=out_dir, text_precision=model.precision,
                                       device=str(comfy_bridge.torch_device()), vae_batch_size=vae_batch_size,
                                       quantization=model.quantization, offload=model.offload,
                                       progress=BuildProgressBar())
        return self._result(manifest_path, preview_per_bucket=preview_per_bucket)

    @staticmethod
    def _backend_config(model, data_backend_config: str):
        """The multidatabackend.json's BackendConfig (its folders checked) and the folder it is built in."""
        from ..trainer.databackend import load_backend_config

        config = load_backend_config(resolve_backend_config(data_backend_config))
        check_backend_paths(config)
        out_dir = _dataset_folder(config.path.stem, [str(config.path), str(model.folder.root)],
                                  input_name="data_backend_config")
        return config, out_dir

    @staticmethod
    def _folder_config(model, image_folder: str, *, resolution: int, repeats: int, caption_strategy: str,
                       instance_prompt: str, layout: dict):
        """The widgets as one dataset spec (single_folder_config) and the folder it is built in."""
        from ..trainer.databackend import single_folder_config

        folder = resolve_image_folder(image_folder).resolve()
        if not folder.is_dir():
            raise ValueError(f"Build Dataset: image_folder {image_folder!r} is not a folder.")
        config = single_folder_config(
            folder, resolution=resolution, repeats=repeats, caption_strategy=caption_strategy,
            instance_prompt=instance_prompt or None, crop_aspect=layout["crop_aspect"],
            crop_style=layout["crop_style"], minimum_image_size=layout["minimum_image_size"],
            disable_multiline_split=not layout["split_caption_lines"],
        )
        key_parts = [str(folder), resolution, repeats, caption_strategy, instance_prompt, str(model.folder.root)]
        if layout != DEFAULT_LAYOUT:
            key_parts += [layout["crop_aspect"], layout["crop_style"], layout["minimum_image_size"],
                          *([] if layout["split_caption_lines"] else ["whole-file captions"])]
        return config, _dataset_folder(folder.name, key_parts, input_name="image_folder")

    @staticmethod
    def _result(manifest_path, *, preview_per_bucket: int):
        from ..trainer.build_report import load_build_report
        from ..trainer.dataset_preview import render_dataset_preview
        from ..trainer.manifest import load_manifest

        manifest = load_manifest(manifest_path)
        build_report = load_build_report(Path(manifest_path).parent)
        report = build_report.summary()
        handle = DatasetHandle(manifest=str(manifest_path), fingerprint=manifest.fingerprint,
                               num_images=len(manifest.items))
        # Drawn from the manifest and the image files, never the encoders: a Run that reuses every cache entry
        # previews the same crops.
        preview = render_dataset_preview(manifest, build_report, per_bucket=preview_per_bucket)
        shown = comfy_bridge.save_preview_png(preview.image, prefix="flux2lora_dataset_preview")
        # The summary is shown as text on the node as well as returned; the sheet as the node's image.
        return {"ui": {"text": [report], "images": [shown]},
                "result": (handle, handle.num_images, report, preview.to_tensor())}


NODE_CLASS_MAPPINGS = {
    "Flux2LoraBuildDataset": Flux2BuildDataset,
}
