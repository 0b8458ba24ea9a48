"""How long a run takes on the GPU this process sees: an estimate from FLOPs and a measured fraction of the GPU's peak.

seconds per step = FLOPs per step and process (trainer/flops.py, from the model's real shapes and the run's settings)
/ (the GPU's dense bf16 tensor peak x EFFICIENCY).

- The peaks are vendor figures (GPU_PEAKS; bench/GPU_THROUGHPUT.md cites the datasheet or whitepaper of each). A
  GPU is found by torch.cuda.get_device_name(). A GPU that is not in the table, the CPU, or fp32 compute gets no
  time estimate, only a line that says so. Nothing is guessed.
- EFFICIENCY is what the trainer's step reached on the one GPU it was timed on. That is bench/gpu_step.py on an
  H200: a FLUX.2-dev-width slice, all-layers LoRA rank 16, 4096 + 512 tokens, bf16, no checkpointing, no TREAD,
  158.5 ms a step (bench/RESULTS.md). The same count gives 41.2 % of the H200's peak there. With that one
  figure the count predicts the slice's TREAD and checkpointing steps within 3 % (tests/unit/test_throughput.py).
  Other GPUs, other sizes and fewer tokens (short sequences use a GPU less well) are assumed to reach the same
  fraction: the result is an estimate and says so.
- Not counted, and named in the estimate when they apply: communication between processes, quanto's
  dequantization, group offload's transfers, data loading, checkpoint saving and start-up. Validation renders are
  counted (transformer forwards only) and reported apart.

The preflight (trainer/preflight.py) shows the estimate on the Train LoRA node before the first step and writes it to
the run folder. It never refuses a run for time.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .flops import (
    NO_LORA,
    Flops,
    LoraShape,
    SampleTokens,
    TransformerShape,
    forward_flops,
    sample_flops,
    step_flops,
)
from .flux2 import MAX_TEXT_TOKENS, PIXELS_PER_TOKEN


@dataclass(frozen=True, kw_only=True, slots=True)
class GpuPeak:
    """A GPU's dense (no sparsity) bf16 tensor-core peak, with FP32 accumulation as torch's bf16 matmuls use."""

    name: str
    pattern: str
    """Regular expression matched in full against the normalised device name (normalise_device_name)."""
    bf16_tflops: float
    source: str
    """Where the figure comes from (details in bench/GPU_THROUGHPUT.md)."""


_HOPPER = "NVIDIA {} Tensor Core GPU datasheet: BF16 Tensor Core {} TFLOPS with sparsity, halved"
GPU_PEAKS: tuple[GpuPeak, ...] = (
    GpuPeak(name="H200 SXM", pattern=r"h200( sxm\S*)?( \d+gb( hbm3e)?)?", bf16_tflops=989.5,
            source=_HOPPER.format("H200", "1,979")),
    GpuPeak(name="H200 NVL", pattern=r"h200 nvl", bf16_tflops=835.5, source=_HOPPER.format("H200", "1,671")),
    GpuPeak(name="H100 SXM", pattern=r"h100( sxm\S*)?( \d+gb)? hbm3", bf16_tflops=989.5,
            source=_HOPPER.format("H100", "1,979")),
    GpuPeak(name="H100 NVL", pattern=r"h100 nvl", bf16_tflops=835.5, source=_HOPPER.format("H100", "1,671")),
    GpuPeak(name="H100 PCIe", pattern=r"h100 pcie( \d+gb)?", bf16_tflops=756.5,
            source=_HOPPER.format("H100", "1,513")),
    GpuPeak(name="A100", pattern=r"a100([- ](sxm4?|pcie)[- ]\d+gb|[- ]\d+gb[- ](sxm4?|pcie))?", bf16_tflops=312.0,
            source="NVIDIA A100 Tensor Core GPU datasheet: BF16 Tensor Core 312 TFLOPS (624 with sparsity)"),
    GpuPeak(name="L40S", pattern=r"l40s", bf16_tflops=362.05,
            source="NVIDIA L40S datasheet: BF16 Tensor Core 362.05 TFLOPS (733 with sparsity)"),
    GpuPeak(name="L40", pattern=r"l40", bf16_tflops=181.05,
            source="NVIDIA L40 datasheet: BF16 Tensor Core 181.05 TFLOPS (362.1 with sparsity)"),
    GpuPeak(name="A40", pattern=r"a40", bf16_tflops=149.7,
            source="NVIDIA A40 datasheet: BF16 Tensor Core 149.7 TFLOPS (299.4 with sparsity)"),
    GpuPeak(name="A10", pattern=r"a10", bf16_tflops=125.0,
            source="NVIDIA A10 datasheet: BF16 Tensor Core 125 TFLOPS (250 with sparsity)"),
    GpuPeak(name="L4", pattern=r"l4", bf16_tflops=121.0,
            source="NVIDIA L4 datasheet: BF16 Tensor Core 242 TFLOPS with sparsity, halved"),
    GpuPeak(name="RTX A6000", pattern=r"rtx a6000", bf16_tflops=154.8,
            source="NVIDIA Ampere GA102 GPU architecture whitepaper: RTX A6000 peak BF16 tensor TFLOPS with FP32 "
                   "accumulate 154.8 (309.7 with sparsity)"),
    GpuPeak(name="GeForce RTX 3090", pattern=r"rtx 3090", bf16_tflops=71.0,
            source="NVIDIA Ampere GA102 GPU architecture whitepaper: GeForce RTX 3090 peak BF16 tensor TFLOPS with "
                   "FP32 accumulate 71 (142 with sparsity)"),
    GpuPeak(name="GeForce RTX 4090", pattern=r"rtx 4090", bf16_tflops=165.2,
            source="NVIDIA Ada GPU architecture whitepaper: GeForce RTX 4090 peak BF16 tensor TFLOPS with FP32 "
                   "accumulate 165.2 (330.4 with sparsity)"),
    GpuPeak(name="GeForce RTX 5090", pattern=r"rtx 5090", bf16_tflops=209.5,
            source="NVIDIA RTX Blackwell GPU architecture whitepaper: GeForce RTX 5090 peak FP16/BF16 tensor TFLOPS "
                   "with FP32 accumulate 209.5 (419 with sparsity)"),
)
"""Dense bf16 peaks of common GPUs (bench/GPU_THROUGHPUT.md). Variants with other clocks or unit counts (RTX 4090 D,
RTX 3090 Ti, laptop GPUs, A10G) do not match and get no estimate."""


def normalise_device_name(name: str) -> str:
    """'NVIDIA GeForce RTX 4090' -> 'rtx 4090': lower case, without the vendor and brand words."""
    words = [w for w in name.casefold().split() if w not in ("nvidia", "geforce")]
    return " ".join(words)


def lookup_peak(device_name: str) -> GpuPeak | None:
    """The table's entry for torch.cuda.get_device_name()'s answer, or None for a device it does not list."""
    key = normalise_device_name(device_name)
    return next((gpu for gpu in GPU_PEAKS if re.fullmatch(gpu.pattern, key)), None)


def visible_device_name() -> str:
    """torch.cuda.get_device_name() of the first GPU this process sees (the one the run's rank 0 uses), or "cpu"."""
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True, kw_only=True, slots=True)
class MeasuredStep:
    """A trainer step timed on a GPU: what EFFICIENCY is derived from."""

    device: str
    transformer: dict[str, Any]
    image_tokens: int
    text_tokens: int
    lora_rank: int
    seconds: float
    source: str

    def flops(self) -> Flops:
        shape = TransformerShape.from_config(self.transformer)
        return sample_flops(shape, lora=LoraShape.preset("all", rank=self.lora_rank), image_tokens=self.image_tokens,
                            text_tokens=self.text_tokens)

    def efficiency(self) -> float:
        """FLOPs per second reached / the device's peak."""
        gpu = lookup_peak(self.device)
        assert gpu is not None, f"{self.device} is not in GPU_PEAKS"
        return self.flops().total / self.seconds / (gpu.bf16_tflops * 1e12)


