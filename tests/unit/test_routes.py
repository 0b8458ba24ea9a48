"""The /flux2lora/runs routes: run list, event history (whole and from an offset), and run images.

Hostile requests go over a raw socket so that the exact bytes reach the server, undecoded and
unnormalised by a client library; nothing outside the run folder may ever come back.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import sys
import types
from pathlib import Path

import pytest

aiohttp = pytest.importorskip("aiohttp", reason="aiohttp ships with ComfyUI; pip install -r requirements-test.txt")
from aiohttp import web  # noqa: E402
from aiohttp.test_utils import TestServer  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n" + b"run-image-bytes"
SECRET = b"SECRET-OUTSIDE-THE-RUN"


@pytest.fixture
def routes(pack):
    return importlib.import_module(f"{pack.__name__}.nodes.routes")


def _write_events(path: Path, events: list[dict], *, tail: bytes = b"") -> None:
    path.write_bytes(b"".join(json.dumps(e).encode() + b"\n" for e in events) + tail)


def _step(step: int, total: int = 10) -> dict:
    return {"event": "step", "time": 100.0 + step, "step": step, "loss": 1.0 / step, "lr": 1e-4,
            "seconds_per_step": 0.5, "samples_per_second": 2.0, "eta_seconds": 0.5 * (total - step),
            "max_train_steps": total}


@pytest.fixture
def runs_root(tmp_path: Path) -> Path:
    """A runs root with one run of every status, hostile neighbours, and secrets outside it."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.png").write_bytes(SECRET)
    (outside / "events.jsonl").write_bytes(json.dumps({"event": "start", "note": SECRET.decode()}).encode() + b"\n")

    root = tmp_path / "output" / "flux2_lora" / "runs"
    root.mkdir(parents=True)
    done = root / "style-0123456789"
    (done / "validation").mkdir(parents=True)
    (done / "validation" / "step_000010_0.png").write_bytes(PNG)
    (done / "validation" / "step_000010_1.jpg").write_bytes(b"\xff\xd8jpeg")
    (done / "validation" / "step_000010_2.webp").write_bytes(b"RIFFwebp")
    (done / "notes.txt").write_text("not an image")
    (done / "folder.png").mkdir()
    (done / "link_out.png").symlink_to(outside / "secret.png")
    (done / "link_in.png").symlink_to(done / "validation" / "step_000010_0.png")
    _write_events(done / "events.jsonl", [
        {"event": "start", "time": 100.0, "max_train_steps": 10},
        *[_step(s) for s in range(1, 11)],
        {"event": "validation", "time": 111.0, "step": 10,
         "images": [{"prompt": "a cat", "path": "validation/step_000010_0.png"}]},
        {"event": "end", "time": 112.0, "step": 10, "lora_path": "style.safetensors"},
    ])
    failed = root / "broken-aaaaaaaaaa"
    failed.mkdir()
    _write_events(failed / "events.jsonl", [{"event": "start", "time": 1.0}, _step(1, 5),
                                            {"event": "error", "time": 2.0, "message": "CUDA out of memory"}])
    live = root / "live-bbbbbbbbbb"
    live.mkdir()
    _write_events(live / "events.jsonl", [{"event": "start", "time": 1.0}, _step(1, 8), _step(2, 8)],
                  tail=b'{"event": "step", "st')  # the trainer is mid-write
    exported = root / "exported-cccccccccc"
    exported.mkdir()
    (exported / "run.json").write_text("{}")
    (root / ".hidden").mkdir()
    (root / "stray-file.txt").write_text("x")
    (root / "evil").symlink_to(outside)
    for i, folder in enumerate([exported, failed, done, live]):
        os.utime(folder / "events.jsonl" if (folder / "events.jsonl").exists() else folder / "run.json",
                 (1000.0 + i, 1000.0 + i))
    return root


def _app(routes, runs_root_fn):
    """An app factory: an aiohttp Application is bound to the event loop it first runs in."""
    table = web.RouteTableDef()
    assert routes.register_routes(table, runs_root_fn=runs_root_fn) is True
    return lambda: _app_from(table)


def _app_from(table: web.RouteTableDef) -> web.Application:
    app = web.Application()
    app.add_routes(table)
    return app


