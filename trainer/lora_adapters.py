"""Attaching LoRA files to a loaded diffusers transformer for sampling, and taking them off again.

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
    """Within the block, the transformer runs with each LoRA at its strength; afterwards it is as before."""
    if not loras:
        yield
        return
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    names: list[str] = []
    try:
        for index, ref in enumerate(loras):
            state, adapter_config = load_as_diffusers(ref.path)
            name = f"{ADAPTER_PREFIX}{index}"
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


def _lora_layers(transformer: torch.nn.Module):
    from peft.tuners.lora import LoraLayer

    return [m for m in transformer.modules() if isinstance(m, LoraLayer)]


def _set_strengths(transformer: torch.nn.Module, strengths: dict[str, float]) -> None:
    for layer in _lora_layers(transformer):
        active = [n for n in strengths if n in layer.lora_A]
        if not active:
            continue
        layer.set_adapter(active)
        for name in active:
            layer.set_scale(name, strengths[name])


def _remove_adapters(transformer: torch.nn.Module, names: list[str]) -> None:
    for layer in _lora_layers(transformer):
        for name in names:
            if name in layer.lora_A:
                layer.delete_adapter(name)
