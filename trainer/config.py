"""The training run's settings: typed, frozen sub-configs, one per concept, read from SimpleTuner's flat keys.

The file format is one flat JSON object whose keys follow SimpleTuner's FLUX.2 quickstart. Each key is
declared once, on the field of the sub-config that owns it (`setting("lora_rank", 16, ge=1)` with its type,
range, default and the docstring under it); `KEYS` maps every flat key to that field. A SimpleTuner user can
bring a config.json: keys may carry SimpleTuner's leading "--", numbers and booleans may be JSON strings
("1e-4", "true") as SimpleTuner's argparse accepts them, and its current names are aliases
(trainer/simpletuner_keys.py). An unknown key, a SimpleTuner option this trainer does not implement, a wrong
type or a bad value raises ValueError naming the flat key.

Functions take only the sub-config they need: `config.model`, `config.data`, `config.lora`, `config.optim`,
`config.schedule`, `config.objective` (with `.guidance`), `config.memory`, `config.parallelism`,
`config.checkpoint`, `config.validation`, `config.quantization`, `config.offload`, `config.trackers`,
`config.tread`. A rule that spans settings is written once, as a method of the sub-config that owns it
(QuantizationConfig.check_compatible, OffloadConfig.check_compatible); the config calls it when it is read and
model.build_model again when it knows the process count and device.

ComfyUI imports it at start-up for the combo lists: it imports nothing heavier than trainer/flux2.py (torch,
which ComfyUI has loaded already).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .checkpointing import SelectiveCheckpointConfig
from .compile_blocks import CompileConfig
from .flavours import check_config_flavour, check_flavour_settings
from .flux2 import PIXELS_PER_TOKEN, check_reference_image
from .lokr import LycorisSpec, lycoris_settings
from .lowp_compute import LowpCompute, check_compatible as check_lowp_compute
from .prompt_library import read_prompt_library
from .settings import (PATHS, Setting, as_paths, check_fields, check_file, closest, convert, expected, field_setting, literal_choices, setting,
                       to_json_value)
from .ema import EmaConfig
from .noise_offset import NoiseOffsetConfig
from .optimizers import OptimizerConfig, ScheduleConfig
from .scheduled_sampling import ScheduledSamplingConfig
from .trackers import TrackerConfig
from .tread import TreadConfig, TreadRoute
from .simpletuner_keys import ALIASES, UNSUPPORTED_KEYS, choice_hint, translate_simpletuner_keys, unknown_key_message

log = logging.getLogger(__name__)

__all__ = ["ALIASES", "CHOICES", "KEYS", "KNOWN_KEYS", "UNSUPPORTED_KEYS", "CheckpointConfig", "DataConfig",
           "GuidanceConfig", "LoraConfig", "MemoryConfig", "ModelConfig", "ObjectiveConfig", "OffloadConfig",
           "OptimizerConfig", "ParallelismConfig", "QuantizationConfig", "ScheduleConfig", "TrainConfig", "TreadConfig",
           "TreadRoute", "ValidationConfig", "parse_resolution"]

SEED_MAX = 2**31 - 1  # SimpleTuner's bound: seeds must fit a signed 32-bit integer.
SUBJECT_PLACEHOLDER = "<subject>"
MAX_VALIDATION_SIDE = 8192  # the FLUX.2 Sample node's limit too

QuantPrecision = Literal["no_change", "int8-quanto", "int4-quanto"]
BasePrecision = Literal[QuantPrecision, LowpCompute]  # quanto weights, or torchao compute (trainer/lowp_compute.py)
ReferenceTimestep = Literal["shared", "zero"]


# ---------------------------------------------------------------------------------------------------
# Sub-configs: each owns its settings, their checks and the rules that start from it
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelConfig:
    """Which FLUX.2 is trained and where its weights are (the arguments of model_files.inspect_model_folder)."""

    model_type: Literal["lora"] = setting("model_type", "lora")
    """What is trained. Only "lora" (SimpleTuner's "full" fine-tuning is not supported)."""
    family: Literal["flux2"] = setting("model_family", "flux2")
    """Model architecture. Only "flux2"."""
    flavour: Literal["dev", "klein-4b", "klein-9b"] = setting("model_flavour", "dev")
    """FLUX.2 variant (trainer/flavours.py). "dev": FLUX.2-dev (Mistral-Small-3.1 text encoder, guidance
    embedding, 8 double + 48 single blocks). "klein-4b" / "klein-9b": FLUX.2 [klein] base (or distilled) 4B /
    9B (Qwen3 text encoder, no guidance embedding). The folder must hold this flavour (a mismatch names both).
    SimpleTuner defaults to "klein-9b"; this trainer to "dev"."""
    root: Path = setting("pretrained_model_name_or_path")
    """Local diffusers-layout FLUX.2 folder (model_index.json, transformer/, vae/, text_encoder/,
    tokenizer/, scheduler/). Required. Weights are never downloaded, so a hub id is refused."""
    transformer_file: Path | None = setting("pretrained_transformer_model_name_or_path", None, empty_means_null=True)
    """Optional single-file transformer (.safetensors, e.g. from ComfyUI's models/diffusion_models) that
    replaces the folder's transformer/ weights. Unlike SimpleTuner, a local file only."""
    vae_file: Path | None = setting("pretrained_vae_model_name_or_path", None, empty_means_null=True)
    """Optional single-file VAE (.safetensors) that replaces the folder's vae/ weights. A local file only."""

    def __post_init__(self) -> None:
        check_fields(self)
        value = str(self.root)
        if not value.strip() or not self.root.exists():
            raise ValueError(
                f"pretrained_model_name_or_path {value!r} is not an existing local folder. This trainer cannot "
                "download weights: give the path of the local diffusers FLUX.2 folder (model_index.json, "
                "transformer/, vae/, text_encoder/, tokenizer/, scheduler/)."
            )
        if not self.root.is_dir():
            raise ValueError(
                f"pretrained_model_name_or_path {value!r} is a file; give the diffusers FLUX.2 folder, and a "
                "single-file transformer as pretrained_transformer_model_name_or_path."
            )
        for key, path in (("pretrained_transformer_model_name_or_path", self.transformer_file),
                          ("pretrained_vae_model_name_or_path", self.vae_file)):
            check_file(key, path, what="a local single-file .safetensors", suffix=".safetensors")
        check_config_flavour(self.root, self.flavour)


@dataclass(frozen=True, kw_only=True, slots=True)
class DataConfig:
    """What is trained on, and how many samples make a step."""

    dataset_manifest: PATHS = setting("dataset_manifest", None)
    """Manifest written by Build Dataset (`python -m trainer build-dataset`): images, captions and their
    latent / text-embedding caches; or a list of manifests to train on several datasets at once (their
    batches are interleaved, each batch from one dataset). Give this or data_backend_config."""
    data_backend_config: Path | None = setting("data_backend_config", None)
    """SimpleTuner's multidatabackend.json (a list of datasets). Give this or dataset_manifest."""
    vae_batch_size: int = setting("vae_batch_size", 4, ge=1)
    """Images per VAE encode while caching latents. >= 1."""
    train_batch_size: int = setting("train_batch_size", 1, ge=1)
    """Images per micro-batch on each process. >= 1."""
    gradient_accumulation_steps: int = setting("gradient_accumulation_steps", 1, ge=1)
    """Micro-batches whose gradients are summed before each optimizer step. >= 1."""

    def __post_init__(self) -> None:
        check_fields(self)
        for manifest in self.dataset_manifests:
            check_file("dataset_manifest", manifest, what="the manifest written by Build Dataset")
        check_file("data_backend_config", self.data_backend_config, what="a multidatabackend.json file")
        if not self.dataset_manifests and self.data_backend_config is None:
            raise ValueError("dataset_manifest or data_backend_config is required: give the dataset to train on.")
        if self.dataset_manifests and self.data_backend_config is not None:
            raise ValueError("dataset_manifest and data_backend_config are both set; give one dataset source.")

    @property
    def dataset_manifests(self) -> tuple[Path, ...]:
        """dataset_manifest as paths: one per dataset, () with data_backend_config."""
        return as_paths(self.dataset_manifest)


@dataclass(frozen=True, kw_only=True, slots=True)
class LoraConfig:
    """The adapter's shape: saved with the LoRA file (the other settings affect only this run)."""

    rank: int = setting("lora_rank", 16, ge=1)
    """LoRA rank (width of the A/B matrices). >= 1."""
    alpha: float | None = setting("lora_alpha", None, gt=0, fix="use null for alpha = lora_rank")
    """LoRA alpha; the update is scaled by alpha / rank. > 0; null means equal to lora_rank (the config then
    holds the rank here)."""
    dropout: float = setting("lora_dropout", 0.1, ge=0, lt=1)
    """Dropout on the LoRA branch's input during training. In [0, 1)."""
    init: Literal["default", "gaussian"] = setting("lora_init_type", "default")
    """Initialisation of LoRA A (B starts at zero either way): "default" is PEFT's Kaiming-uniform,
    "gaussian" draws A from N(0, 1/rank)."""
    target: Literal["all", "attention", "mlp", "tiny"] = setting("flux_lora_target", "all")
    """Layers that get adapters, in double and single blocks: "all" (every attention and MLP linear),
    "attention" (q/k/v and output projections), "mlp" (feed-forward only), "tiny" (q/k/v only)."""
    lora_type: Literal["standard", "lycoris"] = setting("lora_type", "standard")
    """"standard": the LoRA above. "lycoris": a LyCORIS LoKr described by lycoris_config (trainer/lokr.py)."""
    lycoris_config: Path | None = setting("lycoris_config", None, empty_means_null=True)
    """SimpleTuner's LyCORIS JSON ({"algo": "lokr", "linear_dim": ..., "linear_alpha": ..., "factor": ...,
    "apply_preset": ...}), read and checked with the config; required with lora_type "lycoris"."""
    init_lokr_norm: float | None = setting("init_lokr_norm", None, gt=0)
    """LoKr: start from w1 = 1 and w2 drawn with the base weight's mean and std, times this (SimpleTuner's
    perturbed-normal init; the model changes at step 0). null: LyCORIS's init (w2 = 0)."""
    lycoris: LycorisSpec | None = dataclasses.field(default=None, init=False, compare=False)
    """lycoris_config as read (None for lora_type "standard")."""

    def __post_init__(self) -> None:
        check_fields(self)
        object.__setattr__(self, "lycoris", lycoris_settings(self))  # before alpha: it warns on a given lora_alpha
        if self.alpha is None:  # resolved once: every user of the adapter reads a number
            object.__setattr__(self, "alpha", float(self.rank))


@dataclass(frozen=True, kw_only=True, slots=True)
class GuidanceConfig:
    """The guidance value fed to FLUX.2-dev's guidance embedding in training."""

    mode: Literal["constant", "random-range"] = setting("flux_guidance_mode", "constant")
    """Guidance value fed to FLUX.2-dev's guidance embedding while training: "constant" uses
    flux_guidance_value; "random-range" draws uniformly from [flux_guidance_min, flux_guidance_max] per sample."""
    value: float = setting("flux_guidance_value", 1.0, ge=0.0)
    """Guidance for "constant" mode. >= 0. 1.0 keeps the guidance distillation intact; use 3-5 at inference."""
    minimum: float = setting("flux_guidance_min", 0.0, ge=0.0)
    """Lower bound for "random-range" mode. >= 0 and <= flux_guidance_max."""
    maximum: float = setting("flux_guidance_max", 4.0, ge=0.0)
    """Upper bound for "random-range" mode. >= flux_guidance_min."""

    def __post_init__(self) -> None:
        check_fields(self)
        if self.minimum > self.maximum:
            raise ValueError(f"flux_guidance_min {self.minimum} is above flux_guidance_max {self.maximum}; "
                             "the random-range draws from [min, max].")


@dataclass(frozen=True, kw_only=True, slots=True)
class ObjectiveConfig:
    """The flow-matching objective (trainer/objective.py)."""

    shift: float = setting("flow_schedule_shift", 3.0, gt=0, fix="1.0 means no shift")
    """Timestep shift: s -> shift*s / (1 + (shift-1)*s) after s ~ sigmoid(N(0, 1)). > 0; 1 = no shift;
    higher values train more at high noise (composition)."""
    auto_shift: bool = setting("flow_schedule_auto_shift", False)
    """Use a resolution-dependent shift computed from each batch's image-token count instead of
    flow_schedule_shift (the empirical mu of FLUX.2's sampler)."""
    guidance: GuidanceConfig = dataclasses.field(default_factory=GuidanceConfig)
    caption_dropout_probability: float = setting("caption_dropout_probability", 0.0, ge=0, le=1)
    """Chance per sample of training on the empty prompt's real encoding instead of the caption. In [0, 1]."""
    noise_offset: NoiseOffsetConfig = dataclasses.field(default_factory=NoiseOffsetConfig)
    scheduled_sampling: ScheduledSamplingConfig = dataclasses.field(default_factory=ScheduledSamplingConfig)
    reference_timestep: ReferenceTimestep = setting("reference_timestep", "shared")
    """Edit/reference LoRAs (not a SimpleTuner key): the timestep that modulates the reference-image tokens.
    "shared" gives them the sample's timestep, as Flux2Pipeline and ComfyUI do when they sample FLUX.2-dev
    with reference images, so the LoRA trains under the conditions it is used in; the default. "zero"
    modulates them as at timestep 0 (clean images; the guidance embedding unchanged), as SimpleTuner trains
    FLUX.2; validation images then use it too. Has no effect on a dataset without references."""

    def __post_init__(self) -> None:
        if self.reference_timestep not in typing.get_args(ReferenceTimestep):
            raise ValueError(f"reference_timestep {self.reference_timestep!r} must be one of "
                             f"{list(typing.get_args(ReferenceTimestep))}: 'shared' gives reference tokens the "
                             "sample's timestep, 'zero' modulates them as at timestep 0.")
        check_fields(self)


@dataclass(frozen=True, kw_only=True, slots=True)
class MemoryConfig:
    mixed_precision: Literal["bf16", "fp16", "no"] = setting("mixed_precision", "bf16")
    """Compute precision of the frozen base: "bf16", "fp16", or "no" (fp32, for CPU tests). LoRA weights stay fp32."""
    gradient_checkpointing: bool = setting("gradient_checkpointing", True)
    """Recompute block activations in backward: much less memory, about 30% slower."""
    gradient_checkpointing_interval: int | None = setting("gradient_checkpointing_interval", None, ge=1,
                                                          fix="use null to checkpoint every block")
    """Checkpoint every N-th block (blocks 0, N, 2N, ... over double then single blocks), as SimpleTuner does;
    the others keep their activations: faster, more memory. >= 1, or null for every block."""
    checkpointing: SelectiveCheckpointConfig = dataclasses.field(default_factory=SelectiveCheckpointConfig)
    compile: CompileConfig = dataclasses.field(default_factory=CompileConfig)

    def __post_init__(self) -> None:
        check_fields(self)

    @property
    def checkpoint_every(self) -> int | None:
        """Checkpoint every this many blocks, or None for no checkpointing (blocks.apply_block_forward)."""
        return (self.gradient_checkpointing_interval or 1) if self.gradient_checkpointing else None


@dataclass(frozen=True, kw_only=True, slots=True)
class ParallelismConfig:
    distributed: Literal["auto", "fsdp2", "ddp", "none"] = setting("distributed", "auto")
    """How torchrun's processes share the model: "auto" picks ddp when the memory model says the model fits each
    GPU and fsdp2 when it must be sharded (trainer/distributed_choice.py; printed with the reason), "fsdp2" shards
    each block (for models that do not fit one GPU), "ddp" replicates it (faster when it fits), "none" runs one
    process. torchrun decides the process count; with one process fsdp2 and ddp run unwrapped."""
    collective_timeout_s: float = setting("collective_timeout_s", 600.0, gt=0, fix="600 is the default")
    """Seconds a process waits in a collective (all-reduce, barrier) for the others before the run fails:
    a crashed or hung process then ends the run with an error instead of hanging it. > 0. Raise it when
    rank 0 alone does long work (a first text-encoder load from a slow disk) while the others wait."""

    def __post_init__(self) -> None:
        check_fields(self)

    def shards(self, world_size: int) -> bool:
        """Whether FSDP2 shards the weights over this many processes."""
        return self.distributed == "fsdp2" and world_size > 1

    def replicates(self, world_size: int) -> bool:
        """Whether DDP replicates the model (ddp, or fsdp2 never: it shards) over this many processes."""
        return self.distributed == "ddp" and world_size > 1


@dataclass(frozen=True, kw_only=True, slots=True)
class CheckpointConfig:
    """Where the run writes, and its resumable checkpoints."""

    output_dir: Path = setting("output_dir")
    """Folder for checkpoints, the LoRA file, validation images and events.jsonl. Required."""
    every_steps: int = setting("checkpointing_steps", 500, ge=1)
    """Save a resumable checkpoint-<step> folder every this many steps (SimpleTuner: checkpoint_step_interval). >= 1."""
    total_limit: int | None = setting("checkpoints_total_limit", 5, ge=1,
                                      fix="use null to keep every checkpoint (SimpleTuner's 0)")
    """Keep at most this many checkpoints, deleting the oldest. >= 1, or null to keep all (SimpleTuner's 0)."""
    resume_from: str | None = setting("resume_from_checkpoint", None, empty_means_null=True)
    """null: start fresh; "latest": resume from the newest checkpoint in output_dir, or start fresh when
    there is none; otherwise a checkpoint folder, as a path or a checkpoint-<step> name inside output_dir."""
    output_name: str = setting("output_name", "lora")
    """Name of the LoRA file written to output_dir (<output_name>.safetensors): letters, digits, - and _."""

    def __post_init__(self) -> None:
        check_fields(self)  # a blank output_dir is refused there: "output_dir is empty"
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", self.output_name):
            raise ValueError(f"output_name {self.output_name!r} may hold only letters, digits, - and _ (and not start with - or _).")
        if self.resume_from is not None and self.resume_from != "latest":
            self._check_resume_path()

    def _check_resume_path(self) -> None:
        value = self.resume_from
        assert value is not None
        path = Path(value).expanduser()
        if not path.is_absolute() and re.fullmatch(r"checkpoint-\d+", value):
            path = self.output_dir / value
        if not path.is_dir():
            raise ValueError(
                f"resume_from_checkpoint {value!r}: no checkpoint folder at {path}; use null to start fresh, "
                "'latest' for the newest checkpoint in output_dir, or an existing checkpoint-<step> folder."
            )


@dataclass(frozen=True, kw_only=True, slots=True)
class ValidationConfig:
    """Images rendered with the LoRA during training."""

    prompt: str | None = setting("validation_prompt", None, empty_means_null=True)
    """Prompt rendered with the LoRA during training. null (or empty) and no user_prompt_library: no validation.
    May contain <subject>."""
    prompt_library: Path | None = setting("user_prompt_library", None, empty_means_null=True)
    """JSON file of {name: prompt} rendered at each validation, besides validation_prompt. Prompts may
    contain <subject>."""
    subject: str | None = setting("validation_subject", None, empty_means_null=True)
    """Replaces <subject> in validation_prompt and user_prompt_library prompts (not a SimpleTuner key). Unset,
    <subject> stays in the prompts as written, as SimpleTuner sends it (with a warning)."""
    every_steps: int = setting("validation_steps", 100, ge=0)
    """Render validation images every this many steps and after the last step; 0: only after the last
    step (SimpleTuner: validation_step_interval). >= 0."""
    resolution: str = setting("validation_resolution", "1024", number_as_text=True)
    """Validation image size: "1024" (square) or "WIDTHxHEIGHT" ("1024x768"), multiples of 16."""
    num_inference_steps: int = setting("validation_num_inference_steps", 20, ge=1)
    """Euler sampling steps for validation images. >= 1."""
    guidance: float = setting("validation_guidance", 4.0, gt=0)
    """Guidance for validation images: dev's guidance embedding value; klein base's classifier-free guidance scale
    (negative prompt "", as Flux2KleinPipeline; <= 1 turns CFG off); unused on a distilled klein. > 0."""
    num_images: int = setting("num_validation_images", 1, ge=1, le=16)
    """Images per prompt at each validation, image k with seed validation_seed + k. In [1, 16]."""
    seed: int | None = setting("validation_seed", None, ge=0, le=SEED_MAX)
    """Seed for validation noise (the same images every time); null uses seed (the config then holds the
    training seed here). In [0, 2**31 - 1]."""
    reference_image_files: PATHS = setting("validation_reference_images", None)
    """Edit/reference LoRAs (not a SimpleTuner key): an image file, or a list of them, given to every validation
    prompt as FLUX.2 reference images (image k at time position 10 + 10k), prepared as Flux2Pipeline prepares
    `image=` (shrunk to about 1024x1024 pixels when larger, centre-cropped to multiples of 16), encoded once at
    run start and modulated with reference_timestep. null: validation renders without references."""
    width: int = dataclasses.field(init=False, default=0)
    """Derived from resolution once, when the config is built."""
    height: int = dataclasses.field(init=False, default=0)
    """Derived from resolution once, when the config is built."""

    def __post_init__(self) -> None:
        check_fields(self)
        for key, value in (("validation_prompt", self.prompt), ("validation_subject", self.subject)):
            if value is not None and not value.strip():
                raise ValueError(f"{key} is blank; use null for none.")
        width, height = parse_resolution(self.resolution, key="validation_resolution")
        object.__setattr__(self, "width", width)
        object.__setattr__(self, "height", height)
        check_file("user_prompt_library", self.prompt_library, what="a JSON file of {name: prompt}")
        for image in self.reference_images:
            check_file("validation_reference_images", image, what="an image file (PNG, JPEG, WebP)")
            check_reference_image(image, input_name=f"validation_reference_images {str(image)!r}")
        if self.enabled:
            self.prompts()  # reads the library now so a bad file fails before training

    @property
    def enabled(self) -> bool:
        return self.prompt is not None or self.prompt_library is not None

    @property
    def reference_images(self) -> tuple[Path, ...]:
        """validation_reference_images as paths, in the order that sets each one's time position; () for none."""
        return as_paths(self.reference_image_files)

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of validation images."""
        return self.width, self.height

    def prompts(self) -> dict[str, str]:
        """Name -> prompt for each validation image, with <subject> replaced by validation_subject.

        validation_prompt comes first under the name "validation_prompt", then user_prompt_library in file order.
        """
        prompts = self.raw_prompts()
        if self.subject is None:  # sent as written, as SimpleTuner does (TrainConfig warns)
            return prompts
        return {name: p.replace(SUBJECT_PLACEHOLDER, self.subject) for name, p in prompts.items()}

    def raw_prompts(self) -> dict[str, str]:
        """The prompts as written, <subject> not yet replaced."""
        prompts: dict[str, str] = {}
        if self.prompt is not None:
            prompts["validation_prompt"] = self.prompt
        if self.prompt_library is not None:
            library = read_prompt_library(self.prompt_library)
            clash = set(library) & set(prompts)
            if clash:
                raise ValueError(f"user_prompt_library uses the reserved name(s) {sorted(clash)}; rename those entries.")
            prompts.update(library)
        return prompts


@dataclass(frozen=True, kw_only=True, slots=True)
class QuantizationConfig:
    """Quantization (optimum-quanto) or low-precision compute (torchao) of the frozen transformer; text encoder's."""

    base_model_precision: BasePrecision = setting("base_model_precision", "no_change")
    """The frozen transformer's block Linears: "no_change"; optimum-quanto weights "int8-quanto", "int4-quanto"; or
    torchao compute on a CUDA GPU (pip install torchao): "fp8-torchao" (float8 matmuls, compute capability >= 8.9,
    weights stay bf16), "int8-torchao" (int8 weights x dynamic int8 activations, >= 8.0). None combines with group
    offload; int8/int4 not with "fsdp2" over several processes (use "ddp"; one process runs fsdp2 as "none")."""
    text_encoder_precision: QuantPrecision = setting("text_encoder_1_precision", "no_change")
    """Weight quantization of the Mistral text encoder while it caches embeddings, same choices."""
    base_model_default_dtype: Literal["bf16", "fp32"] = setting("base_model_default_dtype", "bf16")
    """dtype of the transformer weights that quantization leaves unquantized (norms, embeddings). Unset in a config
    file it follows mixed_precision: "fp32" with "no", else "bf16"."""
    quantize_via: Literal["cpu", "accelerator"] = setting("quantize_via", "accelerator")
    """Where weights are quantized: "cpu" (slower, for GPUs that cannot hold the unquantized model) or
    "accelerator" (the training GPU)."""

    def __post_init__(self) -> None:
        check_fields(self)

    @property
    def base_quantized(self) -> bool:
        """The block weights are stored quantized (quanto int8/int4, int8-torchao); fp8-torchao keeps them."""
        return self.base_model_precision not in ("no_change", "fp8-torchao")

    def text_cache_tag(self, precision: str) -> str:
        """The precision recorded in text-cache keys: a quantized encoder gives other embeddings."""
        return precision if self.text_encoder_precision == "no_change" else f"{precision}+{self.text_encoder_precision}"

    def check_compatible(self, *, mixed_precision: str, distributed: str, world_size: int | None,
                         offload: OffloadConfig) -> None:
        """Refuse quantization with what cannot carry quanto's weights. world_size None: not known yet (the
        config is being read); the process-count rule is then asked again at launch and at start-up."""
        precision = self.base_model_precision
        check_lowp_compute(precision, distributed=distributed, world_size=world_size, group_offload=offload.enabled)
        if self.base_quantized:
            if distributed == "fsdp2" and world_size is not None and world_size > 1:
                raise ValueError(
                    f"base_model_precision {precision!r} cannot be combined with distributed 'fsdp2' over "
                    f"{world_size} processes: fully_shard turns quanto's int8/int4 weights back into full-precision "
                    "shards. To train it on several GPUs set distributed to 'ddp' (each GPU holds the quantized "
                    "model), or base_model_precision to 'no_change'."
                )
            if offload.enabled:
                raise ValueError(
                    f"base_model_precision {precision!r} cannot be combined with enable_group_offload: group offload "
                    "hooks cannot move quanto's quantized weights (enable_group_offload cannot be combined with a "
                    "quantized base_model_precision); disable one of them."
                )
            if mixed_precision == "no" and self.base_model_default_dtype == "bf16":
                raise ValueError(
                    "base_model_default_dtype 'bf16' with mixed_precision 'no': the unquantized layers would hold bf16 "
                    "weights while the model computes in fp32 without autocast. Set base_model_default_dtype to "
                    "'fp32' (or mixed_precision to 'bf16')."
                )
        self.check_text_encoder(offload=offload)

    def check_text_encoder(self, *, offload: OffloadConfig) -> None:
        """Refuse a quantized text encoder that would also be group-offloaded (while caching embeddings)."""
        if self.text_encoder_precision != "no_change" and offload.offloads_text_encoder:
            raise ValueError(
                f"text_encoder_1_precision {self.text_encoder_precision!r} cannot be combined with "
                "group_offload_text_encoder (diffusers' offload hooks cannot move quanto's quantized weights); "
                "disable one of them."
            )


@dataclass(frozen=True, kw_only=True, slots=True)
class OffloadConfig:
    """diffusers group offloading (hooks), plus where the encoders wait during start-up."""

    enabled: bool = setting("enable_group_offload", False)
    """Keep the transformer's blocks in CPU memory and move them to the GPU group by group (diffusers
    group offloading), in forward and backward."""
    offload_type: Literal["block_level", "leaf_level"] = setting("group_offload_type", "block_level")
    """Offload granularity: "block_level" (groups of blocks, faster) or "leaf_level" (each layer, least memory)."""
    blocks_per_group: int = setting("group_offload_blocks_per_group", 1, ge=1)
    """Blocks moved together with block_level offload; more is faster but uses more memory. >= 1."""
    use_stream: bool = setting("group_offload_use_stream", False)
    """Overlap transfers with compute on a CUDA stream (CUDA only)."""
    text_encoder: bool = setting("group_offload_text_encoder", False)
    """Also group-offload the text encoder while it caches embeddings."""
    vae: bool = setting("group_offload_vae", False)
    """Also group-offload the VAE while it caches latents."""
    during_startup: bool = setting("offload_during_startup", False)
    """Models loaded at start-up wait in CPU memory while not in use. SimpleTuner's meaning (the text encoder off
    the GPU while the VAE caches latents) always holds here: each encoder is released before the next loads.
    What this adds: the VAE that decodes validation images waits in CPU memory between validations."""

    def __post_init__(self) -> None:
        check_fields(self)

    @property
    def offloads_text_encoder(self) -> bool:
        """group_offload_text_encoder takes effect (it is an "also" of enable_group_offload)."""
        return self.enabled and self.text_encoder

    @property
    def offloads_vae(self) -> bool:
        return self.enabled and self.vae

    def check_stream(self, *, device: Any) -> None:
        """CUDA streams need a CUDA device: refuse them before anything loads elsewhere."""
        if self.enabled or self.text_encoder or self.vae:
            check_stream_device(use_stream=self.use_stream, device=device)

    def check_compatible(self, *, gradient_checkpointing: bool, distributed: str, world_size: int | None,
                         device: Any) -> None:
        """Refuse group offload of the training transformer where it cannot work, before weights load. world_size
        or device None: not known yet, those rules wait. Quantized weights are QuantizationConfig's rule."""
        if not self.enabled:
            return
        if device is not None:
            self.check_stream(device=device)
        if distributed == "fsdp2" and world_size is not None and world_size > 1:
            raise ValueError(
                f"enable_group_offload cannot be combined with distributed 'fsdp2' over {world_size} processes: FSDP2 "
                "already shards the weights and owns their placement. Use distributed 'ddp' (or one process), or "
                "disable enable_group_offload."
            )
        if not gradient_checkpointing:
            raise ValueError(
                "enable_group_offload needs gradient_checkpointing true: without it autograd keeps every block's "
                "weights on the accelerator until backward, so offloading them would save no memory."
            )


def check_stream_device(*, use_stream: bool, device: Any) -> None:
    """group_offload_use_stream needs a CUDA device (device: a torch.device or its name)."""
    kind = getattr(device, "type", str(device).split(":")[0])
    if use_stream and kind != "cuda":
        raise ValueError(
            f"group_offload_use_stream is true but this process computes on {kind!r}: CUDA streams need a CUDA "
            "device. Set group_offload_use_stream to false."
        )


# ---------------------------------------------------------------------------------------------------
# The config
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)  # no slots: Python 3.11's slotted frozen __setattr__ breaks on a flat key
class TrainConfig:
    """Every setting of one training run. Build it with from_dict / from_json (flat SimpleTuner keys).

    A setting can also be read by its flat key (`config.learning_rate`), as the file spells it.
    """

    model: ModelConfig
    data: DataConfig
    checkpoint: CheckpointConfig
    lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)
    optim: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = dataclasses.field(default_factory=ScheduleConfig)
    objective: ObjectiveConfig = dataclasses.field(default_factory=ObjectiveConfig)
    memory: MemoryConfig = dataclasses.field(default_factory=MemoryConfig)
    parallelism: ParallelismConfig = dataclasses.field(default_factory=ParallelismConfig)
    validation: ValidationConfig = dataclasses.field(default_factory=ValidationConfig)
    quantization: QuantizationConfig = dataclasses.field(default_factory=QuantizationConfig)
    offload: OffloadConfig = dataclasses.field(default_factory=OffloadConfig)
    trackers: TrackerConfig = dataclasses.field(default_factory=TrackerConfig)
    ema: EmaConfig = dataclasses.field(default_factory=EmaConfig)
    tread: TreadConfig | None = setting("tread_config", None)
    """TREAD token routing during training, SimpleTuner's spelling:
    {"routes": [{"selection_ratio": 0.5, "start_layer_idx": 2, "end_layer_idx": -2}]}. null disables it."""
    seed: int = setting("seed", 42, ge=0, le=SEED_MAX)
    """Seed for data order, noise, timesteps and LoRA init; each rank derives its own stream from it.
    In [0, 2**31 - 1]."""
    nan_policy: Literal["stop", "skip_batch"] = setting("nan_policy", "stop")
    """On a non-finite loss or gradient: "stop" ends the run with an error naming the step;
    "skip_batch" skips that optimizer step, reports it, and goes on."""

    def __post_init__(self) -> None:
        for name in _GROUPS:
            if not isinstance(getattr(self, name), _GROUPS[name]):
                raise ValueError(f"TrainConfig.{name} must be a {_GROUPS[name].__name__}, got {getattr(self, name)!r}.")
        check_fields(self)
        self.schedule.check_base_lr(self.optim.base_lr)
        if self.validation.seed is None:  # resolved once: validation renders with a number
            object.__setattr__(self, "validation", dataclasses.replace(self.validation, seed=self.seed))
        self.check_processes(None)
        check_flavour_settings(self)
        self._warn_unused()

    def check_processes(self, world_size: int | None) -> None:
        """The rules across sub-configs that depend on the process count (None: not known yet), asked when the
        config is read, at launch (run.run_training) and in model.build_model with the device too."""
        self.quantization.check_compatible(mixed_precision=self.memory.mixed_precision,
                                           distributed=self.parallelism.distributed, world_size=world_size,
                                           offload=self.offload)
        self.offload.check_compatible(gradient_checkpointing=self.memory.gradient_checkpointing,
                                      distributed=self.parallelism.distributed, world_size=world_size, device=None)
        self.optim.check_processes(distributed=self.parallelism.distributed, world_size=world_size)

    def __getattr__(self, name: str) -> Any:
        """A setting by its flat JSON key, as the file spells it: config.learning_rate is config.optim.learning_rate,
        config.dataset_manifest a path string (or a list). The trainer itself reads the typed sub-configs."""
        where = KEYS.get(name)
        if where is None:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return to_json_value(_read(self, where))

    def _warn_unused(self) -> None:
        """Settings the chosen modes ignore: harmless, but probably not what the user meant (STYLE §4)."""
        changed = {key for key, where in KEYS.items() if _read(self, where) != DEFAULTS.get(key, dataclasses.MISSING)}
        unused: list[tuple[str, str]] = []
        if self.schedule.scheduler == "constant" and self.schedule.warmup_steps > 0:
            unused.append(("lr_warmup_steps", "lr_scheduler is 'constant' (use 'constant_with_warmup' for a warm-up)"))
        if self.objective.guidance.mode == "constant":
            unused += [(k, "flux_guidance_mode is 'constant'") for k in ("flux_guidance_min", "flux_guidance_max")
                       if k in changed]
        elif "flux_guidance_value" in changed:
            unused.append(("flux_guidance_value", "flux_guidance_mode is 'random-range'"))
        if self.objective.auto_shift and "flow_schedule_shift" in changed:
            unused.append(("flow_schedule_shift", "flow_schedule_auto_shift is on"))
        unused += self.objective.noise_offset.unused_settings(changed)
        unused += self.objective.scheduled_sampling.unused_settings(changed)
        unused += self.memory.checkpointing.unused_settings(changed, on=self.memory.gradient_checkpointing)
        if not self.memory.gradient_checkpointing and self.memory.gradient_checkpointing_interval is not None:
            unused.append(("gradient_checkpointing_interval", "gradient_checkpointing is off"))
        if not self.offload.enabled:
            unused += [(k, "enable_group_offload is off") for k in _GROUP_OFFLOAD_KEYS if k in changed]
        if not self.quantization.base_quantized and self.quantization.text_encoder_precision == "no_change":
            unused += [(k, "nothing is quantized") for k in ("base_model_default_dtype", "quantize_via") if k in changed]
        placeholder = any(SUBJECT_PLACEHOLDER in p for p in self.validation.raw_prompts().values())
        if not self.validation.enabled:
            unused += [(k, "there is no validation prompt") for k in KEYS  # validation_seed: resolved from seed
                       if k.startswith("validation_") and k in changed and k != "validation_seed"]
        elif self.validation.subject is not None and not placeholder:
            unused.append(("validation_subject", f"no validation prompt contains {SUBJECT_PLACEHOLDER}"))
        elif self.validation.subject is None and placeholder:
            log.warning("config: validation prompts contain %s and validation_subject is unset: they are sent as "
                        "written, as SimpleTuner sends them; set validation_subject to the words that replace it.",
                        SUBJECT_PLACEHOLDER)
        for key, why in unused:
            log.warning("config: %s=%r has no effect because %s.", key, getattr(self, key), why)

    # -- construction and serialisation ------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Build from a flat dict of SimpleTuner-named keys ("--key" or "key")."""
        if not isinstance(data, dict):
            raise ValueError(f"the config must be a JSON object of keys, got {type(data).__name__}.")
        values: dict[str, Any] = {}
        given_as: dict[str, str] = {}
        for raw_key, value in translate_simpletuner_keys(data).items():
            if not isinstance(raw_key, str):
                raise ValueError(f"config key {raw_key!r} is not a string.")
            key = raw_key[2:] if raw_key.startswith("--") else raw_key
            key = ALIASES.get(key, key)
            if key not in KEYS:
                raise ValueError(unknown_key_message(raw_key, known=KNOWN_KEYS))
            if key in given_as:
                raise ValueError(f"config keys {given_as[key]!r} and {raw_key!r} both set {key}; keep one.")
            given_as[key] = raw_key
            spec, hint = _SPECS[key], _HINTS[key]
            values[key] = convert(key, value, hint, from_json=True, default=DEFAULTS.get(key, dataclasses.MISSING),
                                  why_refused=choice_hint, empty_means_null=spec.empty_means_null,
                                  number_as_text=spec.number_as_text)
        if values.get("base_model_precision", "no_change") != "no_change" and values.get("mixed_precision") == "no":
            values.setdefault("base_model_default_dtype", "fp32")  # its default follows fp32 compute
        missing = [k for k in _REQUIRED if k not in values]
        if missing:
            raise ValueError(f"config is missing required key(s) {missing}: {_REQUIRED_HELP}")
        return _build(cls, values)

    @classmethod
    def from_json(cls, path: str | Path) -> TrainConfig:
        """Read a config.json (SimpleTuner's or one written by to_json); errors name the file."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ValueError(f"cannot read config file {path}: {exc.strerror or exc}.") from exc
        except UnicodeDecodeError as exc:
            raise ValueError(f"config file {path} is not UTF-8 text (byte {exc.start}); save it as UTF-8 JSON.") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"config file {path} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}.") from exc
        try:
            return cls.from_dict(data)
        except ValueError as exc:
            raise ValueError(f"config file {path}: {exc}") from exc

    def to_dict(self) -> dict[str, Any]:
        """Flat, JSON-serialisable dict of every key; from_dict(to_dict()) == self."""
        return {key: to_json_value(_read(self, where)) for key, where in KEYS.items()}

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------------
# The key table, derived from the declarations above so keys, types, defaults and docs cannot drift apart
# ---------------------------------------------------------------------------------------------------


_GROUPS: dict[str, type] = {f.name: typing.get_type_hints(TrainConfig)[f.name]
                            for f in dataclasses.fields(TrainConfig) if field_setting(f) is None}


def _walk(cls: type, path: tuple[str, ...]) -> typing.Iterator[tuple[str, tuple[str, ...], dataclasses.Field, Any]]:
    """(flat key, attribute path, field, type hint) of every setting under cls, nested groups included."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        spec = field_setting(f)
        if spec is not None:
            yield spec.key, path + (f.name,), f, hints[f.name]
        elif dataclasses.is_dataclass(hints[f.name]):
            yield from _walk(hints[f.name], path + (f.name,))


