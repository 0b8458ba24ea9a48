"""LoRA files for FLUX.2: key names, exact q/k/v fusion, and safe reading and writing.

Two layouts, both safetensors with `.lora_A.weight` / `.lora_B.weight` per adapted Linear:

- "comfyui": ComfyUI/BFL module names under `diffusion_model.` plus a scalar `.alpha` per module
  (e.g. `diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight`). Stock ComfyUI maps every
  `diffusion_model.<module>` of the model's own state dict, and scales by alpha / rows(A); a module
  without `.alpha` gets scale 1.
- "diffusers": diffusers module names under `transformer.`, with the PEFT adapter config (r,
  lora_alpha, rank_pattern, alpha_pattern, target_modules) JSON-encoded under the safetensors
  metadata key `lora_adapter_metadata`, prefixed `transformer.` as diffusers' own savers write it.
  Without that entry diffusers silently uses scale 1.

Name map (H = hidden size; N = block index):
    transformer_blocks.N.attn.to_q/to_k/to_v          -> double_blocks.N.img_attn.qkv rows [0:H]/[H:2H]/[2H:3H]
    transformer_blocks.N.attn.add_q/k/v_proj          -> double_blocks.N.txt_attn.qkv, same row slices
    transformer_blocks.N.attn.to_out.0 / to_add_out   -> double_blocks.N.img_attn.proj / txt_attn.proj
    transformer_blocks.N.ff.linear_in / linear_out    -> double_blocks.N.img_mlp.0 / img_mlp.2
    transformer_blocks.N.ff_context.linear_in / _out  -> double_blocks.N.txt_mlp.0 / txt_mlp.2
    single_transformer_blocks.N.attn.to_qkv_mlp_proj  -> single_blocks.N.linear1
    single_transformer_blocks.N.attn.to_out           -> single_blocks.N.linear2
    x_embedder / context_embedder / proj_out          -> img_in / txt_in / final_layer.linear
    time_guidance_embed.{timestep,guidance}_embedder.linear_1/2 -> {time,guidance}_in.in_layer/out_layer
    double_stream_modulation_img/txt.linear, single_stream_modulation.linear -> the same names with .lin
    norm_out.linear (scale, shift)                     -> final_layer.adaLN_modulation.1 (shift, scale)

q/k/v fusion is exact. Separate adapters (A_i: r_i x in, B_i: H x r_i, scale s) become one adapter on
the fused qkv layer with A = concat(A_q, A_k, A_v) (sum r_i rows) and B = block-diagonal(B_q, B_k, B_v),
so B @ A stacks B_i @ A_i row-wise; the saved alpha is s * sum(r_i) (3 * alpha for equal ranks) so that
alpha / rank keeps the scale. When all three A are identical (a file split by `comfy_to_diffusers`), B is
stacked instead and the rank stays. The reverse split is exact too: if B is block-diagonal in equal
thirds each of q/k/v gets its own rank-R/3 block and alpha / 3; otherwise each gets the whole fused A
(R rows) and its row slice of B (H x R) with the fused alpha, i.e. a rank-R adapter per projection whose
delta is exactly that slice of the fused delta.

Pure dict/tensor code: no model is needed. Only safetensors is ever read; nothing is unpickled.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

COMFY_PREFIX = "diffusion_model."
DIFFUSERS_PREFIX = "transformer."
LAYOUTS = ("comfyui", "diffusers")
LORA_ADAPTER_METADATA_KEY = "lora_adapter_metadata"
"""Safetensors metadata key diffusers reads the PEFT config from (diffusers.loaders.lora_base)."""

_A = ".lora_A.weight"
_B = ".lora_B.weight"
_ALPHA = ".alpha"

# Inside a double block: diffusers suffix -> (BFL suffix, q/k/v slot or None).
_DOUBLE_MAP: dict[str, tuple[str, int | None]] = {
    "attn.to_q": ("img_attn.qkv", 0),
    "attn.to_k": ("img_attn.qkv", 1),
    "attn.to_v": ("img_attn.qkv", 2),
    "attn.add_q_proj": ("txt_attn.qkv", 0),
    "attn.add_k_proj": ("txt_attn.qkv", 1),
    "attn.add_v_proj": ("txt_attn.qkv", 2),
    "attn.to_out.0": ("img_attn.proj", None),
    "attn.to_add_out": ("txt_attn.proj", None),
    "ff.linear_in": ("img_mlp.0", None),
    "ff.linear_out": ("img_mlp.2", None),
    "ff_context.linear_in": ("txt_mlp.0", None),
    "ff_context.linear_out": ("txt_mlp.2", None),
}
_SINGLE_MAP: dict[str, str] = {
    "attn.to_qkv_mlp_proj": "linear1",
    "attn.to_out": "linear2",
}
_GLOBAL_MAP: dict[str, str] = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "proj_out": "final_layer.linear",
    "time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_guidance_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_guidance_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_guidance_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "double_stream_modulation_img.linear": "double_stream_modulation_img.lin",
    "double_stream_modulation_txt.linear": "double_stream_modulation_txt.lin",
    "single_stream_modulation.linear": "single_stream_modulation.lin",
    "norm_out.linear": "final_layer.adaLN_modulation.1",
}
# diffusers' AdaLayerNormContinuous emits (scale, shift); BFL's final layer emits (shift, scale).
_SWAPPED_HALVES = {"norm_out.linear"}

_DOUBLE_RE = re.compile(r"transformer_blocks\.(\d+)\.(.+)")
_SINGLE_RE = re.compile(r"single_transformer_blocks\.(\d+)\.(.+)")
_BFL_DOUBLE_RE = re.compile(r"double_blocks\.(\d+)\.(.+)")
_BFL_SINGLE_RE = re.compile(r"single_blocks\.(\d+)\.(.+)")
_DOUBLE_REVERSE: dict[str, list[str]] = {}
for _d, (_b, _slot) in _DOUBLE_MAP.items():
    _DOUBLE_REVERSE.setdefault(_b, []).append(_d)  # insertion order keeps q, k, v
_SINGLE_REVERSE = {b: d for d, b in _SINGLE_MAP.items()}
_GLOBAL_REVERSE = {b: d for d, b in _GLOBAL_MAP.items()}


def diffusers_module_to_bfl(name: str) -> tuple[str, int | None]:
    """BFL module name and q/k/v slot (None unless fused) for a diffusers FLUX.2 module name (no prefix)."""
    m = _SINGLE_RE.fullmatch(name)
    if m and m.group(2) in _SINGLE_MAP:
        return f"single_blocks.{m.group(1)}.{_SINGLE_MAP[m.group(2)]}", None
    m = _DOUBLE_RE.fullmatch(name)
    if m and not name.startswith("single_") and m.group(2) in _DOUBLE_MAP:
        bfl, slot = _DOUBLE_MAP[m.group(2)]
        return f"double_blocks.{m.group(1)}.{bfl}", slot
    if name in _GLOBAL_MAP:
        return _GLOBAL_MAP[name], None
    raise KeyError(name)


def bfl_module_to_diffusers(name: str) -> list[str]:
    """Diffusers module names for a BFL FLUX.2 module name (no prefix): three for a fused qkv, else one."""
    m = _BFL_SINGLE_RE.fullmatch(name)
    if m and m.group(2) in _SINGLE_REVERSE:
        return [f"single_transformer_blocks.{m.group(1)}.{_SINGLE_REVERSE[m.group(2)]}"]
    m = _BFL_DOUBLE_RE.fullmatch(name)
    if m and m.group(2) in _DOUBLE_REVERSE:
        return [f"transformer_blocks.{m.group(1)}.{d}" for d in _DOUBLE_REVERSE[m.group(2)]]
    if name in _GLOBAL_REVERSE:
        return [_GLOBAL_REVERSE[name]]
    raise KeyError(name)


# ---------------------------------------------------------------------------------------------
# Parsing state dicts into modules


def _strip_prefix(state: dict[str, torch.Tensor], prefix: str, *, required: bool, what: str) -> dict:
    """Keys without `prefix`; all keys must carry it (required) or all or none may (optional)."""
    with_prefix = [k for k in state if k.startswith(prefix)]
    if required or with_prefix:
        for k in state:
            if not k.startswith(prefix):
                raise ValueError(
                    f"{what}: key {k!r} does not start with {prefix!r}; every key of a FLUX.2 LoRA in this layout "
                    f"must. Is this a LoRA for another model or in another layout?"
                )
        return {k[len(prefix) :]: v for k, v in state.items()}
    return dict(state)


def _split_key(key: str, *, allow_alpha: bool) -> tuple[str, str] | None:
    for suffix, part in ((_A, "A"), (_B, "B")):
        if key.endswith(suffix):
            return key[: -len(suffix)], part
    if allow_alpha and key.endswith(_ALPHA):
        return key[: -len(_ALPHA)], "alpha"
    return None


def _group_modules(state: dict, *, layout: str, what: str, shown_prefix: str) -> dict[str, dict]:
    """{module: {"A": t, "B": t, ["alpha": t]}} with names checked against the FLUX.2 map and shapes checked."""
    known = bfl_module_to_diffusers if layout == "comfyui" else diffusers_module_to_bfl
    modules: dict[str, dict] = {}
    for key, value in state.items():
        split = _split_key(key, allow_alpha=layout == "comfyui")
        if split is None:
            allowed = "'.lora_A.weight', '.lora_B.weight'" + (", '.alpha'" if layout == "comfyui" else "")
            raise ValueError(
                f"{what}: key {shown_prefix + key!r} is not a FLUX.2 LoRA key of the {layout} layout "
                f"(suffixes allowed: {allowed}). Only plain LoRA here (no DoRA, biases); LoKr files (lokr_w1, "
                "lokr_w2) are read by trainer/lokr_keys.py and not converted."
            )
        module, part = split
        try:
            known(module)
        except KeyError:
            raise ValueError(
                f"{what}: key {shown_prefix + key!r} names no FLUX.2 module in the {layout} layout "
                f"(module {module!r}). Is this a LoRA for another model (SDXL, FLUX.1, ...)?"
            ) from None
        modules.setdefault(module, {})[part] = value
    for module, parts in modules.items():
        for part in ("A", "B"):
            if part not in parts:
                suffix = _A if part == "A" else _B
                raise ValueError(
                    f"{what}: {shown_prefix + module + suffix!r} is missing; every module needs lora_A and lora_B."
                )
        a, b = parts["A"], parts["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(
                f"{what}: module {shown_prefix + module!r} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}; "
                f"lora_A must be (rank, in) and lora_B (out, rank) with the same rank."
            )
        if "alpha" in parts and parts["alpha"].numel() != 1:
            raise ValueError(
                f"{what}: {shown_prefix + module + _ALPHA!r} must be a scalar, got shape {tuple(parts['alpha'].shape)}."
            )
    return modules


def _pattern_value(patterns: dict | None, name: str, default):
    """PEFT's rule for rank_pattern / alpha_pattern: the first key matching the end of the module name."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


