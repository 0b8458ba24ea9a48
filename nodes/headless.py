"""Run an API-format workflow of this pack without a ComfyUI server.

The README's main job and a few tests use it: the same node classes ComfyUI runs, executed in
dependency order. ComfyUI's own SaveImage/PreviewImage are stood in for by a PNG writer, since that is all
they do for these graphs; any other foreign node is refused by name.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from . import NODE_CLASS_MAPPINGS, comfy_bridge

log = logging.getLogger("flux2_lora")


def _save_png_batch(images, *, filename_prefix: str, out_dir: Path) -> list[str]:
    import numpy as np
    from PIL import Image

    out_dir.mkdir(parents=True, exist_ok=True)
    prefix = Path(filename_prefix)
    target = (out_dir / prefix.parent).resolve()
    if not target.is_relative_to(out_dir.resolve()):
        raise ValueError(f"SaveImage: filename_prefix {filename_prefix!r} leaves the output folder.")
    target.mkdir(parents=True, exist_ok=True)
    existing = len(list(target.glob(f"{prefix.name}_*.png")))
    paths = []
    for i, image in enumerate(images):
        array = (image.detach().float().clamp(0, 1).cpu().numpy() * 255.0).round().astype(np.uint8)
        path = target / f"{prefix.name}_{existing + i + 1:05d}_.png"
        Image.fromarray(array).save(path)
        paths.append(str(path))
    return paths


class _SaveImage:
    def run(self, images, filename_prefix: str = "ComfyUI"):
        paths = _save_png_batch(images, filename_prefix=filename_prefix, out_dir=comfy_bridge.output_directory())
        return {"ui": {"images": paths}, "result": ()}


STAND_INS = {"SaveImage": _SaveImage, "PreviewImage": _SaveImage}


def _order(graph: Mapping[str, Any]) -> list[str]:
    order: list[str] = []
    state: dict[str, int] = {}

    def visit(node_id: str, chain: tuple[str, ...]) -> None:
        if state.get(node_id) == 2:
            return
        if state.get(node_id) == 1:
            raise ValueError(f"workflow has a cycle through nodes {' -> '.join(chain + (node_id,))}")
        if node_id not in graph:
            raise ValueError(f"workflow links to node {node_id!r}, which is not in the graph")
        state[node_id] = 1
        for value in graph[node_id].get("inputs", {}).values():
            if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str):
                visit(value[0], chain + (node_id,))
        state[node_id] = 2
        order.append(node_id)

    for node_id in sorted(graph):
        visit(node_id, ())
    return order


def run_graph(graph: Mapping[str, Any]) -> dict[str, Any]:
    """Execute every node of an API-format graph; returns {node_id: outputs or ui dict}."""
    results: dict[str, Any] = {}
    ui: dict[str, Any] = {}
    for node_id in _order(graph):
        node = graph[node_id]
        class_type = node.get("class_type")
        cls = NODE_CLASS_MAPPINGS.get(class_type)
        if cls is None and class_type in STAND_INS:
            instance, function = STAND_INS[class_type](), "run"
        elif cls is not None:
            instance, function = cls(), cls.FUNCTION
        else:
            raise ValueError(f"node {node_id}: class_type {class_type!r} is not a node of this pack; run it in ComfyUI.")
        kwargs = {}
        for name, value in node.get("inputs", {}).items():
            if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str):
                kwargs[name] = results[value[0]][value[1]]
            else:
                kwargs[name] = value
        log.info("running node %s (%s)", node_id, class_type)
        out = getattr(instance, function)(**kwargs)
        if isinstance(out, dict):
            ui[node_id] = out.get("ui", {})
            out = out.get("result", ())
        results[node_id] = tuple(out)
    return {"outputs": results, "ui": ui}


def load_api_workflow(path: str | Path, *, overrides: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """Read an API-format workflow; overrides maps node id -> {input: value} set before running."""
    path = Path(path)
    try:
        graph = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"workflow {path}: cannot read it as JSON ({exc}).") from exc
    if not isinstance(graph, dict) or not all(isinstance(n, dict) and "class_type" in n for n in graph.values()):
        raise ValueError(f"workflow {path} is not in ComfyUI's API format (Export (API) in ComfyUI's menu).")
    for node_id, inputs in (overrides or {}).items():
        if node_id not in graph:
            raise ValueError(f"override for node {node_id!r}: no such node in {path}")
        graph[node_id].setdefault("inputs", {}).update(inputs)
    return graph
