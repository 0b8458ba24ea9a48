"""Weight-only int8 / int4 quantization of the frozen FLUX.2 transformer and of the Mistral text encoder
(optimum-quanto), applied before LoRA so the adapters train in full precision on top of it.

What is quantized, and why the rest is not:

- Transformer: every `nn.Linear` inside the 8 double and 48 single blocks of FLUX.2-dev (about 97% of
  its 32B weights). Everything outside the blocks keeps `base_model_default_dtype`: the input embedders
  (`x_embedder`, `context_embedder`), the timestep and guidance embedders, the three modulation layers that
  produce every block's scale/shift/gate, `norm_out` and `proj_out`, and every norm (LayerNorm / RMSNorm;
  quanto quantizes no norm weights anyway). These layers touch every token of every block or produce the
  output directly, so their rounding error is not averaged away; diffusers' own FLUX.2 LoRA example keeps
  `proj_out` unquantized for the same reason. Together they are about 3% of the weights.
- Text encoder: every `nn.Linear` inside the Mistral decoder layers (`language_model.layers.*`). The token
  embedding, the final norm, `lm_head` (never used for hidden states) and the vision tower (never used for
  text) stay in the encoder's dtype.

Weights are quantized and then frozen (`optimum.quanto.freeze`): the float weights are replaced by int8 or
packed int4 tensors plus scales and cannot train. Activations stay in the compute dtype (weight-only).
PEFT 0.21 has no quanto-specific LoRA layer, but quanto's `QLinear` subclasses `nn.Linear`, so PEFT's plain
`lora.Linear` wraps it as its base layer and calls it unchanged; the LoRA A/B weights are ordinary fp32
Linears whose names, shapes and saved keys are exactly those of an unquantized run (tests prove both).
Merging a LoRA into a quantized base is not supported (and never done here).

`quantize_via` chooses where the rounding runs, block by block, so the unquantized model never has to
fit on the accelerator: "accelerator" moves each block there, then quantizes it (fast); "cpu" quantizes
each block in CPU memory, then moves the quantized block (slow, the accelerator only ever holds quantized
blocks). On a machine without an accelerator both run on the CPU.

int8 needs no compiled code; int4 compiles optimum-quanto's C++ extension on first use (minutes).
Quantized layers cannot be group-offloaded (diffusers' hooks cannot move quanto's tensors: "Couldn't swap
QLinear.weight") and FSDP2's fully_shard turns quanto weights back into full-precision shards (measured:
the local shard of a quantized to_q is a float32 tensor), so both combinations are refused before any weight
loads (config.QuantizationConfig.check_compatible).
"""

from __future__ import annotations

import logging
import typing
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

from .config import QuantizationConfig, QuantPrecision

QUANTIZE_VIA: tuple[str, ...] = typing.get_args(typing.get_type_hints(QuantizationConfig)["quantize_via"])
DEFAULT_DTYPES: tuple[str, ...] = typing.get_args(typing.get_type_hints(QuantizationConfig)["base_model_default_dtype"])

BYTES_PER_WEIGHT = {"no_change": None, "int8-quanto": 1.0, "int4-quanto": 0.5}
"""Storage of one quantized weight (scales and int4 group shifts add about 3% on top, see memory.py)."""


def _qtype(precision: str, *, key: str):
    from optimum.quanto import qint4, qint8

    table = {"int8-quanto": qint8, "int4-quanto": qint4}
    if precision not in table:
        raise ValueError(
            f"{key} {precision!r} is not a quanto precision; use one of {list(table)} (or 'no_change' for none)."
        )
    return table[precision]


def transformer_quantization_targets(transformer: torch.nn.Module) -> list[str]:
    """Names of the transformer Linears that get quantized: every Linear inside a double or single block."""
    import torch

    names = []
    for prefix, blocks in (("transformer_blocks", transformer.transformer_blocks),
                           ("single_transformer_blocks", transformer.single_transformer_blocks)):
        for i, block in enumerate(blocks):
            names += [f"{prefix}.{i}.{n}" for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)]
    return names


def text_encoder_quantization_targets(text_encoder: torch.nn.Module) -> list[str]:
    """Names of the text-encoder Linears that get quantized: every Linear inside a Mistral decoder layer."""
    import torch

    layers_name, _ = _text_layers(text_encoder)
    return [n for n, m in text_encoder.named_modules()
            if isinstance(m, torch.nn.Linear) and n.startswith(layers_name + ".")]


