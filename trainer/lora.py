"""LoRA on diffusers' Flux2Transformer2DModel: presets, injection through PEFT, and the adapter state.

Presets name exact modules (never bare suffixes: the PEFT target "to_out" would also match the double
block's `to_out` ModuleList and fail). The rule is module ownership in diffusers' FLUX.2:

- attention: every Linear of a block's `attn` module. Double blocks: to_q, to_k, to_v, add_q_proj,
  add_k_proj, add_v_proj, to_out.0, to_add_out. Single blocks: attn.to_qkv_mlp_proj and attn.to_out.
  FLUX.2's single blocks fuse attention with their MLP into those two layers (to_qkv_mlp_proj computes
  q, k, v and the SwiGLU input; to_out reads attention and MLP outputs), and a LoRA cannot adapt part
  of a matrix, so on single blocks `attention` also adapts the MLP part of those layers. Leaving them
  out would leave 48 of FLUX.2-dev's 56 blocks without any attention adapter.
- mlp: every Linear of a double block's `ff` and `ff_context` (linear_in, linear_out). Feed-forward
  only, strictly: single blocks have no separate feed-forward layer, so `mlp` adapts no single block.
- all: attention + mlp, i.e. every Linear inside every block (30 modules on the tiny model, 192 on dev).
- tiny: the q/k/v input projections: double to_q/to_k/to_v and add_q/k/v_proj; single
  to_qkv_mlp_proj (the single block's only q/k/v projection, fused with the MLP input).

So attention | mlp == all, attention & mlp is empty, and tiny is a subset of attention.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

LORA_PRESETS = ("all", "attention", "mlp", "tiny")
LORA_INITS = ("default", "gaussian", "orthogonal")
"""PEFT inits that start from a zero delta and leave the base weights untouched. PiSSA, OLoRA, CorDA
and LoftQ rewrite the base weights, so a file saved from them would not apply to the stock model."""

ADAPTER_NAME = "default"

_DOUBLE_QKV = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")
_DOUBLE_OUT = ("attn.to_out.0", "attn.to_add_out")
_DOUBLE_MLP = ("ff.linear_in", "ff.linear_out", "ff_context.linear_in", "ff_context.linear_out")
_SINGLE_QKV = ("attn.to_qkv_mlp_proj",)
_SINGLE_OUT = ("attn.to_out",)

# preset -> (layers in each double block, layers in each single block)
_PRESET_LAYERS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "all": (_DOUBLE_QKV + _DOUBLE_OUT + _DOUBLE_MLP, _SINGLE_QKV + _SINGLE_OUT),
    "attention": (_DOUBLE_QKV + _DOUBLE_OUT, _SINGLE_QKV + _SINGLE_OUT),
    "mlp": (_DOUBLE_MLP, ()),
    "tiny": (_DOUBLE_QKV, _SINGLE_QKV),
}


def _check_preset(preset: str) -> None:
    if preset not in LORA_PRESETS:
        raise ValueError(f"lora preset {preset!r} is unknown; valid presets: {', '.join(LORA_PRESETS)}.")


def preset_layers(preset: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(layers adapted in each double block, in each single block) of `preset`, as module names inside a block
    (e.g. "attn.to_q"); trainer/flops.py counts the adapters' FLOPs from them."""
    _check_preset(preset)
    return _PRESET_LAYERS[preset]


def lora_target_modules(transformer: torch.nn.Module, *, preset: str) -> list[str]:
    """Fully qualified names of the Linear modules `preset` adapts, in model order."""
    import torch

    _check_preset(preset)
    double_layers, single_layers = _PRESET_LAYERS[preset]
    try:
        n_double = len(transformer.transformer_blocks)
        n_single = len(transformer.single_transformer_blocks)
    except AttributeError:
        raise ValueError(
            f"lora_target_modules needs a diffusers Flux2Transformer2DModel, got {type(transformer).__name__}."
        ) from None
    names = [f"transformer_blocks.{i}.{layer}" for i in range(n_double) for layer in double_layers]
    names += [f"single_transformer_blocks.{i}.{layer}" for i in range(n_single) for layer in single_layers]
    for name in names:
        try:
            module = transformer.get_submodule(name)
        except AttributeError:
            module = None
        if not isinstance(module, torch.nn.Linear):
            raise ValueError(
                f"lora preset {preset!r}: module {name!r} is missing or not a Linear in {type(transformer).__name__}; "
                "is this a FLUX.2 transformer?"
            )
    return names


def _check_lora_options(*, rank: int, alpha: float, dropout: float, init: str) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"lora.rank must be an integer >= 1, got {rank!r}.")
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"lora.alpha must be > 0, got {alpha!r}; alpha = rank gives scale 1.")
    if not (isinstance(dropout, (int, float)) and 0 <= dropout < 1):
        raise ValueError(f"lora.dropout must be in [0, 1), got {dropout!r}; use 0 to disable it.")
    if init not in LORA_INITS:
        raise ValueError(f"lora.init {init!r} is unknown; valid inits: {', '.join(LORA_INITS)}.")
    if init == "orthogonal" and rank % 2:
        raise ValueError(
            f"lora.init 'orthogonal' needs an even lora.rank, got {rank}; use an even rank or init 'default'."
        )


def apply_lora(
    transformer: torch.nn.Module,
    *,
    preset: str,
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    init: str = "default",
) -> None:
    """Freeze the base model and inject a PEFT LoRA adapter named "default" on exactly the preset's modules.

    init: "default" (Kaiming-uniform A, zero B), "gaussian" (A ~ N(0, 1/rank), zero B) or "orthogonal"
    (A and B with orthogonal rows so that B @ A = 0; even rank). Each starts as the unchanged base model.
    """
    _check_lora_options(rank=rank, alpha=alpha, dropout=dropout, init=init)
    targets = lora_target_modules(transformer, preset=preset)
    from peft import LoraConfig

    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        init_lora_weights=True if init == "default" else init,
        target_modules=targets,
    )
    from .lora_fused import use_fused_forward

    use_fused_forward(config)
    transformer.requires_grad_(False)
    if hasattr(transformer, "add_adapter"):
        transformer.add_adapter(config, adapter_name=ADAPTER_NAME)
    else:
        from peft import inject_adapter_in_model

        inject_adapter_in_model(config, transformer, adapter_name=ADAPTER_NAME)
    adapted = adapted_module_names(transformer)
    assert adapted == set(targets), f"PEFT adapted {sorted(adapted ^ set(targets))} unexpectedly"


def adapted_module_names(transformer: torch.nn.Module) -> set[str]:
    """Names of the modules that carry the "default" LoRA adapter."""
    from peft.tuners.lora import LoraLayer

    return {
        name
        for name, module in transformer.named_modules()
        if isinstance(module, LoraLayer) and ADAPTER_NAME in module.lora_A
    }


def lora_state_dict(transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's weights in diffusers/PEFT naming (`<module>.lora_A.weight`), detached, on their device."""
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(transformer, adapter_name=ADAPTER_NAME)
    return {k: v.detach() for k, v in state.items()}
