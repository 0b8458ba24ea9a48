"""What the visible NVIDIA GPUs are, read through NVML, which (unlike the CUDA runtime) leaves a process fork-safe.

The warm trainer (warm_worker.py) imports torch, diffusers, transformers and peft once and forks each run's trainer
from that process, which is only sound while the CUDA driver is untouched. Some libraries ask about the GPU while
they are imported: torchao (which transformers' quantizers import whenever it is installed) evaluates
`torch.cuda.is_available()` and `torch.cuda.get_device_capability()` at module level, and both initialise the CUDA
driver in that process. `answered_from_nvml` answers exactly those queries from NVML for the length of the imports,
with the values a cold process would get, so the module-level constants come out as in a cold start and the worker
stays forkable. torch's own PYTORCH_NVML_BASED_CUDA_CHECK does the same for is_available alone.
"""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Iterator
from dataclasses import dataclass

NVML_LIBRARY = "libnvidia-ml.so.1"


@dataclass(frozen=True)
class GpuFacts:
    """The visible CUDA devices: how many, and the compute capability they all share."""

    count: int
    capability: tuple[int, int]


def _open_nvml() -> ctypes.CDLL:
    return ctypes.CDLL(NVML_LIBRARY)  # the driver's library; torch's NVML helpers load the same one


def _physical_capabilities(nvml: ctypes.CDLL) -> list[tuple[int, int]] | None:
    if nvml.nvmlInit_v2() != 0:
        return None
    try:
        count = ctypes.c_uint()
        if nvml.nvmlDeviceGetCount_v2(ctypes.byref(count)) != 0:
            return None
        capabilities = []
        for index in range(count.value):
            handle = ctypes.c_void_p()
            major, minor = ctypes.c_int(), ctypes.c_int()
            if (nvml.nvmlDeviceGetHandleByIndex_v2(index, ctypes.byref(handle)) != 0
                    or nvml.nvmlDeviceGetCudaComputeCapability(handle, ctypes.byref(major), ctypes.byref(minor)) != 0):
                return None
            capabilities.append((major.value, minor.value))
        return capabilities
    finally:
        nvml.nvmlShutdown()


def read_gpu_facts() -> GpuFacts | None:
    """The visible GPUs' count and shared capability from NVML; None when NVML cannot say for sure: no NVIDIA driver,
    a ROCm or CPU build of torch, MIG or unknown entries in CUDA_VISIBLE_DEVICES, or GPUs of different capabilities
    (CUDA's and NVML's device orders can differ, so "device 0" would be ambiguous)."""
    import torch

    try:
        if not torch.cuda._is_compiled() or torch.version.hip:
            return None
        visible = torch.cuda._device_count_nvml()  # torch's NVML count, CUDA_VISIBLE_DEVICES applied; < 0: unknown
        if visible <= 0:
            return None if visible < 0 else GpuFacts(count=0, capability=(0, 0))
        capabilities = _physical_capabilities(_open_nvml())
    except (OSError, AttributeError):  # no NVML library, or a torch without these private helpers
        return None
    if not capabilities or len(set(capabilities)) != 1:
        return None
    return GpuFacts(count=visible, capability=capabilities[0])


@contextlib.contextmanager
def answered_from_nvml(facts: GpuFacts | None) -> Iterator[None]:
    """Within the block, torch.cuda.is_available, device_count and get_device_capability return `facts` instead of
    initialising the CUDA driver; with None, nothing changes (a query then initialises it, as without this)."""
    import torch

    if facts is None:
        yield
        return
    saved = {name: getattr(torch.cuda, name) for name in ("is_available", "device_count", "get_device_capability")}

    def get_device_capability(device=None) -> tuple[int, int]:  # noqa: ARG001 - every visible GPU has these
        return facts.capability

    torch.cuda.is_available = lambda: facts.count > 0
    torch.cuda.device_count = lambda: facts.count
    torch.cuda.get_device_capability = get_device_capability
    try:
        yield
    finally:
        for name, function in saved.items():
            setattr(torch.cuda, name, function)
