"""The training run's settings: one flat JSON object whose keys follow SimpleTuner's FLUX.2 quickstart.

A SimpleTuner user can bring a config.json: keys may carry SimpleTuner's leading "--", numbers and
booleans may be JSON strings ("1e-4", "true") as SimpleTuner's argparse accepts them, and its current
names `checkpoint_step_interval` / `validation_step_interval` are read as `checkpointing_steps` /
`validation_steps`. Every key maps to one typed field of `TrainConfig`; an unknown key, a SimpleTuner
option this trainer does not implement, a wrong type or a bad value raises ValueError naming the key.

Functions take only the group of settings they need: `config.lora`, `config.optim`, `config.schedule`,
`config.objective` (with `config.guidance`), `config.checkpoint`, `config.validation`, `config.memory`,
`config.offload`, `config.quantization`, `config.tread`, `config.data` and `config.model` are small
frozen views built from the flat fields. Errors always use the flat JSON key.

This module imports only the standard library: ComfyUI imports it at start-up for the combo lists
(`CHOICES`).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import math
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

log = logging.getLogger(__name__)

__all__ = [
    "ALIASES",
    "CHOICES",
    "KNOWN_KEYS",
    "UNSUPPORTED_KEYS",
    "CheckpointSettings",
    "DataSettings",
    "GuidanceSettings",
    "LoraSettings",
    "MemorySettings",
    "ModelSettings",
    "ObjectiveSettings",
    "OffloadSettings",
    "OptimSettings",
    "QuantizationSettings",
    "ScheduleSettings",
    "TrainConfig",
    "TreadConfig",
    "TreadRoute",
    "ValidationSettings",
    "parse_resolution",
]

SEED_MAX = 2**31 - 1  # SimpleTuner's bound: seeds must fit a signed 32-bit integer.
SUBJECT_PLACEHOLDER = "<subject>"
PIXELS_PER_TOKEN = 16  # VAE 8x down, then 2x2 patchify: sizes must be multiples of 16.
MAX_VALIDATION_SIDE = 8192  # the FLUX.2 Sample node's limit too

QuantPrecision = Literal["no_change", "int8-quanto", "int4-quanto"]


# ---------------------------------------------------------------------------------------------------
# TREAD
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class TreadRoute:
    """One TREAD routing window, as SimpleTuner spells it in tread_config.routes."""

    selection_ratio: float
    """Fraction of the image tokens routed around (dropped from) the blocks of this window; the rest go
    through them. 0.5 keeps half. SimpleTuner's code uses the value this way (its router's mask_ratio),
    although its FLUX.2 quickstart calls it the fraction kept. In [0, 1)."""
    start_layer_idx: int
    """First routed block, inclusive. Blocks are counted over double blocks first, then single blocks
    (56 on FLUX.2-dev); a negative index counts from the end (-1 = the last block)."""
    end_layer_idx: int
    """Last routed block, inclusive, counted like start_layer_idx."""

    def __post_init__(self) -> None:
        # Direct construction gets the same checks as JSON; the dotted name comes from TreadConfig.
        _check_route(self, where="tread_config.routes[?]")

    def resolve(self, num_layers: int) -> tuple[int, int]:
        """(start, end) as non-negative block indices, both inclusive, for a model with num_layers blocks."""
        start = self.start_layer_idx + num_layers if self.start_layer_idx < 0 else self.start_layer_idx
        end = self.end_layer_idx + num_layers if self.end_layer_idx < 0 else self.end_layer_idx
        return start, end


def _check_route(route: TreadRoute, *, where: str) -> None:
    ratio = route.selection_ratio
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio):
        raise ValueError(f"{where}.selection_ratio must be a number in [0, 1), got {ratio!r}.")
    if not 0.0 <= ratio < 1.0:
        raise ValueError(
            f"{where}.selection_ratio must be in [0, 1) (the fraction of image tokens routed around the "
            f"blocks), got {ratio!r}; 0.5 keeps half the tokens."
        )
    object.__setattr__(route, "selection_ratio", float(ratio))
    for name in ("start_layer_idx", "end_layer_idx"):
        value = getattr(route, name)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where}.{name} must be a whole number (negative counts from the end), got {value!r}.")
    start, end = route.start_layer_idx, route.end_layer_idx
    # With mixed signs the order depends on the model's block count; resolve() checks it then.
    if (start >= 0) == (end >= 0) and start > end:
        raise ValueError(
            f"{where}: start_layer_idx {start} is after end_layer_idx {end}; both are inclusive block indices."
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class TreadConfig:
    """TREAD token routing (training only): image tokens skip the routed blocks and rejoin after them."""

    routes: tuple[TreadRoute, ...]
    """The routing windows; at most one may cover any block."""

    def __post_init__(self) -> None:
        if not isinstance(self.routes, tuple) or not self.routes:
            raise ValueError("tread_config.routes must be a non-empty list of routes; remove tread_config to disable TREAD.")
        for i, route in enumerate(self.routes):
            if not isinstance(route, TreadRoute):
                raise ValueError(f"tread_config.routes[{i}] must be a route object, got {route!r}.")

    @classmethod
    def from_dict(cls, data: Any) -> TreadConfig:
        """Parse SimpleTuner's {"routes": [{"selection_ratio", "start_layer_idx", "end_layer_idx"}, ...]}."""
        if isinstance(data, str):
            try:
                data = json.loads(data)
            except json.JSONDecodeError as exc:
                raise ValueError(f"tread_config is a string that is not valid JSON: {exc}.") from exc
        if not isinstance(data, dict):
            raise ValueError(f'tread_config must be an object like {{"routes": [...]}}, got {data!r}.')
        extra = sorted(set(data) - {"routes"})
        if extra:
            raise ValueError(f"tread_config has unknown key(s) {extra}; the only key is 'routes'.")
        if "routes" not in data:
            raise ValueError("tread_config needs 'routes': a list of {selection_ratio, start_layer_idx, end_layer_idx}.")
        routes = data["routes"]
        if not isinstance(routes, list) or not routes:
            raise ValueError(f"tread_config.routes must be a non-empty list, got {routes!r}.")
        keys = [f.name for f in dataclasses.fields(TreadRoute)]
        parsed = []
        for i, raw in enumerate(routes):
            where = f"tread_config.routes[{i}]"
            if not isinstance(raw, dict):
                raise ValueError(f"{where} must be an object with {keys}, got {raw!r}.")
            unknown = sorted(set(raw) - set(keys))
            if unknown:
                raise ValueError(f"{where} has unknown key(s) {unknown}{_closest(unknown[0], keys)} Route keys are {keys}.")
            missing = [k for k in keys if k not in raw]
            if missing:
                raise ValueError(f"{where} is missing {missing}; each route needs {keys}.")
            try:
                parsed.append(TreadRoute(**raw))
            except ValueError as exc:
                raise ValueError(str(exc).replace("tread_config.routes[?]", where)) from None
        return cls(routes=tuple(parsed))

    def to_dict(self) -> dict[str, Any]:
        return {"routes": [dataclasses.asdict(r) for r in self.routes]}

    def resolved_routes(self, num_layers: int) -> tuple[tuple[float, int, int], ...]:
        """(selection_ratio, start, end) per route with indices in [0, num_layers), ends inclusive.

        Raises ValueError when a route falls outside the model or two routes share a block (SimpleTuner
        silently uses the first matching route for such a block).
        """
        resolved = []
        for i, route in enumerate(self.routes):
            start, end = route.resolve(num_layers)
            if not (0 <= start <= end < num_layers):
                raise ValueError(
                    f"tread_config.routes[{i}]: blocks {route.start_layer_idx}..{route.end_layer_idx} resolve to "
                    f"{start}..{end}, outside this model's {num_layers} blocks or in the wrong order."
                )
            resolved.append((route.selection_ratio, start, end))
        ordered = sorted(resolved, key=lambda r: r[1])
        for a, b in zip(ordered, ordered[1:]):
            if b[1] <= a[2]:
                raise ValueError(f"tread_config routes overlap: blocks {a[1]}..{a[2]} and {b[1]}..{b[2]}; "
                                 "give each block to one route.")
        return tuple(resolved)


