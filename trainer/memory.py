"""Peak accelerator memory of one training process, estimated before anything loads.

`estimate_peak_memory` counts every parameter of the transformer exactly (it builds the model from its
config on the meta device, which allocates nothing) and adds:

- weights: the frozen base in its storage dtype (bf16/fp16; bf16 shards under FSDP2 with bf16), or int8 /
  int4 for the quantized block Linears (quantize.py) plus their scales and one dequantized Linear (quanto
  dequantizes a weight for its matmul; int8-torchao stores int8 the same way and dequantizes one weight for
  its backward; fp8-torchao keeps the weights in their dtype plus the float8 copy of the one being multiplied:
  lowp_compute.py); under FSDP2 1/world of it plus the blocks gathered for compute;
  with group offload only the groups on the device plus what never leaves it;
- lora: LoRA weights, gradients and AdamW state in fp32 (16 bytes a parameter; DDP adds a gradient bucket
  copy; FSDP2 shards all of it);
- activations: what autograd keeps for backward. Per token and hidden unit a double block saves about 34
  (fp32) / 39 (bf16 autocast) values of the compute dtype and a single block about 27.5 / 31.5; LoRA dropout
  adds a dropped copy of each adapted layer's input and its mask. These coefficients were measured on the
  tiny model with torch.autograd.graph.saved_tensors_hooks (tests/unit/test_memory_estimate.py re-measures
  them); they scale with the hidden size, so they hold for FLUX.2-dev. With gradient checkpointing only each
  block's input is kept, plus one block recomputed during backward. A further half block (without its
  dropout copies) covers the gradients alive during a block's backward;
- overhead: the CUDA context and cuBLAS workspaces (about 1 GB) plus 10% of the rest for allocator
  fragmentation (none on the CPU).

bench/MEMORY.md compares the estimate with measured CPU peak RSS on the tiny model and lists FLUX.2-dev
figures. It is an estimate: attention kernels, torch.compile and allocator behaviour move the real peak by
some percent, so `fits` leaves the margin in the overhead term rather than pretending to be exact.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .flux2 import MAX_TEXT_TOKENS, PIXELS_PER_TOKEN
from .lowp_compute import STORED_BYTES_PER_WEIGHT

GB = 1024**3
CUDA_CONTEXT_GB = 1.0
FRAGMENTATION = 0.10

# Saved activations per token per hidden unit, in values of the compute dtype (see the module doc).
ACTIVATIONS_DOUBLE = {"fp32": 34.0, "bf16": 39.0}
ACTIVATIONS_SINGLE = {"fp32": 27.5, "bf16": 31.5}
ACTIVATIONS_OUTSIDE = 1.3  # embedders, norm_out, proj_out, the loss
BACKWARD_TRANSIENT = 0.5  # of one block's saved activations, alive while that block runs backward
SAVED_ATTENTION = 1.0  # a checkpointed block's attention output (gradient_checkpointing_save_attention)
INT4_GROUP = 128  # quanto qint4 weights: one scale and one shift (the default dtype) per 128 values

FLUX2_DEV_TRANSFORMER_CONFIG: dict[str, Any] = {
    "num_layers": 8, "num_single_layers": 48, "num_attention_heads": 48, "attention_head_dim": 128,
    "joint_attention_dim": 15360, "in_channels": 128, "mlp_ratio": 3.0, "timestep_guidance_channels": 256,
    "axes_dims_rope": [32, 32, 32, 32], "rope_theta": 2000, "guidance_embeds": True,
}
"""FLUX.2-dev's transformer (diffusers' Flux2Transformer2DModel defaults): 32.2B parameters, hidden 6144."""

_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
_QUANT_BYTES = {"int8-quanto": 1.0, "int4-quanto": 0.5, **{k: v for k, v in STORED_BYTES_PER_WEIGHT.items() if v}}
_COMPUTE_ONLY = tuple(k for k, v in STORED_BYTES_PER_WEIGHT.items() if v is None)  # fp8-torchao: weights keep their dtype


@dataclass(frozen=True, kw_only=True, slots=True)
class MemoryEstimate:
    """Estimated peak memory of one process, in GiB, split by what holds it."""

    weights_gb: float
    lora_gb: float
    """LoRA weights, gradients and optimizer state."""
    activations_gb: float
    overhead_gb: float
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def total_gb(self) -> float:
        return self.weights_gb + self.lora_gb + self.activations_gb + self.overhead_gb

    def fits(self, gb: float) -> bool:
        """Whether the estimated peak fits an accelerator with `gb` GiB (e.g. 24, 48, 80)."""
        return self.total_gb <= gb

    def breakdown(self) -> dict[str, float]:
        return {"weights": round(self.weights_gb, 3), "lora_and_optimizer": round(self.lora_gb, 3),
                "activations": round(self.activations_gb, 3), "overhead": round(self.overhead_gb, 3),
                "total": round(self.total_gb, 3)}

    def summary(self) -> str:
        b = self.breakdown()
        return (f"estimated peak {b['total']:.1f} GB per GPU (weights {b['weights']:.1f}, LoRA + optimizer "
                f"{b['lora_and_optimizer']:.2f}, activations {b['activations']:.1f}, overhead {b['overhead']:.1f})")


@dataclass(frozen=True, kw_only=True, slots=True)
class TransformerCounts:
    """Parameter counts of a FLUX.2 transformer, from its config (meta device, nothing allocated)."""

    hidden: int
    num_double: int
    num_single: int
    block_linear: int
    """Weights of the Linears inside blocks (what quantization converts)."""
    block_other: int
    """Biases and norm weights inside blocks."""
    outside: int
    """Everything outside the blocks."""
    largest_block: int
    largest_linear: int
    """Weights of the largest Linear (a quantized one is dequantized to compute dtype for each matmul)."""
    lora_params: int
    lora_inputs_double: int
    """Sum of the in_features of the adapted Linears of one double block (per token, for LoRA dropout)."""
    lora_inputs_single: int

    @property
    def total(self) -> int:
        return self.block_linear + self.block_other + self.outside


def count_transformer(transformer_config: dict[str, Any], *, lora_rank: int, lora_target: str) -> TransformerCounts:
    """Exact parameter counts of the transformer and of the LoRA the preset adds at this rank (built once per
    config, rank and preset: the preflight, distributed "auto" and gradient_checkpointing_auto each estimate)."""
    return _count_transformer(json.dumps(transformer_config, sort_keys=True), lora_rank, lora_target)


@functools.lru_cache(maxsize=16)
def _count_transformer(config_json: str, lora_rank: int, lora_target: str) -> TransformerCounts:
    import torch
    from accelerate import init_empty_weights
    from diffusers import Flux2Transformer2DModel

    from .lora import lora_target_modules

    config = {k: v for k, v in json.loads(config_json).items() if not k.startswith("_")}
    with init_empty_weights():
        model = Flux2Transformer2DModel.from_config(config)
    blocks = list(model.transformer_blocks) + list(model.single_transformer_blocks)
    linear = sum(m.weight.numel() for b in blocks for m in b.modules() if isinstance(m, torch.nn.Linear))
    in_blocks = sum(p.numel() for b in blocks for p in b.parameters())
    total = sum(p.numel() for p in model.parameters())
    lora = 0
    inputs = {"transformer_blocks": 0, "single_transformer_blocks": 0}
    for name in lora_target_modules(model, preset=lora_target):
        module = model.get_submodule(name)
        lora += lora_rank * (module.in_features + module.out_features)
        kind = name.split(".")[0]
        if name.split(".")[1] == "0":
            inputs[kind] += module.in_features
    return TransformerCounts(
        hidden=model.config.num_attention_heads * model.config.attention_head_dim,
        num_double=len(model.transformer_blocks), num_single=len(model.single_transformer_blocks),
        block_linear=linear, block_other=in_blocks - linear, outside=total - in_blocks,
        largest_block=max(sum(p.numel() for p in b.parameters()) for b in blocks),
        largest_linear=max(m.weight.numel() for b in blocks for m in b.modules() if isinstance(m, torch.nn.Linear)),
        lora_params=lora,
        lora_inputs_double=inputs["transformer_blocks"], lora_inputs_single=inputs["single_transformer_blocks"],
    )


def _check_choice(key: str, value: str, choices) -> None:
    if value not in choices:
        raise ValueError(f"{key} must be one of {sorted(choices)}, got {value!r}.")


def estimate_peak_memory(
    transformer_config: dict[str, Any],
    *,
    mixed_precision: str = "bf16",
    base_model_precision: str = "no_change",
    base_model_default_dtype: str = "bf16",
    lora_rank: int = 16,
    lora_target: str = "all",
    lora_dropout: float = 0.0,
    batch_size: int = 1,
    image_tokens: int | None = None,
    resolution: tuple[int, int] = (1024, 1024),
    text_tokens: int = MAX_TEXT_TOKENS,
    gradient_checkpointing: bool = True,
    gradient_checkpointing_interval: int | None = None,
    save_attention: bool = False,
    group_offload: bool = False,
    group_offload_type: str = "block_level",
    group_offload_blocks_per_group: int = 1,
    group_offload_use_stream: bool = False,
    distributed: str = "none",
    world_size: int = 1,
    device: str = "cuda",
    extra_weights_gb: float = 0.0,
) -> MemoryEstimate:
    """Peak memory of one training process (see the module doc for the model behind each term).

    image_tokens overrides resolution (pixels, 16 per token side) when given, e.g. a bucket plus its
    reference images; text_tokens is 512 in training (FLUX.2 pads every caption to 512). mixed_precision "no" computes in fp32. extra_weights_gb adds other resident weights
    (the validation VAE). device "cpu" drops the CUDA overhead (for validating against CPU RSS).
    gradient_checkpointing_interval: with gradient_checkpointing, checkpoint blocks 0, N, 2N, ... only (None: every
    block); the others keep all their activations. save_attention: checkpointed blocks also keep their attention
    output (SAVED_ATTENTION, measured on the tiny model: bench/RESULTS.md).
    """
    _check_choice("mixed_precision", mixed_precision, ("bf16", "fp16", "no"))
    _check_choice("base_model_precision", base_model_precision, ("no_change", *_COMPUTE_ONLY, *_QUANT_BYTES))
    _check_choice("base_model_default_dtype", base_model_default_dtype, ("bf16", "fp32"))
    _check_choice("distributed", distributed, ("fsdp2", "ddp", "none"))
    _check_choice("group_offload_type", group_offload_type, ("block_level", "leaf_level"))
    if batch_size < 1 or world_size < 1 or lora_rank < 1 or group_offload_blocks_per_group < 1:
        raise ValueError("batch_size, world_size, lora_rank and group_offload_blocks_per_group must be >= 1.")
    counts = count_transformer(transformer_config, lora_rank=lora_rank, lora_target=lora_target)
    compute = "fp32" if mixed_precision == "no" else "bf16"
    act_bytes = _BYTES[compute]
    quantized = base_model_precision in _QUANT_BYTES
    fsdp = distributed == "fsdp2" and world_size > 1
    ddp = distributed in ("ddp", "fsdp2") and world_size > 1 and not fsdp

    # -- weights ---------------------------------------------------------------------------------------
    if fsdp:
        # The frozen base sharded in its storage dtype (bf16 under bf16 mixed precision, else fp32: model.py's
        # _SHARD_DTYPES); the root's own layers and up to two blocks (current + prefetch) gathered for compute.
        gathered = (counts.outside + 2 * counts.largest_block) * act_bytes
        weights = counts.total * (2 if mixed_precision == "bf16" else 4) / world_size + gathered
    else:
        storage = base_model_default_dtype if quantized else ("fp32" if mixed_precision == "no" else mixed_precision)
        rest_bytes = _BYTES[storage]
        if quantized:
            per_weight = _QUANT_BYTES[base_model_precision]
            if base_model_precision == "int4-quanto":
                per_weight += 2 * rest_bytes / INT4_GROUP
            # quanto dequantizes a quantized weight for its matmul: one Linear in the compute dtype at a time.
            block_bytes = (counts.block_linear * per_weight + counts.block_other * rest_bytes
                           + counts.largest_linear * act_bytes)
        else:
            block_bytes = (counts.block_linear + counts.block_other) * rest_bytes
        outside_bytes = counts.outside * rest_bytes
        if group_offload:
            resident_groups = 2 if group_offload_use_stream else 1  # the running group (+ the prefetched one)
            if group_offload_type == "block_level":
                on_device = resident_groups * group_offload_blocks_per_group * counts.largest_block * rest_bytes
            else:
                on_device = resident_groups * counts.largest_block * rest_bytes / 4  # about the largest leaf
            weights = outside_bytes + min(on_device, block_bytes)
        else:
            weights = outside_bytes + block_bytes
    if base_model_precision in _COMPUTE_ONLY:
        weights += counts.largest_linear  # the float8 copy (1 byte a weight) of the weight being multiplied

    # -- LoRA, gradients, AdamW ------------------------------------------------------------------------
    lora_bytes = counts.lora_params * 16  # fp32 weight + grad + exp_avg + exp_avg_sq
    if ddp:
        lora_bytes += counts.lora_params * 4  # DDP's gradient bucket
    if fsdp:
        lora_bytes /= world_size

    # -- activations ------------------------------------------------------------------------------------
    if image_tokens is None:
        image_tokens = (resolution[0] // PIXELS_PER_TOKEN) * (resolution[1] // PIXELS_PER_TOKEN)
    tokens = batch_size * (image_tokens + text_tokens)
    unit = tokens * counts.hidden * act_bytes  # one value per token and hidden unit
    dropout_factor = (1 + 1 / act_bytes) if lora_dropout > 0 else 0.0  # dropped input + its bool mask
    # A double block's adapted layers are split between the image and the text stream (mirrored), and
    # each token goes through one stream: half of the block's adapted inputs per token.
    double = ACTIVATIONS_DOUBLE[compute] + dropout_factor * counts.lora_inputs_double / 2 / counts.hidden
    single = ACTIVATIONS_SINGLE[compute] + dropout_factor * counts.lora_inputs_single / counts.hidden
    largest = max(double if counts.num_double else 0.0, single if counts.num_single else 0.0)
    # The gradients alive during a block's backward follow its activations, not the dropout copies (a dropped copy
    # and its mask get no gradient of their own): measured on the tiny model, dropout adds 11 MB to a checkpointed
    # step where 1.5 blocks' copies would be 45 MB (tests/unit/test_memory_estimate.py).
    largest_gradients = max(ACTIVATIONS_DOUBLE[compute] if counts.num_double else 0.0,
                            ACTIVATIONS_SINGLE[compute] if counts.num_single else 0.0)
    every = (gradient_checkpointing_interval or 1) if gradient_checkpointing else None
    # Checkpointed blocks keep their input (both streams / the joint one), plus the attention output with
    # save_attention; the others all their activations.
    ckpt_double = sum(1 for i in range(counts.num_double) if every is not None and i % every == 0)
    ckpt_single = sum(1 for i in range(counts.num_double, counts.num_double + counts.num_single)
                      if every is not None and i % every == 0)
    per_checkpointed = 1.0 + (SAVED_ATTENTION if save_attention else 0.0)
    kept = ((ckpt_double + ckpt_single) * per_checkpointed + (counts.num_double - ckpt_double) * double
            + (counts.num_single - ckpt_single) * single)
    # During backward one block's full activations exist again (a recomputed block) plus its gradients.
    transient = largest * (1 if ckpt_double + ckpt_single else 0) + largest_gradients * BACKWARD_TRANSIENT
    activations = unit * (kept + ACTIVATIONS_OUTSIDE + transient)

    weights += extra_weights_gb * GB
    subtotal = weights + lora_bytes + activations
    overhead = 0.0 if device == "cpu" else CUDA_CONTEXT_GB * GB + FRAGMENTATION * subtotal
    return MemoryEstimate(
        weights_gb=weights / GB, lora_gb=lora_bytes / GB, activations_gb=activations / GB,
        overhead_gb=overhead / GB,
        details={"parameters": counts.total, "block_linear_parameters": counts.block_linear,
                 "lora_parameters": counts.lora_params, "tokens_per_sample": image_tokens + text_tokens,
                 "compute_dtype": compute, "sharded": fsdp, "world_size": world_size},
    )


DDP_BROADCAST_BUCKET = 250 * 1024**2  # torch DDP's broadcast_bucket_size: one flat copy at a time
PROCESS_HOST_GB = {"cpu": 0.4, "cuda": 3.0}
"""Host RAM of a training process before any weight: torch, diffusers and the process group. CPU: 0.37 GB
measured (bench/load_memory.py base_mb); CUDA: the CUDA runtime and kernel libraries add host mappings of a few
GB (typical figure; not measured here, no GPU was lent)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class HostMemoryEstimate:
    """Estimated host RAM (system memory) of one training process, in GiB: what the operating system must give it
    while the transformer loads and while it trains."""

    load_gb: float
    steady_gb: float
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def peak_gb(self) -> float:
        return max(self.load_gb, self.steady_gb)

    def summary(self, *, processes: int = 1) -> str:
        per = f"{self.peak_gb:.1f} GB host RAM per process (loading {self.load_gb:.1f}, training {self.steady_gb:.1f})"
        return per if processes == 1 else f"{per}, {self.peak_gb * processes:.1f} GB for {processes} processes"


