"""Low-precision compute for the frozen base Linears of the FLUX.2 transformer, with LoRA trained on top.

Two `base_model_precision` values (SimpleTuner's key; "fp8-torchao" is its value for torchao float8 training):

- "fp8-torchao": torchao's float8 training recipe (dynamic tensorwise scaling: e4m3 input and weight, e5m2
  gradient) for the matmul of each frozen base Linear. The weights stay in their storage dtype (bf16) in memory
  and are cast to float8 for every matmul, as torchao's Float8Linear does. Needs compute capability >= 8.9
  (Ada, Hopper, Blackwell: torch._scaled_mm).
- "int8-torchao": W8A8 dynamic int8, as torchao's Int8DynamicActivationInt8Weight: weights quantized once per
  output channel (symmetric, [-127, 127]) while the model loads and stored as int8 (1 byte a weight, like
  int8-quanto), activations quantized per token at every call, the product through torchao's int8 matmul
  (torch._int_mm). For consumer GPUs without fp8 (compute capability >= 8.0: int8 tensor cores).

Frozen weights: LoRA trains only its own A/B, so a base Linear needs the gradient of its input and never of its
weight. torchao 0.18's float8 autograd function (float8_linear.matmul_with_hp_or_float8_args) always computes the
weight gradient (a third matmul, measured on CPU by counting aten.mm in backward: 2 for a frozen Float8Linear,
1 for a frozen nn.Linear) and saves the layer input for it; autograd then drops it. Float8ComputeLinear runs the
same casts and matmuls through torchao's own cast functions but saves only the weight and computes only the input
gradient: backward does 1 matmul instead of 2 and no activation is kept for a weight gradient. torchao 0.18's int8
dynamic quantization has no backward at all (measured: with a frozen weight the output of an Int8Tensor linear
does not require grad, with a trainable one the gradient reaches only the bias), so Int8ComputeLinear is our own
autograd function: int8 forward through torchao's int_scaled_matmul, and backward grad_input = grad_output @
the dequantized weight in the gradient's dtype (one dequantized Linear alive at a time), as OneTrainer's W8A8
training does. tests/unit/test_lowp_compute.py measures its error against the fp32 and bf16 Linear on CPU.

Which layers: every nn.Linear inside the double and single blocks whose in and out features are multiples of 16
(torch._scaled_mm needs both; torchao's documented module filter). The input embedders, the timestep / guidance
embedders, the shared modulation layers, norm_out and proj_out keep full-precision compute: they touch every token
or produce the output directly (diffusers' FLUX.2 LoRA example skips proj_out for fp8 for the same reason).
Applied before LoRA (STYLE's order): PEFT's lora.Linear wraps the swapped layer as its base layer (both subclass
nn.Linear), LoRA A/B stay ordinary trainable Linears with the usual names and saved keys.

Composition:
- FSDP2 (fp8): the swapped module keeps its weight as a plain Parameter, so fully_shard shards and gathers it in
  bf16 as for any Linear and the float8 cast happens after the all-gather. torchao's enable_fsdp_float8_all_gather
  (all-gather the weight already in fp8, half the bytes) is not used: it wraps the weight in a tensor subclass
  (WeightWithDynamicFloat8CastTensor) that our meta-device build would have to survive (model.py gives frozen
  weights fresh storage and fills each rank's shard from the files after fully_shard), each gather then does an
  amax all-reduce unless precompute_float8_dynamic_scale_for_fsdp runs (for frozen weights once after loading
  would do), and no GPU was available to measure that it pays. int8 weights are refused under FSDP2 over several
  processes (fully_shard shards only floating-point parameters usefully; use "ddp", as with quanto).
- TREAD: a routed block sees fewer tokens; both matmuls take any token count, so routing needs nothing.
- Group offload: refused (not measured with these layers; config.QuantizationConfig.check_compatible).
- optimum-quanto: exclusive by construction (one base_model_precision value).
"""

from __future__ import annotations

import logging
import typing
from typing import TYPE_CHECKING, Literal

import torch

if TYPE_CHECKING:
    from .model_files import ModelFolder

log = logging.getLogger(__name__)

LowpCompute = Literal["fp8-torchao", "int8-torchao"]
"""The base_model_precision values that change the compute of the frozen base Linears (config.BasePrecision)."""

