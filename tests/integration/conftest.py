"""Fixtures for trainer runs: a small built dataset on the tiny model, and a torchrun launcher."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def nodes(pack, comfy_root):
    """The pack's training nodes module, imported as ComfyUI imports the pack (output into comfy_root)."""
    return importlib.import_module(f"{pack.__name__}.nodes.train_nodes")


@pytest.fixture
def dataset_nodes(pack, comfy_root):
    """The pack's dataset node module (Build Dataset), imported as ComfyUI imports the pack."""
    return importlib.import_module(f"{pack.__name__}.nodes.dataset_nodes")


@pytest.fixture
def model_spec(pack, tiny_model_dir):
    """A FLUX2_MODEL of the tiny weights in fp32, as Load FLUX.2 returns it."""
    inference = importlib.import_module(f"{pack.__name__}.trainer.inference")
    model_files = importlib.import_module(f"{pack.__name__}.trainer.model_files")
    return inference.Flux2ModelSpec(folder=model_files.inspect_model_folder(tiny_model_dir), precision="fp32")


@pytest.fixture
def dataset(nodes, square_dataset):
    """square_dataset as Build Dataset hands it to Train LoRA (FLUX2_DATASET)."""
    manifest = json.loads(Path(square_dataset).read_text())
    return nodes.DatasetHandle(manifest=str(square_dataset), fingerprint=manifest["fingerprint"], num_images=8)


@pytest.fixture(scope="session")
def square_dataset(tiny_model_dir, tmp_path_factory) -> Path:
    """Manifest of 8 cached 64x64 images (one bucket) on the tiny model."""
    from flux2_lora_pack.trainer.build import build_dataset
    from flux2_lora_pack.trainer.model_files import inspect_model_folder
    from flux2_lora_pack.trainer.sample_data import make_sample_dataset

    root = tmp_path_factory.mktemp("squares")
    images = make_sample_dataset(out_dir=root / "images", count=8)
    return build_dataset(image_dir=images, model=inspect_model_folder(tiny_model_dir), out_dir=root / "built",
                         resolution=64, text_precision="fp32",
                         extra_prompts=["a red square on a white background"])


@pytest.fixture(scope="session")
def wide_dataset(tiny_model_dir, tmp_path_factory) -> Path:
    """Manifest of 3 cached 96x64 images (bucket 80x48), captions unlike square_dataset's."""
    from image_tools import noise_png

    from flux2_lora_pack.trainer.build import build_dataset
    from flux2_lora_pack.trainer.model_files import inspect_model_folder

    root = tmp_path_factory.mktemp("wide")
    for n in range(3):
        noise_png(root / "images" / f"w{n}.png", (96, 64), seed=n, caption=f"a wide noise picture {n}")
    return build_dataset(image_dir=root / "images", model=inspect_model_folder(tiny_model_dir),
                         out_dir=root / "built", resolution=64, text_precision="fp32")


def run_config(tiny_model_dir: Path, manifest: Path, output_dir: Path, **overrides: Any) -> dict[str, Any]:
    config = {
        "model_type": "lora",
        "model_family": "flux2",
        "pretrained_model_name_or_path": str(tiny_model_dir),
        "output_dir": str(output_dir),
        "dataset_manifest": str(manifest),
        "train_batch_size": 1,
        "max_train_steps": 4,
        "learning_rate": 1e-3,
        "lora_rank": 4,
        "lora_alpha": 2,
        "mixed_precision": "no",
        "gradient_checkpointing": False,
        "checkpointing_steps": 100,
        "validation_steps": 0,
        "distributed": "none",
        "seed": 1,
    }
    config.update(overrides)
    return config


def launch(config: dict[str, Any], *, nproc: int = 1, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the trainer as users do: torchrun for several processes, python -m trainer for one."""
    out = Path(config["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    path = out.parent / f"{out.name}.run.json"
    path.write_text(json.dumps(config), encoding="utf-8")
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               "-m", "trainer", "train", "--config", str(path)]
    else:
        cmd = [sys.executable, "-m", "trainer", "train", "--config", str(path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"trainer failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc


def step_losses(output_dir: Path) -> dict[int, float]:
    from flux2_lora_pack.trainer.events import read_events

    return {e["step"]: e["loss"] for e in read_events(output_dir / "events.jsonl") if e["event"] == "step"}


@pytest.fixture(scope="session")
def runs():
    """The helpers above, for test modules (importlib mode cannot import conftest directly)."""
    from types import SimpleNamespace

    return SimpleNamespace(run_config=run_config, launch=launch, step_losses=step_losses)
