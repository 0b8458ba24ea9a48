"""report_to: TensorBoard and wandb (offline) fed from the trainer's events, read back from the files they write;
SimpleTuner's tracker keys; a missing tracker package named before anything runs."""

from __future__ import annotations

import io
import json
import logging
import struct
import sys
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from flux2_lora_pack.trainer.config import TrainConfig
from flux2_lora_pack.trainer.events import EventWriter, read_events
from flux2_lora_pack.trainer.trackers import TRACKERS, TrackerConfig, open_trackers, wandb_mode

STEPS = {  # step -> what the loop's step event carries (trainer/loop.py after_step)
    1: dict(loss=0.75, lr=1e-4, grad_norm=1.5, seconds_per_step=0.5, samples_per_second=4.0, peak_memory_mb=1024.5),
    2: dict(loss=0.5, lr=2e-4, grad_norm=0.25, seconds_per_step=0.25, samples_per_second=8.0, peak_memory_mb=1100.0),
    3: dict(loss=0.125, lr=3e-4, grad_norm=None, seconds_per_step=0.125, samples_per_second=16.0, peak_memory_mb=None),
}
TAGS = {"loss": "train_loss", "lr": "learning_rate", "grad_norm": "grad_norm", "seconds_per_step": "seconds_per_step",
        "samples_per_second": "samples_per_second", "peak_memory_mb": "peak_memory_mb"}


def _base(tmp_path: Path, **keys: Any) -> dict[str, Any]:
    (tmp_path / "model").mkdir(exist_ok=True)
    (tmp_path / "manifest.json").write_text("{}")
    return {"pretrained_model_name_or_path": str(tmp_path / "model"), "output_dir": str(tmp_path / "out"),
            "dataset_manifest": str(tmp_path / "manifest.json"), **keys}


def _validation_image(out: Path, step: int, name: str, size: tuple[int, int], colour: tuple[int, int, int]) -> dict:
    rel = Path("validation") / f"step{step:06d}_{name}.png"
    (out / rel).parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(out / rel)
    return {"name": name, "prompt": f"a {name} square", "path": rel.as_posix()}


def _emit_run(events: EventWriter, out: Path, *, steps: dict[int, dict[str, Any]], start_step: int = 0) -> list[dict]:
    """The events a run emits, in the loop's order: start, steps, validation after the last step, end."""
    events.emit("start", world_size=1, device="cpu", start_step=start_step, max_train_steps=max(steps))
    for step, values in steps.items():
        events.emit("step", step=step, applied=True, max_train_steps=max(steps), eta_seconds=1.0, datasets=["d"],
                    **values)
    images = [_validation_image(out, max(steps), "red", (24, 16), (255, 0, 0)),
              _validation_image(out, max(steps), "blue", (16, 16), (0, 0, 255))]
    events.emit("validation", step=max(steps), images=images)
    events.emit("end", step=max(steps), lora_path="lora.safetensors", seconds=2.0)
    return images


# --- the keys -------------------------------------------------------------------------------------------


def test_report_to_defaults_to_none_and_reads_simpletuners_spellings(tmp_path: Path) -> None:
    assert TrainConfig.from_dict(_base(tmp_path)).trackers == TrackerConfig()
    assert TrackerConfig().report_to == "none" and TrackerConfig().trackers == ()
    assert TrackerConfig(report_to="TensorBoard").trackers == ("tensorboard",)
    assert TrackerConfig(report_to=" wandb , tensorboard").report_to == "wandb,tensorboard"
    assert TrackerConfig(report_to="wandb,tensorboard").trackers == ("wandb", "tensorboard")
    assert TrackerConfig(report_to="all").trackers == TRACKERS == ("tensorboard", "wandb")
    # SimpleTuner's trainer also takes a list
    listed = TrainConfig.from_dict(_base(tmp_path, **{"--report_to": ["tensorboard", "wandb"]}))
    assert listed.trackers.report_to == "tensorboard,wandb"