LOWP_COMPUTE: tuple[str, ...] = typing.get_args(LowpCompute)
MIN_CAPABILITY: dict[str, tuple[int, int]] = {"fp8-torchao": (8, 9), "int8-torchao": (8, 0)}
"""CUDA compute capability each needs: float8 matmuls (torch._scaled_mm) from Ada/Hopper, int8 tensor cores
(torch._int_mm) from Ampere."""
STORED_BYTES_PER_WEIGHT: dict[str, float | None] = {"fp8-torchao": None, "int8-torchao": 1.0}
"""Bytes a swapped weight holds between steps; None: its storage dtype (float8 copies live only during a matmul)."""
DIM_MULTIPLE = 16


def check_installed(precision: str) -> None:
    """Refuse a low-precision compute choice when torchao is missing (asked at launch and at the trainer's start)."""
    import importlib.util

    if precision in LOWP_COMPUTE and importlib.util.find_spec("torchao") is None:
        raise ValueError(f"base_model_precision {precision!r} needs the Python package 'torchao', which is not "
                         "installed: pip install torchao (in the Python that runs the trainer), or set "
                         "base_model_precision to 'no_change' or 'int8-quanto'.")


def check_compatible(precision: str, *, distributed: str, world_size: int | None, group_offload: bool) -> None:
    """Refuse what the swapped Linears do not implement (asked through config.QuantizationConfig.check_compatible;
    world_size None: not known yet)."""
    if precision not in LOWP_COMPUTE:
        return
    if group_offload:
        raise ValueError(f"base_model_precision {precision!r} cannot be combined with enable_group_offload: offloading "
                         "torchao's swapped Linears is not implemented. Disable one of them.")
    if precision == "int8-torchao" and distributed == "fsdp2" and world_size is not None and world_size > 1:
        raise ValueError(f"base_model_precision 'int8-torchao' cannot be combined with distributed 'fsdp2' over "
                         f"{world_size} processes: its weights are int8, which fully_shard does not shard as such. "
                         "Use distributed 'ddp' (each GPU holds the int8 model), or 'fp8-torchao' (bf16 weights) with "
                         "fsdp2.")


def check_environment(precision: str, *, device: torch.device | str | None) -> None:
    """Refuse a low-precision compute choice without torchao, or on a device without its kernels (None: this
    machine's first GPU, else its CPU). Asked before any weight loads: at launch (run.run_training), at the
    trainer's start (loop.build_run) and in model.build_model."""
    if precision not in LOWP_COMPUTE:
        return
    check_installed(precision)
    if device is None:
        device = "cuda:0" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    need = MIN_CAPABILITY[precision]
    fallback = "'int8-quanto' (weight-only int8, any device) or 'no_change'"
    if device.type != "cuda":
        raise ValueError(f"base_model_precision {precision!r} needs a CUDA GPU with compute capability >= "
                         f"{need[0]}.{need[1]}, but this run trains on {device.type!r}. Set base_model_precision to "
                         f"{fallback}, or train on such a GPU.")
    found = torch.cuda.get_device_capability(device)
    if found < need:
        other = " ('int8-torchao' runs from 8.0)" if precision == "fp8-torchao" and found >= (8, 0) else ""
        raise ValueError(f"base_model_precision {precision!r} needs compute capability >= {need[0]}.{need[1]}, but "
                         f"{torch.cuda.get_device_name(device)} ({device}) has {found[0]}.{found[1]}. Set "
                         f"base_model_precision to {fallback}{other}.")


def block_linear_names(transformer: torch.nn.Module) -> list[str]:
    """Names of every nn.Linear inside the double and single blocks (what quanto quantizes, and what this module
    swaps when its dims allow)."""
    names = []
    for prefix in ("transformer_blocks", "single_transformer_blocks"):
        for i, block in enumerate(getattr(transformer, prefix)):
            names += [f"{prefix}.{i}.{n}" for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)]
    return names


def lowp_targets(transformer: torch.nn.Module) -> list[str]:
    """The block Linears whose in and out features are multiples of 16: the ones apply_lowp_compute swaps."""
    return [name for name in block_linear_names(transformer)
            if _fits(transformer.get_submodule(name))]


def _fits(linear: torch.nn.Module) -> bool:
    return linear.in_features % DIM_MULTIPLE == 0 and linear.out_features % DIM_MULTIPLE == 0


# ---------------------------------------------------------------------------------------------------
# fp8: torchao's float8 casts, no weight gradient
# ---------------------------------------------------------------------------------------------------


