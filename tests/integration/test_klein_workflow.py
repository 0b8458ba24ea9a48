"""The shipped FLUX.2 [klein] workflow, run headlessly as .ci/run_workflow.py runs it (the pack's own nodes outside
ComfyUI): Build Dataset and Train LoRA (torchrun, 2 processes, FSDP2) on the tiny klein-4b base, then the LoRA
applied to base (classifier-free guidance against a negative prompt) and to the distilled klein-4b of the same size
(4 steps, no CFG), both previews saved side by side. Fewer training steps than shipped, to keep it short."""

from __future__ import annotations

import importlib
import json
import logging
from pathlib import Path

import pytest
from PIL import Image
from safetensors import safe_open

REPO_ROOT = Path(__file__).resolve().parents[2]
WORKFLOW = REPO_ROOT / "workflows" / "api" / "flux2_klein_train_and_validate.json"
BASE, DISTILLED = "flux2-klein-4b-tiny", "flux2-klein-4b-distilled-tiny"
STEPS = 4


@pytest.mark.slow  # 40-100 s; test_klein_run covers klein training by default, e2e runs this workflow in ComfyUI
def test_klein_workflow_trains_on_base_and_previews_on_distilled(pack, comfy_root, caplog):
    from flux2_lora_pack.trainer.sample_data import make_sample_dataset
    from flux2_lora_pack.trainer.tiny import make_tiny

    headless = importlib.import_module(f"{pack.__name__}.nodes.headless")
    inference = importlib.import_module(f"{pack.__name__}.trainer.inference")
    graph = headless.load_api_workflow(WORKFLOW, overrides={
        "4": {"max_train_steps": STEPS, "checkpointing_steps": STEPS, "validation_steps": STEPS}})
    loaders = {graph[i]["inputs"]["model"]: i for i in ("1", "2")}
    assert loaders == {BASE: "1", DISTILLED: "2"}
    # The same seed: the distilled tiny has the base's weights, as the real distilled model shares the base's size.
    make_tiny(out_dir=comfy_root / "models" / "diffusers" / BASE, seed=0, flavour="klein-4b")
    make_tiny(out_dir=comfy_root / "models" / "diffusers" / DISTILLED, seed=0, flavour="klein-4b", distilled=True)
    make_sample_dataset(out_dir=comfy_root / "input" / graph["3"]["inputs"]["image_folder"], count=8, size=64)
    # Base previews with CFG against the negative prompt; distilled with none connected.
    assert graph["9"]["inputs"]["negative"] == ["6", 0] and "negative" not in graph["10"]["inputs"]
    assert (graph["9"]["inputs"]["guidance"], graph["10"]["inputs"]["steps"]) == (4.0, 4)

    try:
        with caplog.at_level(logging.INFO, logger="flux2_lora"):
            result = headless.run_graph(graph)
    finally:
        inference.release_all()

    assert "holds model_flavour 'klein-4b': FLUX.2 [klein] 4B (base;" in caplog.text
    assert "holds model_flavour 'klein-4b': FLUX.2 [klein] 4B (distilled, 4 steps without CFG;" in caplog.text
    assert "negative is ignored" not in caplog.text
    [base_png], [distilled_png] = result["ui"]["11"]["images"], result["ui"]["12"]["images"]
    assert Path(base_png).name.startswith("klein_base_cfg") and Path(distilled_png).name.startswith("klein_distilled")
    base, distilled = (Image.open(p).convert("RGB") for p in (base_png, distilled_png))
    assert base.size == distilled.size == (64, 64)
    assert len(set(base.getdata())) > 100 and len(set(distilled.getdata())) > 100  # not flat
    assert base.tobytes() != distilled.tobytes()  # 4 steps without CFG is another image than 8 steps with CFG

    lora, history, _ = result["outputs"]["4"]
    assert len(history) == STEPS
    run_dir = Path(lora.path).parent
    # Validation ran on base with CFG: the validation prompt and the negative prompt "" were encoded.
    assert len(list((run_dir / "text_cache").glob("*.safetensors"))) == 2
    saved, check = result["ui"]["15"]["text"]
    assert check.startswith("ComfyUI key check not run: not running inside ComfyUI")  # no silent pass claimed
    with safe_open(saved, framework="pt") as fh:
        meta = fh.metadata()
        assert all(k.startswith("diffusion_model.") for k in fh.keys())
    assert json.loads(meta["model_flavour"]) == "klein-4b" and json.loads(meta["steps"]) == STEPS
