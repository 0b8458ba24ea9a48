"""The warm trainer (trainer/warm_worker.py): one-process runs forked from a worker whose imports are done train
exactly as a cold start does, Cancel stops them, and a run the worker cannot serve safely starts cold."""

from __future__ import annotations

import json
import re
import subprocess
import logging
import sys
import time
from pathlib import Path

import pytest
import torch
from flux2_lora_pack.trainer import warm_worker
from flux2_lora_pack.trainer.__main__ import main
from flux2_lora_pack.trainer.cli_config import load_cli_config
from flux2_lora_pack.trainer.events import read_events
from flux2_lora_pack.trainer.faults import FAULT_ENV
from flux2_lora_pack.trainer.launch import (
    PACK_ROOT,
    TrainingFailed,
    TrainingProcess,
    start_warm_trainer,
    trainer_argv,
    trainer_env,
)
from flux2_lora_pack.trainer.run import run_training
from flux2_lora_pack.trainer.runlock import pid_alive
from safetensors.torch import load_file

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the warm trainer forks: Linux only")

PYTEST_VARIABLE = "PYTEST_CURRENT_TEST"
"""pytest changes it for every test phase; a changed environment (rightly) makes the worker refuse a run, so each
test removes it before it starts one."""


@pytest.fixture(scope="module")
def worker(monkeypatch_module):
    monkeypatch_module.setenv("OMP_NUM_THREADS", "1")
    monkeypatch_module.delenv(PYTEST_VARIABLE, raising=False)
    start_warm_trainer()
    started = warm_worker.current_worker()
    assert started is not None
    deadline = time.monotonic() + 300
    while not started.ready():  # ready once its imports are done and its socket is bound
        assert started.popen.poll() is None, "the warm worker exited"
        assert time.monotonic() < deadline, "the warm worker was not ready after 300 s"
        time.sleep(0.2)
    yield started
    started.stop()
    warm_worker._worker = None


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def _write(config: dict, path: Path) -> Path:
    path.write_text(json.dumps(config), encoding="utf-8")
    return path


def test_a_one_process_run_forks_from_the_worker_and_trains_as_a_cold_start(worker, runs, tiny_model_dir,
                                                                           square_dataset, tmp_path, caplog,
                                                                           monkeypatch):
    monkeypatch.delenv(PYTEST_VARIABLE, raising=False)
    warm_out, cold_out = tmp_path / "warm", tmp_path / "cold"
    config = _write(runs.run_config(tiny_model_dir, square_dataset, warm_out, max_train_steps=3), tmp_path / "w.json")
    with caplog.at_level(logging.INFO):
        assert main(["train", "--config", str(config), "--num-processes", "1"]) == 0
    assert "forked from the warm trainer" in caplog.text
    runs.launch(runs.run_config(tiny_model_dir, square_dataset, cold_out, max_train_steps=3))  # a cold process
    warm_lora, cold_lora = load_file(next(warm_out.glob("*.safetensors"))), load_file(next(cold_out.glob("*.safetensors")))
    assert warm_lora.keys() == cold_lora.keys()
    for key in warm_lora:
        assert torch.equal(warm_lora[key], cold_lora[key]), key
    assert runs.step_losses(warm_out) == runs.step_losses(cold_out)
    assert "LoRA written to" in (warm_out / "train.log").read_text()  # the fork's output went to the run's log
    # the worker says once, at start, whether it can fork (here: yes); on a GPU machine the reason if not
    assert "ready to fork runs" in (worker.socket_path.parent / "worker.log").read_text()


def test_a_two_process_run_forks_its_ranks_and_trains_as_under_torchrun(worker, runs, tiny_model_dir,
                                                                         square_dataset, tmp_path, caplog,
                                                                         monkeypatch):
    monkeypatch.delenv(PYTEST_VARIABLE, raising=False)
    warm_out, cold_out = tmp_path / "warm", tmp_path / "cold"
    settings = {"max_train_steps": 3, "distributed": "ddp"}
    config = _write(runs.run_config(tiny_model_dir, square_dataset, warm_out, **settings), tmp_path / "w.json")
    with caplog.at_level(logging.INFO):
        assert main(["train", "--config", str(config), "--num-processes", "2"]) == 0
    assert "forked from the warm trainer" in caplog.text
    runs.launch(runs.run_config(tiny_model_dir, square_dataset, cold_out, **settings), nproc=2)  # torchrun, cold
    warm_lora, cold_lora = load_file(next(warm_out.glob("*.safetensors"))), load_file(next(cold_out.glob("*.safetensors")))
    assert warm_lora.keys() == cold_lora.keys()
    for key in warm_lora:
        assert torch.equal(warm_lora[key], cold_lora[key]), key
    assert runs.step_losses(warm_out) == runs.step_losses(cold_out)
    starts = [e for e in read_events(warm_out / "events.jsonl") if e["event"] == "start"]
    assert [e["world_size"] for e in starts] == [2]


