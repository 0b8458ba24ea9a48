"""The warm trainer in a real ComfyUI (trainer/warm_worker.py): started when the server loads the pack, it forks the
trainer of a one-process Train LoRA run; the run trains and reports as a cold one does."""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import pytest
from comfyui_harness import (
    REPO_ROOT,
    ComfyClient,
    ComfyServer,
    install_sample_dataset,
    install_tiny_model,
    load_api_workflow,
)

pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(sys.platform != "linux", reason="the warm trainer forks: Linux only")]

WORKFLOW = REPO_ROOT / "workflows" / "api" / "flux2_lora_train_and_validate.json"
TRAIN_ID = "3"


def _worker_socket(server: ComfyServer, timeout: float = 120.0) -> Path:
    """The socket of the worker the server started (named in its log), once it exists (its imports done)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.search(r"warm trainer: started \(pid (\d+)\)", server.log_text())
        if found:
            args = Path(f"/proc/{found.group(1)}/cmdline").read_bytes().split(b"\0")
            socket = Path(args[args.index(b"--socket") + 1].decode())
            if socket.exists():
                return socket
        time.sleep(0.5)
    raise AssertionError(f"no warm trainer became ready within {timeout:.0f} s\n{server.log_tail()}")


def test_a_one_process_run_is_forked_from_the_warm_trainer(comfy: ComfyClient, comfyui_server: ComfyServer,
                                                          tiny_model_dir: Path):
    model_folder = install_tiny_model(comfyui_server.base_dir, tiny_model_dir=tiny_model_dir)
    install_sample_dataset(comfyui_server.base_dir)
    shipped = load_api_workflow(WORKFLOW)
    keep, frontier = set(), {TRAIN_ID}
    while frontier:  # Train LoRA and everything it depends on
        keep |= frontier
        frontier = {v[0] for nid in frontier for v in shipped[nid]["inputs"].values()
                    if isinstance(v, list) and len(v) == 2} - keep
    prompt = {nid: json.loads(json.dumps(shipped[nid])) for nid in keep}
    prompt[TRAIN_ID]["inputs"].update(num_processes=1, distributed="none", max_train_steps=3, validation_prompt="",
                                      output_name="warm_trainer_e2e")
    # The same model by its folder: other tests expect the loader by name not to be in ComfyUI's cache yet.
    loader = prompt[TRAIN_ID]["inputs"]["model"][0]
    prompt[loader]["inputs"]["folder_path"] = str(model_folder)
    _worker_socket(comfyui_server)
    result = comfy.run(prompt, timeout=300)
    text = result.outputs[TRAIN_ID]["text"][0]
    assert "steps: 3" in text, text
    started = [line for line in comfyui_server.log_text().splitlines() if "Train LoRA: started" in line]
    assert started and "forked from the warm trainer" in started[-1], started
    run_dir = Path(re.search(r"run folder: (\S+)", text).group(1))
    assert "LoRA written to" in (run_dir / "train.log").read_text()
