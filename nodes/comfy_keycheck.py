"""Does ComfyUI's own LoRA loader take every key of a LoRA file? Save LoRA refuses a file that would lose keys; Train
LoRA reports the same line at the end of a run.

Inside ComfyUI the check builds ComfyUI's FLUX.2 model of the file's trained size on the meta device (no memory):
comfy.model_detection picks the model class and its FLUX.2 settings from a FLUX.2 key layout, as it does for a
checkpoint. It then loads the file as LoraLoaderModelOnly does (comfy.utils.load_torch_file and
comfy.sd.load_lora_for_models) and collects what ComfyUI says it did not take: "lora key not loaded: <key>" (a file
key no LoRA format consumed) and "NOT LOADED <weight>" (a patch the model has no weight for). Those records are taken
from this thread only and kept out of ComfyUI's log: the check is not a load.

The trained size: the width from the adapted layers' shapes, the block counts from the highest block index the
file names, and, when the header names a FLUX.2 flavour (model_flavour) of that width, the flavour's real block
counts and guidance embedding (a klein file's guidance_in keys would be dropped: klein has none).

Outside ComfyUI (no `comfy` module: the CLI, the headless runner, the pack's own tests) the check does not run, and
its line says so.
"""

from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("flux2_lora")

HEAD_DIM = 128
"""FLUX.2's attention head size in every flavour: ComfyUI's model needs hidden / heads == sum(axes_dim) == 128."""
DEV_WIDTH = 6144
IN_CHANNELS = 128
DEV_CONTEXT_DIM = 15360
NOT_LOADED_PREFIX = "lora key not loaded: "
NOT_PATCHED_PREFIX = "NOT LOADED "

_PART_SUFFIXES = (".lora_A.weight", ".lora_B.weight", ".lora_down.weight", ".lora_up.weight", ".alpha",
                  ".lokr_w1", ".lokr_w1_a", ".lokr_w1_b", ".lokr_w2", ".lokr_w2_a", ".lokr_w2_b")
# BFL module names whose input (resp. output) size is the model's width.
_IN_IS_WIDTH = re.compile(r"(attn\.qkv|attn\.proj|mlp\.0|linear1|\.lin|final_layer\.linear|adaLN_modulation\.1|"
                          r"out_layer)$")
_OUT_IS_WIDTH = re.compile(r"(img_in|txt_in|mlp\.2|linear2|in_layer|out_layer|attn\.proj)$")
_DOUBLE = re.compile(r"(?:^|\.)double_blocks\.(\d+)\.")
_SINGLE = re.compile(r"(?:^|\.)single_blocks\.(\d+)\.")


@dataclass(frozen=True, kw_only=True, slots=True)
class TrainedSize:
    """The ComfyUI FLUX.2 model a LoRA file is checked against."""

    width: int
    context_dim: int
    in_channels: int
    guidance_embed: bool
    double_blocks: int
    single_blocks: int

    def describe(self) -> str:
        guidance = "" if self.guidance_embed else ", no guidance embedding"
        return (f"FLUX.2 {self.width} wide, {self.double_blocks} double + {self.single_blocks} single blocks"
                f"{guidance}")


@dataclass(frozen=True, kw_only=True, slots=True)
class KeyCheck:
    """What ComfyUI's LoRA loader did with a file's keys; ran is False outside ComfyUI (reason says why)."""

    path: str
    ran: bool
    keys: int = 0
    dropped: tuple[str, ...] = ()
    """File keys ComfyUI's loader consumed for no weight ("lora key not loaded")."""
    unpatched: tuple[str, ...] = ()
    """Model weights ComfyUI mapped a key to but could not patch ("NOT LOADED")."""
    error: str = ""
    """The exception ComfyUI's loader raised on the file (a LoRA loader node would stop with it)."""
    model: str = ""
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.ran and not self.dropped and not self.unpatched and not self.error

    def line(self) -> str:
        if not self.ran:
            return f"ComfyUI key check not run: {self.reason}"
        if self.ok:
            return f"ComfyUI key check: all {self.keys} keys load in ComfyUI ({self.model})."
        if self.error:
            return (f"ComfyUI key check: ComfyUI's LoRA loader fails on this file's {self.keys} keys ({self.model}) "
                    f"with {self.error}; a LoRA loader node would stop there.")
        text = (f"ComfyUI key check: {len(self.dropped)} of {self.keys} keys would be dropped by ComfyUI's LoRA loader "
                f"({self.model}): {', '.join(self.dropped) or '-'}")
        if self.unpatched:
            text += f"; mapped but not patched: {', '.join(self.unpatched)}"
        return text + "."


