"""Attaching LoRA and LoKr files to a loaded diffusers transformer for sampling, and taking them off again.

The adapters stay unmerged (PEFT layers with per-adapter weights), so the base weights are never
modified and a cached transformer can serve the next graph run with other LoRAs or none.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

from .lora_keys import adapter_config_of_file, comfy_to_diffusers, load_lora_file

ADAPTER_PREFIX = "flux2lora_"


def load_as_diffusers(path: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(plain diffusers-named state without prefix, PEFT LoraConfig kwargs) of a LoRA file in either layout."""
    state, metadata, layout = load_lora_file(path)
    if layout == "comfyui":
        state, adapter_config = comfy_to_diffusers(state)
    else:
        adapter_config = adapter_config_of_file(state, metadata)
    prefix = "transformer."
    plain = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}
    return plain, adapter_config


@contextlib.contextmanager
def attached_loras(transformer: torch.nn.Module, *, loras: Sequence) -> Iterator[None]:
    """Within the block, the transformer runs with each LoRA (or LoKr) at its strength; afterwards it is as before."""
    if not loras:
        yield
        return
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    from .lokr_keys import adapter_type_of_file

    names: list[str] = []
    try:
        for index, ref in enumerate(loras):
            name = f"{ADAPTER_PREFIX}{index}"
            if adapter_type_of_file(ref.path) == "lokr":
                names.append(name)
                _attach_lokr(transformer, path=ref.path, name=name)
                continue
            state, adapter_config = load_as_diffusers(ref.path)
            config = LoraConfig(**adapter_config)
            inject_adapter_in_model(config, transformer, adapter_name=name)
            names.append(name)
            result = set_peft_model_state_dict(transformer, state, adapter_name=name)
            unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
            if unexpected:
                raise ValueError(f"LoRA {ref.path} has tensors this model has no place for, e.g. {unexpected[0]}.")
        _set_strengths(transformer, {name: float(ref.strength) for name, ref in zip(names, loras)})
        yield
    finally:
        _remove_adapters(transformer, names)


def _attach_lokr(transformer: torch.nn.Module, *, path: str, name: str) -> None:
    """A LoKr file (ComfyUI layout) as PEFT LoKr adapter `name`: the fused q/k/v split exactly (trainer/lokr_keys.py),
    each layer given the file's factors and ComfyUI's scale (alpha / dim), in the base weight's dtype."""
    from peft import LoKrConfig, inject_adapter_in_model

    from .lokr import set_lokr_factors
    from .lokr_keys import comfy_lokr_modules, load_adapter_file, lokr_to_diffusers

    state = load_adapter_file(path)[0]
    what = f"LoKr file {path}"
    modules = lokr_to_diffusers(comfy_lokr_modules(state, what=what), what=what)
    missing = [m for m in modules if not isinstance(_submodule(transformer, m), torch.nn.Module)]
    if missing:
        raise ValueError(f"{what} adapts {missing[0]!r}, which this FLUX.2 model does not have; it was trained for "
                         "another model.")
    inject_adapter_in_model(LoKrConfig(r=1, alpha=1, target_modules=sorted(modules)), transformer, adapter_name=name)
    for module_name, factors in modules.items():
        layer = transformer.get_submodule(module_name)
        weight = layer.get_base_layer().weight
        dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
        tensors = {f"lokr_{k}": v.to(weight.device, dtype) for k, v in
                   (("w1", factors.w1), ("w1_a", factors.w1_a), ("w1_b", factors.w1_b), ("w2", factors.w2),
                    ("w2_a", factors.w2_a), ("w2_b", factors.w2_b)) if v is not None}
        set_lokr_factors(layer, name, tensors, scale=factors.scale)


def _submodule(transformer: torch.nn.Module, name: str) -> torch.nn.Module | None:
    try:
        return transformer.get_submodule(name)
    except AttributeError:
        return None


def _adapter_layers(transformer: torch.nn.Module):
    from peft.tuners.lokr import LoKrLayer
    from peft.tuners.lora import LoraLayer

    return [m for m in transformer.modules() if isinstance(m, (LoraLayer, LoKrLayer))]


def _adapters_of(layer) -> set[str]:
    return set(layer.lora_A) if hasattr(layer, "lora_A") else set(layer._available_adapters)


def _set_strengths(transformer: torch.nn.Module, strengths: dict[str, float]) -> None:
    for layer in _adapter_layers(transformer):
        active = [n for n in strengths if n in _adapters_of(layer)]
        if not active:
            continue
        layer.set_adapter(active)
        for name in active:
            layer.set_scale(name, strengths[name])


def _remove_adapters(transformer: torch.nn.Module, names: list[str]) -> None:
    from peft.tuners.lokr import LoKrLayer

    for layer in _adapter_layers(transformer):
        for name in names:
            if name in _adapters_of(layer):
                layer.delete_adapter(name)
    # An empty LoKr layer is unwrapped: a LoRA injected later would otherwise wrap it, and a LoKr after that wrap
    # the LoRA layer, one more layer per graph run. (Empty LoRA layers are reused by the next LoRA as they are.)
    for parent in list(transformer.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, LoKrLayer) and not child._available_adapters:
                setattr(parent, child_name, child.base_layer)
