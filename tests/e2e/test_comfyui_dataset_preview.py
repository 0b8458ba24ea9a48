"""Build Dataset's preview in a real ComfyUI: the node's own image (ComfyUI's temp folder, served by /view) is the
sheet its IMAGE output carries, and a Run that reuses every cache entry previews again without encoding."""

from __future__ import annotations

import io

import numpy as np
import pytest
from comfyui_harness import TINY_MODEL_NAME, ComfyClient, ComfyServer, Graph, install_tiny_model
from image_tools import noise_png
from PIL import Image

pytestmark = pytest.mark.e2e

FOLDER = "flux2_lora_preview_set"


def _pixels(comfy: ComfyClient, image: dict[str, str]) -> np.ndarray:
    with Image.open(io.BytesIO(comfy.view_file(image["filename"], image["subfolder"], image["type"]))) as png:
        return np.asarray(png.convert("RGB"))


def _graph(per_bucket: int) -> tuple[Graph, str, str]:
    graph = Graph()
    model = graph.node("Flux2LoraLoadModel", model=TINY_MODEL_NAME, precision="fp32", folder_path="",
                       transformer_file="(from model folder)", vae_file="(from model folder)",
                       text_encoder_precision="no_change", text_encoder_offload="off")
    dataset = graph.node("Flux2LoraBuildDataset", model=model.out(0), image_folder=FOLDER, resolution=64, repeats=1,
                         caption_strategy="textfile", preview_per_bucket=per_bucket)
    preview = graph.node("PreviewImage", images=dataset.out(3))
    return graph, dataset.id, preview.id


def test_build_dataset_shows_its_preview_on_the_node(comfy: ComfyClient, comfyui_server: ComfyServer,
                                                     tiny_model_dir):
    install_tiny_model(comfyui_server.base_dir, tiny_model_dir=tiny_model_dir)
    folder = comfyui_server.base_dir / "input" / FOLDER
    for n in range(2):
        noise_png(folder / f"square{n}.png", (64, 64), seed=n, caption=f"a square {n}")
    noise_png(folder / "wide.png", (96, 64), seed=5, caption="a wide one")
    (folder / "empty.png").write_bytes(b"")

    graph, dataset_id, preview_id = _graph(1)
    first = comfy.run(graph, timeout=300)
    assert dataset_id in first.ran
    [shown] = first.outputs[dataset_id]["images"]
    [through_output] = first.outputs[preview_id]["images"]
    assert shown["type"] == through_output["type"] == "temp"
    sheet = _pixels(comfy, shown)
    np.testing.assert_array_equal(sheet, _pixels(comfy, through_output))  # on the node = the IMAGE output
    [report] = first.outputs[dataset_id]["text"]
    assert "3 usable images in 2 buckets" in report and "skipped" in report and "empty.png: zero-byte file" in report

    # Another preview_per_bucket: ComfyUI runs the node again, the build reuses every cache entry and the preview
    # is drawn again, here with the tables only (a shorter sheet of the same width).
    graph, dataset_id, preview_id = _graph(0)
    again = comfy.run(graph, timeout=300)
    assert dataset_id in again.ran
    [report_again] = again.outputs[dataset_id]["text"]
    assert "latents: 0 encoded, 3 reused; captions: 0 encoded" in report_again
    [shown_again] = again.outputs[dataset_id]["images"]
    tables = _pixels(comfy, shown_again)
    assert tables.shape[1] == sheet.shape[1] and tables.shape[0] < sheet.shape[0]

    # The same prompt once more: nothing runs, and the cached IMAGE output still shows the same sheet (this
    # ComfyUI sends no new `executed` for a cached node that feeds a cached output; the front end keeps its image).
    cached = comfy.run(graph, timeout=300)
    assert cached.ran == set() and {dataset_id, preview_id} <= cached.cached
    [kept] = cached.outputs[preview_id]["images"]
    np.testing.assert_array_equal(_pixels(comfy, kept), tables)