MEASURED_STEP = MeasuredStep(
    device="NVIDIA H200",
    transformer={"num_layers": 2, "num_single_layers": 4, "num_attention_heads": 48, "attention_head_dim": 128,
                 "joint_attention_dim": 15360, "in_channels": 128, "mlp_ratio": 3.0, "guidance_embeds": True},
    image_tokens=4096, text_tokens=512, lora_rank=16, seconds=0.1585,
    source="bench/RESULTS.md, 'Full-width FLUX.2 slice on a GPU' (bench/gpu_step.py, 2026-11-27): no TREAD, no "
           "checkpointing, median of 10 steps",
)
EFFICIENCY = MEASURED_STEP.efficiency()
"""Fraction of the bf16 peak the trainer's step reached where it was measured (0.412)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class TimeEstimate:
    """Estimated time of a run's steps on one device (every process is assumed to have one like it)."""

    device: str
    steps: int
    """Optimizer steps still to run."""
    flops_per_step: Flops
    """Per process."""
    gpu: GpuPeak | None
    seconds_per_step: float | None
    """None: no estimate (no_estimate says why)."""
    validation_seconds: float | None = None
    """All validation renders of the run (transformer forwards only), or None without validation."""
    no_estimate: str | None = None
    caveats: tuple[str, ...] = ()
    """What the estimate leaves out that this run does (it then is a lower bound)."""
    inputs: dict[str, Any] = field(default_factory=dict)
    """What the FLOP count was computed from (estimate_time_for_config), for the run folder's record."""

    @property
    def total_seconds(self) -> float | None:
        if self.seconds_per_step is None:
            return None
        return self.seconds_per_step * self.steps + (self.validation_seconds or 0.0)

    def summary(self) -> str:
        if self.seconds_per_step is None:
            return f"no time estimate for {self.device}: {self.no_estimate}"
        assert self.gpu is not None
        text = (f"estimated time: ~{_duration(self.seconds_per_step)}/step, ~{_duration(self.total_seconds)} for "
                f"{self.steps} steps")
        if self.validation_seconds:
            text += f" (validation ~{_duration(self.validation_seconds)} of it)"
        text += (f" on {self.device} (an estimate: {self.flops_per_step.total / 1e12:.3g} TFLOP/step at "
                 f"{EFFICIENCY:.0%} of its {self.gpu.bf16_tflops:g} TFLOP/s bf16 peak, bench/GPU_THROUGHPUT.md)")
        if self.caveats:
            text += "; not counted: " + ", ".join(self.caveats)
        return text

    def short(self) -> str:
        """One short line for the node's progress line before the first step."""
        if self.seconds_per_step is None:
            return f"no time estimate for {self.device}"
        return f"estimate: ~{_duration(self.seconds_per_step)}/step, ~{_duration(self.total_seconds)} total"

    def as_dict(self) -> dict[str, Any]:
        return {
            "estimate": True, "device": self.device, "steps": self.steps,
            "flops_per_step": self.flops_per_step.as_dict(),
            "gpu": None if self.gpu is None else {"name": self.gpu.name, "bf16_tflops": self.gpu.bf16_tflops,
                                                  "source": self.gpu.source},
            "efficiency": EFFICIENCY, "efficiency_source": MEASURED_STEP.source,
            "seconds_per_step": self.seconds_per_step, "validation_seconds": self.validation_seconds,
            "total_seconds": self.total_seconds, "no_estimate": self.no_estimate, "not_counted": list(self.caveats),
            "summary": self.summary(), "inputs": self.inputs,
        }


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    if seconds < 1:
        return f"{seconds * 1e3:.3g} ms"
    if seconds < 10:
        return f"{seconds:.2g} s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def estimate_time(flops_per_step: Flops, *, device_name: str, steps: int, compute_dtype: str,
                  validation_flops: float = 0.0, caveats: tuple[str, ...] = (),
                  inputs: dict[str, Any] | None = None) -> TimeEstimate:
    """The time of `steps` steps of flops_per_step on device_name (torch.cuda.get_device_name(), or "cpu")."""
    gpu = None if device_name == "cpu" else lookup_peak(device_name)
    reason = None
    if device_name == "cpu":
        reason = "training on the CPU (bench/GPU_THROUGHPUT.md lists GPUs only)"
    elif gpu is None:
        reason = "this GPU is not in bench/GPU_THROUGHPUT.md's table of bf16 peaks"
    elif compute_dtype == "fp32":
        reason = "fp32 compute (mixed_precision no); the table holds bf16 tensor-core peaks"
    if reason is not None:
        return TimeEstimate(device=device_name, steps=steps, flops_per_step=flops_per_step, gpu=gpu,
                            seconds_per_step=None, no_estimate=reason, inputs=inputs or {})
    rate = gpu.bf16_tflops * 1e12 * EFFICIENCY
    return TimeEstimate(device=device_name, steps=steps, flops_per_step=flops_per_step, gpu=gpu,
                        seconds_per_step=flops_per_step.total / rate,
                        validation_seconds=validation_flops / rate if validation_flops else None, caveats=caveats,
                        inputs=inputs or {})


