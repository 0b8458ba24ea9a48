// Live view of a Train LoRA (FLUX.2) run on its node: loss chart (raw + smoothed, learning rate on a
// second axis, log toggle), progress text, and the latest validation image per prompt.
//
// Live data comes from the "flux2lora.train" websocket events the node sends; after a page reload
// the same history is read back from the pack's /flux2lora/runs routes (nodes/routes.py), using the
// run name remembered in node.properties.flux2lora_run. Nothing here talks to any other server.

import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const NODE_ID = "Flux2LoraTrain";
const EVENT = "flux2lora.train";
const RUN_PROP = "flux2lora_run";
const LOG_PROP = "flux2lora_log_scale";
// Same rule as nodes/routes.py RUN_NAME: one path part, never "." or ".." or hidden.
const RUN_NAME = /^[A-Za-z0-9-][A-Za-z0-9._-]{0,127}$/;
const SMOOTHING = 0.9;
const MAX_HISTORY_PAGES = 100000;
// Panel geometry shared by the CSS below and the node's size (minHeight): the two must never disagree.
const PANEL_GAP = 3; // px between rows
const PANEL_PAD_Y = 2; // px above and below the rows
const CHART_MIN_HEIGHT = 120;
const TEXT_LINE = 12; // line height of the run info and error boxes (10 px monospace)
const ERROR_MAX_LINES = 10; // a longer error (a log tail) scrolls; the full text is the status tooltip
const DOM_WIDGET_MARGIN = 10; // ComfyUI's DOM widget margin, around the panel, when the widget does not say
// Row heights used until the panel has been laid out once (a node created off screen): measured values replace them.
const ESTIMATED_ROW = { head: 19, progress: 13, strip: 80 };

// ---------------------------------------------------------------------------------------------
// Pure helpers (exported so tests can run them under node without a browser).

export function isRunName(name) {
  return typeof name === "string" && RUN_NAME.test(name);
}

/** The route (without ComfyUI's /api base) that serves one validation image of a run. */
export function imageRoute(run, path) {
  return `/flux2lora/runs/${encodeURIComponent(run)}/image?path=${encodeURIComponent(path)}`;
}

/** Exponential moving average with TensorBoard's debiasing, so early values are not pulled to 0. */
export function emaSeries(values, smoothing = SMOOTHING) {
  const out = new Array(values.length);
  let acc = 0;
  let n = 0;
  for (let i = 0; i < values.length; i++) {
    const v = values[i];
    if (!Number.isFinite(v)) {
      out[i] = NaN; // a NaN loss is shown as a gap, not folded into the average
      continue;
    }
    acc = acc * smoothing + v * (1 - smoothing);
    n += 1;
    out[i] = smoothing === 0 ? v : acc / (1 - Math.pow(smoothing, n));
  }
  return out;
}

/** About `count` round tick values (1, 2 or 5 times a power of ten) covering [min, max]. */
export function niceTicks(min, max, count = 5) {
  if (!Number.isFinite(min) || !Number.isFinite(max)) return [];
  if (max < min) [min, max] = [max, min];
  if (max === min) return [min];
  const raw = (max - min) / Math.max(1, count);
  const mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => s >= raw) ?? 10 * mag;
  const ticks = [];
  for (let t = Math.ceil(min / step) * step; t <= max + step * 1e-9; t += step) {
    ticks.push(Number(t.toPrecision(12)));
  }
  return ticks;
}

/** Ticks for a log10 axis given its range in log10 units: decades, or 1-2-5 steps within one. */
export function logTicks(lo, hi) {
  const decades = [];
  const fine = [];
  for (let k = Math.floor(lo); k <= Math.ceil(hi); k++) {
    for (const m of [1, 2, 5]) {
      const v = m * Math.pow(10, k);
      const lv = Math.log10(v);
      if (lv >= lo - 1e-9 && lv <= hi + 1e-9) (m === 1 ? decades : fine).push(Number(v.toPrecision(12)));
    }
  }
  return decades.length >= 2 ? decades : [...decades, ...fine].sort((a, b) => a - b);
}

export function formatNumber(v) {
  if (!Number.isFinite(v)) return String(v);
  const a = Math.abs(v);
  if (a !== 0 && (a >= 10000 || a < 0.001)) return v.toExponential(1);
  return String(Number(v.toPrecision(3)));
}

