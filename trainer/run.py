"""One supervised training run, as the Train LoRA node and `python -m trainer train --num-processes` start it.

run_training takes the run folder's lock, checks memory, writes run.json, reuses a finished run, launches
the trainer (under torchrun for several processes) as its own process group (launch.py), follows its events,
records a cancel or a failure in the run folder and returns the finished run. The caller supplies only the
config and its own plumbing: where events go, how Cancel is polled, what to free before the trainer needs the GPU.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import checkpoint, launch, preflight, runlock
from .events import EVENTS_FILE, append_event, read_events

if TYPE_CHECKING:
    from .config import TrainConfig
    from .inference import Flux2ModelSpec

log = logging.getLogger(__name__)

CONFIG_FILE = "run.json"
MEMORY_ESTIMATE_FILE = "memory_estimate.txt"
"""The memory estimate of run folders written before preflight.json (preflight.PREFLIGHT_FILE) replaced it."""
COMMAND_FILE = "COMMAND.txt"


@dataclass(frozen=True, kw_only=True, slots=True)
class RunResult:
    """A finished run (or, in export mode, a run prepared for a cluster: no LoRA yet)."""

    run_dir: Path
    lora_path: str
    """The trained LoRA file; "" in export mode."""
    info: str
    """What the node shows: run folder, LoRA, steps and final loss; or the cluster command in export mode."""
    events: list[dict[str, Any]] = field(default_factory=list)
    """The run folder's events, earlier cancelled attempts included (they are part of the curve)."""

    @property
    def loss_history(self) -> list[tuple[int, float]]:
        return step_losses(self.events)


def step_losses(events: list[dict[str, Any]]) -> list[tuple[int, float]]:
    """(step, loss) of every step event, in file order."""
    return [(int(e["step"]), float(e["loss"])) for e in events if e.get("event") == "step" and "loss" in e]


def run_identity(*, model: Flux2ModelSpec, fingerprints: Sequence[str], settings: dict[str, Any],
                 num_processes: int) -> str:
    """Hash of everything that changes the trained LoRA: same identity means the same run folder.

    fingerprints are the training datasets' fingerprints, in input order.
    """
    payload = {
        "model": model.folder.identity(),
        "precision": model.precision,
        # One dataset hashes as before, so runs trained before several datasets existed are still reused.
        "dataset": fingerprints[0] if len(fingerprints) == 1 else list(fingerprints),
        "settings": settings,
        "num_processes": num_processes,
    }
    lycoris = settings.get("lycoris_config")  # its contents shape the adapter: an edited file trains again
    if isinstance(lycoris, str) and Path(lycoris).is_file():
        payload["lycoris_config_sha256"] = hashlib.sha256(Path(lycoris).read_bytes()).hexdigest()
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def finished_run(run_dir: Path) -> RunResult | None:
    """The run folder's finished run (its last 'end' event, whose LoRA file exists), else None."""
    events_path = run_dir / EVENTS_FILE
    if not events_path.is_file():
        return None
    events = read_events(events_path)
    ends = [e for e in events if e.get("event") == "end"]
    if not ends:
        return None
    end = ends[-1]
    lora = Path(str(end.get("lora_path", "")))
    if not lora.is_absolute():
        lora = run_dir / lora
    # The file named by an events file is loaded: it must be a LoRA inside this run folder.
    if lora.suffix != ".safetensors" or not lora.is_file() or not lora.resolve().is_relative_to(run_dir.resolve()):
        return None
    history = step_losses(events)
    final = history[-1][1] if history else float("nan")
    info = f"run folder: {run_dir}\nLoRA: {lora}\nsteps: {end.get('step')}  final loss: {final:.5f}"
    info += "".join(f"\n{line}" for line in _preflight_lines(run_dir))
    return RunResult(run_dir=run_dir, lora_path=str(lora), info=info, events=events)


