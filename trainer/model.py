"""The training model: load FLUX.2's transformer and apply each feature in the order STYLE.md fixes.

build_model asks the configs' own rules first (nothing loads when a combination cannot run), then:
load -> quantize (quanto; or torchao low-precision compute, lowp_compute.py) -> LoRA -> our block forward
(checkpointing, TREAD) -> group offload -> FSDP2 or DDP.
Each step is one apply_* of the module that owns that feature.

Under FSDP2 no rank holds the whole model: the transformer starts with uninitialised weights that take no
memory until written (model_files.empty_transformer), LoRA is added as usual, the frozen weights take their
storage dtype (bf16 with bf16 mixed precision, else fp32), fully_shard splits them, and each rank then reads
only its own rows from the safetensors files (model_files.fill_from_safetensors). Without FSDP2 each weight is
read straight into its tensor too (model_files.load_transformer), and a quantized base is quantized block by
block as it is read (quantize.load_quantized_transformer): host memory holds one copy of the weights.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from . import parallelize
from .config import LoraConfig, MemoryConfig, OffloadConfig, ParallelismConfig, QuantizationConfig

if TYPE_CHECKING:
    from .blocks import BlockForwardPlan
    from .model_files import ModelFolder
    from .tread import TreadConfig

log = logging.getLogger(__name__)

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": torch.float32}
# FSDP2 stores the frozen base in bf16 only under bf16 mixed precision (its policy computes in bf16); fp16 and
# "no" compute in fp32 under FSDP2, so the base stays fp32 there.
_SHARD_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float32, "no": torch.float32}


@dataclass
class Model:
    """The wrapped transformer plus what the loop needs to drive it."""

    module: torch.nn.Module
    """What forward is called on (FSDP2/DDP wrapper or the plain transformer)."""
    inner: torch.nn.Module
    """The diffusers transformer (with PEFT LoRA layers) inside it."""
    compute_dtype: torch.dtype
    """dtype of the inputs fed to module."""
    hidden_size: int
    block_forward: BlockForwardPlan | None = None
    """What inner's forward runs (blocks.apply_block_forward's result); None: diffusers' forward."""

    @property
    def tread(self) -> bool:
        """Whether the forward routes tokens (TREAD): train_step then hands it the per-sample generators."""
        return self.block_forward is not None and self.block_forward.tread