@pytest.mark.parametrize(("value", "match"), [
    ("comet_ml", r"report_to 'comet_ml': 'comet_ml' is a SimpleTuner tracker this trainer does not support \(Comet ML"),
    ("tensorboard,swanlab", r"'swanlab' is a SimpleTuner tracker"),
    ("custom-tracker", r"custom tracker modules are not loaded"),
    ("simpletuner", r"always go to events.jsonl"),
    ("mlflow", r"'mlflow' is not a tracker; use one of \['none', 'tensorboard', 'wandb', 'all'\]"),
    ("none,wandb", r"names 'none' with other trackers"),
    ("wandb,WandB", r"names a tracker twice"),
    ("wandb,", r"'' is not a tracker"),
])
def test_bad_report_to_is_refused_with_the_reason(tmp_path: Path, value: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TrainConfig.from_dict(_base(tmp_path, report_to=value))


def test_tracker_keys_round_trip_and_logging_dir_is_read_under_output_dir_as_simpletuner_does(tmp_path: Path) -> None:
    config = TrainConfig.from_dict(_base(tmp_path, report_to="all", tracker_project_name="proj",
                                         tracker_run_name="run-1", logging_dir="tb", tracker_image_layout="table"))
    assert config.trackers == TrackerConfig(report_to="all", project_name="proj", run_name="run-1", logging_dir="tb",
                                            image_layout="table")
    assert TrainConfig.from_dict(config.to_dict()) == config
    out = tmp_path / "out"
    assert config.trackers.log_dir(out) == out / "tb"  # SimpleTuner: os.path.join(output_dir, logging_dir)
    assert TrackerConfig(logging_dir=str(tmp_path / "elsewhere")).log_dir(out) == tmp_path / "elsewhere"
    assert TrackerConfig().log_dir(out) == out / "logs"
    assert TrackerConfig().resolved_run_name(out) == "out" and config.trackers.resolved_run_name(out) == "run-1"
    # blank names are SimpleTuner's "unset"
    blank = TrainConfig.from_dict(_base(tmp_path, tracker_project_name="", tracker_run_name=""))
    assert blank.trackers == TrackerConfig()
    with pytest.raises(ValueError, match="logging_dir is empty"):
        TrainConfig.from_dict(_base(tmp_path, logging_dir=" "))
    for name in ("../escape", "a/b", "..", "a\\b"):
        with pytest.raises(ValueError, match=r"tracker_run_name .* names the run's TensorBoard folder"):
            TrainConfig.from_dict(_base(tmp_path, report_to="tensorboard", tracker_run_name=name))
    with pytest.raises(ValueError, match=r"tracker_image_layout must be one of \['gallery', 'table'\]"):
        TrainConfig.from_dict(_base(tmp_path, tracker_image_layout="grid"))


def test_the_command_line_loader_leaves_logging_dir_for_output_dir(tmp_path: Path) -> None:
    """The loader makes paths absolute against the working directory; logging_dir is SimpleTuner's output_dir-relative
    folder, so a logs/ in the working directory must not capture it."""
    from flux2_lora_pack.trainer.cli_config import load_cli_config

    (tmp_path / "logs").mkdir()
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "config.json").write_text(json.dumps(_base(tmp_path, report_to="none")))
    config = load_cli_config(None, overrides=["--logging_dir=logs"], cwd=tmp_path)
    assert config.trackers.log_dir(config.checkpoint.output_dir) == tmp_path / "out" / "logs"