def _raw_get_all(make_app, targets: list[str]) -> list[tuple[int, dict[str, str], bytes]]:
    """GET each request target verbatim (HTTP/1.1, one connection each); returns status, headers, body."""

    async def one(port: int, target: str):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode("latin-1"))
        await writer.drain()
        data = await reader.read()
        writer.close()
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        if headers.get("transfer-encoding") == "chunked":
            body = _unchunk(body)
        return int(lines[0].split(" ")[1]), headers, body

    async def run():
        async with TestServer(make_app()) as server:
            return [await one(server.port, t) for t in targets]

    return asyncio.run(run())


def _unchunk(body: bytes) -> bytes:
    out, rest = b"", body
    while rest:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        out, rest = out + rest[:size], rest[size + 2:]
    return out


def _get_json(make_app, target: str):
    (status, headers, body), = _raw_get_all(make_app, [target])
    assert headers["content-type"].startswith("application/json"), (target, headers)
    return status, json.loads(body)


# --- plain functions --------------------------------------------------------------------------


def test_list_runs_reports_each_status_and_skips_everything_else(routes, runs_root):
    runs = routes.list_runs(runs_root)
    assert [r["run"] for r in runs] == ["live-bbbbbbbbbb", "style-0123456789", "broken-aaaaaaaaaa",
                                        "exported-cccccccccc"]
    by_name = {r["run"]: (r["status"], r["step"], r["max_train_steps"]) for r in runs}
    assert by_name == {
        "style-0123456789": ("finished", 10, 10),
        "broken-aaaaaaaaaa": ("failed", 1, 5),
        "live-bbbbbbbbbb": ("incomplete", 2, 8),
        "exported-cccccccccc": ("new", None, None),
    }
    assert [r.get("message") for r in runs if r["status"] == "failed"] == ["CUDA out of memory"]
    assert routes.list_runs(runs_root / "missing") == []


def test_status_reads_the_node_side_cancel_and_failure_events(routes, runs_root):
    live = runs_root / "live-bbbbbbbbbb"
    (live / "events.jsonl").write_text(json.dumps(_step(1)) + "\n" + json.dumps({"event": "cancelled"}) + "\n")
    assert routes.run_summary(live)["status"] == "cancelled"
    with open(live / "events.jsonl", "a") as fh:  # resumed, then the node reported a crash
        fh.write(json.dumps(_step(2)) + "\n" + json.dumps({"event": "failed", "message": "exit code 1"}) + "\n")
    summary = routes.run_summary(live)
    assert (summary["status"], summary["step"], summary["message"]) == ("failed", 2, "exit code 1")


def test_events_whole_file_leaves_a_half_written_line(routes, runs_root):
    events = routes.run_events(runs_root, run="live-bbbbbbbbbb")
    assert [(e["event"], e.get("step")) for e in events] == [("start", None), ("step", 1), ("step", 2)]
    assert routes.run_events(runs_root, run="exported-cccccccccc") == []


def test_events_since_follows_appends_in_chunks(routes, runs_root):
    path = runs_root / "live-bbbbbbbbbb" / "events.jsonl"
    first = routes.run_events_since(runs_root, run="live-bbbbbbbbbb", since=0)
    assert [e.get("step") for e in first["events"]] == [None, 1, 2]
    assert first["offset"] == path.read_bytes().rfind(b"\n") + 1
    assert first["complete"] is False  # the half line is still there
    assert routes.run_events_since(runs_root, run="live-bbbbbbbbbb", since=first["offset"])["events"] == []
    with open(path, "ab") as fh:  # the trainer finishes the line and writes one more
        fh.write(b'ep": 3, "loss": 0.25}\n' + json.dumps(_step(4, 8)).encode() + b"\n")
    second = routes.run_events_since(runs_root, run="live-bbbbbbbbbb", since=first["offset"])
    assert [(e["event"], e["step"]) for e in second["events"]] == [("step", 3), ("step", 4)]
    assert (second["offset"], second["complete"]) == (path.stat().st_size, True)

    # A small chunk limit pages through the same events in order, never splitting a line.
    offset, paged = 0, []
    while True:
        page = routes.run_events_since(runs_root, run="style-0123456789", since=offset, max_bytes=64)
        paged += page["events"]
        assert page["offset"] > offset or page["complete"]
        offset = page["offset"]
        if page["complete"]:
            break
    assert paged == routes.run_events(runs_root, run="style-0123456789")
    assert len(paged) == 13


