"""Build Dataset, Train LoRA, Apply LoRA, Save LoRA and Loss Plot (FLUX.2): the training nodes.

Train LoRA is a supervisor: it writes run.json, starts torchrun as its own process group, follows
events.jsonl into the progress bar and the browser, and stops the whole group on Cancel.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import comfy_bridge
from .model_nodes import CATEGORY
from .paths import DATASET_ROOTS_ENV, check_inside, dataset_roots, run_roots

log = logging.getLogger("flux2_lora")

RUNS_SUBDIR = Path("flux2_lora") / "runs"
DATASETS_SUBDIR = Path("flux2_lora") / "datasets"
LAUNCH_MODES = ("run", "export", "attach")
EXTRA_DATASET_INPUTS = (2, 3, 4)
"""Train LoRA's optional dataset_2 .. dataset_4 inputs."""


@dataclass(frozen=True, kw_only=True, slots=True)
class DatasetHandle:
    """FLUX2_DATASET: a built dataset on disk (manifest + caches), never tensors."""

    manifest: str
    fingerprint: str
    num_images: int


@dataclass(frozen=True, kw_only=True, slots=True)
class TrainedLora:
    """FLUX2_LORA: a LoRA file and what it was trained with."""

    path: str
    metadata: dict[str, Any] = field(default_factory=dict)


