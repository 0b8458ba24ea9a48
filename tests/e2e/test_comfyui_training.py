"""Training inside a real ComfyUI: the shipped train-and-validate workflow runs to the end on the tiny
FLUX.2, streams progress and the pack's training events over the websocket, is not retrained when
posted again, and Cancel stops every trainer process while keeping the checkpoint."""

from __future__ import annotations

import copy
import hashlib
import io
import os
from pathlib import Path
from typing import Any

import pytest
from comfyui_harness import (
    REPO_ROOT,
    SAMPLE_DATASET_NAME,
    ComfyClient,
    ComfyServer,
    ExecutionFailed,
    install_sample_dataset,
    install_tiny_model,
    load_api_workflow,
)
from PIL import Image
from safetensors import safe_open

from flux2_lora_pack.trainer.checkpoint import list_checkpoints
from flux2_lora_pack.trainer.events import EVENTS_FILE, read_events

pytestmark = pytest.mark.e2e

WORKFLOW = REPO_ROOT / "workflows" / "api" / "flux2_lora_train_and_validate.json"
PACK_EVENT = "flux2lora.train"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TRAIN_ID, WITHOUT_SAVE_ID, WITH_SAVE_ID, LOSS_SAVE_ID, LORA_SAVE_ID = "3", "8", "9", "11", "12"
OPTION_IDS, GRID_ID, GRID_SAVE_ID = ("13", "14", "15", "16"), "17", "18"
RUN_TIMEOUT_S = 300.0
INTERRUPT_DEADLINE_S = 10.0
"""How long Cancel may take to end the prompt: the node stops the group (SIGTERM, SIGKILL after 10 s)."""


@pytest.fixture(scope="module")
def train_prompt(comfyui_server: ComfyServer, tiny_model_dir: Path) -> dict[str, Any]:
    """The shipped workflow as is: it already names flux2-tiny and the sample dataset folder."""
    install_tiny_model(comfyui_server.base_dir, tiny_model_dir=tiny_model_dir)
    install_sample_dataset(comfyui_server.base_dir)
    prompt = load_api_workflow(WORKFLOW)
    assert prompt[TRAIN_ID]["class_type"] == "Flux2LoraTrain"
    assert [prompt[i]["class_type"] for i in (WITHOUT_SAVE_ID, WITH_SAVE_ID, LOSS_SAVE_ID, LORA_SAVE_ID)] == [
        "SaveImage", "SaveImage", "SaveImage", "Flux2LoraSave"]
    # The option nodes form one chain into Train LoRA's options input (no JSON typed), the grid feeds a Save Image.
    assert [prompt[i]["class_type"] for i in OPTION_IDS] == [
        "Flux2LoraMemoryOptions", "Flux2LoraSpeedOptions", "Flux2LoraScheduleOptions", "Flux2LoraValidationOptions"]
    assert [prompt[i]["inputs"].get("options") for i in OPTION_IDS] == [None, *([i, 0] for i in OPTION_IDS[:-1])]
    assert prompt[TRAIN_ID]["inputs"]["options"] == [OPTION_IDS[-1], 0]
    assert prompt[TRAIN_ID]["inputs"]["extra_config_json"] == ""
    assert prompt[GRID_ID]["class_type"] == "Flux2LoraGrid" and prompt[GRID_SAVE_ID]["inputs"]["images"] == [GRID_ID, 0]
    return prompt


def png_pixels(comfy: ComfyClient, image: dict[str, str]) -> Image.Image:
    data = comfy.view_file(image["filename"], image["subfolder"], image["type"])
    assert data[:8] == PNG_SIGNATURE
    return Image.open(io.BytesIO(data)).convert("RGB")


