"""The native-validation workflow (train with the pack, sample with ComfyUI's own FLUX.2 nodes) against a
real ComfyUI's /object_info: every node type and input name exists, every link joins matching types,
every combo value is a choice or a model file name, and ComfyUI's own validation rejects the prompt for
the missing model files and nothing else.

The workflow cannot run here: ComfyUI's native FLUX.2 model is built at the full width of the real
checkpoint. The loaders' file lists (models/diffusion_models, text_encoders, vae, diffusers) are empty in
the test's base directory, so for those inputs the value is accepted as a model file name and checked
against the names ComfyUI's own FLUX.2 template uses instead.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from comfyui_harness import (
    REPO_ROOT,
    ComfyClient,
    ComfyServer,
    PromptRejected,
    load_api_workflow,
)

sys.path.insert(0, str(REPO_ROOT / "tests"))
import workflow_tools

pytestmark = pytest.mark.e2e

NAME = "flux2_lora_train_native_validate"
API_PATH = REPO_ROOT / "workflows" / "api" / f"{NAME}.json"
UI_PATH = REPO_ROOT / "workflows" / f"{NAME}.json"
FRONTEND_ONLY_TYPES = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
NATIVE_SAMPLING_NODES = {
    "UNETLoader", "CLIPLoader", "VAELoader", "CLIPTextEncode", "FluxGuidance", "RandomNoise", "KSamplerSelect",
    "Flux2Scheduler", "EmptyFlux2LatentImage", "BasicGuider", "SamplerCustomAdvanced", "VAEDecode", "SaveImage",
}
# The ComfyUI template whose loader file names the workflow uses.
TEMPLATE_PACKAGE = "comfyui_workflow_templates_media_image"
TEMPLATE_FILE = "image_flux2_text_to_image.json"


@pytest.fixture(scope="module")
def info(comfy: ComfyClient) -> dict[str, Any]:
    return comfy.object_info()


@pytest.fixture(scope="module")
def api() -> dict[str, Any]:
    return load_api_workflow(API_PATH)


@pytest.fixture(scope="module")
def ui() -> dict[str, Any]:
    return json.loads(UI_PATH.read_text(encoding="utf-8"))


def declared_inputs(info: dict[str, Any], class_type: str) -> dict[str, list]:
    spec = info[class_type]["input"]
    return {**spec.get("required", {}), **spec.get("optional", {})}


def combo_choices(entry: list) -> list | None:
    """The choices of a combo input in either spelling (V1: [[...], opts]; V3: ["COMBO", {"options": [...]}])."""
    if isinstance(entry[0], list):
        return entry[0]
    if entry[0] == "COMBO":
        return entry[1]["options"]
    return None


def input_type(entry: list) -> str:
    return "COMBO" if combo_choices(entry) is not None else entry[0]


def test_the_workflow_is_native_where_it_samples(api: dict[str, Any]):
    types = {node["class_type"] for node in api.values()}
    assert NATIVE_SAMPLING_NODES <= types
    assert {"Flux2LoraLoadModel", "Flux2LoraBuildDataset", "Flux2LoraTrain", "Flux2LoraApply"} <= types
    # Side by side: one sampler on the UNETLoader's model, one on Apply LoRA's patched native model.
    unet = next(nid for nid, n in api.items() if n["class_type"] == "UNETLoader")
    apply = next(nid for nid, n in api.items() if n["class_type"] == "Flux2LoraApply")
    assert api[apply]["inputs"]["native_model"] == [unet, 0]
    guided = sorted(tuple(n["inputs"]["model"]) for n in api.values() if n["class_type"] == "BasicGuider")
    assert guided == sorted([(unet, 0), (apply, 1)])


def test_every_node_type_and_input_name_exists(info: dict[str, Any], api: dict[str, Any], ui: dict[str, Any]):
    unknown_types = {n["class_type"] for n in api.values()} - set(info)
    unknown_types |= {n["type"] for n in ui["nodes"]} - FRONTEND_ONLY_TYPES - set(info)
    assert unknown_types == set()
    problems = []
    for node_id, node in api.items():
        declared = declared_inputs(info, node["class_type"])
        required = set(info[node["class_type"]]["input"].get("required", {}))
        problems += [f"{node_id} ({node['class_type']}): unknown input {name}" for name in set(node["inputs"]) - set(declared)]
        problems += [f"{node_id} ({node['class_type']}): missing required {name}" for name in required - set(node["inputs"])]
    for node in ui["nodes"]:
        if node["type"] in FRONTEND_ONLY_TYPES:
            continue
        declared = declared_inputs(info, node["type"])
        problems += [f"UI {node['id']} ({node['type']}): unknown input slot {slot['name']}"
                     for slot in node.get("inputs", []) if slot["name"] not in declared]
    assert problems == []


def test_every_link_joins_matching_types(info: dict[str, Any], api: dict[str, Any], ui: dict[str, Any]):
    mismatches = []
    links = 0
    for node_id, node in api.items():
        declared = declared_inputs(info, node["class_type"])
        for name, value in node["inputs"].items():
            if not isinstance(value, list):
                continue
            links += 1
            source, slot = value
            produced = info[api[source]["class_type"]]["output"][slot]
            wanted = input_type(declared[name])
            if produced != wanted:
                mismatches.append(f"{source}[{slot}] {produced} -> {node_id}.{name} {wanted}")
    # The UI file's links: the type recorded on the link, the source slot's type and the target input's type.
    by_id = {node["id"]: node for node in ui["nodes"]}
    for link_id, src, src_slot, dst, dst_slot, kind in ui["links"]:
        produced = info[by_id[src]["type"]]["output"][src_slot]
        target = by_id[dst]["inputs"][dst_slot]
        assert target["link"] == link_id, f"UI link {link_id} does not match {dst}'s input slot {dst_slot}"
        wanted = input_type(declared_inputs(info, by_id[dst]["type"])[target["name"]])
        if not produced == kind == wanted:
            mismatches.append(f"UI link {link_id}: {produced} / recorded {kind} -> {wanted}")
    assert mismatches == []
    assert links == len(ui["links"]) > 0


def test_combo_values_are_choices_or_model_files(info: dict[str, Any], api: dict[str, Any]):
    """A combo value must be one of the server's choices, except on model-file inputs: their lists come
    from the models/ folders, which are empty in the test install (the value is then a file name the
    user's machine must have; see test_loader_files_are_the_ones_comfyui_templates_use)."""
    bad, model_files = [], {}
    for node_id, node in api.items():
        declared = declared_inputs(info, node["class_type"])
        for name, value in node["inputs"].items():
            if name not in declared:
                continue  # reported by test_every_node_type_and_input_name_exists
            choices = combo_choices(declared[name])
            if choices is None or isinstance(value, list) or value in choices:
                continue
            if workflow_tools.is_model_file_input(node["class_type"], name):
                model_files[(node["class_type"], name)] = value
            else:
                bad.append(f"{node_id}.{name}={value!r} not in {choices[:20]}")
    assert bad == []
    assert model_files == {
        ("Flux2LoraLoadModel", "model"): "FLUX.2-dev",
        ("UNETLoader", "unet_name"): "flux2_dev_fp8mixed.safetensors",
        ("CLIPLoader", "clip_name"): "mistral_3_small_flux2_bf16.safetensors",
        ("VAELoader", "vae_name"): "flux2-vae.safetensors",
    }
    assert next(n for n in api.values() if n["class_type"] == "CLIPLoader")["inputs"]["type"] == "flux2"


def test_comfyui_rejects_the_prompt_only_for_the_missing_model_files(comfy: ComfyClient, comfyui_server: ComfyServer,
                                                                     api: dict[str, Any]):
    # ComfyUI's own validation also checks link types and widget ranges; the dataset folder exists so that
    # Build Dataset's VALIDATE_INPUTS passes. Nothing is queued: the model files are absent.
    dataset = api["2"]["inputs"]["image_folder"]
    (comfyui_server.base_dir / "input" / dataset).mkdir(parents=True, exist_ok=True)
    with pytest.raises(PromptRejected) as caught:
        comfy.post_prompt(api)
    assert caught.value.status == 400
    errors = caught.value.body["node_errors"]
    found = {(node_id, e["type"], e["extra_info"]["input_name"]) for node_id, entry in errors.items() for e in entry["errors"]}
    loaders = {nid: n["class_type"] for nid, n in api.items()}
    expected = {(nid, "value_not_in_list", name) for nid, ct in loaders.items()
                for (cls, name) in workflow_tools.MODEL_FILE_INPUTS if cls == ct}
    assert found == expected


# Runs inside ComfyUI's environment: ComfyUI's own ExecutionList orders the prompt, with stand-in node
# classes built from /object_info (so nothing loads and no custom node code runs).
ORDER_SCRIPT = r"""
import asyncio, json, sys
prompt_path, info_path = sys.argv[1:3]
sys.argv = [sys.argv[0], "--cpu"]
import comfy.options
comfy.options.enable_args_parsing()
import nodes
from comfy_execution.graph import DynamicPrompt, ExecutionList
info = json.load(open(info_path))
prompt = json.load(open(prompt_path))
for class_type in {n["class_type"] for n in prompt.values()}:
    spec = info[class_type]
    nodes.NODE_CLASS_MAPPINGS[class_type] = type(class_type, (), {
        "INPUT_TYPES": classmethod(lambda cls, s=spec: s["input"]), "RETURN_TYPES": tuple(spec["output"]),
        "FUNCTION": "run", "run": lambda self: None, "OUTPUT_NODE": spec["output_node"]})
class NoCache:
    def get(self, key):
        return None
    def set(self, key, value):
        pass
async def order():
    execution = ExecutionList(DynamicPrompt(prompt), NoCache())
    for node_id, node in prompt.items():
        if info[node["class_type"]]["output_node"]:
            execution.add_node(node_id)
    ran = []
    while not execution.is_empty():
        node_id, error, _ = await execution.stage_node_execution()
        if error:
            raise RuntimeError(error)
        ran.append(node_id)
        execution.complete_node_execution()
    return ran
print(json.dumps(asyncio.run(order())))
"""


def test_training_runs_before_any_native_node(comfyui_server: ComfyServer, info: dict[str, Any], api: dict[str, Any],
                                              tmp_path: Path):
    """The training process needs the GPU to itself: ComfyUI's scheduler must run Train LoRA before it loads
    the native transformer, text encoder or VAE (its pick order prefers nodes that lead to an output node,
    and Train LoRA is one)."""
    (tmp_path / "prompt.json").write_text(json.dumps(api))
    (tmp_path / "info.json").write_text(json.dumps(info))
    root = comfyui_server.install.root
    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root), "HOME": str(tmp_path)}
    result = subprocess.run([str(comfyui_server.install.python), "-c", ORDER_SCRIPT, str(tmp_path / "prompt.json"),
                             str(tmp_path / "info.json")], cwd=root, env=env, capture_output=True, text=True, timeout=300,
                            check=False)
    assert result.returncode == 0, result.stderr[-4000:]
    order = json.loads(result.stdout.strip().splitlines()[-1])
    assert sorted(order) == sorted(api)
    train = order.index(next(nid for nid, n in api.items() if n["class_type"] == "Flux2LoraTrain"))
    native = [nid for nid in order if not api[nid]["class_type"].startswith("Flux2Lora")]
    assert all(order.index(nid) > train for nid in native), order


