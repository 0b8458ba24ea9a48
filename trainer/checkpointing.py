"""Selective activation checkpointing: recompute only what the GPU's memory requires.

Two settings refine gradient checkpointing (blocks.block_forward checkpoints every N-th block):

- gradient_checkpointing_auto: the memory model (trainer/memory.py) picks the interval. Fewer checkpointed blocks
  means less recompute and more memory, so it tries no checkpointing, then intervals from the number of blocks
  (only block 0 checkpointed) down to 1 (every block), and keeps the first whose estimated peak fits the memory the
  run sees (free device memory plus what this process already holds) with AUTO_HEADROOM to spare. The choice is
  logged with the figures behind it.
- gradient_checkpointing_save_attention: a checkpointed block keeps the output of its attention kernel and
  recomputes only the rest (torch.utils.checkpoint with a selective policy,
  create_selective_checkpoint_contexts). Attention is the block's only op whose cost grows with the token count
  squared, while its output is one value per token and hidden unit: about 1 extra value of the compute dtype per
  token and hidden unit per checkpointed block (measured on the tiny model, bench/RESULTS.md), against about 30
  for keeping the whole block. The opposite policy, saving every matmul output and recomputing the rest, keeps
  almost all of a block's activations (measured: 112 of 109-124 values per token and hidden unit on the tiny
  model): it is not offered. MLP-only checkpointing cannot be told apart from attention matmuls by an op policy.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .settings import check_fields, setting

if TYPE_CHECKING:
    from .config import MemoryConfig, TrainConfig
    from .parallelize import DistEnv

log = logging.getLogger(__name__)

AUTO_HEADROOM = 0.9
"""gradient_checkpointing_auto keeps an estimate at or under this share of the device memory: the estimate's own
10% fragmentation term is a guess, and compile's workspaces and attention kernels move the real peak."""


@dataclass(frozen=True, kw_only=True, slots=True)
class SelectiveCheckpointConfig:
    """Which blocks gradient checkpointing recomputes, and what inside them."""

    auto_interval: bool = setting("gradient_checkpointing_auto", False)
    """Let the memory estimate choose gradient_checkpointing_interval (not a SimpleTuner key): the least
    recompute whose estimated peak fits the GPU's free memory with 10% to spare; no checkpointing when all
    activations fit. Logged at start with the estimate. Needs a CUDA GPU (on the CPU the interval stays as set)
    and gradient_checkpointing on; replaces gradient_checkpointing_interval."""
    save_attention: bool = setting("gradient_checkpointing_save_attention", False)
    """Checkpointed blocks keep their attention output and recompute only the other ops (not a SimpleTuner key):
    less recompute for about 1 more value per token and hidden unit per checkpointed block; gains most at high
    resolution, where attention dominates a block's time."""

    def __post_init__(self) -> None:
        check_fields(self)

    def unused_settings(self, changed: set[str], *, on: bool) -> list[tuple[str, str]]:
        """(key, why) for each changed setting that has no effect (TrainConfig warns); on: gradient_checkpointing."""
        keys = ("gradient_checkpointing_auto", "gradient_checkpointing_save_attention")
        return [] if on else [(k, "gradient_checkpointing is off") for k in keys if k in changed]


# ------------------------------------------------------------------------------ the selective policy


@functools.cache
def _attention_ops() -> frozenset[Any]:
    import torch

    aten = torch.ops.aten
    names = ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
             "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu",
             "_flash_attention_forward", "_efficient_attention_forward")
    return frozenset(getattr(aten, n).default for n in names if hasattr(aten, n))


def _save_attention_policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> Any:
    from torch.utils.checkpoint import CheckpointPolicy

    return CheckpointPolicy.MUST_SAVE if op in _attention_ops() else CheckpointPolicy.PREFER_RECOMPUTE


def save_attention_context() -> tuple[Any, Any]:
    """torch.utils.checkpoint's context_fn for save_attention: keep attention outputs, recompute the rest."""
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    return create_selective_checkpoint_contexts(_save_attention_policy)


