"""On-disk tensor caches: content-addressed keys, atomic writes, verified reads.

Each cache entry is one safetensors file named by its key. Its header metadata records what it is
(format, kind, key) and a sha256 over its tensors' bytes, so a truncated, corrupt or misplaced file is
detected on read instead of silently training on garbage. Writes go to a temporary file in the same
folder, are fsynced, then os.replace'd into place: a crash leaves either the old file or the new one.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Any

import torch

CACHE_FORMAT = "flux2-lora-cache"
CACHE_FORMAT_VERSION = "1"


class CacheEntryError(ValueError):
    """A cache file is missing, truncated, corrupt or belongs to another key."""


def hash_json(value: Any) -> str:
    """sha256 hex of a JSON-serialisable value, independent of dict order."""
    blob = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and raw bytes of the tensors, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def check_writable_dir(path: Path, *, what: str) -> Path:
    """Create path (with parents) and prove a file can be written there; ValueError naming it otherwise."""
    path = Path(path).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        raise ValueError(
            f"{what} {path} is not a writable folder ({exc.strerror or exc}); choose a folder you can write to "
            "or fix its permissions."
        ) from None
    return path.resolve()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write data to path via a same-folder temporary file, fsync, os.replace, then fsync the folder."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    # Makes the rename itself durable; not possible on Windows, where opening a folder fails.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_entry(
    path: Path, tensors: dict[str, torch.Tensor], *, kind: str, key: str, metadata: dict[str, str] | None = None
) -> None:
    """Save tensors as one verified cache entry (see module docstring)."""
    from safetensors.torch import save

    tensors = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
    meta = dict(metadata or {})
    meta.update(
        format=CACHE_FORMAT, format_version=CACHE_FORMAT_VERSION, kind=kind, key=key, digest=tensor_digest(tensors)
    )
    atomic_write_bytes(path, save(tensors, metadata=meta))


def read_entry(
    path: Path, *, kind: str, key: str | None = None, verify_digest: bool = True
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a cache entry; CacheEntryError when it is missing, unreadable or not what is asked.

    verify_digest re-hashes every byte (catches bit rot, not only truncation); the structural checks
    (header, sizes, kind, key) always run.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise CacheEntryError(f"cache file {path} is missing")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CacheEntryError(f"cache file {path} is unreadable (truncated or corrupt): {exc}") from None
    if meta.get("format") != CACHE_FORMAT or meta.get("format_version") != CACHE_FORMAT_VERSION:
        raise CacheEntryError(
            f"cache file {path} is not a {CACHE_FORMAT} v{CACHE_FORMAT_VERSION} entry "
            f"(format={meta.get('format')!r}, version={meta.get('format_version')!r})"
        )
    if meta.get("kind") != kind:
        raise CacheEntryError(f"cache file {path} holds {meta.get('kind')!r}, expected {kind!r}")
    if key is not None and meta.get("key") != key:
        raise CacheEntryError(f"cache file {path} belongs to key {meta.get('key')!r}, expected {key!r}")
    if verify_digest and tensor_digest(tensors) != meta.get("digest"):
        raise CacheEntryError(f"cache file {path} fails its checksum (corrupt)")
    return tensors, meta
