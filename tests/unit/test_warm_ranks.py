"""The warm trainer's rank parent (trainer/warm_worker.py): torchrun's rendezvous variables, and how it waits."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from flux2_lora_pack.trainer import warm_worker
from flux2_lora_pack.trainer.runlock import pid_alive

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the warm trainer forks: Linux only")


def _child(code: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code])


def test_all_ranks_succeeding_is_success():
    assert warm_worker.wait_for_ranks({_child("pass").pid, _child("import time; time.sleep(0.5)").pid}) == 0


def test_the_first_failure_stops_the_others_and_a_stubborn_one_is_killed():
    waiting = _child("import time; time.sleep(60)")
    stubborn = _child("import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\ntime.sleep(60)")
    failing = _child("import sys, time; time.sleep(2); sys.exit(3)")
    started = time.monotonic()
    assert warm_worker.wait_for_ranks({waiting.pid, stubborn.pid, failing.pid}, grace_s=1.0) == 3
    assert time.monotonic() - started < 20
    assert not pid_alive(waiting.pid) and not pid_alive(stubborn.pid)


def test_a_rank_killed_by_a_signal_fails_the_run():
    killed = _child("import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
    assert warm_worker.wait_for_ranks({killed.pid}) == 1


def test_rank_variables_are_torchruns_for_one_node():
    env = warm_worker.rank_env(1, processes=4, port=29511)
    assert env == {"RANK": "1", "LOCAL_RANK": "1", "ROLE_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "4",
                   "ROLE_WORLD_SIZE": "4", "GROUP_RANK": "0", "GROUP_WORLD_SIZE": "1", "ROLE_NAME": "default",
                   "MASTER_ADDR": "localhost", "MASTER_PORT": "29511"}