def test_a_failing_rank_stops_the_others_and_fails_the_run(worker, runs, tiny_model_dir, square_dataset, tmp_path,
                                                            caplog, monkeypatch):
    # The fault is read by the ranks at run time, but the worker forks only runs whose environment equals its own:
    # a worker of its own for this test.
    monkeypatch.delenv(PYTEST_VARIABLE, raising=False)
    monkeypatch.setenv(FAULT_ENV, "rank1:step2:raise")
    monkeypatch.setattr(warm_worker, "_worker", None)
    faulty = warm_worker.start_worker(env=trainer_env(), cwd=PACK_ROOT)
    try:
        deadline = time.monotonic() + 300
        while not faulty.ready():
            assert faulty.popen.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        config = runs.run_config(tiny_model_dir, square_dataset, tmp_path / "faulty", max_train_steps=4,
                                 distributed="ddp")
        started = time.monotonic()
        with caplog.at_level(logging.INFO), pytest.raises(TrainingFailed, match="injected fault"):
            run_training(load_cli_config(str(_write(config, tmp_path / "f.json")), overrides=[]), num_processes=2,
                         owner="test")
        assert time.monotonic() - started < 120  # rank 0, waiting in a collective, was stopped, not timed out
    finally:
        faulty.stop()
    match = re.search(r"\(pid (\d+), forked from the warm trainer\)", caplog.text)
    assert match, caplog.text
    sessions = subprocess.run(["ps", "-e", "-o", "sid="], capture_output=True, text=True, check=True).stdout.split()
    assert match.group(1) not in sessions, "a rank outlived the failed run"


def test_cancel_stops_a_forked_run_and_the_worker_serves_the_next(worker, runs, tiny_model_dir, square_dataset,
                                                                  tmp_path, monkeypatch):
    monkeypatch.delenv(PYTEST_VARIABLE, raising=False)
    out = tmp_path / "long"
    out.mkdir()
    config = _write(runs.run_config(tiny_model_dir, square_dataset, out, max_train_steps=500), out / "run.json")
    cmd = [sys.executable, "-m", "trainer", *trainer_argv(config)]
    proc = TrainingProcess.start(cmd, run_dir=out, warm_argv=trainer_argv(config))
    assert proc.warm
    deadline = time.monotonic() + 120
    while not any(e["event"] == "step" for e in read_events(out / "events.jsonl")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.log_tail()
        time.sleep(0.2)
    # ps shows the fork as the trainer it became, not as the worker it was forked from
    assert Path(f"/proc/{proc.popen.pid}/cmdline").read_bytes().split(b"\0")[0].decode().endswith(
        f"-m trainer train --config {config}")
    proc.stop(grace_s=10)
    assert proc.poll() is not None and not pid_alive(proc.popen.pid)
    assert worker.ready()
    # A run whose environment differs from the worker's (read at import time there) is not forked.
    assert worker.start_run(argv=trainer_argv(config), cwd=PACK_ROOT, env=trainer_env(extra={"HF_HUB_OFFLINE": "0"}),
                            log_path=out / "other.log") is None


def test_the_worker_removes_its_folder_when_comfyui_is_killed(tmp_path):
    # A stand-in for ComfyUI: it starts the worker, then dies by SIGKILL (no atexit runs there).
    parent = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom trainer import launch, warm_worker\nlaunch.start_warm_trainer()\n"
         "print(warm_worker.current_worker().socket_path.parent, flush=True)\ntime.sleep(600)"],
        cwd=PACK_ROOT, env=trainer_env(), stdout=subprocess.PIPE, text=True)
    folder = Path(parent.stdout.readline().strip())
    assert folder.is_dir()
    parent.kill()
    parent.wait(10)
    deadline = time.monotonic() + 300  # the worker notices once its imports are done
    while folder.exists():
        assert time.monotonic() < deadline, f"{folder} is still there"
        time.sleep(0.5)