def check_grid(comfy: ComfyClient, prompt: dict[str, Any], outputs: dict[str, Any], *, final_lora: Path) -> None:
    """The LoRA Grid's image: the layout trainer/grid.py draws for the rows and columns asked for (size, labels
    drawn left of each row and above each column), and cells that are the very images FLUX.2 Sample rendered with the
    same model, prompt and seed: strength 0 is the model without the LoRA, strength 1 of the final row the LoRA as
    Apply LoRA applies it."""
    import numpy as np
    from flux2_lora_pack.trainer.grid import (
        grid_layout,
        label_font,
        parse_strengths,
        select_rows,
        strength_label,
    )

    grid = prompt[GRID_ID]["inputs"]
    sampler = prompt["6"]["inputs"]
    # The grid renders as the two samplers do: same size, steps, guidance, seed and prompt (Mistral Encode's).
    assert {k: grid[k] for k in ("width", "height", "steps", "guidance", "seed", "positive")} == {
        k: sampler[k] for k in ("width", "height", "steps", "guidance", "seed", "positive")}
    assert prompt["7"]["inputs"]["model"] == ["4", 0] and prompt["4"]["inputs"]["strength"] == 1.0
    rows = select_rows(grid["checkpoints"], final_lora=final_lora)
    strengths = parse_strengths(grid["strengths"])
    assert 0.0 in strengths and 1.0 in strengths and rows[-1].path == final_lora
    row_labels, column_labels = [r.label for r in rows], [strength_label(s) for s in strengths]
    assert row_labels[-1] == f"final (step {prompt[TRAIN_ID]['inputs']['max_train_steps']})"
    width, height = grid["width"], grid["height"]
    layout = grid_layout(rows=len(rows), columns=len(strengths), cell_width=width, cell_height=height,
                         row_labels=row_labels, column_labels=column_labels, font=label_font(height),
                         title="prompt 1")
    [image] = [png_pixels(comfy, item) for item in outputs[GRID_SAVE_ID]["images"]]
    assert image.size == layout.size
    pixels = np.asarray(image, dtype=np.int16)
    without = np.asarray(png_pixels(comfy, outputs[WITHOUT_SAVE_ID]["images"][0]), dtype=np.int16)
    with_lora = np.asarray(png_pixels(comfy, outputs[WITH_SAVE_ID]["images"][0]), dtype=np.int16)
    assert np.abs(without - with_lora).max() > 16  # the LoRA changes the image, so the comparisons below mean something

    def cell(row: int, column: int) -> np.ndarray:
        left, top = layout.cell_box(row, column)
        return pixels[top:top + height, left:left + width]

    for row in range(len(rows)):
        assert np.abs(cell(row, strengths.index(0.0)) - without).max() <= 1, f"row {row_labels[row]}, strength 0"
        # Each row label is drawn (dark text on white) in the left column, level with its cells.
        _, top = layout.cell_box(row, 0)
        assert (pixels[top:top + height, :layout.label_width].min(axis=2) < 128).sum() > 20, row_labels[row]
    assert np.abs(cell(len(rows) - 1, strengths.index(1.0)) - with_lora).max() <= 1
    for column in range(len(strengths)):
        # Each column label is drawn above its column; the other strengths give other images.
        left, _ = layout.cell_box(0, column)
        header = pixels[layout.title_height:layout.title_height + layout.header_height, left:left + layout.column_width]
        assert (header.min(axis=2) < 128).sum() > 20, column_labels[column]
        if strengths[column] not in (0.0, 1.0):
            assert np.abs(cell(len(rows) - 1, column) - without).max() > 0
            assert np.abs(cell(len(rows) - 1, column) - with_lora).max() > 0


def downstream(prompt: dict[str, Any], node_id: str) -> set[str]:
    """Ids of the nodes that take node_id's outputs, directly or through others."""
    found: set[str] = set()
    frontier = {node_id}
    while frontier:
        frontier = {nid for nid, node in prompt.items() if nid not in found
                    and any(isinstance(v, list) and len(v) == 2 and v[0] in frontier for v in node["inputs"].values())}
        found |= frontier
    return found


def pack_events(messages: list[dict[str, Any]], *, run_prefix: str | None = None) -> list[dict[str, Any]]:
    events = [m["data"] for m in messages if m.get("type") == PACK_EVENT]
    return [e for e in events if run_prefix is None or str(e.get("run", "")).startswith(run_prefix)]


def trainer_processes(config_path: Path) -> list[tuple[int, str]]:
    """(pid, command line) of live processes whose command line names this run's run.json."""
    needle = str(config_path).encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()  # empty for zombies: they hold no resources
        except OSError:
            continue  # ended while we looked
        if needle in cmdline:
            found.append((int(entry.name), cmdline.replace(b"\0", b" ").decode(errors="replace")))
    return found


