"""Reading tensors, or rows of them, from a .safetensors file with plain file reads instead of a memory map.

safetensors' own reader maps the whole file: every page a tensor is read from then counts in the process's
resident memory (RssFile) for as long as the file stays open, beside the tensor it was copied into, so a loader
that reads a 64 GB transformer through it shows 64 GB more than it holds. Here each read copies the bytes
straight into the caller's tensor (the final, possibly sharded, parameter when dtypes agree); the kernel's page
cache still serves them but is not part of any process. Only the format is read (an 8-byte little-endian header
length, a JSON header of dtype/shape/offsets, then the data); nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
          "I8": torch.int8, "U8": torch.uint8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
_MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header
_MAX_READ = 1 << 30  # one pread call; Linux returns at most about 2 GiB per call anyway


@dataclass(frozen=True, slots=True)
class TensorInfo:
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    """Absolute byte offset of the first element in the file."""


class SafetensorsFile:
    """An open .safetensors file: `info(name)` from its header, `read_rows(name, start, out)` into a tensor.

    Use as a context manager; the file descriptor closes on exit."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_RDONLY)
        try:
            self.tensors = self._read_header()
        except BaseException:
            os.close(self._fd)
            raise

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _read_header(self) -> dict[str, TensorInfo]:
        size = os.fstat(self._fd).st_size
        head = os.pread(self._fd, 8, 0)
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < length <= min(_MAX_HEADER, size - 8):
            raise ValueError(f"{self.path} is not a safetensors file (header length {length}, file size {size}); "
                             "re-download or re-convert it.")
        try:
            header = json.loads(os.pread(self._fd, length, 8))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{self.path}: unreadable safetensors header ({exc}); re-download the file.") from exc
        tensors = {}
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            if entry.get("dtype") not in DTYPES:
                raise ValueError(f"{self.path}: tensor {name!r} has dtype {entry.get('dtype')!r}, which this loader "
                                 f"does not read ({', '.join(DTYPES)}).")
            dtype, shape = DTYPES[entry["dtype"]], tuple(int(d) for d in entry["shape"])
            begin, end = (int(v) for v in entry["data_offsets"])
            if end - begin != _numel(shape) * dtype.itemsize or 8 + length + end > size:
                raise ValueError(f"{self.path}: tensor {name!r} ({entry['dtype']} {list(shape)}) does not fit its "
                                 "byte range or the file is truncated; re-download it.")
            tensors[name] = TensorInfo(dtype=dtype, shape=shape, offset=8 + length + begin)
        return tensors

    def read_rows(self, name: str, *, start: int, out: torch.Tensor) -> None:
        """Fill `out` (any dtype or device) with rows start .. start + len(out) of tensor `name` (the first
        dimension; a 0-d or 1-d tensor reads elements). Bytes go straight into `out` when it is a contiguous CPU
        tensor of the file's dtype, else through one buffer of those rows."""
        info = self.tensors[name]
        row = _numel(info.shape[1:]) if info.shape else 1
        rows = out.shape[0] if out.dim() else 1
        if start < 0 or start + rows > (info.shape[0] if info.shape else 1) or out.numel() != rows * row:
            raise ValueError(f"{self.path}: cannot read rows {start}..{start + rows} of {name!r} "
                             f"{list(info.shape)} into a tensor of shape {list(out.shape)}.")
        direct = out.dtype == info.dtype and out.device.type == "cpu" and out.is_contiguous()
        target = out if direct else torch.empty(out.shape, dtype=info.dtype)
        self._pread_into(target, offset=info.offset + start * row * info.dtype.itemsize)
        if not direct:
            out.copy_(target)

    def _pread_into(self, tensor: torch.Tensor, *, offset: int) -> None:
        view = memoryview(tensor.detach().reshape(-1).view(torch.uint8).numpy()).cast("B")
        done = 0
        while done < len(view):
            n = os.preadv(self._fd, [view[done:done + _MAX_READ]], offset + done)
            if n <= 0:
                raise ValueError(f"{self.path}: file ended while reading; it is truncated, re-download it.")
            done += n


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
