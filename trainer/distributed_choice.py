"""distributed "auto": DDP when the model fits each process's device, FSDP2 when it must be sharded.

For a LoRA the frozen model is most of the memory and the trained weights are a few MB, so DDP (each GPU holds
the whole model, one all-reduce of the LoRA gradients per step) is much faster than FSDP2 (an all-gather of
every block's weights in forward and again in backward) whenever the model fits: SimpleTuner's FSDP2 guide
measured plain DDP 3-6x faster for LoRA. FSDP2 is for models that do not fit one GPU (FLUX.2-dev in bf16 on
GPUs under ~80 GB). "auto" asks the memory model (trainer/memory.py) what DDP would need per process:

- one process: "none" (nothing to share);
- settings that FSDP2 cannot shard (quanto or int8 weights, group offload, Prodigy): "ddp";
- CUDA: "ddp" when DDP's estimated peak fits the GPU with FIT_MARGIN headroom, else "fsdp2";
- CPU (gloo): the processes share the host's RAM: "ddp" when every process's DDP host estimate fits the
  available RAM together, else "fsdp2".

The launcher (trainer/run.py) resolves "auto" before its preflight and writes the choice into run.json, so the
ranks it starts read an explicit value. A run started directly (torchrun, a cluster, an exported run.json) resolves
in its ranks: each decides from its own device, and the ranks then agree on DDP only if every one chose it.
Explicit values ("fsdp2", "ddp", "none") are never changed.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

FIT_MARGIN = 0.9
"""DDP is chosen when its estimated peak is at most this share of the device's memory: the estimate is an
estimate, and a DDP run that runs out of memory mid-run costs more than FSDP2's communication."""


@dataclass(frozen=True, kw_only=True, slots=True)
class DistributedChoice:
    mode: str
    """"fsdp2", "ddp" or "none"."""
    reason: str

    def line(self) -> str:
        return f"distributed {self.mode!r}: {self.reason}"


def _unshardable(config: Any) -> str | None:
    """Why FSDP2 cannot run these settings over several processes, or None."""
    precision = config.quantization.base_model_precision
    if precision.endswith("-quanto") or precision == "int8-torchao":
        return f"base_model_precision {precision!r} keeps int weights that FSDP2 cannot shard"
    if config.offload.enabled:
        return "enable_group_offload places the weights itself"
    if config.optim.optimizer == "prodigy":
        return "Prodigy's sums would be per shard under FSDP2"
    return None


def with_distributed(config: Any, mode: str) -> Any:
    """`config` with parallelism.distributed set to `mode`."""
    return dataclasses.replace(config, parallelism=dataclasses.replace(config.parallelism, distributed=mode))


def choose_distributed(config: Any, *, world_size: int, device: str | None = None) -> DistributedChoice:
    """What "auto" means for this run on `world_size` processes of this machine (device "cuda" or "cpu"; default:
    CUDA when this process sees a GPU). An explicit setting is returned as it is."""
    from .memory import accelerator_memory_gb, available_host_memory_gb, estimate_for_config, estimate_host_for_config

    setting = config.parallelism.distributed
    if setting != "auto":
        return DistributedChoice(mode=setting, reason="set in the config")
    if world_size <= 1:
        return DistributedChoice(mode="none", reason="one process: nothing to share")
    blocked = _unshardable(config)
    if blocked is not None:
        return DistributedChoice(mode="ddp", reason=f"{blocked}; each process holds the whole model")
    ddp = with_distributed(config, "ddp")
    gpu_gb = accelerator_memory_gb() if device in (None, "cuda") else None
    if gpu_gb is not None:
        need, have = estimate_for_config(ddp, world_size=world_size).total_gb, gpu_gb
        fits = f"the model fits each GPU (DDP's estimated peak {need:.1f} GB of {have:.0f} GB)"
        short = (f"DDP would need an estimated {need:.1f} GB per GPU, more than {FIT_MARGIN:.0%} of the GPU's "
                 f"{have:.0f} GB")
    else:  # CPU processes share the host's RAM
        have = available_host_memory_gb()
        need = estimate_host_for_config(ddp, world_size=world_size, device="cpu").peak_gb * world_size
        fits = (f"the model fits host RAM {world_size} times over (DDP's estimate {need:.1f} GB"
                + ("" if have is None else f" of the {have:.1f} GB available") + ")")
        short = (f"DDP would need an estimated {need:.1f} GB of host RAM for {world_size} processes, more than "
                 f"{FIT_MARGIN:.0%} of the {have or 0:.1f} GB available")
    if have is None or need <= FIT_MARGIN * have:
        return DistributedChoice(mode="ddp", reason=f"{fits}: DDP replicates it, faster than FSDP2's per-block "
                                                    "all-gathers")
    return DistributedChoice(mode="fsdp2", reason=f"{short}: FSDP2 shards the model over the {world_size} processes")


def resolve_distributed(config: Any, *, env: Any) -> tuple[Any, DistributedChoice]:
    """In the ranks: `config` with "auto" resolved, the same on every rank (DDP only when every rank chose it)."""
    choice = choose_distributed(config, world_size=env.world_size, device=env.device.type)
    if config.parallelism.distributed == "auto" and env.world_size > 1:
        import torch

        from .parallelize import all_reduce_min

        everyone = all_reduce_min(torch.tensor([1.0 if choice.mode == "ddp" else 0.0]), env)
        if choice.mode == "ddp" and everyone.item() < 1:
            choice = DistributedChoice(mode="fsdp2", reason="another rank's device cannot hold the whole model")
    if env.is_main and config.parallelism.distributed == "auto":
        log.info("%s", choice.line())
    return with_distributed(config, choice.mode), choice
