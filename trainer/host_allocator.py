"""The training process's C allocator: freed tensors go back to the operating system.

glibc serves an allocation from its heap below an adaptive threshold that rises, up to 32 MiB, to the size of
every large block freed. A training step allocates and frees the same large tensors again and again (FSDP2's
all-gathered block weights on a CPU rank, activations, quantization temporaries), so once the threshold has
risen they come from the heap, and freed heap memory stays resident in the process: measured with
bench/load_memory.py, an FSDP2 rank on the CPU grew by 3.7x the model's bf16 bytes over two steps, against
0.59x with a fixed threshold. A fixed threshold makes every allocation above it a private mapping that is
returned when freed. It costs one mapping and its page faults per large allocation, small next to the matmuls
that fill those tensors. Accelerator memory is not affected (PyTorch's caching allocator owns it).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os

log = logging.getLogger(__name__)

MMAP_THRESHOLD_BYTES = 256 << 10
"""Allocations from 256 KiB up are mapped and unmapped: every weight, gathered block, activation and LoRA matrix
that grows with the model; the many small tensors below it stay on the fast heap. bench/load_memory.py's FSDP2
slope: 0.61 with 1 MiB, 0.59 with 256 KiB and with 64 KiB."""
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)
_ENV = "MALLOC_MMAP_THRESHOLD_"


@functools.lru_cache(maxsize=1)
def _glibc():
    """The C library when it is glibc (has mallopt and malloc_trim), else None (macOS, musl)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt.argtypes, libc.mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
        libc.malloc_trim.argtypes, libc.malloc_trim.restype = (ctypes.c_size_t,), ctypes.c_int
    except (OSError, AttributeError):
        return None
    return libc


def return_freed_memory_to_os() -> bool:
    """Fix glibc's mmap threshold for this process (once, before large allocations). Returns whether it was
    set: not when the C library is not glibc, or when the user chose a threshold with MALLOC_MMAP_THRESHOLD_."""
    libc = _glibc()
    if os.environ.get(_ENV) or libc is None:
        return False
    done = libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
    if not done:
        log.debug("mallopt(M_MMAP_THRESHOLD) refused; the allocator keeps its adaptive threshold")
    return done


STEP_MMAP_THRESHOLD_BYTES = 32 << 20
"""The threshold once a CPU process that does not shard starts its steps: glibc's own ceiling for its adaptive one."""
STEP_TRIM_THRESHOLD_BYTES = 2 * STEP_MMAP_THRESHOLD_BYTES
"""Free memory at the top of the heap that stays mapped. A fixed mmap threshold also fixes glibc's trim threshold
at its 128 KiB default, so each step's freed activations were handed back and faulted in again by the next step
(1,100-5,800 page faults per step on the tiny model; 6 with this). Twice the mmap threshold is the pairing glibc's
adaptive rule itself uses."""
_M_TRIM_THRESHOLD = -1


def keep_step_tensors_on_the_heap() -> bool:
    """For a process that computes its steps on the CPU without FSDP2 (tests, the demo, bench/): raise the fixed
    threshold to 32 MiB once the model is built. Each step allocates and frees the same activations; mapped, every
    one costs a mapping and its page faults, measured with bench/vs_diffusers_example.py at 1.7x the step time of
    diffusers' example (tiny model, 1 thread). The heap keeps them mapped for the next step instead (trim threshold
    STEP_TRIM_THRESHOLD_BYTES), at most the step's own peak. Loading (the host-RAM peak at real scale) has already
    run under MMAP_THRESHOLD_BYTES. Returns whether it was set (not when the user chose MALLOC_MMAP_THRESHOLD_, or
    without glibc; a MALLOC_TRIM_THRESHOLD_ of the user's is kept)."""
    libc = _glibc()
    if os.environ.get(_ENV) or libc is None:
        return False
    if not os.environ.get("MALLOC_TRIM_THRESHOLD_"):
        libc.mallopt(_M_TRIM_THRESHOLD, STEP_TRIM_THRESHOLD_BYTES)
    return libc.mallopt(_M_MMAP_THRESHOLD, STEP_MMAP_THRESHOLD_BYTES) == 1


def release_freed_memory() -> None:
    """Give the heap's free pages back to the operating system now (glibc malloc_trim), for a process whose
    allocator settings are not ours to change (ComfyUI's, while Build Dataset quantizes the text encoder): call it
    after freeing a large unit of work, such as each quantized layer's full-precision weights. Measured with
    bench/text_encoder_memory.py: loading an int8 text encoder, peak RSS slope 2.31x its bf16 bytes without it,
    0.52x with it."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
