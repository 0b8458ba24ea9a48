"""The Train LoRA node as ComfyUI calls it: validation before launch, caching, export, attach, cancel."""

from __future__ import annotations

import importlib
import json
import os
from collections import Counter
from pathlib import Path

import pytest

WIDGETS = dict(
    max_train_steps=3, learning_rate=1e-3, lora_rank=4, lora_alpha=2.0, flux_lora_target="all", train_batch_size=1,
    gradient_accumulation_steps=1, mixed_precision="no", gradient_checkpointing=False, flux_guidance_value=1.0,
    caption_dropout_probability=0.0, seed=3, checkpointing_steps=2, checkpoints_total_limit=2, validation_prompt="",
    validation_steps=0, distributed="none",
)


def _train(nodes, model_spec, dataset, **overrides):
    kwargs = {**WIDGETS, "output_name": "node_test", "launch": "run", "num_processes": 1, **overrides}
    return nodes.Flux2TrainLora().train(model_spec, dataset, **kwargs)


def test_export_writes_run_json_and_the_cluster_command(nodes, model_spec, dataset, comfy_root):
    out = _train(nodes, model_spec, dataset, launch="export", num_processes=8)
    lora, history, info = out["result"]
    assert lora.path == "" and history == []
    assert "torch.distributed.run --nproc_per_node 8 --standalone -m trainer train --config" in info
    assert "--nnodes 2 --node_rank 0 --rdzv_backend c10d --rdzv_endpoint NODE0_HOST:29500" in info
    [run_dir] = (comfy_root / "output" / "flux2_lora" / "runs").iterdir()
    config = json.loads((run_dir / "run.json").read_text())
    assert config["max_train_steps"] == 3 and config["dataset_manifest"] == dataset.manifest
    assert not (run_dir / "train.log").exists()  # nothing was launched


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"output_name": "../escape"}, "plain name"),
        ({"output_name": "bad\x07name"}, "control characters"),
        ({"output_name": "CON"}, "not usable"),
        ({"output_name": "  "}, "empty"),
        ({"extra_config_json": "{\"learning_rat\": 1}"}, "learning_rate"),
        ({"extra_config_json": "[1, 2]"}, "JSON object"),
        ({"extra_config_json": "{not json"}, "not valid JSON"),
        ({"launch": "detach"}, "launch"),
        ({"extra_config_json": "{\"flux_guidance_mode\": \"random-range\", \"flux_guidance_min\": 4, \"flux_guidance_max\": 1}"}, "flux_guidance_min"),
    ],
)
def test_bad_inputs_are_refused_before_launch(nodes, model_spec, dataset, comfy_root, overrides, match):
    with pytest.raises(ValueError, match=match):
        _train(nodes, model_spec, dataset, **overrides)
    runs = comfy_root / "output" / "flux2_lora" / "runs"
    assert not any(runs.rglob("train.log")) if runs.exists() else True


def test_several_datasets_train_together(nodes, model_spec, dataset, wide_dataset, comfy_root):
    from flux2_lora_pack.trainer.events import read_events

    wide = nodes.DatasetHandle(manifest=str(wide_dataset), num_images=3,
                               fingerprint=json.loads(Path(wide_dataset).read_text())["fingerprint"])
    with pytest.raises(ValueError, match=r"dataset_3 is the same dataset as dataset \("):
        _train(nodes, model_spec, dataset, dataset_2=wide, dataset_3=dataset)
    # 8 squares and 3 wide images, batch 1: 11 steps are one epoch, so both datasets are trained on.
    out = _train(nodes, model_spec, dataset, dataset_3=wide, max_train_steps=11, checkpointing_steps=100)
    lora, history, _ = out["result"]
    assert Path(lora.path).is_file() and len(history) == 11
    run_dir = Path(lora.path).parent
    config = json.loads((run_dir / "run.json").read_text())
    assert config["dataset_manifest"] == [dataset.manifest, wide.manifest]
    steps = [e for e in read_events(run_dir / "events.jsonl") if e["event"] == "step"]
    assert Counter(d for e in steps for d in e["datasets"]) == {"default": 8, "default-2": 3}
    summary = (run_dir / "dataset_summary.txt").read_text(encoding="utf-8")
    assert "11 usable images in 2 buckets (64x64: 8, 80x48: 3)" in summary
    # The run folder belongs to both datasets: the first one alone is another run.
    single = _train(nodes, model_spec, dataset, launch="export")
    assert Path(single["result"][2].splitlines()[0].split(": ", 1)[1]).parent != run_dir


def test_datasets_built_with_another_vae_are_refused_before_launch(nodes, model_spec, dataset, wide_dataset,
                                                                    comfy_root, tmp_path):
    import shutil

    other = tmp_path / "other"
    shutil.copytree(Path(wide_dataset).parent, other)
    record = json.loads((other / "manifest.json").read_text())
    record["vae_identity"] = "another-vae"
    (other / "manifest.json").write_text(json.dumps(record))
    wide = nodes.DatasetHandle(manifest=str(other / "manifest.json"), num_images=3, fingerprint=record["fingerprint"])
    with pytest.raises(ValueError, match=r"dataset 2 \(.*other.*\) was built with another VAE than dataset 1"):
        _train(nodes, model_spec, dataset, dataset_2=wide)
    assert not (comfy_root / "output" / "flux2_lora" / "runs").exists()  # nothing launched, no run folder