def _text_layers(text_encoder: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    for name in ("model.language_model.layers", "language_model.model.layers", "model.layers"):
        try:
            return name, text_encoder.get_submodule(name)
        except AttributeError:
            continue
    raise ValueError(
        f"text_encoder_1_precision: cannot find the decoder layers of {type(text_encoder).__name__}; "
        "is this FLUX.2's Mistral3 text encoder?"
    )


def quantized_module_names(model: torch.nn.Module) -> set[str]:
    """Names of the modules quanto replaced (QLinear), wherever PEFT nested them (`...to_q.base_layer`)."""
    from optimum.quanto import QModuleMixin

    return {name for name, module in model.named_modules() if isinstance(module, QModuleMixin)}


def _quantize_units(units: Iterable[tuple[str, torch.nn.Module, list[str]]], *, qtype, device: torch.device,
                    quantize_via: str, on_unit: Callable[[str, torch.nn.Module], None] | None) -> None:
    """Quantize and freeze each (name, module, Linear names inside it) where quantize_via says, one at a time."""
    from optimum.quanto import freeze, quantize

    for name, unit, include in units:
        if quantize_via == "accelerator":
            unit.to(device)
        if include:
            quantize(unit, weights=qtype, include=include)
            freeze(unit)
        if on_unit is not None:
            on_unit(name, unit)
        if quantize_via == "cpu":
            unit.to(device)


def apply_quantization(transformer: torch.nn.Module, *, precision: str, default_dtype: str = "bf16",
                       quantize_via: str = "accelerator", device: torch.device | str = "cpu",
                       on_block: Callable[[str, torch.nn.Module], None] | None = None) -> list[str]:
    """Quantize and freeze the block Linears of a FLUX.2 transformer in place; return their names.

    The transformer may sit anywhere (load it on the CPU so the unquantized model never needs to fit on
    the accelerator); it ends on `device`, every parameter frozen. Layers left unquantized are cast to
    default_dtype ("bf16" or "fp32"). Call it before apply_lora: LoRA must wrap the quantized layers, not be
    quantized itself. on_block(name, block) runs after each block is quantized (tests use it to see where).
    """
    import torch

    from .model_files import torch_dtype

    qtype = _qtype(precision, key="base_model_precision")
    if default_dtype not in DEFAULT_DTYPES:
        raise ValueError(f"base_model_default_dtype must be one of {list(DEFAULT_DTYPES)}, got {default_dtype!r}.")
    if quantize_via not in QUANTIZE_VIA:
        raise ValueError(f"quantize_via must be one of {list(QUANTIZE_VIA)}, got {quantize_via!r}.")
    if quantized_module_names(transformer):
        raise ValueError("apply_quantization: this transformer is already quantized; load a fresh one.")
    from peft.tuners.lora import LoraLayer

    if any(isinstance(m, LoraLayer) for m in transformer.modules()):
        # STYLE order: quantize the base, then inject LoRA (quanto would otherwise quantize lora_A/lora_B).
        raise ValueError("apply_quantization must run before apply_lora: this transformer already has LoRA layers.")
    device = torch.device(device)
    transformer.requires_grad_(False)
    dtype = torch_dtype(default_dtype)
    if any(p.dtype != dtype for p in transformer.parameters()):
        transformer.to(dtype)  # the unquantized parts' dtype; quanto keeps its scales in it too
    targets = transformer_quantization_targets(transformer)
    units = []
    for prefix, blocks in (("transformer_blocks", transformer.transformer_blocks),
                           ("single_transformer_blocks", transformer.single_transformer_blocks)):
        for i, block in enumerate(blocks):
            include = [n for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)]
            units.append((f"{prefix}.{i}", block, include))
    _quantize_units(units, qtype=qtype, device=device, quantize_via=quantize_via, on_unit=on_block)
    transformer.to(device)  # the unquantized rest
    transformer.requires_grad_(False)  # quanto's freeze() makes new Parameters that require grad
    done = quantized_module_names(transformer)
    assert done == set(targets), f"quanto quantized {sorted(done ^ set(targets))[:4]} unexpectedly"
    log.info("quantized %d transformer Linears to %s on %s (%s)", len(targets), precision,
             device if quantize_via == "accelerator" else "cpu", quantize_via)
    return targets


def apply_text_encoder_quantization(text_encoder: torch.nn.Module, *, precision: str,
                                    quantize_via: str = "accelerator", device: torch.device | str = "cpu") -> list[str]:
    """Quantize and freeze the decoder-layer Linears of the Mistral text encoder in place; return their names.

    Same rules as apply_quantization; the rest keeps the encoder's dtype and ends on `device`.
    """
    import torch

    qtype = _qtype(precision, key="text_encoder_1_precision")
    if quantize_via not in QUANTIZE_VIA:
        raise ValueError(f"quantize_via must be one of {list(QUANTIZE_VIA)}, got {quantize_via!r}.")
    device = torch.device(device)
    text_encoder.requires_grad_(False)
    layers_name, layers = _text_layers(text_encoder)
    targets = text_encoder_quantization_targets(text_encoder)
    units = [(f"{layers_name}.{i}", layer,
              [n for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)]) for i, layer in enumerate(layers)]
    _quantize_units(units, qtype=qtype, device=device, quantize_via=quantize_via, on_unit=None)
    text_encoder.to(device)
    text_encoder.requires_grad_(False)
    done = quantized_module_names(text_encoder)
    assert done == set(targets), f"quanto quantized {sorted(done ^ set(targets))[:4]} unexpectedly"
    log.info("quantized %d text-encoder Linears to %s", len(targets), precision)
    return targets
