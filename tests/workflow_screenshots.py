"""Screenshots of the shipped workflows in ComfyUI's real front end: the thumbnails workflows/<name>.jpg and
workflows/flux2_lora_train_and_validate_finished_run.jpg (the train-and-validate workflow after a Run on the tiny FLUX.2).

    COMFYUI_DIR=/path/to/ComfyUI COMFYUI_PY=/path/to/comfyui-venv/bin/python \\
        python tests/workflow_screenshots.py [--thumbnails] [--finished-run]

(both when neither is given). It starts a ComfyUI of its own on a free loopback port with this pack linked into a
temporary custom_nodes folder (tests/e2e/comfyui_harness.py, as the e2e tests do) and drives headless Chromium with
playwright-core, found as tests/e2e/test_browser.py finds it (CHROMIUM_PATH, PLAYWRIGHT_CORE_DIR, else npm into a
temporary folder). Thumbnails: each workflow as loaded (tests/e2e/browser/screenshot_workflows.mjs), under a title
line taken from the workflow's first note. The finished run is the browser test's own run (test_browser.run_driver:
the same driver, overrides and view), written only when the run succeeded without page errors, every Save Image shows
its image at the size the browser test expects (the LoRA Grid's too) and test_browser.clipped_lines finds no line of
the Train LoRA panel cut off. Run it after changing a shipped workflow or the node's panel.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
sys.path.insert(0, str(TESTS))
sys.path.insert(0, str(TESTS / "e2e"))
os.environ.setdefault("OMP_NUM_THREADS", "1")

THUMBNAIL_SIZE = (1024, 1024)
"""As the thumbnails ComfyUI's template browser shows beside a workflow of the same name."""
VIEWPORT = (2000, 1800)
"""Large, so that the graph is drawn near full size and shrunk with a good filter into the thumbnail."""
TITLE_BAND = 96
BACKGROUND = (24, 24, 27)
JPEG_QUALITY = 85
MAX_JPEG_BYTES = 250_000
FINISHED_RUN = REPO / "workflows" / "flux2_lora_train_and_validate_finished_run.jpg"
SCREENSHOT_DRIVER = TESTS / "e2e" / "browser" / "screenshot_workflows.mjs"


def workflow_title(ui: dict) -> str:
    """The '## ' heading of the workflow's first note, else its file's name."""
    for node in ui["nodes"]:
        if node["type"] in ("MarkdownNote", "Note") and node.get("widgets_values"):
            first = str(node["widgets_values"][0]).splitlines()[0]
            if first.startswith("#"):
                # Pillow's default font has no dashes beyond ASCII.
                return first.lstrip("#").strip().replace("\u2014", "-").replace("\u2013", "-")
    return ""


