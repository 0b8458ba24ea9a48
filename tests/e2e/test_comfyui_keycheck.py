"""The save-time ComfyUI key check (nodes/comfy_keycheck.py) in a real ComfyUI.

1. In a running ComfyUI, through the HTTP API: Train LoRA attaches a finished run folder and Save LoRA copies its
   LoRA. A good file (the trainer's own save path, on the tiny FLUX.2's 256-wide 2 + 3 blocks) shows "all N keys
   load in ComfyUI" on both nodes and is copied; the same file with one key renamed is reported by Train LoRA
   (its run info names the key; the run is not refused) and refused by Save LoRA, whose error names the renamed key
   and the key it orphaned, and nothing is written under models/loras.
2. The check function itself in ComfyUI's interpreter (tests/e2e/comfy_keycheck_probe.py) at FLUX.2-dev's full
   width on the meta device: the good file loads on the real 8 + 48-block model, the renamed one is refused, and
   the diffusers-layout twin of the good file is caught losing the keys stock ComfyUI drops for it.

Without COMFYUI_DIR these skip.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from comfyui_harness import (
    REPO_ROOT,
    ComfyClient,
    ComfyInstall,
    ComfyServer,
    ExecutionFailed,
    install_sample_dataset,
    install_tiny_model,
    load_api_workflow,
)
from safetensors import safe_open
from safetensors.torch import load_file, save_file

pytestmark = pytest.mark.e2e

WORKFLOW = REPO_ROOT / "workflows" / "api" / "flux2_lora_train_and_validate.json"
PROBE = Path(__file__).resolve().parent / "comfy_keycheck_probe.py"
TRAIN_ID, SAVE_ID = "3", "12"
RANK, ALPHA = 4, 2.0
RENAMED_FROM = "diffusion_model.double_blocks.0.img_attn.proj.lora_B.weight"
RENAMED_TO = "diffusion_model.double_blocks.0.img_attn.proj_out.lora_B.weight"
ORPHANED = "diffusion_model.double_blocks.0.img_attn.proj.lora_A.weight"
"""The module's lora_A: without its lora_B no LoRA format takes it, so ComfyUI drops it too."""
A_RENAMED_FROM = ORPHANED
A_RENAMED_TO = "diffusion_model.double_blocks.0.img_attn.proj_out.lora_A.weight"
"""Renaming a lora_A instead leaves a lora_B alone, on which ComfyUI's loader raises KeyError (the node fails)."""
PROBE_TIMEOUT_S = 300


def _adapter_state(**transformer_config: Any) -> tuple[dict, int]:
    """(PEFT-named LoRA state of every preset='all' module with trained-looking values, hidden size) of a
    Flux2Transformer2DModel built on meta with `transformer_config`."""
    import torch
    from accelerate import init_empty_weights
    from diffusers import Flux2Transformer2DModel
    from flux2_lora_pack.trainer.lora import ADAPTER_NAME, apply_lora
    from flux2_lora_pack.trainer.parallelize import DistEnv, full_lora_state
    from peft.tuners.lora import LoraLayer

    with init_empty_weights():
        transformer = Flux2Transformer2DModel(**transformer_config)
    apply_lora(transformer, preset="all", rank=RANK, alpha=ALPHA)
    generator = torch.Generator().manual_seed(0)
    for module in transformer.modules():
        if isinstance(module, LoraLayer):
            lora_a, lora_b = module.lora_A[ADAPTER_NAME], module.lora_B[ADAPTER_NAME]
            bound = 1.0 / math.sqrt(lora_a.in_features)
            lora_a.weight = torch.nn.Parameter((torch.rand(lora_a.weight.shape, generator=generator) * 2 - 1) * bound,
                                               requires_grad=False)
            lora_b.weight = torch.nn.Parameter(torch.randn(lora_b.weight.shape, generator=generator),
                                               requires_grad=False)
    state = full_lora_state(transformer, env=DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))
    return state, transformer.config.num_attention_heads * transformer.config.attention_head_dim


