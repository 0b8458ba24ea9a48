"""One run per output folder: the lock file refuses a live second run and takes over a stale one."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from flux2_lora_pack.trainer import runlock


def _lock_data(folder: Path) -> dict:
    return json.loads((folder / runlock.LOCK_FILE).read_text(encoding="utf-8"))


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    pid = int(proc.stdout)
    assert not runlock.pid_alive(pid)
    return pid


def _write_lock(folder: Path, *, pid: int, hostname: str | None = None, start=None, token: str = "t0") -> None:
    record = {"pids": [{"pid": pid, "start": start, "role": "trainer"}], "hostname": hostname or socket.gethostname(),
              "started": "2026-01-01 00:00:00 +0000", "owner": "trainer", "token": token}
    (folder / runlock.LOCK_FILE).write_text(json.dumps(record), encoding="utf-8")


def test_a_second_run_is_refused_naming_pid_host_start_and_lock_file(tmp_path):
    lock = runlock.acquire_run_lock(tmp_path, owner="first run")
    data = _lock_data(tmp_path)
    assert [p["pid"] for p in data["pids"]] == [os.getpid()]
    assert data["hostname"] == socket.gethostname() and data["started"] and data["owner"] == "first run"
    expected = (rf"in use by first run \(pid {os.getpid()} on host {re.escape(socket.gethostname())}, started .*\).*"
                rf"delete {re.escape(str(tmp_path / runlock.LOCK_FILE))}")
    with pytest.raises(runlock.RunLockedError, match=expected):
        runlock.acquire_run_lock(tmp_path, owner="second run")
    assert _lock_data(tmp_path)["token"] == lock.token  # the refused run changed nothing
    lock.release()
    assert not (tmp_path / runlock.LOCK_FILE).exists()
    with runlock.acquire_run_lock(tmp_path, owner="second run"):
        assert _lock_data(tmp_path)["owner"] == "second run"
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no temporary files left behind


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    _write_lock(tmp_path, pid=_dead_pid())
    with runlock.acquire_run_lock(tmp_path, owner="next run") as lock:
        assert lock.owned and [p["pid"] for p in _lock_data(tmp_path)["pids"]] == [os.getpid()]
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="process start times come from /proc (Linux)")
def test_a_reused_pid_does_not_keep_a_lock_alive(tmp_path):
    # Our pid is alive, but the lock records another start time: the pid was reused, the holder is gone.
    _write_lock(tmp_path, pid=os.getpid(), start=1)
    with runlock.acquire_run_lock(tmp_path, owner="next run") as lock:
        assert lock.owned


def test_a_lock_from_another_host_is_never_judged_stale(tmp_path):
    _write_lock(tmp_path, pid=_dead_pid(), hostname="gpu-node-7")
    with pytest.raises(runlock.RunLockedError, match="on host gpu-node-7"):
        runlock.acquire_run_lock(tmp_path, owner="next run")


def test_an_unreadable_lock_is_refused_not_guessed_at(tmp_path):
    (tmp_path / runlock.LOCK_FILE).write_text("not json", encoding="utf-8")
    with pytest.raises(runlock.RunLockedError, match="cannot read .* delete"):
        runlock.acquire_run_lock(tmp_path, owner="next run")


def test_the_launched_trainer_shares_its_launchers_lock(tmp_path):
    node = runlock.acquire_run_lock(tmp_path, owner="Train LoRA node")
    trainer = runlock.acquire_run_lock(tmp_path, owner="trainer", token=node.token)
    assert not trainer.owned
    assert [p["role"] for p in _lock_data(tmp_path)["pids"]] == ["Train LoRA node", "trainer"]
    trainer.release()
    assert (tmp_path / runlock.LOCK_FILE).exists()  # the node still holds it
    with pytest.raises(runlock.RunLockedError):
        runlock.acquire_run_lock(tmp_path, owner="other", token="wrong-token")
    node.release()
    assert not (tmp_path / runlock.LOCK_FILE).exists()


def test_release_leaves_a_lock_that_another_run_took_over(tmp_path):
    lock = runlock.acquire_run_lock(tmp_path, owner="first")
    _write_lock(tmp_path, pid=os.getpid(), token="someone-else")
    lock.release()
    assert _lock_data(tmp_path)["token"] == "someone-else"


def test_a_lock_held_by_a_live_process_refuses_across_processes(tmp_path):
    code = ("import sys; from trainer import runlock; l = runlock.acquire_run_lock(sys.argv[1], owner='child'); "
            "print('held', flush=True); sys.stdin.readline(); l.release()")
    repo = Path(__file__).resolve().parents[2]
    child = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=repo, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(repo)})
    try:
        assert child.stdout.readline().strip() == "held"
        with pytest.raises(runlock.RunLockedError, match=f"in use by child \\(pid {child.pid} "):
            runlock.acquire_run_lock(tmp_path, owner="parent")
    finally:
        child.stdin.write("\n")
        child.stdin.flush()
        child.wait(timeout=60)
    assert child.returncode == 0
    runlock.acquire_run_lock(tmp_path, owner="parent").release()