def _to_float8(tensor: torch.Tensor, cast, *, role, dim: int, mm_config, config):
    """tensor cast to float8 as torchao's Float8Linear casts it (nothing when it is already float8)."""
    from torchao.float8.config import ScalingType
    from torchao.float8.distributed_utils import tensor_already_casted_to_fp8
    from torchao.float8.float8_scaling_utils import get_maybe_axiswise_dim, hp_tensor_to_float8_dynamic

    if tensor_already_casted_to_fp8(tensor) or cast.scaling_type is ScalingType.DISABLED:
        return tensor
    return hp_tensor_to_float8_dynamic(tensor, cast.target_dtype, mm_config, gemm_input_role=role,
                                       scaling_granularity=cast.scaling_granularity,
                                       axiswise_dim=get_maybe_axiswise_dim(dim, cast.scaling_granularity),
                                       round_scales_to_power_of_2=config.round_scales_to_power_of_2)


class _FrozenFloat8Matmul(torch.autograd.Function):
    """input @ weight_t in float8; backward returns the input gradient only (the weight is frozen)."""

    @staticmethod
    def forward(ctx, input_hp: torch.Tensor, weight_t: torch.Tensor, mm_config, config) -> torch.Tensor:
        from torchao.float8.float8_training_tensor import GemmInputRole

        ctx.save_for_backward(weight_t)  # no input: there is no weight gradient to compute
        ctx.mm_config, ctx.config = mm_config, config
        x = _to_float8(input_hp, config.cast_config_input, role=GemmInputRole.INPUT, dim=-1, mm_config=mm_config,
                       config=config)
        w = _to_float8(weight_t, config.cast_config_weight, role=GemmInputRole.WEIGHT, dim=0, mm_config=mm_config,
                       config=config)
        shape = x.shape
        out = torch.mm(x.reshape(-1, shape[-1]), w)
        return out.reshape(*shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        from torchao.float8.float8_training_tensor import GemmInputRole

        (weight_t,) = ctx.saved_tensors
        config, mm_config = ctx.config, ctx.mm_config
        shape = grad_output.shape
        go = _to_float8(grad_output.reshape(-1, shape[-1]), config.cast_config_grad_output,
                        role=GemmInputRole.GRAD_OUTPUT, dim=-1, mm_config=mm_config, config=config)
        w = _to_float8(weight_t, config.cast_config_weight_for_grad_input, role=GemmInputRole.WEIGHT, dim=-1,
                       mm_config=mm_config, config=config)
        grad_input = torch.mm(go, w.t())
        return grad_input.reshape(*shape[:-1], grad_input.shape[-1]), None, None, None


class Float8ComputeLinear(torch.nn.Linear):
    """A frozen Linear whose matmul runs in float8 (torchao's tensorwise recipe); weight and bias unchanged."""

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, *, emulate: bool = False) -> Float8ComputeLinear:
        """Wrap linear's own weight and bias (no copy). emulate: float8 rounding in ordinary matmuls (CPU tests)."""
        from torchao.float8 import Float8LinearConfig
        from torchao.float8.float8_training_tensor import LinearMMConfig, ScaledMMConfig

        with torch.device("meta"):
            new = cls(linear.in_features, linear.out_features, bias=False)
        new.weight, new.bias = linear.weight, linear.bias
        new.config = Float8LinearConfig(emulate=emulate)
        # as Float8Linear builds it: (emulate, fast accumulation, fp8 output, pad inner dim) for output, grad_input,
        # grad_weight (unused here)
        new.mm_config = LinearMMConfig(*(ScaledMMConfig(emulate, gemm.use_fast_accum, False, new.config.pad_inner_dim)
                                         for gemm in (new.config.gemm_config_output, new.config.gemm_config_grad_input,
                                                      new.config.gemm_config_grad_weight)))
        return new

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled(input.device.type):  # what autocast would feed F.linear
            input = input.to(torch.get_autocast_dtype(input.device.type))
        out = _FrozenFloat8Matmul.apply(input, self.weight.t(), self.mm_config, self.config)
        return out if self.bias is None else out + self.bias.to(out.dtype)


# ---------------------------------------------------------------------------------------------------
# int8: dynamic int8 activations x int8 weights, backward through the dequantized weight
# ---------------------------------------------------------------------------------------------------