export function formatDuration(seconds) {
  if (!Number.isFinite(seconds) || seconds < 0) return "?";
  const s = Math.round(seconds);
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  const sec = s % 60;
  if (h > 0) return `${h}h ${String(m).padStart(2, "0")}m`;
  if (m > 0) return `${m}m ${String(sec).padStart(2, "0")}s`;
  return `${sec}s`;
}

/** The run name in Train LoRA's run_info text ("run folder: /.../runs/<run>"), or null. */
export function runFromInfo(text) {
  const match = /run folder:\s*(.+)/.exec(String(text ?? ""));
  if (!match) return null;
  const name = match[1].trim().replace(/[\\/]+$/, "").split(/[\\/]/).pop();
  return isRunName(name) ? name : null;
}

function num(v) {
  if (typeof v === "number") return v;
  // The trainer writes NaN/inf as strings ("nan", "inf"): both read as NaN, a gap in the chart.
  return typeof v === "string" && v.trim() ? Number(v) : NaN;
}

/** Everything the node shows about one run, built by applying events in order (live or replayed). */
export class RunState {
  constructor(run = null) {
    this.reset(run);
  }

  reset(run) {
    this.run = run;
    this.steps = [];
    this.losses = [];
    this.lrs = [];
    this.total = null;
    this.step = null;
    this.secondsPerStep = null;
    this.samplesPerSecond = null;
    this.eta = null;
    this.checkpointStep = null;
    this.status = run ? "loading" : "idle";
    this.message = "";
    this.validation = new Map(); // prompt -> {path, step}: the latest image per prompt
    this.validationVersion = 0;
    this.eventCount = 0;
    this.version = 0; // bumped per step, so the smoothed curve is computed once per change
    this.emaCache = null;
    this.emaVersion = -1;
    this.estimate = ""; // the preflight's time and memory estimate, shown until the first step
    this.estimateDetail = ""; // its full text (the progress line's tooltip)
  }

  smoothed() {
    if (this.emaVersion !== this.version) {
      this.emaCache = emaSeries(this.losses);
      this.emaVersion = this.version;
    }
    return this.emaCache;
  }

  /** Apply one event; returns false for events this view does not know. */
  apply(event) {
    if (!event || typeof event !== "object") return false;
    const kind = event.event;
    this.eventCount += 1;
    if (Number.isFinite(num(event.max_train_steps))) this.total = num(event.max_train_steps);
    switch (kind) {
      case "start":
        this.status = "running";
        this.message = "";
        return true;
      case "step":
        this.addStep(event);
        this.status = "running";
        this.message = "";
        return true;
      case "validation":
        for (const image of Array.isArray(event.images) ? event.images : []) {
          if (image && typeof image.path === "string") {
            // ema_validation "comparison" renders each prompt twice: the EMA's image keeps its own tile
            const key = String(image.prompt ?? "") + (image.variant ? ` (${image.variant})` : "");
            this.validation.set(key, { path: image.path, step: num(event.step) });
          }
        }
        this.validationVersion += 1;
        return true;
      case "checkpoint":
        this.checkpointStep = num(event.step);
        return true;
      case "preflight":
        // Sent before the trainer starts; not a training event (a folder holding only this one has no run yet).
        this.estimate = String(event.short ?? "");
        this.estimateDetail = String(event.summary ?? "");
        this.eventCount -= 1;
        return true;
      case "end":
        if (Number.isFinite(num(event.step))) this.step = num(event.step);
        this.status = "finished";
        this.eta = 0;
        return true;
      case "error":
      case "failed":
        this.status = "failed";
        this.message = String(event.message ?? "unknown error");
        return true;
      case "cancelled":
        this.status = "cancelled";
        return true;
      default:
        this.eventCount -= 1;
        return false;
    }
  }

  addStep(event) {
    const step = num(event.step);
    if (!Number.isFinite(step)) return;
    // A resumed run starts again from its last checkpoint: its steps replace the ones after it.
    let keep = this.steps.length;
    while (keep > 0 && this.steps[keep - 1] >= step) keep -= 1;
    if (keep < this.steps.length) {
      this.steps.length = keep;
      this.losses.length = keep;
      this.lrs.length = keep;
    }
    this.version += 1;
    this.steps.push(step);
    this.losses.push(num(event.loss));
    this.lrs.push(num(event.lr));
    this.step = step;
    this.secondsPerStep = num(event.seconds_per_step);
    this.samplesPerSecond = num(event.samples_per_second);
    this.eta = num(event.eta_seconds);
  }

