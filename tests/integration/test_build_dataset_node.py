"""The Build Dataset node as ComfyUI calls it: its widgets reach the build, its summary shows on the node."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from image_tools import noise_png  # noqa: E402


def _folder(root: Path) -> str:
    for n, caption in enumerate(["a red cube\r\na cube, red\n\n", "a blue ball"]):
        noise_png(root / "input" / "captions" / f"{n}.png", (64, 64), seed=n, caption=caption)
    return "captions"


def test_split_caption_lines_widget(dataset_nodes, model_spec, comfy_root):
    from flux2_lora_pack.trainer.manifest import load_manifest

    folder = _folder(comfy_root)
    widgets = dict(resolution=64, repeats=1, caption_strategy="textfile")
    split = dataset_nodes.Flux2BuildDataset().build(model_spec, folder, **widgets)
    handle, count, report = split["result"]
    assert count == 2 and split["ui"]["text"] == [report]
    assert "3 training captions; 1 image has several" in report
    assert [it.captions for it in load_manifest(handle.manifest).items] == [("a red cube", "a cube, red"), ("a blue ball",)]

    whole = dataset_nodes.Flux2BuildDataset().build(model_spec, folder, split_caption_lines=False, **widgets)
    handle_whole = whole["result"][0]
    assert Path(handle_whole.manifest).parent != Path(handle.manifest).parent  # its own dataset folder
    assert handle_whole.fingerprint != handle.fingerprint
    assert [it.captions for it in load_manifest(handle_whole.manifest).items] == [
        ("a red cube\r\na cube, red",), ("a blue ball",)]
