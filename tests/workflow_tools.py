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
    "ImageBatch": {"required": {"image1": ("IMAGE",), "image2": ("IMAGE",)}},
}
BUILTIN_OUTPUTS: dict[str, tuple[str, ...]] = {"SaveImage": (), "PreviewImage": (), "ImageBatch": ("IMAGE",)}


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


def widget_names(spec: dict[str, Any]) -> list[tuple[str, bool]]:
    """(name, has_control_value) for each widget input, in the order the front end lays them out."""
    names = []
    for section in ("required", "optional"):
        for name, entry in spec.get(section, {}).items():
            if _is_widget(entry):
                opts = entry[1] if len(entry) > 1 else {}
                names.append((name, bool(opts.get("control_after_generate"))))
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
              notes: list[dict[str, Any]] = ()) -> dict[str, Any]:
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
        if node["class_type"] in node_classes:
            for out, name in zip(outputs, node_classes[node["class_type"]].RETURN_NAMES):
                out["name"] = name
        x, y = layout.get(node_id, (40 + 340 * index, 80))
        nodes.append({
            "id": int(node_id), "type": node["class_type"], "pos": [x, y], "size": [320, 200], "flags": {},
            "order": index, "mode": 0, "inputs": slots, "outputs": outputs,
            "properties": {"Node name for S&R": node["class_type"]}, "widgets_values": values,
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


def main() -> int:
    """Write workflows/<name>.json from workflows/api/<name>.json and workflows/layout/<name>.json."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from conftest import REPO_ROOT, import_pack

    pack = import_pack()
    for api_path in sorted((REPO_ROOT / "workflows" / "api").glob("*.json")):
        layout_path = REPO_ROOT / "tests" / "workflow_layouts" / api_path.name
        layout = json.loads(layout_path.read_text()) if layout_path.exists() else {}
        ui = api_to_ui(json.loads(api_path.read_text()), pack.NODE_CLASS_MAPPINGS,
                       layout={k: tuple(v) for k, v in layout.get("positions", {}).items()},
                       notes=layout.get("notes", []))
        out = REPO_ROOT / "workflows" / api_path.name
        out.write_text(json.dumps(ui, indent=2) + "\n")
        print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
