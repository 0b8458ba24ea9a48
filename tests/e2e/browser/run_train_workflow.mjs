// Drives ComfyUI's real front end in headless Chromium (playwright-core): loads a UI-format workflow,
// applies widget overrides, presses Run, waits for the prompt to end, and reports what the Train LoRA
// panel shows (chart pixels, run state, sample strip) as one JSON line on stdout. Assertions live in
// tests/e2e/test_browser.py; this script only observes.
//
// Usage: node run_train_workflow.mjs CONFIG.json
// CONFIG: {url, workflow_path, overrides: {nodeId: {widget: value}}, preview_node_ids, screenshot, playwright_core,
//          chromium, load_timeout_ms, run_timeout_ms, viewport?: [width, height], fit_node_ids?: [nodeId, ...],
//          settings?: {settingId: value}}
// fit_node_ids: the nodes kept in view after the run (default: the Train LoRA node alone), for the screenshot.

import { readFileSync } from "node:fs";
import { createRequire } from "node:module";

const config = JSON.parse(readFileSync(process.argv[2], "utf-8"));
// playwright-core comes from a folder the test names (never from this repo's own node_modules).
const { chromium } = createRequire(import.meta.url)(config.playwright_core);

const TRAIN_TYPE = "Flux2LoraTrain";
const SMOOTHED_RGB = [0x4f, 0x8c, 0xff]; // the smoothed loss line in web/js/flux2_lora_train.js
const RAW_RGB = [120, 160, 255]; // the raw loss line (drawn at alpha 0.45)

// Where each line of the Train LoRA panel sits on screen, next to the panel's and the node's own boxes: the test
// checks that nothing is cut off. Runs in the page (passed to page.evaluate), so it may only use its argument.
function panelLayout(trainType) {
  const app = window.app;
  const train = app.graph.nodes.find((n) => n.type === trainType);
  const panel = train?.flux2loraPanel;
  if (!panel) return null;
  const box = (r) => ({ left: r.left, top: r.top, right: r.right, bottom: r.bottom });
  // The node's body (below its title) in page pixels: graph coordinates through the canvas transform.
  const canvasRect = app.canvas.canvas.getBoundingClientRect();
  const { scale, offset } = app.canvas.ds;
  const x = (gx) => canvasRect.left + (gx + offset[0]) * scale;
  const y = (gy) => canvasRect.top + (gy + offset[1]) * scale;
  const describe = (element) => {
    const style = getComputedStyle(element);
    return {
      name: String(element.className || element.tagName.toLowerCase()),
      text: element.tagName === "CANVAS" ? "" : (element.textContent ?? "").slice(0, 200),
      display: style.display,
      overflow_x: style.overflowX,
      box: box(element.getBoundingClientRect()),
      client: [element.clientWidth, element.clientHeight],
      scroll: [element.scrollWidth, element.scrollHeight],
    };
  };
  const head = panel.root.querySelector(".flux2lora-head");
  return {
    scale,
    node_size: [train.size[0], train.size[1]],
    node: { left: x(train.pos[0]), top: y(train.pos[1]), right: x(train.pos[0] + train.size[0]),
            bottom: y(train.pos[1] + train.size[1]) },
    panel: describe(panel.root),
    widget: { computed_height: panel.widget.computedHeight ?? null, margin: panel.widget.margin ?? null,
              min_height: panel.minHeight() },
    // The panel's rows, and the status line inside the header row.
    lines: [...panel.root.children, ...(head ? [...head.children] : [])].map(describe),
  };
}