  /** After replaying a file: without an end, cancel or error the run is not known to be alive. */
  finishReplay() {
    if (this.status === "running" || this.status === "loading") {
      this.status = this.eventCount > 0 ? "incomplete" : "new";
    }
  }

  get spinning() {
    return this.status === "running" || this.status === "starting" || this.status === "loading";
  }

  statusText() {
    const name = this.run ?? "";
    switch (this.status) {
      case "idle":
        return "no run yet: press Run";
      case "loading":
        return `loading ${name}…`;
      case "starting":
        return "starting…";
      case "running":
        return `training ${name}`;
      case "finished":
        return `finished ${name}`;
      case "cancelled":
        return `cancelled ${name}: Run again to resume from the last checkpoint`;
      case "failed":
        return `failed: ${this.message.split("\n")[0]}`;
      case "incomplete":
        return `${name}: no end event yet (stopped, or still running elsewhere)`;
      case "new":
        return `${name}: no events yet`;
      case "unavailable":
        return `no history for ${name}: ${this.message}`;
      default:
        return this.status;
    }
  }

  progressText() {
    const parts = [];
    if (this.step === null && this.estimate) parts.push(this.estimate);
    if (this.step !== null) parts.push(this.total ? `step ${this.step}/${this.total}` : `step ${this.step}`);
    if (Number.isFinite(this.secondsPerStep)) parts.push(`${formatNumber(this.secondsPerStep)} s/it`);
    if (Number.isFinite(this.samplesPerSecond)) parts.push(`${formatNumber(this.samplesPerSecond)} img/s`);
    if (this.status === "running" && Number.isFinite(this.eta)) parts.push(`ETA ${formatDuration(this.eta)}`);
    const n = this.losses.length;
    if (n) {
      const ema = this.smoothed();
      parts.push(`loss ${formatNumber(this.losses[n - 1])} (smoothed ${formatNumber(ema[n - 1])})`);
      if (Number.isFinite(this.lrs[n - 1])) parts.push(`lr ${this.lrs[n - 1].toExponential(1)}`);
    }
    if (Number.isFinite(this.checkpointStep)) parts.push(`checkpoint ${this.checkpointStep}`);
    return parts.join(" · ");
  }
}

/** All events of a run from the route, page by page (the route answers at most a few MiB at once). */
export async function fetchRunEvents(fetchApi, run) {
  let offset = 0;
  let events = [];
  for (let page = 0; page < MAX_HISTORY_PAGES; page++) {
    const res = await fetchApi(`/flux2lora/runs/${encodeURIComponent(run)}/events?since=${offset}`);
    if (!res.ok) {
      let message = `HTTP ${res.status}`;
      try {
        message = (await res.json()).error ?? message;
      } catch {
        // keep the status line
      }
      throw new Error(message);
    }
    const body = await res.json();
    events = events.concat(Array.isArray(body.events) ? body.events : []);
    // A half-written last line leaves the offset where it was: stop, the websocket brings the rest.
    if (body.complete || !(body.offset > offset)) break;
    offset = body.offset;
  }
  return events;
}

/** Which views an event for `run` goes to: those showing it, and the node now executing (which switches). */
export function pickViews(views, run, executingId) {
  const showing = views.filter((v) => v.run === run);
  const execKey = executingId == null ? null : String(executingId).split(":").pop();
  const executing = execKey === null ? undefined : views.find((v) => String(v.nodeId) === execKey);
  if (executing && !showing.includes(executing)) return { same: showing, switchTo: [executing] };
  if (showing.length) return { same: showing, switchTo: [] };
  return { same: [], switchTo: views.length === 1 ? [...views] : [] };
}

/** Height of the panel's column of rows: padding, each row shown (null: hidden) and the gaps between them. */
export function stackHeight(rows, { gap = PANEL_GAP, padding = 2 * PANEL_PAD_Y } = {}) {
  const shown = rows.filter((h) => h !== null && h !== undefined);
  return padding + shown.reduce((sum, h) => sum + h, 0) + gap * Math.max(0, shown.length - 1);
}

/** Lines a text box shows before it wraps (an estimate for a box not laid out yet; 0 when empty). */
export function textLines(text) {
  return text ? String(text).split("\n").length : 0;
}

// ---------------------------------------------------------------------------------------------
// The panel on the node (DOM widget) and its chart.

