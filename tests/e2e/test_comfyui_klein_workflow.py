"""The shipped FLUX.2 [klein] workflow inside a real ComfyUI: train on the tiny klein-4b base, preview the LoRA on
base (classifier-free guidance against a negative prompt) and on the distilled klein-4b (4 steps), side by side.
Fewer training steps than shipped; tests/integration/test_klein_workflow.py runs the same graph headlessly."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
from comfyui_harness import (
    REPO_ROOT,
    ComfyClient,
    ComfyServer,
    install_sample_dataset,
    install_tiny_model,
    load_api_workflow,
)
from PIL import Image
from safetensors import safe_open

pytestmark = pytest.mark.e2e

WORKFLOW = REPO_ROOT / "workflows" / "api" / "flux2_klein_train_and_validate.json"
BASE, DISTILLED = "flux2-klein-4b-tiny", "flux2-klein-4b-distilled-tiny"
TRAIN_ID, BASE_SAVE_ID, DISTILLED_SAVE_ID, LORA_SAVE_ID = "4", "11", "12", "15"
STEPS = 4
RUN_TIMEOUT_S = 400.0


@pytest.fixture(scope="module")
def klein_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from flux2_lora_pack.trainer.tiny import make_tiny

    root = tmp_path_factory.mktemp("klein_models")
    return {BASE: make_tiny(out_dir=root / BASE, seed=0, flavour="klein-4b"),
            DISTILLED: make_tiny(out_dir=root / DISTILLED, seed=0, flavour="klein-4b", distilled=True)}


@pytest.fixture(scope="module")
def klein_prompt(comfyui_server: ComfyServer, klein_models: dict[str, Path]) -> dict[str, Any]:
    for name, folder in klein_models.items():
        install_tiny_model(comfyui_server.base_dir, tiny_model_dir=folder, name=name)
    install_sample_dataset(comfyui_server.base_dir)
    prompt = load_api_workflow(WORKFLOW)
    prompt[TRAIN_ID]["inputs"].update(max_train_steps=STEPS, checkpointing_steps=STEPS, validation_steps=STEPS,
                                      output_name="klein_e2e")
    assert {prompt[i]["inputs"]["model"] for i in ("1", "2")} == {BASE, DISTILLED}
    return prompt


def _png(comfy: ComfyClient, image: dict[str, str]) -> Image.Image:
    return Image.open(io.BytesIO(comfy.view_file(image["filename"], image["subfolder"], image["type"]))).convert("RGB")


def test_klein_workflow_trains_on_base_and_previews_on_distilled(comfy: ComfyClient, comfyui_server: ComfyServer,
                                                                  klein_prompt: dict[str, Any]):
    result = comfy.run(klein_prompt, timeout=RUN_TIMEOUT_S)
    assert result.history["status"]["status_str"] == "success"
    assert result.ran | result.cached == set(klein_prompt)
    [base_image], [distilled_image] = (result.outputs[i]["images"] for i in (BASE_SAVE_ID, DISTILLED_SAVE_ID))
    base, distilled = _png(comfy, base_image), _png(comfy, distilled_image)
    assert base.size == distilled.size == (64, 64)
    assert len(set(base.getdata())) > 100 and len(set(distilled.getdata())) > 100
    assert base.tobytes() != distilled.tobytes()
    saved = comfyui_server.base_dir / "models" / "loras" / "flux2" / "klein_demo_squares.safetensors"
    path, check = result.outputs[LORA_SAVE_ID]["text"]
    # Loaded through ComfyUI's own LoRA loader before the copy (nodes/comfy_keycheck.py).
    assert path == str(saved) and check.startswith("ComfyUI key check: all ") and "keys load in ComfyUI" in check
    with safe_open(str(saved), framework="pt") as lora:
        assert json.loads(lora.metadata()["model_flavour"]) == "klein-4b"
        assert all(k.startswith("diffusion_model.") for k in lora.keys())
