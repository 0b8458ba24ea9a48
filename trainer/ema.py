"""EMA of the LoRA weights: SimpleTuner's use_ema and its related keys, for the adapter only.

After each applied optimizer step (every ema_update_interval steps) the average moves towards the weights:
ema = d * ema + (1 - d) * weights, with SimpleTuner's decay d at global step k (its EMAModel.get_decay): 0 at the first
step (the average starts as a copy), then min((1 + s) / (10 + s), ema_decay) with s = k - 1; with ema_warmup_steps W
> 0 instead, 0 before step W and ema_decay from there. The average is kept in fp32 whatever the weights' dtype
(bf16 with adamw_bf16 would round a 1 - 0.995 share away).

Under FSDP2 each process keeps the average of its own shard of each weight (plain local tensors, on the CPU or on
the process's device: ema_device), so no process holds more than its shard; gathering for a checkpoint or the
saved file is a collective, like the LoRA's. Checkpoints hold it whole (`ema/<name>`); it is saved beside the LoRA
as <output_name>_ema.safetensors, and validation renders with it when ema_validation asks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Literal

import torch

from .settings import check_fields, setting

if TYPE_CHECKING:
    from .model import Model
    from .parallelize import DistEnv

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True, slots=True)
class EmaConfig:
    """An exponential moving average of the LoRA weights (SimpleTuner's EMA keys)."""

    enabled: bool = setting("use_ema", False)
    """Keep an exponential moving average of the LoRA weights, saved beside the LoRA as
    <output_name>_ema.safetensors (same layout and metadata, loads like the LoRA) and kept in checkpoints."""
    decay: float = setting("ema_decay", 0.995, ge=0, lt=1)
    """Largest EMA decay; SimpleTuner's ramp min((1 + s) / (10 + s), ema_decay) reaches it after a few hundred
    steps (s = step - 1). Closer to 1 averages over more steps. In [0, 1)."""
    update_interval: int | None = setting("ema_update_interval", None, ge=1, fix="use null to update every step")
    """Update the EMA only at steps that are multiples of this (the decay still follows the step number, as in
    SimpleTuner). >= 1; null: every step."""
    warmup_steps: int = setting("ema_warmup_steps", 0, ge=0)
    """SimpleTuner's ema_warmup_steps: when > 0, the EMA copies the weights before this step and then uses ema_decay
    with no ramp. 0 keeps the ramp. >= 0."""
    validation: Literal["none", "ema_only", "comparison"] = setting("ema_validation", "comparison")
    """Validation images with the EMA: "comparison" renders the trained LoRA and the EMA (files *_ema.png),
    "ema_only" only the EMA, "none" only the trained LoRA."""
    device: Literal["cpu", "accelerator"] = setting("ema_device", "cpu")
    """Where the EMA lives and is updated: "cpu" (host memory; no accelerator memory; each update copies the LoRA
    weights to the CPU, as SimpleTuner's ema_cpu_only does) or "accelerator" (the process's device: faster, costs its
    memory). Under FSDP2 each process holds only its shard either way."""
    cpu_only: bool = setting("ema_cpu_only", False)
    """SimpleTuner's ema_cpu_only: true keeps the EMA on the CPU whatever ema_device says (as SimpleTuner, which sets
    ema_device 'cpu' then). With ema_device 'cpu' this trainer never moves the EMA to the accelerator anyway."""
    foreach_disable: bool = setting("ema_foreach_disable", False)
    """Update tensor by tensor instead of with torch's fused _foreach kernels (the same numbers; for back-ends whose
    foreach kernels misbehave)."""

    def __post_init__(self) -> None:
        check_fields(self)
        if not self.enabled:
            for field in dataclasses.fields(self):
                if field.name != "enabled" and object.__getattribute__(self, field.name) != field.default:
                    log.warning("config: %s has no effect because use_ema is off.", field.metadata["setting"].key)

    @property
    def on_cpu(self) -> bool:
        """Whether the EMA lives in host memory (ema_device 'cpu', or ema_cpu_only)."""
        return self.device == "cpu" or self.cpu_only

    def due(self, step: int) -> bool:
        """Whether the EMA updates after (1-based) step."""
        return step % (self.update_interval or 1) == 0


def decay_at(step: int, *, decay: float, warmup_steps: int = 0) -> float:
    """SimpleTuner's EMA decay at global (1-based) step `step`: the weight the old average keeps."""
    if warmup_steps > 0:
        return 0.0 if step < warmup_steps else decay
    s = step - 1
    return 0.0 if s <= 0 else min((1 + s) / (10 + s), decay)


def _local(param: torch.Tensor) -> torch.Tensor:
    """This process's part of a weight: an FSDP2 DTensor's shard (a view: writing it writes the weight), else itself."""
    return param.to_local() if hasattr(param, "to_local") else param


class LoraEma:
    """The EMA of a model's adapter (LoRA or LoKr) weights: one fp32 tensor per weight, this process's shard of it."""

    def __init__(self, model: Model, *, settings: EmaConfig, device: torch.device) -> None:
        from .parallelize import is_adapter_param

        # The adapter's tensors as full_lora_state lists them (LoRA A/B, LoKr's), so the average saves like the LoRA.
        named = [(n, p) for n, p in model.inner.named_parameters() if is_adapter_param(n)]
        self.settings = settings
        self.names = [n.replace(".default", "") for n, _ in named]
        """Keys as in parallelize.full_lora_state, so the EMA converts and saves exactly like the LoRA."""
        self.params = [p for _, p in named]
        self.device = torch.device("cpu") if settings.on_cpu else device
        with torch.no_grad():
            self.shadows = [_local(p).detach().to(self.device, torch.float32, copy=True) for p in self.params]
        self.decay = 0.0
        """The decay of the latest update (for events)."""

    @torch.no_grad()
    def update(self, *, step: int) -> bool:
        """Move the average towards the current weights after (1-based) step; False when not due."""
        if not self.settings.due(step):
            return False
        self.decay = decay_at(step, decay=self.settings.decay, warmup_steps=self.settings.warmup_steps)
        current = [_local(p).detach().to(self.device, torch.float32) for p in self.params]
        if self.settings.foreach_disable:
            for shadow, value in zip(self.shadows, current):
                shadow.lerp_(value, 1.0 - self.decay)
        else:
            torch._foreach_lerp_(self.shadows, current, 1.0 - self.decay)
        return True

    def full_state(self, *, env: DistEnv) -> dict[str, torch.Tensor]:
        """Every averaged weight, whole, on the CPU (a collective under FSDP2: every process must call it)."""
        state = {}
        for name, param, shadow in zip(self.names, self.params, self.shadows):
            if hasattr(param, "device_mesh"):
                from torch.distributed.tensor import DTensor

                whole = DTensor.from_local(shadow.to(param.device), param.device_mesh, param.placements,
                                           shape=param.shape, stride=param.stride()).full_tensor()
            else:
                whole = shadow
            state[name] = whole.detach().cpu()
        return state

    @torch.no_grad()
    def load_full_state(self, state: dict[str, torch.Tensor]) -> None:
        """Take this process's shard of every averaged weight from whole tensors (a checkpoint's)."""
        missing = sorted(set(self.names) - set(state))
        if missing:
            raise ValueError(f"the checkpoint's EMA lacks {missing[:3]}...; it belongs to another run.")
        for i, (name, param) in enumerate(zip(self.names, self.params)):
            whole = state[name].to(torch.float32)
            if hasattr(param, "device_mesh"):
                from torch.distributed.tensor import distribute_tensor

                whole = distribute_tensor(whole.to(param.device), param.device_mesh, param.placements,
                                          src_data_rank=None).to_local()  # every process slices its own shard
            self.shadows[i] = whole.to(self.device, copy=True)

    @contextlib.contextmanager
    def applied(self, model: Model) -> Iterator[None]:
        """The model runs with the averaged LoRA weights inside, its own weights restored after."""
        with torch.no_grad():
            kept = [_local(p).detach().clone() for p in self.params]
            for param, shadow in zip(self.params, self.shadows):
                _local(param).copy_(shadow)
        _reshard(model)
        try:
            yield
        finally:
            with torch.no_grad():
                for param, value in zip(self.params, kept):
                    _local(param).copy_(value)
            _reshard(model)


def _reshard(model: Model) -> None:
    """FSDP2 keeps the last block (and the root) gathered after a no-grad forward; free those copies so the next
    forward gathers the weights just written instead of reusing stale ones."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return
    for module in model.inner.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def build_ema(model: Model, *, settings: EmaConfig, env: DistEnv) -> LoraEma | None:
    """The run's EMA (starting at the current LoRA weights), or None when use_ema is off."""
    return LoraEma(model, settings=settings, device=env.device) if settings.enabled else None