const STYLE = `
.flux2lora-panel { display: flex; flex-direction: column; gap: ${PANEL_GAP}px; box-sizing: border-box; width: 100%;
  height: 100%; padding: ${PANEL_PAD_Y}px 4px; overflow: hidden; font: 11px sans-serif; color: var(--fg-color, #ddd); }
.flux2lora-head { display: flex; align-items: center; gap: 6px; min-height: 16px; flex: none; }
.flux2lora-status { flex: 1; min-width: 0; line-height: 13px; overflow-wrap: anywhere; }
.flux2lora-status.failed { color: #ff7b72; }
.flux2lora-spin { width: 10px; height: 10px; border: 2px solid rgba(128,128,128,0.35); border-top-color: #4f8cff;
  border-radius: 50%; animation: flux2lora-spin 0.9s linear infinite; flex: none; }
.flux2lora-spin[hidden] { display: none; }
@keyframes flux2lora-spin { to { transform: rotate(360deg); } }
.flux2lora-progress { line-height: 13px; overflow-wrap: anywhere; opacity: 0.85; flex: none; min-height: 13px; }
.flux2lora-chart { flex: 1 1 auto; min-height: ${CHART_MIN_HEIGHT}px; width: 100%; display: block; }
.flux2lora-strip { display: flex; gap: 4px; overflow-x: auto; flex: none; min-height: ${ESTIMATED_ROW.strip}px; }
.flux2lora-strip:empty, .flux2lora-info:empty, .flux2lora-error:empty { display: none; }
.flux2lora-strip figure { margin: 0; flex: none; cursor: zoom-in; text-align: center; max-width: 96px; }
.flux2lora-strip img { height: 64px; max-width: 96px; object-fit: cover; border-radius: 3px; display: block; }
.flux2lora-strip figcaption { font-size: 9px; line-height: 11px; opacity: 0.75; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
/* Every line of the run info is shown (the node grows to hold it); a long error scrolls after ERROR_MAX_LINES. */
.flux2lora-error, .flux2lora-info { margin: 0; white-space: pre-wrap; overflow-wrap: anywhere;
  font: 10px/${TEXT_LINE}px monospace; opacity: 0.85; flex: none; }
.flux2lora-error { max-height: ${ERROR_MAX_LINES * TEXT_LINE}px; overflow: auto; color: #ff7b72; }
.flux2lora-overlay { position: fixed; inset: 0; z-index: 10000; background: rgba(0,0,0,0.85); display: flex;
  flex-direction: column; align-items: center; justify-content: center; gap: 8px; cursor: zoom-out; }
.flux2lora-overlay img { max-width: 92vw; max-height: 85vh; object-fit: contain; }
.flux2lora-overlay div { color: #eee; font: 13px sans-serif; max-width: 92vw; text-align: center; }
`;

function ensureStyle() {
  if (document.getElementById("flux2lora-style")) return;
  const style = document.createElement("style");
  style.id = "flux2lora-style";
  style.textContent = STYLE;
  document.head.append(style);
}

/** Tell ComfyUI the graph changed, so the saved and the page-reload copy of the workflow keep our properties. */
function markGraphChanged() {
  // ComfyUI checks for changes on mouseup; a checkbox's change event and a websocket event come after it.
  app.extensionManager?.workflow?.activeWorkflow?.changeTracker?.checkState?.();
}

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

let overlay = null;

function closeOverlay() {
  overlay?.remove();
  overlay = null;
  document.removeEventListener("keydown", onOverlayKey, true);
}

function onOverlayKey(e) {
  if (e.key === "Escape") {
    e.stopPropagation();
    closeOverlay();
  }
}

function openOverlay(src, caption) {
  closeOverlay();
  overlay = el("div", "flux2lora-overlay");
  const img = el("img");
  img.src = src;
  img.alt = caption;
  overlay.append(img, el("div", "", caption));
  overlay.addEventListener("click", closeOverlay);
  document.addEventListener("keydown", onOverlayKey, true);
  document.body.append(overlay);
}

const panels = new Set();
let executingId = null;

