"""The shipped UI-format workflow in ComfyUI's real front end (headless Chromium driven by
playwright-core from node): it loads, Run trains on the tiny FLUX.2, and the Train LoRA node shows the
loss chart and the validation samples, with every line of its panel inside the node (none cut off), and the
LoRA Grid's Save Image node shows the grid.

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
VALIDATION_OPTIONS_ID = 16
GRID_ID, GRID_SAVE_ID = 17, 18
FIT_AFTER_RUN = [TRAIN_ID, GRID_ID, GRID_SAVE_ID]
"""The nodes in view after the run (and on the screenshot): every panel line and the LoRA Grid's output."""


def grid_size(grid_inputs: dict[str, Any], *, final_step: int) -> tuple[int, int]:
    """(width, height) of the LoRA Grid image for one prompt from Mistral Encode and checkpoints 'final': the layout
    trainer/grid.py draws for those labels."""
    from flux2_lora_pack.trainer.grid import (
        grid_layout,
        label_font,
        parse_strengths,
        strength_label,
    )

    assert grid_inputs["checkpoints"] == "final", grid_inputs
    columns = [strength_label(s) for s in parse_strengths(grid_inputs["strengths"])]
    layout = grid_layout(rows=1, columns=len(columns), cell_width=grid_inputs["width"],
                         cell_height=grid_inputs["height"], row_labels=[f"final (step {final_step})"],
                         column_labels=columns, font=label_font(grid_inputs["height"]), title="prompt 1")
    return layout.size


