"""Experiment trackers: TensorBoard and Weights & Biases, fed from rank 0's event stream.

report_to (SimpleTuner's key and spelling) chooses them: "none" (the default, as in SimpleTuner), "tensorboard",
"wandb", "all" (both) or a comma list ("tensorboard,wandb"). events.jsonl in output_dir is written whatever it
says; a tracker is one more reader of the same events (trainer/events.EventWriter.add_sink), so what it shows is
what the node charts:
- step events: the scalars train_loss, learning_rate, grad_norm (SimpleTuner's names), seconds_per_step,
  samples_per_second and peak_memory_mb, at the optimizer step;
- validation events: each prompt's image, as validation/<prompt name>;
- the run's flat config (wandb's run config; a TensorBoard text entry "config").

TensorBoard writes through torch.utils.tensorboard.SummaryWriter (torch ships the writer; it needs only the
`tensorboard` package, which is also what views the logs). Its files go to <logging_dir>/<run name>; a resumed run
purges the steps after its checkpoint, so a crash's orphaned steps do not show twice. wandb writes to
<logging_dir>/wandb: online when W&B credentials exist (WANDB_API_KEY, WANDB_IDENTITY_TOKEN_FILE, or `wandb login`'s
netrc entry) or WANDB_MODE says so, otherwise offline (nothing leaves the machine; `wandb sync` uploads later). Its
run id is kept in output_dir/wandb_run_id so a resumed run continues the same W&B run.

Both packages are optional: TrackerConfig.check_installed names the missing one before anything loads (the node
and `train --num-processes` call it before launching; open_trackers on rank 0 before the dataset and weights).
A tracker that fails while training is dropped with a warning: a dashboard never ends a run, and events.jsonl
keeps every value. Imports only trainer.settings (config.py imports this module).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import netrc
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from .settings import check_fields, setting

log = logging.getLogger(__name__)

TRACKERS = ("tensorboard", "wandb")
"""The trackers report_to can name, in the order "all" opens them; each is also its pip package's name."""
_REFUSED = {
    "comet_ml": "Comet ML is not integrated",
    "swanlab": "SwanLab is not integrated",
    "custom-tracker": "custom tracker modules are not loaded",
    "simpletuner": "this trainer's own metrics always go to events.jsonl in output_dir, without SimpleTuner's HTML "
                   "report; use 'none' for just that",
}
SCALARS = {"loss": "train_loss", "lr": "learning_rate", "grad_norm": "grad_norm",
           "seconds_per_step": "seconds_per_step", "samples_per_second": "samples_per_second",
           "peak_memory_mb": "peak_memory_mb"}
"""Step-event field -> the scalar's name in the trackers (SimpleTuner's names where it has one)."""
DEFAULT_PROJECT = "flux2-lora"
WANDB_ID_FILE = "wandb_run_id"


@dataclass(frozen=True, kw_only=True, slots=True)
class TrackerConfig:
    """Where training metrics and validation images go besides events.jsonl: TrainConfig's `trackers` group."""

    report_to: str = setting("report_to", "none")
    """Trackers to log to: "none", "tensorboard", "wandb", "all" (both) or a comma list such as
    "tensorboard,wandb" (SimpleTuner's choices comet_ml, swanlab, custom-tracker and simpletuner are refused).
    Each needs its package (pip install tensorboard / wandb). events.jsonl is written in every case."""
    project_name: str | None = setting("tracker_project_name", None, empty_means_null=True)
    """The W&B project; null means "flux2-lora"."""
    run_name: str | None = setting("tracker_run_name", None, empty_means_null=True)
    """The run's name in W&B and its TensorBoard folder under logging_dir; null means output_dir's folder name."""
    logging_dir: str = setting("logging_dir", "logs")
    """Folder for the trackers' files; a relative path is read under output_dir, as SimpleTuner reads it."""
    image_layout: Literal["gallery", "table"] = setting("tracker_image_layout", "gallery")
    """How W&B shows validation images: "gallery" logs one image per prompt (validation/<name>, with a step
    slider), "table" one table of all prompts per validation. TensorBoard always logs one image per prompt."""

    def __post_init__(self) -> None:
        check_fields(self)
        object.__setattr__(self, "report_to", _normalise_report_to(self.report_to))
        if not self.logging_dir.strip():
            raise ValueError("logging_dir is empty; give a folder (relative to output_dir), or remove it for 'logs'.")
        if self.run_name is not None and (set(self.run_name) & set("/\\") or self.run_name.strip(". ") == ""):
            raise ValueError(f"tracker_run_name {self.run_name!r} names the run's TensorBoard folder under "
                             "logging_dir: give a name without '/' or '\\' (not '.' or '..').")
        unused = [(key, value, "report_to is 'none'") for key, value, default in
                  (("tracker_project_name", self.project_name, None), ("tracker_run_name", self.run_name, None),
                   ("logging_dir", self.logging_dir, "logs"), ("tracker_image_layout", self.image_layout, "gallery"))
                  if value != default and not self.trackers]
        if self.trackers and "wandb" not in self.trackers and self.image_layout != "gallery":
            unused.append(("tracker_image_layout", self.image_layout, "only wandb lays out images"))
        for key, value, why in unused:
            log.warning("config: %s=%r has no effect because %s.", key, value, why)

    @property
    def trackers(self) -> tuple[str, ...]:
        """The trackers report_to names, "all" spelled out; () for "none"."""
        names = self.report_to.split(",")
        return TRACKERS if "all" in names else tuple(n for n in names if n != "none")

    def check_installed(self) -> None:
        """Raise ValueError naming each chosen tracker whose package this Python cannot import."""
        missing = [name for name in self.trackers if importlib.util.find_spec(name) is None]
        if missing:
            raise ValueError(
                f"report_to {self.report_to!r} needs the {' and '.join(missing)} package{'s' * (len(missing) > 1)}, "
                f"not installed in this Python ({sys.executable}): pip install {' '.join(missing)}, or set report_to "
                "to the trackers you have ('none' keeps only events.jsonl).")

    def log_dir(self, output_dir: Path) -> Path:
        """logging_dir as a path: relative ones under output_dir."""
        return Path(output_dir) / Path(self.logging_dir).expanduser()  # an absolute logging_dir replaces output_dir

    def resolved_run_name(self, output_dir: Path) -> str:
        return self.run_name or Path(output_dir).name


