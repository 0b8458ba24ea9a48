"""Train LoRA, Apply LoRA, Save LoRA and Loss Plot (FLUX.2): the training nodes (Build Dataset: dataset_nodes.py).

Train LoRA maps its widgets to a run config and hands it to trainer.run.run_training, which takes the run
lock, writes run.json, starts the trainer (under torchrun for several processes) as its own process group and
follows events.jsonl; the node feeds those events to the progress bar and the browser, and turns Cancel into
stopping the whole group.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..trainer.run import RunResult, finished_run, run_identity, run_training
from . import comfy_bridge
from .dataset_nodes import DatasetHandle, sanitize_name
from .model_nodes import CATEGORY
from .option_nodes import OPTIONS_TYPE, TrainOptions
from .paths import DATASET_ROOTS_ENV, check_inside, dataset_roots, run_roots

log = logging.getLogger("flux2_lora")

RUNS_SUBDIR = Path("flux2_lora") / "runs"
LAUNCH_MODES = ("run", "export", "attach")
EXTRA_DATASET_INPUTS = (2, 3, 4)
"""Train LoRA's optional dataset_2 .. dataset_4 inputs."""


@dataclass(frozen=True, kw_only=True, slots=True)
class TrainedLora:
    """FLUX2_LORA: a LoRA file and what it was trained with."""

    path: str
    metadata: dict[str, Any] = field(default_factory=dict)


def runs_root() -> Path:
    return comfy_bridge.output_directory() / RUNS_SUBDIR


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
                "num_processes": ("INT", {"default": 1, "min": 1, "max": 64, "step": 1, "tooltip": "Processes (GPUs) on this machine. Forked from the warm trainer when it is ready (its imports done, about 10 s after ComfyUI starts); otherwise several start under torchrun and one starts directly."}),
                "distributed": (list(CHOICES["distributed"]), {"default": "auto", "tooltip": "auto: ddp when the memory estimate says the model fits each GPU, fsdp2 when it must be sharded (the choice and its reason are shown before the first step); fsdp2: shard the model across processes (for models that do not fit one GPU); ddp: replicate (faster when it fits); none: one process."}),
                "launch": (list(LAUNCH_MODES), {"default": "run", "tooltip": "run: train here; export: write run.json and print the torchrun command for a cluster; attach: use a run folder trained elsewhere."}),
            },
            "optional": {
                "attach_run_folder": ("STRING", {"default": "", "tooltip": "With launch=attach: the run folder (holding events.jsonl and the LoRA) to pick up."}),
                "extra_config_json": ("STRING", {"multiline": True, "default": "", "tooltip": "Advanced: more trainer keys as a JSON object (SimpleTuner names), e.g. {\"lr_scheduler\": \"cosine\"}."}),
                **{f"dataset_{n}": ("FLUX2_DATASET", {"tooltip": f"Optional dataset {n} from another Build Dataset, trained together with the first: each batch comes from one dataset, each dataset's repeats weight it. All must be built with the same model."})
                   for n in EXTRA_DATASET_INPUTS},
                "options": (OPTIONS_TYPE, {"tooltip": "Optional trainer options from a chain of Memory / Speed / Schedule / Validation Options nodes. A key they set may not also be set by a widget here or by extra_config_json."}),
            },
        }

    def train(self, model, dataset, output_name: str, launch: str = "run", attach_run_folder: str = "",
              extra_config_json: str = "", num_processes: int = 1, dataset_2=None, dataset_3=None, dataset_4=None,
              options: TrainOptions | None = None, **widgets):
        from ..trainer.config import TrainConfig
        from ..trainer.launch import TrainingCancelled

        name = sanitize_name(output_name, input_name="output_name")
        if launch not in LAUNCH_MODES:
            raise ValueError(f"launch {launch!r} is not one of {', '.join(LAUNCH_MODES)}.")
        if launch == "attach":
            return self._attach(attach_run_folder)
        settings = training_settings(widgets, extra_config_json=extra_config_json, options=options)
        datasets = training_datasets(dataset, dataset_2, dataset_3, dataset_4)
        identity = run_identity(model=model, fingerprints=[d.fingerprint for d in datasets], settings=settings,
                                num_processes=num_processes)
        run_dir = runs_root() / f"{name}-{identity[:10]}"
        # Validate everything before anything expensive starts.
        config = TrainConfig.from_dict(run_config(model, datasets=datasets, name=name, run_dir=run_dir,
                                                  settings=settings))
        total = config.schedule.total_steps
        progress = comfy_bridge.Progress(total, label="Train LoRA")

        def on_event(event: dict[str, Any]) -> None:
            if event.get("event") == "step":
                progress.update_absolute(min(int(event.get("step", 0)), total))
            comfy_bridge.send_event(comfy_bridge.PACK_EVENT, {"run": run_dir.name, **event})

        try:
            result = run_training(config, num_processes=num_processes, owner="Train LoRA node",
                                  export=launch == "export", reuse_finished=True, on_event=on_event,
                                  should_cancel=comfy_bridge.interrupted, before_launch=comfy_bridge.free_comfy_memory,
                                  interrupts=(comfy_bridge.interrupt_exception(),))
        except TrainingCancelled as err:
            raise comfy_bridge.interrupt_exception()(f"Train LoRA cancelled; resume by pressing Run again ({run_dir}).") from err
        return _outputs(result)

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
        return _outputs(done)


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
        if key == "logging_dir" and isinstance(value, str) and (Path(value).expanduser().is_absolute()
                                                                or ".." in Path(value).parts):
            # The trackers write there: the node keeps it inside the run folder, as it keeps every other output.
            raise ValueError(f"extra_config_json logging_dir {value!r} must be a folder inside the run folder: a "
                             "relative path without '..'.")
        if key in ("user_prompt_library", "lycoris_config") and isinstance(value, str) and value.strip():
            extra[raw_key] = resolve_input_file(value, input_name=f"extra_config_json {key}")
        if key == "validation_reference_images":
            # One path or a list, as the trainer takes it; anything else is left for TrainConfig to refuse by name.
            name = "extra_config_json validation_reference_images"
            if isinstance(value, str) and value.strip():
                extra[raw_key] = resolve_input_file(value, input_name=name)
            elif isinstance(value, list):
                extra[raw_key] = [resolve_input_file(v, input_name=name) if isinstance(v, str) and v.strip() else v
                                  for v in value]
        if key == "resume_from_checkpoint" and isinstance(value, str) and value.strip() and value != "latest" \
                and not re.fullmatch(r"checkpoint-\d+", value):
            raise ValueError(f"extra_config_json resume_from_checkpoint {value!r}: give 'latest' or a checkpoint-<step> "
                             "name of this run's folder.")