def estimate_host_memory(
    transformer_config: dict[str, Any],
    *,
    mixed_precision: str = "bf16",
    base_model_precision: str = "no_change",
    base_model_default_dtype: str = "bf16",
    group_offload: bool = False,
    distributed: str = "none",
    world_size: int = 1,
    device: str = "cuda",
    single_file: bool = False,
    device_estimate: MemoryEstimate | None = None,
) -> HostMemoryEstimate:
    """Host RAM of one training process, from how trainer/model.py loads (each weight read once, straight into
    its tensor: model_files.load_transformer):

    - on an accelerator, without offload: the weights pass through host memory one tensor at a time, except that
      an FSDP2 rank fills its shard on the CPU before moving it (1/world of the base) and a quantized base keeps
      one block in base_model_default_dtype plus quanto's temporaries while that block is quantized;
    - with group offload the offloaded blocks live in host memory for the whole run (pinned with streams);
    - on the CPU everything the accelerator would hold is host memory: device_estimate (estimate_peak_memory with
      device "cpu"), or, without it, the weights alone;
    - a single-file transformer (pretrained_transformer_model_name_or_path) loads whole, with its converted copy
      (two copies in the load dtype) before anything else happens;

    plus PROCESS_HOST_GB and, off the CPU, FRAGMENTATION of the rest as a margin. bench/load_memory.py measures
    the CPU slopes this reproduces (bench/MEMORY.md).
    """
    _check_choice("distributed", distributed, ("fsdp2", "ddp", "none"))
    counts = count_transformer(transformer_config, lora_rank=1, lora_target="all")
    quantized = base_model_precision in _QUANT_BYTES
    fsdp = distributed == "fsdp2" and world_size > 1 and not single_file
    if quantized:
        storage = _BYTES[base_model_default_dtype]
    elif fsdp:
        storage = 2 if mixed_precision == "bf16" else 4  # model.py's _SHARD_DTYPES
    else:
        storage = _BYTES["fp32" if mixed_precision == "no" else mixed_precision]
    full = counts.total * storage
    one_tensor = counts.largest_linear * storage  # a read buffer (file dtype differs) or a tensor in transit
    # while loading, beside what stays: quanto quantizes one block read in default dtype, with fp32 temporaries
    transient = counts.largest_block * storage + 2 * counts.largest_linear * 4 if quantized else one_tensor
    if device == "cpu":  # the host is the device: what it holds is the accelerator estimate's
        weights = device_estimate.weights_gb * GB if device_estimate is not None else full
        steady = device_estimate.total_gb * GB if device_estimate is not None else full
        load = weights + transient
        if distributed == "ddp" and world_size > 1:
            load += min(DDP_BROADCAST_BUCKET, full)  # DDP's start-up broadcast copies parameters bucket by bucket
    elif fsdp:  # the shard is filled on the CPU, then moved
        load, steady = full / world_size + one_tensor, 0.0
    elif group_offload and not quantized:  # offloaded blocks stay in host memory
        steady = (counts.block_linear + counts.block_other) * storage
        load = steady + one_tensor
    elif quantized:  # the unquantized rest waits on the CPU until the last block is done
        load, steady = counts.outside * storage + transient, 0.0
    else:  # each weight goes to the device as it is read
        load, steady = one_tensor, 0.0
    if single_file:  # diffusers converts a whole single-file checkpoint before the model exists
        load = max(load, 2 * full)
    base = PROCESS_HOST_GB["cpu" if device == "cpu" else "cuda"] * GB
    margin = 1.0 if device == "cpu" else 1 + FRAGMENTATION  # as estimate_peak_memory: the CPU term is measured
    load_gb, steady_gb = (base + margin * load) / GB, (base + margin * steady) / GB
    return HostMemoryEstimate(load_gb=load_gb, steady_gb=steady_gb,
                              details={"process_gb": base / GB, "load_weights_gb": load / GB,
                                       "resident_weights_gb": steady / GB, "single_file": single_file})