def test_unreadable_line_is_reported_not_raised(routes, runs_root):
    path = runs_root / "broken-aaaaaaaaaa" / "events.jsonl"
    with open(path, "ab") as fh:
        fh.write(b"{not json\n[1, 2]\n")
    events = routes.run_events(runs_root, run="broken-aaaaaaaaaa")
    assert [e["event"] for e in events[-2:]] == ["unreadable", "unreadable"]
    assert events[-2]["line"] == "{not json"


@pytest.mark.parametrize("since, message", [
    (10_000_000, "past the end"),
    (5, "not at the start of a line"),
])
def test_events_since_refuses_bad_offsets(routes, runs_root, since, message):
    with pytest.raises(routes.RouteError, match=message) as info:
        routes.run_events_since(runs_root, run="style-0123456789", since=since)
    assert info.value.status == 400


def test_run_image_resolves_only_images_inside_the_run(routes, runs_root):
    folder = (runs_root / "style-0123456789").resolve()
    assert routes.run_image(runs_root, run="style-0123456789", rel_path="validation/step_000010_0.png") == \
        folder / "validation" / "step_000010_0.png"
    # A symlink that stays inside the run is fine; it resolves to its target.
    assert routes.run_image(runs_root, run="style-0123456789", rel_path="link_in.png") == \
        folder / "validation" / "step_000010_0.png"
    with pytest.raises(routes.RouteError) as info:
        routes.run_image(runs_root, run="style-0123456789", rel_path="link_out.png")
    assert info.value.status == 404


# --- over HTTP --------------------------------------------------------------------------------


def test_http_runs_and_events(routes, runs_root):
    app = _app(routes, lambda: runs_root)
    status, body = _get_json(app, "/flux2lora/runs")
    assert status == 200
    assert {r["run"] for r in body["runs"]} == {"style-0123456789", "broken-aaaaaaaaaa", "live-bbbbbbbbbb",
                                                "exported-cccccccccc"}
    status, events = _get_json(app, "/flux2lora/runs/style-0123456789/events")
    assert status == 200 and events == routes.run_events(runs_root, run="style-0123456789")
    status, page = _get_json(app, "/flux2lora/runs/live-bbbbbbbbbb/events?since=0")
    assert status == 200 and set(page) == {"events", "offset", "complete"} and len(page["events"]) == 3


def test_http_image_types(routes, runs_root):
    app = _app(routes, lambda: runs_root)
    results = _raw_get_all(app, [
        "/flux2lora/runs/style-0123456789/image?path=validation/step_000010_0.png",
        "/flux2lora/runs/style-0123456789/image?path=validation%2Fstep_000010_1.jpg",
        "/flux2lora/runs/style-0123456789/image?path=validation/step_000010_2.webp",
    ])
    assert [(s, h["content-type"], b) for s, h, b in results] == [
        (200, "image/png", PNG),
        (200, "image/jpeg", b"\xff\xd8jpeg"),
        (200, "image/webp", b"RIFFwebp"),
    ]
    assert all(h["x-content-type-options"] == "nosniff" for _, h, _ in results)


