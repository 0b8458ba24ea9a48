"""Faults a long run must survive, injected into real trainer processes (torchrun, gloo, CPU).

Faults come from FLUX2LORA_FAULT (trainer/faults.py, test-only): a rank pauses at an exact point (mid-step,
mid-checkpoint-write, model load, validation) and the test kill -9s it or its whole process group; or a rank
raises, hangs, produces a NaN loss, runs out of memory or hits a full disk. Each test asserts what the user
gets: which checkpoint survives, where the run resumes, that the final LoRA equals an unkilled run's, and
what the error says.
"""

from __future__ import annotations

import collections
import importlib
import json
import os
import re
import select
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from flux2_lora_pack.trainer import checkpoint as ckpt
from flux2_lora_pack.trainer.events import read_events
from flux2_lora_pack.trainer.faults import FAULT_DIR_ENV, FAULT_ENV
from flux2_lora_pack.trainer.launch import (
    TrainingCancelled,
    TrainingFailed,
    TrainingProcess,
    supervise,
    torchrun_command,
)
from flux2_lora_pack.trainer.runlock import LOCK_FILE

GUARD_S = 600
"""A guard against a hang, not a timing assertion: a run still going after this is cancelled and fails."""


def start_run(config: dict, *, nproc: int, fault: str | None = None, fault_dir: Path | None = None) -> TrainingProcess:
    out = Path(config["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    path = out / "run.json"
    path.write_text(json.dumps(config), encoding="utf-8")
    env = {FAULT_ENV: fault, FAULT_DIR_ENV: str(fault_dir)} if fault else {}
    return TrainingProcess.start(torchrun_command(config_path=path, nproc_per_node=nproc), run_dir=out, env=env)


def follow(proc: TrainingProcess, *, when=None) -> tuple[list[dict], BaseException | None]:
    """Supervise the run to its end; `when` is polled like the Cancel button and may act. Returns events, error."""
    seen: list[dict] = []
    guard = time.monotonic() + GUARD_S

    def should_cancel() -> bool:
        if when is not None:
            when()
        return time.monotonic() > guard

    try:
        supervise(proc, on_event=seen.append, should_cancel=should_cancel)
    except TrainingCancelled as err:
        if time.monotonic() > guard:
            pytest.fail(f"the run did not end within {GUARD_S} s:\n{proc.log_tail()}")
        return seen, err
    except TrainingFailed as err:
        return seen, err
    return seen, None


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")  # a zombie is dead, only not yet reaped


def run_processes(proc: TrainingProcess) -> list[int]:
    """torchrun and every live process under it. torchrun starts each rank in a session of its own, so the
    ranks are not in torchrun's process group: they are found as its descendants."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int(Path(entry, "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            parents.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [proc.popen.pid]
    while todo:
        pid = todo.pop()
        if alive(pid):
            found.append(pid)
        todo.extend(parents.get(pid, []))
    return found


def wait_dead(pids: list[int], *, guard_s: float = 60) -> list[int]:
    """Wait (on pidfds: woken by the exit, no polling) until the processes are gone; returns those still alive."""
    guard = time.monotonic() + guard_s
    for pid in pids:
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            continue
        try:
            select.select([fd], [], [], max(0.0, guard - time.monotonic()))
        finally:
            os.close(fd)
    return [pid for pid in pids if alive(pid)]


def kill_at(marker: Path, proc: TrainingProcess, *, what: str):
    """When the paused process has written its marker, kill -9: "rank" (that process), "launcher group"
    (torchrun's process group, as `kill -9 -PGID` or a supervisor's last resort does), or "everything" (every
    process of the run at once, as a power cut or the OOM killer of a container would).

    Returns (act, seen): seen[0] is the paused pid, seen[1:] every process of the run at that moment.
    """
    seen: list[int] = []

    def act() -> None:
        if not seen and marker.exists():
            seen.append(int(marker.read_text()))
            seen.extend(run_processes(proc))
            if what == "rank":
                os.kill(seen[0], signal.SIGKILL)
            elif what == "launcher group":
                os.killpg(proc.popen.pid, signal.SIGKILL)
            else:
                for pid in seen[1:]:
                    os.kill(pid, signal.SIGKILL)

    return act, seen


def complete_checkpoints(out: Path) -> list[int]:
    """Steps of the checkpoints that pass the full sha256 check."""
    return [step for step, path in ckpt.list_checkpoints(out) if ckpt.is_complete(path)]


def start_step(events: list[dict]) -> int:
    [start] = [e for e in events if e["event"] == "start"]
    return start["start_step"]


def errors(events: list[dict]) -> list[dict]:
    return [e for e in events if e["event"] == "error"]


def assert_same_lora(a: Path, b: Path) -> None:
    with safe_open(str(a), "pt") as fa, safe_open(str(b), "pt") as fb:
        assert set(fa.keys()) == set(fb.keys())
        for key in fa.keys():  # noqa: SIM118 - safe_open has keys(), not __contains__
            # Same samples, same noise, same optimizer state after resume: equal up to float summation order.
            torch.testing.assert_close(fa.get_tensor(key), fb.get_tensor(key), rtol=0, atol=1e-6)


def kill_config(runs, tiny_model_dir, square_dataset, out: Path) -> dict:
    return runs.run_config(tiny_model_dir, square_dataset, out, max_train_steps=6, checkpointing_steps=2,
                           checkpoints_total_limit=2, distributed="ddp", resume_from_checkpoint="latest")


@pytest.fixture(scope="module")
def unkilled(runs, tiny_model_dir, square_dataset, tmp_path_factory) -> Path:
    """The run every killed-and-resumed run must end equal to: 2 ranks (DDP), 6 steps, never interrupted."""
    out = tmp_path_factory.mktemp("unkilled") / "run"
    _, err = follow(start_run(kill_config(runs, tiny_model_dir, square_dataset, out), nproc=2))
    assert err is None, err
    return out


# ------------------------------------------------------------------------------------------------ kill -9


def test_kill_9_of_one_rank_mid_step_and_mid_checkpoint_then_resume_equals_unkilled(
        runs, tiny_model_dir, square_dataset, tmp_path, unkilled):
    out, faults = tmp_path / "run", tmp_path / "faults"
    faults.mkdir()
    config = kill_config(runs, tiny_model_dir, square_dataset, out)

    # 1. kill -9 rank 1 in the middle of step 3 (after its backward, before the optimizer step).
    proc = start_run(config, nproc=2, fault="rank1:step3:pause", fault_dir=faults)
    act, killed = kill_at(faults / "rank1-step3.pid", proc, what="rank")
    events, err = follow(proc, when=act)
    assert killed and isinstance(err, TrainingFailed)
    assert len(killed) == 4 and wait_dead(killed) == []  # torchrun stopped rank 0 (and itself) too
    assert complete_checkpoints(out) == [2] and not (out / "lora.safetensors").exists()

    # 2. Resume; kill -9 rank 0 while it writes checkpoint-4 (state file written, no COMPLETE marker yet).
    proc = start_run(config, nproc=2, fault="rank0:ckpt4:pause", fault_dir=faults)
    act, killed = kill_at(faults / "rank0-ckpt4.pid", proc, what="rank")
    events, err = follow(proc, when=act)
    assert killed and isinstance(err, TrainingFailed) and wait_dead(killed) == []
    assert start_step(events) == 2  # killed in step 3: one checkpoint interval at most is lost
    [partial] = list(out.glob(".checkpoint-4.tmp-*"))
    assert (partial / ckpt.STATE_FILE).is_file() and not (partial / ckpt.MARKER_FILE).exists()
    assert complete_checkpoints(out) == [2] and not (out / "checkpoint-4").exists()

    # 3. Resume to the end: the half-written checkpoint is never loaded, and the LoRA is the unkilled run's.
    events, err = follow(start_run(config, nproc=2))
    assert err is None, err
    assert start_step(events) == 2
    assert_same_lora(out / "lora.safetensors", unkilled / "lora.safetensors")
    assert complete_checkpoints(out) == [4, 6] and not list(out.glob(".checkpoint-*"))  # leftovers cleaned
    assert not (out / LOCK_FILE).exists()


@pytest.mark.slow  # about 60-85 s; the one-rank kill -9 test below the same fixture stays in the default run
def test_kill_9_of_the_whole_group_mid_step_and_mid_checkpoint_then_resume_equals_unkilled(
        runs, tiny_model_dir, square_dataset, tmp_path, unkilled):
    out, faults = tmp_path / "run", tmp_path / "faults"
    faults.mkdir()
    config = kill_config(runs, tiny_model_dir, square_dataset, out)

    # 1. kill -9 torchrun's process group in the middle of step 5: the ranks (in sessions of their own) die
    #    with it, by the parent-death signal each rank arms at start-up.
    proc = start_run(config, nproc=2, fault="rank0:step5:pause", fault_dir=faults)
    act, killed = kill_at(faults / "rank0-step5.pid", proc, what="launcher group")
    events, err = follow(proc, when=act)
    assert killed and isinstance(err, TrainingFailed)
    assert len(killed) == 4 and killed[0] in killed[1:]  # the paused rank; torchrun and both ranks
    assert wait_dead(killed) == []
    assert complete_checkpoints(out) == [2, 4]
    # Nobody released the lock: it names a dead process, so the next run takes it over.
    assert killed[0] in [p["pid"] for p in json.loads((out / LOCK_FILE).read_text())["pids"]]

    # 2. Resume; kill -9 every process of the run at once while checkpoint-6 is being written.
    proc = start_run(config, nproc=2, fault="rank0:ckpt6:pause", fault_dir=faults)
    act, killed = kill_at(faults / "rank0-ckpt6.pid", proc, what="everything")
    events, err = follow(proc, when=act)
    assert killed and isinstance(err, TrainingFailed) and len(killed) == 4 and wait_dead(killed) == []
    assert start_step(events) == 4
    assert complete_checkpoints(out) == [2, 4] and len(list(out.glob(".checkpoint-6.tmp-*"))) == 1

    # 3. Resume to the end from checkpoint-4.
    events, err = follow(start_run(config, nproc=2))
    assert err is None, err
    assert start_step(events) == 4
    assert_same_lora(out / "lora.safetensors", unkilled / "lora.safetensors")
    assert complete_checkpoints(out) == [4, 6] and not list(out.glob(".checkpoint-*"))


def test_a_checkpoint_damaged_after_it_was_written_is_skipped_not_loaded(unkilled, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(unkilled, out)
    newest = out / "checkpoint-6"
    data = bytearray((newest / ckpt.STATE_FILE).read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: the sha256 in COMPLETE no longer matches
    (newest / ckpt.STATE_FILE).write_bytes(bytes(data))
    assert ckpt.resolve_resume(out, "latest") == out / "checkpoint-4"
    with pytest.raises(ValueError, match="incomplete or corrupt; it was not loaded"):
        ckpt.load_checkpoint(newest)
    with pytest.raises(ValueError, match="resume_from_checkpoint: .* corrupt"):
        ckpt.resolve_resume(out, "checkpoint-6")


def test_the_space_estimate_covers_what_a_run_writes(unkilled, tiny_model_dir):
    from flux2_lora_pack.trainer.config import TrainConfig
    from flux2_lora_pack.trainer.model_files import inspect_model_folder
    from flux2_lora_pack.trainer.preflight import estimate_run_bytes, lora_size

    config = TrainConfig.from_json(unkilled / "run.json")
    size = lora_size(inspect_model_folder(tiny_model_dir), lora=config.lora)
    estimate = estimate_run_bytes(lora_numel=size.numel, max_train_steps=6, checkpointing_steps=2,
                                  checkpoints_total_limit=2, existing_checkpoints=0, validation_images=0,
                                  validation_pixels=0)
    written = max(sum(f.stat().st_size for f in p.iterdir()) for p in unkilled.glob("checkpoint-*"))
    assert written <= estimate.checkpoint_bytes < 4 * written + (1 << 20)
    lora = (unkilled / "lora.safetensors").stat().st_size
    assert lora <= estimate.lora_bytes and estimate.checkpoints_at_peak == 3


def test_lora_header_of_a_trained_run_holds_no_absolute_paths(unkilled):
    with safe_open(str(unkilled / "lora.safetensors"), "pt") as fh:
        meta = fh.metadata()
    for key, value in meta.items():
        assert str(unkilled.parent) not in value and not value.strip('"').startswith("/"), (key, value)


# ------------------------------------------------------------------------------------------- a rank fails


def test_a_rank_that_raises_is_named_and_the_others_do_not_hang(runs, tiny_model_dir, square_dataset, tmp_path):
    out = tmp_path / "run"
    config = runs.run_config(tiny_model_dir, square_dataset, out, max_train_steps=6, checkpointing_steps=2,
                             distributed="ddp")
    events, err = follow(start_run(config, nproc=2, fault="rank1:step3:raise", fault_dir=tmp_path))
    assert isinstance(err, TrainingFailed)
    first = errors(events)[0]  # the root cause is written first
    assert (first["rank"], first["step"], first["kind"]) == (1, 3, "error")
    assert first["message"].startswith("InjectedFault: injected fault at step3 on rank 1")
    text = str(err)
    assert text.startswith("training failed: rank 1: InjectedFault: injected fault at step3 on rank 1")
    assert "checkpoint-2" in text and "--- last lines of train.log ---" in text
    assert "InjectedFault" in text.split("--- last lines of train.log ---")[1]  # the log tail shows the traceback
    assert complete_checkpoints(out) == [2]


def test_a_hung_rank_ends_the_run_after_the_collective_timeout(runs, tiny_model_dir, square_dataset, tmp_path):
    out, faults = tmp_path / "run", tmp_path / "faults"
    faults.mkdir()
    config = runs.run_config(tiny_model_dir, square_dataset, out, max_train_steps=6, checkpointing_steps=2,
                             distributed="ddp", collective_timeout_s=10)
    proc = start_run(config, nproc=2, fault="rank1:step3:pause", fault_dir=faults)
    processes: list[int] = []
    marker = faults / "rank1-step3.pid"
    events, err = follow(proc, when=lambda: processes or not marker.exists() or processes.extend(run_processes(proc)))
    assert isinstance(err, TrainingFailed)
    [report] = errors(events)
    assert (report["rank"], report["step"], report["kind"]) == (0, 3, "distributed")
    assert "collective_timeout_s=10 s" in report["message"] and "another rank crashed or hung" in report["message"]
    assert "rank 0: a collective operation failed at step 3" in str(err)
    hung = int(marker.read_text())
    assert len(processes) == 3 and hung in processes and wait_dead(processes) == []  # torchrun stopped the hung rank


# ------------------------------------------------------------------------------------------ NaN, OOM, disk


def _batch_files(manifest_path: Path, *, step: int, batch_size: int = 1, seed: int = 1) -> list[str]:
    from flux2_lora_pack.trainer.manifest import load_manifest
    from flux2_lora_pack.trainer.sampler import BucketBatchSampler

    manifest = load_manifest(manifest_path)
    batches = BucketBatchSampler(manifest, batch_size=batch_size, seed=seed).iter_batches()
    for _ in range(step - 1):
        next(batches)
    return [str(manifest.image_path(i)) for i in next(batches).indices]


def test_nan_loss_stops_naming_step_and_images_and_keeps_the_last_checkpoint(
        runs, tiny_model_dir, square_dataset, tmp_path):
    out = tmp_path / "run"
    config = runs.run_config(tiny_model_dir, square_dataset, out, max_train_steps=5, checkpointing_steps=2)
    events, err = follow(start_run(config, nproc=1, fault="rank*:step3:nan", fault_dir=tmp_path))
    assert isinstance(err, TrainingFailed)
    [report] = errors(events)
    assert (report["kind"], report["step"], report["last_checkpoint"]) == ("non_finite_loss", 3, "checkpoint-2")
    files = _batch_files(square_dataset, step=3)
    assert f"loss is nan at step 3 (rank 0's batch: {', '.join(files)})" in report["message"]
    assert [e["step"] for e in events if e["event"] == "step"] == [1, 2]  # detected within the step
    assert complete_checkpoints(out) == [2] and not (out / "lora.safetensors").exists()
    assert str(err).startswith("training failed: rank 0: loss is nan at step 3")


def test_nan_loss_with_skip_batch_skips_that_step_and_finishes(runs, tiny_model_dir, square_dataset, tmp_path):
    out = tmp_path / "run"
    config = runs.run_config(tiny_model_dir, square_dataset, out, max_train_steps=4, nan_policy="skip_batch")
    events, err = follow(start_run(config, nproc=1, fault="rank*:step3:nan", fault_dir=tmp_path))
    assert err is None, err
    steps = {e["step"]: e for e in events if e["event"] == "step"}
    assert sorted(steps) == [1, 2, 3, 4]
    assert steps[3]["applied"] is False and steps[3]["loss"] == "nan"
    assert all(steps[s]["applied"] is True and isinstance(steps[s]["loss"], float) for s in (1, 2, 4))
    with safe_open(str(out / "lora.safetensors"), "pt") as fh:
        assert all(torch.isfinite(fh.get_tensor(k)).all() for k in fh.keys())  # noqa: SIM118


@pytest.mark.parametrize("nan_policy", ["stop", "skip_batch"])
def test_nan_gradient_with_a_finite_loss_is_caught_before_the_optimizer_step(
        runs, tiny_model_dir, square_dataset, tmp_path, nan_policy):
    out = tmp_path / "run"
    config = runs.run_config(tiny_model_dir, square_dataset, out, max_train_steps=4, checkpointing_steps=2,
                             nan_policy=nan_policy, max_grad_norm=0.0 if nan_policy == "stop" else 1.0)
    events, err = follow(start_run(config, nproc=1, fault="rank*:step3:nangrad", fault_dir=tmp_path))
    steps = {e["step"]: e for e in events if e["event"] == "step"}
    if nan_policy == "stop":
        assert isinstance(err, TrainingFailed)
        [report] = errors(events)
        assert (report["kind"], report["step"], report["last_checkpoint"]) == ("non_finite_loss", 3, "checkpoint-2")
        assert re.match(r"gradient norm is nan with a finite loss \d+\.\d{5} at step 3 \(rank 0's batch: ",
                        report["message"])
        assert sorted(steps) == [1, 2] and not (out / "lora.safetensors").exists()
        return
    assert err is None, err
    assert sorted(steps) == [1, 2, 3, 4]
    assert steps[3]["applied"] is False and isinstance(steps[3]["loss"], float)  # the loss itself was finite
    with safe_open(str(out / "lora.safetensors"), "pt") as fh:
        assert all(torch.isfinite(fh.get_tensor(k)).all() for k in fh.keys())  # noqa: SIM118


def test_out_of_memory_names_step_peak_memory_and_the_keys_that_save_memory(
        runs, tiny_model_dir, square_dataset, tmp_path):
    out = tmp_path / "run"
    config = runs.run_config(tiny_model_dir, square_dataset, out, max_train_steps=4, train_batch_size=2)
    events, err = follow(start_run(config, nproc=1, fault="rank0:step2:oom", fault_dir=tmp_path))
    assert isinstance(err, TrainingFailed)
    [report] = errors(events)
    assert (report["kind"], report["step"]) == ("out_of_memory", 2)
    message = report["message"]
    assert re.match(r"out of memory at step 2 on rank 0 \(peak process memory \(RSS\) \d+\.\d\d GiB\)", message)
    for key in ("gradient_checkpointing: true", 'base_model_precision: "int8-quanto"', "enable_group_offload: true",
                "train_batch_size (now 2", "gradient_accumulation_steps", "resolution", "tread_config",
                'mixed_precision: "bf16"', 'distributed: "fsdp2"'):
        assert key in message, key
    assert "CUDA out of memory" in message  # the original error is quoted


def test_a_write_error_while_checkpointing_stops_with_the_path_and_keeps_earlier_checkpoints(
        runs, tiny_model_dir, square_dataset, tmp_path):
    out = tmp_path / "run"
    config = runs.run_config(tiny_model_dir, square_dataset, out, max_train_steps=6, checkpointing_steps=2)
    events, err = follow(start_run(config, nproc=1, fault="rank0:ckpt4:enospc", fault_dir=tmp_path))
    assert isinstance(err, TrainingFailed)
    [report] = errors(events)
    assert (report["kind"], report["step"], report["phase"]) == ("disk", 4, "checkpoint")
    assert re.search(rf"cannot write {re.escape(str(out))}/\.checkpoint-4\.tmp-\d+/state\.safetensors during "
                     r"checkpoint \(step 4\): No space left on device", report["message"])
    assert "free disk space" in report["message"] and "checkpoint-2" in report["message"]
    assert complete_checkpoints(out) == [2] and not list(out.glob(".checkpoint-*"))  # the partial write is gone


# ----------------------------------------------------------------------- before training: space, writable


def _env():
    from flux2_lora_pack.trainer.parallelize import DistEnv

    return DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


@pytest.fixture
def no_weights(monkeypatch):
    from flux2_lora_pack.trainer import (  # imported first: inference binds these names at import
        inference,
        model_files,
    )

    def forbidden(*args, **kwargs):
        raise AssertionError("weights loaded before the output folder was checked")

    for name in ("load_transformer", "load_text_encoder", "load_vae"):
        monkeypatch.setattr(model_files, name, forbidden)
        monkeypatch.setattr(inference, name, forbidden)


def test_too_little_free_space_is_refused_before_any_weights_load(runs, tiny_model_dir, square_dataset, tmp_path,
                                                                   monkeypatch, no_weights):
    from flux2_lora_pack.trainer import preflight
    from flux2_lora_pack.trainer.config import TrainConfig
    from flux2_lora_pack.trainer.loop import train

    out = tmp_path / "run"
    config = TrainConfig.from_dict(runs.run_config(tiny_model_dir, square_dataset, out, max_train_steps=100,
                                                   checkpointing_steps=1, checkpoints_total_limit=None))
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda path: usage(10 << 20, 9 << 20, 1 << 20))
    with pytest.raises(ValueError, match=rf"output_dir {re.escape(str(out))} has 1.0 MiB free, but this run needs "
                                         r"about [\d.]+ [MG]iB \(100 x [\d.]+ MiB checkpoints \+ .* LoRA file"):
        train(config, env=_env())
    assert not list(out.glob("checkpoint-*")) and not (out / LOCK_FILE).exists()
    [report] = errors(read_events(out / "events.jsonl"))
    assert "has 1.0 MiB free" in report["message"]


@pytest.fixture
def small_mount(tmp_path):
    """A real 1 MiB filesystem (tmpfs); skipped where this user may not mount."""
    mounts = []

    def make(name: str, *, read_only: bool) -> Path:
        point = tmp_path / name
        point.mkdir()
        options = "size=1m" + (",ro" if read_only else "")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True,
                              check=False)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.decode(errors='replace').strip()}")
        mounts.append(point)
        return point

    yield make
    for point in mounts:
        subprocess.run(["umount", str(point)], check=False)


def test_a_small_real_filesystem_is_refused_before_training(runs, tiny_model_dir, square_dataset, small_mount,
                                                            no_weights):
    from flux2_lora_pack.trainer.config import TrainConfig
    from flux2_lora_pack.trainer.loop import train

    out = small_mount("small", read_only=False) / "run"
    config = TrainConfig.from_dict(runs.run_config(tiny_model_dir, square_dataset, out, max_train_steps=10,
                                                   checkpointing_steps=2))
    with pytest.raises(ValueError, match=rf"output_dir {re.escape(str(out))} has 1.0 MiB free, but this run needs"):
        train(config, env=_env())


@pytest.mark.parametrize("where", ["read-only filesystem", "a file where a folder belongs"])
def test_an_unwritable_output_folder_is_refused_naming_it(runs, tiny_model_dir, square_dataset, tmp_path, where,
                                                         small_mount, no_weights):
    from flux2_lora_pack.trainer.config import TrainConfig
    from flux2_lora_pack.trainer.loop import train

    if where == "read-only filesystem":
        out = small_mount("ro", read_only=True) / "run"
        reason = "Read-only file system"
    else:
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "run"
        reason = "Not a directory"
    config = TrainConfig.from_dict(runs.run_config(tiny_model_dir, square_dataset, out))
    with pytest.raises(ValueError, match=rf"output_dir {re.escape(str(out))} is not writable \({reason}\)"):
        train(config, env=_env())


# --------------------------------------------------------------------------------------------- run lock


def test_the_trainer_refuses_an_output_folder_another_run_holds(runs, tiny_model_dir, square_dataset, tmp_path,
                                                               no_weights):
    from flux2_lora_pack.trainer.config import TrainConfig
    from flux2_lora_pack.trainer.loop import train
    from flux2_lora_pack.trainer.runlock import RunLockedError, acquire_run_lock

    out = tmp_path / "run"
    out.mkdir()
    config = TrainConfig.from_dict(runs.run_config(tiny_model_dir, square_dataset, out))
    with acquire_run_lock(out, owner="another run"):
        with pytest.raises(RunLockedError, match=rf"output folder {re.escape(str(out))} is in use by another run "
                                                 rf"\(pid {os.getpid()} on host"):
            train(config, env=_env())
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # nothing written next to the other run


@pytest.fixture
def node_env(nodes, model_spec, dataset, comfy_root):
    widgets = dict(
        output_name="faults", max_train_steps=4, learning_rate=1e-3, lora_rank=4, lora_alpha=2.0,
        flux_lora_target="all", train_batch_size=1, gradient_accumulation_steps=1, mixed_precision="no",
        gradient_checkpointing=False, flux_guidance_value=1.0, caption_dropout_probability=0.0, seed=3,
        checkpointing_steps=2, checkpoints_total_limit=2, validation_prompt="a red square on a white background",
        validation_steps=2, distributed="none", launch="run", num_processes=1,
        extra_config_json='{"validation_resolution": "64", "validation_num_inference_steps": 2}')

    def train(**overrides):
        return nodes.Flux2TrainLora().train(model_spec, dataset, **{**widgets, **overrides})

    return nodes, train, comfy_root / "output" / "flux2_lora" / "runs"


def test_the_node_refuses_a_run_folder_another_run_holds(node_env, pack):
    _, train, runs_root = node_env
    runlock = importlib.import_module(f"{pack.__name__}.trainer.runlock")
    train(launch="export")  # creates the run folder and run.json, takes and releases the lock
    [run_dir] = runs_root.iterdir()
    before = (run_dir / "run.json").stat().st_mtime_ns
    with runlock.acquire_run_lock(run_dir, owner="a CLI run"), pytest.raises(ValueError, match="is in use by a CLI run"):
        train()
    assert (run_dir / "run.json").stat().st_mtime_ns == before and not (run_dir / "train.log").exists()


def test_cancel_during_model_load_and_validation_leaves_no_process_and_the_next_run_resumes(
        node_env, pack, monkeypatch, tmp_path):
    train = node_env[1]
    bridge = importlib.import_module(f"{pack.__name__}.nodes.comfy_bridge")
    launch = importlib.import_module(f"{pack.__name__}.trainer.launch")
    started: list = []
    original = launch.TrainingProcess.start.__func__

    def recording_start(cls, *args, **kwargs):
        started.append(original(cls, *args, **kwargs))
        return started[-1]

    monkeypatch.setattr(launch.TrainingProcess, "start", classmethod(recording_start))
    monkeypatch.setenv(FAULT_DIR_ENV, str(tmp_path))
    for point in ("load", "validation2"):
        marker = tmp_path / f"rank0-{point}.pid"
        monkeypatch.setenv(FAULT_ENV, f"rank0:{point}:pause")
        processes: list[int] = []

        def cancel_now(marker: Path = marker, processes: list[int] = processes) -> bool:
            # The user presses Cancel once the run reached that point.
            if marker.exists() and not processes:
                processes.extend(run_processes(started[-1]))
            return bool(processes)

        monkeypatch.setattr(bridge, "interrupted", cancel_now)
        with pytest.raises(KeyboardInterrupt, match="Train LoRA cancelled; resume by pressing Run again"):
            train()
        proc = started[-1]
        assert int(marker.read_text()) in processes and wait_dead(processes) == []  # no process of the run is left
        run_dir = proc.run_dir
        cancelled = read_events(run_dir / "events.jsonl")[-1]
        assert cancelled["event"] == "cancelled"  # not "failed": the node reports a cancel, not an error
        where = "starts over" if point == "load" else "resumes from checkpoint-2"
        assert where in cancelled["message"]  # the run folder says where the next run resumes
        assert not (run_dir / LOCK_FILE).exists()  # released: the next queued run may start
    assert complete_checkpoints(run_dir) == [2]  # cancelled while validating after step 2's checkpoint
    monkeypatch.delenv(FAULT_ENV)
    monkeypatch.setattr(bridge, "interrupted", lambda: False)
    lora = train()["result"][0]
    assert Path(lora.path).is_file()
    last_start = [e for e in read_events(run_dir / "events.jsonl") if e["event"] == "start"][-1]
    assert last_start["start_step"] == 2