def _runs_root() -> Path:
    return comfy_bridge.output_directory() / RUNS_SUBDIR


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
    """trainer.data.BuildProgress for the node: one progress bar per phase (latents, then captions), and Cancel
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


class Flux2BuildDataset:
    TITLE = "Build Dataset (FLUX.2)"
    DESCRIPTION = (
        "Scans a folder of images with same-name .txt captions, sorts them into aspect buckets and caches their "
        "VAE latents and caption embeddings on disk (once per image/caption content). Reports what was skipped."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("FLUX2_DATASET", "INT", "STRING")
    RETURN_NAMES = ("dataset", "num_images", "report")
    OUTPUT_TOOLTIPS = (
        "The built dataset (manifest and caches on disk) for Train LoRA.",
        "How many images are usable.",
        "Summary: usable images, buckets and every skipped file with its reason.",
    )
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("FLUX2_MODEL", {"tooltip": "Model whose VAE and text encoder fill the caches."}),
                "image_folder": ("STRING", {"default": "", "tooltip": "Folder of training images (png, jpg, webp) with captions in same-name .txt files; a relative path is inside ComfyUI's input folder."}),
                "resolution": ("INT", {"default": 1024, "min": 64, "max": 4096, "step": 16, "tooltip": "Training resolution: buckets hold about resolution x resolution pixels, sides multiples of 16."}),
                "repeats": ("INT", {"default": 1, "min": 1, "max": 1000, "step": 1, "tooltip": "How many times each image appears per epoch."}),
                "caption_strategy": (["textfile", "filename", "instanceprompt"], {"default": "textfile", "tooltip": "textfile: captions from same-name .txt files; filename: the file name is the caption; instanceprompt: one caption for all."}),
            },
            "optional": {
                "instance_prompt": ("STRING", {"default": "", "tooltip": "The caption for every image when caption_strategy is instanceprompt."}),
                "crop_aspect": (["closest", "square", "preserve"], {"default": "closest", "tooltip": "closest: the nearest of a fixed set of aspect buckets (batches share shapes); square: every image cropped square; preserve: each image keeps its own aspect (only rounding to 16 px is cropped)."}),
                "crop_style": (["center", "random", "corner"], {"default": "center", "tooltip": "Where the crop sits: center, corner (top-left), or random (one fixed offset per image, so its latent is cached)."}),
                "minimum_image_size": ("INT", {"default": 0, "min": 0, "max": 8192, "step": 16, "tooltip": "Skip images smaller than this (sqrt(width x height) in pixels; 0 keeps all). Skips are listed in the report."}),
                "data_backend_config": ("STRING", {"default": "", "tooltip": "Optional path of a SimpleTuner multidatabackend.json (several datasets, reference/conditioning datasets for edit LoRAs, text_embeds cache). When set, it is built instead of image_folder and the widgets above."}),
                "vae_batch_size": ("INT", {"default": 4, "min": 1, "max": 64, "step": 1, "tooltip": "Images the VAE encodes at once while caching; lower it if caching runs out of memory."}),
                "split_caption_lines": ("BOOLEAN", {"default": True, "tooltip": "textfile captions: each non-empty line of a .txt file is a caption of its own and one is drawn per sample (SimpleTuner's multi-caption files). Off: the whole file is one caption."}),
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
              split_caption_lines: bool = True):
        from ..trainer.data import build_dataset, build_datasets

        if data_backend_config.strip():
            from ..trainer.databackend import load_backend_config

            config = load_backend_config(resolve_backend_config(data_backend_config))
            check_backend_paths(config)
            key = hashlib.sha256(json.dumps([str(config.path), str(model.folder.root)]).encode()).hexdigest()[:12]
            out_dir = comfy_bridge.output_directory() / DATASETS_SUBDIR / f"{sanitize_name(config.path.stem, input_name='data_backend_config')}-{key}"
            manifest_path = build_datasets(config, model=model.folder, out_dir=out_dir, text_precision=model.precision,
                                           device=str(comfy_bridge.torch_device()), vae_batch_size=vae_batch_size,
                                           progress=BuildProgressBar())
            return self._result(manifest_path)
        if (crop_aspect, crop_style, minimum_image_size, split_caption_lines) != ("closest", "center", 0, True):
            from ..trainer.databackend import BackendConfig, ImageDatasetSpec, TextEmbedsSpec

            folder = resolve_image_folder(image_folder).resolve()
            if not folder.is_dir():
                raise ValueError(f"Build Dataset: image_folder {image_folder!r} is not a folder.")
            if caption_strategy == "instanceprompt" and not instance_prompt.strip():
                raise ValueError("Build Dataset: caption_strategy instanceprompt needs an instance_prompt.")
            spec = ImageDatasetSpec(id="default", instance_data_dir=folder, caption_strategy=caption_strategy,
                                    instance_prompt=instance_prompt or None, resolution=resolution,
                                    repeats=repeats - 1, crop_aspect=crop_aspect, crop_style=crop_style,
                                    minimum_image_size=float(minimum_image_size) or None,
                                    disable_multiline_split=not split_caption_lines)
            config = BackendConfig(path=None, datasets=(spec,), conditioning={},
                                   text_embeds=(TextEmbedsSpec(id="text", write_batch_size=4, default=True),))
            key = hashlib.sha256(json.dumps([str(folder), resolution, repeats, caption_strategy, instance_prompt,
                                             str(model.folder.root), crop_aspect, crop_style,
                                             minimum_image_size, *([] if split_caption_lines else ["whole-file captions"])]
                                            ).encode()).hexdigest()[:12]
            out_dir = comfy_bridge.output_directory() / DATASETS_SUBDIR / f"{sanitize_name(folder.name, input_name='image_folder')}-{key}"
            manifest_path = build_datasets(config, model=model.folder, out_dir=out_dir, text_precision=model.precision,
                                           device=str(comfy_bridge.torch_device()), vae_batch_size=vae_batch_size,
                                           progress=BuildProgressBar())
            return self._result(manifest_path)

        folder = resolve_image_folder(image_folder).resolve()
        if not folder.is_dir():
            raise ValueError(f"Build Dataset: image_folder {image_folder!r} is not a folder.")
        key = hashlib.sha256(json.dumps([str(folder), resolution, repeats, caption_strategy, instance_prompt,
                                         str(model.folder.root)]).encode()).hexdigest()[:12]
        out_dir = comfy_bridge.output_directory() / DATASETS_SUBDIR / f"{sanitize_name(folder.name, input_name='image_folder')}-{key}"
        manifest_path = build_dataset(
            image_dir=folder,
            model=model.folder,
            out_dir=out_dir,
            resolution=resolution,
            repeats=repeats,
            caption_strategy=caption_strategy,
            instance_prompt=instance_prompt or None,
            text_precision=model.precision,
            device=str(comfy_bridge.torch_device()),
            vae_batch_size=vae_batch_size,
            progress=BuildProgressBar(),
        )
        return self._result(manifest_path)

    @staticmethod
    def _result(manifest_path):
        from ..trainer.data import load_build_report
        from ..trainer.manifest import load_manifest

        manifest = load_manifest(manifest_path)
        report = load_build_report(Path(manifest_path).parent).summary()
        handle = DatasetHandle(manifest=str(manifest_path), fingerprint=manifest.fingerprint,
                               num_images=len(manifest.items))
        # The summary is shown as text on the node as well as returned.
        return {"ui": {"text": [report]}, "result": (handle, handle.num_images, report)}


def _loss_history(events: list[dict[str, Any]]) -> list[tuple[int, float]]:
    return [(int(e["step"]), float(e["loss"])) for e in events if e.get("event") == "step" and "loss" in e]


class Flux2TrainLora:
    TITLE = "Train LoRA (FLUX.2)"
    DESCRIPTION = (
        "Trains a FLUX.2 LoRA in a separate torchrun process group (FSDP2 or DDP across GPUs), streaming loss and "
        "progress here. Same inputs and dataset contents reuse the finished run instead of retraining; Cancel "
        "stops every process and keeps the last checkpoint, which the next Run resumes from. 'export' writes "
        "run.json and the torchrun command for a cluster; 'attach' picks up a run folder trained elsewhere."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("FLUX2_LORA", "FLUX2_LOSS", "STRING")
    RETURN_NAMES = ("lora", "loss_history", "run_info")
    OUTPUT_TOOLTIPS = (
        "The trained LoRA file (ComfyUI/BFL keys) and its metadata, for Apply LoRA and Save LoRA.",
        "(step, loss) pairs of the run, for Loss Plot.",
        "Run folder, final loss and, in export mode, the torchrun command to run on a cluster.",
    )
    FUNCTION = "train"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        from ..trainer.config import CHOICES

        return {
            "required": {
                "model": ("FLUX2_MODEL", {"tooltip": "The FLUX.2 model to train on (from Load FLUX.2)."}),
                "dataset": ("FLUX2_DATASET", {"tooltip": "The dataset from Build Dataset (FLUX.2)."}),
                "output_name": ("STRING", {"default": "my_flux2_lora", "tooltip": "Name of the run and of the LoRA file (letters, digits, - and _)."}),
                "max_train_steps": ("INT", {"default": 1000, "min": 1, "max": 1_000_000, "step": 1, "tooltip": "Optimizer steps to train."}),
                "learning_rate": ("FLOAT", {"default": 1e-4, "min": 1e-7, "max": 1e-2, "step": 1e-6, "round": False, "tooltip": "Peak learning rate of AdamW."}),
                "lora_rank": ("INT", {"default": 16, "min": 1, "max": 256, "step": 1, "tooltip": "LoRA rank: capacity of the adapter; larger files and more memory."}),
                "lora_alpha": ("FLOAT", {"default": 16.0, "min": 0.01, "max": 1024.0, "step": 0.5, "tooltip": "LoRA alpha; the update is scaled by alpha / rank."}),
                "flux_lora_target": (list(CHOICES["flux_lora_target"]), {"default": "all", "tooltip": "Which layers get adapters: all (attention + MLP of every block), attention, mlp, or tiny (qkv only)."}),
                "train_batch_size": ("INT", {"default": 1, "min": 1, "max": 64, "step": 1, "tooltip": "Images per step on each process."}),
                "gradient_accumulation_steps": ("INT", {"default": 1, "min": 1, "max": 128, "step": 1, "tooltip": "Micro-batches summed before each optimizer step."}),
                "mixed_precision": (list(CHOICES["mixed_precision"]), {"default": "bf16", "tooltip": "Compute precision: bf16 on modern GPUs; no (fp32) for CPU tests."}),
                "gradient_checkpointing": ("BOOLEAN", {"default": True, "tooltip": "Recompute activations in backward: much less memory, about 30% slower."}),
                "flux_guidance_value": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 20.0, "step": 0.1, "tooltip": "Guidance value fed to FLUX.2-dev's guidance embedding while training."}),
                "caption_dropout_probability": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": "Chance per sample of training on the empty prompt instead of the caption."}),
                # No control_after_generate: a seed that changes after each Run would retrain every time.
                "seed": ("INT", {"default": 42, "min": 0, "max": 2**31 - 1, "step": 1, "control_after_generate": False, "tooltip": "Seed for data order, noise and timesteps."}),
                "checkpointing_steps": ("INT", {"default": 250, "min": 1, "max": 1_000_000, "step": 1, "tooltip": "Save a resumable checkpoint every this many steps."}),
                "checkpoints_total_limit": ("INT", {"default": 2, "min": 1, "max": 100, "step": 1, "tooltip": "Keep at most this many checkpoints (oldest are deleted)."}),
                "validation_prompt": ("STRING", {"multiline": True, "default": "", "tooltip": "Prompt rendered during training to watch progress (empty: no validation)."}),
                "validation_steps": ("INT", {"default": 250, "min": 0, "max": 1_000_000, "step": 1, "tooltip": "Render validation images every this many steps (0: only at the end)."}),
                "num_processes": ("INT", {"default": 1, "min": 1, "max": 64, "step": 1, "tooltip": "Processes (GPUs) on this machine for torchrun."}),
                "distributed": (list(CHOICES["distributed"]), {"default": "fsdp2", "tooltip": "fsdp2: shard the model across processes (for models that do not fit one GPU); ddp: replicate (faster when it fits); none: one process."}),
                "launch": (list(LAUNCH_MODES), {"default": "run", "tooltip": "run: train here; export: write run.json and print the torchrun command for a cluster; attach: use a run folder trained elsewhere."}),
            },
            "optional": {
                "attach_run_folder": ("STRING", {"default": "", "tooltip": "With launch=attach: the run folder (holding events.jsonl and the LoRA) to pick up."}),
                "extra_config_json": ("STRING", {"multiline": True, "default": "", "tooltip": "Advanced: more trainer keys as a JSON object (SimpleTuner names), e.g. {\"lr_scheduler\": \"cosine\"}."}),
                **{f"dataset_{n}": ("FLUX2_DATASET", {"tooltip": f"Optional dataset {n} from another Build Dataset, trained together with the first: each batch comes from one dataset, each dataset's repeats weight it. All must be built with the same model."})
                   for n in EXTRA_DATASET_INPUTS},
            },
        }

    def train(self, model, dataset, output_name: str, launch: str = "run", attach_run_folder: str = "",
              extra_config_json: str = "", num_processes: int = 1, dataset_2=None, dataset_3=None, dataset_4=None,
              **widgets):
        from ..trainer.config import TrainConfig
        from ..trainer.events import append_event
        from ..trainer.launch import TrainingCancelled, TrainingProcess, command_text, supervise, torchrun_command
        from ..trainer.runlock import TOKEN_ENV, acquire_run_lock

        name = sanitize_name(output_name, input_name="output_name")
        if launch not in LAUNCH_MODES:
            raise ValueError(f"launch {launch!r} is not one of {', '.join(LAUNCH_MODES)}.")
        if launch == "attach":
            return self._attach(attach_run_folder)
        extra = _parse_extra(extra_config_json)
        check_extra_paths(extra)
        settings = {k: v for k, v in widgets.items()}
        if not settings.get("validation_prompt", "").strip():
            settings["validation_prompt"] = None
        settings.update(extra)
        datasets = training_datasets(dataset, dataset_2, dataset_3, dataset_4)
        if len(datasets) > 1:  # the trainer merges them; a mismatch is refused here, before anything launches
            from ..trainer.data import check_mergeable
            from ..trainer.manifest import load_manifest

            check_mergeable([load_manifest(d.manifest) for d in datasets])
        identity = run_identity(model=model, datasets=datasets, settings=settings, num_processes=num_processes)
        run_dir = _runs_root() / f"{name}-{identity[:10]}"
        config = {
            "model_type": "lora",
            "model_family": "flux2",
            "model_flavour": "dev",
            "pretrained_model_name_or_path": str(model.folder.root),
            "output_dir": str(run_dir),
            "dataset_manifest": datasets[0].manifest if len(datasets) == 1 else [d.manifest for d in datasets],
            "resume_from_checkpoint": "latest",
            "output_name": name,
            **settings,
        }
        if model.folder.transformer_file is not None:
            config["pretrained_transformer_model_name_or_path"] = str(model.folder.transformer_file)
        # Validate everything before anything expensive starts.
        parsed = TrainConfig.from_dict(config)
        estimate = check_memory(parsed, num_processes=num_processes, launch=launch)
        run_dir.mkdir(parents=True, exist_ok=True)
        # One run per folder: another live run (a second server, a CLI run) is refused before anything is written.
        with acquire_run_lock(run_dir, owner="Train LoRA node") as lock:
            config_path = run_dir / "run.json"
            parsed.to_json(config_path)
            (run_dir / "memory_estimate.txt").write_text(estimate + "\n", encoding="utf-8")

            finished = finished_run(run_dir)
            if finished is not None:
                log.info("Train LoRA: inputs unchanged since run %s; reusing its LoRA", run_dir)
                return _outputs(finished, run_dir)

            cmd = torchrun_command(config_path=config_path, nproc_per_node=num_processes)
            if launch == "export":
                text = export_instructions(config_path=config_path, num_processes=num_processes)
                (run_dir / "COMMAND.txt").write_text(text + "\n", encoding="utf-8")
                return {"ui": {"text": [text]}, "result": (TrainedLora(path=""), [], text)}

            total = int(parsed.max_train_steps)
            progress = comfy_bridge.Progress(total, label="Train LoRA")
            node_started = time.time()

            def on_event(event: dict[str, Any]) -> None:
                kind = event.get("event")
                if kind == "step":
                    progress.update_absolute(min(int(event.get("step", 0)), total))
                comfy_bridge.send_event(comfy_bridge.PACK_EVENT, {"run": run_dir.name, **event})

            # Models an earlier Run left in memory (ComfyUI's, or this pack's Encode/Sample caches) would
            # otherwise sit beside the trainer's.
            comfy_bridge.free_comfy_memory()
            from ..trainer.inference import release_all

            release_all()
            proc = TrainingProcess.start(cmd, run_dir=run_dir, env={TOKEN_ENV: lock.token})  # trainer shares the lock
            log.info("Train LoRA: started %s (pid %d); log %s", command_text(cmd), proc.popen.pid, proc.log_path)
            cancelled_types = (TrainingCancelled, comfy_bridge.interrupt_exception())
            try:
                supervise(proc, on_event=on_event, should_cancel=comfy_bridge.interrupted)
            except cancelled_types as err:
                # Cancel is not an error: the run folder keeps the last checkpoint and the next Run resumes it.
                from ..trainer.checkpoint import list_checkpoints

                kept = list_checkpoints(run_dir)
                resume = f"the next Run resumes from {kept[-1][1].name}" if kept else "no checkpoint yet: the next Run starts over"
                append_event(run_dir, "cancelled", message=f"cancelled by the user; {resume}",
                             last_checkpoint=kept[-1][1].name if kept else None)
                comfy_bridge.send_event(comfy_bridge.PACK_EVENT, {"run": run_dir.name, "event": "cancelled"})
                raise comfy_bridge.interrupt_exception()(f"Train LoRA cancelled; resume by pressing Run again ({run_dir}).") from err
            except Exception as err:
                append_event(run_dir, "failed", message=str(err)[:2000])
                comfy_bridge.send_event(comfy_bridge.PACK_EVENT, {"run": run_dir.name, "event": "failed", "message": str(err)[:2000]})
                raise
            log.info("Train LoRA: finished in %.1f s", time.time() - node_started)
            done = finished_run(run_dir)
            if done is None:
                raise RuntimeError(f"Train LoRA: the trainer reported success but {run_dir} has no finished LoRA.")
            return _outputs(done, run_dir)

    @staticmethod
    def _attach(run_folder: str):
        if not run_folder.strip():
            raise ValueError("attach_run_folder is empty; give the run folder that holds events.jsonl.")
        root = check_inside(run_folder.strip(), roots=run_roots(), input_name="attach_run_folder", env_name=None)
        if not root.is_dir():
            raise ValueError(f"attach_run_folder {run_folder!r} is not a folder; give the run folder that holds events.jsonl.")
        done = finished_run(root)
        if done is None:
            raise ValueError(f"attach_run_folder {root} has no finished run (no 'end' event with a LoRA file in events.jsonl).")
        return _outputs(done, root)


_NODE_SET_KEYS = {
    "output_dir": "the run folder comes from output_name",
    "pretrained_model_name_or_path": "the model comes from Load FLUX.2",
    "pretrained_transformer_model_name_or_path": "the model comes from Load FLUX.2",
    "pretrained_vae_model_name_or_path": "the model comes from Load FLUX.2",
    "dataset_manifest": "the dataset comes from Build Dataset",
    "data_backend_config": "the dataset comes from Build Dataset",
}


def check_extra_paths(extra: dict[str, Any]) -> None:
    """Path-valued trainer keys in extra_config_json: the node sets most; the rest must stay in allowed folders."""
    for raw_key, value in extra.items():
        key = str(raw_key).removeprefix("--")
        if key in _NODE_SET_KEYS:
            raise ValueError(f"extra_config_json key {raw_key!r} cannot be set here: {_NODE_SET_KEYS[key]}. Remove it.")
        if key == "user_prompt_library" and isinstance(value, str) and value.strip():
            extra[raw_key] = _input_file(value, input_name="extra_config_json user_prompt_library")
        if key == "validation_reference_images":
            # One path or a list, as the trainer takes it; anything else is left for TrainConfig to refuse by name.
            name = "extra_config_json validation_reference_images"
            if isinstance(value, str) and value.strip():
                extra[raw_key] = _input_file(value, input_name=name)
            elif isinstance(value, list):
                extra[raw_key] = [_input_file(v, input_name=name) if isinstance(v, str) and v.strip() else v
                                  for v in value]
        if key == "resume_from_checkpoint" and isinstance(value, str) and value.strip() and value != "latest" \
                and not re.fullmatch(r"checkpoint-\d+", value):
            raise ValueError(f"extra_config_json resume_from_checkpoint {value!r}: give 'latest' or a checkpoint-<step> "
                             "name of this run's folder.")


def _input_file(value: str, *, input_name: str) -> str:
    """A file path from extra_config_json, absolute and inside the dataset roots; relative = in ComfyUI's input."""
    path = Path(value.strip()).expanduser()
    path = path if path.is_absolute() else comfy_bridge.input_directory() / path
    return str(check_inside(path, roots=dataset_roots(), env_name=DATASET_ROOTS_ENV, input_name=input_name))