HOSTILE = [
    # (request target, status) — ours answer with {"error": ...}; the router's own 404s are plain text.
    ("/flux2lora/runs/style-0123456789/image?path=../../outside/secret.png", 400),
    ("/flux2lora/runs/style-0123456789/image?path=%2e%2e%2f%2e%2e%2foutside%2fsecret.png", 400),
    ("/flux2lora/runs/style-0123456789/image?path=%252e%252e%252fsecret.png", 400),
    ("/flux2lora/runs/style-0123456789/image?path=validation/../../../outside/secret.png", 400),
    ("/flux2lora/runs/style-0123456789/image?path=/etc/passwd.png", 400),
    ("/flux2lora/runs/style-0123456789/image?path=%2fetc%2fpasswd.png", 400),
    ("/flux2lora/runs/style-0123456789/image?path=..%5c..%5coutside%5csecret.png", 400),
    ("/flux2lora/runs/style-0123456789/image?path=validation%5cstep_000010_0.png", 400),
    ("/flux2lora/runs/style-0123456789/image?path=step.png%00.txt", 400),
    ("/flux2lora/runs/style-0123456789/image?path=C:/outside/secret.png", 400),
    ("/flux2lora/runs/style-0123456789/image?path=./validation/step_000010_0.png", 400),
    ("/flux2lora/runs/style-0123456789/image?path=validation//step_000010_0.png", 400),
    ("/flux2lora/runs/style-0123456789/image?path=notes.txt", 400),
    ("/flux2lora/runs/style-0123456789/image?path=events.jsonl", 400),
    ("/flux2lora/runs/style-0123456789/image?path=", 400),
    ("/flux2lora/runs/style-0123456789/image", 400),
    ("/flux2lora/runs/style-0123456789/image?path=missing.png", 404),
    ("/flux2lora/runs/style-0123456789/image?path=folder.png", 404),
    ("/flux2lora/runs/style-0123456789/image?path=link_out.png", 404),
    ("/flux2lora/runs/evil/image?path=secret.png", 404),
    ("/flux2lora/runs/evil/events", 404),
    ("/flux2lora/runs/.hidden/events", 400),
    ("/flux2lora/runs/%2e%2e/events", 400),
    ("/flux2lora/runs/..%2foutside/events", 400),
    ("/flux2lora/runs/..%5coutside/events", 400),
    ("/flux2lora/runs/nope-0000000000/events", 404),
    ("/flux2lora/runs/" + "a" * 200 + "/events", 400),
    ("/flux2lora/runs/style-0123456789/events?since=-1", 400),
    ("/flux2lora/runs/style-0123456789/events?since=1e3", 400),
    ("/flux2lora/runs/style-0123456789/events?since=abc", 400),
    ("/flux2lora/runs/style-0123456789/events?since=", 400),
    ("/flux2lora/runs/style-0123456789/events?since=99999999999", 400),
]


def test_http_refuses_hostile_requests_without_leaking(routes, runs_root):
    app = _app(routes, lambda: runs_root)
    results = _raw_get_all(app, [target for target, _ in HOSTILE])
    for (target, expected), (status, _, body) in zip(HOSTILE, results, strict=True):
        assert status == expected, (target, status, body[:200])
        assert SECRET not in body, target
        assert b"Traceback" not in body, target
        assert set(json.loads(body)) == {"error"}, target


def test_http_router_normalised_traversal_never_reaches_outside(routes, runs_root):
    # Dot segments in the path itself are resolved (or refused) before routing: whatever the
    # answer, it is an error and carries nothing from outside the runs root.
    app = _app(routes, lambda: runs_root)
    targets = ["/flux2lora/runs/../../outside/events", "/flux2lora/runs/style-0123456789/../evil/events",
               "/flux2lora/runs/style-0123456789/image/../../evil/image?path=secret.png"]
    for target, (status, _, body) in zip(targets, _raw_get_all(app, targets), strict=True):
        assert 400 <= status < 500, (target, status)
        assert SECRET not in body, target


def test_http_unexpected_failure_is_a_json_500_without_traceback(routes):
    def broken_root() -> Path:
        raise RuntimeError("boom at /secret/place")

    app = _app(routes, broken_root)
    status, body = _get_json(app, "/flux2lora/runs")
    assert (status, body) == (500, {"error": "internal error; see the ComfyUI log."})


def test_register_routes_is_idempotent(routes, runs_root):
    table = web.RouteTableDef()
    assert routes.register_routes(table, runs_root_fn=lambda: runs_root) is True
    assert routes.register_routes(table, runs_root_fn=lambda: runs_root) is False
    assert sorted(r.path for r in table) == ["/flux2lora/runs", "/flux2lora/runs/{run}/events",
                                             "/flux2lora/runs/{run}/image"]


def test_prompt_server_hook(routes, comfy_root, monkeypatch):
    monkeypatch.setitem(sys.modules, "server", None)  # no ComfyUI: nothing to register on
    assert routes.register_with_prompt_server() is False

    table = web.RouteTableDef()
    fake_server = types.ModuleType("server")
    fake_server.PromptServer = types.SimpleNamespace(instance=types.SimpleNamespace(routes=table))
    monkeypatch.setitem(sys.modules, "server", fake_server)
    assert routes.register_with_prompt_server() is True
    assert routes.register_with_prompt_server() is False

    run = comfy_root / "output" / "flux2_lora" / "runs" / "mine-dddddddddd"
    run.mkdir(parents=True)
    _write_events(run / "events.jsonl", [{"event": "start", "time": 1.0}, _step(3)])
    status, body = _get_json(lambda: _app_from(table), "/flux2lora/runs")
    assert status == 200
    assert [(r["run"], r["status"], r["step"]) for r in body["runs"]] == [("mine-dddddddddd", "incomplete", 3)]
