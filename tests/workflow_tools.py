"""Conversions between ComfyUI's UI workflow format and its API format, for the shipped workflows.

ComfyUI's front end turns the UI format into the API format when it queues a prompt: widget values
are matched to the node's widget inputs in INPUT_TYPES order (seed-like inputs with
control_after_generate carry one extra value), links become [node_id, slot]. The tests use the same
rule to prove each UI workflow and its API twin describe the same graph; `python -m` on this module
writes the UI files from the API twins plus a layout.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN"}
UI_ONLY = {"Note", "MarkdownNote"}

# Input specs of ComfyUI built-ins the shipped workflows use (from ComfyUI's nodes.py).
BUILTIN_INPUTS: dict[str, dict[str, Any]] = {
    "SaveImage": {"required": {"images": ("IMAGE",), "filename_prefix": ("STRING", {"default": "ComfyUI"})}},
    "PreviewImage": {"required": {"images": ("IMAGE",)}},
}
BUILTIN_OUTPUTS: dict[str, tuple[str, ...]] = {"SaveImage": (), "PreviewImage": ()}
BUILTIN_OUTPUT_NAMES: dict[str, tuple[str, ...]] = {}
HANDWRITTEN_BUILTINS = frozenset(BUILTIN_INPUTS)

BUILTIN_SPECS_FILE = Path(__file__).resolve().parent / "workflow_builtin_specs.json"
"""Specs of more built-ins (the native FLUX.2 nodes), copied from a real ComfyUI's /object_info by
`python tests/workflow_tools.py --builtin-specs-from http://HOST:PORT` (a running ComfyUI); the e2e test
tests/e2e/test_native_workflow.py holds them (and the hand-written ones) against a live server."""

# Combo inputs whose choices are the model files of one models/ folder: empty on a test install, so a
# workflow's value there is a file name that only the user's machine can confirm.
MODEL_FILE_INPUTS: dict[tuple[str, str], str] = {
    ("UNETLoader", "unet_name"): "diffusion_models",
    ("CLIPLoader", "clip_name"): "text_encoders",
    ("VAELoader", "vae_name"): "vae",
    ("LoraLoaderModelOnly", "lora_name"): "loras",
    ("Flux2LoraLoadModel", "model"): "diffusers",
}


def is_model_file_input(class_type: str, name: str) -> bool:
    return (class_type, name) in MODEL_FILE_INPUTS


def spec_from_object_info(entry: dict[str, Any]) -> dict[str, Any]:
    """An /object_info entry's inputs as INPUT_TYPES spells them: V3 combos ("COMBO", {"options": [...]})
    become the V1 form ([...], {...}), which the front end treats the same; hidden inputs are dropped."""
    spec: dict[str, Any] = {}
    for section in ("required", "optional"):
        inputs = entry["input"].get(section, {})
        order = entry.get("input_order", {}).get(section, list(inputs))
        converted = {}
        for name in order:
            kind, *rest = inputs[name]
            opts = dict(rest[0]) if rest else {}
            if kind == "COMBO":
                kind = opts.pop("options")
            converted[name] = (kind, opts) if opts else (kind,)
        if converted:
            spec[section] = converted
    return spec


def builtin_specs_from_object_info(info: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """The fixture's content for node types `names`, from a whole /object_info answer."""
    keep = ("input", "input_order", "output", "output_name")
    return {name: {key: info[name][key] for key in keep if key in info[name]} for name in sorted(names)}


def _load_builtin_specs(path: Path = BUILTIN_SPECS_FILE) -> None:
    if not path.is_file():
        return
    for name, entry in json.loads(path.read_text(encoding="utf-8"))["nodes"].items():
        if name in HANDWRITTEN_BUILTINS:
            continue
        BUILTIN_INPUTS[name] = spec_from_object_info(entry)
        BUILTIN_OUTPUTS[name] = tuple(entry["output"])
        BUILTIN_OUTPUT_NAMES[name] = tuple(entry.get("output_name", entry["output"]))


_load_builtin_specs()


def _is_widget(entry: tuple) -> bool:
    kind = entry[0]
    return isinstance(kind, list) or kind in WIDGET_TYPES


def input_spec(node_classes: dict[str, type], class_type: str) -> dict[str, Any]:
    if class_type in node_classes:
        return node_classes[class_type].INPUT_TYPES()
    return BUILTIN_INPUTS[class_type]