# ---------------------------------------------------------------------------------------------------
# Grouped views: what each part of the trainer takes instead of the whole config
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelSettings:
    """Where the FLUX.2 weights are: the arguments of model_files.inspect_model_folder."""

    root: Path
    transformer_file: Path | None
    vae_file: Path | None
    flavour: str


@dataclass(frozen=True, kw_only=True, slots=True)
class LoraSettings:
    """The adapter's shape: saved with the LoRA file (the rest of the config affects only this run)."""

    rank: int
    alpha: float
    """Resolved: lora_alpha, or the rank when lora_alpha is null."""
    dropout: float
    init: str
    target: str


@dataclass(frozen=True, kw_only=True, slots=True)
class OptimSettings:
    optimizer: str
    learning_rate: float
    adam_beta1: float
    adam_beta2: float
    adam_weight_decay: float
    adam_epsilon: float
    max_grad_norm: float
    """0 disables clipping."""


@dataclass(frozen=True, kw_only=True, slots=True)
class ScheduleSettings:
    """Learning-rate schedule; the field names are loop.lr_lambda's keyword arguments."""

    scheduler: str
    warmup_steps: int
    total_steps: int


@dataclass(frozen=True, kw_only=True, slots=True)
class GuidanceSettings:
    """The guidance value fed to FLUX.2-dev's guidance embedding in training (objective.GuidanceSpec's fields)."""

    mode: str
    value: float
    minimum: float
    maximum: float


@dataclass(frozen=True, kw_only=True, slots=True)
class ObjectiveSettings:
    """Flow-matching objective settings (objective.ObjectiveSpec's fields)."""

    shift: float
    auto_shift: bool
    guidance: GuidanceSettings
    caption_dropout_probability: float
    reference_timestep: str
    """"shared" or "zero": the timestep that modulates reference-image tokens."""


