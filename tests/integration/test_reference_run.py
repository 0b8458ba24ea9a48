"""A training run from a multidatabackend.json with an edit dataset and its reference_strict conditioning set:
the trainer builds the caches at startup (rank 0, before the transformer), trains on reference tokens, and
writes the dataset summary into the run folder. One process, 3 steps on the tiny model."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from image_tools import noise_png  # noqa: E402


def test_run_trains_on_a_data_backend_config_with_references(tiny_model_dir, tmp_path, runs):
    for i in range(3):
        noise_png(tmp_path / "edits" / f"e{i}.png", (64, 64), seed=i, caption=f"edit {i}")
        noise_png(tmp_path / "refs" / f"e{i}.png", (64, 64), seed=10 + i)
    noise_png(tmp_path / "plain" / "p0.png", (96, 64), seed=20, caption="a plain image")
    backend = tmp_path / "multidatabackend.json"
    backend.write_text(json.dumps([
        {"id": "edits", "type": "local", "instance_data_dir": "edits", "resolution": 64, "conditioning_data": ["refs"]},
        {"id": "refs", "type": "local", "dataset_type": "conditioning", "conditioning_type": "reference_strict",
         "instance_data_dir": "refs", "resolution": 64},
        {"id": "plain", "type": "local", "instance_data_dir": "plain", "resolution": 64, "repeats": 1},
        {"id": "text", "type": "local", "dataset_type": "text_embeds", "default": True, "cache_dir": "cache/text"},
    ]), encoding="utf-8")
    out = tmp_path / "run"
    config = runs.run_config(tiny_model_dir, Path("unused"), out, max_train_steps=3)
    del config["dataset_manifest"]
    config["data_backend_config"] = str(backend)
    runs.launch(config)

    losses = runs.step_losses(out)
    assert sorted(losses) == [1, 2, 3] and all(math.isfinite(v) for v in losses.values())
    assert (out / "lora.safetensors").is_file()
    manifest = json.loads((out / "dataset" / "manifest.json").read_text(encoding="utf-8"))
    assert [(it["source"], len(it["references"])) for it in manifest["items"]] == [
        ("edits", 1), ("edits", 1), ("edits", 1), ("plain", 0)]
    record = json.loads((out / "dataset_report.json").read_text(encoding="utf-8"))
    assert {k: v["used"] for k, v in record["datasets"].items()} == {"refs": 3, "edits": 3, "plain": 1}
    assert record["vae_images_encoded"] == 7 and record["latent_bytes_per_image"] > 0
    assert "dataset plain (image): 1 found, 1 used" in (out / "dataset_summary.txt").read_text(encoding="utf-8")
