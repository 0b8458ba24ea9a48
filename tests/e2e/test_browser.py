"""The shipped UI-format workflow in ComfyUI's real front end (headless Chromium driven by
playwright-core from node): it loads, Run trains on the tiny FLUX.2, and the Train LoRA node shows the
loss chart and the validation samples.

Tools (each missing one is a skip with its reason):
  node >= 18 and npm    https://nodejs.org
  Chromium              CHROMIUM_PATH, else `chromium` / `chromium-browser` on PATH (Debian: apt install chromium)
  playwright-core       PLAYWRIGHT_CORE_DIR (the package folder, e.g. .../node_modules/playwright-core); else
                        the test runs `npm install playwright-core@PLAYWRIGHT_CORE_VERSION` into a temporary folder
                        (npm's cache or registry; nothing is installed into the repo)
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from comfyui_harness import (
    REPO_ROOT,
    ComfyInstall,
    ComfyServer,
    install_sample_dataset,
    install_tiny_model,
    load_api_workflow,
)

pytestmark = [pytest.mark.e2e, pytest.mark.browser]

UI_WORKFLOW = REPO_ROOT / "workflows" / "flux2_lora_train_and_validate.json"
API_WORKFLOW = REPO_ROOT / "workflows" / "api" / "flux2_lora_train_and_validate.json"
"""The UI workflow's API twin: read for the Train node's inputs by name."""
DRIVER = Path(__file__).resolve().parent / "browser" / "run_train_workflow.mjs"
PLAYWRIGHT_CORE_VERSION = os.environ.get("PLAYWRIGHT_CORE_VERSION", "1.65.1")
MIN_NODE_MAJOR = 18
NPM_TIMEOUT_S = 180
DRIVER_TIMEOUT_S = 420
TRAIN_ID = 3
RUN_NAME = "browser_squares"
MAX_STEPS = 8
OVERRIDES = {
    # Its own run (not the one the API-format tests may have cached), short, validated once at the end.
    str(TRAIN_ID): {"output_name": RUN_NAME, "max_train_steps": MAX_STEPS, "validation_steps": 0,
                    "checkpointing_steps": MAX_STEPS},
    "12": {"filename": f"flux2/{RUN_NAME}"},
}
PREVIEWS = {8: [(64, 64)], 9: [(64, 64)], 11: [(768, 384)]}
"""Save Image nodes and the previews they show: without and with the LoRA (64 px), the loss plot."""


@dataclass(frozen=True, slots=True)
class BrowserTools:
    node: str
    chromium: str
    playwright_core: Path


def _node_major(node: str) -> int:
    out = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=30, check=True).stdout
    match = re.match(r"v(\d+)\.", out.strip())
    if not match:
        raise ValueError(f"`{node} --version` printed {out!r}, not vMAJOR.MINOR.PATCH")
    return int(match.group(1))


def _find_chromium() -> str | None:
    explicit = os.environ.get("CHROMIUM_PATH", "").strip()
    if explicit:
        if not (os.path.isfile(explicit) and os.access(explicit, os.X_OK)):
            raise ValueError(f"CHROMIUM_PATH={explicit!r} is not an executable file; point it at a Chromium binary.")
        return explicit
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _playwright_core(npm: str | None, workdir: Path) -> Path:
    explicit = os.environ.get("PLAYWRIGHT_CORE_DIR", "").strip()
    if explicit:
        path = Path(explicit).expanduser().resolve()
        if not (path / "package.json").is_file():
            raise ValueError(f"PLAYWRIGHT_CORE_DIR={explicit!r} has no package.json; give the playwright-core package folder.")
        return path
    if npm is None:
        pytest.skip("npm is not on PATH and PLAYWRIGHT_CORE_DIR is not set: install Node.js with npm, "
                    "or set PLAYWRIGHT_CORE_DIR to a playwright-core package folder")
    command = [npm, "install", "--prefer-offline", "--no-audit", "--no-fund", "--no-save", "--loglevel", "error",
               f"playwright-core@{PLAYWRIGHT_CORE_VERSION}"]
    done = subprocess.run(command, cwd=workdir, capture_output=True, text=True, timeout=NPM_TIMEOUT_S)
    package = workdir / "node_modules" / "playwright-core"
    if done.returncode != 0 or not (package / "package.json").is_file():
        pytest.skip(f"`{' '.join(command)}` failed (no npm registry or cache?), exit {done.returncode}: "
                    f"{(done.stderr or done.stdout)[-800:]}; set PLAYWRIGHT_CORE_DIR to a playwright-core package folder")
    return package


@pytest.fixture(scope="session")
def browser_tools(comfyui_install: ComfyInstall, tmp_path_factory: pytest.TempPathFactory) -> BrowserTools:
    """node, Chromium and playwright-core, or a skip naming the one that is missing."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not on PATH: install Node.js >= 18 to run the browser test")
    major = _node_major(node)
    if major < MIN_NODE_MAJOR:
        pytest.skip(f"node {major} is too old for playwright-core; install Node.js >= {MIN_NODE_MAJOR}")
    chromium = _find_chromium()
    if chromium is None:
        pytest.skip("no Chromium: set CHROMIUM_PATH or put `chromium` on PATH (Debian: apt install chromium)")
    package = _playwright_core(shutil.which("npm"), tmp_path_factory.mktemp("playwright"))
    return BrowserTools(node=node, chromium=chromium, playwright_core=package)


