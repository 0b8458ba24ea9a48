"""The only place the nodes touch ComfyUI's own modules; every import is lazy and guarded.

Outside ComfyUI (tests, the headless demo) each helper falls back to a plain behaviour, so node
classes can be called directly.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger("flux2_lora")

PACK_EVENT = "flux2lora.train"
"""Event name the Train LoRA node sends to the browser (web/js listens for it)."""

# Set by the headless runner so output-folder lookups work without ComfyUI.
_HEADLESS_ROOT: Path | None = None


def set_headless_root(root: str | os.PathLike | None) -> None:
    global _HEADLESS_ROOT
    _HEADLESS_ROOT = None if root is None else Path(root)


def _folder_paths():
    try:
        import folder_paths  # type: ignore[import-not-found]
    except ImportError:
        return None
    return folder_paths


def output_directory() -> Path:
    fp = _folder_paths()
    if fp is not None:
        return Path(fp.get_output_directory())
    if _HEADLESS_ROOT is not None:
        return _HEADLESS_ROOT / "output"
    return Path.cwd() / "output"


def input_directory() -> Path:
    fp = _folder_paths()
    if fp is not None:
        return Path(fp.get_input_directory())
    if _HEADLESS_ROOT is not None:
        return _HEADLESS_ROOT / "input"
    return Path.cwd() / "input"


def temp_directory() -> Path:
    """ComfyUI's temp folder (emptied at start-up; PreviewImage writes there)."""
    fp = _folder_paths()
    if fp is not None:
        return Path(fp.get_temp_directory())
    if _HEADLESS_ROOT is not None:
        return _HEADLESS_ROOT / "temp"
    return Path.cwd() / "temp"


def save_preview_png(image, *, prefix: str) -> dict[str, str]:
    """Write a PIL image to the temp folder as PreviewImage does; return the entry a node's {"ui": {"images": [...]}}
    lists, which the front end shows on the node (it fetches it through /view?type=temp)."""
    import uuid

    folder = temp_directory()
    folder.mkdir(parents=True, exist_ok=True)
    name = f"{prefix}_{uuid.uuid4().hex[:12]}.png"
    image.save(folder / name, compress_level=1)  # PreviewImage's level: a preview is written often, kept briefly
    return {"filename": name, "subfolder": "", "type": "temp"}


def models_directory() -> Path:
    fp = _folder_paths()
    if fp is not None:
        return Path(fp.models_dir)
    if _HEADLESS_ROOT is not None:
        return _HEADLESS_ROOT / "models"
    return Path.cwd() / "models"


def model_folder_paths(kind: str) -> list[Path]:
    """ComfyUI's registered folders for a model kind (diffusers, diffusion_models, vae, loras)."""
    fp = _folder_paths()
    if fp is not None:
        try:
            return [Path(p) for p in fp.get_folder_paths(kind)]
        except KeyError:
            return []
    return [models_directory() / kind]


def list_model_files(kind: str) -> list[str]:
    fp = _folder_paths()
    if fp is not None:
        try:
            return sorted(fp.get_filename_list(kind))
        except KeyError:
            return []
    names: list[str] = []
    for root in model_folder_paths(kind):
        if root.is_dir():
            names += [str(p.relative_to(root)) for p in root.rglob("*.safetensors")]
    return sorted(names)


def resolve_model_file(kind: str, name: str) -> Path | None:
    """Full path of a file listed by list_model_files, refusing names that leave the model folders."""
    fp = _folder_paths()
    if fp is not None:
        path = fp.get_full_path(kind, name)
        return Path(path) if path else None
    for root in model_folder_paths(kind):
        candidate = (root / name).resolve()
        if candidate.is_file() and candidate.is_relative_to(root.resolve()):
            return candidate
    return None


def torch_device():
    """ComfyUI's compute device (respects --cpu); CUDA if present otherwise."""
    try:
        import comfy.model_management as mm  # type: ignore[import-not-found]

        return mm.get_torch_device()
    except ImportError:
        import torch

        return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def check_interrupted() -> None:
    """Raise ComfyUI's interrupt exception when the user pressed Cancel; no-op outside ComfyUI."""
    try:
        import comfy.model_management as mm  # type: ignore[import-not-found]
    except ImportError:
        return
    mm.throw_exception_if_processing_interrupted()


def interrupted() -> bool:
    """Poll Cancel without raising (the supervisor uses it to stop its subprocess first)."""
    try:
        import comfy.model_management as mm  # type: ignore[import-not-found]
    except ImportError:
        return False
    return bool(mm.processing_interrupted())


def interrupt_exception() -> type[BaseException]:
    try:
        import comfy.model_management as mm  # type: ignore[import-not-found]
    except ImportError:
        return KeyboardInterrupt
    return mm.InterruptProcessingException


class Progress:
    """ComfyUI's ProgressBar when available (its update also honours Cancel), else a log line."""

    def __init__(self, total: int, *, label: str = "") -> None:
        self.total = max(1, int(total))
        self.label = label
        self._bar: Any = None
        try:
            import comfy.utils  # type: ignore[import-not-found]

            self._bar = comfy.utils.ProgressBar(self.total)
        except ImportError:
            pass

    def update_absolute(self, value: int) -> None:
        check_interrupted()
        if self._bar is not None:
            self._bar.update_absolute(value, self.total)
        elif self.label:
            log.debug("%s %d/%d", self.label, value, self.total)


def send_event(event: str, data: dict[str, Any]) -> None:
    """Send a message to the browser; silently nothing when no server runs (tests, headless)."""
    try:
        from server import PromptServer  # type: ignore[import-not-found]
    except ImportError:
        return
    instance = getattr(PromptServer, "instance", None)
    if instance is not None:
        instance.send_sync(event, data)


def free_comfy_memory() -> None:
    """Unload ComfyUI's own models and cached GPU memory before a training process needs the GPU."""
    try:
        import comfy.model_management as mm  # type: ignore[import-not-found]
    except ImportError:
        return
    mm.unload_all_models()
    mm.soft_empty_cache()