def resolve_input_file(value: str, *, input_name: str) -> str:
    """A file path typed into a node (extra_config_json, an option node), absolute and inside the dataset roots;
    relative = in ComfyUI's input folder."""
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


def training_settings(widgets: dict[str, Any], *, extra_config_json: str,
                      options: TrainOptions | None = None) -> dict[str, Any]:
    """The trainer keys of Train LoRA's widgets, its option nodes and extra_config_json (which wins over the
    widgets), checked for paths. A key the options set may be set nowhere else: that is refused, naming both."""
    extra = _parse_extra(extra_config_json)
    check_extra_paths(extra)
    settings = dict(widgets)
    if not settings.get("validation_prompt", "").strip():
        settings["validation_prompt"] = None
    if options is not None:
        from ..trainer.config import ALIASES

        options.check_unset({**{key: f"Train LoRA's {key} widget" for key in widgets},
                             **{ALIASES.get(str(k).removeprefix("--"), str(k).removeprefix("--")): "extra_config_json"
                                for k in extra}})
        settings.update(options.settings())
    settings.update(extra)
    return settings


def training_datasets(*inputs: DatasetHandle | None) -> list[DatasetHandle]:
    """Train LoRA's connected datasets in input order; the same dataset connected twice, or datasets the trainer
    cannot merge (built with another VAE or text encoder), are refused here, before anything launches."""
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
    if len(datasets) > 1:
        from ..trainer.manifest import load_manifest
        from ..trainer.merge import check_mergeable

        check_mergeable([load_manifest(d.manifest) for d in datasets])
    return datasets