class RunPanel {
  constructor(node) {
    this.node = node;
    this.state = new RunState(null);
    this.loadToken = 0;
    this.buffer = null; // live events that arrive while the history is loading
    this.prevStatus = null;
    this.shownValidation = -1;
    this.frame = 0;
    this.measuredRows = null; // row heights as last laid out on screen (minHeight); null: estimate from the text

    ensureStyle();
    this.root = el("div", "flux2lora-panel");
    const head = el("div", "flux2lora-head");
    this.spinner = el("div", "flux2lora-spin");
    this.statusEl = el("div", "flux2lora-status");
    const toggle = el("label");
    this.logBox = el("input");
    this.logBox.type = "checkbox";
    this.logBox.checked = !!node.properties?.[LOG_PROP];
    this.logBox.addEventListener("change", () => {
      this.node.properties = this.node.properties ?? {};
      this.node.properties[LOG_PROP] = this.logBox.checked;
      markGraphChanged();
      this.scheduleDraw();
    });
    toggle.title = "Logarithmic loss axis";
    toggle.append(this.logBox, document.createTextNode(" log"));
    head.append(this.spinner, this.statusEl, toggle);
    this.progressEl = el("div", "flux2lora-progress");
    this.canvas = el("canvas", "flux2lora-chart");
    this.strip = el("div", "flux2lora-strip");
    this.errorEl = el("pre", "flux2lora-error");
    this.infoEl = el("pre", "flux2lora-info");
    this.root.append(head, this.progressEl, this.canvas, this.strip, this.errorEl, this.infoEl);

    this.widget = node.addDOMWidget("flux2lora_chart", "flux2lora_chart", this.root, {
      serialize: false, // not an input: keep it out of the prompt and of widgets_values
      hideOnZoom: false,
      getMinHeight: () => this.minHeight(),
    });
    this.widget.serialize = false;
    if (typeof ResizeObserver !== "undefined") {
      this.resizeObserver = new ResizeObserver(() => this.scheduleDraw());
      this.resizeObserver.observe(this.canvas);
      // A row that changes height (text wrapping at a new width, the panel shown again) may need a taller node.
      this.rowObserver = new ResizeObserver(() => this.fitNode());
      for (const row of this.root.children) if (row !== this.canvas) this.rowObserver.observe(row);
    }
    panels.add(this);
    this.render();
  }

  get run() {
    return this.state.run;
  }

  /** What the DOM widget needs so that every row shows whole: the rows (as last measured on screen, else
   *  estimated from their text), the gaps and padding between them, and the widget's margin above and below. */
  minHeight() {
    const rows = this.measuredRows ?? [...this.root.children].map((row) => this.estimateRow(row));
    return Math.ceil(stackHeight(rows)) + 2 * (this.widget?.margin ?? DOM_WIDGET_MARGIN);
  }

  /** Each row's height as laid out (the chart at its minimum; null for a hidden row), or null when the panel is
   *  not on screen: wrapped text has a height only the browser knows. */
  measureRows() {
    if (!this.root.isConnected || this.root.getClientRects().length === 0) return null;
    return [...this.root.children].map((row) => {
      if (row === this.canvas) return CHART_MIN_HEIGHT;
      return row.getClientRects().length === 0 ? null : row.offsetHeight;
    });
  }

  /** A row's height before the panel was laid out: one line per text line (wrapping shows once measured). */
  estimateRow(row) {
    if (row === this.canvas) return CHART_MIN_HEIGHT;
    if (row === this.strip) return row.childElementCount ? ESTIMATED_ROW.strip : null;
    if (row === this.errorEl || row === this.infoEl) {
      const lines = textLines(row.textContent);
      if (!lines) return null;
      return (row === this.errorEl ? Math.min(lines, ERROR_MAX_LINES) : lines) * TEXT_LINE;
    }
    return row === this.progressEl ? ESTIMATED_ROW.progress : ESTIMATED_ROW.head;
  }

  /** Grow the node when new content (images, messages) needs room; never shrink what the user sized. */
  fitNode() {
    this.measuredRows = this.measureRows();
    const need = this.node.computeSize?.();
    if (need && this.node.size[1] < need[1]) {
      this.node.setSize([this.node.size[0], need[1]]);
      this.node.setDirtyCanvas?.(true, true);
    }
  }

  get nodeId() {
    return this.node.id;
  }

  dispose() {
    panels.delete(this);
    this.resizeObserver?.disconnect();
    this.rowObserver?.disconnect();
    this.loadToken += 1;
    if (this.frame) cancelAnimationFrame(this.frame);
  }