def run_training(
    config: TrainConfig,
    *,
    num_processes: int,
    owner: str,
    export: bool = False,
    reuse_finished: bool = False,
    on_event: Callable[[dict[str, Any]], None] = lambda event: None,
    should_cancel: Callable[[], bool] = lambda: False,
    before_launch: Callable[[], None] = lambda: None,
    interrupts: tuple[type[BaseException], ...] = (KeyboardInterrupt,),
) -> RunResult:
    """Train `config` in its output folder on this machine (torchrun for several processes, launch.trainer_command);
    returns the finished run.

    export: write run.json and the torchrun command for a cluster instead of training. reuse_finished: return the
    folder's finished run, if any, instead of training again (the node's folders are named by the run's identity).
    on_event gets every trainer event, then {"event": "cancelled"} or {"event": "failed", "message"} from here.
    should_cancel is polled while the run goes; an exception of `interrupts` raised meanwhile (Ctrl-C, or ComfyUI's
    interrupt from on_event) cancels as well. Raises TrainingCancelled (the folder keeps the last checkpoint, the
    next run resumes from it), TrainingFailed (with the log tail), or RunLockedError when another run holds the folder.
    """
    config.check_processes(num_processes)  # before anything is written or launched
    if not export:  # an exported run's trackers and optimizer package are installed (or not) on the cluster
        config.trackers.check_installed()
        config.optim.check_installed()
        from .lowp_compute import check_environment

        check_environment(config.quantization.base_model_precision, device=None)  # this machine's GPU, before launch
    # Refuses a run only for memory; the time estimate is shown and recorded, never a reason to refuse.
    checked = preflight.run_preflight(config, num_processes=num_processes, enforce=not export,
                                      start_step=resume_step(config))
    if not export:  # distributed "auto" was decided for this machine's GPUs: run.json gets the choice, every rank reads it
        from .distributed_choice import with_distributed

        config = with_distributed(config, checked.distributed_mode)
    run_dir = config.checkpoint.output_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    # One run per folder: another live run (a second server, a CLI run) is refused before anything is written.
    with runlock.acquire_run_lock(run_dir, owner=owner) as lock:
        config_path = run_dir / CONFIG_FILE
        config.to_json(config_path)
        checked.write(run_dir)

        finished = finished_run(run_dir) if reuse_finished else None
        if finished is not None:
            log.info("Train LoRA: inputs unchanged since run %s; reusing its LoRA", run_dir)
            return finished
        if export:
            text = launch.export_instructions(config_path=config_path, num_processes=num_processes)
            (run_dir / COMMAND_FILE).write_text(text + "\n", encoding="utf-8")
            return RunResult(run_dir=run_dir, lora_path="", info=text)

        # Shown before the first step (the node's panel and progress line; the CLI prints it) and kept for a reload.
        append_event(run_dir, "preflight", **checked.event())
        on_event({"event": "preflight", **checked.event()})
        started = time.time()
        # Models an earlier run left in this process's memory would otherwise sit beside the trainer's.
        before_launch()
        from .inference import release_all

        release_all()
        cmd = launch.trainer_command(config_path=config_path, num_processes=num_processes)
        # The trainer's rank 0 shares this lock through the token.
        proc = launch.TrainingProcess.start(cmd, run_dir=run_dir, env={runlock.TOKEN_ENV: lock.token},
                                            warm_argv=launch.trainer_argv(config_path),  # forked when a worker is warm
                                            warm_processes=num_processes)
        log.info("Train LoRA: started %s (pid %d%s); log %s", launch.command_text(cmd), proc.popen.pid,
                 ", forked from the warm trainer" if proc.warm else "", proc.log_path)
        try:
            launch.supervise(proc, on_event=on_event, should_cancel=should_cancel)
        except (launch.TrainingCancelled, *interrupts) as err:
            # Cancel is not an error: the run folder keeps the last checkpoint and the next run resumes it.
            raise launch.TrainingCancelled(_record_cancel(run_dir, on_event=on_event)) from err
        except Exception as err:
            append_event(run_dir, "failed", message=str(err)[:2000])
            on_event({"event": "failed", "message": str(err)[:2000]})
            raise
        log.info("Train LoRA: finished in %.1f s", time.time() - started)
        done = finished_run(run_dir)
        if done is None:
            raise RuntimeError(f"Train LoRA: the trainer reported success but {run_dir} has no finished LoRA.")
        return done


def _preflight_lines(run_dir: Path) -> list[str]:
    """The estimates recorded in the run folder, as lines for the node's info (older folders: the memory line)."""
    record = run_dir / preflight.PREFLIGHT_FILE
    if record.is_file():
        try:
            data = json.loads(record.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            log.warning("%s is not valid JSON; its estimates are not shown", record)
            return []
        lines = data.get("summary") if isinstance(data, dict) else None
        return [str(line) for line in lines] if isinstance(lines, list) else []
    legacy = run_dir / MEMORY_ESTIMATE_FILE
    return [legacy.read_text(encoding="utf-8").strip()] if legacy.is_file() else []


def resume_step(config: TrainConfig) -> int:
    """The step a run with resume_from_checkpoint "latest" goes on from (its newest complete checkpoint), else 0."""
    if config.checkpoint.resume_from != "latest":
        return 0
    kept = checkpoint.list_checkpoints(config.checkpoint.output_dir)
    return kept[-1][0] if kept else 0


def _record_cancel(run_dir: Path, *, on_event: Callable[[dict[str, Any]], None]) -> str:
    """Write the 'cancelled' event (where the next run resumes) and tell on_event; returns the message."""
    kept = checkpoint.list_checkpoints(run_dir)
    resume = f"the next Run resumes from {kept[-1][1].name}" if kept else "no checkpoint yet: the next Run starts over"
    append_event(run_dir, "cancelled", message=f"cancelled by the user; {resume}",
                 last_checkpoint=kept[-1][1].name if kept else None)
    on_event({"event": "cancelled"})
    return f"training cancelled; {resume} ({run_dir})"