def _largest_item_tokens(manifest_path: Path) -> int | None:
    """Image tokens of the largest sample (bucket plus reference images) of a built dataset, or None."""
    from .manifest import load_manifest

    try:
        manifest = load_manifest(manifest_path)
    except (ValueError, OSError):
        return None
    best = 0
    for item in manifest.items:
        tokens = (item.bucket[0] // PIXELS_PER_TOKEN) * (item.bucket[1] // PIXELS_PER_TOKEN)
        for ref in getattr(item, "references", ()):
            tokens += (ref.bucket[0] // PIXELS_PER_TOKEN) * (ref.bucket[1] // PIXELS_PER_TOKEN)
        best = max(best, tokens)
    return best or None


def estimate_for_config(config: Any, *, world_size: int, device: str = "cuda", **overrides: Any) -> MemoryEstimate:
    """The estimate for a TrainConfig run on `world_size` processes (largest bucket of its dataset, or
    the dataset's resolution when only data_backend_config is given: then 1024 px is assumed). overrides replace
    estimate_peak_memory arguments (checkpointing.resolve_memory tries intervals)."""
    sizes = [t for p in config.data.dataset_manifests if (t := _largest_item_tokens(p)) is not None]
    tokens = max(sizes) if sizes else None
    extra = 0.0
    if config.validation.enabled and not config.offload.during_startup:
        extra = _vae_gb(Path(config.model.root))
    settings = dict(
        lora_rank=config.lora.rank, lora_target=config.lora.target, lora_dropout=config.lora.dropout,
        batch_size=config.data.train_batch_size, image_tokens=tokens,
        gradient_checkpointing=config.memory.gradient_checkpointing,
        gradient_checkpointing_interval=config.memory.gradient_checkpointing_interval,
        save_attention=config.memory.checkpointing.save_attention,
        group_offload_type=config.offload.offload_type,
        group_offload_blocks_per_group=config.offload.blocks_per_group,
        group_offload_use_stream=config.offload.use_stream, extra_weights_gb=extra,
    )
    return estimate_peak_memory(_transformer_config(config),
                                **_shared_settings(config, world_size=world_size, device=device),
                                **{**settings, **overrides})


def estimate_host_for_config(config: Any, *, world_size: int, device: str = "cuda") -> HostMemoryEstimate:
    """Host RAM per process of a TrainConfig run on `world_size` processes of this machine."""
    return estimate_host_memory(
        _transformer_config(config), **_shared_settings(config, world_size=world_size, device=device),
        single_file=config.model.transformer_file is not None,
        device_estimate=estimate_for_config(config, world_size=world_size, device="cpu") if device == "cpu" else None,
    )


def _transformer_config(config: Any) -> dict[str, Any]:
    return json.loads((Path(config.model.root) / "transformer" / "config.json").read_text())


def _shared_settings(config: Any, *, world_size: int, device: str) -> dict[str, Any]:
    """The settings both estimates read, named as their keyword arguments."""
    return {"mixed_precision": config.memory.mixed_precision,
            "base_model_precision": config.quantization.base_model_precision,
            "base_model_default_dtype": config.quantization.base_model_default_dtype,
            "group_offload": config.offload.enabled, "distributed": config.parallelism.distributed,
            "world_size": world_size, "device": device}


def _vae_gb(root: Path) -> float:
    """fp32 size of the VAE's weights (validation keeps it loaded), from its config on the meta device."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKLFlux2

    config = json.loads((root / "vae" / "config.json").read_text())
    with init_empty_weights():
        vae = AutoencoderKLFlux2.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    return sum(p.numel() for p in vae.parameters()) * 4 / GB


def available_host_memory_gb() -> float | None:
    """Memory the operating system can give new work now (Linux MemAvailable: free plus reclaimable cache), GiB;
    None where it cannot be read."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 / GB
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / GB
    except (ValueError, OSError, AttributeError):
        return None


def accelerator_memory_gb(device_index: int = 0) -> float | None:
    """Total memory of CUDA device `device_index` in GiB, or None without CUDA."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(device_index).total_memory / GB