def _module_of(key: str) -> tuple[str, str]:
    """(BFL module name without 'diffusion_model.', part suffix) of a file key; diffusers names are mapped."""
    from ..trainer.lora_keys import (
        COMFY_PREFIX,
        DIFFUSERS_PREFIX,
        diffusers_module_to_bfl,
    )

    part = next((s for s in _PART_SUFFIXES if key.endswith(s)), "")
    module = key[: len(key) - len(part)]
    if module.startswith(COMFY_PREFIX):
        return module[len(COMFY_PREFIX):], part
    if module.startswith(DIFFUSERS_PREFIX):
        try:
            return diffusers_module_to_bfl(module[len(DIFFUSERS_PREFIX):])[0], part
        except KeyError:
            return module, part
    return module, part


def _module_dims(shapes: dict[str, tuple[int, ...]]) -> dict[str, dict[str, int]]:
    """{BFL module: {"in": n, "out": m}} from the LoRA (lora_A / lora_B) or LoKr (kron(w1, w2)) factor shapes."""
    parts: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, shape in shapes.items():
        module, part = _module_of(key)
        if part:
            parts.setdefault(module, {})[part] = tuple(shape)
    dims: dict[str, dict[str, int]] = {}
    for module, p in parts.items():
        found: dict[str, int] = {}
        for a, b in ((".lora_A.weight", ".lora_B.weight"), (".lora_down.weight", ".lora_up.weight")):
            if len(p.get(a, ())) == 2:
                found["in"] = p[a][1]
            if len(p.get(b, ())) == 2:
                found["out"] = p[b][0]
        w1 = p.get(".lokr_w1") or ((p[".lokr_w1_a"][0], p[".lokr_w1_b"][1])
                                   if ".lokr_w1_a" in p and ".lokr_w1_b" in p else None)
        w2 = p.get(".lokr_w2") or ((p[".lokr_w2_a"][0], p[".lokr_w2_b"][1])
                                   if ".lokr_w2_a" in p and ".lokr_w2_b" in p else None)
        if w1 is not None and w2 is not None and len(w1) == 2 and len(w2) == 2:
            found = {"out": w1[0] * w2[0], "in": w1[1] * w2[1]}
        if found:
            dims[module] = found
    return dims


def trained_size(shapes: dict[str, tuple[int, ...]], metadata: dict[str, str]) -> TrainedSize:
    """The FLUX.2 size a LoRA or LoKr file was trained for, from its tensor shapes and safetensors header."""
    from ..trainer.flavours import SPECS
    from ..trainer.preflight import lora_flavour

    dims = _module_dims(shapes)
    width = next((d["in"] for m, d in sorted(dims.items()) if "in" in d and _IN_IS_WIDTH.search(m)), None)
    if width is None:
        width = next((d["out"] for m, d in sorted(dims.items()) if "out" in d and _OUT_IS_WIDTH.search(m)), None)
    modules = {_module_of(k)[0] for k in shapes}
    doubles = 1 + max((int(m.group(1)) for name in modules if (m := _DOUBLE.search(name))), default=0)
    singles = 1 + max((int(m.group(1)) for name in modules if (m := _SINGLE.search(name))), default=0)
    flavour = lora_flavour(metadata)
    spec = SPECS[flavour] if flavour is not None else None
    spec_width = spec.transformer["num_attention_heads"] * HEAD_DIM if spec is not None else DEV_WIDTH
    context_dim = dims.get("txt_in", {}).get("in") or (spec.transformer["joint_attention_dim"] if spec is not None
                                                       else DEV_CONTEXT_DIM)
    guidance = spec.has_guidance_embedding if spec is not None else True
    if spec is not None and width in (None, spec_width):
        # The real model of the flavour the header names: keys past its blocks are dropped, as they would be.
        doubles, singles = spec.block_counts
    return TrainedSize(width=width or spec_width, context_dim=context_dim,
                       in_channels=dims.get("img_in", {}).get("in", IN_CHANNELS), guidance_embed=guidance,
                       double_blocks=doubles, single_blocks=singles)


