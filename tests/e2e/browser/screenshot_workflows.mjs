// Loads each UI-format workflow into ComfyUI's real front end (headless Chromium, playwright-core) and takes a
// screenshot of the whole graph: every node and note in view, the menus left out. tests/workflow_screenshots.py turns
// the screenshots into the thumbnails workflows/<name>.jpg. Prints one JSON line: what each page showed.
//
// Usage: node screenshot_workflows.mjs CONFIG.json
// CONFIG: {url, playwright_core, chromium, load_timeout_ms, viewport: [width, height],
//          workflows: [{path, screenshot}]}

import { readFileSync } from "node:fs";
import { createRequire } from "node:module";

const config = JSON.parse(readFileSync(process.argv[2], "utf-8"));
const { chromium } = createRequire(import.meta.url)(config.playwright_core);

// The front end's chrome (side bar on the left, menu and tabs on top): the graph is fitted into the rest.
const LEFT = 64;
const TOP = 96;
const MARGIN = 24;

async function setting(id, value) {
  const answer = await fetch(`${config.url}/settings/${id}`, {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(value) });
  if (!answer.ok) throw new Error(`POST /settings/${id} answered HTTP ${answer.status}`);
}

const report = { page_errors: [], workflows: [] };
// A returning user who has seen the templates; no dialogs about model files this machine lacks (the native
// workflow names FLUX.2-dev's files): the screenshot shows the graph only.
await setting("Comfy.TutorialCompleted", true);
await setting("Comfy.Workflow.ShowMissingModelsWarning", false);
await setting("Comfy.Workflow.ShowMissingNodesWarning", false);
// Full detail at any zoom (the canvas otherwise drops text below a font size), no minimap or canvas overlays.
await setting("LiteGraph.Canvas.MinFontSizeForLOD", 1);
await setting("Comfy.Minimap.Visible", false);
await setting("Comfy.Graph.CanvasInfo", false);
await setting("Comfy.Graph.CanvasMenu", false);

const browser = await chromium.launch({
  executablePath: config.chromium,
  headless: true,
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
});
try {
  const [width, height] = config.viewport;
  const page = await browser.newPage({ viewport: { width, height }, deviceScaleFactor: 1 });
  page.on("pageerror", (err) => report.page_errors.push(String(err?.message ?? err)));
  await page.goto(config.url, { waitUntil: "domcontentloaded", timeout: config.load_timeout_ms });
  await page.waitForFunction(
    () => window.app?.graph && window.LiteGraph?.registered_node_types?.Flux2LoraTrain,
    null,
    { timeout: config.load_timeout_ms },
  );
  for (const item of config.workflows) {
    const workflow = JSON.parse(readFileSync(item.path, "utf-8"));
    const shown = await page.evaluate(
      async ({ workflow, box }) => {
        const app = window.app;
        await app.loadGraphData(workflow);
        const title = window.LiteGraph.NODE_TITLE_HEIGHT ?? 30;
        const nodes = app.graph.nodes;
        const x0 = Math.min(...nodes.map((n) => n.pos[0]));
        const y0 = Math.min(...nodes.map((n) => n.pos[1] - title));
        const x1 = Math.max(...nodes.map((n) => n.pos[0] + n.size[0]));
        const y1 = Math.max(...nodes.map((n) => n.pos[1] + n.size[1]));
        const roomW = window.innerWidth - box.left - 2 * box.margin;
        const roomH = window.innerHeight - box.top - 2 * box.margin;
        const scale = Math.min(1, roomW / (x1 - x0), roomH / (y1 - y0));
        // Centred in the room left of the chrome.
        const padX = (roomW - (x1 - x0) * scale) / 2;
        const padY = (roomH - (y1 - y0) * scale) / 2;
        app.canvas.ds.scale = scale;
        app.canvas.ds.offset = [(box.left + box.margin + padX) / scale - x0, (box.top + box.margin + padY) / scale - y0];
        app.canvas.setDirty(true, true);
        return { node_types: nodes.map((n) => n.type).sort(), scale };
      },
      { workflow, box: { left: LEFT, top: TOP, margin: MARGIN } },
    );
    // Two frames: DOM widgets (text areas, the Train LoRA panel) are placed on the canvas' next draw.
    await page.evaluate(() => new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r))));
    await page.screenshot({ path: item.screenshot, clip: { x: LEFT, y: TOP, width: width - LEFT, height: height - TOP } });
    report.workflows.push({ path: item.path, screenshot: item.screenshot, ...shown });
  }
} finally {
  await browser.close();
}
process.stdout.write(`${JSON.stringify(report)}\n`);