  /** Show `run` with its full history from the route (once per run unless forced). */
  async showRun(run, { force = false } = {}) {
    if (!isRunName(run)) return;
    if (!force && this.state.run === run && this.state.status !== "unavailable") return;
    this.node.properties = this.node.properties ?? {};
    if (this.node.properties[RUN_PROP] !== run) {
      this.node.properties[RUN_PROP] = run;
      markGraphChanged();
    }
    const token = ++this.loadToken;
    if (run !== this.state.run) this.infoEl.textContent = ""; // that text was about another run
    this.state.reset(run);
    this.buffer = [];
    this.render();
    let events = [];
    let failure = null;
    try {
      events = await fetchRunEvents((route) => api.fetchApi(route), run);
    } catch (err) {
      failure = err;
    }
    if (token !== this.loadToken) return; // a newer run took over meanwhile
    for (const event of events) this.state.apply(event);
    this.state.finishReplay();
    if (failure && this.state.eventCount === 0) {
      this.state.status = "unavailable";
      this.state.message = String(failure.message ?? failure);
    }
    const buffered = this.buffer;
    this.buffer = null;
    for (const event of buffered) this.state.apply(event);
    this.render();
  }

  restore() {
    const run = this.node.properties?.[RUN_PROP];
    this.logBox.checked = !!this.node.properties?.[LOG_PROP];
    if (run) this.showRun(run);
    else this.render();
  }

  onLiveEvent(event) {
    if (this.buffer) this.buffer.push(event);
    else this.state.apply(event);
    this.render();
  }

  setExecuting(active) {
    if (active && !this.state.spinning) {
      this.prevStatus = this.state.status;
      this.state.status = "starting";
    } else if (!active && this.state.status === "starting") {
      this.state.status = this.prevStatus ?? "idle"; // ended without a training event (export mode, error)
    } else {
      return;
    }
    this.render();
  }

  fail(message) {
    if (this.state.status === "failed") return;
    this.state.status = "failed";
    this.state.message = String(message ?? "unknown error");
    this.render();
  }

  setInfo(text) {
    const run = runFromInfo(text);
    if (run && (run !== this.state.run || this.state.status === "starting")) this.showRun(run, { force: true });
    this.infoEl.textContent = text;
    this.fitNode();
  }

  render() {
    const st = this.state;
    this.statusEl.textContent = st.statusText();
    this.statusEl.title = st.status === "failed" ? st.message : st.statusText();
    this.statusEl.classList.toggle("failed", st.status === "failed" || st.status === "unavailable");
    this.spinner.hidden = !st.spinning;
    this.progressEl.textContent = st.progressText();
    this.progressEl.title = st.estimateDetail;
    this.errorEl.textContent = st.status === "failed" && st.message.includes("\n") ? st.message : "";
    if (this.shownValidation !== st.validationVersion || this.stripRun !== st.run) this.renderStrip();
    this.fitNode();
    this.scheduleDraw();
  }

  renderStrip() {
    const st = this.state;
    this.shownValidation = st.validationVersion;
    this.stripRun = st.run;
    this.strip.replaceChildren();
    if (!st.run) return;
    for (const [prompt, image] of st.validation) {
      const src = api.apiURL(imageRoute(st.run, image.path));
      const caption = `${prompt || "(empty prompt)"} · step ${Number.isFinite(image.step) ? image.step : "?"}`;
      const fig = el("figure");
      const img = el("img");
      img.src = src;
      img.alt = caption;
      img.loading = "lazy";
      fig.title = caption;
      fig.append(img, el("figcaption", "", prompt || "(empty prompt)"));
      fig.addEventListener("click", (e) => {
        e.stopPropagation();
        openOverlay(src, caption);
      });
      this.strip.append(fig);
    }
  }

  scheduleDraw() {
    if (this.frame) return;
    this.frame = requestAnimationFrame(() => {
      this.frame = 0;
      this.draw();
    });
  }