def png_size(comfy: ComfyClient, image: dict[str, str]) -> tuple[int, int]:
    data = comfy.view_file(image["filename"], image["subfolder"], image["type"])
    assert data[:8] == PNG_SIGNATURE
    with Image.open(io.BytesIO(data)) as png:
        extrema = png.convert("RGB").getextrema()
        assert any(low < high for low, high in extrema), f"{image['filename']} is a single flat colour"
        return png.size


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_train_workflow_runs_streams_and_is_cached(comfy: ComfyClient, comfyui_server: ComfyServer,
                                                    train_prompt: dict[str, Any]):
    received: list[dict[str, Any]] = []
    result = comfy.run(train_prompt, timeout=RUN_TIMEOUT_S, on_message=received.append)
    assert result.history["status"]["status_str"] == "success"
    # Loaders may come from ComfyUI's cache (other tests of the session used them); Train and all after it run.
    assert result.ran | result.cached == set(train_prompt)
    assert downstream(train_prompt, TRAIN_ID) | {TRAIN_ID} <= result.ran

    # Images come back through /history and /view: without and with the LoRA, and the loss plot.
    sampler = train_prompt["6"]["inputs"]
    for save_id in (WITHOUT_SAVE_ID, WITH_SAVE_ID):  # one image each, without and with the LoRA
        assert [png_size(comfy, image) for image in result.outputs[save_id]["images"]] == [
            (sampler["width"], sampler["height"])]
    plot = train_prompt["10"]["inputs"]
    assert [png_size(comfy, image) for image in result.outputs[LOSS_SAVE_ID]["images"]] == [(plot["width"], plot["height"])]

    # Progress of node 3 reached the posting client as ComfyUI progress messages, up to max_train_steps.
    total = train_prompt[TRAIN_ID]["inputs"]["max_train_steps"]
    progress = [m["data"] for m in result.messages if m["type"] == "progress" and m["data"].get("node") == TRAIN_ID]
    assert progress, [m["type"] for m in result.messages]
    assert {p["max"] for p in progress} == {total}
    values = [p["value"] for p in progress]
    assert values == sorted(values) and values[-1] == total

    # The pack's own events (broadcast, no prompt_id) carry every step in order, then the end.
    name = train_prompt[TRAIN_ID]["inputs"]["output_name"]
    events = pack_events(received, run_prefix=f"{name}-")
    assert len({e["run"] for e in events}) == 1
    run_dir = comfyui_server.base_dir / "output" / "flux2_lora" / "runs" / events[0]["run"]
    assert [e["step"] for e in events if e["event"] == "step"] == list(range(1, total + 1))
    kinds = [e["event"] for e in events]
    # the time and memory estimate reaches the node before the run starts (trainer/preflight.run_preflight)
    assert kinds[:2] == ["preflight", "start"] and kinds[-1] == "end"
    assert {"checkpoint", "validation"} <= set(kinds)

    # LoRA Grid: the run's final LoRA at each strength, laid out, labelled and rendered as FLUX.2 Sample renders.
    check_grid(comfy, train_prompt, result.outputs, final_lora=run_dir / f"{name}.safetensors")

    # Save LoRA put the trained file where LoraLoaderModelOnly looks.
    saved = comfyui_server.base_dir / "models" / "loras" / "flux2" / "demo_squares.safetensors"
    path, check = result.outputs[LORA_SAVE_ID]["text"]
    # Loaded through ComfyUI's own LoRA loader before the copy (nodes/comfy_keycheck.py): every key of the file.
    assert path == str(saved) and check.startswith("ComfyUI key check: all ") and "keys load in ComfyUI" in check
    assert sha256(saved) == sha256(run_dir / f"{name}.safetensors")
    with safe_open(str(saved), framework="pt") as lora:
        keys = set(lora.keys())
    assert keys and all(k.startswith("diffusion_model.") for k in keys)

    # The same prompt again: ComfyUI serves every node from its cache; nothing trains.
    received.clear()
    again = comfy.run(train_prompt, timeout=60, on_message=received.append)
    assert again.history["status"]["status_str"] == "success"
    assert again.ran == set()
    assert again.cached == set(train_prompt)
    assert pack_events(received) == []
    assert [m for m in again.messages if m["type"] == "progress"] == []

    # A dataset file touched but not changed: Build Dataset and Train run again (ComfyUI's cache key moved),
    # and Train finds the finished run by its identity (inputs + dataset contents) instead of retraining.
    dataset_dir = comfyui_server.base_dir / "input" / SAMPLE_DATASET_NAME
    first_caption = sorted(dataset_dir.glob("*.txt"))[0]
    first_caption.write_text(first_caption.read_text(encoding="utf-8"), encoding="utf-8")
    received.clear()
    touched = comfy.run(train_prompt, timeout=RUN_TIMEOUT_S, on_message=received.append)
    assert {"2", TRAIN_ID} <= touched.ran
    assert pack_events(received) == []
    assert [e["event"] for e in read_events(run_dir / EVENTS_FILE)].count("start") == 1
    assert touched.outputs[LORA_SAVE_ID]["text"] == [str(saved), check]
    assert sha256(saved) == sha256(run_dir / f"{name}.safetensors")


