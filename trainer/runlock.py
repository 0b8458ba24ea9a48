"""One training run per output folder: a lock file with the owner's pid, host and start time.

The Train LoRA node takes the lock before it writes run.json and launches; the trainer's rank 0 takes
it at start-up (or, launched by the node, adopts the node's lock through FLUX2LORA_RUN_LOCK_TOKEN and
adds its own pid). A second run on the same folder is refused with a message naming the holder.

The lock file appears atomically with its whole content (written to a temporary file, then hard-linked
into place, which fails if the lock exists), so a reader never sees a half-written lock. A lock whose
processes are all gone from this host (pid not alive, or alive but started after the lock: a reused
pid) is stale and taken over; a lock from another host is never judged stale, since its pids cannot be
checked from here: the message says which file to delete if that run is gone.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LOCK_FILE = ".run.lock"
TOKEN_ENV = "FLUX2LORA_RUN_LOCK_TOKEN"
"""Set by the node for the trainer it launches: the trainer then shares the node's lock."""


class RunLockedError(ValueError):
    """Another live run holds the output folder."""


def _hostname() -> str:
    return socket.gethostname()


def _process_start(pid: int) -> int | None:
    """Start time of a process in clock ticks since boot (Linux), to tell a reused pid from the original."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 22; the command name (field 2) may contain spaces and parentheses, so split after its ')'.
    try:
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (IndexError, ValueError):
        return None


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host (never signals it)."""
    if pid <= 0:
        return False
    if os.name == "nt":
        return _pid_alive_windows(pid)
    try:
        os.kill(pid, 0)  # signal 0: existence check only
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    # A killed process whose parent died too can stay a zombie where nothing reaps orphans (containers).
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


def _pid_alive_windows(pid: int) -> bool:
    import ctypes

    kernel32 = ctypes.windll.kernel32  # type: ignore[attr-defined]
    handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
    if not handle:
        return kernel32.GetLastError() == 5  # access denied: it exists
    try:
        code = ctypes.c_ulong()
        kernel32.GetExitCodeProcess(handle, ctypes.byref(code))
        return code.value == 259  # STILL_ACTIVE
    finally:
        kernel32.CloseHandle(handle)


def _owner_record(owner: str, token: str) -> dict[str, Any]:
    pid = os.getpid()
    return {"pids": [{"pid": pid, "start": _process_start(pid), "role": owner}], "hostname": _hostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %z"), "started_unix": time.time(), "owner": owner,
            "token": token}


def read_lock(path: Path) -> dict[str, Any] | None:
    """The lock's content; None when there is no lock. A lock that is not our JSON raises (never guessed at)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        data = json.loads(text)
        pids = [(int(p["pid"]), p.get("start")) for p in data["pids"]]
        str(data["hostname"])
    except (ValueError, KeyError, TypeError) as exc:
        raise RunLockedError(
            f"output folder {path.parent} has a lock file {path} that this trainer cannot read ({type(exc).__name__}); "
            f"if no training run uses that folder, delete {path}."
        ) from None
    data["_pids"] = pids
    return data


def lock_is_stale(data: dict[str, Any]) -> bool:
    if data["hostname"] != _hostname():
        return False
    for pid, start in data["_pids"]:
        if pid_alive(pid) and (start is None or _process_start(pid) in (None, start)):
            return False
    return True


def _describe(data: dict[str, Any]) -> str:
    pids = ", ".join(str(pid) for pid, _ in data["_pids"])
    return f"{data.get('owner', 'a run')} (pid {pids} on host {data['hostname']}, started {data.get('started', '?')})"


@dataclass
class RunLock:
    """A held (or, for a launched trainer, shared) lock; release() removes it if this process took it."""

    path: Path
    token: str
    owned: bool

    def release(self) -> None:
        if not self.owned:
            return
        try:
            data = read_lock(self.path)
        except RunLockedError:
            return
        if data is not None and data.get("token") == self.token:
            self.path.unlink(missing_ok=True)
        self.owned = False

    def __enter__(self) -> RunLock:  # noqa: PYI034
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _write_new(path: Path, record: dict[str, Any]) -> None:
    tmp = path.with_name(f"{LOCK_FILE}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    tmp.write_text(json.dumps(record), encoding="utf-8")
    try:
        os.link(tmp, path)  # atomic create-if-absent, with the content already in place
    finally:
        tmp.unlink(missing_ok=True)


def _adopt(path: Path, data: dict[str, Any], *, owner: str) -> None:
    """Add this process to a lock taken by its launcher, so the lock stays live while this process runs."""
    record = {k: v for k, v in data.items() if not k.startswith("_")}
    record["pids"] = list(record["pids"]) + [{"pid": os.getpid(), "start": _process_start(os.getpid()), "role": owner}]
    tmp = path.with_name(f"{LOCK_FILE}.{os.getpid()}.adopt.tmp")
    tmp.write_text(json.dumps(record), encoding="utf-8")
    os.replace(tmp, path)


def acquire_run_lock(run_dir: str | os.PathLike, *, owner: str, token: str | None = None) -> RunLock:
    """Take the run folder's lock, or share it when `token` matches the holder's; refuse a live other holder.

    Raises RunLockedError (a ValueError) naming the holder and the lock file.
    """
    run_dir = Path(run_dir)
    path = run_dir / LOCK_FILE
    for _ in range(5):
        data = read_lock(path)
        if data is not None and token is not None and data.get("token") == token:
            _adopt(path, data, owner=owner)
            return RunLock(path=path, token=token, owned=False)
        if data is not None:
            if not lock_is_stale(data):
                raise RunLockedError(
                    f"output folder {run_dir} is in use by {_describe(data)}: two runs must not write into one "
                    f"folder. Wait for that run to finish or cancel it; if it is no longer running, delete {path}."
                )
            # Stale: move it aside first, so of two processes taking it over only one succeeds.
            aside = path.with_name(f"{LOCK_FILE}.stale.{os.getpid()}.{secrets.token_hex(4)}")
            try:
                os.rename(path, aside)
            except FileNotFoundError:
                continue
            moved = json.loads(aside.read_text(encoding="utf-8"))
            if moved.get("token") != data.get("token"):
                # Another process replaced the stale lock after we read it: that lock is live; put it back.
                try:
                    os.link(aside, path)
                except FileExistsError:
                    pass
                aside.unlink(missing_ok=True)
                continue
            aside.unlink(missing_ok=True)
        new_token = token or secrets.token_hex(16)
        try:
            _write_new(path, _owner_record(owner, new_token))
        except FileExistsError:
            continue  # someone else took it between our read and our link: look again
        return RunLock(path=path, token=new_token, owned=True)
    raise RunLockedError(f"output folder {run_dir}: could not take the lock {path}; another run keeps taking it.")


def exit_with_parent() -> None:
    """Under torchrun: die when the launcher dies, even by kill -9 (Linux).

    torchrun starts each rank in a session of its own, so a kill -9 of torchrun's process group leaves the
    ranks running, writing into the run folder that the next run then finds locked or changing. The kernel's
    parent-death signal ends a rank with its launcher. Elsewhere (macOS, Windows) this does nothing.
    """
    if os.environ.get("TORCHELASTIC_RUN_ID"):
        die_with_parent()


def die_with_parent() -> None:
    """Arm the kernel's parent-death signal (SIGKILL) for this process, or exit now if the parent is already gone.
    Linux only; elsewhere nothing."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(1, int(signal.SIGKILL), 0, 0, 0) != 0:  # PR_SET_PDEATHSIG
        return
    if os.getppid() != parent:  # the launcher died before the signal was armed
        os._exit(1)
