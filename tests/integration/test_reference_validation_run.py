"""Validation images of an edit LoRA rendered with validation_reference_images: a tiny run on an edit dataset
(reference_strict conditioning) whose validation gets the references, a warning when the dataset has none, and
the Train LoRA node resolving the key's relative paths in ComfyUI's input folder (export mode: nothing launched).
One process, 1-2 steps, 32 px validation images on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from image_tools import noise_png
from PIL import Image

from flux2_lora_pack.trainer.events import read_events

WARNING = "validation_reference_images is set but the dataset has no reference images"



def _validation(**overrides) -> dict:
    return {"validation_prompt": "make the square red", "validation_resolution": "32",
            "validation_num_inference_steps": 2, "validation_steps": 0, "max_train_steps": 2, **overrides}


def test_validation_renders_an_edit_lora_with_its_reference_images(tiny_model_dir, tmp_path, runs):
    for i in range(2):
        noise_png(tmp_path / "edits" / f"e{i}.png", (64, 64), seed=i, caption=f"edit {i}")
        noise_png(tmp_path / "refs" / f"e{i}.png", (64, 64), seed=10 + i)
    # Two validation references of other sizes: 80x48 as is, 100x70 floored and cropped to 96x64.
    references = [noise_png(tmp_path / "val" / "a.png", (80, 48), seed=20),
                  noise_png(tmp_path / "val" / "b.jpg", (100, 70), seed=21)]
    backend = tmp_path / "multidatabackend.json"
    backend.write_text(json.dumps([
        {"id": "edits", "type": "local", "instance_data_dir": "edits", "resolution": 64, "conditioning_data": ["refs"]},
        {"id": "refs", "type": "local", "dataset_type": "conditioning", "conditioning_type": "reference_strict",
         "instance_data_dir": "refs", "resolution": 64},
        {"id": "text", "type": "local", "dataset_type": "text_embeds", "default": True, "cache_dir": "cache/text"},
    ]), encoding="utf-8")
    out = tmp_path / "run"
    # reference_timestep "zero": validation then runs the trainer's own forward with reference tokens.
    config = runs.run_config(tiny_model_dir, Path("unused"), out, reference_timestep="zero",
                             validation_reference_images=[str(p) for p in references], **_validation())
    del config["dataset_manifest"]
    config["data_backend_config"] = str(backend)
    proc = runs.launch(config)

    [event] = [e for e in read_events(out / "events.jsonl") if e["event"] == "validation"]
    assert event["step"] == 2
    assert [i["path"] for i in event["images"]] == ["validation/step000002_validation_prompt.png"]
    with Image.open(out / "validation" / "step000002_validation_prompt.png") as image:
        assert image.size == (32, 32) and image.mode == "RGB"
    assert "validation renders with 2 reference image(s) of 80x48, 96x64 px" in proc.stderr
    assert WARNING not in proc.stderr


def test_references_for_a_dataset_without_references_warn(tiny_model_dir, square_dataset, tmp_path, runs):
    reference = noise_png(tmp_path / "val.png", (48, 48), seed=1)
    out = tmp_path / "run"
    proc = runs.launch(runs.run_config(tiny_model_dir, square_dataset, out, validation_reference_images=str(reference),
                                       **_validation(max_train_steps=1)))
    assert proc.stderr.count(WARNING) == 1
    assert "validation renders with 1 reference image(s) of 48x48 px" in proc.stderr
    assert sorted(p.name for p in (out / "validation").iterdir()) == ["step000001_validation_prompt.png"]


def test_the_train_node_resolves_reference_images_in_comfyuis_input_folder(nodes, model_spec, dataset, comfy_root):
    reference = noise_png(comfy_root / "input" / "edit" / "before.png", (64, 48), seed=2)
    widgets = dict(max_train_steps=2, learning_rate=1e-3, lora_rank=4, lora_alpha=2.0, flux_lora_target="all",
                   train_batch_size=1, gradient_accumulation_steps=1, mixed_precision="no",
                   gradient_checkpointing=False, flux_guidance_value=1.0, caption_dropout_probability=0.0, seed=3,
                   checkpointing_steps=2, checkpoints_total_limit=2, validation_prompt="make it red",
                   validation_steps=0, distributed="none", output_name="refs", launch="export", num_processes=1)

    def train(references) -> dict:
        extra = json.dumps({"validation_reference_images": references})
        return nodes.Flux2TrainLora().train(model_spec, dataset, extra_config_json=extra, **widgets)

    train(["edit/before.png"])  # export: validated and written, nothing launched
    [run_json] = (comfy_root / "output" / "flux2_lora" / "runs").glob("*/run.json")
    assert json.loads(run_json.read_text())["validation_reference_images"] == [str(reference)]
    with pytest.raises(ValueError, match=r"validation_reference_images '.*edit/after\.png' does not exist"):
        train("edit/after.png")