# ---------------------------------------------------------------------------------------------
# Conversion


def _fuse_qkv(parts: dict[int, tuple], *, hidden_size: int, module: str) -> tuple:
    """One exact (A, B, alpha) for a fused qkv from {slot: (A, B, scale)}; missing slots add zero blocks."""
    import torch

    present = [parts[i] for i in sorted(parts)]
    in_features = present[0][0].shape[1]
    for a, b, _ in present:
        if b.shape[0] != hidden_size or a.shape[1] != in_features:
            raise ValueError(
                f"q/k/v adapters of {module!r} do not fit hidden_size={hidden_size}: lora_B has {b.shape[0]} rows and "
                f"lora_A {a.shape[1]} columns (expected {hidden_size} rows and equal columns). Pass the model's hidden size."
            )
    scale = present[0][2]
    dtype = present[0][0].dtype
    if (
        len(parts) == 3
        and all(s == scale for _, _, s in present)
        and all(torch.equal(present[0][0], a) for a, _, _ in present[1:])
    ):
        # Shared A (a file we split before): stacking B is exact and keeps the rank, so round trips are bitwise.
        a = present[0][0]
        return a, torch.cat([b for _, b, _ in present], dim=0), scale * a.shape[0]
    rank_ref = present[0][0].shape[0]
    blocks = []
    for slot in range(3):
        if slot in parts:
            a, b, s = parts[slot]
            if s != scale:
                # Fold the ratio into B so that one alpha serves all three (exact up to rounding).
                b = b * (s / scale)
        else:
            a = torch.zeros(rank_ref, in_features, dtype=dtype, device=present[0][0].device)
            b = torch.zeros(hidden_size, rank_ref, dtype=present[0][1].dtype, device=present[0][1].device)
        blocks.append((a, b))
    a_fused = torch.cat([a for a, _ in blocks], dim=0)
    b_fused = torch.block_diag(*[b for _, b in blocks])
    return a_fused, b_fused, scale * a_fused.shape[0]


