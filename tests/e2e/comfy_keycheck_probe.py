"""Run the pack's save-time key check (nodes/comfy_keycheck.py) on LoRA files in ComfyUI's own interpreter.

Run with ComfyUI's interpreter (COMFYUI_PY), never imported by pytest:

    python comfy_keycheck_probe.py --comfyui-dir DIR --lora good=A.safetensors --lora renamed=B.safetensors \
        --out report.json

The pack is imported as ComfyUI imports a custom node folder (a package from the repo's __init__.py), with ComfyUI's
folder first on sys.path, so `comfy` is ComfyUI's own. For each file the report holds check_lora_keys' result:
whether it ran, the key count, the dropped keys, the model it was checked on and the node's line.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
PACK_NAME = "flux2_lora_pack"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--comfyui-dir", required=True, type=Path)
    parser.add_argument("--lora", action="append", required=True, metavar="LABEL=PATH")
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)

    sys.path.insert(0, str(args.comfyui_dir.resolve()))
    from comfy.cli_args import args as comfy_args

    comfy_args.cpu = True  # what `main.py --cpu` sets before comfy.model_management is imported
    spec = importlib.util.spec_from_file_location(PACK_NAME, REPO_ROOT / "__init__.py",
                                                  submodule_search_locations=[str(REPO_ROOT)])
    pack = importlib.util.module_from_spec(spec)
    sys.modules[PACK_NAME] = pack
    spec.loader.exec_module(pack)
    keycheck = importlib.import_module(f"{PACK_NAME}.nodes.comfy_keycheck")
    report = {}
    for item in args.lora:
        label, _, path = item.partition("=")
        check = keycheck.check_lora_keys(path)
        report[label] = {"ran": check.ran, "ok": check.ok, "keys": check.keys, "dropped": list(check.dropped),
                         "unpatched": list(check.unpatched), "error": check.error, "model": check.model, "reason": check.reason,
                         "line": check.line()}
    args.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