def build_model(folder: ModelFolder, *, lora: LoraConfig, memory: MemoryConfig, parallelism: ParallelismConfig,
                seed: int, env: parallelize.DistEnv, quantization: QuantizationConfig | None = None,
                offload: OffloadConfig | None = None, tread: TreadConfig | None = None,
                lora_dtype: torch.dtype = torch.float32) -> Model:
    """The LoRA-injected transformer, wrapped for the run's distribution; quantization, offload and TREAD off
    when not given. lora_dtype: the trained LoRA weights' dtype (OptimizerConfig.lora_dtype: bf16 for adamw_bf16)."""
    from .blocks import apply_block_forward
    from .compile_blocks import apply_compile
    from .lokr import apply_init_lokr_norm, apply_lokr
    from .lora import apply_lora
    from .lowp_compute import apply_lowp_compute, check_environment, load_int8_transformer
    from .model_files import empty_transformer, fill_from_safetensors, load_transformer
    from .offload import apply_group_offload
    from .quantize import load_quantized_transformer
    from .tread import plan_routes

    quantization, offload = quantization or QuantizationConfig(), offload or OffloadConfig()
    # Refuse what cannot run before any weight loads: each rule is its config's own.
    quantization.check_compatible(mixed_precision=memory.mixed_precision, distributed=parallelism.distributed,
                                  world_size=env.world_size, offload=offload)
    offload.check_compatible(gradient_checkpointing=memory.gradient_checkpointing,
                             distributed=parallelism.distributed, world_size=env.world_size, device=env.device)
    check_environment(quantization.base_model_precision, device=env.device)  # torchao installed, this GPU runs it
    compile_backend, compile_why = memory.compile.resolve(  # an impossible combination is refused here
        device=env.device, base_model_precision=quantization.base_model_precision,
        offload_type=offload.offload_type if offload.enabled else None)
    if parallelism.distributed == "fsdp2" and env.world_size == 1 and env.is_main:
        log.info("distributed 'fsdp2' with one process: nothing to shard, the model runs unwrapped as with 'none'.")
    sharded = parallelism.shards(env.world_size) and folder.transformer_file is None
    # Quantization and offload start from CPU memory: the full model never has to fit the device.
    on_cpu = parallelism.shards(env.world_size) or quantization.base_quantized or offload.enabled
    if sharded:  # weights are read after fully_shard, each rank its own rows
        transformer = empty_transformer(folder)
    elif quantization.base_model_precision == "int8-torchao":  # each block is quantized as soon as it is read
        transformer = load_int8_transformer(folder, default_dtype=quantization.base_model_default_dtype,
                                            quantize_via=quantization.quantize_via, device=env.device)
    elif quantization.base_quantized:  # each block is quantized as soon as it is read
        transformer = load_quantized_transformer(folder, precision=quantization.base_model_precision,
                                                 default_dtype=quantization.base_model_default_dtype,
                                                 quantize_via=quantization.quantize_via, device=env.device)
    else:
        transformer = load_transformer(folder, precision=_load_precision(memory, quantization,
                                                                         sharded=parallelism.shards(env.world_size)),
                                       device="cpu" if on_cpu else str(env.device))
    if quantization.base_model_precision == "fp8-torchao":  # the weights stay as loaded (or unread, under FSDP2)
        apply_lowp_compute(transformer, precision="fp8-torchao")
    # LoRA A is drawn from the global generator: the same seed on every rank gives every rank (and a rerun)
    # the same initial adapter, which FSDP2 shards and a resumed run must match.
    torch.manual_seed(seed)
    if lora.lycoris is not None:  # a LyCORIS LoKr (lora_type "lycoris"), in PEFT's LoKr layers
        apply_lokr(transformer, spec=lora.lycoris, preset=lora.target, init_lokr_norm=lora.init_lokr_norm)
    else:
        apply_lora(transformer, preset=lora.target, rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout,
                   init=lora.init)
    for param in transformer.parameters():
        if param.requires_grad:
            param.data = param.data.to(lora_dtype)  # fp32 LoRA weights, unless the optimizer trains bf16 ones
        elif sharded:  # still unread: take the storage dtype now, without touching memory
            param.data = torch.empty(param.shape, dtype=_SHARD_DTYPES[memory.mixed_precision])
    # Our block loop (trainer/blocks.py) is the forward from here on; Model keeps the plan it runs (TREAD routes).
    routes = plan_routes(tread, num_blocks=len(parallelize.transformer_blocks(transformer))) if tread else ()
    plan = apply_block_forward(transformer, routes=routes, checkpoint_every=memory.checkpoint_every,
                               save_attention=memory.checkpointing.save_attention)
    if compile_backend is not None:  # torchtitan's order: checkpointing, then compile, then fully_shard and hooks
        apply_compile(transformer, backend=compile_backend)
    if env.is_main:
        log.info("transformer blocks: %s (%s).", f"compiled with torch.compile backend {compile_backend!r}, one "
                 "graph per block class" if compile_backend else "not compiled", compile_why)
    if offload.enabled:
        apply_group_offload(transformer, settings=offload, device=env.device)
    transformer.train()
    hidden = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    module, compute = _wrap(transformer, memory=memory, parallelism=parallelism, env=env)
    if sharded:
        fill_from_safetensors(transformer, folder)
        if env.device.type != "cpu":
            module.to(env.device)
    if lora.lycoris is not None and lora.init_lokr_norm is not None:  # reads the base weights: once they are loaded
        apply_init_lokr_norm(transformer, scale=lora.init_lokr_norm, seed=seed)
    return Model(module=module, inner=transformer, compute_dtype=compute, hidden_size=hidden, block_forward=plan)


def _load_precision(memory: MemoryConfig, quantization: QuantizationConfig, *, sharded: bool) -> str:
    """dtype the frozen base is stored in: the compute dtype; under FSDP2 bf16 with bf16 mixed precision and fp32
    otherwise (_SHARD_DTYPES); base_model_default_dtype for the layers quanto leaves unquantized."""
    if quantization.base_quantized:
        return quantization.base_model_default_dtype
    if sharded:
        return {torch.bfloat16: "bf16", torch.float32: "fp32"}[_SHARD_DTYPES[memory.mixed_precision]]
    return "fp32" if memory.mixed_precision == "no" else memory.mixed_precision


def _wrap(transformer: torch.nn.Module, *, memory: MemoryConfig, parallelism: ParallelismConfig,
          env: parallelize.DistEnv) -> tuple[torch.nn.Module, torch.dtype]:
    """(what forward is called on, the dtype its inputs are cast to): FSDP2, DDP, or the transformer itself."""
    if parallelism.shards(env.world_size):
        module = parallelize.apply_fsdp(transformer, env=env, bf16=memory.mixed_precision == "bf16")
        return module, torch.float32  # FSDP2's policy casts inside
    compute = _DTYPES[memory.mixed_precision]
    if parallelism.replicates(env.world_size):
        return parallelize.apply_ddp(transformer, env=env), compute
    return transformer, compute
