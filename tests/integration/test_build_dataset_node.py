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


def test_load_flux2_text_encoder_settings_reach_the_caption_cache(pack, dataset_nodes, comfy_root, tiny_model_dir):
    """Load FLUX.2's text_encoder_precision / text_encoder_offload: Build Dataset caches captions with them. int8
    embeddings are cached apart from full-precision ones and stay close to them; offloaded ones are identical."""
    import importlib
    import shutil

    import pytest
    import torch

    from flux2_lora_pack.trainer.manifest import load_manifest, load_text_embedding

    model_nodes = importlib.import_module(f"{pack.__name__}.nodes.model_nodes")
    shutil.copytree(tiny_model_dir, comfy_root / "models" / "diffusers" / "tiny")
    folder = _folder(comfy_root)

    def build(**text_encoder):
        (spec,) = model_nodes.Flux2LoadModel().load("tiny", "fp32", **text_encoder)
        handle, _, report = dataset_nodes.Flux2BuildDataset().build(spec, folder, resolution=64, repeats=1,
                                                                     caption_strategy="textfile")["result"]
        manifest = load_manifest(handle.manifest)
        captions = [c for item in manifest.items for c in item.captions]
        return spec, report, torch.stack([load_text_embedding(manifest, c)[0] for c in captions])

    plain_spec, _, plain = build()
    assert plain_spec.quantization is None and plain_spec.offload is None  # the handle is what it was without them
    int8_spec, _, int8 = build(text_encoder_precision="int8-quanto")
    assert int8_spec.quantization.text_encoder_precision == "int8-quanto"
    assert int8_spec.text_precision_tag == "fp32+int8-quanto"  # its own cache entries
    relative = ((int8 - plain).norm(dim=-1) / plain.norm(dim=-1)).max()
    assert 0 < relative < 0.05, relative  # measured about 0.01 on the tiny Mistral
    _, _, offloaded = build(text_encoder_offload="leaf_level")
    torch.testing.assert_close(offloaded, plain, rtol=0, atol=0)
    with pytest.raises(ValueError, match="cannot be combined with group_offload_text_encoder"):
        model_nodes.Flux2LoadModel().load("tiny", "fp32", text_encoder_precision="int8-quanto",
                                          text_encoder_offload="block_level")