def test_tracker_settings_that_do_nothing_warn(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        TrainConfig.from_dict(_base(tmp_path, tracker_project_name="proj", logging_dir="tb"))
        TrackerConfig(report_to="tensorboard", image_layout="table")
    assert "config: tracker_project_name='proj' has no effect because report_to is 'none'." in caplog.text
    assert "config: logging_dir='tb' has no effect because report_to is 'none'." in caplog.text
    assert "config: tracker_image_layout='table' has no effect because only wandb lays out images." in caplog.text


# --- a missing package ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("report_to", "missing", "match"), [
    ("wandb", ["wandb"], r"report_to 'wandb' needs the wandb package, not installed .*: pip install wandb"),
    ("all", ["tensorboard"], r"report_to 'all' needs the tensorboard package.*pip install tensorboard"),
    ("tensorboard,wandb", ["tensorboard", "wandb"],
     r"needs the tensorboard and wandb packages.*pip install tensorboard wandb"),
])
def test_a_missing_tracker_package_is_named_before_anything_starts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   report_to: str, missing: list[str],
                                                                   match: str) -> None:
    from flux2_lora_pack.trainer.run import run_training

    for name in missing:
        monkeypatch.setitem(sys.modules, name, None)  # what Python sees when the package is not installed
    config = TrainConfig.from_dict(_base(tmp_path, report_to=report_to))  # reading the config needs no tracker
    with pytest.raises(ValueError, match=match):
        config.trackers.check_installed()
    # The trainer (rank 0, before the dataset and the weights load) and the node's / CLI's launcher both refuse it.
    with pytest.raises(ValueError, match=match):
        open_trackers(config.trackers, output_dir=tmp_path / "out", resuming=False, run_config={})
    with pytest.raises(ValueError, match=match):
        run_training(config, num_processes=1, owner="test")
    assert not (tmp_path / "out").exists()  # refused before the run folder was made
    TrackerConfig(report_to="none").check_installed()


# --- TensorBoard ----------------------------------------------------------------------------------------