def _normalise_report_to(value: str) -> str:
    """report_to as lower-case comma-joined names, each checked; SimpleTuner lowercases and splits it the same way."""
    names = [part.strip().lower() for part in value.split(",")]
    choices = ["none", *TRACKERS, "all"]
    for name in names:
        if name in _REFUSED:
            raise ValueError(f"report_to {value!r}: {name!r} is a SimpleTuner tracker this trainer does not support "
                             f"({_REFUSED[name]}); use one of {choices} or a comma list of {list(TRACKERS)}.")
        if name not in choices:
            raise ValueError(f"report_to {value!r}: {name!r} is not a tracker; use one of {choices} or a comma list "
                             f"such as 'tensorboard,wandb'.")
    if len(names) > 1 and "none" in names:
        raise ValueError(f"report_to {value!r} names 'none' with other trackers; give 'none' alone.")
    if len(set(names)) != len(names):
        raise ValueError(f"report_to {value!r} names a tracker twice; give each once.")
    return ",".join(names)


# ------------------------------------------------------------------------------------------ the event sink


class Trackers:
    """Rank 0's event sink: hands each event to every open tracker. One that raises is closed with a warning
    and training goes on (events.jsonl keeps every value)."""

    def __init__(self, backends: list[Any]) -> None:
        self._backends = backends
        self._failed = False

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(b.name for b in self._backends)

    def write(self, event: str, data: dict[str, Any]) -> None:
        if event == "error":
            self._failed = True
        for backend in list(self._backends):
            try:
                backend.write(event, data)
            except Exception as exc:  # noqa: BLE001 - a dashboard never ends a training run
                log.warning("report_to %s: logging the %r event failed (%s: %s); this run logs no more to %s, "
                            "events.jsonl keeps every value.", backend.name, event, type(exc).__name__, exc,
                            backend.name)
                self._backends.remove(backend)
                self._close(backend)

    def close(self) -> None:
        backends, self._backends = self._backends, []
        for backend in backends:
            self._close(backend)

    def _close(self, backend: Any) -> None:
        try:
            backend.close(failed=self._failed)
        except Exception as exc:  # noqa: BLE001 - closing a tracker must not hide the run's own outcome
            log.warning("report_to %s: closing failed (%s: %s).", backend.name, type(exc).__name__, exc)


def open_trackers(settings: TrackerConfig, *, output_dir: Path, resuming: bool, run_config: dict[str, Any]) -> Trackers:
    """The trackers report_to names, on rank 0, before the dataset and the weights load: a missing package, bad
    credentials or a W&B server that cannot be reached fail the run here. resuming: the run continues a checkpoint
    (the W&B run of output_dir/wandb_run_id goes on)."""
    settings.check_installed()
    output_dir = Path(output_dir)
    log_dir = settings.log_dir(output_dir)
    run_name = settings.resolved_run_name(output_dir)
    backends: list[Any] = []
    try:
        for name in settings.trackers:
            if name == "tensorboard":
                backends.append(TensorBoardTracker(log_dir / run_name, output_dir=output_dir, run_config=run_config))
            else:
                backends.append(WandbTracker(settings, output_dir=output_dir, log_dir=log_dir, run_name=run_name,
                                             resuming=resuming, run_config=run_config))
    except BaseException:
        Trackers(backends).close()
        raise
    return Trackers(backends)


def _scalars(data: dict[str, Any]) -> dict[str, float]:
    """A step event's numbers under their tracker names (None and non-numbers left out; NaN kept: it happened)."""
    return {tag: float(data[key]) for key, tag in SCALARS.items()
            if isinstance(data.get(key), (int, float)) and not isinstance(data.get(key), bool)}


# --------------------------------------------------------------------------------------------- TensorBoard