@dataclass(frozen=True, kw_only=True, slots=True)
class CheckpointSettings:
    output_dir: Path
    every_steps: int
    total_limit: int | None
    """None keeps every checkpoint."""
    resume_from: str | None
    """None, "latest", or a checkpoint folder (a path, or a checkpoint-<step> name inside output_dir)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class ValidationSettings:
    prompt: str | None
    prompt_library: Path | None
    subject: str | None
    every_steps: int
    """0: only after the last step."""
    width: int
    height: int
    num_inference_steps: int
    guidance: float
    seed: int
    """Resolved: validation_seed, or the training seed when it is null."""
    reference_images: tuple[Path, ...] = ()
    """Reference images every validation prompt is rendered with; empty for none."""

    @property
    def enabled(self) -> bool:
        return self.prompt is not None or self.prompt_library is not None


@dataclass(frozen=True, kw_only=True, slots=True)
class MemorySettings:
    gradient_checkpointing: bool
    gradient_checkpointing_interval: int | None
    mixed_precision: str


@dataclass(frozen=True, kw_only=True, slots=True)
class OffloadSettings:
    """diffusers group offloading (hooks), plus where the encoders wait during start-up."""

    enabled: bool
    offload_type: str
    blocks_per_group: int
    use_stream: bool
    text_encoder: bool
    vae: bool
    during_startup: bool


@dataclass(frozen=True, kw_only=True, slots=True)
class QuantizationSettings:
    base_model_precision: str
    text_encoder_precision: str
    base_model_default_dtype: str
    quantize_via: str

    @property
    def base_quantized(self) -> bool:
        return self.base_model_precision != "no_change"


@dataclass(frozen=True, kw_only=True, slots=True)
class DataSettings:
    dataset_manifests: tuple[Path, ...]
    """Empty when data_backend_config is given."""
    data_backend_config: Path | None
    train_batch_size: int
    gradient_accumulation_steps: int
    vae_batch_size: int


# ---------------------------------------------------------------------------------------------------
# The config
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class TrainConfig:
    """Every setting of one training run. Build it with from_dict / from_json; every field is a JSON key."""

    # -- model -------------------------------------------------------------------------------------
    model_type: Literal["lora"] = "lora"
    """What is trained. Only "lora" (SimpleTuner's "full" fine-tuning is not supported)."""
    model_family: Literal["flux2"] = "flux2"
    """Model architecture. Only "flux2"."""
    model_flavour: Literal["dev"] = "dev"
    """FLUX.2 variant. "dev": FLUX.2-dev (Mistral-Small-3.1 text encoder, guidance-distilled, 8 double +
    48 single blocks). SimpleTuner also lists "klein-4b" and "klein-9b" (FLUX.2-klein: a Qwen3 text
    encoder and no guidance embedding) and defaults to "klein-9b"; this trainer supports dev only."""
    pretrained_model_name_or_path: str
    """Local diffusers-layout FLUX.2 folder (model_index.json, transformer/, vae/, text_encoder/,
    tokenizer/, scheduler/). Required. Weights are never downloaded, so a hub id is refused."""
    pretrained_transformer_model_name_or_path: str | None = None
    """Optional single-file transformer (.safetensors, e.g. from ComfyUI's models/diffusion_models) that
    replaces the folder's transformer/ weights. Unlike SimpleTuner, a local file only."""
    pretrained_vae_model_name_or_path: str | None = None
    """Optional single-file VAE (.safetensors) that replaces the folder's vae/ weights. A local file only."""

    # -- data and output ---------------------------------------------------------------------------
    output_dir: str
    """Folder for checkpoints, the LoRA file, validation images and events.jsonl. Required."""
    output_name: str = "lora"
    """Name of the LoRA file written to output_dir (<output_name>.safetensors): letters, digits, - and _."""
    dataset_manifest: str | tuple[str, ...] | None = None
    """Manifest written by Build Dataset (`python -m trainer build-dataset`): images, captions and their
    latent / text-embedding caches; or a list of manifests to train on several datasets at once (their
    batches are interleaved, each batch from one dataset). Give this or data_backend_config."""
    data_backend_config: str | None = None
    """SimpleTuner's multidatabackend.json (a list of datasets). Give this or dataset_manifest."""
    vae_batch_size: int = 4
    """Images per VAE encode while caching latents. >= 1."""
    train_batch_size: int = 1
    """Images per micro-batch on each process. >= 1."""
    gradient_accumulation_steps: int = 1
    """Micro-batches whose gradients are summed before each optimizer step. >= 1."""
    caption_dropout_probability: float = 0.0
    """Chance per sample of training on the empty prompt's real encoding instead of the caption. In [0, 1]."""

    # -- LoRA --------------------------------------------------------------------------------------
    lora_rank: int = 16
    """LoRA rank (width of the A/B matrices). >= 1."""
    lora_alpha: float | None = None
    """LoRA alpha; the update is scaled by alpha / rank. > 0; null means equal to lora_rank."""
    lora_dropout: float = 0.1
    """Dropout on the LoRA branch's input during training. In [0, 1)."""
    lora_init_type: Literal["default", "gaussian"] = "default"
    """Initialisation of LoRA A (B starts at zero either way): "default" is PEFT's Kaiming-uniform,
    "gaussian" draws A from N(0, 1/rank)."""
    flux_lora_target: Literal["all", "attention", "mlp", "tiny"] = "all"
    """Layers that get adapters, in double and single blocks: "all" (every attention and MLP linear),
    "attention" (q/k/v and output projections), "mlp" (feed-forward only), "tiny" (q/k/v only)."""

    # -- optimizer and schedule --------------------------------------------------------------------
    optimizer: Literal["adamw"] = "adamw"
    """torch.optim.AdamW over the LoRA weights (kept in fp32)."""
    learning_rate: float = 1e-4
    """Peak learning rate. > 0."""
    adam_beta1: float = 0.9
    """AdamW first-moment decay. In [0, 1)."""
    adam_beta2: float = 0.999
    """AdamW second-moment decay. In [0, 1)."""
    adam_weight_decay: float = 1e-2
    """AdamW decoupled weight decay. >= 0."""
    adam_epsilon: float = 1e-8
    """AdamW denominator epsilon. > 0."""
    max_grad_norm: float = 2.0
    """Clip the global gradient norm (torch clip_grad_norm_) to this value; 0 disables clipping. >= 0.
    SimpleTuner's default grad_clip_method "value" clips each element instead; this trainer clips the norm."""
    lr_scheduler: Literal["constant", "constant_with_warmup", "cosine", "linear"] = "constant"
    """Learning-rate schedule after warm-up: "constant", "constant_with_warmup" (linear warm-up, then
    constant), "cosine" and "linear" (warm-up, then decay to 0 at max_train_steps). "constant" has no
    warm-up."""
    lr_warmup_steps: int = 0
    """Optimizer steps of linear warm-up from 0 to learning_rate. In [0, max_train_steps]."""
    max_train_steps: int = 1000
    """Optimizer steps to train. >= 1."""
    seed: int = 42
    """Seed for data order, noise, timesteps and LoRA init; each rank derives its own stream from it.
    In [0, 2**31 - 1]."""

    # -- objective ---------------------------------------------------------------------------------
    flux_guidance_mode: Literal["constant", "random-range"] = "constant"
    """Guidance value fed to FLUX.2-dev's guidance embedding while training: "constant" uses
    flux_guidance_value; "random-range" draws uniformly from [flux_guidance_min, flux_guidance_max] per sample."""
    flux_guidance_value: float = 1.0
    """Guidance for "constant" mode. >= 0. 1.0 keeps the guidance distillation intact; use 3-5 at inference."""
    flux_guidance_min: float = 0.0
    """Lower bound for "random-range" mode. >= 0 and <= flux_guidance_max."""
    flux_guidance_max: float = 4.0
    """Upper bound for "random-range" mode. >= flux_guidance_min."""
    flow_schedule_shift: float = 3.0
    """Timestep shift: s -> shift*s / (1 + (shift-1)*s) after s ~ sigmoid(N(0, 1)). > 0; 1 = no shift;
    higher values train more at high noise (composition)."""
    flow_schedule_auto_shift: bool = False
    """Use a resolution-dependent shift computed from each batch's image-token count instead of
    flow_schedule_shift (the empirical mu of FLUX.2's sampler)."""
    reference_timestep: Literal["shared", "zero"] = "shared"
    """Edit/reference LoRAs (not a SimpleTuner key): the timestep that modulates the reference-image tokens.
    "shared" gives them the sample's timestep, as Flux2Pipeline and ComfyUI do when they sample FLUX.2-dev
    with reference images, so the LoRA trains under the conditions it is used in; the default. "zero"
    modulates them as at timestep 0 (clean images; the guidance embedding unchanged), as SimpleTuner trains
    FLUX.2; validation images then use it too. Has no effect on a dataset without references."""

    # -- memory ------------------------------------------------------------------------------------
    mixed_precision: Literal["bf16", "fp16", "no"] = "bf16"
    """Compute precision of the frozen base: "bf16", "fp16", or "no" (fp32, for CPU tests). LoRA weights stay fp32."""
    gradient_checkpointing: bool = True
    """Recompute block activations in backward: much less memory, about 30% slower."""
    gradient_checkpointing_interval: int | None = None
    """Checkpoint every N-th block (blocks 0, N, 2N, ... over double then single blocks), as SimpleTuner does;
    the others keep their activations: faster, more memory. >= 1, or null for every block."""

    # -- checkpoints -------------------------------------------------------------------------------
    checkpointing_steps: int = 500
    """Save a resumable checkpoint-<step> folder every this many steps (SimpleTuner: checkpoint_step_interval). >= 1."""
    checkpoints_total_limit: int | None = 5
    """Keep at most this many checkpoints, deleting the oldest. >= 1, or null to keep all (SimpleTuner's 0)."""
    resume_from_checkpoint: str | None = None
    """null: start fresh; "latest": resume from the newest checkpoint in output_dir, or start fresh when
    there is none; otherwise a checkpoint folder, as a path or a checkpoint-<step> name inside output_dir."""

    # -- validation --------------------------------------------------------------------------------
    validation_prompt: str | None = None
    """Prompt rendered with the LoRA during training. null (or empty) and no user_prompt_library: no validation.
    May contain <subject>."""
    user_prompt_library: str | None = None
    """JSON file of {name: prompt} rendered at each validation, besides validation_prompt. Prompts may
    contain <subject>."""
    validation_subject: str | None = None
    """Replaces <subject> in validation_prompt and user_prompt_library prompts (not a SimpleTuner key).
    Required when any prompt contains <subject>."""
    validation_steps: int = 100
    """Render validation images every this many steps and after the last step; 0: only after the last
    step (SimpleTuner: validation_step_interval). >= 0."""
    validation_resolution: str = "1024"
    """Validation image size: "1024" (square) or "WIDTHxHEIGHT" ("1024x768"), multiples of 16."""
    validation_num_inference_steps: int = 20
    """Euler sampling steps for validation images. >= 1."""
    validation_guidance: float = 4.0
    """Guidance value (FLUX.2-dev's guidance embedding, not CFG) for validation images. > 0."""
    validation_seed: int | None = None
    """Seed for validation noise (the same images every time); null uses seed. In [0, 2**31 - 1]."""
    validation_reference_images: str | tuple[str, ...] | None = None
    """Edit/reference LoRAs (not a SimpleTuner key): an image file, or a list of them, given to every validation
    prompt as FLUX.2 reference images (image k at time position 10 + 10k), prepared as Flux2Pipeline prepares
    `image=` (shrunk to about 1024x1024 pixels when larger, centre-cropped to multiples of 16), encoded once at
    run start and modulated with reference_timestep. null: validation renders without references."""

    # -- ours: processes and failures --------------------------------------------------------------
    distributed: Literal["fsdp2", "ddp", "none"] = "fsdp2"
    """How torchrun's processes share the model: "fsdp2" shards each block (for models that do not fit
    one GPU), "ddp" replicates it (faster when it fits), "none" runs one process. torchrun decides the
    process count; with one process fsdp2 and ddp run unwrapped."""
    nan_policy: Literal["stop", "skip_batch"] = "stop"
    """On a non-finite loss or gradient: "stop" ends the run with an error naming the step;
    "skip_batch" skips that optimizer step, reports it, and goes on."""
    collective_timeout_s: float = 600.0
    """Seconds a process waits in a collective (all-reduce, barrier) for the others before the run fails:
    a crashed or hung process then ends the run with an error instead of hanging it. > 0. Raise it when
    rank 0 alone does long work (a first text-encoder load from a slow disk) while the others wait."""

    # -- speed and memory features -----------------------------------------------------------------
    tread_config: TreadConfig | None = None
    """TREAD token routing during training, SimpleTuner's spelling:
    {"routes": [{"selection_ratio": 0.5, "start_layer_idx": 2, "end_layer_idx": -2}]}. null disables it."""
    base_model_precision: QuantPrecision = "no_change"
    """Weight quantization of the frozen transformer with optimum-quanto: "no_change", "int8-quanto",
    "int4-quanto". Cannot be combined with distributed "fsdp2" or with group offload."""
    text_encoder_1_precision: QuantPrecision = "no_change"
    """Weight quantization of the Mistral text encoder while it caches embeddings, same choices."""
    base_model_default_dtype: Literal["bf16", "fp32"] = "bf16"
    """dtype of the transformer weights that quantization leaves unquantized (norms, embeddings)."""
    quantize_via: Literal["cpu", "accelerator"] = "accelerator"
    """Where weights are quantized: "cpu" (slower, for GPUs that cannot hold the unquantized model) or
    "accelerator" (the training GPU)."""
    enable_group_offload: bool = False
    """Keep the transformer's blocks in CPU memory and move them to the GPU group by group (diffusers
    group offloading), in forward and backward."""
    group_offload_type: Literal["block_level", "leaf_level"] = "block_level"
    """Offload granularity: "block_level" (groups of blocks, faster) or "leaf_level" (each layer, least memory)."""
    group_offload_blocks_per_group: int = 1
    """Blocks moved together with block_level offload; more is faster but uses more memory. >= 1."""
    group_offload_use_stream: bool = False
    """Overlap transfers with compute on a CUDA stream (CUDA only)."""
    group_offload_text_encoder: bool = False
    """Also group-offload the text encoder while it caches embeddings."""
    group_offload_vae: bool = False
    """Also group-offload the VAE while it caches latents."""
    offload_during_startup: bool = False
    """Keep the text encoder in CPU memory while the VAE caches latents (less GPU memory at start-up)."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = _convert(f.name, getattr(self, f.name), _HINTS[f.name], from_json=False)
            object.__setattr__(self, f.name, value)
        self._check_fields()
        self._check_cross_fields()
        self._warn_unused()

    # -- per-field checks --------------------------------------------------------------------------

    def _check_fields(self) -> None:
        self._check_model_path()
        for key in ("pretrained_transformer_model_name_or_path", "pretrained_vae_model_name_or_path"):
            _check_file(key, getattr(self, key), what="a local single-file .safetensors", suffix=".safetensors")
        if not self.output_dir.strip():
            raise ValueError("output_dir is empty; give the folder for checkpoints and the LoRA file.")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", self.output_name):
            raise ValueError(f"output_name {self.output_name!r} may hold only letters, digits, - and _ (and not start with - or _).")
        for manifest in _as_paths(self.dataset_manifest):
            _check_file("dataset_manifest", manifest, what="the manifest written by Build Dataset")
        _check_file("data_backend_config", self.data_backend_config, what="a multidatabackend.json file")
        _check_file("user_prompt_library", self.user_prompt_library, what="a JSON file of {name: prompt}")
        for image in _as_paths(self.validation_reference_images):
            _check_reference_image("validation_reference_images", image)

        for key in ("vae_batch_size", "train_batch_size", "gradient_accumulation_steps", "lora_rank",
                    "max_train_steps", "checkpointing_steps", "validation_num_inference_steps",
                    "group_offload_blocks_per_group"):
            _at_least(key, getattr(self, key), 1)
        for key in ("lr_warmup_steps", "validation_steps", "seed"):
            _at_least(key, getattr(self, key), 0)
        _at_most("seed", self.seed, SEED_MAX)
        if self.validation_seed is not None:
            _at_least("validation_seed", self.validation_seed, 0)
            _at_most("validation_seed", self.validation_seed, SEED_MAX)
        if self.gradient_checkpointing_interval is not None:
            _at_least("gradient_checkpointing_interval", self.gradient_checkpointing_interval, 1,
                      fix="use null to checkpoint every block")
        if self.checkpoints_total_limit is not None:
            _at_least("checkpoints_total_limit", self.checkpoints_total_limit, 1,
                      fix="use null to keep every checkpoint (SimpleTuner's 0)")

        _positive("learning_rate", self.learning_rate)
        _positive("adam_epsilon", self.adam_epsilon)
        _positive("flow_schedule_shift", self.flow_schedule_shift, fix="1.0 means no shift")
        _positive("validation_guidance", self.validation_guidance)
        _positive("collective_timeout_s", self.collective_timeout_s, fix="600 is the default")
        if self.lora_alpha is not None:
            _positive("lora_alpha", self.lora_alpha, fix="use null for alpha = lora_rank")
        for key in ("adam_weight_decay", "max_grad_norm", "flux_guidance_value", "flux_guidance_min", "flux_guidance_max"):
            _at_least(key, getattr(self, key), 0.0)
        for key in ("adam_beta1", "adam_beta2", "lora_dropout"):
            _in_unit(key, getattr(self, key), upper_open=True)
        _in_unit("caption_dropout_probability", self.caption_dropout_probability, upper_open=False)

        if self.resume_from_checkpoint is not None and self.resume_from_checkpoint != "latest":
            self._check_resume_path()
        for key in ("validation_prompt", "validation_subject"):
            value = getattr(self, key)
            if value is not None and not value.strip():
                raise ValueError(f"{key} is blank; use null for none.")
        parse_resolution(self.validation_resolution, key="validation_resolution")

    def _check_model_path(self) -> None:
        value = self.pretrained_model_name_or_path
        path = Path(value).expanduser()
        if not value.strip() or not path.exists():
            raise ValueError(
                f"pretrained_model_name_or_path {value!r} is not an existing local folder. This trainer cannot "
                "download weights: give the path of the local diffusers FLUX.2 folder (model_index.json, "
                "transformer/, vae/, text_encoder/, tokenizer/, scheduler/)."
            )
        if not path.is_dir():
            raise ValueError(
                f"pretrained_model_name_or_path {value!r} is a file; give the diffusers FLUX.2 folder, and a "
                "single-file transformer as pretrained_transformer_model_name_or_path."
            )

    def _check_resume_path(self) -> None:
        value = self.resume_from_checkpoint
        assert value is not None
        path = Path(value).expanduser()
        if not path.is_absolute() and re.fullmatch(r"checkpoint-\d+", value):
            path = Path(self.output_dir).expanduser() / value
        if not path.is_dir():
            raise ValueError(
                f"resume_from_checkpoint {value!r}: no checkpoint folder at {path}; use null to start fresh, "
                "'latest' for the newest checkpoint in output_dir, or an existing checkpoint-<step> folder."
            )

    # -- checks across fields ----------------------------------------------------------------------

    def _check_cross_fields(self) -> None:
        if self.dataset_manifest is None and self.data_backend_config is None:
            raise ValueError("dataset_manifest or data_backend_config is required: give the dataset to train on.")
        if self.dataset_manifest is not None and self.data_backend_config is not None:
            raise ValueError("dataset_manifest and data_backend_config are both set; give one dataset source.")
        if self.flux_guidance_min > self.flux_guidance_max:
            raise ValueError(
                f"flux_guidance_min {self.flux_guidance_min} is above flux_guidance_max {self.flux_guidance_max}; "
                "the random-range draws from [min, max]."
            )
        if self.lr_warmup_steps > self.max_train_steps:
            raise ValueError(
                f"lr_warmup_steps {self.lr_warmup_steps} is more than max_train_steps {self.max_train_steps}; "
                "the learning rate would never reach learning_rate. Lower lr_warmup_steps."
            )
        if self.base_model_precision != "no_change" and self.distributed == "fsdp2":
            raise ValueError(
                f"base_model_precision {self.base_model_precision!r} cannot be combined with distributed 'fsdp2' "
                "(FSDP2 cannot shard quanto's quantized weights): set distributed to 'ddp' or 'none', or "
                "base_model_precision to 'no_change'."
            )
        if self.base_model_precision != "no_change" and self.enable_group_offload:
            raise ValueError(
                f"base_model_precision {self.base_model_precision!r} cannot be combined with enable_group_offload "
                "(quanto's quantized layers cannot be moved by group offload hooks): disable one of them."
            )
        if self.validation_prompt is not None or self.user_prompt_library is not None:
            self.validation_prompts()  # reads the library now so a bad file fails before training

    def _warn_unused(self) -> None:
        """Settings the chosen modes ignore: harmless, but probably not what the user meant (STYLE §4)."""
        defaults = _DEFAULTS
        unused: list[tuple[str, str]] = []
        if self.lr_scheduler == "constant" and self.lr_warmup_steps > 0:
            unused.append(("lr_warmup_steps", "lr_scheduler is 'constant' (use 'constant_with_warmup' for a warm-up)"))
        if self.flux_guidance_mode == "constant":
            unused += [(k, "flux_guidance_mode is 'constant'") for k in ("flux_guidance_min", "flux_guidance_max")
                       if getattr(self, k) != defaults[k]]
        elif self.flux_guidance_value != defaults["flux_guidance_value"]:
            unused.append(("flux_guidance_value", "flux_guidance_mode is 'random-range'"))
        if self.flow_schedule_auto_shift and self.flow_schedule_shift != defaults["flow_schedule_shift"]:
            unused.append(("flow_schedule_shift", "flow_schedule_auto_shift is on"))
        if not self.gradient_checkpointing and self.gradient_checkpointing_interval is not None:
            unused.append(("gradient_checkpointing_interval", "gradient_checkpointing is off"))
        if not self.enable_group_offload:
            unused += [(k, "enable_group_offload is off") for k in _GROUP_OFFLOAD_KEYS if getattr(self, k) != defaults[k]]
        if self.base_model_precision == "no_change" and self.text_encoder_1_precision == "no_change":
            unused += [(k, "nothing is quantized") for k in ("base_model_default_dtype", "quantize_via")
                       if getattr(self, k) != defaults[k]]
        if self.validation_subject is not None and not any(
            SUBJECT_PLACEHOLDER in p for p in self._raw_prompts().values()
        ):
            unused.append(("validation_subject", f"no validation prompt contains {SUBJECT_PLACEHOLDER}"))
        if self.validation_reference_images is not None and self.validation_prompt is None \
                and self.user_prompt_library is None:
            unused.append(("validation_reference_images", "there is no validation prompt"))
        for key, why in unused:
            log.warning("config: %s=%r has no effect because %s.", key, getattr(self, key), why)

    # -- construction and serialisation ------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Build from a flat dict of SimpleTuner-named keys ("--key" or "key")."""
        if not isinstance(data, dict):
            raise ValueError(f"the config must be a JSON object of keys, got {type(data).__name__}.")
        kwargs: dict[str, Any] = {}
        given_as: dict[str, str] = {}
        for raw_key, value in data.items():
            if not isinstance(raw_key, str):
                raise ValueError(f"config key {raw_key!r} is not a string.")
            key = raw_key[2:] if raw_key.startswith("--") else raw_key
            key = ALIASES.get(key, key)
            if key not in KNOWN_KEYS:
                raise ValueError(_unknown_key_message(raw_key))
            if key in given_as:
                raise ValueError(f"config keys {given_as[key]!r} and {raw_key!r} both set {key}; keep one.")
            given_as[key] = raw_key
            kwargs[key] = _convert(key, value, _HINTS[key], from_json=True)
        missing = [k for k in _REQUIRED if k not in kwargs]
        if missing:
            raise ValueError(f"config is missing required key(s) {missing}: {_REQUIRED_HELP}")
        return cls(**kwargs)

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
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = value.to_dict() if isinstance(value, TreadConfig) else value
        return out

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n", encoding="utf-8")

    # -- derived values ----------------------------------------------------------------------------

    def validation_size(self) -> tuple[int, int]:
        """(width, height) of validation images."""
        return parse_resolution(self.validation_resolution, key="validation_resolution")

    def validation_prompts(self) -> dict[str, str]:
        """Name -> prompt for each validation image, with <subject> replaced by validation_subject.

        validation_prompt comes first under the name "validation_prompt", then user_prompt_library in file order.
        """
        prompts = self._raw_prompts()
        if self.validation_subject is None:
            needing = [name for name, p in prompts.items() if SUBJECT_PLACEHOLDER in p]
            if needing:
                raise ValueError(
                    f"validation prompt(s) {needing} contain {SUBJECT_PLACEHOLDER} but validation_subject is null; "
                    "set validation_subject to the words that should replace it."
                )
            return prompts
        return {name: p.replace(SUBJECT_PLACEHOLDER, self.validation_subject) for name, p in prompts.items()}

    def _raw_prompts(self) -> dict[str, str]:
        prompts: dict[str, str] = {}
        if self.validation_prompt is not None:
            prompts["validation_prompt"] = self.validation_prompt
        if self.user_prompt_library is not None:
            library = _read_prompt_library(Path(self.user_prompt_library).expanduser())
            clash = set(library) & set(prompts)
            if clash:
                raise ValueError(f"user_prompt_library uses the reserved name(s) {sorted(clash)}; rename those entries.")
            prompts.update(library)
        return prompts

    # -- grouped views -----------------------------------------------------------------------------

    @property
    def model(self) -> ModelSettings:
        return ModelSettings(
            root=Path(self.pretrained_model_name_or_path).expanduser(),
            transformer_file=_opt_path(self.pretrained_transformer_model_name_or_path),
            vae_file=_opt_path(self.pretrained_vae_model_name_or_path),
            flavour=self.model_flavour,
        )

    @property
    def lora(self) -> LoraSettings:
        alpha = float(self.lora_rank) if self.lora_alpha is None else self.lora_alpha
        return LoraSettings(rank=self.lora_rank, alpha=alpha, dropout=self.lora_dropout,
                            init=self.lora_init_type, target=self.flux_lora_target)

    @property
    def optim(self) -> OptimSettings:
        return OptimSettings(optimizer=self.optimizer, learning_rate=self.learning_rate, adam_beta1=self.adam_beta1,
                             adam_beta2=self.adam_beta2, adam_weight_decay=self.adam_weight_decay,
                             adam_epsilon=self.adam_epsilon, max_grad_norm=self.max_grad_norm)

    @property
    def schedule(self) -> ScheduleSettings:
        return ScheduleSettings(scheduler=self.lr_scheduler, warmup_steps=self.lr_warmup_steps,
                                total_steps=self.max_train_steps)

    @property
    def guidance(self) -> GuidanceSettings:
        return GuidanceSettings(mode=self.flux_guidance_mode, value=self.flux_guidance_value,
                                minimum=self.flux_guidance_min, maximum=self.flux_guidance_max)

    @property
    def objective(self) -> ObjectiveSettings:
        return ObjectiveSettings(shift=self.flow_schedule_shift, auto_shift=self.flow_schedule_auto_shift,
                                 guidance=self.guidance, caption_dropout_probability=self.caption_dropout_probability,
                                 reference_timestep=self.reference_timestep)

    @property
    def checkpoint(self) -> CheckpointSettings:
        return CheckpointSettings(output_dir=Path(self.output_dir).expanduser(), every_steps=self.checkpointing_steps,
                                  total_limit=self.checkpoints_total_limit, resume_from=self.resume_from_checkpoint)

    @property
    def validation(self) -> ValidationSettings:
        width, height = self.validation_size()
        return ValidationSettings(
            prompt=self.validation_prompt, prompt_library=_opt_path(self.user_prompt_library),
            subject=self.validation_subject, every_steps=self.validation_steps, width=width, height=height,
            num_inference_steps=self.validation_num_inference_steps, guidance=self.validation_guidance,
            seed=self.seed if self.validation_seed is None else self.validation_seed,
            reference_images=tuple(Path(p).expanduser() for p in _as_paths(self.validation_reference_images)),
        )

    @property
    def memory(self) -> MemorySettings:
        return MemorySettings(gradient_checkpointing=self.gradient_checkpointing,
                              gradient_checkpointing_interval=self.gradient_checkpointing_interval,
                              mixed_precision=self.mixed_precision)

    @property
    def offload(self) -> OffloadSettings:
        return OffloadSettings(enabled=self.enable_group_offload, offload_type=self.group_offload_type,
                               blocks_per_group=self.group_offload_blocks_per_group,
                               use_stream=self.group_offload_use_stream, text_encoder=self.group_offload_text_encoder,
                               vae=self.group_offload_vae, during_startup=self.offload_during_startup)

    @property
    def quantization(self) -> QuantizationSettings:
        return QuantizationSettings(base_model_precision=self.base_model_precision,
                                    text_encoder_precision=self.text_encoder_1_precision,
                                    base_model_default_dtype=self.base_model_default_dtype,
                                    quantize_via=self.quantize_via)

    @property
    def tread(self) -> TreadConfig | None:
        return self.tread_config

    @property
    def data(self) -> DataSettings:
        return DataSettings(dataset_manifests=tuple(Path(p).expanduser() for p in _as_paths(self.dataset_manifest)),
                            data_backend_config=_opt_path(self.data_backend_config),
                            train_batch_size=self.train_batch_size,
                            gradient_accumulation_steps=self.gradient_accumulation_steps,
                            vae_batch_size=self.vae_batch_size)


# ---------------------------------------------------------------------------------------------------
# Tables derived from the dataclass, so the keys, the choices and the docs cannot drift apart
# ---------------------------------------------------------------------------------------------------

_HINTS: dict[str, Any] = typing.get_type_hints(TrainConfig)
KNOWN_KEYS: frozenset[str] = frozenset(f.name for f in dataclasses.fields(TrainConfig))
_DEFAULTS: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(TrainConfig)
                             if f.default is not dataclasses.MISSING}
