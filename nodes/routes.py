"""Read-only HTTP routes the Train LoRA chart uses to survive a page reload.

GET /flux2lora/runs                          {"runs": [{"run", "status", "step", "max_train_steps", "updated"}]}
GET /flux2lora/runs/{run}/events             the run's events.jsonl as a JSON list
GET /flux2lora/runs/{run}/events?since=N     {"events": [...], "offset": M, "complete": bool}; complete lines only
GET /flux2lora/runs/{run}/image?path=REL     a PNG/JPEG/WebP inside that run folder

The handlers are plain functions over a runs root, so tests need neither ComfyUI nor a browser.
Every refusal is a 400/404 with {"error": ...}; nothing outside the run folder is ever served.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..trainer.events import EVENTS_FILE

log = logging.getLogger("flux2_lora")

ROUTE_PREFIX = "/flux2lora/runs"
RUN_NAME = re.compile(r"[A-Za-z0-9-][A-Za-z0-9._-]*")
"""Run folder names as Train LoRA makes them (sanitize_name, then '-' and a hash): one path part that
cannot be '.', '..' or hidden, because it never starts with a dot."""
MAX_RUN_NAME = 128
IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp"}
EVENTS_CHUNK_BYTES = 4 << 20
"""Most bytes one ?since= answer reads; the client asks again from the returned offset."""
_STATUS_TAIL_BYTES = 64 << 10
_KNOWN_EVENTS = ("start", "step", "validation", "checkpoint", "end", "error", "cancelled", "failed")
_FINAL_STATUS = {"end": "finished", "error": "failed", "failed": "failed", "cancelled": "cancelled"}
"""'cancelled' and 'failed' are what the node sends the browser; read here too should it also log them."""


class RouteError(Exception):
    """A refused request: the HTTP status and a message safe to show in the browser."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def run_folder(runs_root: Path, *, run: str) -> Path:
    """The folder of `run` directly under runs_root; refuses anything else."""
    if not isinstance(run, str) or len(run) > MAX_RUN_NAME or not RUN_NAME.fullmatch(run):
        raise RouteError(400, f"run {str(run)[:80]!r} is not a run name (letters, digits, '-', '_', '.').")
    folder = runs_root / run
    try:
        # A symlinked run folder could point anywhere: require it to stay a direct child of the root.
        real = folder.resolve(strict=True)
        root = runs_root.resolve(strict=True)
    except OSError:
        raise RouteError(404, f"run {run!r} does not exist.") from None
    if real.parent != root or not real.is_dir():
        raise RouteError(404, f"run {run!r} does not exist.")
    return real


def _parse_line(line: bytes) -> dict[str, Any]:
    try:
        value = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {"event": "unreadable", "line": line[:200].decode("utf-8", "replace")}
    return value if isinstance(value, dict) else {"event": "unreadable", "line": line[:200].decode("utf-8", "replace")}


def _parse_lines(data: bytes) -> list[dict[str, Any]]:
    return [_parse_line(line) for line in data.split(b"\n") if line.strip()]


def run_events(runs_root: Path, *, run: str) -> list[dict[str, Any]]:
    """Every complete event line of a run (a half-written last line is left for later)."""
    path = run_folder(runs_root, run=run) / EVENTS_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    return _parse_lines(data[: data.rfind(b"\n") + 1])


def run_events_since(runs_root: Path, *, run: str, since: int, max_bytes: int | None = None) -> dict[str, Any]:
    """Complete event lines from byte offset `since`: {"events", "offset" (next since), "complete"}."""
    max_bytes = max_bytes or EVENTS_CHUNK_BYTES
    path = run_folder(runs_root, run=run) / EVENTS_FILE
    try:
        fh = open(path, "rb")
    except FileNotFoundError:
        if since != 0:
            raise RouteError(400, f"since={since} but run {run!r} has no events yet; start from since=0.") from None
        return {"events": [], "offset": 0, "complete": True}
    with fh:
        size = fh.seek(0, 2)
        if since > size:
            raise RouteError(400, f"since={since} is past the end of {EVENTS_FILE} ({size} bytes); start from since=0.")
        if since > 0:
            fh.seek(since - 1)
            if fh.read(1) != b"\n":
                raise RouteError(400, f"since={since} is not at the start of a line; "
                                      "use an offset this route returned.")
        fh.seek(since)
        data = fh.read(max_bytes)
        # One line longer than max_bytes: keep reading to its end rather than return nothing forever.
        while b"\n" not in data and len(data) >= max_bytes:
            more = fh.read(max_bytes)
            if not more:
                break
            data += more
    end = data.rfind(b"\n") + 1
    offset = since + end
    return {"events": _parse_lines(data[:end]), "offset": offset, "complete": offset >= size}


def _tail_events(path: Path) -> list[dict[str, Any]]:
    with open(path, "rb") as fh:
        size = fh.seek(0, 2)
        start = max(0, size - _STATUS_TAIL_BYTES)
        fh.seek(start)
        data = fh.read()
    if start > 0:
        data = data[data.find(b"\n") + 1:]  # drop the line the tail cut in half
    return _parse_lines(data[: data.rfind(b"\n") + 1])