const report = { page_errors: [], console_errors: [] };
let page = null;
const browser = await chromium.launch({
  executablePath: config.chromium,
  headless: true,
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
});
try {
  const [width, height] = config.viewport ?? [1600, 1100];
  page = await browser.newPage({ viewport: { width, height }, deviceScaleFactor: 1 });
  page.on("pageerror", (err) => report.page_errors.push(String(err?.message ?? err)));
  let reject;
  const rejection = new Promise((resolve) => (reject = resolve));
  page.on("response", async (response) => {
    if (response.request().method() !== "POST" || !/\/prompt$/.test(new URL(response.url()).pathname)) return;
    report.prompt_status = response.status();
    if (response.status() >= 400) {
      let body = null;
      try {
        body = await response.json();
      } catch {
        body = await response.text().catch(() => null);
      }
      reject({ type: "prompt_rejected", status: response.status(), detail: body });
    }
  });
  page.on("console", (msg) => {
    if (msg.type() === "error") report.console_errors.push(msg.text().slice(0, 500));
  });

  // A returning user: a fresh user folder would open the template browser over the canvas on first load.
  // config.settings: more front-end settings, e.g. no minimap over the nodes on the screenshot.
  for (const [id, value] of Object.entries({ "Comfy.TutorialCompleted": true, ...(config.settings ?? {}) })) {
    const setting = await fetch(`${config.url}/settings/${id}`, {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(value) });
    if (!setting.ok) throw new Error(`POST /settings/${id} answered HTTP ${setting.status}`);
  }
  await page.goto(config.url, { waitUntil: "domcontentloaded", timeout: config.load_timeout_ms });
  await page.waitForFunction(
    () => window.app?.graph && window.comfyAPI?.api?.api && window.LiteGraph?.registered_node_types?.Flux2LoraTrain,
    null,
    { timeout: config.load_timeout_ms },
  );
  report.extension_registered = await page.evaluate(() =>
    (window.app.extensions ?? []).some((e) => e.name === "flux2lora.TrainLoraChart"),
  );

  const workflow = JSON.parse(readFileSync(config.workflow_path, "utf-8"));
  report.loaded = await page.evaluate(
    async ({ workflow, overrides, trainType }) => {
      const app = window.app;
      const api = window.comfyAPI.api.api;
      const probe = (window.__flux2e2e = { outcome: null, train_events: 0, progress_max: null });
      api.addEventListener("execution_success", (e) => (probe.outcome ??= { type: "execution_success", detail: e.detail }));
      api.addEventListener("execution_error", (e) => (probe.outcome ??= { type: "execution_error", detail: e.detail }));
      api.addEventListener("execution_interrupted", (e) => (probe.outcome ??= { type: "execution_interrupted", detail: e.detail }));
      api.addEventListener("flux2lora.train", () => (probe.train_events += 1));
      api.addEventListener("status", (e) => (probe.queue_remaining = e.detail?.exec_info?.queue_remaining ?? null));
      await app.loadGraphData(workflow);
      const missing = [];
      for (const [id, widgets] of Object.entries(overrides)) {
        const node = app.graph.getNodeById(Number(id));
        for (const [name, value] of Object.entries(widgets)) {
          const widget = node?.widgets?.find((w) => w.name === name);
          if (widget) widget.value = value;
          else missing.push(`${id}.${name}`);
        }
      }
      const train = app.graph.nodes.find((n) => n.type === trainType);
      // Keep the whole Train node in view (clear of the side bar and the top menu): its DOM panel and
      // its lazy images only render on screen, and the screenshot should show all of it. After the run the
      // view may take in more nodes (fit_node_ids), all of them whole.
      probe.fit = (ids) => {
        const title = window.LiteGraph.NODE_TITLE_HEIGHT ?? 30;
        const nodes = (ids ?? []).map((id) => app.graph.getNodeById(Number(id))).filter(Boolean);
        const shown = nodes.length ? nodes : [train];
        const x0 = Math.min(...shown.map((n) => n.pos[0]));
        const y0 = Math.min(...shown.map((n) => n.pos[1] - title));
        const x1 = Math.max(...shown.map((n) => n.pos[0] + n.size[0]));
        const y1 = Math.max(...shown.map((n) => n.pos[1] + n.size[1]));
        const left = 90;
        const top = 120;
        const scale = Math.min(1, (window.innerHeight - top - 20) / (y1 - y0), (window.innerWidth - left - 20) / (x1 - x0));
        app.canvas.ds.scale = scale;
        app.canvas.ds.offset = [left / scale - x0, top / scale - y0];
        app.canvas.setDirty(true, true);
      };
      probe.fit();
      return {
        node_types: app.graph.nodes.map((n) => n.type).sort(),
        missing_widgets: missing,
        train_id: train?.id ?? null,
        has_panel: !!train?.flux2loraPanel,
      };
    },
    { workflow, overrides: config.overrides ?? {}, trainType: TRAIN_TYPE },
  );
  // The panel before any run (two frames: the DOM widget is placed on the canvas' next draw).
  await page.evaluate(() => new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r))));
  report.layout_loaded = await page.evaluate(panelLayout, TRAIN_TYPE);

  // Press Run like a user; the front end builds the prompt from the graph and posts it.
  const runButton = page.locator('[data-testid="queue-button"]');
  if (await runButton.count()) {
    await runButton.first().click({ timeout: 15000 });
    report.run_via = "button";
  } else {
    await page.evaluate(() => window.app.queuePrompt(0));
    report.run_via = "app.queuePrompt";
  }
  // Either the prompt ends (success, error, interrupt) or POST /prompt is refused (validation failed).
  const ended = page.waitForFunction(() => window.__flux2e2e.outcome, null, { timeout: config.run_timeout_ms });
  const refused = rejection.then((body) => body);
  report.outcome = await Promise.race([ended.then(() => page.evaluate(() => window.__flux2e2e.outcome)), refused]);

  if (report.outcome.type === "execution_success") {
    // The node grew with the images and the run info.
    await page.evaluate((ids) => window.__flux2e2e.fit(ids), config.fit_node_ids ?? null);
    // Settle before looking: the queue shows empty and the Save Image nodes show their previews.
    await page
      .waitForFunction(
        (ids) =>
          window.__flux2e2e.queue_remaining === 0 &&
          ids.every((id) => {
            const imgs = window.app.graph.getNodeById(id)?.imgs ?? [];
            return imgs.length > 0 && imgs.every((img) => img.complete && img.naturalWidth > 0);
          }),
        config.preview_node_ids ?? [],
        { timeout: 30000 },
      )
      .catch(() => {}); // reported below; the test asserts on it
    // The strip fills from validation events; images load from the pack's route.
    await page
      .waitForFunction(
        () => {
          const imgs = [...document.querySelectorAll(".flux2lora-strip img")];
          return imgs.length > 0 && imgs.every((img) => img.complete && img.naturalWidth > 0);
        },
        null,
        { timeout: 30000 },
      )
      .catch(() => {}); // reported below; the test asserts on it
    // Two animation frames: the chart redraws on the next frame after the last event.
    await page.evaluate(() => new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r))));
  }

  report.panel = await page.evaluate(
    ({ trainType, smoothed, raw }) => {
      const train = window.app.graph.nodes.find((n) => n.type === trainType);
      const panel = train?.flux2loraPanel;
      if (!panel) return null;
      const st = panel.state;
      const canvas = panel.canvas;
      const near = (px, i, rgb, tol) =>
        px[i + 3] > 0 && Math.abs(px[i] - rgb[0]) <= tol && Math.abs(px[i + 1] - rgb[1]) <= tol && Math.abs(px[i + 2] - rgb[2]) <= tol;
      let painted = 0;
      let smoothedPixels = 0;
      let rawPixels = 0;
      const columns = new Set();
      if (canvas.width && canvas.height) {
        const px = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
        for (let i = 0; i < px.length; i += 4) {
          if (px[i + 3] === 0) continue;
          painted += 1;
          if (near(px, i, smoothed, 24)) {
            smoothedPixels += 1;
            columns.add((i / 4) % canvas.width);
          } else if (near(px, i, raw, 40)) rawPixels += 1;
        }
      }
      const imgs = [...panel.strip.querySelectorAll("img")];
      return {
        run: st.run,
        status: st.status,
        status_text: panel.statusEl.textContent,
        progress_text: panel.progressEl.textContent,
        steps: st.steps,
        finite_losses: st.losses.filter(Number.isFinite).length,
        total: st.total,
        validation_prompts: [...st.validation.keys()],
        canvas: { width: canvas.width, height: canvas.height, painted, smoothed_pixels: smoothedPixels,
                  raw_pixels: rawPixels, smoothed_columns: columns.size },
        strip: imgs.map((img) => ({ src: img.getAttribute("src"), complete: img.complete,
                                    width: img.naturalWidth, height: img.naturalHeight })),
        train_events: window.__flux2e2e.train_events,
      };
    },
    { trainType: TRAIN_TYPE, smoothed: SMOOTHED_RGB, raw: RAW_RGB },
  );
  report.layout_finished = await page.evaluate(panelLayout, TRAIN_TYPE);
  report.queue_remaining = await page.evaluate(() => window.__flux2e2e.queue_remaining);
  report.previews = await page.evaluate(
    (ids) =>
      Object.fromEntries(
        ids.map((id) => [id, (window.app.graph.getNodeById(id)?.imgs ?? []).map((img) => [img.naturalWidth, img.naturalHeight])]),
      ),
    config.preview_node_ids ?? [],
  );

  await page.screenshot({ path: config.screenshot });
  report.screenshot = config.screenshot;
} catch (err) {
  // Keep what the page showed when it went wrong: the test prints this path with the error.
  const failure = config.screenshot.replace(/\.png$/, "-failure.png");
  await page?.screenshot({ path: failure }).catch(() => {});
  process.stderr.write(`screenshot at failure: ${failure}\nreport so far: ${JSON.stringify(report)}\n`);
  throw err;
} finally {
  await browser.close();
}
process.stdout.write(`${JSON.stringify(report)}\n`);
