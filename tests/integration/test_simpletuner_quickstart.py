"""SimpleTuner's FLUX.2 quickstart files (documentation/quickstart/FLUX2.md in bghira/SimpleTuner), copied verbatim
into a SimpleTuner-style folder with a mixed-resolution photo set, train with `python -m trainer train` from that
folder after only the model path is changed (run length, output folder and validation are given on the command
line). Large photos are kept; the user prompt library renders one validation image per prompt."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from image_tools import noise_png

REPO_ROOT = Path(__file__).resolve().parents[2]

QUICKSTART_CONFIG = {
    "model_type": "lora",
    "model_family": "flux2",
    "model_flavour": "dev",
    "pretrained_model_name_or_path": "black-forest-labs/FLUX.2-dev",
    "output_dir": "/path/to/output",
    "train_batch_size": 1,
    "gradient_accumulation_steps": 1,
    "gradient_checkpointing": True,
    "mixed_precision": "bf16",
    "learning_rate": 1e-4,
    "lr_scheduler": "constant",
    "max_train_steps": 10000,
    "validation_resolution": "1024x1024",
    "validation_num_inference_steps": 20,
    "flux_guidance_mode": "constant",
    "flux_guidance_value": 1.0,
    "lora_rank": 16,
}
QUICKSTART_DATASETS = [
    {
        "id": "my-dataset",
        "type": "local",
        "crop": True,
        "crop_aspect": "square",
        "crop_style": "center",
        "resolution": 1024,
        "minimum_image_size": 1024,
        "maximum_image_size": 1024,
        "resolution_type": "pixel_area",
        "cache_dir_vae": "cache/vae/flux2/my-dataset",
        "instance_data_dir": "datasets/my-dataset",
        "caption_strategy": "textfile",
        "metadata_backend": "discovery",
        "repeats": 10,
    },
    {
        "id": "text-embeds",
        "type": "local",
        "dataset_type": "text_embeds",
        "default": True,
        "cache_dir": "cache/text/flux2",
        "write_batch_size": 64,
    },
]
QUICKSTART_PROMPTS = {
    "portrait_subject": "a professional portrait photograph of <subject>, studio lighting, high detail",
    "artistic_subject": "an artistic interpretation of <subject> in the style of renaissance painting",
    "cinematic_subject": "a cinematic shot of <subject>, dramatic lighting, film grain",
}
PHOTOS = {"square.png": (1024, 1024), "large_square.png": (2048, 2048), "landscape.png": (3000, 2000)}


def test_the_quickstart_files_train_from_a_simpletuner_folder(tiny_model_dir, tmp_path):
    project = tmp_path / "SimpleTuner"
    (project / "config").mkdir(parents=True)
    config = QUICKSTART_CONFIG | {"pretrained_model_name_or_path": str(tiny_model_dir)}  # the one change
    (project / "config" / "config.json").write_text(json.dumps(config, indent=2))
    (project / "config" / "multidatabackend.json").write_text(json.dumps(QUICKSTART_DATASETS, indent=2))
    (project / "config" / "user_prompt_library.json").write_text(json.dumps(QUICKSTART_PROMPTS, indent=2))
    for n, (name, size) in enumerate(PHOTOS.items()):
        noise_png(project / "datasets" / "my-dataset" / name, size, seed=n, caption=f"a photo of thing {n}")
    out = tmp_path / "output"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    # The quickstart's config.json names no prompt library (SimpleTuner then loads none); here it is passed on the
    # command line, relative to the folder as SimpleTuner reads it, with a small validation size for the CPU.
    validation = ["--user_prompt_library=config/user_prompt_library.json", "--validation_steps=3",
                  "--validation_num_inference_steps=2", "--validation_resolution=256"]
    proc = subprocess.run([sys.executable, "-m", "trainer", "train", "--max_train_steps=3", "--output_dir", str(out),
                           *validation], cwd=project, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert list(out.glob("*.safetensors")), "no LoRA written"
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["event"] == "step"] == [1, 2, 3]
    # one validation image per prompt of the library; <subject> was sent as written, as SimpleTuner sends it
    images = sorted(p.name for p in (out / "validation").glob("step000003_*.png"))
    assert len(images) == 3 and all(any(name in image for image in images) for name in QUICKSTART_PROMPTS), images
    assert "validation prompts contain <subject> and validation_subject is unset" in proc.stderr
    # the dataset paths were read from the folder holding config/, where SimpleTuner runs
    assert (project / "cache" / "vae" / "flux2" / "my-dataset").is_dir()
    assert (project / "cache" / "text" / "flux2").is_dir()
    # every photo was kept, the large ones brought down to the 1024x1024 square bucket
    manifest = next(out.rglob("manifest.json"))
    items = json.loads(manifest.read_text())["items"]
    assert {Path(item["image"]).name for item in items} == set(PHOTOS)
    assert {tuple(item["bucket"]) for item in items} == {(1024, 1024)}
    resized = {Path(item["image"]).name: tuple(item["resized"]) for item in items}
    assert resized == {"square.png": (1024, 1024), "large_square.png": (1024, 1024), "landscape.png": (1536, 1024)}