_REQUIRED: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.name not in _DEFAULTS)
_REQUIRED_HELP = ("pretrained_model_name_or_path is the local diffusers FLUX.2 folder and output_dir the folder "
                  "for checkpoints and the LoRA file.")
_GROUP_OFFLOAD_KEYS = ("group_offload_type", "group_offload_blocks_per_group", "group_offload_use_stream",
                       "group_offload_text_encoder", "group_offload_vae")


def _literal_choices(hint: Any) -> tuple[str, ...] | None:
    if typing.get_origin(hint) is Literal:
        return tuple(typing.get_args(hint))
    return None


CHOICES: dict[str, tuple[str, ...]] = {
    name: choices for name, hint in _HINTS.items() if (choices := _literal_choices(hint)) is not None
}
"""Key -> allowed strings, in display order; node combo widgets use these lists."""

ALIASES: dict[str, str] = {
    "checkpoint_step_interval": "checkpointing_steps",
    "validation_step_interval": "validation_steps",
}
"""SimpleTuner's current names for keys this trainer spells the older SimpleTuner way."""

_NO_HUB = "this trainer never talks to the Hugging Face Hub; upload the LoRA file yourself"
_NO_TRACKER = "progress goes to events.jsonl in output_dir (charted live by the Train LoRA node); there is no tracker integration"
_DATASET = "dataset settings belong to the dataset (the Build Dataset node, or the entries of data_backend_config)"
_NO_CFG = "validation samples FLUX.2-dev through its guidance embedding (validation_guidance) without true CFG or a negative prompt"
_LORA_ONLY = "this trainer trains standard PEFT LoRA only (no LyCORIS / LoKr)"
_SCHEDULERS = "only the lr_scheduler choices constant, constant_with_warmup, cosine and linear exist"

