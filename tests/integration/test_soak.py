"""Soak: a 500-step tiny run with checkpoints every 20 steps, validation every 100 and a Cancel + resume in the
middle. The loss curve joins up, rotation leaves exactly the newest checkpoints, and the trainer's open files
and memory stay flat (sampled from /proc on every event batch).

Stated bounds, after a warm-up of 40 steps (first checkpoint written) in each attempt:
- open file descriptors vary by at most FD_SPREAD (a checkpoint or image being written is open meanwhile);
- resident memory grows by at most RSS_GROWTH_MIB: the median of the attempt's last RSS_WINDOW samples against
  the median of its first RSS_WINDOW samples after the first validation. Medians, because RSS moves by +-40 MiB
  from one step to the next on a flat run (allocator caching), so one low first sample made a max-minus-first
  measure fail without any leak; a single sample may still rise at most RSS_SPIKE_MIB above that start.
"""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

import pytest

from flux2_lora_pack.trainer import checkpoint as ckpt
from flux2_lora_pack.trainer.events import read_events
from flux2_lora_pack.trainer.launch import (
    TrainingCancelled,
    TrainingProcess,
    supervise,
    torchrun_command,
)
from flux2_lora_pack.trainer.runlock import LOCK_FILE

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="samples /proc (Linux)")]

TOTAL = 500
CANCEL_AFTER = 250
FD_SPREAD = 4
RSS_GROWTH_MIB = 64
RSS_WINDOW = 20
RSS_SPIKE_MIB = 128


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
    return out


class Monitor:
    """Samples the rank's open files and resident memory whenever events arrive."""

    def __init__(self, proc: TrainingProcess) -> None:
        self.proc = proc
        self.rank_pid: int | None = None
        self.step = 0
        self.samples: list[tuple[int, int, int]] = []
        """(step, open fds, RSS in KiB)."""
        self.events: list[dict] = []

    def on_event(self, event: dict) -> None:
        self.events.append(event)
        if event.get("event") == "step":
            self.step = int(event["step"])
        if self.rank_pid is None:
            workers = _children(self.proc.popen.pid)
            self.rank_pid = workers[0] if len(workers) == 1 else None
        if self.rank_pid is None:
            return
        try:
            fds = len(os.listdir(f"/proc/{self.rank_pid}/fd"))
            status = Path(f"/proc/{self.rank_pid}/status").read_text()
        except OSError:
            return  # the rank is exiting
        rss = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")))
        self.samples.append((self.step, fds, rss))

    def steps(self) -> dict[int, float]:
        return {e["step"]: e["loss"] for e in self.events if e["event"] == "step"}

    def check_flat(self, *, warm_step: int, rss_from_step: int) -> tuple[int, float]:
        warm = [s for s in self.samples if s[0] >= warm_step]
        assert len(warm) >= 5, self.samples
        fds = [s[1] for s in warm]
        spread = max(fds) - min(fds)
        assert spread <= FD_SPREAD, warm
        rss = [s[2] for s in self.samples if s[0] >= rss_from_step]
        assert len(rss) >= 2 * RSS_WINDOW, self.samples
        start = statistics.median(rss[:RSS_WINDOW])
        growth_mib = (statistics.median(rss[-RSS_WINDOW:]) - start) / 1024
        assert growth_mib <= RSS_GROWTH_MIB, self.samples
        assert (max(rss) - start) / 1024 <= RSS_SPIKE_MIB, self.samples
        return spread, growth_mib


def _start(config: dict) -> TrainingProcess:
    out = Path(config["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "run.json").write_text(json.dumps(config), encoding="utf-8")
    return TrainingProcess.start(torchrun_command(config_path=out / "run.json", nproc_per_node=1), run_dir=out)


def test_500_steps_with_cancel_and_resume_join_up_rotate_and_stay_flat(runs, tiny_model_dir, square_dataset, tmp_path):
    out = tmp_path / "soak"
    config = runs.run_config(
        tiny_model_dir, square_dataset, out, max_train_steps=TOTAL, learning_rate=1e-4, checkpointing_steps=20,
        checkpoints_total_limit=3, validation_prompt="a red square on a white background", validation_steps=100,
        validation_resolution="64", validation_num_inference_steps=2, resume_from_checkpoint="latest")

    first = Monitor(proc := _start(config))
    with pytest.raises(TrainingCancelled):
        supervise(proc, on_event=first.on_event, should_cancel=lambda: first.step >= CANCEL_AFTER)
    a = first.steps()
    cancelled_at = max(a)
    assert sorted(a) == list(range(1, cancelled_at + 1))
    kept = [step for step, _ in ckpt.list_checkpoints(out)]
    last = cancelled_at // 20 * 20
    assert kept == [last - 40, last - 20, last]

    second = Monitor(proc := _start(config))
    supervise(proc, on_event=second.on_event, should_cancel=lambda: False)
    b = second.steps()
    [start] = [e for e in second.events if e["event"] == "start"]
    assert start["start_step"] == last and sorted(b) == list(range(last + 1, TOTAL + 1))
    # The curve joins up: the steps run twice (after the last checkpoint, before the cancel) give the same loss.
    for step in range(last + 1, cancelled_at + 1):
        assert abs(a[step] - b[step]) < 1e-5, (step, a[step], b[step])
    assert set(a) | set(b) == set(range(1, TOTAL + 1))

    assert [step for step, _ in ckpt.list_checkpoints(out)] == [460, 480, 500]
    assert not list(out.glob(".checkpoint-*")) and not (out / LOCK_FILE).exists()
    images = sorted(p.name for p in (out / "validation").iterdir())
    assert images == [f"step{s:06d}_validation_prompt.png" for s in (100, 200, 300, 400, 500)]
    validated = [e["step"] for e in read_events(out / "events.jsonl") if e["event"] == "validation"]
    assert validated == [100, 200, 300, 400, 500]

    spread_a, growth_a = first.check_flat(warm_step=40, rss_from_step=110)
    spread_b, growth_b = second.check_flat(warm_step=last + 40, rss_from_step=max(last + 40, 310))
    print(f"soak: fd spread {spread_a}/{spread_b}, RSS growth {growth_a:.1f}/{growth_b:.1f} MiB, "
          f"samples {len(first.samples)}/{len(second.samples)}")
