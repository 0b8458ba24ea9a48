"""Fault injection for the reliability tests. TEST-ONLY: inert unless FLUX2LORA_FAULT is set.

The trainer calls `fault_point(...)` at a few places (model load, mid-step, mid-checkpoint-write,
validation) and `corrupt_loss(...)` on each micro-batch loss. With the variable unset both return at
once; nothing here is an option for users. The grammar is one fault per process tree:

    FLUX2LORA_FAULT = "rank<R|*>:<point>[<N>]:<action>"

    point   load | step<N> | ckpt<N> | validation<N>   (N: 1-based step number; omitted = any)
    action  raise   RuntimeError (a crashing rank)
            nan     the loss becomes NaN (step only)
            nangrad the loss stays finite, its gradient becomes NaN (step only)
            oom     torch.OutOfMemoryError, as CUDA raises it
            enospc  OSError(ENOSPC) on the file being written (ckpt only)
            pause   write FLUX2LORA_FAULT_DIR/<rank>-<point><N>.pid and block until killed (a hung rank,
                    or a deterministic moment for a test to kill -9 the process)

Examples: "rank1:step3:raise", "rank*:step3:nan", "rank0:ckpt4:pause", "rank0:load:pause".
"""

from __future__ import annotations

import errno
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

FAULT_ENV = "FLUX2LORA_FAULT"
FAULT_DIR_ENV = "FLUX2LORA_FAULT_DIR"
POINTS = ("load", "step", "ckpt", "validation")
ACTIONS = ("raise", "nan", "nangrad", "oom", "enospc", "pause")
_SPEC = re.compile(r"rank(\d+|\*):(load|step|ckpt|validation)(\d+)?:(raise|nangrad|nan|oom|enospc|pause)")


class InjectedFault(RuntimeError):
    """The exception an injected 'raise' throws."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Fault:
    rank: int | None
    """None: every rank."""
    point: str
    number: int | None
    """Step number (1-based) the fault fires at; None: the first time the point is reached."""
    action: str

    def matches(self, point: str, *, number: int | None, rank: int) -> bool:
        return (self.point == point and (self.rank is None or self.rank == rank)
                and (self.number is None or self.number == number))


def parse_fault(text: str) -> Fault:
    match = _SPEC.fullmatch(text.strip())
    if match is None:
        raise ValueError(
            f"{FAULT_ENV}={text!r} is not a fault spec 'rank<R|*>:<point>[<N>]:<action>' with point in {POINTS} and "
            f"action in {ACTIONS}, e.g. 'rank1:step3:raise'. It is a test-only variable: unset it to train."
        )
    rank, point, number, action = match.groups()
    if action in ("nan", "nangrad") and point != "step":
        raise ValueError(f"{FAULT_ENV}={text!r}: action {action!r} only applies to point 'step'.")
    if action == "enospc" and point != "ckpt":
        raise ValueError(f"{FAULT_ENV}={text!r}: action 'enospc' only applies to point 'ckpt'.")
    return Fault(rank=None if rank == "*" else int(rank), point=point,
                 number=None if number is None else int(number), action=action)


def active_fault() -> Fault | None:
    text = os.environ.get(FAULT_ENV)
    return parse_fault(text) if text else None


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def fault_point(point: str, *, number: int | None = None, path: Path | None = None) -> None:
    """Fire the configured fault if it names this point, step and rank; otherwise do nothing."""
    fault = active_fault()
    if fault is None or fault.action in ("nan", "nangrad") or not fault.matches(point, number=number, rank=_rank()):
        return
    where = f"{point}{'' if number is None else number} on rank {_rank()}"
    if fault.action == "raise":
        raise InjectedFault(f"injected fault at {where} ({FAULT_ENV})")
    if fault.action == "oom":
        import torch

        raise torch.OutOfMemoryError(
            f"CUDA out of memory. Tried to allocate 2.00 GiB (injected at {where} by {FAULT_ENV})"
        )
    if fault.action == "enospc":
        raise OSError(errno.ENOSPC, f"No space left on device (injected by {FAULT_ENV})", str(path or "?"))
    if fault.action == "pause":
        _pause(f"rank{_rank()}-{point}{'' if number is None else number}")


def _pause(name: str) -> None:
    folder = os.environ.get(FAULT_DIR_ENV)
    if not folder:
        raise ValueError(f"{FAULT_ENV} action 'pause' needs {FAULT_DIR_ENV}: the folder for its marker file.")
    marker = Path(folder) / f"{name}.pid"
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(str(os.getpid()), encoding="utf-8")
    os.replace(tmp, marker)  # the test sees the marker only once it holds the pid
    threading.Event().wait()  # until a signal ends the process


def corrupt_loss(loss: Any, *, step: int) -> Any:
    """The loss, or NaN where a 'nan' fault names this step (1-based) and rank; under 'nangrad' the loss keeps
    its value and its gradient becomes NaN."""
    fault = active_fault()
    if fault is None or fault.action not in ("nan", "nangrad") or not fault.matches("step", number=step, rank=_rank()):
        return loss
    if fault.action == "nangrad":
        return _NanGradient.apply(loss)
    return loss * float("nan")


class _NanGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")