UNSUPPORTED_KEYS: dict[str, str] = {
    "report_to": _NO_TRACKER, "tracker_project_name": _NO_TRACKER, "tracker_run_name": _NO_TRACKER,
    "tracker_image_layout": _NO_TRACKER, "logging_dir": _NO_TRACKER, "webhook_config": _NO_TRACKER,
    "push_to_hub": _NO_HUB, "push_checkpoints_to_hub": _NO_HUB, "hub_model_id": _NO_HUB,
    "model_card_safe_for_work": _NO_HUB, "model_card_note": _NO_HUB,
    "num_train_epochs": "training length is set by max_train_steps only",
    "lora_type": _LORA_ONLY, "lycoris_config": _LORA_ONLY, "init_lokr_norm": _LORA_ONLY,
    "lora_format": "the saved LoRA layout is chosen by this trainer (ComfyUI/BFL keys that load in stock ComfyUI)",
    "use_ema": "EMA weights are not implemented", "ema_decay": "EMA weights are not implemented",
    "grad_clip_method": "max_grad_norm always clips the global gradient norm (SimpleTuner's default 'value' clips each element)",
    "validation_negative_prompt": _NO_CFG, "validation_guidance_real": _NO_CFG,
    "validation_no_cfg_until_timestep": _NO_CFG, "validation_guidance_rescale": _NO_CFG,
    "validation_disable_unconditional": _NO_CFG,
    "validation_prompt_library": "SimpleTuner's built-in prompt library is not shipped; use user_prompt_library",
    "validation_torch_compile": "validation runs the pipeline uncompiled",
    "num_eval_images": "evaluation metrics are not implemented",
    "eval_steps_interval": "evaluation metrics are not implemented",
    "resolution": _DATASET, "resolution_type": _DATASET, "minimum_image_size": _DATASET,
    "maximum_image_size": _DATASET, "target_downsample_size": _DATASET, "aspect_bucket_rounding": _DATASET,
    "disable_bucket_pruning": _DATASET, "crop": _DATASET, "crop_style": _DATASET, "crop_aspect": _DATASET,
    "caption_strategy": _DATASET, "instance_data_dir": _DATASET, "repeats": _DATASET,
    "cache_dir": _DATASET, "cache_dir_vae": _DATASET, "cache_dir_text": _DATASET,
    "lr_end": _SCHEDULERS, "lr_power": _SCHEDULERS, "lr_num_cycles": _SCHEDULERS,
    "optimizer_config": "the optimizer is AdamW with the adam_* keys",
    "use_8bit_adam": "the optimizer is torch AdamW (optimizer 'adamw')",
    "fuse_qkv_projections": "attention runs with the separate q/k/v projections the LoRA targets",
    "fused_qkv_projections": "attention runs with the separate q/k/v projections the LoRA targets",
    "controlnet": "ControlNet training is not implemented",
    "train_text_encoder": "only the transformer is trained; the text encoder only caches embeddings",
    "text_encoder_2_precision": "FLUX.2 has one text encoder: use text_encoder_1_precision",
    "text_encoder_3_precision": "FLUX.2 has one text encoder: use text_encoder_1_precision",
    "text_encoder_4_precision": "FLUX.2 has one text encoder: use text_encoder_1_precision",
    "pretrained_transformer_subfolder": ("the transformer is read from the model folder's transformer/ subfolder "
                                         "or from pretrained_transformer_model_name_or_path"),
    "custom_text_encoder_intermediary_layers": "text features are the Mistral hidden states 10, 20 and 30, as FLUX.2-dev expects",
    "flux_attention_masked_training": "a FLUX.1 option; FLUX.2-dev does not mask text padding",
    "flux_fast_schedule": "a FLUX.1 schnell option",
    "snr_gamma": "the loss is plain flow-matching MSE", "noise_offset": "the loss is plain flow-matching MSE",
    "input_perturbation": "the loss is plain flow-matching MSE",
    "attention_mechanism": "attention uses diffusers' default (PyTorch SDPA)",
    "disable_benchmark": "there is no start-up benchmark to disable",
    "i_know_what_i_am_doing": "every supported key is always available",
}
"""SimpleTuner options this trainer deliberately does not implement, with the reason given to the user."""