# ------------------------------------------------------------------------------ the automatic interval


@dataclass(frozen=True, kw_only=True, slots=True)
class IntervalChoice:
    """What gradient_checkpointing_auto chose, and why."""

    interval: int | None
    """Checkpoint every this many blocks; None: no checkpointing."""
    estimate_gb: float
    budget_gb: float
    fits: bool

    @property
    def reason(self) -> str:
        what = "no gradient checkpointing" if self.interval is None else \
            f"gradient_checkpointing_interval {self.interval}"
        if self.fits:
            return (f"{what}: estimated peak {self.estimate_gb:.1f} GB fits {self.budget_gb:.1f} GB "
                    f"({AUTO_HEADROOM:.0%} of the device's memory), the least recompute that does")
        return (f"{what}: even checkpointing every block is estimated at {self.estimate_gb:.1f} GB, above "
                f"{self.budget_gb:.1f} GB; lower the batch size or resolution, or quantize / offload the base")


def checkpointed_blocks(num_blocks: int, interval: int | None) -> int:
    """How many blocks an interval checkpoints (blocks 0, N, 2N, ...)."""
    return 0 if interval is None else -(-num_blocks // interval)


def choose_interval(estimate_gb: Callable[[int | None], float], *, num_blocks: int,
                    device_gb: float) -> IntervalChoice:
    """The interval with the least recompute whose estimate fits AUTO_HEADROOM of device_gb.

    estimate_gb(interval): the estimated peak in GiB with that interval (None: no checkpointing).
    """
    budget = device_gb * AUTO_HEADROOM
    candidates: list[int | None] = [None]
    seen = set()
    for interval in range(num_blocks, 0, -1):  # fewest checkpointed blocks first
        count = checkpointed_blocks(num_blocks, interval)
        if count not in seen:
            seen.add(count)
            candidates.append(interval)
    gb = 0.0
    for interval in candidates:
        gb = estimate_gb(interval)
        if gb <= budget:
            return IntervalChoice(interval=interval, estimate_gb=gb, budget_gb=budget, fits=True)
    return IntervalChoice(interval=1, estimate_gb=gb, budget_gb=budget, fits=False)


def device_memory_gb(device: Any) -> float | None:
    """Memory this process can use on a CUDA device: free memory plus what its allocator already holds; None
    off CUDA."""
    import torch

    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return (free + torch.cuda.memory_reserved(device)) / 1024**3


def resolve_memory(config: TrainConfig, *, env: DistEnv, device_gb: float | None = None) -> MemoryConfig:
    """config.memory with gradient_checkpointing_auto resolved into gradient_checkpointing(_interval) for this
    run's device (device_gb: its usable memory, measured when None), logged on the main process."""
    from .memory import estimate_for_config

    memory = config.memory
    if not (memory.gradient_checkpointing and memory.checkpointing.auto_interval):
        return memory
    device_gb = device_memory_gb(env.device) if device_gb is None else device_gb
    if device_gb is None:
        if env.is_main:
            log.info("gradient_checkpointing_auto: no CUDA device to fit, gradient_checkpointing_interval stays %s.",
                     memory.gradient_checkpointing_interval or 1)
        return memory

    def estimate(interval: int | None) -> float:
        return estimate_for_config(config, world_size=env.world_size, gradient_checkpointing=interval is not None,
                                   gradient_checkpointing_interval=interval).total_gb

    choice = choose_interval(estimate, num_blocks=_num_blocks(config), device_gb=device_gb)
    if env.is_main:
        (log.info if choice.fits else log.warning)("gradient_checkpointing_auto: %s.", choice.reason)
    return dataclasses.replace(memory, gradient_checkpointing=choice.interval is not None,
                               gradient_checkpointing_interval=choice.interval)


def _num_blocks(config: TrainConfig) -> int:
    import json
    from pathlib import Path

    transformer = json.loads((Path(config.model.root) / "transformer" / "config.json").read_text())
    return int(transformer.get("num_layers", 8)) + int(transformer.get("num_single_layers", 48))
