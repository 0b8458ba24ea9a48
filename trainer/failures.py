"""What a user is told when a run fails: the step, the rank, the cause in their terms, and what to do.

`failure_report` turns the exception that ended a rank into the fields of its "error" event;
`summarize_errors` picks the root cause among the error events of several ranks for the node's message.
Imports nothing heavy at module level: the ComfyUI node imports this module at start-up.
"""

from __future__ import annotations

import errno
import sys
from pathlib import Path
from typing import Any

from .checkpoint import list_checkpoints

_TEXT_LIMIT = 1500
_DIST_MARKERS = ("connection closed by peer", "connection reset by peer", "timed out", "timeout",
                 "broken pipe", "nccl", "gloo")


class NonFiniteLossError(RuntimeError):
    """A non-finite loss or gradient under nan_policy "stop": the run ends before the optimizer step."""


def is_out_of_memory(exc: BaseException) -> bool:
    torch = sys.modules.get("torch")
    oom_type = getattr(torch, "OutOfMemoryError", None) if torch is not None else None
    if oom_type is not None and isinstance(exc, oom_type):
        return True
    return isinstance(exc, (RuntimeError, MemoryError)) and (
        isinstance(exc, MemoryError) or "out of memory" in str(exc).lower()
    )


def _is_distributed_error(exc: BaseException) -> bool:
    torch = sys.modules.get("torch")
    dist_error = getattr(getattr(torch, "distributed", None), "DistError", None) if torch is not None else None
    if dist_error is not None and isinstance(exc, dist_error):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(m in text for m in _DIST_MARKERS)


def peak_memory_bytes() -> int | None:
    """This process's peak memory: the CUDA allocator peak on a GPU, else the peak resident set size."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return int(peak if sys.platform == "darwin" else peak * 1024)


def peak_memory_text(device: Any = None) -> str:
    """The peak memory of this process: CUDA allocator peak on a GPU, else the peak resident set size."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        try:
            index = torch.cuda.current_device() if device is None else device
            peak = torch.cuda.max_memory_allocated(index)
            total = torch.cuda.get_device_properties(index).total_memory
            return f"peak GPU memory allocated {peak / 2**30:.2f} GiB of {total / 2**30:.2f} GiB on cuda:{index}"
        except Exception as exc:  # noqa: BLE001 - a broken CUDA context must not hide the OOM itself
            return f"peak GPU memory unknown ({type(exc).__name__})"
    try:
        import resource
    except ImportError:  # Windows
        return "peak memory unknown on this platform"
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    peak = peak_kib if sys.platform == "darwin" else peak_kib * 1024
    return f"peak process memory (RSS) {peak / 2**30:.2f} GiB"


def memory_advice(config: Any) -> list[str]:
    """The config changes that lower training memory, skipping those already in effect; exact keys."""
    tips = []
    if not config.memory.gradient_checkpointing:
        tips.append("gradient_checkpointing: true (recompute activations in backward)")
    if not config.quantization.base_quantized:
        tips.append('base_model_precision: "int8-quanto" (or "int4-quanto"; needs distributed "ddp" or "none")')
    if not config.offload.enabled:
        tips.append("enable_group_offload: true (blocks wait in CPU memory; not with quantization)")
    if config.data.train_batch_size > 1:
        tips.append(f"a smaller train_batch_size (now {config.data.train_batch_size}; raise gradient_accumulation_steps "
                    "to keep the effective batch)")
    tips.append("a lower dataset resolution (Build Dataset resolution / build-dataset --resolution)")
    if config.tread is None:
        tips.append('tread_config: {"routes": [{"selection_ratio": 0.5, "start_layer_idx": 2, "end_layer_idx": -2}]}')
    if config.memory.mixed_precision == "no":
        tips.append('mixed_precision: "bf16"')
    if config.parallelism.distributed != "fsdp2":
        tips.append('distributed: "fsdp2" over more GPUs (num_processes) to shard the model')
    if config.validation.enabled:
        tips.append("a smaller validation_resolution")
    return tips


def _checkpoint_note(out_dir: Path | None) -> tuple[str, str | None]:
    if out_dir is None:
        return "", None
    try:
        found = list_checkpoints(out_dir)
    except OSError:
        return "", None
    if not found:
        return " No checkpoint has been written yet.", None
    name = found[-1][1].name
    return (f" The last good checkpoint is kept: {name} in {out_dir} (resume_from_checkpoint 'latest' continues "
            "from it)."), name


def _where(step: int | None, phase: str) -> str:
    return f"at step {step}" if step is not None and phase == "train" else f"during {phase}" + (
        f" (step {step})" if step is not None else "")


def failure_report(exc: BaseException, *, step: int | None, phase: str, rank: int, config: Any,
                   out_dir: Path | None) -> dict[str, Any]:
    """Fields of the "error" event for the exception that ended this rank: message, kind, step, rank."""
    note, last = _checkpoint_note(out_dir)
    where = _where(step, phase)
    original = f"{type(exc).__name__}: {str(exc)[:_TEXT_LIMIT]}"
    if isinstance(exc, NonFiniteLossError):
        kind, message = "non_finite_loss", f"{exc}"
    elif is_out_of_memory(exc):
        kind = "out_of_memory"
        tips = "; ".join(memory_advice(config)) if config is not None else "see the README's memory section"
        message = (f"out of memory {where} on rank {rank} ({peak_memory_text()}). To use less memory set: {tips}. "
                   f"({original})")
    elif isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS,
                                                     errno.EPERM, errno.EIO):
        path = exc.filename or (out_dir if out_dir is not None else "?")
        fix = ("free disk space" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else
               "make the folder writable or choose another output folder")
        kind = "disk"
        message = f"cannot write {path} {where}: {exc.strerror or exc} (errno {exc.errno}); {fix}, then run again."
    elif _is_distributed_error(exc):
        timeout = config.parallelism.collective_timeout_s if config is not None else None
        kind = "distributed"
        message = (f"a collective operation failed {where} on rank {rank}: another rank crashed or hung (its own "
                   f"error, if it could write one, is the first error in events.jsonl)"
                   + (f"; a hung rank is given up on after collective_timeout_s={timeout:g} s" if timeout else "")
                   + f". ({original})")
    else:
        kind, message = "error", f"{original} ({where})"
    return {"message": message + note, "kind": kind, "rank": rank, "step": step, "phase": phase,
            "last_checkpoint": last}


def summarize_errors(errors: list[dict[str, Any]]) -> str:
    """One line for the node: the first rank's error (the root cause), then the others in short."""
    if not errors:
        return ""
    first = errors[0]
    head = f"rank {first.get('rank', '?')}: {first.get('message', '')}"
    others = [e for e in errors[1:] if e.get("rank") != first.get("rank")]
    if others:
        head += " | then " + "; ".join(f"rank {e.get('rank', '?')}: {str(e.get('message', ''))[:300]}" for e in others)
    return head