  draw() {
    const canvas = this.canvas;
    const w = canvas.clientWidth;
    const h = canvas.clientHeight;
    if (!w || !h) return;
    const dpr = window.devicePixelRatio || 1;
    if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(h * dpr)) {
      canvas.width = Math.round(w * dpr);
      canvas.height = Math.round(h * dpr);
    }
    const ctx = canvas.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, w, h);
    const fg = getComputedStyle(this.root).color || "#ddd";
    ctx.font = "10px sans-serif";
    ctx.fillStyle = fg;

    const st = this.state;
    const logScale = !!this.node.properties?.[LOG_PROP];
    const ok = (v) => Number.isFinite(v) && (!logScale || v > 0);
    const raw = st.losses;
    const ema = st.smoothed();
    let lo = Infinity;
    let hi = -Infinity;
    for (const v of raw) {
      if (ok(v)) {
        lo = Math.min(lo, v);
        hi = Math.max(hi, v);
      }
    }
    if (!st.steps.length || !Number.isFinite(lo)) {
      ctx.textAlign = "center";
      ctx.fillText(st.steps.length ? "no finite loss to plot" : "the loss curve appears here", w / 2, h / 2);
      return;
    }
    const lrMax = st.lrs.reduce((m, v) => (Number.isFinite(v) && v > m ? v : m), 0);
    const pad = { l: 44, r: lrMax > 0 ? 48 : 8, t: 14, b: 16 };
    const pw = Math.max(10, w - pad.l - pad.r);
    const ph = Math.max(10, h - pad.t - pad.b);
    const f = logScale ? Math.log10 : (v) => v;
    let yLo = f(lo);
    let yHi = f(hi);
    const span = yHi - yLo || Math.abs(yHi) * 0.1 || 1;
    yLo -= span * 0.05;
    yHi += span * 0.05;
    const xMin = st.steps[0];
    const xMax = st.steps[st.steps.length - 1] > xMin ? st.steps[st.steps.length - 1] : xMin + 1;
    const X = (s) => pad.l + ((s - xMin) / (xMax - xMin)) * pw;
    const Y = (v) => pad.t + (1 - (f(v) - yLo) / (yHi - yLo)) * ph;
    const Ylr = (v) => pad.t + (1 - v / (lrMax * 1.05)) * ph;

    // Grid and axes.
    ctx.strokeStyle = "rgba(128,128,128,0.25)";
    ctx.lineWidth = 1;
    ctx.textAlign = "right";
    ctx.textBaseline = "middle";
    const yTicks = logScale ? logTicks(yLo, yHi) : niceTicks(yLo, yHi, 4);
    for (const t of yTicks) {
      const y = Y(t);
      if (y < pad.t - 1 || y > pad.t + ph + 1) continue;
      ctx.beginPath();
      ctx.moveTo(pad.l, y);
      ctx.lineTo(pad.l + pw, y);
      ctx.stroke();
      ctx.fillText(formatNumber(t), pad.l - 4, y);
    }
    ctx.textAlign = "center";
    ctx.textBaseline = "top";
    for (const t of niceTicks(xMin, xMax, Math.max(2, Math.floor(pw / 70)))) {
      if (t !== Math.round(t)) continue;
      ctx.fillText(String(t), X(t), pad.t + ph + 3);
    }
    if (lrMax > 0) {
      ctx.textAlign = "left";
      ctx.textBaseline = "middle";
      ctx.fillStyle = "#f0a030";
      for (const t of niceTicks(0, lrMax * 1.05, 3)) ctx.fillText(t === 0 ? "0" : t.toExponential(1), pad.l + pw + 4, Ylr(t));
      ctx.fillStyle = fg;
    }
    ctx.save();
    ctx.beginPath();
    ctx.rect(pad.l, pad.t, pw, ph);
    ctx.clip();
    this.line(ctx, st.steps, raw, X, Y, ok, "rgba(120,160,255,0.45)", 1, pw);
    this.line(ctx, st.steps, ema, X, Y, ok, "#4f8cff", 2, pw);
    if (lrMax > 0) {
      ctx.setLineDash([4, 3]);
      this.line(ctx, st.steps, st.lrs, X, Ylr, Number.isFinite, "#f0a030", 1.25, pw);
      ctx.setLineDash([]);
    }
    ctx.restore();

    // Legend.
    ctx.textAlign = "left";
    ctx.textBaseline = "alphabetic";
    let x = pad.l + 4;
    for (const [label, color] of [["loss", "rgba(120,160,255,0.7)"], ["smoothed", "#4f8cff"], ...(lrMax > 0 ? [["lr", "#f0a030"]] : [])]) {
      ctx.fillStyle = color;
      ctx.fillRect(x, 5, 10, 3);
      ctx.fillStyle = fg;
      ctx.fillText(label, x + 13, 10);
      x += 20 + ctx.measureText(label).width;
    }
  }

  /** One polyline; with more points than pixels, each pixel column draws its min..max range. */
  line(ctx, xs, ys, X, Y, ok, color, width, pw) {
    ctx.strokeStyle = color;
    ctx.lineWidth = width;
    ctx.beginPath();
    const dense = xs.length > pw * 2;
    let drawing = false;
    let col = null;
    let colMin = 0;
    let colMax = 0;
    const flush = () => {
      if (col === null) return;
      if (drawing) ctx.lineTo(col, colMin);
      else ctx.moveTo(col, colMin);
      ctx.lineTo(col, colMax);
      drawing = true;
    };
    for (let i = 0; i < xs.length; i++) {
      if (!ok(ys[i])) {
        flush();
        col = null;
        drawing = false; // a gap for NaN loss
        continue;
      }
      const px = X(xs[i]);
      const py = Y(ys[i]);
      if (!dense) {
        if (drawing) ctx.lineTo(px, py);
        else ctx.moveTo(px, py);
        drawing = true;
        continue;
      }
      const c = Math.round(px);
      if (c !== col) {
        flush();
        col = c;
        colMin = py;
        colMax = py;
      } else {
        colMin = Math.min(colMin, py);
        colMax = Math.max(colMax, py);
      }
    }
    if (dense) flush();
    ctx.stroke();
  }
}