class _LoaderVerdict(logging.Filter):
    """Takes ComfyUI's per-key load messages of this thread off the root logger and keeps them."""

    def __init__(self) -> None:
        super().__init__()
        self.thread = threading.get_ident()
        self.not_loaded: list[str] = []
        self.not_patched: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if record.thread != self.thread:
            return True
        message = record.getMessage()
        if message.startswith(NOT_LOADED_PREFIX):
            self.not_loaded.append(message[len(NOT_LOADED_PREFIX):])
            return False
        if message.startswith(NOT_PATCHED_PREFIX):
            self.not_patched.append(message[len(NOT_PATCHED_PREFIX):])
            return False
        return True


def _comfy_model(size: TrainedSize):
    """A ModelPatcher over ComfyUI's own FLUX.2 model of `size`, on the meta device."""
    import comfy.model_detection  # type: ignore[import-not-found]
    import comfy.model_patcher  # type: ignore[import-not-found]
    import torch

    def meta(*shape: int):
        return torch.empty(*shape, device="meta")

    # The keys ComfyUI's detector reads for a FLUX.2 checkpoint, with their shapes.
    seed = {"img_in.weight": meta(size.width, size.in_channels), "txt_in.weight": meta(size.width, size.context_dim),
            "double_stream_modulation_img.lin.weight": meta(6 * size.width, size.width)}
    if size.guidance_embed:
        seed["guidance_in.in_layer.weight"] = meta(size.width, 256)
    for i in range(size.double_blocks):
        seed[f"double_blocks.{i}.img_attn.norm.key_norm.scale"] = meta(HEAD_DIM)
    for i in range(size.single_blocks):
        seed[f"single_blocks.{i}.norm.key_norm.scale"] = meta(HEAD_DIM)
    config = comfy.model_detection.model_config_from_unet(seed, "")
    if config is None or config.unet_config.get("image_model") != "flux2":
        raise RuntimeError("this ComfyUI does not recognise FLUX.2 checkpoints (update ComfyUI)")
    # ComfyUI before klein fixed FLUX.2 at dev's 48 heads; the head size is 128 in every flavour.
    config.unet_config["num_heads"] = size.width // HEAD_DIM
    model = config.get_model(seed, "", device=torch.device("meta"))
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def check_lora_keys(path: str | Path) -> KeyCheck:
    """Load `path` through ComfyUI's LoRA loader onto its FLUX.2 model of the file's trained size (meta device)."""
    try:
        import comfy.sd  # type: ignore[import-not-found]
        import comfy.utils  # type: ignore[import-not-found]
    except ImportError:
        return KeyCheck(path=str(path), ran=False,
                        reason="not running inside ComfyUI (no comfy module), so its LoRA loader was not asked.")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as handle:
        metadata = dict(handle.metadata() or {})
    lora = comfy.utils.load_torch_file(str(path), safe_load=True)  # as LoraLoaderModelOnly reads it
    size = trained_size({k: tuple(v.shape) for k, v in lora.items()}, metadata)
    if size.width % HEAD_DIM:
        return KeyCheck(path=str(path), ran=False, keys=len(lora),
                        reason=f"the file's width {size.width} is not a multiple of FLUX.2's head size {HEAD_DIM}.")
    try:
        patcher = _comfy_model(size)
    except Exception as exc:  # ComfyUI's internals changed: say the check could not run, never claim a pass
        log.warning("ComfyUI key check of %s could not run", path, exc_info=True)
        return KeyCheck(path=str(path), ran=False, keys=len(lora),
                        reason=f"ComfyUI could not build {size.describe()}: {type(exc).__name__}: {exc}")
    model = f"its LoRA loader on {size.describe()}"
    verdict = _LoaderVerdict()
    root = logging.getLogger()
    root.addFilter(verdict)
    try:
        patched, _ = comfy.sd.load_lora_for_models(patcher, None, lora, 1.0, 0.0)
    except Exception as exc:  # noqa: BLE001 - what LoraLoaderModelOnly would raise on this file: the file fails
        # e.g. KeyError for a lora_B whose lora_A is missing or renamed.
        return KeyCheck(path=str(path), ran=True, keys=len(lora), error=f"{type(exc).__name__}: {exc}", model=model)
    finally:
        root.removeFilter(verdict)
    dropped = tuple(sorted(set(verdict.not_loaded)))
    if lora and not patched.patches and not dropped:
        dropped = tuple(sorted(lora))  # nothing patched yet nothing reported: never claim that it loads
    return KeyCheck(path=str(path), ran=True, keys=len(lora), dropped=dropped,
                    unpatched=tuple(sorted(set(verdict.not_patched))), model=model)