def run_summary(folder: Path) -> dict[str, Any]:
    """Status of one run from the end of its events file: finished, failed, cancelled, incomplete or new."""
    summary: dict[str, Any] = {"run": folder.name, "status": "new", "step": None, "max_train_steps": None,
                               "updated": None}
    path = folder / EVENTS_FILE
    try:
        summary["updated"] = path.stat().st_mtime
        events = _tail_events(path)
    except FileNotFoundError:
        return summary
    known = [e for e in events if e.get("event") in _KNOWN_EVENTS]
    if not known:
        return summary
    last = known[-1]["event"]
    # Without an end/error/cancelled line the run is running now or was killed: the file cannot tell which.
    summary["status"] = _FINAL_STATUS.get(last, "incomplete")
    if summary["status"] == "failed":
        summary["message"] = str(known[-1].get("message", ""))[:2000]
    for event in reversed(known):
        if summary["step"] is None and isinstance(event.get("step"), int):
            summary["step"] = event["step"]
        if summary["max_train_steps"] is None and isinstance(event.get("max_train_steps"), int):
            summary["max_train_steps"] = event["max_train_steps"]
    return summary


def list_runs(runs_root: Path) -> list[dict[str, Any]]:
    """Every run folder under runs_root, most recently updated first."""
    try:
        root = runs_root.resolve(strict=True)
        children = list(root.iterdir())
    except OSError:
        return []
    runs = [
        run_summary(child)
        for child in children
        if len(child.name) <= MAX_RUN_NAME and RUN_NAME.fullmatch(child.name)
        and not child.is_symlink() and child.is_dir()
    ]
    runs.sort(key=lambda r: (r["updated"] or 0.0, r["run"]), reverse=True)
    return runs


def run_image(runs_root: Path, *, run: str, rel_path: str) -> Path:
    """The image file `rel_path` (as a validation event names it) inside the run folder."""
    folder = run_folder(runs_root, run=run)
    if not isinstance(rel_path, str) or not rel_path:
        raise RouteError(400, "path is missing; give the image path from a validation event.")
    shown = rel_path[:200]
    # '%' survives only from double encoding; ':' would be a Windows drive or stream; '\\' a Windows separator.
    if any(c in rel_path for c in ("\\", "\x00", "%", ":")) or any(ord(c) < 32 for c in rel_path):
        raise RouteError(400, f"path {shown!r} has characters a run image path never has.")
    if rel_path.startswith("/"):
        raise RouteError(400, f"path {shown!r} is absolute; give a path relative to the run folder.")
    parts = rel_path.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise RouteError(400, f"path {shown!r} must not contain '.', '..' or empty parts.")
    suffix = Path(parts[-1]).suffix.lower()
    if suffix not in IMAGE_TYPES:
        raise RouteError(400, f"path {shown!r} is not an image ({', '.join(sorted(IMAGE_TYPES))}).")
    try:
        target = folder.joinpath(*parts).resolve(strict=True)
    except OSError:
        raise RouteError(404, f"image {shown!r} does not exist in run {run!r}.") from None
    # resolve() followed any symlink: the real file must still be inside the run folder and be an image.
    if not target.is_relative_to(folder) or target.suffix.lower() not in IMAGE_TYPES or not target.is_file():
        raise RouteError(404, f"image {shown!r} does not exist in run {run!r}.")
    return target


def _parse_since(raw: str | None) -> int | None:
    if raw is None:
        return None
    if not raw.isdigit() or not raw.isascii() or len(raw) > 18:
        raise RouteError(400, f"since {raw[:40]!r} must be a byte offset (a whole number >= 0).")
    return int(raw)


def make_handlers(*, runs_root_fn: Callable[[], Path]) -> dict[str, Callable]:
    """The aiohttp handlers by route path; runs_root_fn is called per request (ComfyUI's output dir may change)."""
    from aiohttp import web

    def guarded(fn: Callable) -> Callable:
        async def handler(request: web.Request) -> web.StreamResponse:
            try:
                return fn(request)
            except RouteError as err:
                return web.json_response({"error": err.message}, status=err.status)
            except Exception:  # never show a traceback to the browser; the server log keeps it
                log.exception("flux2lora route %s failed", request.path)
                return web.json_response({"error": "internal error; see the ComfyUI log."}, status=500)

        return handler

    def runs(request: web.Request) -> web.StreamResponse:
        return web.json_response({"runs": list_runs(runs_root_fn())})

    def events(request: web.Request) -> web.StreamResponse:
        run = request.match_info["run"]
        since = _parse_since(request.query.get("since"))
        if since is None:
            return web.json_response(run_events(runs_root_fn(), run=run))
        return web.json_response(run_events_since(runs_root_fn(), run=run, since=since))

    def image(request: web.Request) -> web.StreamResponse:
        run = request.match_info["run"]
        path = run_image(runs_root_fn(), run=run, rel_path=request.query.get("path", ""))
        return web.FileResponse(path, headers={"Content-Type": IMAGE_TYPES[path.suffix.lower()],
                                               "X-Content-Type-Options": "nosniff"})

    return {
        ROUTE_PREFIX: guarded(runs),
        ROUTE_PREFIX + "/{run}/events": guarded(events),
        ROUTE_PREFIX + "/{run}/image": guarded(image),
    }


def register_routes(routes, *, runs_root_fn: Callable[[], Path]) -> bool:
    """Add the GET routes to an aiohttp RouteTableDef; False (and nothing added) when they are already there."""
    # A reloaded pack (or a second import under another name) must not register twice: aiohttp refuses that.
    existing = {getattr(r, "path", None) for r in routes}
    if ROUTE_PREFIX in existing:
        return False
    for path, handler in make_handlers(runs_root_fn=runs_root_fn).items():
        routes.get(path)(handler)
    return True


def register_with_prompt_server() -> bool:
    """ComfyUI start-up hook: register on PromptServer.instance.routes; False outside a ComfyUI server."""
    try:
        from server import PromptServer  # type: ignore[import-not-found]
    except ImportError:
        return False
    routes = getattr(getattr(PromptServer, "instance", None), "routes", None)
    if routes is None:
        return False
    from .train_nodes import runs_root

    return register_routes(routes, runs_root_fn=runs_root)