class TensorBoardTracker:
    """torch.utils.tensorboard's SummaryWriter, opened at the start event (it knows the resumed step)."""

    name = "tensorboard"

    def __init__(self, folder: Path, *, output_dir: Path, run_config: dict[str, Any]) -> None:
        # needs the tensorboard package (check_installed)
        from torch.utils.tensorboard import SummaryWriter

        self._make_writer = SummaryWriter
        self.folder = folder
        self._output_dir = output_dir
        text = json.dumps(run_config, indent=2, sort_keys=True, default=str)
        self._config_text = "    " + text.replace("\n", "\n    ")  # indented: a code block in TensorBoard's Markdown
        self._writer: Any = None

    def write(self, event: str, data: dict[str, Any]) -> None:
        if event == "start":
            # purge_step: TensorBoard hides what an interrupted run logged after the checkpoint this run resumes.
            self._writer = self._make_writer(log_dir=str(self.folder), purge_step=int(data.get("start_step") or 0) + 1,
                                             flush_secs=30)
            self._writer.add_text("config", self._config_text, global_step=int(data.get("start_step") or 0))
        elif self._writer is None:
            return
        elif event == "step":
            for tag, value in _scalars(data).items():
                self._writer.add_scalar(tag, value, global_step=data["step"])
        elif event == "validation":
            import numpy as np
            from PIL import Image

            for record in data.get("images") or ():
                with Image.open(self._output_dir / record["path"]) as image:
                    pixels = np.asarray(image.convert("RGB"))
                self._writer.add_image(f"validation/{record['name']}", pixels, global_step=data["step"],
                                       dataformats="HWC")
            self._writer.flush()

    def close(self, *, failed: bool) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


# ---------------------------------------------------------------------------------------- Weights & Biases


class WandbTracker:
    """One W&B run, started when the trackers open; finished (failed or not) when the run ends."""

    name = "wandb"

    def __init__(self, settings: TrackerConfig, *, output_dir: Path, log_dir: Path, run_name: str, resuming: bool,
                 run_config: dict[str, Any]) -> None:
        import wandb  # optional (check_installed)

        self._wandb = wandb
        self._output_dir = output_dir
        self._layout = settings.image_layout
        id_file = output_dir / WANDB_ID_FILE
        # A resumed run continues its W&B run; a fresh one (even in a used folder) starts a new one.
        run_id = (id_file.read_text(encoding="utf-8").strip() or None) if resuming and id_file.is_file() else None
        log_dir.mkdir(parents=True, exist_ok=True)
        mode = wandb_mode()
        # allow_val_change: a resumed run may change settings (max_train_steps) the W&B run recorded.
        self.run = wandb.init(project=settings.project_name or DEFAULT_PROJECT, name=run_name, id=run_id,
                              resume="allow" if run_id else None, dir=str(log_dir), config=run_config,
                              allow_val_change=True, mode=mode)
        id_file.write_text(self.run.id + "\n", encoding="utf-8")
        where = Path(self.run.dir).parent
        if self.run.settings.mode == "disabled":
            log.warning("wandb: WANDB_MODE is 'disabled', so report_to wandb logs nothing.")
        elif self.run.settings.mode == "offline":
            log.info("wandb: logging offline to %s (%s); upload it with `wandb sync %s`", where,
                     "no W&B credentials found" if mode == "offline" else "WANDB_MODE", where)
        else:
            log.info("wandb: logging to project %s, run %s (%s)", self.run.project, self.run.id, where)

    def write(self, event: str, data: dict[str, Any]) -> None:
        if event == "step":
            self.run.log(_scalars(data), step=data["step"])
        elif event == "validation":
            records = data.get("images") or ()
            if self._layout == "table":
                table = self._wandb.Table(columns=["name", "prompt", "image"])
                for r in records:
                    table.add_data(r["name"], r["prompt"], self._wandb.Image(str(self._output_dir / r["path"])))
                self.run.log({"validation": table}, step=data["step"])
            else:
                self.run.log({f"validation/{r['name']}": self._wandb.Image(str(self._output_dir / r["path"]),
                                                                           caption=r["prompt"]) for r in records},
                             step=data["step"])
        elif event == "end":
            self.run.summary["lora_path"] = data.get("lora_path")
        elif event == "error":
            self.run.summary["error"] = str(data.get("message", ""))[:1000]

    def close(self, *, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)
        # finish() can return before wandb's service process has written the run's file (measured: 1 close in 6
        # left it empty for a moment); teardown waits for the service, so the folder is complete when we return.
        self._wandb.teardown()


def wandb_mode() -> str | None:
    """None (wandb's own choice: WANDB_MODE, else online) when WANDB_MODE is set or W&B credentials exist, else
    "offline": without credentials an online run could only fail, and a machine without network must not wait."""
    if os.environ.get("WANDB_MODE") or os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return None
    host = urlsplit(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname
    path = os.environ.get("NETRC") or str(Path.home() / ("_netrc" if sys.platform == "win32" else ".netrc"))
    try:
        return None if host and netrc.netrc(path).authenticators(host) else "offline"
    except (OSError, netrc.NetrcParseError):
        return "offline"