def _parse_extra(text: str) -> dict[str, Any]:
    if not text or not text.strip():
        return {}
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"extra_config_json is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError("extra_config_json must be a JSON object of trainer keys.")
    return data


def training_datasets(*inputs: DatasetHandle | None) -> list[DatasetHandle]:
    """Train LoRA's connected datasets in input order; the same dataset connected twice is refused."""
    names = ["dataset", *(f"dataset_{n}" for n in EXTRA_DATASET_INPUTS)]
    chosen: dict[str, str] = {}
    datasets = []
    for name, handle in zip(names, inputs):
        if handle is None:
            continue
        if handle.manifest in chosen:
            raise ValueError(f"Train LoRA: {name} is the same dataset as {chosen[handle.manifest]} ({handle.manifest}); "
                             "connect each dataset once (raise its repeats in Build Dataset to weight it more).")
        chosen[handle.manifest] = name
        datasets.append(handle)
    return datasets


def run_identity(*, model, datasets: list[DatasetHandle], settings: dict[str, Any], num_processes: int) -> str:
    """Hash of everything that changes the trained LoRA: same identity means the same run folder."""
    payload = {
        "model": model.folder.identity(),
        "precision": model.precision,
        # One dataset hashes as before, so runs trained before several datasets existed are still reused.
        "dataset": datasets[0].fingerprint if len(datasets) == 1 else [d.fingerprint for d in datasets],
        "settings": settings,
        "num_processes": num_processes,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def finished_run(run_dir: Path) -> dict[str, Any] | None:
    """The 'end' event of a run folder whose LoRA file exists, else None."""
    from ..trainer.events import EVENTS_FILE, read_events

    events_path = run_dir / EVENTS_FILE
    if not events_path.is_file():
        return None
    events = read_events(events_path)
    ends = [e for e in events if e.get("event") == "end"]
    if not ends:
        return None
    end = ends[-1]
    lora = Path(str(end.get("lora_path", "")))
    if not lora.is_absolute():
        lora = run_dir / lora
    # The file named by an events file is loaded: it must be a LoRA inside this run folder.
    if lora.suffix != ".safetensors" or not lora.is_file() or not lora.resolve().is_relative_to(run_dir.resolve()):
        return None
    # Only the events of the last attempt that ended: earlier cancelled attempts are part of the curve.
    return {"end": end, "lora": str(lora), "events": events}


def check_memory(config, *, num_processes: int, launch: str) -> str:
    """The estimated peak GPU memory per process, as text; refuses a run that cannot fit this machine's GPU."""
    from ..trainer.memory import accelerator_memory_gb, estimate_for_config

    estimate = estimate_for_config(config, world_size=num_processes)
    log.info("Train LoRA: %s", estimate.summary())
    available = accelerator_memory_gb()
    if launch == "run" and available is not None and not estimate.fits(available):
        raise ValueError(
            f"Train LoRA: {estimate.summary()}, more than this GPU's {available:.0f} GB. Turn on "
            "gradient_checkpointing, set base_model_precision int8-quanto/int4-quanto (distributed ddp or none), "
            "enable_group_offload, lower the resolution or train_batch_size, or use more GPUs with fsdp2."
        )
    return estimate.summary()


def _outputs(done: dict[str, Any], run_dir: Path):
    from ..trainer.lora_keys import load_lora_file

    _, metadata, _ = load_lora_file(done["lora"])
    history = _loss_history(done["events"])
    final = history[-1][1] if history else float("nan")
    info = f"run folder: {run_dir}\nLoRA: {done['lora']}\nsteps: {done['end'].get('step')}  final loss: {final:.5f}"
    estimate = run_dir / "memory_estimate.txt"
    if estimate.is_file():
        info += "\n" + estimate.read_text(encoding="utf-8").strip()
    return {"ui": {"text": [info]}, "result": (TrainedLora(path=done["lora"], metadata=dict(metadata)), history, info)}


def export_instructions(*, config_path: Path, num_processes: int) -> str:
    from ..trainer.launch import PACK_ROOT, command_text, torchrun_command

    single = command_text(torchrun_command(config_path=config_path, nproc_per_node=num_processes))
    multi = command_text(torchrun_command(config_path=config_path, nproc_per_node=num_processes, nnodes=2,
                                          node_rank=0, rdzv_endpoint="NODE0_HOST:29500"))
    return (
        f"run.json: {config_path}\n"
        f"One node ({num_processes} processes):\n  {single}\n"
        f"Several nodes (run on each node with its --node_rank; NODE0_HOST is node 0's address):\n  {multi}\n"
        f"Copy the pack folder ({PACK_ROOT.name}), the model and the dataset folders to the same paths on the cluster, "
        "or edit run.json. Afterwards use launch=attach with the run folder."
    )


class Flux2ApplyLora:
    TITLE = "Apply LoRA (FLUX.2)"
    DESCRIPTION = (
        "Adds a FLUX.2 LoRA to a model: to our FLUX2_MODEL for FLUX.2 Sample, and, when a native ComfyUI MODEL is "
        "connected, patches it through ComfyUI's own LoRA loader for native samplers."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("FLUX2_MODEL", "MODEL")
    RETURN_NAMES = ("model", "native_model")
    OUTPUT_TOOLTIPS = (
        "The FLUX.2 model with this LoRA added (the input is not changed).",
        "The native MODEL patched with the LoRA (None when no native model is connected).",
    )
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("FLUX2_MODEL", {"tooltip": "FLUX.2 model from Load FLUX.2 (or a previous Apply LoRA)."}),
                "lora": ("FLUX2_LORA", {"tooltip": "The LoRA from Train LoRA."}),
                "strength": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01, "tooltip": "Multiplier on the LoRA's effect; 0 turns it off."}),
            },
            "optional": {
                "native_model": ("MODEL", {"tooltip": "Optional native ComfyUI FLUX.2 MODEL (UNETLoader) to patch as well."}),
            },
        }

    def apply(self, model, lora: TrainedLora, strength: float, native_model=None):
        from ..trainer.inference import LoraRef
        from ..trainer.lora_keys import load_lora_file

        if not lora.path:
            raise ValueError("Apply LoRA: the LoRA input has no file (Train LoRA ran in export mode); train or attach first.")
        state, metadata, layout = load_lora_file(lora.path)  # refuses foreign or broken files before sampling
        from ..trainer.preflight import check_lora_fits_model

        check_lora_fits_model(lora.path, folder=model.folder)  # modules and shapes vs this model, no weights loaded
        flux2_model = model.with_lora(LoraRef(path=lora.path, strength=float(strength)))
        patched = None
        if native_model is not None:
            import comfy.sd  # type: ignore[import-not-found]

            patched, _ = comfy.sd.load_lora_for_models(native_model, None, state, float(strength), 0.0)
        return (flux2_model, patched)


