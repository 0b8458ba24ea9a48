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
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from .model_files import ModelFolder

log = logging.getLogger(__name__)

from .config import QuantizationConfig, QuantPrecision
from .host_allocator import release_freed_memory

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
    from .lowp_compute import block_linear_names

    return block_linear_names(transformer)


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


def _quantize_unit(name: str, unit: torch.nn.Module, *, qtype, device: torch.device, quantize_via: str,
                   on_unit: Callable[[str, torch.nn.Module], None] | None) -> None:
    """Quantize and freeze every Linear inside one block or decoder layer, where quantize_via says."""
    import torch
    from optimum.quanto import freeze, quantize

    if quantize_via == "accelerator":
        unit.to(device)
    include = [n for n, m in unit.named_modules() if isinstance(m, torch.nn.Linear)]
    if include:
        quantize(unit, weights=qtype, include=include)
        freeze(unit)
    if on_unit is not None:
        on_unit(name, unit)
    if quantize_via == "cpu":
        unit.to(device)
    release_freed_memory()  # the unit's full-precision weights and quanto's temporaries, freed into the heap


def _check_settings(precision: str, default_dtype: str, quantize_via: str):
    qtype = _qtype(precision, key="base_model_precision")
    if default_dtype not in DEFAULT_DTYPES:
        raise ValueError(f"base_model_default_dtype must be one of {list(DEFAULT_DTYPES)}, got {default_dtype!r}.")
    if quantize_via not in QUANTIZE_VIA:
        raise ValueError(f"quantize_via must be one of {list(QUANTIZE_VIA)}, got {quantize_via!r}.")
    return qtype


def load_quantized_transformer(folder: ModelFolder, *, precision: str, default_dtype: str = "bf16",
                               quantize_via: str = "accelerator", device: torch.device | str = "cpu",
                               on_block: Callable[[str, torch.nn.Module], None] | None = None) -> torch.nn.Module:
    """The folder's transformer with its block Linears quantized and frozen, quantized while it is read.

    Each block's weights are read in default_dtype, then quantized and frozen before the next block's are read
    (model_files.load_transformer's after_block), so host memory holds the quantized blocks plus one block in
    default_dtype, never the whole model in it. The result is the same as apply_quantization on a loaded model.
    """
    import torch

    from .model_files import load_transformer

    qtype = _check_settings(precision, default_dtype, quantize_via)
    device = torch.device(device)

    def quantize_block(name: str, block: torch.nn.Module) -> None:
        _quantize_unit(name, block, qtype=qtype, device=device, quantize_via=quantize_via, on_unit=on_block)

    transformer = load_transformer(folder, precision=default_dtype, device="cpu", after_block=quantize_block)
    return _finish_transformer(transformer, precision=precision, device=device, quantize_via=quantize_via)


def apply_quantization(transformer: torch.nn.Module, *, precision: str, default_dtype: str = "bf16",
                       quantize_via: str = "accelerator", device: torch.device | str = "cpu",
                       on_block: Callable[[str, torch.nn.Module], None] | None = None) -> list[str]:
    """Quantize and freeze the block Linears of a FLUX.2 transformer in place; return their names.

    The transformer may sit anywhere (load it on the CPU so the unquantized model never needs to fit on
    the accelerator); it ends on `device`, every parameter frozen. Layers left unquantized are cast to
    default_dtype ("bf16" or "fp32"). Call it before apply_lora: LoRA must wrap the quantized layers, not be
    quantized itself. on_block(name, block) runs after each block is quantized (tests use it to see where).
    load_quantized_transformer does the same while loading, without the whole model in default_dtype.
    """
    import torch

    from .model_files import torch_dtype

    qtype = _check_settings(precision, default_dtype, quantize_via)
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
    for prefix in ("transformer_blocks", "single_transformer_blocks"):
        for i, block in enumerate(getattr(transformer, prefix)):
            _quantize_unit(f"{prefix}.{i}", block, qtype=qtype, device=device, quantize_via=quantize_via,
                           on_unit=on_block)
    _finish_transformer(transformer, precision=precision, device=device, quantize_via=quantize_via)
    return transformer_quantization_targets(transformer)


def _finish_transformer(transformer: torch.nn.Module, *, precision: str, device: torch.device,
                        quantize_via: str) -> torch.nn.Module:
    """Move the unquantized rest to device, freeze everything, and check quanto replaced exactly the targets."""
    transformer.to(device)  # the unquantized rest
    transformer.requires_grad_(False)  # quanto's freeze() makes new Parameters that require grad
    targets = transformer_quantization_targets(transformer)
    done = quantized_module_names(transformer)
    assert done == set(targets), f"quanto quantized {sorted(done ^ set(targets))[:4]} unexpectedly"
    log.info("quantized %d transformer Linears to %s on %s (%s)", len(targets), precision,
             device if quantize_via == "accelerator" else "cpu", quantize_via)
    return transformer


def load_quantized_text_encoder(folder: ModelFolder, *, precision: str, quantization: str,
                                quantize_via: str = "accelerator", device: torch.device | str = "cpu") -> torch.nn.Module:
    """The folder's text encoder with its decoder-layer Linears quantized while it loads.

    transformers loads the encoder on the CPU with its weights mapped from the files, untouched; then each decoder
    layer gets freshly read weights and is quantized and frozen before the next is read
    (model_files.fill_text_encoder_layers), so host memory holds the quantized layers plus one layer in `precision`
    (Mistral-Small-3.1's 40 layers are 48 GB in bf16, 24 GB in int8), and the device only ever sees quantized
    layers. The result equals apply_text_encoder_quantization on a loaded encoder (tests/unit/test_weight_loading.py).
    """
    import torch

    from .model_files import fill_text_encoder_layers, load_text_encoder

    qtype = _qtype(quantization, key="text_encoder_1_precision")
    if quantize_via not in QUANTIZE_VIA:
        raise ValueError(f"quantize_via must be one of {list(QUANTIZE_VIA)}, got {quantize_via!r}.")
    device = torch.device(device)
    text_encoder = load_text_encoder(folder, precision=precision, device="cpu")
    layers_name, _ = _text_layers(text_encoder)

    def quantize_layer(name: str, layer: torch.nn.Module) -> None:
        _quantize_unit(name, layer, qtype=qtype, device=device, quantize_via=quantize_via, on_unit=None)

    if not fill_text_encoder_layers(text_encoder, folder, layers_name=layers_name, after_layer=quantize_layer):
        log.info("text encoder files: layer names not recognised; quantizing the weights as loaded")
        apply_text_encoder_quantization(text_encoder, precision=quantization, quantize_via=quantize_via, device=device)
        return text_encoder
    text_encoder.to(device).requires_grad_(False)
    targets = text_encoder_quantization_targets(text_encoder)
    done = quantized_module_names(text_encoder)
    assert done == set(targets), f"quanto quantized {sorted(done ^ set(targets))[:4]} unexpectedly"
    log.info("quantized %d text-encoder Linears to %s while loading", len(targets), quantization)
    return text_encoder


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
    for i, layer in enumerate(layers):
        _quantize_unit(f"{layers_name}.{i}", layer, qtype=qtype, device=device, quantize_via=quantize_via,
                       on_unit=None)
    text_encoder.to(device)
    text_encoder.requires_grad_(False)
    done = quantized_module_names(text_encoder)
    assert done == set(targets), f"quanto quantized {sorted(done ^ set(targets))[:4]} unexpectedly"
    log.info("quantized %d text-encoder Linears to %s", len(targets), precision)
    return targets
