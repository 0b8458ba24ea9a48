"""Shipped workflows: each UI file and its API twin describe the same graph, every link joins matching
types, every widget value is valid for its input, and the sample workflow renders headlessly."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))
import workflow_tools  # noqa: E402

API_FILES = sorted((REPO / "workflows" / "api").glob("*.json"))


def test_every_ui_workflow_has_an_api_twin():
    ui = {p.name for p in (REPO / "workflows").glob("*.json")}
    assert ui == {p.name for p in API_FILES} and ui


@pytest.mark.parametrize("api_path", API_FILES, ids=lambda p: p.stem)
def test_ui_and_api_describe_the_same_graph(api_path, pack):
    ui = json.loads((REPO / "workflows" / api_path.name).read_text())
    api = json.loads(api_path.read_text())
    assert workflow_tools.ui_to_api(ui, pack.NODE_CLASS_MAPPINGS) == api


@pytest.mark.parametrize("api_path", API_FILES, ids=lambda p: p.stem)
def test_links_and_widget_values_are_valid(api_path, pack):
    api = json.loads(api_path.read_text())
    classes = pack.NODE_CLASS_MAPPINGS
    for node_id, node in api.items():
        spec = workflow_tools.input_spec(classes, node["class_type"])
        declared = {**spec.get("required", {}), **spec.get("optional", {})}
        assert set(spec.get("required", {})) <= set(node["inputs"]), f"node {node_id} misses required inputs"
        for name, value in node["inputs"].items():
            assert name in declared, f"node {node_id}: unknown input {name}"
            kind, options = declared[name][0], (declared[name][1] if len(declared[name]) > 1 else {})
            if isinstance(value, list):
                source = api[value[0]]["class_type"]
                produced = workflow_tools.output_types(classes, source)[value[1]]
                assert produced == kind, f"node {node_id}.{name}: {produced} linked into {kind}"
            elif isinstance(kind, list):
                # Model file and folder names depend on the machine (their lists are empty on a test install).
                if not workflow_tools.is_model_file_input(node["class_type"], name):
                    assert value in kind, f"node {node_id}.{name}={value!r} not in {kind}"
            elif kind in ("INT", "FLOAT"):
                assert options["min"] <= value <= options["max"], f"node {node_id}.{name}={value}"
    # ComfyUI runs only what leads to an output node.
    assert any(n["class_type"] in ("SaveImage", "PreviewImage") for n in api.values())


def test_sample_workflow_renders_headlessly(tiny_model_dir, comfy_root, pack):
    import importlib
    import shutil

    from PIL import Image

    headless = importlib.import_module(f"{pack.__name__}.nodes.headless")
    shutil.copytree(tiny_model_dir, comfy_root / "models" / "diffusers" / "flux2-tiny")
    result = headless.run_graph(headless.load_api_workflow(REPO / "workflows" / "api" / "flux2_sample.json"))
    [png] = result["ui"]["4"]["images"]
    image = Image.open(png)
    assert image.size == (64, 64)
    assert len(set(image.getdata())) > 100  # not a flat image
    # Encoding again hits the on-disk cache: the text encoder is not loaded a second time.
    inference = importlib.import_module(f"{pack.__name__}.trainer.inference")
    calls = []
    original = inference.load_text_encoder
    inference.load_text_encoder = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        headless.run_graph(headless.load_api_workflow(REPO / "workflows" / "api" / "flux2_sample.json"))
    finally:
        inference.load_text_encoder = original
    assert calls == []