class Flux2SaveLora:
    TITLE = "Save LoRA (FLUX.2)"
    DESCRIPTION = "Copies the trained LoRA into ComfyUI's models/loras, where LoraLoaderModelOnly finds it. Never overwrites a different file."
    CATEGORY = CATEGORY
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("path",)
    OUTPUT_TOOLTIPS = ("Where the LoRA was saved.",)
    FUNCTION = "save"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "lora": ("FLUX2_LORA", {"tooltip": "The LoRA from Train LoRA."}),
                "filename": ("STRING", {"default": "flux2/my_flux2_lora", "tooltip": "Name under models/loras (one optional subfolder); .safetensors is added."}),
            }
        }

    def save(self, lora: TrainedLora, filename: str):
        from ..trainer.checkpoint import file_sha256

        if not lora.path:
            raise ValueError("Save LoRA: the LoRA input has no file (Train LoRA ran in export mode).")
        parts = [p for p in filename.replace("\\", "/").split("/") if p]
        if not parts or len(parts) > 2:
            raise ValueError(f"filename {filename!r}: give a name, optionally with one subfolder (e.g. flux2/my_lora).")
        clean = [sanitize_name(p.removesuffix(".safetensors"), input_name="filename") for p in parts]
        root = comfy_bridge.model_folder_paths("loras")[0]
        target = root.joinpath(*clean[:-1], clean[-1] + ".safetensors")
        target.parent.mkdir(parents=True, exist_ok=True)
        source = Path(lora.path)
        digest = file_sha256(source)
        candidate, n = target, 1
        while candidate.exists():
            if file_sha256(candidate) == digest:
                return {"ui": {"text": [str(candidate)]}, "result": (str(candidate),)}
            n += 1
            candidate = target.with_name(f"{target.stem}_{n}.safetensors")
        tmp = candidate.with_name(f".{candidate.name}.tmp")
        shutil.copyfile(source, tmp)
        tmp.replace(candidate)
        log.info("Save LoRA: wrote %s", candidate)
        return {"ui": {"text": [str(candidate)]}, "result": (str(candidate),)}