def dataset_samples(manifest_paths: tuple[Path, ...]) -> list[SampleTokens]:
    """Each training item's target and reference tokens, weighted by its repeats. An item whose references are
    used one at random (conditioning_multidataset_sampling random) counts their mean."""
    from .manifest import load_manifest

    samples = []
    for path in manifest_paths:
        manifest = load_manifest(path)
        for index, item in enumerate(manifest.items):
            refs = [_tokens(ref.bucket) for ref in item.references]
            if refs and manifest.sampling_mode(index) == "random":
                refs = [sum(refs) / len(refs)]
            samples.append(SampleTokens(weight=item.repeats, image_tokens=_tokens(item.bucket),
                                        reference_tokens=round(sum(refs))))
    return samples


def _tokens(size: tuple[int, int]) -> int:
    return (size[0] // PIXELS_PER_TOKEN) * (size[1] // PIXELS_PER_TOKEN)


def estimate_time_for_config(config: Any, *, world_size: int, device_name: str | None = None,
                             start_step: int = 0) -> TimeEstimate:
    """The time estimate of a TrainConfig run on world_size processes, from optimizer step start_step (a resumed
    run) to its last step."""
    from .flavours import spec, uses_classifier_free_guidance
    from .model_files import inspect_model_folder

    device = visible_device_name() if device_name is None else device_name
    shape = TransformerShape.from_config(json.loads((Path(config.model.root) / "transformer" / "config.json")
                                                    .read_text(encoding="utf-8")))
    caveats = []
    lora = LoraShape.preset(config.lora.target, rank=config.lora.rank)
    if config.lora.lycoris is not None:
        lora = NO_LORA
        caveats.append("the LoKr adapter's own FLOPs")
    samples = dataset_samples(tuple(config.data.dataset_manifests))
    if not samples:  # a data_backend_config is built when the run starts
        samples = [SampleTokens(weight=1.0, image_tokens=_tokens((1024, 1024)))]
        caveats.append("the dataset's sizes (not built yet: 1024x1024 assumed)")
    routes = () if config.tread is None else tuple(
        (start, end, ratio) for ratio, start, end in config.tread.resolved_routes(shape.num_blocks))
    total = config.schedule.total_steps
    batch, world = config.data.train_batch_size, world_size
    rollout = config.objective.scheduled_sampling.mean_rollout_forwards(
        first_step=start_step, last_step=total - 1, batch_size=batch, world_size=world)
    zero_refs = config.objective.reference_timestep == "zero"
    per_step = step_flops(shape, lora=lora, samples=samples, text_tokens=MAX_TEXT_TOKENS, batch_size=batch,
                          gradient_accumulation=config.data.gradient_accumulation_steps, routes=routes,
                          checkpoint_every=config.memory.checkpoint_every, rollout_forwards=rollout,
                          zero_reference_timestep=zero_refs)
    validation = 0.0
    settings = config.validation
    inputs: dict[str, Any] = {
        "transformer": asdict(shape), "lora": {"target": config.lora.target, "rank": lora.rank,
                                               "type": config.lora.lora_type},
        "samples": _sample_table(samples), "text_tokens": MAX_TEXT_TOKENS, "batch_size": batch,
        "gradient_accumulation_steps": config.data.gradient_accumulation_steps, "num_processes": world,
        "first_step": start_step, "max_train_steps": total, "checkpoint_every": config.memory.checkpoint_every,
        "tread_routes": [{"start": a, "end": b, "selection_ratio": r} for a, b, r in routes],
        "rollout_forwards_per_micro_batch": rollout, "reference_timestep": config.objective.reference_timestep,
        "mixed_precision": config.memory.mixed_precision}
    if settings.enabled:
        # ValidationRun.due: every validation_steps steps and after the last one, counted over steps still to run.
        every = settings.every_steps
        rounds = ((total // every - start_step // every) if every > 0 else 0) + (0 if every > 0 and total % every == 0
                                                                                  else 1)
        rounds = rounds if total > start_step else 0
        renders = len(settings.prompts()) * settings.num_images * rounds
        if config.ema.enabled and config.ema.validation == "comparison":
            renders *= 2
        folder = inspect_model_folder(config.model.root, flavour=config.model.flavour)
        cfg = uses_classifier_free_guidance(spec(folder.flavour), is_distilled=folder.is_distilled,
                                            guidance=settings.guidance)
        forwards = renders * settings.num_inference_steps * (2 if cfg else 1)
        validation = forwards * forward_flops(shape, lora=lora, text_tokens=MAX_TEXT_TOKENS,
                                              image_tokens=_tokens((settings.width, settings.height)))
        inputs["validation"] = {"rounds": rounds, "images": renders, "forwards": forwards,
                                "width": settings.width, "height": settings.height}
        if settings.reference_images:
            caveats.append("validation reference images")
    if world > 1:
        caveats.append(f"communication between the {world} processes")
    precision = config.quantization.base_model_precision
    if precision.endswith("-torchao"):  # lowp_compute.py: faster matmuls, plus per-call casts; timed at the bf16 rate
        caveats.append(f"{precision}'s faster matmuls and their casts (estimated at the bf16 rate)")
    elif precision != "no_change":
        caveats.append(f"{precision}'s dequantization")
    if config.offload.enabled:
        caveats.append("group offload's transfers")
    compute = "fp32" if config.memory.mixed_precision == "no" else "bf16"
    return estimate_time(per_step, device_name=device, steps=max(0, total - start_step), compute_dtype=compute,
                         validation_flops=validation, caveats=tuple(caveats), inputs=inputs)


def _sample_table(samples: list[SampleTokens]) -> list[dict[str, float]]:
    """Distinct (image, reference) token counts with their summed weights, largest first."""
    table: dict[tuple[int, int], float] = {}
    for s in samples:
        key = (s.image_tokens, s.reference_tokens)
        table[key] = table.get(key, 0.0) + s.weight
    return [{"image_tokens": i, "reference_tokens": r, "weight": w} for (i, r), w in sorted(table.items(), reverse=True)]