def test_same_inputs_reuse_the_finished_run(nodes, model_spec, dataset, monkeypatch):
    first = _train(nodes, model_spec, dataset)
    lora, history, info = first["result"]
    assert Path(lora.path).is_file() and [s for s, _ in history] == [1, 2, 3]
    # The run info keeps the preflight's estimates (preflight.json): memory, and time where there is one.
    assert "\nestimated peak " in info and "\nno time estimate for cpu: training on the CPU" in info
    assert lora.metadata["rank"] == "4"

    launch = importlib.import_module(f"{nodes.__package__.rsplit('.', 1)[0]}.trainer.launch")

    def refuse(*args, **kwargs):
        raise AssertionError("the same inputs must not retrain")

    monkeypatch.setattr(launch.TrainingProcess, "start", classmethod(refuse))
    again = _train(nodes, model_spec, dataset)
    assert again["result"][0].path == lora.path
    # attach picks up the same run folder.
    attached = _train(nodes, model_spec, dataset, launch="attach", attach_run_folder=str(Path(lora.path).parent))
    assert attached["result"][0].path == lora.path
    with pytest.raises(ValueError, match="attach_run_folder"):
        _train(nodes, model_spec, dataset, launch="attach", attach_run_folder=str(Path(lora.path).parent / "nope"))


def test_cancel_stops_every_process_and_the_next_run_resumes(pack, tiny_model_dir, square_dataset, tmp_path, runs):
    launch = importlib.import_module(f"{pack.__name__}.trainer.launch")
    out = tmp_path / "cancel"
    config = runs.run_config(tiny_model_dir, square_dataset, out, max_train_steps=1000, checkpointing_steps=2,
                             distributed="fsdp2", resume_from_checkpoint="latest")
    out.mkdir()
    (out / "run.json").write_text(json.dumps(config))
    proc = launch.TrainingProcess.start(launch.torchrun_command(config_path=out / "run.json", nproc_per_node=2),
                                        run_dir=out)
    seen = []

    def cancel_after_checkpoint() -> bool:
        return any(e.get("event") == "checkpoint" for e in seen)

    with pytest.raises(launch.TrainingCancelled):
        launch.supervise(proc, on_event=seen.append, should_cancel=cancel_after_checkpoint)
    # The whole process group (torchrun and both ranks) is gone.
    with pytest.raises(ProcessLookupError):
        os.killpg(proc.popen.pid, 0)
    checkpoints = sorted(out.glob("checkpoint-*"))
    assert checkpoints, "the last checkpoint must survive a cancel"
    last = max(int(p.name.split("-")[1]) for p in checkpoints)
    # The next run resumes from it.
    config["max_train_steps"] = last + 2
    (out / "run.json").write_text(json.dumps(config))
    proc = launch.TrainingProcess.start(launch.torchrun_command(config_path=out / "run.json", nproc_per_node=2),
                                        run_dir=out)
    events = launch.supervise(proc, on_event=lambda e: None, should_cancel=lambda: False)
    start = next(e for e in events if e["event"] == "start")
    assert start["start_step"] == last
    assert [e["step"] for e in events if e["event"] == "step"] == [last + 1, last + 2]


def test_preflight_estimate_is_shown_before_launch_and_written_to_the_run_folder(nodes, model_spec, dataset,
                                                                               comfy_root, monkeypatch):
    from flux2_lora_pack.nodes import comfy_bridge
    from flux2_lora_pack.trainer import launch, throughput
    from flux2_lora_pack.trainer.events import read_events

    sent = []
    monkeypatch.setattr(comfy_bridge, "send_event", lambda name, data: sent.append(data))
    monkeypatch.setattr(throughput, "visible_device_name", lambda: "NVIDIA H100 80GB HBM3")

    class Stop(Exception):
        pass

    def start(cls, *args, **kwargs):  # the estimate must be on the node by the time the trainer would start
        sent.append({"event": "launch"})
        raise Stop

    monkeypatch.setattr(launch.TrainingProcess, "start", classmethod(start))
    # bf16 compute has an estimate (fp32 has none: the table holds bf16 peaks); nothing runs, so CPU is fine here.
    with pytest.raises(Stop):
        _train(nodes, model_spec, dataset, mixed_precision="bf16", max_train_steps=400, validation_prompt="a cat",
               validation_steps=100)
    kinds = [e["event"] for e in sent]
    assert kinds == ["preflight", "launch"]
    shown = sent[0]
    assert shown["short"].startswith("estimate: ~") and "/step" in shown["short"] and "GB GPU" in shown["short"]
    assert shown["device"] == "NVIDIA H100 80GB HBM3" and shown["seconds_per_step"] > 0
    assert "estimated peak" in shown["summary"] and "estimated time: ~" in shown["summary"]

    [run_dir] = (comfy_root / "output" / "flux2_lora" / "runs").iterdir()
    record = json.loads((run_dir / "preflight.json").read_text())
    time = record["time"]
    assert record["estimate"] is True and time["gpu"]["name"] == "H100 SXM" and time["steps"] == 400
    assert time["inputs"]["samples"] == [{"image_tokens": 16, "reference_tokens": 0, "weight": 8}]
    assert time["inputs"]["validation"]["rounds"] == 4 and time["inputs"]["lora"] == {"target": "all", "rank": 4,
                                                                                      "type": "standard"}
    per_step = time["flops_per_step"]["total"] / (throughput.EFFICIENCY * 989.5e12)
    assert time["seconds_per_step"] == pytest.approx(per_step, rel=1e-9)
    assert time["total_seconds"] == pytest.approx(400 * per_step + time["validation_seconds"], rel=1e-9)
    assert record["gpu_memory_gb"]["total"] > 0 and record["host_memory_gb"]["per_process"] > 0
    # A reload of the panel replays it from the run folder's events.
    assert [e["event"] for e in read_events(run_dir / "events.jsonl")] == ["preflight"]