class Flux2LossPlot:
    TITLE = "Loss Plot (FLUX.2)"
    DESCRIPTION = "Draws the training loss (raw and smoothed) against step as an image."
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("plot",)
    OUTPUT_TOOLTIPS = ("The loss curve as an image (1, height, width, 3).",)
    FUNCTION = "plot"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "loss_history": ("FLUX2_LOSS", {"tooltip": "The loss history from Train LoRA."}),
                "width": ("INT", {"default": 768, "min": 256, "max": 4096, "step": 16, "tooltip": "Plot width in pixels."}),
                "height": ("INT", {"default": 384, "min": 128, "max": 4096, "step": 16, "tooltip": "Plot height in pixels."}),
                "smoothing": ("FLOAT", {"default": 0.9, "min": 0.0, "max": 0.999, "step": 0.001, "tooltip": "Exponential moving average factor of the smoothed curve."}),
            }
        }

    def plot(self, loss_history, width: int, height: int, smoothing: float):
        from ..trainer.plot import render_loss_plot

        return (render_loss_plot(loss_history, width=width, height=height, smoothing=smoothing),)


NODE_CLASS_MAPPINGS = {
    "Flux2LoraBuildDataset": Flux2BuildDataset,
    "Flux2LoraTrain": Flux2TrainLora,
    "Flux2LoraApply": Flux2ApplyLora,
    "Flux2LoraSave": Flux2SaveLora,
    "Flux2LoraLossPlot": Flux2LossPlot,
}
