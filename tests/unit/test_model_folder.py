"""A folder that is not FLUX.2 is refused from its JSON alone, with a message that says what to do."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from flux2_lora_pack.trainer.model_files import inspect_model_folder


def _copy_configs(src: Path, dst: Path) -> Path:
    """The tiny model's folders with JSON only: checks must not need weights."""
    for path in src.rglob("*"):
        if path.is_file() and path.suffix == ".json":
            target = dst / path.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, target)
    return dst


def _edit(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_tiny_model_is_accepted(tiny_model_dir):
    folder = inspect_model_folder(tiny_model_dir)
    assert folder.root == tiny_model_dir.resolve()
    assert folder.transformer_config()["in_channels"] == 128


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda d: (d / "model_index.json").unlink(), "model_index.json not found"),
        (lambda d: _edit(d / "model_index.json", _class_name="FluxPipeline"), "FLUX.1"),
        (lambda d: _edit(d / "model_index.json", _class_name="StableDiffusionXLPipeline"), "SDXL"),
        (lambda d: _edit(d / "model_index.json", vae=["diffusers", "AutoencoderKL"]), "vae="),
        (lambda d: shutil.rmtree(d / "tokenizer"), "no tokenizer/"),
        (lambda d: _edit(d / "transformer" / "config.json", in_channels=64), "in_channels=64"),
        (lambda d: _edit(d / "vae" / "config.json", latent_channels=16), "latent_channels=16"),
        (lambda d: _edit(d / "transformer" / "config.json", joint_attention_dim=4096), "do not belong together"),
        (lambda d: (d / "vae" / "config.json").write_text("{not json"), "not valid JSON"),
    ],
)
def test_wrong_folders_are_refused(tiny_model_dir, tmp_path, mutate, match):
    folder = _copy_configs(tiny_model_dir, tmp_path / "model")
    mutate(folder)
    with pytest.raises(ValueError, match=match):
        inspect_model_folder(folder)


def test_missing_folder_says_no_download(tmp_path):
    with pytest.raises(ValueError, match="never downloaded"):
        inspect_model_folder(tmp_path / "black-forest-labs" / "FLUX.2-dev")


def test_pickle_single_file_is_refused(tiny_model_dir, tmp_path):
    ckpt = tmp_path / "flux2.ckpt"
    ckpt.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="only .safetensors is loaded"):
        inspect_model_folder(tiny_model_dir, transformer_file=ckpt)