def diffusers_to_comfy(
    state: dict[str, torch.Tensor],
    *,
    alpha: float,
    rank: int,
    hidden_size: int,
    alpha_pattern: dict[str, float] | None = None,
    rank_pattern: dict[str, int] | None = None,
) -> dict[str, torch.Tensor]:
    """ComfyUI/BFL-layout LoRA from a diffusers/PEFT-named one (keys with or without `transformer.`).

    alpha and rank are the PEFT config's lora_alpha and r; alpha_pattern / rank_pattern (PEFT's
    regex-keyed overrides) give other values for some modules. q/k/v are fused exactly (module doc).
    """
    import torch

    if rank < 1 or alpha <= 0 or hidden_size < 1:
        raise ValueError(
            f"rank, alpha and hidden_size must be positive, got rank={rank}, alpha={alpha}, hidden_size={hidden_size}."
        )
    plain = _strip_prefix(state, DIFFUSERS_PREFIX, required=False, what="diffusers LoRA")
    modules = _group_modules(plain, layout="diffusers", what="diffusers LoRA", shown_prefix="")
    out_modules: dict[str, tuple] = {}
    qkv: dict[str, dict[int, tuple]] = {}
    for name, parts in modules.items():
        a, b = parts["A"], parts["B"]
        r = _pattern_value(rank_pattern, name, rank)
        al = float(_pattern_value(alpha_pattern, name, alpha))
        if a.shape[0] != r:
            raise ValueError(
                f"diffusers LoRA: module {name!r} has rank {a.shape[0]} but the adapter config says {r}; "
                f"pass the rank the adapter was trained with (or a rank_pattern entry)."
            )
        bfl, slot = diffusers_module_to_bfl(name)
        if slot is not None:
            qkv.setdefault(bfl, {})[slot] = (a, b, al / r)
            continue
        if name in _SWAPPED_HALVES:
            b = torch.cat(b.chunk(2, dim=0)[::-1], dim=0)
        out_modules[bfl] = (a, b, al)
    for bfl, parts in qkv.items():
        out_modules[bfl] = _fuse_qkv(parts, hidden_size=hidden_size, module=bfl)
    out: dict[str, torch.Tensor] = {}
    for bfl in sorted(out_modules):
        a, b, al = out_modules[bfl]
        out[f"{COMFY_PREFIX}{bfl}{_A}"] = a.contiguous()
        out[f"{COMFY_PREFIX}{bfl}{_B}"] = b.contiguous()
        out[f"{COMFY_PREFIX}{bfl}{_ALPHA}"] = torch.tensor(float(al), dtype=torch.float32)
    return out


