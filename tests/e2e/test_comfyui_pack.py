"""The pack inside a real ComfyUI: it imports, registers exactly its declared nodes, documents every
input, and the shipped sample workflow renders a PNG on the tiny FLUX.2."""

from __future__ import annotations

import ast
import copy
import io
import json
import re
import shutil
from pathlib import Path

import pytest
from comfyui_harness import (
    PACK_DIR_NAME,
    PACK_NODE_PREFIX,
    PACK_PYTHON_MODULE,
    REPO_ROOT,
    ComfyClient,
    ComfyServer,
    PromptRejected,
    load_api_workflow,
)
from PIL import Image

pytestmark = pytest.mark.e2e

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SAMPLE_WORKFLOW = REPO_ROOT / "workflows" / "api" / "flux2_sample.json"
TINY_MODEL_NAME = "flux2-tiny"
"""Folder name of the tiny model under the server's models/diffusers (what the Load node lists)."""

# Extend as nodes ship; node ids never change once shipped (saved workflows refer to them).
EXPECTED_NODES = {"Flux2LoraLoadModel", "Flux2LoraMistralEncode", "Flux2LoraSample"}
# Front-end-only node types of UI-format workflows: the server never registers them.
FRONTEND_ONLY_TYPES = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}


def declared_node_ids(nodes_dir: Path = REPO_ROOT / "nodes") -> set[str]:
    """String keys of every top-level NODE_CLASS_MAPPINGS dict literal under nodes/ (read, not imported)."""
    declared: set[str] = set()
    for path in sorted(nodes_dir.glob("*.py")):
        for stmt in ast.parse(path.read_text(encoding="utf-8")).body:
            target = stmt.targets[0] if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 else getattr(stmt, "target", None)
            if isinstance(target, ast.Name) and target.id == "NODE_CLASS_MAPPINGS" and isinstance(stmt.value, ast.Dict):
                declared |= {k.value for k in stmt.value.keys if isinstance(k, ast.Constant) and isinstance(k.value, str)}
    return declared


def pack_nodes(info: dict) -> dict:
    return {name: spec for name, spec in info.items() if spec.get("python_module") == PACK_PYTHON_MODULE}


def test_pack_imports_without_error(comfyui_server: ComfyServer):
    log = comfyui_server.startup_log()
    failures = [line for line in log.splitlines()
                if PACK_DIR_NAME in line and ("Cannot import" in line or "IMPORT FAILED" in line or "Skip " in line)]
    assert failures == [], f"the pack failed to import:\n{comfyui_server.log_tail()}"
    # ComfyUI lists each custom node folder it imported, with its import time.
    loaded = re.compile(rf"^\s*[\d.]+ seconds: .*custom_nodes[/\\]{PACK_DIR_NAME}$", re.MULTILINE)
    assert loaded.search(log), f"no import-time line for the pack in the startup log:\n{log[-4000:]}"


def test_object_info_has_exactly_the_declared_nodes(comfy: ComfyClient):
    registered = set(pack_nodes(comfy.object_info()))
    declared = declared_node_ids()
    assert declared - registered == set(), "declared in nodes/*.py but not registered: merged into nodes/__init__.py?"
    assert registered - declared == set(), "registered but not declared as a NODE_CLASS_MAPPINGS literal in nodes/*.py"
    assert EXPECTED_NODES <= registered
    assert all(name.startswith(PACK_NODE_PREFIX) for name in registered), sorted(registered)


def test_every_pack_input_has_a_tooltip(comfy: ComfyClient):
    nodes = pack_nodes(comfy.object_info())
    assert nodes, "no node of the pack is registered"
    missing = [
        f"{name}.{input_name}"
        for name, spec in sorted(nodes.items())
        for section in ("required", "optional")
        for input_name, entry in spec["input"].get(section, {}).items()
        if not (len(entry) > 1 and isinstance(entry[1], dict) and str(entry[1].get("tooltip", "")).strip())
    ]
    assert missing == []