_TABLE = list(_walk(TrainConfig, ()))
KEYS: dict[str, tuple[str, ...]] = {key: where for key, where, _, _ in _TABLE}
"""Flat JSON key -> attribute path in TrainConfig (e.g. "lora_rank" -> ("lora", "rank"))."""
KNOWN_KEYS: frozenset[str] = frozenset(KEYS)
DEFAULTS: dict[str, Any] = {key: f.default for key, _, f, _ in _TABLE if f.default is not dataclasses.MISSING}
_SPECS: dict[str, Setting] = {key: field_setting(f) for key, _, f, _ in _TABLE}
_HINTS: dict[str, Any] = {key: hint for key, _, _, hint in _TABLE}
PATH_KEYS: frozenset[str] = frozenset(k for k, h in _HINTS.items() if h == PATHS or h in (Path, Path | None))
_REQUIRED: tuple[str, ...] = tuple(k for k in KEYS if k not in DEFAULTS)
_REQUIRED_HELP = ("pretrained_model_name_or_path is the local diffusers FLUX.2 folder and output_dir the folder "
                  "for checkpoints and the LoRA file.")
_GROUP_OFFLOAD_KEYS = ("group_offload_type", "group_offload_blocks_per_group", "group_offload_use_stream",
                       "group_offload_text_encoder", "group_offload_vae")