def _tensorboard(folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def test_tensorboard_gets_the_step_scalars_and_validation_images(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    out = tmp_path / "out"
    events = EventWriter(out)
    events.add_sink(open_trackers(TrackerConfig(report_to="tensorboard"), output_dir=out, resuming=False,
                                  run_config={"learning_rate": 1e-4, "lora_rank": 4}))
    _emit_run(events, out, steps=STEPS)
    events.close()

    tb = _tensorboard(out / "logs" / "out")  # logging_dir "logs" under output_dir, then the run name
    for field, tag in TAGS.items():
        logged = {e.step: e.value for e in tb.Scalars(tag)}
        assert logged == pytest.approx({s: v[field] for s, v in STEPS.items() if v[field] is not None}, rel=1e-6), tag
    assert set(tb.Tags()["scalars"]) == set(TAGS.values())
    images = {tag: tb.Images(tag) for tag in tb.Tags()["images"]}
    assert {tag: [(i.step, i.width, i.height) for i in found] for tag, found in images.items()} == {
        "validation/red": [(3, 24, 16)], "validation/blue": [(3, 16, 16)]}
    with Image.open(io.BytesIO(images["validation/red"][0].encoded_image_string)) as png:
        assert png.convert("RGB").getpixel((5, 5)) == (255, 0, 0)
    (text,) = tb.Tensors("config/text_summary")  # the run's config as a text entry
    assert json.loads(text.tensor_proto.string_val[0].decode()) == {"learning_rate": 1e-4, "lora_rank": 4}
    # events.jsonl is written as before
    assert [e["event"] for e in read_events(out / "events.jsonl")] == ["start", *["step"] * 3, "validation", "end"]


def test_a_resumed_run_replaces_the_steps_after_its_checkpoint_in_tensorboard(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    out = tmp_path / "out"
    settings = TrackerConfig(report_to="tensorboard", logging_dir="tb", run_name="r")
    first = EventWriter(out)
    first.add_sink(open_trackers(settings, output_dir=out, resuming=False, run_config={}))
    _emit_run(first, out, steps=STEPS)  # then the run dies; its checkpoint was at step 1
    first.close()
    again = {2: {**STEPS[2], "loss": 0.4}, 3: {**STEPS[3], "loss": 0.3}, 4: {**STEPS[3], "loss": 0.2}}
    second = EventWriter(out)
    second.add_sink(open_trackers(settings, output_dir=out, resuming=True, run_config={}))
    _emit_run(second, out, steps=again, start_step=1)
    second.close()
    tb = _tensorboard(out / "tb" / "r")
    logged = tb.Scalars("train_loss")
    assert [e.step for e in logged] == [1, 2, 3, 4]
    assert [e.value for e in logged] == pytest.approx([0.75, 0.4, 0.3, 0.2], rel=1e-6)


def test_a_tracker_that_fails_is_dropped_with_a_warning_and_the_events_go_on(tmp_path: Path,
                                                                           caplog: pytest.LogCaptureFixture) -> None:
    pytest.importorskip("tensorboard")
    out = tmp_path / "out"
    events = EventWriter(out)
    settings = TrackerConfig(report_to="tensorboard")
    events.add_sink(open_trackers(settings, output_dir=out, resuming=False, run_config={}))
    events.emit("start", start_step=0)
    events.emit("step", step=1, **STEPS[1])
    with caplog.at_level(logging.WARNING):  # an image that is not there: the tracker cannot read it
        events.emit("validation", step=1, images=[{"name": "gone", "prompt": "p", "path": "validation/gone.png"}])
    events.emit("step", step=2, **STEPS[2])
    events.close()
    assert "report_to tensorboard: logging the 'validation' event failed (FileNotFoundError" in caplog.text
    assert [e.step for e in _tensorboard(out / "logs" / "out").Scalars("train_loss")] == [1]
    assert [e["step"] for e in read_events(out / "events.jsonl") if e["event"] == "step"] == [1, 2]


# --- wandb, offline -------------------------------------------------------------------------------------


@pytest.fixture
def wandb_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """wandb with no network, no login and nothing written outside tmp_path."""
    pytest.importorskip("wandb")
    for name in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL", "WANDB_PROJECT", "WANDB_ENTITY",
                 "WANDB_RUN_ID", "WANDB_RESUME", "WANDB_DIR"):
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "home"
    for name, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONSOLE": "off",
                        "WANDB_CONFIG_DIR": home / "config", "WANDB_CACHE_DIR": home / "cache",
                        "WANDB_DATA_DIR": home / "data", "WANDB_ARTIFACT_DIR": home / "artifacts",
                        "NETRC": home / "netrc"}.items():
        monkeypatch.setenv(name, str(value))


def _wandb_records(run_file: Path) -> list[Any]:
    """The records of a .wandb file: a LevelDB-style log (a 7-byte ':W&B' header, 32 KiB blocks, each chunk a
    7-byte crc/length/type header; types 1 full, 2 first, 3 middle, 4 last) of wandb Record protobufs."""
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, pending, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # too little room for a header: the block's tail is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
        elif kind == 0:
            break
    return records


def _wandb_history(run_file: Path) -> dict[int, dict[str, Any]]:
    rows = {}
    for record in _wandb_records(run_file):
        if record.WhichOneof("record_type") == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            rows[row["_step"]] = row
    return rows


@pytest.mark.parametrize("layout", ["gallery", "table"])
def test_wandb_offline_run_holds_the_scalars_and_validation_images(tmp_path: Path, wandb_offline, layout: str) -> None:
    out = tmp_path / "out"
    settings = TrackerConfig(report_to="wandb", project_name="proj", run_name="my-run", image_layout=layout)
    events = EventWriter(out)
    events.add_sink(open_trackers(settings, output_dir=out, resuming=False, run_config={"lora_rank": 4}))
    _emit_run(events, out, steps=STEPS)
    events.close()

    run_id = (out / "wandb_run_id").read_text().strip()
    (run_dir,) = (out / "logs" / "wandb").glob(f"offline-run-*-{run_id}")
    history = _wandb_history(run_dir / f"run-{run_id}.wandb")
    assert sorted(history) == [1, 2, 3]
    for step, values in STEPS.items():
        expected = {TAGS[f]: v for f, v in values.items() if v is not None}  # None: not measured, not logged
        assert {tag: history[step][tag] for tag in TAGS.values() if tag in history[step]} == pytest.approx(expected,
                                                                                                            rel=1e-9)
        assert set(expected) == set(TAGS.values()) & set(history[step])
    if layout == "gallery":
        assert history[3]["validation/red/_type"] == "image-file"
        assert history[3]["validation/red/caption"] == "a red square"
        assert (history[3]["validation/red/width"], history[3]["validation/red/height"]) == (24, 16)
        assert (run_dir / "files" / history[3]["validation/blue/path"]).is_file()
    else:
        assert history[3]["validation/_type"] == "table-file" and history[3]["validation/nrows"] == 2
        table = json.loads((run_dir / "files" / history[3]["validation/path"]).read_text())
        assert table["columns"] == ["name", "prompt", "image"]
        assert [row[:2] for row in table["data"]] == [["red", "a red square"], ["blue", "a blue square"]]
    kinds = [r.WhichOneof("record_type") for r in _wandb_records(run_dir / f"run-{run_id}.wandb")]
    assert "run" in kinds and "exit" in kinds
    run = next(r.run for r in _wandb_records(run_dir / f"run-{run_id}.wandb") if r.WhichOneof("record_type") == "run")
    assert (run.project, run.display_name, run.run_id) == ("proj", "my-run", run_id)
    assert json.loads(next(i.value_json for i in run.config.update if i.key == "lora_rank")) == 4


def test_a_resumed_run_continues_its_wandb_run_and_a_fresh_one_starts_another(tmp_path: Path, wandb_offline) -> None:
    out = tmp_path / "out"
    settings = TrackerConfig(report_to="wandb")
    ids = []
    for resuming in (False, True, False):
        trackers = open_trackers(settings, output_dir=out, resuming=resuming, run_config={})
        trackers.close()
        ids.append((out / "wandb_run_id").read_text().strip())
    assert ids[0] == ids[1] != ids[2]
    # offline-run-<date>_<time>-<id>, with "-1" added when two runs start within one second
    assert {p.name.split("-")[3] for p in (out / "logs" / "wandb").glob("offline-run-*")} == {ids[0], ids[2]}


def test_without_wandb_credentials_the_run_is_offline_so_nothing_waits_on_the_network(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    netrc_file = tmp_path / "netrc"
    monkeypatch.setenv("NETRC", str(netrc_file))
    assert wandb_mode() == "offline"  # no netrc file at all
    netrc_file.write_text("machine example.org login user password secret\n")
    assert wandb_mode() == "offline"
    netrc_file.write_text("machine api.wandb.ai login user password " + "k" * 40 + "\n")  # what `wandb login` writes
    assert wandb_mode() is None  # wandb's own choice: online
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.org")
    assert wandb_mode() == "offline"  # the key is for another server
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert wandb_mode() is None
    monkeypatch.delenv("WANDB_API_KEY")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode() is None  # WANDB_MODE is wandb's to read


def test_a_wandb_run_without_credentials_or_wandb_mode_logs_offline(tmp_path: Path, wandb_offline,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WANDB_MODE")
    out = tmp_path / "out"
    events = EventWriter(out)
    events.add_sink(open_trackers(TrackerConfig(report_to="wandb"), output_dir=out, resuming=False, run_config={}))
    events.emit("start", start_step=0)
    events.emit("step", step=1, **STEPS[1])
    events.close()
    run_id = (out / "wandb_run_id").read_text().strip()
    (run_dir,) = (out / "logs" / "wandb").glob(f"offline-run-*-{run_id}")
    assert _wandb_history(run_dir / f"run-{run_id}.wandb")[1]["train_loss"] == 0.75
