"""The Build Dataset node as ComfyUI calls it: its widgets reach the build, its summary shows on the node."""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


@pytest.fixture
def nodes(pack, comfy_root):
    return importlib.import_module(f"{pack.__name__}.nodes.train_nodes")


@pytest.fixture
def model_spec(pack, tiny_model_dir):
    inference = importlib.import_module(f"{pack.__name__}.trainer.inference")
    model_files = importlib.import_module(f"{pack.__name__}.trainer.model_files")
    return inference.Flux2ModelSpec(folder=model_files.inspect_model_folder(tiny_model_dir), precision="fp32")


def _folder(root: Path) -> str:
    folder = root / "input" / "captions"
    folder.mkdir(parents=True)
    for n, caption in enumerate(["a red cube\r\na cube, red\n\n", "a blue ball"]):
        Image.fromarray(np.random.default_rng(n).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / f"{n}.png")
        (folder / f"{n}.txt").write_text(caption, encoding="utf-8")
    return "captions"


def test_split_caption_lines_widget(nodes, model_spec, comfy_root):
    from trainer.data import load_manifest

    folder = _folder(comfy_root)
    widgets = dict(resolution=64, repeats=1, caption_strategy="textfile")
    split = nodes.Flux2BuildDataset().build(model_spec, folder, **widgets)
    handle, count, report = split["result"]
    assert count == 2 and split["ui"]["text"] == [report]
    assert "3 training captions; 1 image has several" in report
    assert [it.captions for it in load_manifest(handle.manifest).items] == [("a red cube", "a cube, red"), ("a blue ball",)]

    whole = nodes.Flux2BuildDataset().build(model_spec, folder, split_caption_lines=False, **widgets)
    handle_whole = whole["result"][0]
    assert Path(handle_whole.manifest).parent != Path(handle.manifest).parent  # its own dataset folder
    assert handle_whole.fingerprint != handle.fingerprint
    assert [it.captions for it in load_manifest(handle_whole.manifest).items] == [
        ("a red cube\r\na cube, red",), ("a blue ball",)]