_CHOICE_HINTS: dict[str, dict[str, str]] = {
    "model_type": {"full": "full fine-tuning is not supported; this trainer trains LoRA adapters only"},
    "model_family": {"flux": "this trainer is for FLUX.2; FLUX.1 is model_family 'flux' in SimpleTuner"},
    "model_flavour": {
        "klein-4b": "FLUX.2-klein uses a Qwen3 text encoder and has no guidance embedding; only FLUX.2-dev is supported",
        "klein-9b": "FLUX.2-klein uses a Qwen3 text encoder and has no guidance embedding; only FLUX.2-dev is supported",
    },
    "optimizer": {"adamw_bf16": "SimpleTuner's bf16 AdamW is not implemented; 'adamw' keeps fp32 LoRA weights"},
    "mixed_precision": {"fp8": "fp8 training is not implemented"},
    "lora_init_type": {k: "only PEFT's default and gaussian initialisations are supported" for k in ("loftq", "olora", "pissa")},
}
_QUANT_HINT = "only optimum-quanto int8/int4 weight quantization is implemented"


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


def _unknown_key_message(raw_key: str) -> str:
    key = raw_key[2:] if raw_key.startswith("--") else raw_key
    if key in UNSUPPORTED_KEYS:
        return (f"config key {raw_key!r} is a SimpleTuner option that this trainer does not support: "
                f"{UNSUPPORTED_KEYS[key]}. Remove it from the config.")
    if key.startswith("sdnq_"):
        return f"config key {raw_key!r} is a SimpleTuner SDNQ option, not supported: {_QUANT_HINT}. Remove it."
    return (f"unknown config key {raw_key!r}{_closest(key, sorted(KNOWN_KEYS | set(ALIASES)))} "
            "Keys follow SimpleTuner's names; see trainer/config.py TrainConfig for the list.")


