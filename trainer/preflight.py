"""Checks that run before any weights load: the run fits the GPU's memory, the output folder is writable and
has room for the run, the LoRA rank fits the model, and a LoRA file fits the model it is applied to.

run_preflight adds the time estimate (trainer/throughput.py) to the memory check: the Preflight record that the Train
LoRA node shows before the first step and that the run folder keeps as preflight.json. Only memory refuses a run.

Sizes come from the model's config alone: the transformer is built on the meta device (no memory, no
weights read), LoRA is injected exactly as training does, and its trainable parameters are counted.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .throughput import TimeEstimate

log = logging.getLogger(__name__)

MARGIN_BYTES = 64 << 20
"""Room for events.jsonl, train.log, run.json and the validation text cache."""
_ADAM_TENSORS = 2  # exp_avg and exp_avg_sq per trainable parameter
_FP32 = 4


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**27 else f"{n / 2**20:.1f} MiB"


def check_output_writable(out_dir: Path) -> None:
    """Create and delete a probe file in out_dir; a ValueError names the folder and the OS error."""
    probe = out_dir / f".write-test-{os.getpid()}"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as fh:
            fh.write(b"0")
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        raise ValueError(
            f"output_dir {out_dir} is not writable ({exc.strerror or exc}); choose a folder this user can write "
            "to, or fix its permissions."
        ) from None
    finally:
        try:
            probe.unlink()
        except OSError:
            pass


def meta_transformer(folder: Any):
    """The FLUX.2 transformer of a model folder on the meta device: shapes without memory or weights."""
    import torch
    from diffusers import Flux2Transformer2DModel

    with torch.device("meta"):
        return Flux2Transformer2DModel.from_config(folder.transformer_config())


@dataclass(frozen=True, kw_only=True, slots=True)
class LoraSize:
    numel: int
    """Trainable LoRA parameters."""
    smallest_dim: int
    """Smallest in/out feature count over the adapted layers."""


def lora_size(folder: Any, *, lora: Any) -> LoraSize:
    """Count the LoRA parameters training will create, and check the rank fits the adapted layers."""
    import torch

    from .lora import lora_target_modules

    model = meta_transformer(folder)
    if getattr(lora, "lycoris", None) is not None:  # LoKr: no rank to check; its factors as training makes them
        from .lokr import apply_lokr

        apply_lokr(model, spec=lora.lycoris, preset=lora.target, init_lokr_norm=lora.init_lokr_norm)
        return LoraSize(numel=sum(p.numel() for p in model.parameters() if p.requires_grad), smallest_dim=0)
    targets = [model.get_submodule(name) for name in lora_target_modules(model, preset=lora.target)]
    smallest = min(min(m.in_features, m.out_features) for m in targets if isinstance(m, torch.nn.Linear))
    if lora.rank > smallest:
        raise ValueError(
            f"lora_rank {lora.rank} is larger than the smallest layer flux_lora_target {lora.target!r} adapts "
            f"({smallest} features), so the adapter cannot use it; give lora_rank <= {smallest} (8-128 is usual)."
        )
    # A LoRA layer is A (rank x in) and B (out x rank): counted from the shapes, no injection needed.
    numel = sum(lora.rank * (m.in_features + m.out_features) for m in targets)
    return LoraSize(numel=numel, smallest_dim=smallest)


@dataclass(frozen=True, kw_only=True, slots=True)
class SpaceEstimate:
    checkpoint_bytes: int
    checkpoints_at_peak: int
    """How many new checkpoints exist at once at the worst moment (rotation deletes after a write)."""
    lora_bytes: int
    validation_bytes: int
    required_bytes: int

    def breakdown(self) -> str:
        return (f"{self.checkpoints_at_peak} x {_gib(self.checkpoint_bytes)} checkpoints + {_gib(self.lora_bytes)} "
                f"LoRA file + {_gib(self.validation_bytes)} validation images + {_gib(MARGIN_BYTES)} margin")


def estimate_run_bytes(*, lora_numel: int, max_train_steps: int, checkpointing_steps: int,
                       checkpoints_total_limit: int | None, existing_checkpoints: int, validation_images: int,
                       validation_pixels: int, ema: bool = False) -> SpaceEstimate:
    """Disk space the run will add to its output folder at the worst moment (ema: use_ema's fp32 average, kept in
    each checkpoint and saved as a second LoRA file)."""
    # Fused q/k/v adapters are block-diagonal in the saved file: up to 3x the trained numbers.
    lora_file = lora_numel * _FP32 * 3
    lora = lora_file * (1 + int(ema))
    # A checkpoint holds the fp32 LoRA and AdamW's two moments (the most any optimizer here keeps), plus a small JSON,
    # and the step's LoRA file (for LoRA Grid).
    checkpoint = lora_numel * _FP32 * (1 + _ADAM_TENSORS + int(ema)) + lora_file + (1 << 20)
    planned = max_train_steps // checkpointing_steps
    peak_total = existing_checkpoints + planned
    if checkpoints_total_limit is not None:
        peak_total = min(peak_total, checkpoints_total_limit + 1)
    new = max(0, peak_total - existing_checkpoints)
    validation = validation_images * validation_pixels * 3  # PNG is never larger than raw RGB here
    required = new * checkpoint + lora + validation + MARGIN_BYTES
    return SpaceEstimate(checkpoint_bytes=checkpoint, checkpoints_at_peak=new, lora_bytes=lora,
                         validation_bytes=validation, required_bytes=required)


def check_free_space(out_dir: Path, *, estimate: SpaceEstimate) -> None:
    free = shutil.disk_usage(out_dir).free
    if free < estimate.required_bytes:
        raise ValueError(
            f"output_dir {out_dir} has {_gib(free)} free, but this run needs about {_gib(estimate.required_bytes)} "
            f"({estimate.breakdown()}). Free disk space, lower checkpoints_total_limit or raise checkpointing_steps, "
            "or choose an output folder on a larger disk."
        )


def check_run(config: Any, *, folder: Any, out_dir: Path, existing_checkpoints: int) -> SpaceEstimate:
    """Checked before weights load (after check_output_writable): rank vs model, free space."""
    size = lora_size(folder, lora=config.lora)
    validation, steps = config.validation, config.schedule.total_steps
    prompts = len(validation.prompts()) if validation.enabled else 0
    every = validation.every_steps
    renders = prompts * ((steps // every if every > 0 else 0) + 1)
    estimate = estimate_run_bytes(
        lora_numel=size.numel, max_train_steps=steps,
        checkpointing_steps=config.checkpoint.every_steps, checkpoints_total_limit=config.checkpoint.total_limit,
        existing_checkpoints=existing_checkpoints, validation_pixels=validation.width * validation.height,
        validation_images=renders * (2 if config.ema.enabled and config.ema.validation == "comparison" else 1),
        ema=config.ema.enabled,
    )
    check_free_space(out_dir, estimate=estimate)
    log.info("preflight: %d LoRA parameters; the run needs about %s in %s", size.numel,
             _gib(estimate.required_bytes), out_dir)
    return estimate


def check_memory(config: Any, *, num_processes: int, enforce: bool) -> str:
    """The estimated peak GPU memory and host RAM per process, as text; with enforce, refuses a run that cannot
    fit this machine's GPU or its available host RAM (export mode does not enforce: the run goes to another
    machine)."""
    return _check_memory(config, num_processes=num_processes, enforce=enforce)[0]


def _check_memory(config: Any, *, num_processes: int, enforce: bool) -> tuple[str, Any, Any]:
    """check_memory's summary, with the GPU estimate (MemoryEstimate) and the host one (HostMemoryEstimate)."""
    from .distributed_choice import choose_distributed, with_distributed
    from .memory import accelerator_memory_gb, available_host_memory_gb, estimate_for_config, estimate_host_for_config

    if config.parallelism.distributed == "auto":  # the estimates are for the mode "auto" picks
        config = with_distributed(config, choose_distributed(config, world_size=num_processes).mode)
    available = accelerator_memory_gb()
    device = "cpu" if available is None else "cuda"
    estimate = estimate_for_config(config, world_size=num_processes)
    host = estimate_host_for_config(config, world_size=num_processes, device=device)
    summary = f"{estimate.summary()}; {host.summary(processes=num_processes)}"
    log.info("Train LoRA: %s", summary)
    if enforce and available is not None and not estimate.fits(available):
        raise ValueError(
            f"Train LoRA: {estimate.summary()}, more than this GPU's {available:.0f} GB. Turn on "
            "gradient_checkpointing, set base_model_precision int8-quanto/int4-quanto (distributed ddp or none), "
            "enable_group_offload, lower the resolution or train_batch_size, or use more GPUs with fsdp2."
        )
    free = available_host_memory_gb()
    needed = host.peak_gb * num_processes
    if enforce and free is not None and needed > free:
        raise ValueError(
            f"Train LoRA: {host.summary(processes=num_processes)}, more than the {free:.1f} GB of host RAM this "
            "machine has available now. Close other programs (ComfyUI keeps models loaded: free them first), "
            "use fsdp2 on several GPUs (each rank reads only its shard), set base_model_precision int8-quanto "
            "(quantized block by block while loading), turn enable_group_offload off, or give the diffusers "
            "folder instead of a single-file transformer (which loads whole)."
        )
    return summary, estimate, host