def _split_qkv(a, b, alpha: float) -> list[tuple]:
    """Three exact (A, B, alpha) from a fused qkv adapter (see the module doc)."""
    rows = b.shape[0] // 3
    rank = a.shape[0]
    b_rows = [b[i * rows : (i + 1) * rows] for i in range(3)]
    if rank % 3 == 0:
        k = rank // 3
        off_diagonal_zero = all(
            not bool(b_rows[i][:, j * k : (j + 1) * k].any()) for i in range(3) for j in range(3) if i != j
        )
        if off_diagonal_zero:
            return [(a[i * k : (i + 1) * k], b_rows[i][:, i * k : (i + 1) * k], alpha / 3) for i in range(3)]
    return [(a.clone(), b_rows[i], alpha) for i in range(3)]  # own copies: safetensors refuses shared storage


def peft_adapter_config(ranks: dict[str, int], alphas: dict[str, float]) -> dict:
    """PEFT LoraConfig kwargs (r, lora_alpha, rank_pattern, alpha_pattern, target_modules) for exact module names."""
    if set(ranks) != set(alphas) or not ranks:
        raise ValueError("peft_adapter_config needs the same non-empty module names in ranks and alphas.")
    r = Counter(ranks.values()).most_common(1)[0][0]
    lora_alpha = Counter(alphas.values()).most_common(1)[0][0]
    # Anchored, escaped patterns: peft matches r"(.*\.)?(key)$" against each module name.
    rank_pattern = {f"^{re.escape(n)}": v for n, v in sorted(ranks.items()) if v != r}
    alpha_pattern = {f"^{re.escape(n)}": v for n, v in sorted(alphas.items()) if v != lora_alpha}
    return {
        "r": int(r),
        "lora_alpha": float(lora_alpha),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "target_modules": sorted(ranks),
    }


def comfy_to_diffusers(
    state: dict[str, torch.Tensor], *, hidden_size: int | None = None
) -> tuple[dict[str, torch.Tensor], dict]:
    """Diffusers-layout LoRA (`transformer.` keys) and its PEFT adapter config from a ComfyUI/BFL one.

    Fused qkv adapters are split exactly (module doc); if they are not block-diagonal, q/k/v each get
    rank R (the fused rank) in the result, recorded in rank_pattern. A module without `.alpha` gets
    alpha = rank, which is how ComfyUI applies it (scale 1). The config is what
    `save_lora_file(..., layout="diffusers", adapter_config=...)` writes for diffusers' loader.
    """
    import torch

    plain = _strip_prefix(state, COMFY_PREFIX, required=True, what="ComfyUI LoRA")
    modules = _group_modules(plain, layout="comfyui", what="ComfyUI LoRA", shown_prefix=COMFY_PREFIX)
    out: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    for bfl in sorted(modules):
        parts = modules[bfl]
        a, b = parts["A"], parts["B"]
        alpha = float(parts["alpha"].item()) if "alpha" in parts else float(a.shape[0])
        names = bfl_module_to_diffusers(bfl)
        if len(names) == 3:
            if b.shape[0] % 3 or (hidden_size is not None and b.shape[0] != 3 * hidden_size):
                expected = "3 * hidden_size" if hidden_size is None else str(3 * hidden_size)
                raise ValueError(
                    f"ComfyUI LoRA: fused {COMFY_PREFIX + bfl!r} has lora_B with {b.shape[0]} rows; expected {expected}."
                )
            pieces = _split_qkv(a, b, alpha)
        else:
            if bfl == _GLOBAL_MAP["norm_out.linear"]:
                b = torch.cat(b.chunk(2, dim=0)[::-1], dim=0)
            pieces = [(a, b, alpha)]
        for name, (pa, pb, palpha) in zip(names, pieces):
            out[f"{DIFFUSERS_PREFIX}{name}{_A}"] = pa.contiguous()
            out[f"{DIFFUSERS_PREFIX}{name}{_B}"] = pb.contiguous()
            ranks[name] = int(pa.shape[0])
            alphas[name] = float(palpha)
    return out, peft_adapter_config(ranks, alphas)