def test_web_extension_is_served(comfy: ComfyClient):
    scripts = sorted(p.relative_to(REPO_ROOT / "web" / "js").as_posix() for p in (REPO_ROOT / "web" / "js").rglob("*.js"))
    assert scripts, "web/js has no .js file: the Train LoRA chart extension is missing"
    served = set(comfy.get_json("/extensions"))
    expected = {f"/extensions/{PACK_DIR_NAME}/{name}" for name in scripts}
    assert expected <= served


def test_shipped_workflows_use_registered_nodes(comfy: ComfyClient):
    workflows = sorted((REPO_ROOT / "workflows").rglob("*.json"))
    assert workflows, "workflows/ ships no workflow"
    registered = set(comfy.object_info())
    unknown: dict[str, set[str]] = {}
    for path in workflows:
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict) and isinstance(data.get("nodes"), list):  # UI format
            types = {node["type"] for node in data["nodes"]} - FRONTEND_ONLY_TYPES
        else:  # API format
            types = {node["class_type"] for node in load_api_workflow(path).values()}
        if types - registered:
            unknown[str(path.relative_to(REPO_ROOT))] = types - registered
    assert unknown == {}


@pytest.fixture
def sample_prompt(comfyui_server: ComfyServer, tiny_model_dir: Path) -> dict:
    """The shipped sample workflow pointed at the tiny FLUX.2, copied into the server's models/diffusers."""
    assert SAMPLE_WORKFLOW.is_file(), f"{SAMPLE_WORKFLOW.relative_to(REPO_ROOT)} is missing"
    target = comfyui_server.base_dir / "models" / "diffusers" / TINY_MODEL_NAME
    if not target.exists():
        # A copy, not a symlink: Python 3.11's Path.rglob does not descend into symlinked folders.
        shutil.copytree(tiny_model_dir, target)
    prompt = load_api_workflow(SAMPLE_WORKFLOW)
    loaders = [node for node in prompt.values() if node["class_type"] == "Flux2LoraLoadModel"]
    assert loaders, f"{SAMPLE_WORKFLOW.name} has no Flux2LoraLoadModel node"
    for node in loaders:
        node["inputs"]["model"] = TINY_MODEL_NAME
        if "folder_path" in node["inputs"]:
            node["inputs"]["folder_path"] = ""
        if "precision" in node["inputs"]:
            node["inputs"]["precision"] = "fp32"  # the CPU path; bf16 matmuls are slow on CPU
    return prompt


def test_sample_workflow_renders_png(comfy: ComfyClient, comfyui_server: ComfyServer, sample_prompt: dict):
    result = comfy.run(sample_prompt, timeout=600)
    assert result.ran == set(sample_prompt)
    samplers = [node for node in sample_prompt.values() if node["class_type"] == "Flux2LoraSample"]
    assert len(samplers) == 1
    width, height = samplers[0]["inputs"]["width"], samplers[0]["inputs"]["height"]
    images = result.images()
    assert len(images) == 1, result.outputs
    data = comfy.view_file(images[0]["filename"], images[0]["subfolder"], images[0]["type"])
    assert data[:8] == PNG_SIGNATURE
    with Image.open(io.BytesIO(data)) as png:
        assert png.format == "PNG"
        assert png.size == (width, height)
        pixels = png.convert("RGB").getextrema()
    assert any(low < high for low, high in pixels), "the sampled image is a single flat colour"


def test_sample_workflow_bad_precision_is_a_validation_error(comfy: ComfyClient, sample_prompt: dict):
    prompt = copy.deepcopy(sample_prompt)
    loader_id = next(nid for nid, node in prompt.items() if node["class_type"] == "Flux2LoraLoadModel")
    prompt[loader_id]["inputs"]["precision"] = "fp7"
    with pytest.raises(PromptRejected) as caught:
        comfy.post_prompt(prompt)
    assert caught.value.status == 400
    errors = caught.value.body["node_errors"]
    assert set(errors) == {loader_id}
    assert [(e["type"], e["extra_info"]["input_name"]) for e in errors[loader_id]["errors"]] == [
        ("value_not_in_list", "precision")
    ]