def font(size: int):
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def save_jpeg(image, path: Path) -> int:
    """Write a JPEG no larger than MAX_JPEG_BYTES (lowering the quality step by step); returns its size in bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    quality = JPEG_QUALITY
    while True:
        image.convert("RGB").save(path, "JPEG", quality=quality, optimize=True, progressive=True)
        size = path.stat().st_size
        if size <= MAX_JPEG_BYTES or quality <= 50:
            return size
        quality -= 5


def compose_thumbnail(screenshot: Path, *, title: str, out: Path) -> int:
    """The graph screenshot fitted below a title band on a THUMBNAIL_SIZE canvas."""
    from PIL import Image, ImageDraw

    canvas = Image.new("RGB", THUMBNAIL_SIZE, BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    draw.text((32, TITLE_BAND // 2), title, fill=(235, 235, 235), font=font(44), anchor="lm")
    with Image.open(screenshot) as shot:
        room = (THUMBNAIL_SIZE[0], THUMBNAIL_SIZE[1] - TITLE_BAND)
        scale = min(room[0] / shot.width, room[1] / shot.height)
        graph = shot.convert("RGB").resize((round(shot.width * scale), round(shot.height * scale)), Image.LANCZOS)
    canvas.paste(graph, ((room[0] - graph.width) // 2, TITLE_BAND + (room[1] - graph.height) // 2))
    return save_jpeg(canvas, out)


def browser_tools(workdir: Path):
    """node, Chromium and playwright-core as the browser test finds them (a missing one stops with its reason)."""
    import shutil

    import test_browser

    node = shutil.which("node")
    if node is None:
        raise SystemExit("node is not on PATH: install Node.js >= 18")
    chromium = test_browser._find_chromium()
    if chromium is None:
        raise SystemExit("no Chromium: set CHROMIUM_PATH or put `chromium` on PATH (Debian: apt install chromium)")
    package = test_browser._playwright_core(shutil.which("npm"), workdir)
    return test_browser.BrowserTools(node=node, chromium=chromium, playwright_core=package)


def make_thumbnails(tools, *, url: str, workdir: Path) -> list[str]:
    workflows = sorted((REPO / "workflows").glob("*.json"))
    config = {
        "url": url, "playwright_core": str(tools.playwright_core), "chromium": tools.chromium,
        "load_timeout_ms": 120_000, "viewport": list(VIEWPORT),
        "workflows": [{"path": str(p), "screenshot": str(workdir / f"{p.stem}.png")} for p in workflows],
    }
    config_path = workdir / "thumbnails.json"
    config_path.write_text(json.dumps(config, indent=1), encoding="utf-8")
    done = subprocess.run([tools.node, str(SCREENSHOT_DRIVER), str(config_path)], capture_output=True, text=True,
                          timeout=600, cwd=workdir, check=False)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise SystemExit(f"the screenshot driver failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    report = json.loads(lines[-1])
    if report["page_errors"]:
        raise SystemExit(f"the page raised errors: {report['page_errors']}")
    written = []
    for path, shown in zip(workflows, report["workflows"]):
        ui = json.loads(path.read_text(encoding="utf-8"))
        expected = sorted(node["type"] for node in ui["nodes"])
        if shown["node_types"] != expected:
            raise SystemExit(f"{path.name}: the page shows {shown['node_types']}, the file holds {expected}")
        out = path.with_suffix(".jpg")
        size = compose_thumbnail(Path(shown["screenshot"]), title=workflow_title(ui) or path.stem, out=out)
        written.append(f"{out.relative_to(REPO)} ({size // 1000} kB, graph at zoom {shown['scale']:.2f})")
    return written


def make_finished_run(tools, *, server, workdir: Path) -> str:
    """The browser test's run of the train-and-validate workflow; its screenshot once every check of that test holds."""
    import test_browser
    from comfyui_harness import install_sample_dataset, install_tiny_model
    from flux2_lora_pack.trainer.tiny import make_tiny
    from PIL import Image

    tiny = make_tiny(out_dir=workdir / "tiny_flux2", seed=0)
    install_tiny_model(server.base_dir, tiny_model_dir=tiny)
    install_sample_dataset(server.base_dir)
    report = test_browser.run_driver(tools, url=server.url, workflow_path=test_browser.UI_WORKFLOW, workdir=workdir)
    problems = []
    if report.get("outcome", {}).get("type") != "execution_success":
        problems.append(f"the run ended with {report.get('outcome')}")
    previews = {int(k): [tuple(wh) for wh in v] for k, v in report.get("previews", {}).items()}
    if previews != test_browser.expected_previews():
        problems.append(f"previews {previews}, expected {test_browser.expected_previews()}")
    problems += test_browser.clipped_lines(report["layout_finished"])
    if report.get("page_errors"):
        problems.append(f"page errors {report['page_errors']}")
    if problems:
        raise SystemExit("not writing the screenshot:\n" + "\n".join(problems) + f"\n--- log ---\n{server.log_tail()}")
    with Image.open(report["screenshot"]) as shot:
        size = save_jpeg(shot, FINISHED_RUN)
    return f"{FINISHED_RUN.relative_to(REPO)} ({size // 1000} kB)"


def import_pack() -> None:
    """Register the pack as flux2_lora_pack, as the tests do (tests/conftest.py; tests/e2e has a conftest too)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("flux2lora_tests_conftest", TESTS / "conftest.py")
    spec.loader.exec_module(importlib.util.module_from_spec(spec))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--thumbnails", action="store_true", help="write workflows/<name>.jpg")
    parser.add_argument("--finished-run", action="store_true", help=f"write {FINISHED_RUN.relative_to(REPO)}")
    args = parser.parse_args(argv)
    if not (args.thumbnails or args.finished_run):
        args.thumbnails = args.finished_run = True
    from comfyui_harness import (
        DEFAULT_START_TIMEOUT_S,
        ComfyServer,
        comfyui_install_from_env,
        make_base_directory,
    )

    import_pack()
    install = comfyui_install_from_env()
    with tempfile.TemporaryDirectory(prefix="flux2lora_screens_") as tmp:
        root = Path(tmp)
        tools = browser_tools(root)
        server = ComfyServer(install, base_dir=make_base_directory(root / "base"), log_path=root / "comfyui.log")
        server.start(timeout=float(os.environ.get("COMFYUI_START_TIMEOUT", DEFAULT_START_TIMEOUT_S)))
        try:
            written = []
            # The run first: its page then opens on a single workflow tab (the thumbnails are cut below the tabs).
            if args.finished_run:
                written.append(make_finished_run(tools, server=server, workdir=root))
            if args.thumbnails:
                written += make_thumbnails(tools, url=server.url, workdir=root)
        finally:
            server.stop()
    print("\n".join(written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