def run_driver(tools: BrowserTools, *, url: str, workflow_path: Path, workdir: Path) -> dict[str, Any]:
    """Run the node driver; its JSON report (what the page showed) or an AssertionError with its output."""
    screenshot = workdir / "train_workflow.png"
    config = {
        "url": url,
        "workflow_path": str(workflow_path),
        "overrides": OVERRIDES,
        "preview_node_ids": sorted(PREVIEWS),
        "screenshot": str(screenshot),
        "playwright_core": str(tools.playwright_core),
        "chromium": tools.chromium,
        "load_timeout_ms": 120_000,
        "run_timeout_ms": 300_000,
    }
    config_path = workdir / "driver.json"
    config_path.write_text(json.dumps(config, indent=1), encoding="utf-8")
    done = subprocess.run([tools.node, str(DRIVER), str(config_path)], capture_output=True, text=True,
                          timeout=DRIVER_TIMEOUT_S, cwd=workdir)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise AssertionError(f"the browser driver failed (exit {done.returncode}):\n{done.stderr[-4000:]}\n{done.stdout[-2000:]}")
    return json.loads(lines[-1])


def test_ui_workflow_trains_and_the_node_shows_chart_and_samples(
    browser_tools: BrowserTools, comfyui_server: ComfyServer,
    tiny_model_dir: Path, tmp_path: Path,
):
    install_tiny_model(comfyui_server.base_dir, tiny_model_dir=tiny_model_dir)
    install_sample_dataset(comfyui_server.base_dir)
    workflow = json.loads(UI_WORKFLOW.read_text(encoding="utf-8"))

    report = run_driver(browser_tools, url=comfyui_server.url, workflow_path=UI_WORKFLOW, workdir=tmp_path)
    print(f"\nscreenshot: {report.get('screenshot')}")
    context = f"{json.dumps(report, indent=1)[:6000]}\n--- ComfyUI log tail ---\n{comfyui_server.log_tail()}"

    assert report["extension_registered"], context
    loaded = report["loaded"]
    assert loaded["node_types"] == sorted(node["type"] for node in workflow["nodes"]), context
    assert loaded["missing_widgets"] == [] and loaded["train_id"] == TRAIN_ID and loaded["has_panel"], context
    assert report["outcome"]["type"] == "execution_success", context

    panel = report["panel"]
    assert panel["run"].startswith(f"{RUN_NAME}-") and panel["status"] == "finished", context
    assert panel["steps"] == list(range(1, MAX_STEPS + 1)), context
    assert panel["finite_losses"] == MAX_STEPS and panel["total"] == MAX_STEPS, context
    assert panel["train_events"] >= MAX_STEPS, context  # live events reached the page's websocket
    # The smoothed loss line is drawn across the plot: its colour spans many pixel columns.
    canvas = panel["canvas"]
    assert canvas["width"] > 100 and canvas["height"] >= 100, context
    assert canvas["smoothed_columns"] > canvas["width"] // 2, context
    assert canvas["raw_pixels"] > 0, context
    # One validation prompt: the strip holds its latest image, loaded from the pack's route.
    train_inputs = load_api_workflow(API_WORKFLOW)[str(TRAIN_ID)]["inputs"]
    size = int(json.loads(train_inputs["extra_config_json"])["validation_resolution"])
    assert panel["validation_prompts"] == [train_inputs["validation_prompt"]], context
    assert len(panel["strip"]) == 1, context
    image = panel["strip"][0]
    assert image["complete"] and (image["width"], image["height"]) == (size, size), context
    assert "/flux2lora/runs/" in image["src"], context
    assert report["queue_remaining"] == 0, context
    assert {int(k): [tuple(wh) for wh in v] for k, v in report["previews"].items()} == PREVIEWS, context
    assert report["page_errors"] == [], context

    screenshot = Path(report["screenshot"])
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (comfyui_server.base_dir / "models" / "loras" / "flux2" / f"{RUN_NAME}.safetensors").is_file()