# ---------------------------------------------------------------------------------------------
# Deltas


def lora_delta(state_comfy: dict[str, torch.Tensor], module: str) -> torch.Tensor:
    """(alpha / rank) * B @ A in float32 for one module of a ComfyUI-layout LoRA, as ComfyUI applies it.

    `module` is a BFL name with or without `diffusion_model.` (e.g. "double_blocks.0.img_attn.qkv").
    """
    name = module if module.startswith(COMFY_PREFIX) else COMFY_PREFIX + module
    try:
        a, b = state_comfy[name + _A], state_comfy[name + _B]
    except KeyError:
        raise ValueError(f"LoRA has no module {name!r}.") from None
    rank = a.shape[0]
    alpha = float(state_comfy[name + _ALPHA].item()) if name + _ALPHA in state_comfy else float(rank)
    return (b.float() @ a.float()) * (alpha / rank)


def diffusers_lora_delta(state: dict[str, torch.Tensor], module: str, *, adapter_config: dict) -> torch.Tensor:
    """(alpha / r) * B @ A in float32 for one module of a diffusers-layout LoRA, as PEFT applies it."""
    name = module.removeprefix(DIFFUSERS_PREFIX)
    key = DIFFUSERS_PREFIX + name if DIFFUSERS_PREFIX + name + _A in state else name
    try:
        a, b = state[key + _A], state[key + _B]
    except KeyError:
        raise ValueError(f"LoRA has no module {name!r}.") from None
    r = _pattern_value(adapter_config.get("rank_pattern"), name, adapter_config["r"])
    alpha = _pattern_value(adapter_config.get("alpha_pattern"), name, adapter_config["lora_alpha"])
    return (b.float() @ a.float()) * (float(alpha) / r)


def apply_lora_to_comfy_state(
    weights: dict[str, torch.Tensor], lora: dict[str, torch.Tensor], *, strength: float
) -> dict[str, torch.Tensor]:
    """A new BFL-named weight dict with W + strength * delta for every module of a ComfyUI-layout LoRA.

    `weights` may use `diffusion_model.` keys (a ComfyUI model state dict) or bare BFL keys (a checkpoint).
    The input dicts are not changed.
    """
    plain = _strip_prefix(lora, COMFY_PREFIX, required=True, what="ComfyUI LoRA")
    modules = _group_modules(plain, layout="comfyui", what="ComfyUI LoRA", shown_prefix=COMFY_PREFIX)
    out = dict(weights)
    for bfl in sorted(modules):
        key = next((k for k in (f"{COMFY_PREFIX}{bfl}.weight", f"{bfl}.weight") if k in weights), None)
        if key is None:
            raise ValueError(
                f"LoRA module {bfl!r} has no weight '{bfl}.weight' in the model weights; is it a FLUX.2 model?"
            )
        w = weights[key]
        delta = lora_delta(lora, bfl)
        if delta.shape != w.shape:
            raise ValueError(
                f"LoRA module {bfl!r} gives a delta of shape {tuple(delta.shape)} for a weight of {tuple(w.shape)}."
            )
        out[key] = (w.float() + strength * delta).to(w.dtype)
    return out


# ---------------------------------------------------------------------------------------------
# Files


def lora_metadata(
    *,
    rank: int,
    alpha: float,
    targets: str,
    base_model: str,
    steps: int,
    dataset_fingerprint: str,
    trainer_version: str | None = None,
    extra: dict | None = None,
) -> dict[str, str]:
    """The safetensors header we write: each value JSON-encoded. Pass names, not absolute paths."""
    from . import __version__

    meta = {
        "rank": rank,
        "alpha": alpha,
        "targets": targets,
        "base_model": base_model,
        "steps": steps,
        "dataset_fingerprint": dataset_fingerprint,
        "trainer_version": trainer_version or __version__,
    }
    for key, value in (extra or {}).items():
        if key in meta or key in (LORA_ADAPTER_METADATA_KEY, "format"):
            raise ValueError(f"lora metadata extra key {key!r} clashes with a reserved key; rename it.")
        meta[key] = value
    return {k: json.dumps(v) for k, v in meta.items()}


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}.")


