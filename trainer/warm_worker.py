"""A warm trainer: one process that imports torch, diffusers, transformers and peft once, then forks the trainer of
each run the Train LoRA node starts on this machine (for several processes, their ranks).

Launch to first step is mostly those imports: on the tiny model they are about 85 % of it, for us and for
diffusers' own example alike (bench/README.md). ComfyUI starts this worker when it loads the pack, so by the
time Run is pressed the imports are done; a forked trainer starts where a cold one would be after ten seconds. The
fork is the whole trainer as `python -m trainer train` runs it, in a session of its own (Cancel stops its group
as before), writing the run's train.log, with the run's environment and folder. A run of several processes forks
a parent that forks the ranks with torchrun's rendezvous variables and, like torchrun's agent, stops the others
when one fails; each rank dies with that parent. Nothing of a run stays in the
worker: it never touches a GPU or runs a model, so every fork starts from the same clean state.

A run is forked only when that is safe and equal to a cold start: Linux (fork), the worker alive and
single-threaded with CUDA uninitialised, and the run's environment equal to the one the worker imported under
(variables read at import time would otherwise differ). Otherwise run.py starts the trainer cold, as before.
Set FLUX2LORA_WARM_TRAINER=0 to never start the worker.

Protocol: a Unix socket in a private folder (mode 0700). A client writes one JSON line {"argv", "cwd", "env",
"log", "processes"} and reads {"pid": N} or {"error": "..."}, then {"exit": code} when that trainer ends.

    python -m trainer.warm_worker --socket PATH --parent PID      (started by start_worker, not by users)
"""

from __future__ import annotations

import argparse
import atexit
import importlib
import json
import logging
import os
import select
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from .nvml_facts import answered_from_nvml, read_gpu_facts
from .runlock import TOKEN_ENV, die_with_parent, pid_alive

log = logging.getLogger(__name__)

ENABLE_ENV = "FLUX2LORA_WARM_TRAINER"
PER_RUN_ENV = (TOKEN_ENV,)
"""Variables that differ from run to run and are read after the fork."""
PRELOAD: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("torch", ()),
    ("diffusers", ("Flux2Transformer2DModel", "AutoencoderKLFlux2", "FlowMatchEulerDiscreteScheduler")),
    ("transformers", ("Mistral3ForConditionalGeneration", "Qwen3ForCausalLM", "AutoTokenizer",
                      "PreTrainedTokenizerFast")),
    ("peft", ("LoraConfig",)),
    ("trainer.__main__", ()),
    ("trainer.loop", ()),
    ("trainer.cache_fill", ()),
    ("trainer.lora_fused", ()),
)
"""Modules (and lazily loaded attributes) every training run imports."""


# ---------------------------------------------------------------------------------------------------- the worker


def _preload() -> None:
    """Import PRELOAD with GPU queries answered from NVML (nvml_facts.py: torchao's module-level capability checks
    would otherwise initialise CUDA here, and no run could be forked on a GPU machine)."""
    with answered_from_nvml(read_gpu_facts()):
        _import_preload()


def _import_preload() -> None:
    for module_name, attributes in PRELOAD:
        module = importlib.import_module(module_name)
        for attribute in attributes:
            getattr(module, attribute, None)  # diffusers and transformers import their classes on first access


def _fork_refusal() -> str | None:
    """Why forking now would not give a clean trainer, or None."""
    import torch

    if threading.active_count() != 1:
        return f"the worker runs {threading.active_count()} threads"
    if torch.cuda.is_initialized():
        return "CUDA was initialised in the worker"
    try:  # the driver, once loaded (even by a device count), does not survive a fork
        if "libcuda.so" in Path("/proc/self/maps").read_text():
            return "the CUDA driver was loaded in the worker"
    except OSError:
        return "cannot read /proc/self/maps"
    return None


def _run_forked(request: dict) -> None:
    """In the forked child: become the run's trainer process, or for several processes the parent of its ranks
    (as torchrun's agent is); never returns."""
    _live_and_exit(lambda: _start_run(request))


