"""Starting, following and stopping a training run as its own process group (torchrun, or one process).

run.py (the launcher of the Train LoRA node and of `train --num-processes`) is only a supervisor: it builds
the torchrun argument list here, starts it in a new process group (session on POSIX, CREATE_NEW_PROCESS_GROUP
on Windows), follows events.jsonl, and on Cancel stops the whole group so no rank is left behind.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .events import EVENTS_FILE, EventFollower
from .failures import summarize_errors

PACK_ROOT = Path(__file__).resolve().parents[1]
LOG_FILE = "train.log"


class TrainingFailed(RuntimeError):
    """The trainer exited with an error; the message quotes the log tail."""


class TrainingCancelled(RuntimeError):
    """The user cancelled; the run folder keeps the last checkpoint."""


def torchrun_command(
    *,
    config_path: str | os.PathLike,
    nproc_per_node: int = 1,
    nnodes: int = 1,
    node_rank: int = 0,
    rdzv_endpoint: str | None = None,
    rdzv_id: str = "flux2-lora",
    python: str | None = None,
) -> list[str]:
    """The torchrun argument list (run from the pack root, so `-m trainer` resolves)."""
    if nproc_per_node < 1:
        raise ValueError(f"num_processes must be >= 1, got {nproc_per_node}.")
    if nnodes < 1 or not 0 <= node_rank < nnodes:
        raise ValueError(f"node_rank must be in [0, nnodes); got node_rank={node_rank}, nnodes={nnodes}.")
    cmd = [python or sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc_per_node)]
    if nnodes == 1:
        cmd += ["--standalone"]
    else:
        if not rdzv_endpoint:
            raise ValueError("multi-node runs need rdzv_endpoint (host:port of node 0), e.g. 10.0.0.1:29500.")
        cmd += ["--nnodes", str(nnodes), "--node_rank", str(node_rank), "--rdzv_backend", "c10d",
                "--rdzv_endpoint", rdzv_endpoint, "--rdzv_id", rdzv_id]
    cmd += ["-m", "trainer", *trainer_argv(config_path)]
    return cmd


def trainer_argv(config_path: str | os.PathLike) -> list[str]:
    """The trainer's own arguments (after `python -m trainer`) for a prepared run.json."""
    return ["train", "--config", str(config_path)]


def trainer_command(*, config_path: str | os.PathLike, num_processes: int, python: str | None = None) -> list[str]:
    """What run_training starts on this machine: torchrun for several processes; for one, the trainer itself.
    torchrun would add an interpreter that imports torch and an agent process that one process does not need
    (1.30-1.34x the direct launch on the tiny model, bench/vs_diffusers_example.py --torchrun): the launcher
    already stops the whole group on Cancel, and the trainer reports its own errors as events."""
    if num_processes == 1:
        return [python or sys.executable, "-m", "trainer", *trainer_argv(config_path)]
    return torchrun_command(config_path=config_path, nproc_per_node=num_processes, python=python)


def command_text(cmd: list[str], *, cwd: Path = PACK_ROOT) -> str:
    """The command as a user pastes it into a shell (display only; never executed through a shell)."""
    return f"cd {shlex.quote(str(cwd))} && {shlex.join(cmd)}"


def export_instructions(*, config_path: Path, num_processes: int) -> str:
    """How to run a prepared run.json on a cluster: the torchrun commands for one node and for several."""
    single = command_text(torchrun_command(config_path=config_path, nproc_per_node=num_processes))
    multi = command_text(torchrun_command(config_path=config_path, nproc_per_node=num_processes, nnodes=2,
                                          node_rank=0, rdzv_endpoint="NODE0_HOST:29500"))
    return (
        f"run.json: {config_path}\n"
        f"One node ({num_processes} processes):\n  {single}\n"
        f"Several nodes (run on each node with its --node_rank; NODE0_HOST is node 0's address):\n  {multi}\n"
        f"Copy the pack folder ({PACK_ROOT.name}), the model and the dataset folders to the same paths on the cluster, "
        "or edit run.json. Afterwards use launch=attach with the run folder."
    )