def _closest(key: str, candidates: list[str]) -> str:
    match = difflib.get_close_matches(key, candidates, n=1, cutoff=0.0)
    return f"; did you mean {match[0]!r}?" if match else ""


def _type_name(hint: Any) -> str:
    return {bool: "true or false", int: "a whole number", float: "a number", str: "a string"}.get(hint, str(hint))


def _split_optional(hint: Any) -> tuple[Any, bool]:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(hint)) == 2:
            return args[0], True
    return hint, False


def _convert(key: str, value: Any, hint: Any, *, from_json: bool) -> Any:
    """The value as the field's type. from_json also accepts SimpleTuner's string spellings ("1e-4", "true")."""
    if hint == _PATHS_HINT:
        return _convert_paths(key, value)
    base, optional = _split_optional(hint)
    if value is None:
        if optional:
            return None
        default = _DEFAULTS.get(key, dataclasses.MISSING)
        fix = f"; remove the key to use the default {default!r}" if default is not dataclasses.MISSING else ""
        raise ValueError(f"{key} must be {_expected(base)}, got null{fix}.")
    choices = _literal_choices(base)
    if choices is not None:
        if not isinstance(value, str) or value not in choices:
            hint_text = _CHOICE_HINTS.get(key, {}).get(value) if isinstance(value, str) else None
            if hint_text is None and key in ("base_model_precision", "text_encoder_1_precision") and isinstance(value, str):
                hint_text = _QUANT_HINT
            extra = f" ({hint_text})" if hint_text else ""
            raise ValueError(f"{key} must be one of {list(choices)}, got {value!r}{extra}.")
        return value
    if base is TreadConfig:
        if isinstance(value, TreadConfig):
            return value
        if from_json:
            return TreadConfig.from_dict(value)
        raise ValueError(f"tread_config must be a TreadConfig (use TrainConfig.from_dict for JSON), got {value!r}.")
    if base is bool:
        if isinstance(value, bool):
            return value
        if from_json and isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        raise ValueError(f"{key} must be true or false, got {value!r}.")
    if base is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if from_json and isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value):
            return int(value)
        raise ValueError(f"{key} must be a whole number, got {value!r}.")
    if base is float:
        number: Any = value
        if from_json and isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                raise ValueError(f"{key} must be a number, got {value!r}.") from None
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            raise ValueError(f"{key} must be a number, got {value!r}.")
        if not math.isfinite(number):
            raise ValueError(f"{key} must be a finite number, got {value!r}.")
        return float(number)
    if base is str:
        if isinstance(value, str):
            if from_json and optional and not value.strip() and key in _EMPTY_MEANS_NULL:
                return None  # SimpleTuner writes "" for "none" in these keys
            return value
        if from_json and key == "validation_resolution" and isinstance(value, int) and not isinstance(value, bool):
            return str(value)  # SimpleTuner accepts a bare number of pixels
        raise ValueError(f"{key} must be a string, got {value!r}.")
    raise AssertionError(f"config field {key} has an unhandled type {hint!r}")