def _write_files(out: Path, *, flavour: str, layouts: tuple[str, ...] = ("comfyui",), **config: Any) -> dict[str, Path]:
    """The trainer's save path (save_trained_lora with its header), plus the good file with RENAMED_FROM renamed."""
    from flux2_lora_pack.trainer.lora_keys import lora_metadata, save_trained_lora

    state, hidden = _adapter_state(**config)
    metadata = lora_metadata(rank=RANK, alpha=ALPHA, targets="all", base_model=f"FLUX.2-{flavour}", steps=1,
                             dataset_fingerprint="none", extra={"adapter_type": "lora"})
    metadata["model_flavour"] = json.dumps(flavour)
    out.mkdir(parents=True, exist_ok=True)
    paths = {layout: save_trained_lora(out / f"{layout}.safetensors", state=state, rank=RANK, alpha=ALPHA,
                                       hidden_size=hidden, layout=layout, metadata=metadata) for layout in layouts}
    for label, old, new in (("renamed", RENAMED_FROM, RENAMED_TO), ("renamed_a", A_RENAMED_FROM, A_RENAMED_TO)):
        renamed = load_file(str(paths["comfyui"]))
        renamed[new] = renamed.pop(old)
        paths[label] = out / f"{label}.safetensors"
        save_file(renamed, str(paths[label]), metadata=metadata)
    return paths


def _keys(path: Path) -> list[str]:
    with safe_open(str(path), framework="pt") as handle:
        return list(handle.keys())


# ---------------------------------------------------------------------------------------------------------------
# 1. Save LoRA and Train LoRA in a running ComfyUI


@pytest.fixture(scope="module")
def attach_graph(comfyui_server: ComfyServer, tiny_model_dir: Path):
    """A function run_folder -> API prompt: the shipped workflow's Load FLUX.2 -> Build Dataset -> Train LoRA
    (launch=attach) -> Save LoRA, nothing else."""
    from flux2_lora_pack.trainer.tiny import TRANSFORMER_CONFIG

    install_tiny_model(comfyui_server.base_dir, tiny_model_dir=tiny_model_dir)
    install_sample_dataset(comfyui_server.base_dir)
    shipped = load_api_workflow(WORKFLOW)
    assert shipped[TRAIN_ID]["class_type"] == "Flux2LoraTrain" and shipped[SAVE_ID]["class_type"] == "Flux2LoraSave"
    keep, frontier = set(), {SAVE_ID}
    while frontier:  # Save LoRA and everything it depends on
        keep |= frontier
        frontier = {v[0] for nid in frontier for v in shipped[nid]["inputs"].values()
                    if isinstance(v, list) and len(v) == 2} - keep
    runs = comfyui_server.base_dir / "output" / "flux2_lora" / "runs"
    files = _write_files(runs.parent / "keycheck_files", flavour="dev", **TRANSFORMER_CONFIG)

    def graph(label: str, filename: str) -> tuple[dict[str, Any], Path]:
        from flux2_lora_pack.trainer.events import append_event

        run_dir = runs / f"keycheck_{label}"
        run_dir.mkdir(parents=True)
        (run_dir / "lora.safetensors").write_bytes(files[label].read_bytes())
        append_event(run_dir, "step", step=1, loss=0.5)
        append_event(run_dir, "end", step=1, lora_path="lora.safetensors")
        prompt = {nid: json.loads(json.dumps(shipped[nid])) for nid in keep}
        prompt[TRAIN_ID]["inputs"].update(launch="attach", attach_run_folder=str(run_dir))
        prompt[SAVE_ID]["inputs"]["filename"] = filename
        return prompt, run_dir

    return graph, files


def test_save_lora_reports_all_keys_load_and_copies(comfy: ComfyClient, comfyui_server: ComfyServer, attach_graph):
    graph, files = attach_graph
    prompt, _ = graph("comfyui", "keycheck/good")
    result = comfy.run(prompt, timeout=240)
    n = len(_keys(files["comfyui"]))
    assert n == 3 * (8 * 2 + 2 * 3)  # A, B, alpha of 8 BFL modules per double and 2 per single block (2 + 3)
    line = f"ComfyUI key check: all {n} keys load in ComfyUI (its LoRA loader on FLUX.2 256 wide, 2 double + 3 single blocks)."
    save_text = result.outputs[SAVE_ID]["text"]
    assert save_text[1] == line, save_text
    saved = Path(save_text[0])
    assert saved == comfyui_server.base_dir / "models" / "loras" / "keycheck" / "good.safetensors"
    assert saved.read_bytes() == files["comfyui"].read_bytes()
    assert result.outputs[TRAIN_ID]["text"][0].endswith("\n" + line)
    # The check is not a load: ComfyUI's log has none of its per-key messages.
    assert "lora key not loaded" not in comfyui_server.log_text()