def _adapter_config_from_metadata(metadata: dict[str, str], ranks: dict[str, int]) -> dict:
    try:
        rank = int(json.loads(metadata["rank"]))
        alpha = float(json.loads(metadata["alpha"]))
    except (KeyError, ValueError, TypeError) as exc:
        raise ValueError(
            "save_lora_file(layout='diffusers') needs adapter_config, or JSON 'rank' and 'alpha' in metadata "
            f"(as lora_metadata writes them): {exc!r}"
        ) from None
    odd = {n: r for n, r in ranks.items() if r != rank}
    if odd:
        name, r = next(iter(sorted(odd.items())))
        raise ValueError(
            f"save_lora_file: module {name!r} has rank {r} but metadata rank is {rank}; pass adapter_config "
            "(from comfy_to_diffusers or peft_adapter_config) for mixed ranks."
        )
    return peft_adapter_config(ranks, {n: alpha for n in ranks})


def save_lora_file(
    path: str | os.PathLike,
    *,
    state: dict[str, torch.Tensor],
    metadata: dict[str, str],
    layout: Literal["comfyui", "diffusers"],
    adapter_config: dict | None = None,
    check_keys: bool = True,
) -> Path:
    """Write a LoRA .safetensors atomically (temp file in the same folder, fsync, rename).

    check_keys=False: the caller has checked the comfyui-layout keys (LoKr files: trainer/lokr_keys.py).

    comfyui: `state` must be in that layout (`diffusers_to_comfy` makes it). diffusers: keys with or
    without `transformer.` (the file always has it); the PEFT config comes from `adapter_config`, else
    from a `lora_adapter_metadata` entry already in `metadata`, else from metadata 'rank'/'alpha'
    (uniform ranks only); it is written the way diffusers' savers write it, so alpha != rank loads right.
    Metadata values must be strings (use `lora_metadata`).
    """
    import torch
    from safetensors.torch import save_file

    _check_layout(layout)
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"LoRA path {str(path)!r} must end in .safetensors.")
    bad = {k: type(v).__name__ for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)}
    if bad:
        raise ValueError(f"LoRA metadata values must be strings (JSON-encode them), got {bad}.")
    meta = dict(metadata)
    meta.setdefault("format", "pt")
    if layout == "comfyui":
        if LORA_ADAPTER_METADATA_KEY in meta:
            raise ValueError(
                f"metadata key {LORA_ADAPTER_METADATA_KEY!r} belongs to the diffusers layout; drop it for comfyui."
            )
        if adapter_config is not None:
            raise ValueError("adapter_config is only used with layout='diffusers'; comfyui files carry '.alpha' keys.")
        plain = _strip_prefix(state, COMFY_PREFIX, required=True, what="ComfyUI LoRA")
        if check_keys:
            _group_modules(plain, layout="comfyui", what="ComfyUI LoRA", shown_prefix=COMFY_PREFIX)
        tensors = dict(state)
    else:
        plain = _strip_prefix(state, DIFFUSERS_PREFIX, required=False, what="diffusers LoRA")
        modules = _group_modules(plain, layout="diffusers", what="diffusers LoRA", shown_prefix=DIFFUSERS_PREFIX)
        if adapter_config is not None and LORA_ADAPTER_METADATA_KEY in meta:
            raise ValueError(f"pass either adapter_config or metadata[{LORA_ADAPTER_METADATA_KEY!r}], not both.")
        if adapter_config is None and LORA_ADAPTER_METADATA_KEY in meta:
            adapter_config = _unpack_adapter_metadata(meta[LORA_ADAPTER_METADATA_KEY])
        if adapter_config is None:
            adapter_config = _adapter_config_from_metadata(meta, {n: int(p["A"].shape[0]) for n, p in modules.items()})
        missing = sorted(set(modules) - set(adapter_config.get("target_modules", ())))
        if missing:
            raise ValueError(f"adapter_config target_modules lacks {missing[0]!r}, which the state adapts.")
        packed = {f"{DIFFUSERS_PREFIX}{k}": v for k, v in adapter_config.items()}
        meta[LORA_ADAPTER_METADATA_KEY] = json.dumps(packed, indent=2, sort_keys=True)
        tensors = {DIFFUSERS_PREFIX + k: v for k, v in plain.items()}
    if any(not isinstance(v, torch.Tensor) for v in tensors.values()):
        raise ValueError("LoRA state values must be tensors.")
    seen: set[int] = set()
    cpu = {}
    for key, value in tensors.items():
        value = value.detach().to("cpu").contiguous()
        if value.untyped_storage().data_ptr() in seen:
            value = value.clone()  # safetensors refuses tensors that share storage
        seen.add(value.untyped_storage().data_ptr())
        cpu[key] = value
    tensors = cpu

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return path
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    except OSError:
        pass
    finally:
        os.close(dir_fd)
    return path