def output_types(node_classes: dict[str, type], class_type: str) -> tuple[str, ...]:
    if class_type in node_classes:
        return tuple(node_classes[class_type].RETURN_TYPES)
    return BUILTIN_OUTPUTS[class_type]


# The front end (1.35, useIntWidget) adds the "control after generate" widget to an INT input named seed
# or noise_seed even without the flag: control_after_generate ?? ["seed", "noise_seed"].includes(name).
IMPLICIT_CONTROL_NAMES = ("seed", "noise_seed")


def widget_names(spec: dict[str, Any]) -> list[tuple[str, bool]]:
    """(name, has_control_value) for each widget input, in the order the front end lays them out."""
    names = []
    for section in ("required", "optional"):
        for name, entry in spec.get(section, {}).items():
            if _is_widget(entry):
                opts = entry[1] if len(entry) > 1 else {}
                control = opts.get("control_after_generate")
                if control is None:
                    control = entry[0] == "INT" and name in IMPLICIT_CONTROL_NAMES
                names.append((name, bool(control)))
    return names


def ui_to_api(ui: dict[str, Any], node_classes: dict[str, type]) -> dict[str, Any]:
    links = {link[0]: link for link in ui["links"]}
    api: dict[str, Any] = {}
    for node in ui["nodes"]:
        if node["type"] in UI_ONLY:
            continue
        spec = input_spec(node_classes, node["type"])
        inputs: dict[str, Any] = {}
        values = list(node.get("widgets_values", []))
        for name, has_control in widget_names(spec):
            if not values and name in spec.get("optional", {}):
                break  # an optional widget added after the workflow was saved: the front end keeps its default
            if not values:
                raise ValueError(f"node {node['id']} ({node['type']}): no widget value for {name}")
            inputs[name] = values.pop(0)
            if has_control:
                values.pop(0)
        if values:
            raise ValueError(f"node {node['id']} ({node['type']}): {len(values)} widget values left over")
        for slot in node.get("inputs", []):
            if slot.get("link") is not None:
                link = links[slot["link"]]
                inputs[slot["name"]] = [str(link[1]), link[2]]
        api[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return api


def api_to_ui(api: dict[str, Any], node_classes: dict[str, type], *, layout: dict[str, tuple[int, int]],
              notes: list[dict[str, Any]] = (), properties: dict[str, dict[str, Any]] | None = None,
              sizes: dict[str, tuple[int, int]] | None = None) -> dict[str, Any]:
    nodes, links = [], []
    link_id = 0
    outgoing: dict[tuple[str, int], list[int]] = {}
    incoming: dict[str, list[dict[str, Any]]] = {}
    for node_id, node in api.items():
        spec = input_spec(node_classes, node["class_type"])
        order = [n for s in ("required", "optional") for n in spec.get(s, {})]
        for name in order:
            value = node["inputs"].get(name)
            if isinstance(value, list):
                link_id += 1
                src, slot = value
                kind = output_types(node_classes, api[src]["class_type"])[slot]
                links.append([link_id, int(src), slot, int(node_id), len(incoming.get(node_id, [])), kind])
                outgoing.setdefault((src, slot), []).append(link_id)
                incoming.setdefault(node_id, []).append({"name": name, "type": kind, "link": link_id})
    for index, (node_id, node) in enumerate(api.items()):
        spec = input_spec(node_classes, node["class_type"])
        values = []
        for name, has_control in widget_names(spec):
            values.append(node["inputs"][name])
            if has_control:
                values.append("fixed")
        # Unlinked optional non-widget inputs still appear as empty slots.
        slots = list(incoming.get(node_id, []))
        for name, entry in spec.get("optional", {}).items():
            if not _is_widget(entry) and not any(s["name"] == name for s in slots):
                slots.append({"name": name, "type": entry[0], "link": None})
        outputs = [
            {"name": kind, "type": kind, "links": outgoing.get((node_id, slot), []), "slot_index": slot}
            for slot, kind in enumerate(output_types(node_classes, node["class_type"]))
        ]
        names = (node_classes[node["class_type"]].RETURN_NAMES if node["class_type"] in node_classes
                 else BUILTIN_OUTPUT_NAMES.get(node["class_type"], ()))
        for out, name in zip(outputs, names):
            out["name"] = name
        x, y = layout.get(node_id, (40 + 340 * index, 80))
        # Extra node properties, e.g. "models" (name, url, directory): the front end offers those downloads
        # when a loader's file is missing, as ComfyUI's own templates do.
        extra = (properties or {}).get(node_id, {})
        nodes.append({
            "id": int(node_id), "type": node["class_type"], "pos": [x, y],
            "size": list((sizes or {}).get(node_id, (320, 200))), "flags": {},
            "order": index, "mode": 0, "inputs": slots, "outputs": outputs,
            "properties": {"Node name for S&R": node["class_type"], **extra}, "widgets_values": values,
        })
    next_id = max(int(n) for n in api) + 1
    for offset, note in enumerate(notes):
        nodes.append({
            "id": next_id + offset, "type": "MarkdownNote", "pos": list(note["pos"]), "size": list(note.get("size", (420, 260))),
            "flags": {}, "order": len(nodes), "mode": 0, "inputs": [], "outputs": [], "properties": {},
            "widgets_values": [note["text"]], "color": "#432", "bgcolor": "#653",
        })
    return {
        "last_node_id": max(n["id"] for n in nodes), "last_link_id": link_id, "nodes": nodes, "links": links,
        "groups": [], "config": {}, "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}}, "version": 0.4,
    }


def _read_object_info(source: str) -> tuple[dict[str, Any], str]:
    if source.startswith(("http://", "https://")):
        import urllib.request

        with urllib.request.urlopen(source.rstrip("/") + "/object_info", timeout=60) as answer:
            info = json.loads(answer.read())
        with urllib.request.urlopen(source.rstrip("/") + "/system_stats", timeout=60) as answer:
            version = json.loads(answer.read())["system"].get("comfyui_version", "(unknown version)")
        return info, version
    return json.loads(Path(source).read_text(encoding="utf-8")), "(unknown version)"


def main(argv: list[str] | None = None) -> int:
    """Write workflows/<name>.json from workflows/api/<name>.json and tests/workflow_layouts/<name>.json.

    With --builtin-specs-from URL (a running ComfyUI, e.g. http://127.0.0.1:8188) or a saved /object_info
    JSON file, rewrite tests/workflow_builtin_specs.json first, for the built-in node types the API
    workflows use."""
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["--builtin-specs-from"] and len(args) == 2:
        info, version = _read_object_info(args[1])
        used = {n["class_type"] for p in (Path(__file__).resolve().parents[1] / "workflows" / "api").glob("*.json")
                for n in json.loads(p.read_text()).values()}
        # The hand-written specs above stay; the fixture holds every other built-in in use.
        names = sorted(n for n in used if n in info and not info[n].get("python_module", "").startswith("custom_nodes.")
                       and n not in HANDWRITTEN_BUILTINS)
        specs = builtin_specs_from_object_info(info, names)
        body = ",\n".join(f"  {json.dumps(name)}: {json.dumps(entry)}" for name, entry in specs.items())
        BUILTIN_SPECS_FILE.write_text(
            f'{{"source": {json.dumps(f"/object_info of ComfyUI {version}")},\n "nodes": {{\n{body}\n }}\n}}\n', encoding="utf-8")
        print(BUILTIN_SPECS_FILE)
        _load_builtin_specs()
    elif args:
        print("usage: python tests/workflow_tools.py [--builtin-specs-from URL|OBJECT_INFO.json]", file=sys.stderr)
        return 2
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from conftest import REPO_ROOT, import_pack

    pack = import_pack()
    for api_path in sorted((REPO_ROOT / "workflows" / "api").glob("*.json")):
        layout_path = REPO_ROOT / "tests" / "workflow_layouts" / api_path.name
        layout = json.loads(layout_path.read_text()) if layout_path.exists() else {}
        ui = api_to_ui(json.loads(api_path.read_text()), pack.NODE_CLASS_MAPPINGS,
                       layout={k: tuple(v) for k, v in layout.get("positions", {}).items()},
                       notes=layout.get("notes", []), properties=layout.get("properties", {}),
                       sizes={k: tuple(v) for k, v in layout.get("sizes", {}).items()})
        out = REPO_ROOT / "workflows" / api_path.name
        out.write_text(json.dumps(ui, indent=2) + "\n")
        print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