PREFLIGHT_FILE = "preflight.json"
"""The run folder's record of the preflight: its inputs and its memory and time estimates."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Preflight:
    """What a run is estimated to need before it starts: GPU memory and host RAM per process (a run that cannot fit
    is refused) and time (trainer/throughput.py; never a reason to refuse). All of it is estimated."""

    memory_summary: str
    gpu_memory_gb: dict[str, float]
    host_memory_gb: dict[str, float]
    num_processes: int
    time: TimeEstimate
    distributed_mode: str = "none"
    """The distributed mode the estimates assume: the config's, or what "auto" chose."""
    distributed: str | None = None
    """What distributed "auto" chose and why (trainer/distributed_choice.py); None when the config set it."""

    def lines(self) -> list[str]:
        return [self.memory_summary, self.time.summary(), *([self.distributed] if self.distributed else [])]

    def event(self) -> dict[str, Any]:
        """The "preflight" event the node shows before the first step (no "time" key: events carry their timestamp)."""
        short = (f"{self.time.short()}; {self.gpu_memory_gb['total']:.1f} GB GPU, "
                 f"{self.host_memory_gb['per_process']:.1f} GB host RAM per process (estimates)")
        return {"summary": "\n".join(self.lines()), "short": short,
                "seconds_per_step": self.time.seconds_per_step, "total_seconds": self.time.total_seconds,
                "device": self.time.device}

    def as_dict(self) -> dict[str, Any]:
        return {"estimate": True, "num_processes": self.num_processes, "distributed": self.distributed,
                "gpu_memory_gb": self.gpu_memory_gb,
                "host_memory_gb": self.host_memory_gb, "time": self.time.as_dict(), "summary": self.lines()}

    def write(self, run_dir: Path) -> Path:
        path = run_dir / PREFLIGHT_FILE
        path.write_text(json.dumps(self.as_dict(), indent=2, default=str) + "\n", encoding="utf-8")
        return path