def expected_previews() -> dict[int, list[tuple[int, int]]]:
    """Save Image nodes and the previews they show: without and with the LoRA (64 px), the loss plot, the grid."""
    grid = load_api_workflow(API_WORKFLOW)[str(GRID_ID)]["inputs"]
    return {8: [(64, 64)], 9: [(64, 64)], 11: [(768, 384)], GRID_SAVE_ID: [grid_size(grid, final_step=MAX_STEPS)]}


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
    """Run the node driver; its JSON report (what the page showed) or an AssertionError with its output.
    tests/workflow_screenshots.py runs it too, for docs/finished_run.jpg."""
    screenshot = workdir / "train_workflow.png"
    config = {
        "url": url,
        "workflow_path": str(workflow_path),
        "overrides": OVERRIDES,
        "preview_node_ids": sorted(expected_previews()),
        "fit_node_ids": FIT_AFTER_RUN,
        "viewport": [1600, 1100],
        # Nothing drawn over the nodes on the screenshot (docs/finished_run.jpg is this screenshot).
        "settings": {"Comfy.Minimap.Visible": False, "Comfy.Graph.CanvasInfo": False},
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


@pytest.fixture(scope="module")
def browser_report(browser_tools: BrowserTools, comfyui_server: ComfyServer, tiny_model_dir: Path,
                   tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One run of the shipped UI workflow in the browser (a few minutes on CPU); every test here reads its report."""
    install_tiny_model(comfyui_server.base_dir, tiny_model_dir=tiny_model_dir)
    install_sample_dataset(comfyui_server.base_dir)
    report = run_driver(browser_tools, url=comfyui_server.url, workflow_path=UI_WORKFLOW,
                        workdir=tmp_path_factory.mktemp("browser"))
    print(f"\nscreenshot: {report.get('screenshot')}")
    return report


LAYOUT_TOLERANCE_PX = 1.0
"""Sub-pixel rounding of boxes under the canvas' zoom transform."""


def clipped_lines(layout: dict[str, Any]) -> list[str]:
    """What of the Train LoRA panel a user cannot see: every row (and the status line) must lie inside the panel,
    the panel inside the node's body, and no text box may hide lines (vertical overflow) or cut text
    (horizontal overflow; the image strip scrolls sideways by design, so overflow-x auto is not a cut)."""
    tol = LAYOUT_TOLERANCE_PX

    def outside(inner: dict[str, float], outer: dict[str, float]) -> list[str]:
        sides = [("top", inner["top"] < outer["top"] - tol), ("bottom", inner["bottom"] > outer["bottom"] + tol),
                 ("left", inner["left"] < outer["left"] - tol), ("right", inner["right"] > outer["right"] + tol)]
        return [side for side, out in sides if out]

    problems = []
    panel = layout["panel"]
    if sides := outside(panel["box"], layout["node"]):
        problems.append(f"the panel {panel['box']} crosses the node's {'/'.join(sides)} edge {layout['node']}")
    for line in layout["lines"]:
        if line["display"] == "none":
            continue
        label = f"{line['name']} {line['text'][:60]!r}"
        if sides := outside(line["box"], panel["box"]):
            problems.append(f"{label}: its box {line['box']} crosses the panel's {'/'.join(sides)} edge {panel['box']}")
        (client_w, client_h), (scroll_w, scroll_h) = line["client"], line["scroll"]
        if line["text"] and scroll_h > client_h + tol:
            problems.append(f"{label}: {scroll_h} px of text in a {client_h} px box (lines hidden)")
        if line["text"] and scroll_w > client_w + tol and line["overflow_x"] not in ("auto", "scroll"):
            problems.append(f"{label}: {scroll_w} px of text in a {client_w} px box (text cut)")
    return problems


def test_ui_workflow_trains_and_the_node_shows_chart_and_samples(browser_report: dict[str, Any],
                                                                 comfyui_server: ComfyServer):
    report = browser_report
    workflow = json.loads(UI_WORKFLOW.read_text(encoding="utf-8"))
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
    api = load_api_workflow(API_WORKFLOW)
    train_inputs = api[str(TRAIN_ID)]["inputs"]
    # The validation size comes from Validation Options, chained into Train LoRA's options input.
    assert train_inputs["options"] == [str(VALIDATION_OPTIONS_ID), 0] and train_inputs["extra_config_json"] == ""
    size = int(api[str(VALIDATION_OPTIONS_ID)]["inputs"]["validation_resolution"])
    assert panel["validation_prompts"] == [train_inputs["validation_prompt"]], context
    assert len(panel["strip"]) == 1, context
    image = panel["strip"][0]
    assert image["complete"] and (image["width"], image["height"]) == (size, size), context
    assert "/flux2lora/runs/" in image["src"], context
    assert report["queue_remaining"] == 0, context
    # The LoRA Grid's image (one row: the final LoRA; a column per strength) is on its Save Image node.
    assert {int(k): [tuple(wh) for wh in v] for k, v in report["previews"].items()} == expected_previews(), context
    assert report["page_errors"] == [], context

    screenshot = Path(report["screenshot"])
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (comfyui_server.base_dir / "models" / "loras" / "flux2" / f"{RUN_NAME}.safetensors").is_file()


@pytest.mark.parametrize("moment", ["loaded", "finished"])
def test_every_panel_line_is_visible(browser_report: dict[str, Any], moment: str):
    """Before any run and after a run (chart, progress, sample strip, run info): nothing on the panel is cut off."""
    layout = browser_report[f"layout_{moment}"]
    context = json.dumps(layout, indent=1)
    assert layout is not None, "the Train LoRA node has no panel"
    shown = {line["name"].split()[0] for line in layout["lines"] if line["display"] != "none"}
    expected = {"flux2lora-head", "flux2lora-status", "flux2lora-progress", "flux2lora-chart"}
    if moment == "finished":
        expected |= {"flux2lora-strip", "flux2lora-info"}
        info = next(line for line in layout["lines"] if line["name"] == "flux2lora-info")
        assert "run folder:" in info["text"], context  # the run info the node sent is on the panel
    assert expected <= shown, context
    chart = next(line for line in layout["lines"] if line["name"] == "flux2lora-chart")
    # The chart keeps at least its minimum height (120 CSS px, at the canvas' zoom).
    assert chart["box"]["bottom"] - chart["box"]["top"] >= 120 * layout["scale"] - LAYOUT_TOLERANCE_PX, context
    assert clipped_lines(layout) == [], context


def test_clipped_lines_names_what_is_cut():
    """The check itself, on the layout a new user saw: 312 px of content in a 288 px panel (no browser needed)."""
    def line(name: str, top: float, bottom: float, *, text: str = "x", scroll_h: float | None = None) -> dict:
        height = bottom - top
        return {"name": name, "text": text, "display": "block", "overflow_x": "hidden",
                "box": {"left": 10, "top": top, "right": 450, "bottom": bottom},
                "client": [440, height], "scroll": [440, height if scroll_h is None else scroll_h]}

    panel = {"name": "flux2lora-panel", "text": "", "display": "flex", "overflow_x": "hidden",
             "box": {"left": 10, "top": 0, "right": 450, "bottom": 288}, "client": [440, 288], "scroll": [440, 312]}
    node = {"left": 0, "top": -10, "right": 460, "bottom": 300}
    lines = [line("flux2lora-chart", 40, 160, text=""), line("flux2lora-strip", 163, 243),
             line("flux2lora-info", 246, 310, text="run folder: /x\nsteps: 8 · final loss 0.1", scroll_h=76)]
    problems = clipped_lines({"node": node, "panel": panel, "lines": lines})
    assert len(problems) == 2 and all(p.startswith("flux2lora-info") for p in problems), problems
    assert "crosses the panel's bottom edge" in problems[0] and "76 px of text in a 64 px box" in problems[1]
    fitted = [line("flux2lora-chart", 40, 160, text=""), line("flux2lora-info", 163, 239, text="run folder: /x")]
    assert clipped_lines({"node": node, "panel": panel, "lines": fitted}) == []
    panel_too_low = dict(panel, box=dict(panel["box"], bottom=320))
    assert clipped_lines({"node": node, "panel": panel_too_low, "lines": fitted}) == [
        f"the panel {panel_too_low['box']} crosses the node's bottom edge {node}"]
