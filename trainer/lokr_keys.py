"""LoKr files for FLUX.2 in ComfyUI's key names: saving a trained LoKr, reading one back, its deltas.

Keys, as ComfyUI's comfy/weight_adapter/lokr.py reads them, under the BFL module names our LoRA files use
(trainer/lora_keys.py; every key starts with `diffusion_model.`):
    <module>.lokr_w1   or  <module>.lokr_w1_a + <module>.lokr_w1_b     (w1 = w1_a @ w1_b)
    <module>.lokr_w2   or  <module>.lokr_w2_a + <module>.lokr_w2_b     (w2 = w2_a @ w2_b)
    <module>.alpha     (scalar; only written when a factor is decomposed)
ComfyUI's delta is kron(w1, w2) * alpha / dim, where dim is the row count of the decomposed factor's `_b` (w2's
when both are decomposed); with neither decomposed (or no alpha) the scale is 1. We save so that this is exactly
the delta the trainer trained: alpha = trained scale * dim, and with no decomposed factor the trained scale (1 under
LyCORIS's rules) is folded into w1.

The fused q/k/v (trainer/lokr.py): the double blocks' q, k and v of a stream share one w2, so the BFL qkv module
gets w1 = [w1_q; w1_k; w1_v] (rows stacked) and that w2; decomposed w1s stack as w1_a = block-diagonal(w1_a_q,
w1_a_k, w1_a_v) and w1_b = [w1_b_q; w1_b_k; w1_b_v], whose product stacks the three w1s exactly. Reading a file
back splits w1's rows in thirds (each projection: its rows of w1, the same w2), which is exact whenever w1 has a
multiple of 3 rows; other files (trained on the fused layer with another factorization) are refused there.

Only safetensors is read; nothing is unpickled. Tensor code imports torch inside the functions.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .lora_keys import (
    COMFY_PREFIX,
    bfl_module_to_diffusers,
    describe_lora_file,
    diffusers_module_to_bfl,
    load_lora_file,
    save_lora_file,
)

if TYPE_CHECKING:
    import torch

LOKR_SUFFIXES = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
ADAPTER_TYPES = ("lora", "lokr")
"""What the safetensors metadata key `adapter_type` says a file holds."""


@dataclass(frozen=True, kw_only=True)
class LokrFactors:
    """One layer's LoKr: delta = scale * kron(w1, w2), each factor full or a product a @ b."""

    w1: Any = None
    w1_a: Any = None
    w1_b: Any = None
    w2: Any = None
    w2_a: Any = None
    w2_b: Any = None
    scale: float = 1.0

    def factor(self, which: int) -> torch.Tensor:
        """w1 or w2 (which = 1 or 2) as a float32 matrix."""
        full, a, b = (self.w1, self.w1_a, self.w1_b) if which == 1 else (self.w2, self.w2_a, self.w2_b)
        return full.float() if full is not None else a.float() @ b.float()

    @property
    def shape(self) -> tuple[int, int]:
        """(out, in) of the delta."""
        rows1, cols1 = _dims(self.w1, self.w1_a, self.w1_b)
        rows2, cols2 = _dims(self.w2, self.w2_a, self.w2_b)
        return rows1 * rows2, cols1 * cols2

    def delta(self) -> torch.Tensor:
        import torch

        return torch.kron(self.factor(1), self.factor(2)) * self.scale

    def delta_rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of delta without building the whole (row i = kron(w1[i // k], w2[i % k]))."""
        import torch

        w1, w2 = self.factor(1), self.factor(2)
        k = w2.shape[0]
        rows = torch.arange(start, stop)
        return (w1[rows // k][:, :, None] * w2[rows % k][:, None, :]).reshape(stop - start, -1) * self.scale

    def tensors(self) -> dict[str, Any]:
        """{suffix: tensor} of the factors present."""
        return {s: getattr(self, s.removeprefix("lokr_")) for s in LOKR_SUFFIXES
                if getattr(self, s.removeprefix("lokr_")) is not None}


def _dims(full, a, b) -> tuple[int, int]:
    return tuple(full.shape) if full is not None else (a.shape[0], b.shape[1])


def is_lokr_state(state: dict) -> bool:
    """Whether a state dict holds LoKr factors (any key ending in a lokr_* suffix)."""
    return any(key.rsplit(".", 1)[-1] in LOKR_SUFFIXES + ("lokr_t2",) for key in state)


# ---------------------------------------------------------------------------------------------------------------
# Trained (PEFT names) -> ComfyUI


def trained_lokr_to_comfy(state: dict[str, torch.Tensor], *, scales: dict[str, float]) -> dict[str, torch.Tensor]:
    """The ComfyUI/BFL-keyed LoKr of a trained one: `state` in diffusers/PEFT names (`<module>.lokr_w1`, as
    parallelize.full_lora_state gives it; a w2 shared by q/k/v appears under one of them), `scales` each module's
    delta scale (lokr.lokr_scales)."""
    import torch

    modules: dict[str, dict[str, Any]] = {}
    for key, value in state.items():
        name, _, suffix = key.removeprefix("transformer.").rpartition(".")
        if suffix not in LOKR_SUFFIXES:
            raise ValueError(f"trained LoKr: key {key!r} is no LoKr factor ({', '.join(LOKR_SUFFIXES)}).")
        modules.setdefault(name, {})[suffix] = value
    fused: dict[str, dict[int, str]] = {}
    out: dict[str, torch.Tensor] = {}
    for name in sorted(modules):
        if name not in scales:
            raise ValueError(f"trained LoKr: no scale for module {name!r}.")
        try:
            bfl, slot = diffusers_module_to_bfl(name)
        except KeyError:
            raise ValueError(f"trained LoKr: {name!r} is no FLUX.2 layer this trainer adapts.") from None
        if slot is not None:
            fused.setdefault(bfl, {})[slot] = name
            continue
        if name == "norm_out.linear":  # not a layer any preset adapts; BFL stores its two halves swapped
            raise ValueError("trained LoKr: norm_out.linear is not supported (BFL stores its halves swapped).")
        out |= _comfy_module(bfl, _factors(modules[name], scales[name], name=name))
    for bfl, slots in sorted(fused.items()):
        if sorted(slots) != [0, 1, 2]:
            raise ValueError(f"trained LoKr: {bfl} has q/k/v adapters for slots {sorted(slots)}; LoKr adapts all three.")
        names = [slots[i] for i in range(3)]
        parts = [modules[n] for n in names]
        if len({scales[n] for n in names}) != 1:
            raise ValueError(f"trained LoKr: q/k/v of {bfl} have different scales {[scales[n] for n in names]}.")
        shared = [p for p in parts if "lokr_w2" in p or "lokr_w2_a" in p]
        w2 = {k: v for k, v in shared[0].items() if k.startswith("lokr_w2")} if shared else {}
        for p in shared[1:]:
            if any(not torch.equal(p[k], w2[k]) for k in w2):
                raise ValueError(f"trained LoKr: q/k/v of {bfl} have different w2; they must share it to fuse exactly.")
        if all("lokr_w1" in p for p in parts):
            w1 = {"lokr_w1": torch.cat([p["lokr_w1"] for p in parts], dim=0)}
        elif all("lokr_w1_a" in p for p in parts):
            w1 = {"lokr_w1_a": torch.block_diag(*[p["lokr_w1_a"] for p in parts]),
                  "lokr_w1_b": torch.cat([p["lokr_w1_b"] for p in parts], dim=0)}
        else:
            raise ValueError(f"trained LoKr: q/k/v of {bfl} mix full and decomposed w1.")
        out |= _comfy_module(bfl, _factors(w1 | w2, scales[names[0]], name=bfl))
    return out


def _factors(parts: dict[str, Any], scale: float, *, name: str) -> LokrFactors:
    """LokrFactors from {suffix: tensor}, checked: one w1 and one w2 (full or a and b), shapes that multiply."""
    values = {s.removeprefix("lokr_"): parts.get(s) for s in LOKR_SUFFIXES}
    for i in (1, 2):
        full, a, b = values[f"w{i}"], values[f"w{i}_a"], values[f"w{i}_b"]
        if full is not None and (a is not None or b is not None):
            raise ValueError(f"LoKr module {name!r} has both lokr_w{i} and lokr_w{i}_a/_b; keep one form.")
        if full is None and (a is None or b is None):
            raise ValueError(f"LoKr module {name!r} lacks w{i}: it needs lokr_w{i}, or lokr_w{i}_a and lokr_w{i}_b.")
        for t, suffix in ((full, ""), (a, "_a"), (b, "_b")):
            if t is not None and t.ndim != 2:
                raise ValueError(f"LoKr module {name!r}: lokr_w{i}{suffix} has shape {tuple(t.shape)}; FLUX.2's "
                                 "layers are Linear, so every factor is a matrix.")
        if full is None and a.shape[1] != b.shape[0]:
            raise ValueError(f"LoKr module {name!r}: lokr_w{i}_a {tuple(a.shape)} and lokr_w{i}_b {tuple(b.shape)} "
                             "do not multiply.")
    return LokrFactors(**values, scale=float(scale))


def _comfy_module(bfl: str, factors: LokrFactors) -> dict[str, torch.Tensor]:
    """The file's keys for one module, scaled so that ComfyUI's alpha / dim rule gives factors.scale."""
    import torch

    tensors = factors.tensors()
    prefix = f"{COMFY_PREFIX}{bfl}."
    if factors.w2 is None:
        dim = factors.w2_b.shape[0]
    elif factors.w1 is None:
        dim = factors.w1_b.shape[0]
    else:
        dim = None
    out = {}
    for suffix, tensor in tensors.items():
        if dim is None and suffix == "lokr_w1" and factors.scale != 1.0:
            tensor = tensor * factors.scale  # ComfyUI applies scale 1 to full factors: fold it in
        out[prefix + suffix] = tensor.detach().contiguous()
    if dim is not None:
        out[prefix + "alpha"] = torch.tensor(factors.scale * dim, dtype=torch.float32)
    return out


# ---------------------------------------------------------------------------------------------------------------
# ComfyUI -> modules


def comfy_lokr_modules(state: dict[str, torch.Tensor], *, what: str = "LoKr") -> dict[str, LokrFactors]:
    """{BFL module (no prefix): LokrFactors with ComfyUI's scale} of a ComfyUI-layout LoKr; every key checked."""
    parts: dict[str, dict[str, Any]] = {}
    for key, value in state.items():
        if not key.startswith(COMFY_PREFIX):
            raise ValueError(f"{what}: key {key!r} does not start with {COMFY_PREFIX!r}; every key of a FLUX.2 LoKr "
                             "in ComfyUI's layout must. Is it a LoKr for another model or in another layout?")
        module, _, suffix = key[len(COMFY_PREFIX):].rpartition(".")
        if suffix == "lokr_t2":
            raise ValueError(f"{what}: key {key!r} is a Tucker core, which LoKr uses only for convolutions; FLUX.2's "
                             "layers are Linear.")
        if suffix not in LOKR_SUFFIXES + ("alpha",):
            raise ValueError(f"{what}: key {key!r} is no LoKr key (suffixes allowed: {', '.join(LOKR_SUFFIXES)}, "
                             "alpha); a file may not mix LoKr with LoRA, DoRA or other adapters.")
        try:
            bfl_module_to_diffusers(module)
        except KeyError:
            raise ValueError(f"{what}: key {key!r} names no FLUX.2 module in the ComfyUI/BFL layout (module "
                             f"{module!r}). Is this a LoKr for another model?") from None
        parts.setdefault(module, {})[suffix] = value
    modules = {}
    for module, tensors in sorted(parts.items()):
        alpha = tensors.pop("alpha", None)
        if alpha is not None and alpha.numel() != 1:
            raise ValueError(f"{what}: {COMFY_PREFIX}{module}.alpha must be a scalar, got {tuple(alpha.shape)}.")
        factors = _factors(tensors, 1.0, name=COMFY_PREFIX + module)
        dim = factors.w2_b.shape[0] if factors.w2 is None else (factors.w1_b.shape[0] if factors.w1 is None else None)
        scale = float(alpha.item()) / dim if alpha is not None and dim is not None else 1.0
        modules[module] = LokrFactors(**{k: getattr(factors, k) for k in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b")},
                                      scale=scale)
    return modules


def lokr_to_diffusers(modules: dict[str, LokrFactors], *, what: str = "LoKr") -> dict[str, LokrFactors]:
    """{diffusers module: LokrFactors} of BFL-named LoKr modules: a fused qkv split into q, k, v (rows of w1 in
    thirds, the same w2: exact), the final layer's adaLN refused (its halves are swapped between layouts)."""
    out = {}
    for bfl, factors in modules.items():
        names = bfl_module_to_diffusers(bfl)
        if bfl == "final_layer.adaLN_modulation.1":
            raise ValueError(f"{what}: {bfl} is stored with its (shift, scale) halves swapped relative to diffusers; a "
                             "LoKr of it cannot be applied to the diffusers model. It is not a layer our presets adapt.")
        if len(names) == 1:
            out[names[0]] = factors
            continue
        rows = factors.w1.shape[0] if factors.w1 is not None else factors.w1_a.shape[0]
        if rows % 3:
            raise ValueError(f"{what}: {bfl}'s w1 has {rows} rows, not a multiple of 3, so its Kronecker product does "
                             "not split into diffusers' separate q, k and v layers. Load it in ComfyUI "
                             "(LoraLoaderModelOnly) instead; LoKr files this trainer writes always split.")
        third = rows // 3
        for i, name in enumerate(names):
            part = slice(i * third, (i + 1) * third)
            w1 = {"w1": factors.w1[part]} if factors.w1 is not None else {"w1_a": factors.w1_a[part],
                                                                          "w1_b": factors.w1_b}
            out[name] = LokrFactors(**w1, w2=factors.w2, w2_a=factors.w2_a, w2_b=factors.w2_b, scale=factors.scale)
    return out


def lokr_delta(state: dict[str, torch.Tensor], module: str) -> torch.Tensor:
    """kron(w1, w2) * alpha / dim in float32 for one module of a ComfyUI-layout LoKr, as ComfyUI applies it;
    `module` with or without `diffusion_model.`."""
    return _module(state, module).delta()


def lokr_delta_rows(state: dict[str, torch.Tensor], module: str, start: int, stop: int) -> torch.Tensor:
    """Rows [start, stop) of lokr_delta(state, module)."""
    return _module(state, module).delta_rows(start, stop)


def _module(state: dict[str, torch.Tensor], module: str) -> LokrFactors:
    name = module.removeprefix(COMFY_PREFIX)
    own = {k: v for k, v in state.items() if k.startswith(f"{COMFY_PREFIX}{name}.")}
    if not own:
        raise ValueError(f"LoKr has no module {name!r}.")
    return comfy_lokr_modules(own)[name]


# ---------------------------------------------------------------------------------------------------------------
# Files


def adapter_type_of_file(path: str | os.PathLike) -> str:
    """"lokr" or "lora" from a safetensors file's key names (its header only); "lora" for anything unreadable, which
    load_lora_file then explains."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            keys = list(handle.keys())
    except (SafetensorError, OSError, ValueError):
        return "lora"
    return "lokr" if is_lokr_state(dict.fromkeys(keys)) else "lora"


def load_adapter_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str], str, str]:
    """(state, safetensors metadata, layout, adapter type) of a FLUX.2 LoRA or LoKr file; every key checked."""
    if adapter_type_of_file(path) == "lora":
        return (*load_lora_file(path), "lora")
    from safetensors.torch import load_file, safe_open

    path = Path(path)
    with safe_open(str(path), framework="pt", device="cpu") as handle:
        metadata = dict(handle.metadata() or {})
    state = load_file(str(path), device="cpu")
    comfy_lokr_modules(state, what=f"LoKr file {path.name!r}")
    return state, metadata, "comfyui", "lokr"


def save_trained_lokr(path: str | os.PathLike, *, state: dict[str, torch.Tensor], scales: dict[str, float],
                      metadata: dict[str, str]) -> Path:
    """Write a trained LoKr (PEFT names, lokr.lokr_scales) in ComfyUI's layout, atomically, with `metadata`
    (lora_keys.lora_metadata's strings; adapter_type "lokr" is added)."""
    comfy = trained_lokr_to_comfy(state, scales=scales)
    comfy_lokr_modules(comfy, what="trained LoKr")
    return save_lora_file(path, state=comfy, metadata=metadata | {"adapter_type": json.dumps("lokr")}, layout="comfyui",
                          check_keys=False)


def describe_adapter_file(path: str | os.PathLike) -> dict:
    """`inspect-lora`'s summary of a LoRA or LoKr file: adapter type, layout, modules, metadata."""
    if adapter_type_of_file(path) == "lora":
        return {"adapter_type": "lora", **describe_lora_file(path)}
    state, metadata, layout, _ = load_adapter_file(path)
    modules = {}
    for name, factors in comfy_lokr_modules(state).items():
        rows1, cols1 = _dims(factors.w1, factors.w1_a, factors.w1_b)
        rows2, cols2 = _dims(factors.w2, factors.w2_a, factors.w2_b)
        modules[name] = {"w1": [rows1, cols1], "w2": [rows2, cols2], "scale": factors.scale,
                         "w1_rank": None if factors.w1 is not None else int(factors.w1_b.shape[0]),
                         "w2_rank": None if factors.w2 is not None else int(factors.w2_b.shape[0])}
    decoded = {}
    for key, value in metadata.items():
        try:
            decoded[key] = json.loads(value)
        except json.JSONDecodeError:
            decoded[key] = value
    return {"adapter_type": "lokr", "path": str(path), "layout": layout, "num_modules": len(modules),
            "modules": modules, "metadata": decoded}
