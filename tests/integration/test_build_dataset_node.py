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
    handle, count, report, _ = split["result"]
    assert count == 2 and split["ui"]["text"] == [report]
    assert "3 training captions; 1 image has several" in report
    assert [it.captions for it in load_manifest(handle.manifest).items] == [("a red cube", "a cube, red"), ("a blue ball",)]

    whole = dataset_nodes.Flux2BuildDataset().build(model_spec, folder, split_caption_lines=False, **widgets)
    handle_whole = whole["result"][0]
    assert Path(handle_whole.manifest).parent != Path(handle.manifest).parent  # its own dataset folder
    assert handle_whole.fingerprint != handle.fingerprint
    assert [it.captions for it in load_manifest(handle_whole.manifest).items] == [
        ("a red cube\r\na cube, red",), ("a blue ball",)]


def test_preview_output_and_on_node_image_also_on_a_cached_run(dataset_nodes, model_spec, comfy_root):
    """The IMAGE output is the preview sheet of the built dataset, the same sheet is saved in ComfyUI's temp folder
    for the node to show, and a second Run (every cache entry reused, no encoder loaded) previews it again."""
    from collections import Counter

    import numpy as np
    import torch
    from PIL import Image

    from flux2_lora_pack.trainer.build_report import load_build_report
    from flux2_lora_pack.trainer.dataset_preview import render_dataset_preview
    from flux2_lora_pack.trainer.manifest import load_manifest

    folder = _folder(comfy_root)
    noise_png(comfy_root / "input" / folder / "wide.png", (96, 64), seed=7, caption="a wide one")
    (comfy_root / "input" / folder / "empty.png").write_bytes(b"")
    widgets = dict(resolution=64, repeats=1, caption_strategy="textfile", preview_per_bucket=1)

    def run():
        out = dataset_nodes.Flux2BuildDataset().build(model_spec, folder, **widgets)
        handle, count, report, image = out["result"]
        [shown] = out["ui"]["images"]
        assert shown["type"] == "temp" and shown["subfolder"] == "" and out["ui"]["text"] == [report]
        png = np.asarray(Image.open(comfy_root / "temp" / shown["filename"]).convert("RGB"), dtype=np.float32)
        torch.testing.assert_close(image, torch.from_numpy(png / 255).unsqueeze(0), rtol=0, atol=0)
        return handle, count, image, load_build_report(Path(handle.manifest).parent)

    handle, count, image, report = run()
    assert count == 3 and report.vae_loaded
    assert image.dtype == torch.float32 and image.ndim == 4 and image.shape[0] == 1 and image.shape[-1] == 3
    assert 0 <= image.min() and image.max() <= 1
    expected = render_dataset_preview(load_manifest(handle.manifest), report, per_bucket=1)
    torch.testing.assert_close(image, expected.to_tensor(), rtol=0, atol=0)
    assert Counter(t.bucket for t in expected.tiles) == {(64, 64): 1, (80, 48): 1}
    assert [(s.path, s.reason) for s in expected.skipped] == [("empty.png", "zero-byte file")]

    handle_again, _, image_again, report_again = run()
    assert handle_again == handle
    assert not report_again.vae_loaded and not report_again.text_encoder_loaded
    torch.testing.assert_close(image_again, image, rtol=0, atol=0)
    assert len(list((comfy_root / "temp").glob("flux2lora_dataset_preview_*.png"))) == 2


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
        handle, _, report, _ = dataset_nodes.Flux2BuildDataset().build(spec, folder, resolution=64, repeats=1,
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