def trainer_env(*, cwd: Path = PACK_ROOT, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a trainer process (and of the warm worker that forks trainers)."""
    full_env = dict(os.environ)
    full_env.setdefault("OMP_NUM_THREADS", "1")
    full_env["PYTHONUNBUFFERED"] = "1"
    # The pack root, not ComfyUI's cwd, must come first so `-m trainer` is ours.
    full_env["PYTHONPATH"] = os.pathsep.join([str(cwd)] + [p for p in [full_env.get("PYTHONPATH")] if p])
    if extra:
        full_env.update(extra)
    return full_env


def start_warm_trainer() -> None:
    """ComfyUI start-up: start the warm worker that runs fork from (trainer/warm_worker.py)."""
    from . import warm_worker

    warm_worker.start_worker(env=trainer_env(), cwd=PACK_ROOT)


@dataclass
class TrainingProcess:
    """A started trainer process group: torchrun's, a cold trainer's or one forked by the warm worker."""

    popen: subprocess.Popen | Any  # warm_worker.WarmRun when forked: pid, poll() and wait() as Popen's
    run_dir: Path
    log_path: Path
    warm: bool = False

    @classmethod
    def start(cls, cmd: list[str], *, run_dir: Path, env: dict[str, str] | None = None,
              cwd: Path = PACK_ROOT, warm_argv: list[str] | None = None,
              warm_processes: int = 1) -> "TrainingProcess":
        """Start `cmd`; or, given warm_argv (the trainer's arguments of `cmd`, which runs warm_processes processes on
        this machine), fork it from the warm worker when one is running and agrees (trainer/warm_worker.py), else
        start `cmd` cold."""
        run_dir.mkdir(parents=True, exist_ok=True)
        log_path = run_dir / LOG_FILE
        full_env = trainer_env(cwd=cwd, extra=env)
        if warm_argv is not None:
            from .warm_worker import current_worker

            worker = current_worker()
            forked = worker.start_run(argv=warm_argv, cwd=cwd, env=full_env, log_path=log_path,
                                      processes=warm_processes) if worker else None
            if forked is not None:
                return cls(popen=forked, run_dir=run_dir, log_path=log_path, warm=True)
        kwargs: dict[str, Any] = {}
        if os.name == "nt":
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP  # type: ignore[attr-defined]
        else:
            kwargs["start_new_session"] = True
        with open(log_path, "ab") as log_fh:
            popen = subprocess.Popen(cmd, cwd=str(cwd), env=full_env, stdout=log_fh, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, **kwargs)
        return cls(popen=popen, run_dir=run_dir, log_path=log_path)

    def poll(self) -> int | None:
        return self.popen.poll()

    def wait(self, timeout: float) -> int | None:
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, *, grace_s: float = 10.0) -> None:
        """Stop every process of the group: a polite signal first, then a kill after grace_s."""
        if self.popen.poll() is not None and os.name == "nt":
            return
        if os.name == "nt":
            try:
                self.popen.send_signal(signal.CTRL_BREAK_EVENT)  # type: ignore[attr-defined]
            except OSError:
                pass
            if self.wait(grace_s) is None:
                subprocess.run(["taskkill", "/F", "/T", "/PID", str(self.popen.pid)], check=False,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                self.wait(grace_s)
            return
        pgid = self.popen.pid  # start_new_session made it the group leader
        try:
            os.killpg(pgid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            if self.wait(0.2) is not None and not _group_alive(pgid):
                return
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.wait(grace_s)

    def log_tail(self, *, lines: int = 40) -> str:
        try:
            data = self.log_path.read_bytes()[-20000:]
        except OSError:
            return ""
        return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def supervise(
    proc: TrainingProcess,
    *,
    on_event: Callable[[dict[str, Any]], None],
    should_cancel: Callable[[], bool],
    poll_interval_s: float = 0.25,
) -> list[dict[str, Any]]:
    """Follow the run until it ends; returns all events. Raises TrainingCancelled or TrainingFailed."""
    follower = EventFollower(proc.run_dir / EVENTS_FILE, offset=_size(proc.run_dir / EVENTS_FILE))
    seen: list[dict[str, Any]] = []

    def drain() -> None:
        for event in follower.poll():
            seen.append(event)
            on_event(event)

    try:
        while True:
            drain()
            if should_cancel():
                proc.stop()
                drain()
                raise TrainingCancelled(f"training cancelled; checkpoints stay in {proc.run_dir}")
            code = proc.wait(poll_interval_s)
            if code is not None:
                drain()
                break
    except BaseException:
        if proc.poll() is None:
            proc.stop()
        raise
    if code != 0 or not any(e.get("event") == "end" for e in seen):
        errors = [e for e in seen if e.get("event") == "error"]
        # The first error is the root cause: a rank that crashed writes it before the others notice.
        reason = summarize_errors(errors) if errors else f"exit code {code}"
        raise TrainingFailed(
            f"training failed: {reason}\nrun folder: {proc.run_dir}\n--- last lines of {proc.log_path.name} ---\n"
            f"{proc.log_tail()}"
        )
    return seen


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0