def _with_checkpointing_for_this_gpu(config: Any, *, num_processes: int) -> Any:
    """gradient_checkpointing_auto resolved as each rank will resolve it (checkpointing.resolve_memory), from this
    machine's GPU memory, so that the memory and time estimates count the blocks that will be checkpointed."""
    if not (config.memory.gradient_checkpointing and config.memory.checkpointing.auto_interval):
        return config
    import torch

    from . import memory
    from .checkpointing import resolve_memory
    from .parallelize import DistEnv

    device_gb = memory.accelerator_memory_gb()
    if device_gb is None:
        return config  # no GPU here: the ranks keep the written interval too
    env = DistEnv(rank=0, world_size=num_processes, local_rank=0, device=torch.device("cuda", 0))
    return dataclasses.replace(config, memory=resolve_memory(config, env=env, device_gb=device_gb))


def run_preflight(config: Any, *, num_processes: int, enforce: bool, start_step: int = 0,
                  device_name: str | None = None) -> Preflight:
    """check_memory (with enforce, refuses a run that does not fit: the only refusal here) and the time estimate of
    the steps from start_step on, on device_name (default: the GPU this process sees)."""
    from .distributed_choice import choose_distributed, with_distributed
    from .throughput import estimate_time_for_config

    choice = choose_distributed(config, world_size=num_processes)
    if choice.reason != "set in the config":
        log.info("Train LoRA: %s", choice.line())
    config = with_distributed(config, choice.mode)
    config = _with_checkpointing_for_this_gpu(config, num_processes=num_processes)
    summary, estimate, host = _check_memory(config, num_processes=num_processes, enforce=enforce)
    time = estimate_time_for_config(config, world_size=num_processes, device_name=device_name, start_step=start_step)
    log.info("Train LoRA: %s", time.summary())
    return Preflight(memory_summary=summary, gpu_memory_gb=estimate.breakdown(),
                     host_memory_gb={"per_process": round(host.peak_gb, 3), "loading": round(host.load_gb, 3),
                                     "training": round(host.steady_gb, 3)},
                     num_processes=num_processes, time=time, distributed_mode=choice.mode,
                     distributed=choice.line() if choice.reason != "set in the config" else None)


@functools.lru_cache(maxsize=4)
def _linear_shapes(transformer_config: str) -> tuple[dict[str, tuple[int, int]], int, int]:
    """{module name: (in, out)} of every Linear, and the double / single block counts, from a config's JSON."""
    import torch
    from diffusers import Flux2Transformer2DModel

    with torch.device("meta"):
        model = Flux2Transformer2DModel.from_config(json.loads(transformer_config))
    shapes = {name: (m.in_features, m.out_features) for name, m in model.named_modules()
              if isinstance(m, torch.nn.Linear)}
    return shapes, len(model.transformer_blocks), len(model.single_transformer_blocks)