def _unpack_adapter_metadata(raw: str) -> dict:
    try:
        packed = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"metadata {LORA_ADAPTER_METADATA_KEY!r} is not JSON: {exc}") from None
    config = {k[len(DIFFUSERS_PREFIX) :]: v for k, v in packed.items() if k.startswith(DIFFUSERS_PREFIX)}
    if "r" not in config or "lora_alpha" not in config:
        raise ValueError(
            f"metadata {LORA_ADAPTER_METADATA_KEY!r} has no '{DIFFUSERS_PREFIX}r' / '{DIFFUSERS_PREFIX}lora_alpha' entries."
        )
    return config


def detect_layout(state: dict[str, torch.Tensor]) -> str:
    """'comfyui' or 'diffusers' from the key prefix of the first key; the parsers then check every key."""
    if not state:
        raise ValueError("LoRA has no tensors.")
    first = next(iter(sorted(state)))
    if first.startswith(COMFY_PREFIX):
        return "comfyui"
    if first.startswith(DIFFUSERS_PREFIX):
        return "diffusers"
    raise ValueError(
        f"key {first!r} is not a FLUX.2 LoRA key: expected 'diffusion_model.<BFL module>.lora_A.weight' (ComfyUI) or "
        "'transformer.<diffusers module>.lora_A.weight' (diffusers). Is this a LoRA for another model (SDXL, FLUX.1)?"
    )


def _check_state(state: dict[str, torch.Tensor], layout: str, *, what: str) -> None:
    prefix = COMFY_PREFIX if layout == "comfyui" else DIFFUSERS_PREFIX
    plain = _strip_prefix(state, prefix, required=True, what=what)
    _group_modules(plain, layout=layout, what=what, shown_prefix=prefix)


def load_lora_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str], str]:
    """(state as stored, safetensors metadata, layout) of a FLUX.2 LoRA file; every key and shape checked."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise ValueError(
            f"LoRA file {str(path)!r}: only .safetensors LoRA files are loaded (pickle formats such as .ckpt, .pt, .bin "
            "are never unpickled); convert it to safetensors first."
        )
    if not path.is_file():
        raise ValueError(f"LoRA file {str(path)!r} does not exist; check the path.")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
        state = load_file(str(path), device="cpu")
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"LoRA file {str(path)!r} is not a readable safetensors file: {exc}") from None
    layout = detect_layout(state)
    _check_state(state, layout, what=f"LoRA file {path.name!r}")
    return state, metadata, layout


def adapter_config_of_file(state: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict:
    """PEFT config of a diffusers-layout file: its lora_adapter_metadata, or diffusers' rule without it (scale 1)."""
    if LORA_ADAPTER_METADATA_KEY in metadata:
        return _unpack_adapter_metadata(metadata[LORA_ADAPTER_METADATA_KEY])
    # diffusers' loader then sets alpha = rank for every module; reproduce that, not our 'alpha' key.
    log.warning(
        "diffusers LoRA has no %r metadata: using alpha = rank (scale 1), as diffusers does", LORA_ADAPTER_METADATA_KEY
    )
    plain = _strip_prefix(state, DIFFUSERS_PREFIX, required=True, what="diffusers LoRA")
    ranks = {k[: -len(_A)]: int(v.shape[0]) for k, v in plain.items() if k.endswith(_A)}
    return peft_adapter_config(ranks, {n: float(r) for n, r in ranks.items()})


def _hidden_size_of(state_plain_diffusers: dict[str, torch.Tensor]) -> int | None:
    """The hidden size from any q/k/v projection's lora_B rows; None when no q/k/v is adapted (then unused)."""
    for key in state_plain_diffusers:
        if key.endswith(_B) and diffusers_module_to_bfl(key[: -len(_B)])[1] is not None:
            return int(state_plain_diffusers[key].shape[0])
    return None


