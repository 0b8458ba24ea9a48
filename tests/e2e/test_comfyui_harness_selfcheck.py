"""The harness against a real ComfyUI using only built-in nodes: must pass whatever state the pack is in."""

from __future__ import annotations

import io

import pytest
from comfyui_harness import ComfyClient, ComfyServer, Graph, PromptRejected
from PIL import Image

pytestmark = pytest.mark.e2e

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _solid_image_graph(*, width: int, height: int, color: int, prefix: str) -> tuple[Graph, str, str]:
    graph = Graph()
    image = graph.node("EmptyImage", width=width, height=height, batch_size=1, color=color)
    save = graph.node("SaveImage", images=image.out(0), filename_prefix=prefix)
    return graph, image.id, save.id


def test_comfyui_harness_selfcheck(comfy: ComfyClient, comfyui_server: ComfyServer):
    info = comfy.object_info()
    assert {"EmptyImage", "SaveImage"} <= set(info)

    graph, image_id, save_id = _solid_image_graph(width=24, height=8, color=0xFF0000, prefix="selfcheck/red")
    result = comfy.run(graph, timeout=120)

    kinds = [m["type"] for m in result.messages]
    assert kinds[0] == "execution_start"
    assert "execution_success" in kinds
    assert kinds[-1] == "executing"  # the closing message, node None
    assert result.ran == {image_id, save_id}
    assert result.cached == set()
    assert result.history["status"]["status_str"] == "success"

    images = result.images()
    assert len(images) == 1
    assert images[0]["type"] == "output" and images[0]["subfolder"] == "selfcheck"
    data = comfy.view_file(images[0]["filename"], images[0]["subfolder"], images[0]["type"])
    assert data[:8] == PNG_SIGNATURE
    with Image.open(io.BytesIO(data)) as png:
        assert png.size == (24, 8)
        assert png.convert("RGB").getpixel((5, 5)) == (255, 0, 0)
    # Everything ComfyUI writes stays in the temporary base directory.
    on_disk = comfyui_server.base_dir / "output" / "selfcheck" / images[0]["filename"]
    assert on_disk.read_bytes() == data

    # The same prompt again is served from ComfyUI's cache: nothing runs.
    again = comfy.run(graph, timeout=120)
    assert again.ran == set()
    assert again.cached == {image_id, save_id}


def test_comfyui_harness_rejects_invalid_prompt(comfy: ComfyClient):
    graph, image_id, _ = _solid_image_graph(width=0, height=8, color=0, prefix="selfcheck/invalid")
    with pytest.raises(PromptRejected) as caught:
        comfy.post_prompt(graph)
    assert caught.value.status == 400
    errors = caught.value.body["node_errors"]
    assert set(errors) == {image_id}
    assert [e["type"] for e in errors[image_id]["errors"]] == ["value_smaller_than_min"]
    comfy.interrupt()  # nothing runs: answers 200 and changes nothing


def test_comfyui_harness_startup_log(comfyui_server: ComfyServer):
    log = comfyui_server.startup_log()
    assert "--base-directory" in log.splitlines()[0]
    assert "Starting server" in log
    assert comfyui_server.start_seconds is not None
