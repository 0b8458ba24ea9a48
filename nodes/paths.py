"""Where paths typed into the nodes (or sent by any client of the server) may point.

ComfyUI may be reachable by others: a widget value is untrusted input. Every path a node takes from
a widget is made absolute, '..' resolved, and must lie inside one of its allowed roots:

- image folders and dataset files: ComfyUI's input folder, plus FLUX2LORA_DATASET_ROOTS;
- model folders: ComfyUI's models folders (diffusers, diffusion_models, checkpoints, incl. the extra
  model paths ComfyUI is configured with), plus FLUX2LORA_MODEL_ROOTS;
- run folders to attach: ComfyUI's output folder.

The two variables list extra folders the machine's owner allows, separated by os.pathsep. Symbolic
links inside an allowed folder are followed: only the machine's owner can create them there.
"""

from __future__ import annotations

import os
from pathlib import Path

from . import comfy_bridge

DATASET_ROOTS_ENV = "FLUX2LORA_DATASET_ROOTS"
MODEL_ROOTS_ENV = "FLUX2LORA_MODEL_ROOTS"
_MODEL_KINDS = ("diffusers", "diffusion_models", "checkpoints")


def _env_roots(name: str) -> list[Path]:
    return [Path(p).expanduser() for p in os.environ.get(name, "").split(os.pathsep) if p.strip()]


def dataset_roots() -> list[Path]:
    return [comfy_bridge.input_directory()] + _env_roots(DATASET_ROOTS_ENV)


def model_roots() -> list[Path]:
    roots = [p for kind in _MODEL_KINDS for p in comfy_bridge.model_folder_paths(kind)]
    return roots + _env_roots(MODEL_ROOTS_ENV)


def run_roots() -> list[Path]:
    return [comfy_bridge.output_directory()]


def _normal(path: Path) -> str:
    return os.path.normcase(os.path.abspath(path))


def is_inside(path: Path, root: Path) -> bool:
    path_s, root_s = _normal(path), _normal(root)
    return path_s == root_s or path_s.startswith(root_s.rstrip(os.sep) + os.sep)


def check_inside(path: str | os.PathLike, *, roots: list[Path], input_name: str, env_name: str | None) -> Path:
    """The absolute path (with '..' resolved) if it lies inside one of roots; else a ValueError naming the input."""
    text = str(path)
    if any(ord(c) < 32 for c in text):
        raise ValueError(f"{input_name} {text!r} contains control characters; give a plain folder path.")
    absolute = Path(os.path.abspath(Path(text).expanduser()))
    if any(is_inside(absolute, root) for root in roots):
        return absolute
    allowed = ", ".join(str(r) for r in roots) or "(none)"
    extra = f", or add its parent folder to the {env_name} environment variable of the ComfyUI server" if env_name else ""
    raise ValueError(
        f"{input_name} {text!r} is outside the folders this node may use ({allowed}). Move or link the folder "
        f"there{extra}."
    )