def test_cancel_stops_every_trainer_process(comfy: ComfyClient, comfyui_server: ComfyServer,
                                            train_prompt: dict[str, Any]):
    prompt = copy.deepcopy(train_prompt)
    name = "cancel_squares"
    inputs = prompt[TRAIN_ID]["inputs"]
    inputs.update(output_name=name, max_train_steps=1000, checkpointing_steps=2, validation_steps=0)
    prompt[LORA_SAVE_ID]["inputs"]["filename"] = f"flux2/{name}"

    prompt_id = comfy.post_prompt(prompt)
    seen: list[dict[str, Any]] = []
    for message in comfy.iter_messages(RUN_TIMEOUT_S):
        data = message.get("data") or {}
        if data.get("prompt_id") == prompt_id and message["type"] in ("execution_error", "execution_interrupted",
                                                                       "execution_success"):
            pytest.fail(f"the prompt ended ({message['type']}) before the first checkpoint: {data}")
        if message["type"] == PACK_EVENT and str(data.get("run", "")).startswith(f"{name}-"):
            seen.append(data)
            if data["event"] == "checkpoint":
                break  # a step event came first, and the run folder now holds a checkpoint
    assert [e["step"] for e in seen if e["event"] == "step"] == [1, 2]
    checkpoint_event = seen[-1]
    run_dir = comfyui_server.base_dir / "output" / "flux2_lora" / "runs" / checkpoint_event["run"]
    config_path = run_dir / "run.json"
    alive_before = trainer_processes(config_path)
    # torchrun and its 2 ranks; pids are read from /proc, so the check below is not vacuous.
    assert len(alive_before) >= 3, alive_before

    comfy.interrupt()
    with pytest.raises(ExecutionFailed) as caught:
        comfy.wait_for_prompt(prompt_id, timeout=INTERRUPT_DEADLINE_S)
    assert caught.value.kind == "execution_interrupted"
    assert caught.value.data["node_id"] == TRAIN_ID
    assert trainer_processes(config_path) == []
    # /history is written just before the closing `executing` (node None) message.
    for message in comfy.iter_messages(INTERRUPT_DEADLINE_S):
        data = message.get("data") or {}
        if message["type"] == "executing" and data.get("prompt_id") == prompt_id and data.get("node") is None:
            break

    assert checkpoint_event["path"] == "checkpoint-2"
    events = read_events(run_dir / EVENTS_FILE)
    # The newest checkpoint the trainer announced (a step or two may pass before the stop lands) is kept whole.
    newest = [e["path"] for e in events if e["event"] == "checkpoint"][-1]
    kept = {path.name for _, path in list_checkpoints(run_dir)}
    assert newest in kept, sorted(p.name for p in run_dir.iterdir())
    assert events[-1]["event"] == "cancelled"
    assert "end" not in {e["event"] for e in events}
    history = comfy.history(prompt_id)
    assert history["status"]["status_str"] == "error"
    assert [m[0] for m in history["status"]["messages"]][-1] == "execution_interrupted"

    # The server is usable right after: a short training of its own runs to the end.
    after = copy.deepcopy(train_prompt)
    after[TRAIN_ID]["inputs"].update(output_name="after_cancel", max_train_steps=2, validation_prompt="",
                                     checkpointing_steps=1000)
    after[LORA_SAVE_ID]["inputs"]["filename"] = "flux2/after_cancel"
    result = comfy.run(after, timeout=RUN_TIMEOUT_S)
    assert result.history["status"]["status_str"] == "success"
    assert TRAIN_ID in result.ran
    assert (comfyui_server.base_dir / "models" / "loras" / "flux2" / "after_cancel.safetensors").is_file()
    assert os.path.isdir(run_dir)  # the cancelled run is left for a later resume
