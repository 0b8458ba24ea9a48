"""The trainer's event stream: one JSON object per line in <output_dir>/events.jsonl, written by rank 0.

The ComfyUI node (and anyone else) follows the file; nothing else crosses the process boundary.
Events: start, step, validation, checkpoint, end, error, each with "event" and "time".
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

EVENTS_FILE = "events.jsonl"


def _clean(value: Any) -> Any:
    """JSON has no NaN/inf: write them as strings so readers never choke."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


class EventSink(Protocol):
    """What else receives rank 0's events (trainer/trackers.py): the event name and its data as emitted."""

    def write(self, event: str, data: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class EventWriter:
    """Appends events; a no-op on ranks other than 0. Each line is flushed so followers see it at once."""

    def __init__(self, output_dir: str | os.PathLike, *, rank: int = 0) -> None:
        self.path = Path(output_dir) / EVENTS_FILE
        self.enabled = rank == 0
        self._fh = None
        self._sinks: list[EventSink] = []
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.path, "a", encoding="utf-8")

    def emit(self, event: str, **data: Any) -> None:
        if not self.enabled or self._fh is None:
            return
        record = {"event": event, "time": time.time(), **_clean(data)}
        self._fh.write(json.dumps(record, default=str) + "\n")
        self._fh.flush()
        for sink in self._sinks:  # after the file: a tracker never costs events.jsonl a line
            sink.write(event, data)

    def add_sink(self, sink: EventSink) -> None:
        """Also hand every later event (name and raw data) to `sink`, such as trainer/trackers.Trackers; it is
        closed with this writer. Ignored on ranks other than 0, which write nothing."""
        if self.enabled:
            self._sinks.append(sink)

    def close(self) -> None:
        sinks, self._sinks = self._sinks, []
        for sink in sinks:
            sink.close()
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __enter__(self) -> "EventWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class EventFollower:
    """Reads new complete lines of an events file since the last call (a partial last line waits)."""

    path: Path
    offset: int = 0
    _pending: bytes = field(default=b"", repr=False)

    def poll(self) -> list[dict[str, Any]]:
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self.offset)
                chunk = fh.read()
        except FileNotFoundError:
            return []
        self.offset += len(chunk)
        data = self._pending + chunk
        lines = data.split(b"\n")
        self._pending = lines.pop()  # b"" when the chunk ended with a newline
        events = []
        for line in lines:
            if not line.strip():
                continue
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                events.append({"event": "unreadable", "line": line[:200].decode("utf-8", "replace")})
        return events


def append_event(output_dir: str | os.PathLike, event: str, **data: Any) -> None:
    """Add one event from outside the trainer (the supervisor's 'cancelled' / 'failed'), so a reload sees it."""
    path = Path(output_dir) / EVENTS_FILE
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"event": event, "time": time.time(), **_clean(data)}, default=str) + "\n")


def read_events(path: str | os.PathLike) -> list[dict[str, Any]]:
    return EventFollower(Path(path)).poll()