assert len(KEYS) == len(_TABLE), "a flat key is declared twice"

CHOICES: dict[str, tuple[str, ...]] = {
    key: choices for key, hint in _HINTS.items() if (choices := literal_choices(hint)) is not None
}
"""Key -> allowed strings, in display order; node combo widgets use these lists."""


def _read(config: Any, where: tuple[str, ...]) -> Any:
    for name in where:
        config = object.__getattribute__(config, name)
    return config


def _build(cls: type, values: dict[str, Any]) -> Any:
    """cls built from the converted flat values: each nested group from the keys under it."""
    kwargs: dict[str, Any] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        spec = field_setting(f)
        if spec is not None:
            if spec.key in values:
                kwargs[f.name] = values[spec.key]
        elif dataclasses.is_dataclass(hints[f.name]):
            kwargs[f.name] = _build(hints[f.name], values)
    return cls(**kwargs)


# ---------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------


def parse_resolution(value: str | int, *, key: str = "validation_resolution") -> tuple[int, int]:
    """(width, height) from "1024" (square) or "WIDTHxHEIGHT" ("1024x768"); both multiples of 16."""
    text = str(value).strip().lower()
    if "," in text:
        raise ValueError(f"{key} {value!r} lists several sizes; give one, e.g. '1024' or '1024x768'.")
    match = re.fullmatch(r"(\d+)(?:x(\d+))?", text)
    if match is None:
        raise ValueError(
            f"{key} {value!r} is not a size; give pixels as '1024' (square) or 'WIDTHxHEIGHT' such as '1024x768' "
            "(megapixel values are not supported)."
        )
    width = int(match.group(1))
    height = int(match.group(2)) if match.group(2) is not None else width
    for name, side in (("width", width), ("height", height)):
        if side < PIXELS_PER_TOKEN or side % PIXELS_PER_TOKEN:
            raise ValueError(
                f"{key} {value!r}: {name} {side} must be a positive multiple of {PIXELS_PER_TOKEN} (FLUX.2 makes one "
                f"token per 16x16 pixels); e.g. {max(PIXELS_PER_TOKEN, round(side / PIXELS_PER_TOKEN) * PIXELS_PER_TOKEN)}."
            )
        if side > MAX_VALIDATION_SIDE:
            raise ValueError(f"{key} {value!r}: {name} {side} is above {MAX_VALIDATION_SIDE} pixels; FLUX.2 renders up to "
                             "about 4 megapixels (e.g. 2048x2048).")
    return width, height