def _template_loader_values(python: Path) -> dict[tuple[str, str], set[str]]:
    probe = ("import importlib.util, sys; spec = importlib.util.find_spec(sys.argv[1]); "
             "print(spec.submodule_search_locations[0] if spec else '')")
    out = subprocess.run([str(python), "-c", probe, TEMPLATE_PACKAGE], capture_output=True, text=True, timeout=60, check=True)
    folder = out.stdout.strip()
    path = Path(folder) / "templates" / TEMPLATE_FILE if folder else None
    if path is None or not path.is_file():
        pytest.skip(f"ComfyUI's environment has no {TEMPLATE_PACKAGE}/templates/{TEMPLATE_FILE}")
    data = json.loads(path.read_text(encoding="utf-8"))
    graphs = [data] + data.get("definitions", {}).get("subgraphs", [])
    fields = {"UNETLoader": "unet_name", "CLIPLoader": "clip_name", "VAELoader": "vae_name"}
    values: dict[tuple[str, str], set[str]] = {}
    for graph in graphs:
        for node in graph.get("nodes", []):
            if node.get("type") in fields:
                values.setdefault((node["type"], fields[node["type"]]), set()).add(node["widgets_values"][0])
    return values


def test_loader_files_are_the_ones_comfyui_templates_use(comfyui_server: ComfyServer, api: dict[str, Any]):
    template = _template_loader_values(comfyui_server.install.python)
    ours = {(n["class_type"], name): value for n in api.values() for name, value in n["inputs"].items()
            if (n["class_type"], name) in template}
    assert set(ours) == set(template)
    assert all(value in template[key] for key, value in ours.items()), (ours, template)


def test_builtin_specs_of_workflow_tools_match_the_server(info: dict[str, Any]):
    """tests/workflow_builtin_specs.json (and the hand-written specs) drive the unit tests without a server;
    here they are held against the live /object_info: same inputs in the same order, same types."""

    def shape(spec: dict[str, Any], class_type: str) -> list:
        rows = []
        for section in ("required", "optional"):
            for name, entry in spec.get(section, {}).items():
                kind = entry[0]
                if isinstance(kind, list) and workflow_tools.is_model_file_input(class_type, name):
                    kind = "model files"
                rows.append((section, name, kind))
        return rows

    drift = {}
    for class_type, spec in workflow_tools.BUILTIN_INPUTS.items():
        live = workflow_tools.spec_from_object_info(info[class_type])
        if shape(spec, class_type) != shape(live, class_type):
            drift[class_type] = (shape(spec, class_type), shape(live, class_type))
        if tuple(info[class_type]["output"]) != workflow_tools.BUILTIN_OUTPUTS[class_type]:
            drift[f"{class_type} outputs"] = (workflow_tools.BUILTIN_OUTPUTS[class_type], info[class_type]["output"])
    assert drift == {}, "refresh with: python tests/workflow_tools.py --builtin-specs-from http://HOST:PORT"