def test_save_lora_refuses_a_file_with_a_renamed_key(comfy: ComfyClient, comfyui_server: ComfyServer, attach_graph):
    graph, files = attach_graph
    prompt, run_dir = graph("renamed", "keycheck/renamed")
    loras = comfyui_server.base_dir / "models" / "loras"
    before = sorted(p.relative_to(loras) for p in loras.rglob("*")) if loras.exists() else []
    with pytest.raises(ExecutionFailed) as failed:
        comfy.run(prompt, timeout=240)
    data = failed.value.data
    assert data["node_type"] == "Flux2LoraSave", failed.value
    message = data["exception_message"]
    n = len(_keys(files["renamed"]))
    assert f"ComfyUI key check: 2 of {n} keys would be dropped by ComfyUI's LoRA loader" in message
    assert f": {ORPHANED}, {RENAMED_TO}." in message  # every dropped key, by name
    assert str(run_dir / "lora.safetensors") in message and "nothing was copied" in message
    after = sorted(p.relative_to(loras) for p in loras.rglob("*")) if loras.exists() else []
    assert after == before and not (loras / "keycheck" / "renamed.safetensors").exists()
    # Train LoRA ran before it and reported the same keys in its run info without refusing the run.
    deadline = time.monotonic() + 30  # ComfyUI files a failed prompt's history just after its execution_error
    while True:
        try:
            history = comfy.history(data["prompt_id"])
            break
        except KeyError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    train_info = history["outputs"][TRAIN_ID]["text"][0]
    assert f"2 of {n} keys would be dropped" in train_info and RENAMED_TO in train_info


# ---------------------------------------------------------------------------------------------------------------
# 2. The check at FLUX.2-dev's full width, in ComfyUI's interpreter


def test_check_at_full_dev_width_on_meta(comfyui_install: ComfyInstall, tmp_path: Path):
    files = _write_files(tmp_path, flavour="dev", layouts=("comfyui", "diffusers"), num_layers=1,
                         num_single_layers=1)  # diffusers' defaults are FLUX.2-dev's widths
    out = tmp_path / "report.json"
    command = [str(comfyui_install.python), str(PROBE), "--comfyui-dir", str(comfyui_install.root), "--out", str(out),
               *(f"--lora={label}={path}" for label, path in files.items())]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("PYTHONPATH", None)
    done = subprocess.run(command, check=False, cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=PROBE_TIMEOUT_S)
    assert done.returncode == 0, f"{' '.join(command)}\n{done.stdout[-4000:]}\n{done.stderr[-8000:]}"
    report = json.loads(out.read_text())
    dev = "its LoRA loader on FLUX.2 6144 wide, 8 double + 48 single blocks"  # the real FLUX.2-dev, from the header
    good = report["comfyui"]
    assert good["ran"] and good["ok"] and good["model"] == dev
    assert good["keys"] == len(_keys(files["comfyui"])) == 3 * 10
    assert good["line"] == f"ComfyUI key check: all 30 keys load in ComfyUI ({dev})."
    renamed = report["renamed"]
    assert renamed["ran"] and not renamed["ok"] and renamed["dropped"] == [ORPHANED, RENAMED_TO]
    orphan_b = report["renamed_a"]  # ComfyUI's loader raises on it: refused too, with ComfyUI's own error
    assert orphan_b["ran"] and not orphan_b["ok"] and orphan_b["error"] == f"KeyError: {A_RENAMED_FROM!r}"
    assert orphan_b["line"].startswith("ComfyUI key check: ComfyUI's LoRA loader fails on this file's 30 keys")
    # The diffusers-layout twin: stock ComfyUI's FLUX key map lacks FLUX.2's ff / ff_context / single-block names.
    twin = report["diffusers"]
    expected = sorted(k for k in _keys(files["diffusers"])
                      if ".ff." in k or ".ff_context." in k or ".single_transformer_blocks." in k)
    assert twin["ran"] and not twin["ok"] and twin["dropped"] == expected and len(expected) == 12
    assert "lora key not loaded" not in done.stderr  # taken off ComfyUI's log, not printed
