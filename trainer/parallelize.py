"""Process group, FSDP2 and DDP for the FLUX.2 transformer.

FSDP2 shards every double and single block, then the root (torchtitan's order); DDP replicates the
model and all-reduces only the LoRA gradients. gloo on CPU, nccl on CUDA.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal

import torch

log = logging.getLogger(__name__)

Distributed = Literal["fsdp2", "ddp", "none"]


@dataclass(frozen=True, kw_only=True, slots=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(*, timeout_s: float = 600.0) -> DistEnv:
    """Join torchrun's process group when launched by torchrun; a single process otherwise.

    The collective timeout makes a rank that died surface as an error on the others instead of a hang.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(
            backend=backend, timeout=timedelta(seconds=timeout_s), device_id=device if device.type == "cuda" else None
        )
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def close_distributed(*, synchronize: bool = False) -> None:
    """Leave the process group. After a successful run every rank first meets at a barrier: a rank that
    tore down gloo while another still used its connections made the latter abort at exit
    ("terminate called without an active exception"), failing a run that had finished."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if synchronize:
            torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.world_size > 1:
        torch.distributed.barrier()


def all_reduce_mean(value: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.world_size > 1:
        return _all_reduce(value, env, op=torch.distributed.ReduceOp.SUM) / env.world_size
    return value


def all_reduce_max(value: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.world_size > 1:
        return _all_reduce(value, env, op=torch.distributed.ReduceOp.MAX)
    return value


def all_reduce_min(value: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.world_size > 1:
        return _all_reduce(value, env, op=torch.distributed.ReduceOp.MIN)
    return value


def _all_reduce(value: torch.Tensor, env: DistEnv, *, op) -> torch.Tensor:
    """value reduced over the ranks, on value's device (NCCL reduces only tensors on the rank's GPU)."""
    reduced = value.detach().to(env.device, copy=True)
    torch.distributed.all_reduce(reduced, op=op)
    return reduced.to(value.device)


def transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    return list(model.transformer_blocks) + list(model.single_transformer_blocks)


def apply_fsdp(model: torch.nn.Module, *, env: DistEnv, bf16: bool) -> torch.nn.Module:
    """fully_shard each double and single block, then the root; bf16 compute with fp32 reduction."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(env.device.type, (env.world_size,))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    blocks = transformer_blocks(model)
    for i, block in enumerate(blocks):
        # The last block's parameters are needed again right away in backward: keep them gathered.
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=i < len(blocks) - 1)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def apply_ddp(model: torch.nn.Module, *, env: DistEnv) -> torch.nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [env.local_rank] if env.device.type == "cuda" else None
    # Only LoRA parameters require grad; DDP buckets just those.
    return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=False)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") and not hasattr(model, "transformer_blocks") else model


def is_adapter_param(name: str) -> bool:
    """Whether a parameter name belongs to the trained adapter (PEFT LoRA lora_A/lora_B, or LoKr lokr_*)."""
    return "lora_" in name or ".lokr_" in name


def full_lora_state(model: torch.nn.Module, *, env: DistEnv) -> dict[str, torch.Tensor]:
    """Every LoRA tensor, whole, on every rank (a collective under FSDP2: every rank must call it).

    Gathers the LoRA parameters one by one, never the frozen base: no rank holds the whole model to save.
    """
    state = {}
    for name, param in unwrap(model).named_parameters():
        if is_adapter_param(name):
            whole = param.full_tensor() if hasattr(param, "full_tensor") else param  # FSDP2: a DTensor shard
            state[name.replace(".default", "")] = whole.detach().cpu()
    return state


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, env: DistEnv) -> dict[str, Any]:
    """Optimizer state keyed by parameter names, gathered to full tensors (collective under FSDP2)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(
        unwrap(model), optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=env.world_size > 1)
    )


def load_full_state(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    lora_state: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    env: DistEnv,
) -> None:
    """Load full (unsharded) LoRA and optimizer state on every rank; FSDP2 reshards it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    inner = unwrap(model)
    # named_parameters lists a parameter shared by several layers (LoKr's q/k/v w2) once, as full_lora_state does.
    names = {k.replace(".default", ""): k for k, _ in inner.named_parameters() if is_adapter_param(k)}
    missing = set(names) - set(lora_state)
    if missing:
        raise ValueError(f"checkpoint lacks LoRA tensors for {sorted(missing)[:3]}...; it belongs to another run.")
    options = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(inner, {names[k]: v for k, v in lora_state.items() if k in names}, options=options)
    set_optimizer_state_dict(inner, optimizer, optimizer_state, options=StateDictOptions(full_state_dict=True))
