"""The warm trainer (trainer/warm_worker.py): one-process runs forked from a worker whose imports are done train
exactly as a cold start does, Cancel stops them, and a run the worker cannot serve safely starts cold."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import pytest
import torch
from flux2_lora_pack.trainer import warm_worker
from flux2_lora_pack.trainer.__main__ import main
from flux2_lora_pack.trainer.events import read_events
from flux2_lora_pack.trainer.launch import (
    PACK_ROOT,
    TrainingProcess,
    start_warm_trainer,
    trainer_argv,
    trainer_env,
)
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
    proc.stop(grace_s=10)
    assert proc.poll() is not None and not pid_alive(proc.popen.pid)
    assert worker.ready()
    # A run whose environment differs from the worker's (read at import time there) is not forked.
    assert worker.start_run(argv=trainer_argv(config), cwd=PACK_ROOT, env=trainer_env(extra={"HF_HUB_OFFLINE": "0"}),
                            log_path=out / "other.log") is None