function isTrainNode(node) {
  return node?.comfyClass === NODE_ID || node?.type === NODE_ID;
}

function onTrainEvent(e) {
  const event = e.detail;
  if (!event || !isRunName(event.run)) return;
  const { same, switchTo } = pickViews([...panels], event.run, executingId);
  for (const panel of same) panel.onLiveEvent(event);
  for (const panel of switchTo) {
    panel.showRun(event.run, { force: true }); // reads the history (earlier attempts too), buffering live events
    panel.onLiveEvent(event);
  }
}

function onExecuting(e) {
  const detail = e.detail;
  executingId = detail == null ? null : typeof detail === "object" ? detail.node ?? null : detail;
  const key = executingId == null ? null : String(executingId).split(":").pop();
  for (const panel of panels) panel.setExecuting(key !== null && String(panel.nodeId) === key);
}

function panelForNodeId(nodeId) {
  const key = nodeId == null ? null : String(nodeId).split(":").pop();
  return [...panels].find((p) => String(p.nodeId) === key);
}

app.registerExtension({
  name: "flux2lora.TrainLoraChart",

  setup() {
    api.addEventListener(EVENT, onTrainEvent);
    api.addEventListener("executing", onExecuting);
    // Failures before the trainer starts (bad inputs) send no training event: show them here too.
    api.addEventListener("execution_error", (e) => panelForNodeId(e.detail?.node_id)?.fail(e.detail?.exception_message));
    api.addEventListener("execution_interrupted", (e) => {
      const panel = panelForNodeId(e.detail?.node_id);
      if (panel?.state.spinning) panel.onLiveEvent({ event: "cancelled", run: panel.run });
    });
    // Events sent while the socket was down are lost: read the history again.
    api.addEventListener("reconnected", () => {
      for (const panel of panels) if (panel.run) panel.showRun(panel.run, { force: true });
    });
  },

  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData?.name !== NODE_ID) return;

    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      if (typeof this.addDOMWidget !== "function") {
        console.warn("[flux2lora] this ComfyUI front end has no addDOMWidget; the training chart is off.");
        return result;
      }
      this.flux2loraPanel = new RunPanel(this);
      const size = this.computeSize();
      this.setSize([Math.max(this.size[0], 460), Math.max(this.size[1], size[1])]);
      // A loaded or pasted node gets its properties right after creation: look for its run then.
      setTimeout(() => this.flux2loraPanel?.restore(), 0);
      return result;
    };

    const onConfigure = nodeType.prototype.onConfigure;
    nodeType.prototype.onConfigure = function () {
      const result = onConfigure?.apply(this, arguments);
      this.flux2loraPanel?.restore();
      return result;
    };

    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      const result = onExecuted?.apply(this, arguments);
      const text = Array.isArray(message?.text) ? message.text.join("\n") : "";
      if (text) this.flux2loraPanel?.setInfo(text);
      return result;
    };

    const onRemoved = nodeType.prototype.onRemoved;
    nodeType.prototype.onRemoved = function () {
      this.flux2loraPanel?.dispose();
      this.flux2loraPanel = null;
      return onRemoved?.apply(this, arguments);
    };
  },

  loadedGraphNode(node) {
    if (isTrainNode(node)) node.flux2loraPanel?.restore();
  },
});