def save_trained_lora(
    path: str | os.PathLike,
    *,
    state: dict[str, torch.Tensor],
    rank: int,
    alpha: float,
    hidden_size: int,
    layout: Literal["comfyui", "diffusers"],
    metadata: dict[str, str],
) -> Path:
    """Write a freshly trained adapter (diffusers/PEFT names, as `lora_state_dict` gives) in either layout.

    `metadata` should come from `lora_metadata`; its 'rank' and 'alpha', when present, must match.
    """
    _check_layout(layout)
    for key, value in (("rank", rank), ("alpha", alpha)):
        if key in metadata and json.loads(metadata[key]) != value:
            raise ValueError(f"metadata {key}={metadata[key]} does not match the adapter's {key}={value}.")
    plain = _strip_prefix(state, DIFFUSERS_PREFIX, required=False, what="trained LoRA")
    if layout == "comfyui":
        comfy = diffusers_to_comfy(plain, alpha=alpha, rank=rank, hidden_size=hidden_size)
        return save_lora_file(path, state=comfy, metadata=metadata, layout="comfyui")
    ranks = {k[: -len(_A)]: int(v.shape[0]) for k, v in plain.items() if k.endswith(_A)}
    config = peft_adapter_config(ranks, {n: float(alpha) for n in ranks})
    return save_lora_file(path, state=plain, metadata=metadata, layout="diffusers", adapter_config=config)


def load_lora_for_diffusers(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """(state with `transformer.` keys, PEFT adapter config) of a LoRA file in either layout.

    Load it into a Flux2Transformer2DModel with
    `transformer.load_lora_adapter(state, adapter_name=..., metadata={"transformer." + k: v for k, v in config.items()})`.
    """
    state, metadata, layout = load_lora_file(path)
    if layout == "comfyui":
        return comfy_to_diffusers(state)
    return state, adapter_config_of_file(state, metadata)


def convert_lora_file(src: str | os.PathLike, dst: str | os.PathLike, *, to: Literal["comfyui", "diffusers"]) -> Path:
    """Convert a FLUX.2 LoRA file between the ComfyUI and diffusers layouts; never overwrites `dst`."""
    _check_layout(to)
    dst = Path(dst)
    if dst.exists():
        raise ValueError(f"convert-lora: {str(dst)!r} exists; choose another output path or remove it first.")
    state, metadata, layout = load_lora_file(src)
    if layout == to:
        raise ValueError(f"convert-lora: {str(src)!r} is already in the {to} layout.")
    meta = {k: v for k, v in metadata.items() if k != LORA_ADAPTER_METADATA_KEY}
    if to == "diffusers":
        new_state, config = comfy_to_diffusers(state)
        return save_lora_file(dst, state=new_state, metadata=meta, layout="diffusers", adapter_config=config)
    config = adapter_config_of_file(state, metadata)
    plain = _strip_prefix(state, DIFFUSERS_PREFIX, required=True, what="diffusers LoRA")
    new_state = diffusers_to_comfy(
        plain,
        alpha=config["lora_alpha"],
        rank=config["r"],
        hidden_size=_hidden_size_of(plain) or 1,  # only fusion reads it, and fusion needs a q/k/v module
        alpha_pattern=config.get("alpha_pattern"),
        rank_pattern=config.get("rank_pattern"),
    )
    return save_lora_file(dst, state=new_state, metadata=meta, layout="comfyui")


def describe_lora_file(path: str | os.PathLike) -> dict:
    """A JSON-ready summary for `inspect-lora`: layout, modules with rank and scale, metadata."""
    state, metadata, layout = load_lora_file(path)
    modules: dict[str, dict] = {}
    if layout == "comfyui":
        plain = _strip_prefix(state, COMFY_PREFIX, required=True, what="ComfyUI LoRA")
        for name, parts in sorted(_group_modules(plain, layout=layout, what="", shown_prefix=COMFY_PREFIX).items()):
            rank = int(parts["A"].shape[0])
            alpha = float(parts["alpha"].item()) if "alpha" in parts else float(rank)
            modules[name] = {"rank": rank, "alpha": alpha, "scale": alpha / rank}
    else:
        config = adapter_config_of_file(state, metadata)
        plain = _strip_prefix(state, DIFFUSERS_PREFIX, required=True, what="diffusers LoRA")
        for name in sorted(_group_modules(plain, layout=layout, what="", shown_prefix=DIFFUSERS_PREFIX)):
            rank = int(_pattern_value(config.get("rank_pattern"), name, config["r"]))
            alpha = float(_pattern_value(config.get("alpha_pattern"), name, config["lora_alpha"]))
            modules[name] = {"rank": rank, "alpha": alpha, "scale": alpha / rank}
    decoded = {}
    for key, value in metadata.items():
        try:
            decoded[key] = json.loads(value)
        except json.JSONDecodeError:
            decoded[key] = value
    return {"path": str(path), "layout": layout, "num_modules": len(modules), "modules": modules, "metadata": decoded}