def _lokr_module_shapes(path: str | os.PathLike) -> dict[str, tuple[int, int]] | None:
    """{diffusers module: (in, out)} of a LoKr file (every key checked, the fused q/k/v split), None for a LoRA."""
    from .lokr_keys import adapter_type_of_file, comfy_lokr_modules, load_adapter_file, lokr_to_diffusers

    if adapter_type_of_file(path) != "lokr":
        return None
    what = f"LoKr file {Path(path).name!r}"
    modules = lokr_to_diffusers(comfy_lokr_modules(load_adapter_file(path)[0], what=what), what=what)
    return {name: factors.shape[::-1] for name, factors in modules.items()}


def lora_flavour(metadata: dict[str, str]) -> str | None:
    """The FLUX.2 flavour a LoRA file says it was trained on: its `model_flavour` header, else the flavour in
    `base_model` ("FLUX.2-klein-4b", as the trainer has always written it); None for files from elsewhere."""
    from .flavours import FLAVOURS

    for key, strip in (("model_flavour", ""), ("base_model", "FLUX.2-")):
        raw = metadata.get(key)
        if raw is None:
            continue
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        if isinstance(value, str) and value.startswith(strip) and value[len(strip):] in FLAVOURS:
            return value[len(strip):]
    return None


def check_lora_fits_model(path: str | os.PathLike, *, folder: Any) -> None:
    """Refuse a LoRA file trained on another FLUX.2 flavour, or whose modules or shapes do not match the model's
    transformer (no weights loaded).

    Every FLUX.2 size has its own widths (dev 6144, klein-9b 4096, klein-4b 3072) and block counts, so a LoRA fits
    exactly the size it was trained on, base and distilled alike. A file whose header names its flavour
    (lora_flavour) is refused by name when that is another flavour; any file is refused at the first layer that
    differs.
    """
    from safetensors import safe_open

    from .flavours import SPECS
    from .lora_adapters import load_as_diffusers

    lokr = _lokr_module_shapes(path)  # {module: (in, out)} of a LoKr file, None for a LoRA
    state = load_as_diffusers(str(path))[0] if lokr is None else {}  # checks the file and every key first
    with safe_open(str(path), framework="pt", device="cpu") as handle:
        trained_on = lora_flavour(dict(handle.metadata() or {}))
    name = Path(path).name
    if trained_on is not None and trained_on != folder.flavour:
        raise ValueError(
            f"Apply LoRA: {name!r} was trained on {SPECS[trained_on].title} (model_flavour {trained_on!r}), but this "
            f"model is {folder.describe()} (model_flavour {folder.flavour!r}). A LoRA fits only the FLUX.2 size it "
            f"was trained on; base and distilled of one size share LoRAs. Load a {SPECS[trained_on].title} model, "
            f"or use a LoRA trained on {folder.spec.title}."
        )
    shapes, doubles, singles = _linear_shapes(json.dumps(folder.transformer_config(), sort_keys=True))
    for module_name, (got_in, got_out) in sorted((lokr or {}).items()):
        if module_name not in shapes or shapes[module_name] != (got_in, got_out):
            raise ValueError(
                f"LoKr file {name!r} adapts {module_name!r} as a {got_out} x {got_in} layer; this model "
                + (f"has it as {shapes[module_name][1]} x {shapes[module_name][0]}" if module_name in shapes else
                   "does not have it") + f" ({folder.spec.title}, {doubles} double and {singles} single blocks): the "
                "LoKr was trained for another model. Use a LoKr trained on this model."
            )
    for key, tensor in sorted(state.items()):
        if not key.endswith(".lora_A.weight") and not key.endswith(".lora_B.weight"):
            continue
        module_name = key.rsplit(".lora_", 1)[0]
        if module_name not in shapes:
            raise ValueError(
                f"LoRA file {name!r} adapts {module_name!r}, which this FLUX.2 model does not have (it has "
                f"{doubles} double and {singles} single blocks: {folder.spec.title}); the LoRA was trained for "
                "another model."
            )
        is_a = key.endswith("lora_A.weight")
        expected = shapes[module_name][0] if is_a else shapes[module_name][1]
        got = tensor.shape[1] if is_a else tensor.shape[0]
        if got != expected:
            raise ValueError(
                f"LoRA file {name!r}: {module_name} has {'input' if is_a else 'output'} size {got}, this model's "
                f"layer has {expected}; the LoRA was trained for another model (e.g. FLUX.1 or another FLUX.2 "
                f"variant: this one is {folder.spec.title}). Use a LoRA trained on this model."
            )
