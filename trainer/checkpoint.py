"""Training checkpoints: checkpoint-<step>/ folders, written atomically, verified on load, rotated.

A checkpoint holds the LoRA weights, the optimizer and LR-scheduler state and the data position, as
one safetensors file plus one JSON file (no pickle anywhere). It is written into a hidden temporary
folder, every file fsync'ed, a COMPLETE marker with the files' sha256 written last, and only then
renamed into place: a crash at any moment leaves either the whole checkpoint or none of it.
The random state needs no saving: every step reseeds from (seed, rank, step).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .faults import fault_point

log = logging.getLogger(__name__)

STATE_FILE = "state.safetensors"
META_FILE = "meta.json"
MARKER_FILE = "COMPLETE"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # Windows cannot open folders; rename there is already durable enough
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def flatten_optimizer_state(state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split an optimizer state dict into tensors (for safetensors) and JSON (param groups, scalars).

    Tensors and tuples inside param groups and scalars (prodigy keeps running sums as tensors in its groups and a
    version tuple it compares) survive as {"__tensor__": key} and {"__tuple__": [...]}.
    """
    import torch

    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for param_key, values in state["state"].items():
        for name, value in values.items():
            key = f"optim/{param_key}/{name}"
            if isinstance(value, torch.Tensor):
                tensors[key] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(param_key), {})[name] = _to_json(value, tensors, key)
    groups = [{name: _to_json(value, tensors, f"optim/param_groups/{i}/{name}") for name, value in group.items()}
              for i, group in enumerate(state["param_groups"])]
    meta = {"param_groups": groups, "scalars": scalars, "keys": [str(k) for k in state["state"]]}
    return tensors, meta


def unflatten_optimizer_state(tensors: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[Any, dict[str, Any]] = {}
    for param_key in meta["keys"]:
        entry: dict[str, Any] = {k: _from_json(v, tensors) for k, v in meta["scalars"].get(param_key, {}).items()}
        prefix = f"optim/{param_key}/"
        for key, value in tensors.items():
            if key.startswith(prefix) and "/" not in key[len(prefix):]:
                entry[key[len(prefix):]] = value
        state[int(param_key) if param_key.isdigit() else param_key] = entry
    groups = [{k: _from_json(v, tensors) for k, v in group.items()} for group in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def _to_json(value: Any, tensors: dict[str, Any], key: str) -> Any:
    import torch

    if isinstance(value, torch.Tensor):
        tensors[key] = value.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(value, tuple):
        return {"__tuple__": [_to_json(v, tensors, f"{key}/{i}") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_to_json(v, tensors, f"{key}/{i}") for i, v in enumerate(value)]
    return value


def _from_json(value: Any, tensors: dict[str, Any]) -> Any:
    if isinstance(value, dict) and set(value) == {"__tensor__"}:
        return tensors[value["__tensor__"]]
    if isinstance(value, dict) and set(value) == {"__tuple__"}:
        return tuple(_from_json(v, tensors) for v in value["__tuple__"])
    if isinstance(value, list):
        return [_from_json(v, tensors) for v in value]
    return value


def save_checkpoint(
    output_dir: str | os.PathLike,
    *,
    step: int,
    tensors: dict[str, Any],
    meta: dict[str, Any],
    total_limit: int | None,
    extra_files: Callable[[Path], None] | None = None,
) -> Path:
    """Write checkpoint-<step> atomically, then delete the oldest beyond total_limit. Returns its path.

    extra_files(folder) writes more files (the step's LoRA file) into the folder before it is renamed into place, so
    they exist exactly when the checkpoint does."""
    from safetensors.torch import save_file

    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f".checkpoint-{step}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / STATE_FILE))
        fault_point("ckpt", number=step, path=tmp / STATE_FILE)  # test-only: a crash or full disk mid-write
        (tmp / META_FILE).write_text(json.dumps({**meta, "step": step}, indent=1, default=str), encoding="utf-8")
        if extra_files is not None:
            extra_files(tmp)
        for name in (STATE_FILE, META_FILE):
            _fsync_file(tmp / name)
        marker = {name: file_sha256(tmp / name) for name in (STATE_FILE, META_FILE)}
        (tmp / MARKER_FILE).write_text(json.dumps(marker), encoding="utf-8")
        _fsync_file(tmp / MARKER_FILE)
        _fsync_dir(tmp)
        if final.exists():  # a checkpoint of the same step from an earlier, interrupted run
            old = output_dir / f".checkpoint-{step}.old-{os.getpid()}"
            final.rename(old)
            shutil.rmtree(old, ignore_errors=True)
        tmp.rename(final)
        _fsync_dir(output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if total_limit is not None:
        rotate_checkpoints(output_dir, keep=total_limit)
    return final


def is_complete(path: Path, *, verify_hashes: bool = True) -> bool:
    marker = path / MARKER_FILE
    if not marker.is_file():
        return False
    try:
        expected = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    for name in (STATE_FILE, META_FILE):
        if not (path / name).is_file():
            return False
        if verify_hashes and file_sha256(path / name) != expected.get(name):
            return False
    return True


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints (marker present), oldest first. Temporary and broken folders are ignored."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = []
    for child in output_dir.iterdir():
        m = _NAME.match(child.name)
        if m and child.is_dir() and is_complete(child, verify_hashes=False):
            found.append((int(m.group(1)), child))
    return sorted(found)


def rotate_checkpoints(output_dir: Path, *, keep: int) -> None:
    checkpoints = list_checkpoints(output_dir)
    for _, path in checkpoints[: max(0, len(checkpoints) - keep)]:
        shutil.rmtree(path, ignore_errors=True)
    # Leftovers of crashed writes are never loaded; clean them so they do not fill the disk.
    for child in output_dir.iterdir():
        if child.name.startswith(".checkpoint-") and child.is_dir() and f"-{os.getpid()}" not in child.name:
            shutil.rmtree(child, ignore_errors=True)


def resolve_resume(output_dir: str | os.PathLike, resume_from_checkpoint: str | None) -> Path | None:
    """The checkpoint to resume from: None, "latest" (newest valid one, or none yet), or a path."""
    if not resume_from_checkpoint:
        return None
    if resume_from_checkpoint == "latest":
        for _, path in reversed(list_checkpoints(output_dir)):
            if is_complete(path):
                return path
            log.warning("checkpoint %s fails its checksum; trying an older one", path)
        return None
    path = Path(resume_from_checkpoint)
    if not path.is_absolute() and not path.exists():
        path = Path(output_dir) / path
    if not path.is_dir():
        raise ValueError(f"resume_from_checkpoint: {resume_from_checkpoint} is not a checkpoint folder.")
    if not is_complete(path):
        raise ValueError(
            f"resume_from_checkpoint: {path} is incomplete or corrupt (missing or mismatching {MARKER_FILE}); "
            "use 'latest' to take the newest valid checkpoint."
        )
    return path


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    from safetensors.torch import load_file

    path = Path(path)
    if not is_complete(path):
        raise ValueError(f"checkpoint {path} is incomplete or corrupt; it was not loaded.")
    tensors = load_file(str(path / STATE_FILE))
    meta = json.loads((path / META_FILE).read_text(encoding="utf-8"))
    return tensors, meta
