"""Cancel during Build Dataset's caching inside a real ComfyUI: the user presses Cancel (POST /interrupt) while the
latents (or the caption embeddings) are being encoded. What was encoded stays on disk, nothing half-built is
offered for training, and the next Run reuses those cache entries, encodes only the rest and finishes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from comfyui_harness import TINY_MODEL_NAME, ComfyClient, ComfyServer, ExecutionFailed, Graph, install_tiny_model
from image_tools import noise_png

pytestmark = pytest.mark.e2e

IMAGES = 48
"""Enough images (one per VAE call, about 0.1 s each on CPU) that caching is still running when Cancel lands."""
SIZE = 256
RUN_TIMEOUT_S = 300.0
BUILD_ID, PREVIEW_ID = "2", "3"
PHASES = ("latents", "captions")
"""Build Dataset's progress bars, in the order they run (nodes/dataset_nodes.py BuildProgressBar)."""
CACHE_DIRS = {"latents": "latents", "captions": "text"}
"""The folder of a built dataset that holds each phase's cache entries (trainer/build.py)."""
REPORT_COUNTS = {"latents": ("vae_images_encoded", "latents_reused"), "captions": ("prompts_encoded", "prompts_reused")}


def build_graph(image_folder: str) -> Graph:
    """Load FLUX.2 -> Build Dataset (one image per VAE call) -> Preview Any (the build report as text)."""
    graph = Graph()
    model = graph.node("Flux2LoraLoadModel", model=TINY_MODEL_NAME, precision="fp32")
    build = graph.node("Flux2LoraBuildDataset", node_id=BUILD_ID, model=model.out(0), image_folder=image_folder,
                       resolution=SIZE, repeats=1, caption_strategy="textfile", vae_batch_size=1)
    graph.node("PreviewAny", node_id=PREVIEW_ID, source=build.out(2))
    return graph


def entries(folder: Path) -> dict[str, tuple[str, int]]:
    """Cache entry name -> (sha256, mtime_ns) of every finished entry in folder."""
    return {p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.glob("*.safetensors"))}


def cancel_during(comfy: ComfyClient, prompt_id: str, phase: str) -> None:
    """Press Cancel once `phase` has written its first batch; return when ComfyUI reports the prompt interrupted."""
    bars = -1  # index of the progress bar now running: each bar starts with value 0
    for message in comfy.iter_messages(RUN_TIMEOUT_S):
        data = message.get("data") or {}
        if data.get("prompt_id") != prompt_id:
            continue
        if message["type"] in ("execution_success", "execution_error", "execution_interrupted"):
            pytest.fail(f"the prompt ended ({message['type']}) before the {phase} phase had written a batch: {data}")
        if message["type"] == "progress" and data.get("node") == BUILD_ID:
            if data["value"] == 0:
                bars += 1
            if bars == PHASES.index(phase) and data["value"] > 0:
                comfy.interrupt()  # as the front end's Cancel button does
                break
    with pytest.raises(ExecutionFailed) as caught:
        comfy.wait_for_prompt(prompt_id, timeout=RUN_TIMEOUT_S)
    assert caught.value.kind == "execution_interrupted", caught.value
    assert caught.value.data["node_id"] == BUILD_ID


@pytest.mark.parametrize("phase", PHASES)
def test_cancel_during_caching_keeps_what_was_encoded_and_the_next_run_resumes(
        comfy: ComfyClient, comfyui_server: ComfyServer, tiny_model_dir: Path, phase: str):
    install_tiny_model(comfyui_server.base_dir, tiny_model_dir=tiny_model_dir)
    name = f"cancel_{phase}"
    for n in range(IMAGES):  # distinct images and captions: each one is its own cache entry
        noise_png(comfyui_server.base_dir / "input" / name / f"{n:03d}.png", (SIZE, SIZE), seed=n,
                  caption=f"noise image number {n}")
    graph = build_graph(name)

    cancel_during(comfy, comfy.post_prompt(graph), phase)

    built = list((comfyui_server.base_dir / "output" / "flux2_lora" / "datasets").glob(f"{name}-*"))
    assert len(built) == 1, built
    out = built[0]
    assert not (out / "manifest.json").exists()  # nothing half-built is offered for training
    kept = entries(out / CACHE_DIRS[phase])
    if phase == "latents":
        assert 1 <= len(kept) < IMAGES, f"{len(kept)} latents on disk after Cancel"
    else:  # the latents were all written; of the captions (and the empty prompt) some were
        assert len(entries(out / "latents")) == IMAGES
        assert 1 <= len(kept) < IMAGES + 1, f"{len(kept)} caption embeddings on disk after Cancel"

    # Run again: the same graph finishes, reusing every entry the cancelled Run wrote, untouched.
    result = comfy.run(graph, timeout=RUN_TIMEOUT_S)
    assert result.history["status"]["status_str"] == "success"
    assert BUILD_ID in result.ran
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    encoded_key, reused_key = REPORT_COUNTS[phase]
    total = IMAGES if phase == "latents" else IMAGES + 1  # every caption, and the empty prompt for caption dropout
    assert (report[encoded_key], report[reused_key]) == (total - len(kept), len(kept)), report
    if phase == "captions":
        assert (report["vae_images_encoded"], report["latents_reused"]) == (0, IMAGES)
    after = entries(out / CACHE_DIRS[phase])
    assert len(after) == total
    assert {k: after[k] for k in kept} == kept  # the same bytes, not rewritten
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert len(manifest["items"]) == IMAGES
    # What the user reads on the node: the build report says what was reused.
    [summary] = result.outputs[PREVIEW_ID]["text"]
    assert summary.startswith(f"{IMAGES} usable images")
    assert f"{phase}: {total - len(kept)} encoded, {len(kept)} reused" in summary