def run_config(model, *, datasets: list[DatasetHandle], name: str, run_dir: Path,
               settings: dict[str, Any]) -> dict[str, Any]:
    """The run.json keys of a Train LoRA run: model and datasets from their nodes, the run folder, the settings."""
    config = {
        "model_type": "lora",
        "model_family": "flux2",
        "model_flavour": model.folder.flavour,  # what Load FLUX.2 found; the config says whether it trains
        "pretrained_model_name_or_path": str(model.folder.root),
        "output_dir": str(run_dir),
        "dataset_manifest": datasets[0].manifest if len(datasets) == 1 else [d.manifest for d in datasets],
        "resume_from_checkpoint": "latest",
        "output_name": name,
        **settings,
    }
    if model.folder.transformer_file is not None:
        config["pretrained_transformer_model_name_or_path"] = str(model.folder.transformer_file)
    if model.quantization is not None:  # validation prompts are encoded as Load FLUX.2 says
        precision = model.quantization.text_encoder_precision
        if settings.get("text_encoder_1_precision", precision) != precision:
            raise ValueError(f"Train LoRA: extra_config_json sets text_encoder_1_precision "
                             f"{settings['text_encoder_1_precision']!r} but Load FLUX.2's text_encoder_precision is "
                             f"{precision!r}; set it in one place.")
        config["text_encoder_1_precision"] = precision
    return config


def _outputs(result: RunResult):
    from safetensors import safe_open

    from .comfy_keycheck import check_lora_keys

    metadata: dict[str, str] = {}
    info = result.info
    if result.lora_path:  # export mode: nothing trained yet
        # The header only: a file whose keys ComfyUI would drop is reported here (and refused by Save LoRA), not
        # refused as a training result; Apply LoRA parses every key before it samples.
        with safe_open(result.lora_path, framework="pt", device="cpu") as handle:
            metadata = dict(handle.metadata() or {})
        check = check_lora_keys(result.lora_path)
        if check.ran and not check.ok:
            log.warning("Train LoRA: %s", check.line())
        info += "\n" + check.line()
    lora = TrainedLora(path=result.lora_path, metadata=metadata)
    return {"ui": {"text": [info]}, "result": (lora, result.loss_history, info)}


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
        from ..trainer.lokr_keys import load_adapter_file

        if not lora.path:
            raise ValueError("Apply LoRA: the LoRA input has no file (Train LoRA ran in export mode); train or attach first.")
        state = load_adapter_file(lora.path)[0]  # a LoRA or LoKr; refuses foreign or broken files before sampling
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
    DESCRIPTION = ("Copies the trained LoRA into ComfyUI's models/loras, where LoraLoaderModelOnly finds it. Never overwrites "
                   "a different file. Inside ComfyUI it first loads the file through ComfyUI's own LoRA loader and refuses "
                   "to copy one that would lose keys, naming each.")
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
        from .comfy_keycheck import check_lora_keys

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
        check = check_lora_keys(source)
        if check.ran and not check.ok:
            raise ValueError(
                f"Save LoRA: {source} would lose keys in ComfyUI, so nothing was copied to {target.parent}. "
                f"{check.line()} Keys ComfyUI drops do nothing: retrain with this pack's current version (it writes "
                "ComfyUI/BFL keys), or convert a diffusers-layout file with `python -m trainer convert-lora SRC DST "
                "--to comfyui`.")
        digest = file_sha256(source)
        candidate, n = target, 1
        while candidate.exists():
            if file_sha256(candidate) == digest:
                return {"ui": {"text": [str(candidate), check.line()]}, "result": (str(candidate),)}
            n += 1
            candidate = target.with_name(f"{target.stem}_{n}.safetensors")
        tmp = candidate.with_name(f".{candidate.name}.tmp")
        shutil.copyfile(source, tmp)
        tmp.replace(candidate)
        log.info("Save LoRA: wrote %s; %s", candidate, check.line())
        return {"ui": {"text": [str(candidate), check.line()]}, "result": (str(candidate),)}


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
    "Flux2LoraTrain": Flux2TrainLora,
    "Flux2LoraApply": Flux2ApplyLora,
    "Flux2LoraSave": Flux2SaveLora,
    "Flux2LoraLossPlot": Flux2LossPlot,
}
