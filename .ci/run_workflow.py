"""Run one of the pack's shipped API-format workflows headlessly on tiny FLUX.2 weights.

Usage: python .ci/run_workflow.py [--root DIR] [--workflow workflows/api/NAME.json]
The root gets a ComfyUI-like layout (models/diffusers/flux2-tiny, output/, input/); the tiny models the workflow
names (TINY_MODELS: dev, or klein base and distilled) are written there once. The pack is imported the way ComfyUI imports a custom node folder.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY_MODELS = {
    "flux2-tiny": {"flavour": "dev"},
    "flux2-klein-4b-tiny": {"flavour": "klein-4b"},
    "flux2-klein-4b-distilled-tiny": {"flavour": "klein-4b", "distilled": True},
}
"""The tiny models the shipped workflows name, by folder under models/diffusers (the same seed: the distilled
klein has the base klein's weights, so the klein workflow previews its LoRA on a model of the same size)."""
DEFAULT_WORKFLOW = REPO / "workflows" / "api" / "flux2_lora_train_and_validate.json"
FALLBACK_WORKFLOW = REPO / "workflows" / "api" / "flux2_sample.json"


def import_pack(name: str = "flux2_lora_pack"):
    spec = importlib.util.spec_from_file_location(name, REPO / "__init__.py", submodule_search_locations=[str(REPO)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="demo_output", help="folder for models/, input/ and output/")
    parser.add_argument("--workflow", default=None, help="API-format workflow (default: train and validate)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    root = Path(args.root).resolve()
    workflow = Path(args.workflow) if args.workflow else (DEFAULT_WORKFLOW if DEFAULT_WORKFLOW.exists() else FALLBACK_WORKFLOW)
    sys.path.insert(0, str(REPO))
    from trainer.sample_data import make_sample_dataset
    from trainer.tiny import make_tiny

    named = {node["inputs"].get("model") for node in json.loads(workflow.read_text()).values()
             if node.get("class_type") == "Flux2LoraLoadModel"}
    for name in sorted(named & set(TINY_MODELS)) or ["flux2-tiny"]:
        model_dir = root / "models" / "diffusers" / name
        if not (model_dir / "model_index.json").is_file():
            print(f"writing tiny FLUX.2 weights to {model_dir}")
            make_tiny(out_dir=model_dir, seed=0, **TINY_MODELS[name])
    dataset_dir = root / "input" / "flux2_lora_sample_squares"
    if not dataset_dir.is_dir():
        print(f"writing the sample dataset to {dataset_dir}")
        make_sample_dataset(out_dir=dataset_dir, count=8, size=64)
    pack = import_pack()
    headless = importlib.import_module(f"{pack.__name__}.nodes.headless")
    bridge = importlib.import_module(f"{pack.__name__}.nodes.comfy_bridge")
    bridge.set_headless_root(root)
    graph = headless.load_api_workflow(workflow)
    started = time.perf_counter()
    result = headless.run_graph(graph)
    elapsed = time.perf_counter() - started
    print(f"\nworkflow {workflow.name} finished in {elapsed:.1f} s")
    for node_id, ui in result["ui"].items():
        for kind, items in ui.items():
            for item in items:
                print(f"  node {node_id} ({graph[node_id]['class_type']}) {kind}: {item}")
    print(f"results are under {root / 'output'}")
    (root / "output").mkdir(parents=True, exist_ok=True)
    (root / "output" / "last_run.json").write_text(json.dumps({"workflow": str(workflow), "ui": result["ui"]}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