def _start_run(request: dict) -> int:
    os.setsid()  # its own process group: Cancel stops it and whatever it starts
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    out = os.open(request["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(out, 1)
    os.dup2(out, 2)
    os.chdir(request["cwd"])
    # The worker's environment equals the run's (checked), plus what the imports set in it, as in a cold process.
    for key in PER_RUN_ENV:
        os.environ.pop(key, None)
    os.environ.update({k: v for k, v in request["env"].items() if k in PER_RUN_ENV})
    processes = int(request.get("processes", 1))
    if processes == 1:
        return _run_trainer(request["argv"])
    _show_as(f"{sys.executable} -m trainer.warm_worker: parent of {processes} ranks of "
             f"{shlex.join(['-m', 'trainer', *request['argv']])}")
    return _run_ranks(request["argv"], processes=processes)


def _live_and_exit(life: Callable[[], int]) -> None:
    """A forked process's whole life: exit with life()'s code, SystemExit's, or 1 after printing the traceback (the
    run's log gets it, like a cold process's); never returns."""
    code = 1
    try:
        code = life()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # noqa: BLE001
        traceback.print_exc()
    finally:
        _exit(code)


def _run_trainer(argv: list[str]) -> int:
    import trainer.__main__ as entry

    _show_as(shlex.join([sys.executable, "-m", "trainer", *argv]))  # as ps shows a cold trainer
    sys.argv = [entry.__file__, *argv]  # as `python -m trainer` sets it
    return int(entry.main(argv) or 0)


def _show_as(title: str) -> None:
    """The process's command line in ps and /proc (a fork would otherwise show the worker's)."""
    import setproctitle

    setproctitle.setproctitle(title)


def _exit(code: int) -> None:
    try:
        atexit._run_exitfuncs()  # what a normal interpreter exit runs (trackers flush there)
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


def rank_env(rank: int, *, processes: int, port: int) -> dict[str, str]:
    """What torchrun --standalone gives rank `rank` of one node (without its elastic agent's variables)."""
    return {"RANK": str(rank), "LOCAL_RANK": str(rank), "ROLE_RANK": str(rank), "WORLD_SIZE": str(processes),
            "LOCAL_WORLD_SIZE": str(processes), "ROLE_WORLD_SIZE": str(processes), "GROUP_RANK": "0",
            "GROUP_WORLD_SIZE": "1", "ROLE_NAME": "default", "MASTER_ADDR": "localhost", "MASTER_PORT": str(port)}


def _run_ranks(argv: list[str], *, processes: int) -> int:
    """Fork the ranks of a one-node run and wait for them as torchrun's agent does: when one fails, stop the others.
    Returns 0, or the exit code of the first rank that failed."""
    with socket.socket() as probe:  # rank 0's store listens here (torchrun --standalone also picks a free port)
        probe.bind(("localhost", 0))
        port = probe.getsockname()[1]
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")  # as torchrun sets it
    ranks = set()
    for rank in range(processes):
        pid = os.fork()
        if pid == 0:
            _live_and_exit(lambda: _run_rank(argv, rank=rank, processes=processes, port=port))
        ranks.add(pid)
    return wait_for_ranks(ranks)


def _run_rank(argv: list[str], *, rank: int, processes: int, port: int) -> int:
    die_with_parent()  # a rank never outlives its parent (kill -9 of the group included)
    os.environ.update(rank_env(rank, processes=processes, port=port))
    return _run_trainer(argv)


def wait_for_ranks(pids: set[int], *, grace_s: float = 10.0) -> int:
    """Wait for child processes; after the first one that fails, SIGTERM the rest and SIGKILL them after grace_s.
    Returns 0 when all succeeded, else the first failure's exit code (1 for a signal)."""
    pids, code, deadline = set(pids), 0, None
    while pids:
        for pid in list(pids):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done == 0:
                continue
            pids.discard(pid)
            exit_code = os.waitstatus_to_exitcode(status)
            if exit_code != 0 and code == 0:
                code = exit_code if exit_code > 0 else 1
                _signal_all(pids, signal.SIGTERM)
                deadline = time.monotonic() + grace_s
        if pids and deadline is not None and time.monotonic() > deadline:
            _signal_all(pids, signal.SIGKILL)
            deadline = None
        if pids:
            time.sleep(0.05)
    return code


def _signal_all(pids: set[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _handle(conn: socket.socket, base_env: dict[str, str], waiting: dict[int, socket.socket],
            listener: socket.socket) -> None:
    conn.settimeout(10)
    try:
        request = json.loads(conn.makefile("r", encoding="utf-8").readline())
        env = {k: v for k, v in request["env"].items() if k not in PER_RUN_ENV}
        refusal = _fork_refusal() or (None if env == base_env else "the run's environment differs from the worker's")
        if refusal:
            conn.sendall((json.dumps({"error": refusal}) + "\n").encode())
            conn.close()
            return
    except (OSError, ValueError, KeyError, TypeError) as exc:
        conn.close()
        log.warning("warm trainer: bad request: %s", exc)
        return
    pid = os.fork()
    if pid == 0:
        for inherited in (listener, conn, *waiting.values()):  # launchers must see EOF when the worker goes
            inherited.close()
        _run_forked(request)
    conn.sendall((json.dumps({"pid": pid}) + "\n").encode())
    waiting[pid] = conn


def _reap(waiting: dict[int, socket.socket]) -> None:
    while waiting:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        conn = waiting.pop(pid, None)
        if conn is not None:
            try:
                conn.sendall((json.dumps({"exit": os.waitstatus_to_exitcode(status)}) + "\n").encode())
            except OSError:
                pass  # the launcher is gone; the run folder has the outcome
            conn.close()


def serve(socket_path: Path, *, parent: int) -> int:
    """Import everything, then fork a trainer per request until the parent process (ComfyUI) is gone."""
    base_env = {k: v for k, v in os.environ.items() if k not in PER_RUN_ENV}  # before the imports add theirs
    started = time.monotonic()
    _preload()
    refusal = _fork_refusal()
    print(f"warm trainer: imports done in {time.monotonic() - started:.1f} s; "
          + (f"runs will start cold: {refusal}" if refusal else "ready to fork runs"), flush=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(socket_path))  # bound only now: a client that can connect finds the imports done
    listener.listen(8)
    waiting: dict[int, socket.socket] = {}
    try:
        while os.getppid() == parent:
            readable, _, _ = select.select([listener], [], [], 0.5)
            if readable:
                conn, _ = listener.accept()
                _handle(conn, base_env, waiting, listener)
            _reap(waiting)
    finally:
        listener.close()
        socket_path.unlink(missing_ok=True)
        if os.getppid() != parent:  # ComfyUI ended without stopping it (killed): nobody will read worker.log
            shutil.rmtree(socket_path.parent, ignore_errors=True)
    return 0


# ---------------------------------------------------------------------------------------------------- the launcher side


class WarmRun:
    """A trainer forked by the worker, with the part of subprocess.Popen that launch.py uses."""

    def __init__(self, conn: socket.socket, pid: int) -> None:
        self.pid, self.returncode = pid, None
        self._conn: socket.socket | None = conn
        self._buffer = b""

    def poll(self) -> int | None:
        return self.wait(0.0, raise_timeout=False)

    def wait(self, timeout: float | None = None, *, raise_timeout: bool = True) -> int | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.returncode is None:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if self._conn is not None:
                readable, _, _ = select.select([self._conn], [], [], min(left, 0.5) if left is not None else 0.5)
                if readable:
                    self._read()
            elif not pid_alive(self.pid):  # the worker went first: the exit code is lost, the run folder tells
                self.returncode = 0
            else:
                time.sleep(min(left, 0.2) if left is not None else 0.2)
            if self.returncode is None and deadline is not None and time.monotonic() >= deadline:
                if raise_timeout:
                    raise subprocess.TimeoutExpired("warm trainer", timeout)
                return None
        return self.returncode

    def _read(self) -> None:
        chunk = self._conn.recv(4096)
        self._buffer += chunk
        if b"\n" in self._buffer:
            self.returncode = int(json.loads(self._buffer.split(b"\n")[0]).get("exit", 1))
        if b"\n" in self._buffer or not chunk:
            self._conn.close()
            self._conn = None


class WarmWorker:
    """The worker process, seen from ComfyUI."""

    def __init__(self, popen: subprocess.Popen, socket_path: Path, env: dict[str, str]) -> None:
        self.popen, self.socket_path = popen, socket_path
        self.env = {k: v for k, v in env.items() if k not in PER_RUN_ENV}

    def ready(self) -> bool:
        return self.popen.poll() is None and self.socket_path.exists()

    def start_run(self, *, argv: list[str], cwd: Path, env: dict[str, str], log_path: Path,
                  processes: int = 1) -> WarmRun | None:
        """Fork a trainer for `argv` (with `processes` > 1: a parent that forks that many ranks on this machine, as
        torchrun --standalone would start them), or None (then start it cold) when the worker is not ready or
        refuses."""
        if not self.ready():
            log.info("warm trainer: not ready (still importing, or exited: %s); starting the trainer cold",
                     self.socket_path.parent / "worker.log")
            return None
        changed = sorted(k for k in {*env, *self.env} - set(PER_RUN_ENV) if env.get(k) != self.env.get(k))
        if changed:
            log.info("warm trainer: the environment changed since it started (%s); starting the trainer cold",
                     ", ".join(changed))
            return None
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            conn.settimeout(30)
            conn.connect(str(self.socket_path))
            request = {"argv": argv, "cwd": str(cwd), "env": env, "log": str(log_path), "processes": processes}
            conn.sendall((json.dumps(request) + "\n").encode())
            reply = json.loads(conn.makefile("r", encoding="utf-8").readline() or "{}")
        except (OSError, ValueError) as exc:
            conn.close()
            log.warning("warm trainer: no answer (%s); starting the trainer cold", exc)
            return None
        if "pid" not in reply:
            conn.close()
            log.info("warm trainer: %s; starting the trainer cold", reply.get("error", "no pid"))
            return None
        conn.settimeout(None)
        return WarmRun(conn, int(reply["pid"]))

    def stop(self) -> None:
        """Stop the worker (runs it forked keep going, as cold ones would) and remove its folder."""
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)
        shutil.rmtree(self.socket_path.parent, ignore_errors=True)


_worker: WarmWorker | None = None


def enabled() -> bool:
    return sys.platform == "linux" and os.environ.get(ENABLE_ENV, "1") != "0"


def start_worker(*, env: dict[str, str], cwd: Path, python: str | None = None) -> WarmWorker | None:
    """Start the worker (once per process; again if it died) with the environment cold trainers get."""
    global _worker
    if not enabled():
        return None
    if _worker is not None and _worker.popen.poll() is None:
        return _worker
    folder = Path(tempfile.mkdtemp(prefix="flux2-lora-warm-"))  # mode 0700: only this user can connect
    socket_path = folder / "trainer.sock"
    cmd = [python or sys.executable, "-m", "trainer.warm_worker", "--socket", str(socket_path),
           "--parent", str(os.getpid())]
    with open(folder / "worker.log", "ab") as worker_log:  # why it exited, if it does (an import that failed)
        popen = subprocess.Popen(cmd, cwd=str(cwd), env=env, stdin=subprocess.DEVNULL, stdout=worker_log,
                                 stderr=subprocess.STDOUT, start_new_session=True)
    _worker = WarmWorker(popen, socket_path, env)
    atexit.register(_worker.stop)
    log.info("warm trainer: started (pid %d); runs fork from it once its imports are done", popen.pid)
    return _worker


def current_worker() -> WarmWorker | None:
    return _worker


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="The warm trainer (started by ComfyUI; see trainer/warm_worker.py).")
    parser.add_argument("--socket", type=Path, required=True)
    parser.add_argument("--parent", type=int, required=True)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    return serve(args.socket, parent=args.parent)


if __name__ == "__main__":
    sys.exit(main())