_PATHS_HINT = str | tuple[str, ...] | None


def _convert_paths(key: str, value: Any) -> str | tuple[str, ...] | None:
    """One path (a string) or several (a JSON list of strings, kept as a tuple)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) and v.strip() for v in value):
        if len(set(value)) != len(value):
            fix = "give each dataset once (repeats weights it)" if key == "dataset_manifest" else "give each file once"
            raise ValueError(f"{key} lists a path twice ({list(value)}); {fix}.")
        return tuple(value)
    raise ValueError(f"{key} must be a path or a non-empty list of paths, got {value!r}.")


def _as_paths(value: str | tuple[str, ...] | None) -> tuple[str, ...]:
    if value is None:
        return ()
    return (value,) if isinstance(value, str) else value


_EMPTY_MEANS_NULL = frozenset({"resume_from_checkpoint", "validation_prompt", "validation_subject",
                               "user_prompt_library", "pretrained_transformer_model_name_or_path",
                               "pretrained_vae_model_name_or_path"})


def _expected(base: Any) -> str:
    choices = _literal_choices(base)
    if choices is not None:
        return f"one of {list(choices)}"
    if base is TreadConfig:
        return 'an object like {"routes": [...]}'
    return _type_name(base)


def _at_least(key: str, value: float, lo: float, *, fix: str | None = None) -> None:
    if value < lo:
        raise ValueError(f"{key} must be >= {lo}, got {value!r}" + (f"; {fix}." if fix else "."))


def _at_most(key: str, value: float, hi: float) -> None:
    if value > hi:
        raise ValueError(f"{key} must be <= {hi}, got {value!r}.")


def _positive(key: str, value: float, *, fix: str | None = None) -> None:
    if not value > 0:
        raise ValueError(f"{key} must be > 0, got {value!r}" + (f"; {fix}." if fix else "."))


def _in_unit(key: str, value: float, *, upper_open: bool) -> None:
    ok = 0.0 <= value < 1.0 if upper_open else 0.0 <= value <= 1.0
    if not ok:
        bounds = "[0, 1)" if upper_open else "[0, 1]"
        raise ValueError(f"{key} must be in {bounds}, got {value!r}.")


def _check_file(key: str, value: str | None, *, what: str, suffix: str | None = None) -> None:
    if value is None:
        return
    path = Path(value).expanduser()
    if not path.is_file():
        state = "is a folder" if path.is_dir() else "does not exist"
        raise ValueError(f"{key} {value!r} {state}; give {what}.")
    if suffix is not None and path.suffix.lower() != suffix:
        raise ValueError(f"{key} {value!r} is not a {suffix} file; give {what}.")


def _check_reference_image(key: str, value: str) -> None:
    """An existing image file PIL can decode, usable as a FLUX.2 reference (flux2.prepare_reference_pixels)."""
    if not value.strip():
        raise ValueError(f"{key} holds a blank path; give image files, or null for none.")
    _check_file(key, value, what="an image file (PNG, JPEG, WebP)")
    # Lazy: this module imports only the standard library (ComfyUI imports it at start-up).
    from PIL import Image, UnidentifiedImageError

    from .flux2 import prepare_reference_pixels

    try:
        with Image.open(Path(value).expanduser()) as image:
            image.load()  # decodes every pixel: a truncated file fails here, not at the first validation
            prepare_reference_pixels([image], input_name=f"{key} {value!r}")
    except UnidentifiedImageError:
        raise ValueError(f"{key} {value!r} is not an image file PIL can read; {_IMAGE_FIX}.") from None
    except (OSError, SyntaxError) as exc:
        raise ValueError(f"{key} {value!r} cannot be read as an image ({exc}); {_IMAGE_FIX}.") from None


_IMAGE_FIX = "give a PNG, JPEG or WebP image"


def _read_prompt_library(path: Path) -> dict[str, str]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"user_prompt_library {path} is not valid JSON: {exc.msg} at line {exc.lineno}.") from exc
    except OSError as exc:
        raise ValueError(f"user_prompt_library {path} cannot be read: {exc.strerror or exc}.") from exc
    except UnicodeDecodeError as exc:
        raise ValueError(f"user_prompt_library {path} is not UTF-8 text (byte {exc.start}); save it as UTF-8 JSON.") from None
    if not isinstance(data, dict) or not data:
        raise ValueError(f"user_prompt_library {path} must be a non-empty JSON object of {{name: prompt}}.")
    for name, prompt in data.items():
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"user_prompt_library {path}: entry {name!r} must be a non-empty prompt string, got {prompt!r}.")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
            raise ValueError(f"user_prompt_library {path}: name {name!r} may hold only letters, digits, ., - and _ "
                             "(it names the image files).")
    return dict(data)


def _opt_path(value: str | None) -> Path | None:
    return None if value is None else Path(value).expanduser()
