"""The browser extension under web/js: static rules every file obeys, and its logic run under node.

Static: each file registers exactly one ComfyUI extension named "flux2lora.*" (unique), imports only
ComfyUI's own ../../scripts/ modules, and names no external URL or raw network API.
Under node (skipped with a reason when node is absent): the syntax check, then the chart's pure
logic, and the history loader talking to the real /flux2lora/runs route over HTTP.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
WEB_JS = REPO_ROOT / "web" / "js"
TRAIN_JS = WEB_JS / "flux2_lora_train.js"
NODE = shutil.which("node")
needs_node = pytest.mark.skipif(
    NODE is None, reason="node (Node.js) is not installed; the JS syntax and logic checks need it")

IMPORT_FROM = re.compile(r"""^\s*import\b[^;]*?\bfrom\s*["']([^"']+)["']""", re.M | re.S)
IMPORT_BARE = re.compile(r"""^\s*import\s*["']([^"']+)["']""", re.M)
REGISTER = re.compile(r"""\bapp\.registerExtension\s*\(\s*\{\s*name\s*:\s*["']([^"']+)["']""")


DOCS = WEB_JS / "docs"  # node help pages: ComfyUI serves WEB_DIRECTORY/docs/<NodeId>.md


def _js_files() -> list[Path]:
    return sorted(p for p in WEB_JS.rglob("*") if p.is_file() and DOCS not in p.parents)


def _strip_comments(source: str) -> str:
    source = re.sub(r"/\*.*?\*/", "", source, flags=re.S)
    return re.sub(r"(?m)^\s*//.*$", "", source)


def test_web_js_holds_only_extension_files_and_node_docs():
    files = _js_files()
    assert TRAIN_JS in files
    assert [p.name for p in files if p.suffix != ".js"] == []
    docs = sorted(DOCS.glob("*"))
    assert all(p.suffix == ".md" for p in docs), docs


def test_each_file_registers_exactly_one_uniquely_named_extension():
    names = []
    for path in _js_files():
        source = _strip_comments(path.read_text(encoding="utf-8"))
        assert len(re.findall(r"\bregisterExtension\s*\(", source)) == 1, path.name
        found = REGISTER.findall(source)
        assert len(found) == 1, f"{path.name}: registerExtension must start with a literal name"
        assert re.fullmatch(r"flux2lora\.[A-Za-z][A-Za-z0-9_.]*", found[0]), found[0]
        names.append(found[0])
    assert len(names) == len(set(names)), names
    assert "flux2lora.TrainLoraChart" in names


def test_imports_only_comfyui_scripts_and_no_external_network():
    for path in _js_files():
        source = path.read_text(encoding="utf-8")
        code = _strip_comments(source)
        specifiers = IMPORT_FROM.findall(code) + IMPORT_BARE.findall(code)
        assert specifiers, f"{path.name} imports nothing from ComfyUI"
        for spec in specifiers:
            assert re.fullmatch(r"\.\./\.\./scripts/[a-zA-Z]+\.js", spec), f"{path.name} imports {spec!r}"
        assert not re.search(r"\bimport\s*\(", code), f"{path.name} uses a dynamic import"
        assert not re.search(r"https?://", source, re.I), f"{path.name} names an http(s) URL"
        assert not re.search(r"""["'`]//[A-Za-z0-9]""", code), f"{path.name} has a protocol-relative URL"
        for api in (r"\bfetch\s*\(", r"XMLHttpRequest", r"\bWebSocket\b", r"\bEventSource\b", r"sendBeacon"):
            assert not re.search(api, code), f"{path.name} uses {api}; talk to ComfyUI through api.fetchApi"


def test_names_shared_with_the_python_side_agree(pack):
    source = TRAIN_JS.read_text(encoding="utf-8")
    bridge = importlib.import_module(f"{pack.__name__}.nodes.comfy_bridge")
    train_nodes = importlib.import_module(f"{pack.__name__}.nodes.train_nodes")
    routes = importlib.import_module(f"{pack.__name__}.nodes.routes")
    assert f'const EVENT = "{bridge.PACK_EVENT}";' in source
    assert 'const NODE_ID = "Flux2LoraTrain";' in source and "Flux2LoraTrain" in train_nodes.NODE_CLASS_MAPPINGS
    assert source.count(f"`{routes.ROUTE_PREFIX}/${{encodeURIComponent(run)}}/") == 2  # events and image routes


def test_panel_css_and_its_height_share_one_geometry():
    """The node's height (minHeight) is computed from the same constants the CSS uses, and no row the height counts
    whole is capped by the CSS (a 64 px cap on the run info once hid its last lines: issue 15)."""
    source = TRAIN_JS.read_text(encoding="utf-8")
    style = source[source.index("const STYLE = `"):]
    style = re.sub(r"\$\{([^}]*)\}", r"<\1>", style[:style.index("`;")])  # ${NAME} -> <NAME>
    rules = dict(re.findall(r"^(\.[\w-]+(?:, \.[\w-]+)*) \{([^}]*)\}", style, re.M))
    panel = rules[".flux2lora-panel"]
    assert "gap: <PANEL_GAP>px" in panel and "padding: <PANEL_PAD_Y>px" in panel
    assert "min-height: <CHART_MIN_HEIGHT>px" in rules[".flux2lora-chart"]
    assert "max-height" not in rules[".flux2lora-error, .flux2lora-info"]
    assert "/<TEXT_LINE>px" in rules[".flux2lora-error, .flux2lora-info"]
    assert "max-height: <ERROR_MAX_LINES * TEXT_LINE>px" in rules[".flux2lora-error"]
    # No row truncates its text with an ellipsis: a line that does not fit wraps, and the node grows.
    for row in (".flux2lora-status", ".flux2lora-progress"):
        assert "nowrap" not in rules[row] and "ellipsis" not in rules[row], row
    assert re.search(r"minHeight\(\) \{[^}]*stackHeight\(rows\)", source), "minHeight must sum the rows"


@needs_node
def test_node_syntax_check(tmp_path: Path):
    for path in _js_files():
        # Copy to .mjs: parsed as an ES module whatever this node's module detection does.
        copy = tmp_path / (path.stem + ".mjs")
        copy.write_bytes(path.read_bytes())
        result = subprocess.run([NODE, "--check", str(copy)], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, f"{path.name}: {result.stderr}"


# --- the chart's logic and the history loader, under node -------------------------------------

STUB_APP = "export const app = { extensions: [], registerExtension(ext) { this.extensions.push(ext); } };\n"
STUB_API = """export const api = {
  base: "",
  apiURL(route) { return this.base + "/api" + route; },
  fetchApi(route, options) { return fetch(this.apiURL(route), options); },
  addEventListener() {},
};
"""

HARNESS = r"""
import { app } from "./scripts/app.js";
import { api } from "./scripts/api.js";
const ext = await import("./extensions/flux2lora/flux2_lora_train.js");
const input = JSON.parse(process.argv[2]);
api.base = input.base;
const out = {};
out.extensions = app.extensions.map((e) => [e.name, typeof e.setup, typeof e.beforeRegisterNodeDef]);
out.ema = ext.emaSeries([2, NaN, 4], 0.5);
out.emaFlat = ext.emaSeries([1, 1, 1]);
out.ticks = [ext.niceTicks(0, 1, 5), ext.niceTicks(0.13, 0.87, 4), ext.niceTicks(3, 3, 4)];
out.logTicks = [ext.logTicks(-3, 0), ext.logTicks(Math.log10(0.15), Math.log10(0.9))];
out.durations = [3725, 65, 9, -1].map(ext.formatDuration);
out.runs = input.names.map(ext.isRunName);
out.infoRuns = input.infos.map(ext.runFromInfo);
out.stack = [ext.stackHeight([19, 13, 120, 80, null, 48]), ext.stackHeight([]), ext.stackHeight([10, null], { gap: 5, padding: 0 }),
  ext.stackHeight([10, 20], { gap: 5, padding: 0 })];
out.textLines = ["", "one line", "a\nb\nc", "ends with newline\n"].map(ext.textLines);

// Replay: a cancelled first attempt, then a resume from the step-2 checkpoint that finishes.
const st = new ext.RunState("style-0123456789");
for (const e of input.replay) st.apply(e);
st.finishReplay();
out.replay = { steps: st.steps, losses: st.losses.map(String), lrs: st.lrs, status: st.status, total: st.total,
  validation: [...st.validation].map(([p, v]) => [p, v.path, v.step]), progress: st.progressText(),
  statusText: st.statusText(), spinning: st.spinning, smoothedLast: st.smoothed().at(-1) };
const partial = new ext.RunState("live-1");
for (const e of input.replay.slice(0, 3)) partial.apply(e);
partial.finishReplay();
const empty = new ext.RunState("empty-1");
empty.finishReplay();
const failed = new ext.RunState("bad-1");
failed.apply({ event: "start" });
failed.apply({ event: "failed", message: "training failed: CUDA out of memory\nrun folder: /x" });
out.states = [[partial.status, partial.spinning], [empty.status, empty.spinning], [failed.status, failed.spinning, failed.statusText()]];

const views = [{ run: "a-1", nodeId: 1 }, { run: null, nodeId: 2 }];
const pick = (vs, run, ex) => { const r = ext.pickViews(vs, run, ex); return [r.same.map((v) => v.nodeId), r.switchTo.map((v) => v.nodeId)]; };
out.pick = [pick(views, "a-1", null), pick(views, "b-1", "2"), pick(views, "b-1", "7:2"), pick(views, "a-1", 2),
  pick(views, "c-1", null), pick([views[1]], "c-1", null)];

// History from the real route: paged (the server's chunk is small), then the image the strip would show.
const history = await ext.fetchRunEvents((route) => api.fetchApi(route), input.run);
out.historyCount = history.length;
out.historyMatches = JSON.stringify(history) === JSON.stringify(input.expected);
const img = await fetch(api.apiURL(ext.imageRoute(input.run, input.imagePath)));
out.image = [img.status, img.headers.get("content-type"), Buffer.from(await img.arrayBuffer()).toString("latin1")];
try {
  await ext.fetchRunEvents((route) => api.fetchApi(route), "missing-0000000000");
  out.missing = "no error";
} catch (err) {
  out.missing = err.message;
}
console.log(JSON.stringify(out));
"""


def _step(step: int, loss, *, total: int = 6) -> dict:
    return {"event": "step", "time": float(step), "step": step, "loss": loss, "lr": 1e-4 * step / total,
            "seconds_per_step": 1.5, "samples_per_second": 0.5, "eta_seconds": 1.5 * (total - step),
            "max_train_steps": total}


REPLAY = [
    {"event": "start", "time": 0.0, "max_train_steps": 6},
    _step(1, 1.0), _step(2, 0.8),
    {"event": "checkpoint", "time": 2.5, "step": 2, "path": "checkpoint-2"},
    {"event": "validation", "time": 2.6, "step": 2, "images": [
        {"prompt": "a cat", "path": "validation/step_2_0.png"}, {"prompt": "a dog", "path": "validation/step_2_1.png"}]},
    _step(3, 0.7), _step(4, "nan"),
    {"event": "cancelled"},
    {"event": "start", "time": 10.0, "max_train_steps": 6},
    _step(3, 0.6), _step(4, 0.5), _step(5, 0.4), _step(6, 0.3),
    {"event": "validation", "time": 16.0, "step": 6, "images": [{"prompt": "a cat", "path": "validation/step_6_0.png"}]},
    {"event": "end", "time": 17.0, "step": 6, "lora_path": "style.safetensors"},
    {"event": "unreadable", "line": "{oops"},
]


@needs_node
def test_chart_logic_and_history_loader_against_the_route(tmp_path: Path, pack, monkeypatch):
    from aiohttp import web
    from aiohttp.test_utils import TestServer

    routes = importlib.import_module(f"{pack.__name__}.nodes.routes")
    site = tmp_path / "site"
    (site / "scripts").mkdir(parents=True)
    (site / "extensions" / "flux2lora").mkdir(parents=True)
    (site / "package.json").write_text('{"type": "module"}')
    (site / "scripts" / "app.js").write_text(STUB_APP)
    (site / "scripts" / "api.js").write_text(STUB_API)
    shutil.copy(TRAIN_JS, site / "extensions" / "flux2lora" / TRAIN_JS.name)
    (site / "harness.js").write_text(HARNESS)

    runs_root = tmp_path / "runs"
    run = runs_root / "style-0123456789"
    (run / "validation").mkdir(parents=True)
    image_path = "validation/a cat #1+2.png"
    (run / image_path).write_bytes(b"\x89PNG-cat")
    events = REPLAY * 5  # enough bytes for several pages with the small chunk below
    (run / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    monkeypatch.setattr(routes, "EVENTS_CHUNK_BYTES", 1024)
    table = web.RouteTableDef()
    routes.register_routes(table, runs_root_fn=lambda: runs_root)
    # ComfyUI serves every route under /api as well; the stub api adds that prefix like the real one.
    api_table = web.RouteTableDef()
    for r in table:
        api_table.get("/api" + r.path)(r.handler)

    infos = ["run folder: /srv/ComfyUI/output/flux2_lora/runs/style-0123456789\nLoRA: /x.safetensors",
             "run folder: C:\\ComfyUI\\output\\flux2_lora\\runs\\win-0123456789\\\nsteps: 3",
             "run folder: /srv/runs/..", "run.json: /srv/runs/x/run.json"]
    names = ["style-0123456789", "-lead-dash", "a..b", ".hidden", "..", "a/b", "", "x" * 128, "x" * 129]
    argument = {"base": "", "names": names, "infos": infos, "replay": REPLAY, "run": run.name,
                "imagePath": image_path, "expected": events}

    async def go() -> subprocess.CompletedProcess:
        app = web.Application()
        app.add_routes(api_table)
        async with TestServer(app) as server:
            argument["base"] = str(server.make_url("")).rstrip("/")
            proc = await asyncio.create_subprocess_exec(
                NODE, str(site / "harness.js"), json.dumps(argument), cwd=str(site),
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
            return subprocess.CompletedProcess([], proc.returncode, out.decode(), err.decode())

    result = asyncio.run(go())
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)

    assert out["extensions"] == [["flux2lora.TrainLoraChart", "function", "function"]]
    assert out["ema"][0] == 2.0 and out["ema"][1] is None  # NaN is a gap (JSON null)
    assert math.isclose(out["ema"][2], 2.5 / 0.75, rel_tol=1e-12)
    assert out["emaFlat"] == [1.0, 1.0, 1.0]
    assert out["ticks"] == [[0, 0.2, 0.4, 0.6, 0.8, 1], [0.2, 0.4, 0.6, 0.8], [3]]
    assert out["logTicks"] == [[0.001, 0.01, 0.1, 1], [0.2, 0.5]]
    assert out["durations"] == ["1h 02m", "1m 05s", "9s", "?"]
    python_rule = [bool(routes.RUN_NAME.fullmatch(n)) and len(n) <= routes.MAX_RUN_NAME for n in names]
    assert out["runs"] == python_rule == [True, True, True, False, False, False, False, True, False]
    assert out["infoRuns"] == ["style-0123456789", "win-0123456789", None, None]
    # The panel's height: 2 + 2 px padding, the rows shown, 3 px between each two of them (hidden rows take none).
    assert out["stack"] == [4 + (19 + 13 + 120 + 80 + 48) + 4 * 3, 4, 10, 35]
    assert out["textLines"] == [0, 1, 3, 2]

    replay = out["replay"]
    assert replay["steps"] == [1, 2, 3, 4, 5, 6]
    assert replay["losses"] == ["1", "0.8", "0.6", "0.5", "0.4", "0.3"]  # the resume replaced steps 3-4
    assert replay["status"] == "finished" and replay["spinning"] is False and replay["total"] == 6
    assert replay["validation"] == [["a cat", "validation/step_6_0.png", 6], ["a dog", "validation/step_2_1.png", 2]]
    assert replay["statusText"] == "finished style-0123456789"
    assert replay["progress"].startswith("step 6/6 · 1.5 s/it · 0.5 img/s · loss 0.3 (smoothed ")
    assert "ETA" not in replay["progress"]
    assert out["states"] == [["incomplete", False], ["new", False],
                             ["failed", False, "failed: training failed: CUDA out of memory"]]

    # Node 2 executing takes over run a-1 too (same inputs as node 1); node 1 keeps showing it.
    assert out["pick"] == [[[1], []], [[], [2]], [[], [2]], [[1], [2]], [[], []], [[], [2]]]

    assert out["historyCount"] == len(events) and out["historyMatches"] is True
    assert out["image"] == [200, "image/png", "\x89PNG-cat"]
    assert out["missing"] == "run 'missing-0000000000' does not exist."


PREFLIGHT_HARNESS = r"""
const ext = await import("./extensions/flux2lora/flux2_lora_train.js");
const preflight = { event: "preflight", time: 0.5, short: "estimate: ~2.2 s/step, ~37 min total; 61.0 GB GPU",
  summary: "estimated peak 61.0 GB per GPU\nestimated time: ~2.2 s/step" };
const st = new ext.RunState("est-0123456789");
st.apply(preflight);
const before = [st.progressText(), st.estimateDetail, st.eventCount];
st.finishReplay();
const onlyPreflight = st.status;  // nothing trained yet
st.apply({ event: "start", max_train_steps: 1000 });
st.apply({ event: "step", step: 1, loss: 0.5, lr: 1e-4, seconds_per_step: 2.0, max_train_steps: 1000 });
console.log(JSON.stringify({ before, onlyPreflight, after: st.progressText() }));
"""


@needs_node
def test_preflight_estimate_shows_until_the_first_step(tmp_path: Path):
    site = tmp_path / "site"
    (site / "scripts").mkdir(parents=True)
    (site / "extensions" / "flux2lora").mkdir(parents=True)
    (site / "package.json").write_text('{"type": "module"}')
    (site / "scripts" / "app.js").write_text(STUB_APP)
    (site / "scripts" / "api.js").write_text(STUB_API)
    shutil.copy(TRAIN_JS, site / "extensions" / "flux2lora" / TRAIN_JS.name)
    (site / "harness.js").write_text(PREFLIGHT_HARNESS)
    result = subprocess.run([NODE, str(site / "harness.js")], cwd=str(site), capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["before"] == ["estimate: ~2.2 s/step, ~37 min total; 61.0 GB GPU",
                             "estimated peak 61.0 GB per GPU\nestimated time: ~2.2 s/step", 0]
    assert out["onlyPreflight"] == "new"
    assert out["after"].startswith("step 1/1000 · 2 s/it") and "estimate" not in out["after"]