def quantize_per_row(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 values, float32 scale per row): symmetric absmax quantization of each row to [-127, 127]."""
    t = tensor.float()
    scale = t.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / 127
    return (t / scale).round_().clamp_(-127, 127).to(torch.int8), scale


class _Int8DynamicMatmul(torch.autograd.Function):
    """input @ (weight_q * scale).T with the input quantized per token; backward returns the input gradient."""

    @staticmethod
    def forward(ctx, input: torch.Tensor, weight_q: torch.Tensor, weight_scale: torch.Tensor,
                out_dtype: torch.dtype) -> torch.Tensor:
        from torchao.kernel.intmm import int_scaled_matmul

        ctx.save_for_backward(weight_q, weight_scale)
        shape = input.shape
        x_q, x_scale = quantize_per_row(input.reshape(-1, shape[-1]))
        out = int_scaled_matmul(x_q, weight_q.t(), x_scale.contiguous()) * weight_scale
        return out.to(out_dtype).reshape(*shape[:-1], weight_q.shape[0])

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        weight_q, weight_scale = ctx.saved_tensors
        weight = (weight_q.float() * weight_scale[:, None]).to(grad_output.dtype)  # one Linear at a time
        return grad_output @ weight, None, None, None


class Int8ComputeLinear(torch.nn.Linear):
    """A frozen Linear stored as int8 per output channel whose matmul runs as dynamic int8 x int8."""

    weight_scale: torch.Tensor

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear) -> Int8ComputeLinear:
        """Quantize linear's weight per output channel (on the device it sits on); the bias is kept as it is."""
        with torch.device("meta"):
            new = cls(linear.in_features, linear.out_features, bias=False)
        with torch.no_grad():
            weight_q, scale = quantize_per_row(linear.weight)
        new.weight = torch.nn.Parameter(weight_q, requires_grad=False)
        new.register_buffer("weight_scale", scale.squeeze(1))
        new.bias = linear.bias
        return new

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.weight.float() * self.weight_scale[:, None].float()).to(dtype)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        kind = input.device.type
        out_dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else input.dtype
        out = _Int8DynamicMatmul.apply(input, self.weight, self.weight_scale.float(), out_dtype)
        return out if self.bias is None else out + self.bias.to(out.dtype)


# ---------------------------------------------------------------------------------------------------
# Applying it
# ---------------------------------------------------------------------------------------------------


def apply_lowp_compute(transformer: torch.nn.Module, *, precision: str, emulate: bool = False,
                       names: list[str] | None = None) -> list[str]:
    """Swap the block Linears whose dims are multiples of 16 for their low-precision-compute twins; return their
    names. Call it before apply_lora (LoRA wraps the swapped layers). emulate: fp8 without fp8 kernels (CPU tests).
    names: the subset to swap (default: lowp_targets); int8 quantizes each weight where it sits."""
    if precision not in LOWP_COMPUTE:
        raise ValueError(f"base_model_precision {precision!r} is not a low-precision compute choice; use one of "
                         f"{list(LOWP_COMPUTE)}.")
    check_installed(precision)
    from peft.tuners.tuners_utils import BaseTunerLayer

    if any(isinstance(m, BaseTunerLayer) for m in transformer.modules()):
        raise ValueError("apply_lowp_compute must run before apply_lora: this transformer already has LoRA layers.")
    names = lowp_targets(transformer) if names is None else names
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = transformer.get_submodule(parent_name)
        linear = getattr(parent, child)
        linear.requires_grad_(False)
        swapped = (Float8ComputeLinear.from_linear(linear, emulate=emulate) if precision == "fp8-torchao"
                   else Int8ComputeLinear.from_linear(linear))
        setattr(parent, child, swapped)
    return names


def lowp_module_names(model: torch.nn.Module) -> set[str]:
    """Names of the swapped modules, wherever PEFT nested them (`...to_q.base_layer`)."""
    return {name for name, m in model.named_modules() if isinstance(m, (Float8ComputeLinear, Int8ComputeLinear))}


def load_int8_transformer(folder: ModelFolder, *, default_dtype: str, quantize_via: str,
                          device: torch.device | str) -> torch.nn.Module:
    """The folder's transformer with its block Linears stored as int8, each block quantized as soon as it is read
    (model_files.load_transformer's after_block), where quantize_via says; the rest in default_dtype on device."""
    from .host_allocator import release_freed_memory
    from .model_files import load_transformer

    check_installed("int8-torchao")
    device = torch.device(device)

    def quantize_block(name: str, block: torch.nn.Module) -> None:
        if quantize_via == "accelerator":
            block.to(device)
        apply_lowp_compute(block, precision="int8-torchao",
                           names=[n for n, m in block.named_modules() if isinstance(m, torch.nn.Linear) and _fits(m)])
        block.to(device)
        release_freed_memory()  # the block's full-precision weights

    transformer = load_transformer(folder, precision=default_dtype, device="cpu", after_block=quantize_block)
    transformer.to(device).requires_grad_(False)
    log.info("int8-torchao: %d block Linears stored as int8 with int8 compute", len(lowp_module_names(transformer)))
    return transformer

