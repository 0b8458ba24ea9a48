"""Run a real ComfyUI with this pack in custom_nodes and talk to it over HTTP and the websocket.

Modelled on ComfyUI's own tests/execution/test_execution.py (ComfyClient, GraphBuilder, run until
`executing` with node None for our prompt_id, raise on execution_error, read /history), with two
changes: the server is waited for by polling an endpoint until a deadline (no fixed sleeps), and
everything ComfyUI writes (models, custom_nodes, input, output, temp, user, its sqlite database)
lives in a temporary base directory.

Configuration (environment):
  COMFYUI_DIR  a ComfyUI checkout (the folder holding main.py); the e2e tests skip without it.
  COMFYUI_PY   the python of ComfyUI's environment; default: the interpreter running the tests.
  COMFYUI_START_TIMEOUT  seconds to wait for the server to answer (default 300).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import websocket  # websocket-client

REPO_ROOT = Path(__file__).resolve().parents[2]
PACK_DIR_NAME = "flux2_lora"
"""Name of the symlink in custom_nodes: deliberately not the repo folder's name, as a user's clone may differ."""
PACK_NODE_PREFIX = "Flux2Lora"
PACK_PYTHON_MODULE = f"custom_nodes.{PACK_DIR_NAME}"
"""What /object_info reports as python_module for the pack's nodes."""

DEFAULT_START_TIMEOUT_S = 300.0
LOG_TAIL_CHARS = 6000
# Flags this harness relies on; an older ComfyUI without them is refused with a clear message.
REQUIRED_FLAGS = ("--base-directory", "--disable-auto-launch", "--cpu", "--listen", "--port")


class ComfyUINotConfigured(Exception):
    """COMFYUI_DIR is unset or does not point at a ComfyUI checkout (the tests skip with this message)."""


class ComfyStartError(RuntimeError):
    """The server exited or did not answer before the deadline; the message ends with its log tail."""


class PromptRejected(RuntimeError):
    """POST /prompt answered with an HTTP error (validation failed); body holds ComfyUI's JSON answer."""

    def __init__(self, status: int, body: Any):
        self.status = status
        self.body = body
        super().__init__(f"POST /prompt answered HTTP {status}: {json.dumps(body, indent=1)[:LOG_TAIL_CHARS]}")


class ExecutionFailed(RuntimeError):
    """ComfyUI sent execution_error (or execution_interrupted) for our prompt; data is the message's data."""

    def __init__(self, kind: str, data: dict[str, Any], log_tail: str = ""):
        self.kind = kind
        self.data = data
        detail = (
            f"{kind} in node {data.get('node_id')} ({data.get('node_type')}): "
            f"{data.get('exception_type', '')}: {data.get('exception_message', '')}\n"
            f"{''.join(data.get('traceback') or [])}"
        )
        if log_tail:
            detail += f"\n--- ComfyUI log tail ---\n{log_tail}"
        super().__init__(detail)


@dataclass(frozen=True, slots=True)
class ComfyInstall:
    root: Path
    """The ComfyUI checkout (holds main.py)."""
    python: Path
    """Interpreter of ComfyUI's environment; the pack runs inside it."""


def comfyui_install_from_env(environ: Mapping[str, str] = os.environ) -> ComfyInstall:
    """Read COMFYUI_DIR / COMFYUI_PY; raise ComfyUINotConfigured (a skip reason) when ComfyUI is not there."""
    hint = (
        "set COMFYUI_DIR to a ComfyUI checkout (the folder with main.py) to run the end-to-end tests, "
        "and optionally COMFYUI_PY to the python of ComfyUI's environment (default: this interpreter)"
    )
    raw = environ.get("COMFYUI_DIR", "").strip()
    if not raw:
        raise ComfyUINotConfigured(f"COMFYUI_DIR is not set: {hint}")
    root = Path(raw).expanduser().resolve()
    markers = [root / "main.py", root / "nodes.py", root / "folder_paths.py", root / "comfy" / "cli_args.py"]
    missing = [str(p.relative_to(root)) for p in markers if not p.is_file()]
    if missing:
        raise ComfyUINotConfigured(f"COMFYUI_DIR={raw} is not a ComfyUI checkout (missing {', '.join(missing)}): {hint}")
    raw_py = environ.get("COMFYUI_PY", "").strip()
    python = Path(raw_py).expanduser() if raw_py else Path(sys.executable)
    if not (python.is_file() and os.access(python, os.X_OK)):
        # A wrong interpreter is a broken setup, not a reason to skip silently.
        raise ValueError(f"COMFYUI_PY={raw_py!r} is not an executable file; set it to ComfyUI's venv python, e.g. /path/venv/bin/python")
    return ComfyInstall(root=root, python=python)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_base_directory(base: Path, *, pack_dir: Path = REPO_ROOT, pack_name: str = PACK_DIR_NAME) -> Path:
    """ComfyUI's --base-directory layout with the pack linked into custom_nodes under pack_name."""
    for sub in ("custom_nodes", "models", "input", "output", "temp", "user"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    link = base / "custom_nodes" / pack_name
    if not link.exists():
        link.symlink_to(pack_dir.resolve(), target_is_directory=True)
    return base


TINY_MODEL_NAME = "flux2-tiny"
"""Folder of the tiny FLUX.2 under the server's models/diffusers (what the shipped demo workflows name)."""
SAMPLE_DATASET_NAME = "flux2_lora_sample_squares"
"""Folder of the generated sample dataset under the server's input/ (the shipped workflows' image_folder)."""


def install_tiny_model(base: Path, *, tiny_model_dir: Path, name: str = TINY_MODEL_NAME) -> Path:
    """Copy the tiny FLUX.2 into base/models/diffusers/name once (later calls reuse it)."""
    target = base / "models" / "diffusers" / name
    if not (target / "model_index.json").is_file():
        # A copy, not a symlink: Python 3.11's Path.rglob does not descend into symlinked folders.
        shutil.copytree(tiny_model_dir, target, dirs_exist_ok=True)
    return target


def install_sample_dataset(base: Path, *, name: str = SAMPLE_DATASET_NAME) -> Path:
    """Write the demo's sample dataset (8 squares, 64 px, with captions) into base/input/name once."""
    from flux2_lora_pack.trainer.sample_data import make_sample_dataset  # the pack is registered by tests/conftest.py

    target = base / "input" / name
    if not target.is_dir():
        make_sample_dataset(out_dir=target, count=8, size=64)
    return target


def _http(url: str, *, data: bytes | None = None, timeout: float = 30.0) -> bytes:
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"} if data else {})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.read()


class ComfyServer:
    """One `main.py --cpu` process in its own process group, logging to a file."""

    def __init__(self, install: ComfyInstall, *, base_dir: Path, log_path: Path, port: int | None = None,
                 extra_args: Iterable[str] = (), extra_env: Mapping[str, str] | None = None):
        self.install = install
        self.base_dir = base_dir
        self.log_path = log_path
        self.port = port or free_port()
        self.extra_args = list(extra_args)
        self.extra_env = dict(extra_env or {})
        """Set for the server after the harness's own settings (a test that simulates another environment)."""
        self.process: subprocess.Popen | None = None
        self.start_seconds: float | None = None
        self._startup_log = ""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        cli_args = (self.install.root / "comfy" / "cli_args.py").read_text(encoding="utf-8")
        missing = [flag for flag in REQUIRED_FLAGS if f'"{flag}"' not in cli_args]
        if missing:
            raise ComfyStartError(f"ComfyUI at {self.install.root} lacks {missing}; use a ComfyUI from 2025 or later.")
        args = [
            str(self.install.python), "main.py", "--cpu",
            "--listen", "127.0.0.1", "--port", str(self.port),
            "--base-directory", str(self.base_dir),
            "--disable-auto-launch",
        ]
        # The sqlite database defaults to <ComfyUI>/user/comfyui.db whatever --base-directory says.
        if '"--database-url"' in cli_args:
            args += ["--database-url", f"sqlite:///{self.base_dir / 'user' / 'comfyui.db'}"]
        return args + self.extra_args

    def start(self, *, timeout: float = DEFAULT_START_TIMEOUT_S) -> None:
        env = dict(os.environ)
        env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
        # The repo root holds nodes/ and trainer/: they must never shadow ComfyUI's own `nodes` module.
        env.pop("PYTHONPATH", None)
        env.update(self.extra_env)
        command = self.command()
        began = time.monotonic()
        with open(self.log_path, "wb") as log:
            log.write(("$ " + " ".join(command) + "\n").encode())
            log.flush()
            self.process = subprocess.Popen(
                command, cwd=self.install.root, env=env, stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        deadline = began + timeout
        while True:
            if self._answers("/system_stats"):
                break
            if time.monotonic() > deadline:
                self.stop()
                raise ComfyStartError(f"ComfyUI did not answer {self.url}/system_stats within {timeout:.0f} s.\n"
                                      f"--- {self.log_path} tail ---\n{self.log_tail()}")
            try:
                code = self.process.wait(timeout=0.25)  # doubles as the poll interval and notices an early exit
            except subprocess.TimeoutExpired:
                continue
            raise ComfyStartError(f"ComfyUI exited with code {code} before answering (python: {self.install.python}; "
                                  f"set COMFYUI_PY to the python of ComfyUI's environment).\n"
                                  f"--- {self.log_path} tail ---\n{self.log_tail()}")
        self.start_seconds = time.monotonic() - began
        # Custom nodes load before the HTTP server listens, so this holds every import message.
        self._startup_log = self.log_text()

    def _answers(self, path: str) -> bool:
        try:
            _http(self.url + path, timeout=5)
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return False
        return True

    def startup_log(self) -> str:
        return self._startup_log

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path.exists() else ""

    def log_tail(self, chars: int = LOG_TAIL_CHARS) -> str:
        return self.log_text()[-chars:]

    def stop(self, *, timeout: float = 30.0) -> None:
        """Terminate the whole process group (ComfyUI and anything the pack spawned, e.g. torchrun)."""
        if self.process is None:
            return
        # Signal the group even when main.py already exited: children it spawned may still run.
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                break  # no process of the group is left
            try:
                self.process.wait(timeout=timeout)
                break
            except subprocess.TimeoutExpired:
                continue
        self.process.wait()


@dataclass(slots=True)
class NodeRef:
    id: str
    class_type: str
    inputs: dict[str, Any]

    def out(self, index: int) -> list:
        """A link to this node's output `index`, as API-format prompts spell it."""
        return [self.id, index]


class Graph:
    """Builds an API-format prompt: {"id": {"class_type": ..., "inputs": {...}}}."""

    def __init__(self) -> None:
        self.nodes: dict[str, NodeRef] = {}

    def node(self, class_type: str, *, node_id: str | None = None, **inputs: Any) -> NodeRef:
        node_id = node_id or str(len(self.nodes) + 1)
        if node_id in self.nodes:
            raise ValueError(f"node id {node_id!r} is used twice in the graph")
        ref = NodeRef(node_id, class_type, dict(inputs))
        self.nodes[node_id] = ref
        return ref

    def to_prompt(self) -> dict[str, dict[str, Any]]:
        return {ref.id: {"class_type": ref.class_type, "inputs": dict(ref.inputs)} for ref in self.nodes.values()}


@dataclass(slots=True)
class RunResult:
    prompt_id: str
    messages: list[dict[str, Any]]
    history: dict[str, Any]
    ran: set[str] = field(default_factory=set)
    """Node ids that executed (an `executing` message named them)."""
    cached: set[str] = field(default_factory=set)
    """Node ids served from ComfyUI's cache (execution_cached)."""

    @property
    def outputs(self) -> dict[str, Any]:
        return self.history.get("outputs", {})

    def images(self) -> list[dict[str, str]]:
        """Every {filename, subfolder, type} that an output node reported, in node order."""
        return [image for out in self.outputs.values() for image in out.get("images", [])]


class ComfyClient:
    """HTTP + websocket client for one server; one websocket per client, messages filtered by prompt_id."""

    def __init__(self, base_url: str, *, log_tail: Callable[[], str] | None = None):
        self.base_url = base_url.rstrip("/")
        self.client_id = uuid.uuid4().hex
        self._log_tail = log_tail or (lambda: "")
        host = urllib.parse.urlsplit(self.base_url).netloc
        # Connect before any prompt is posted so that no message for it can be missed.
        self.ws = websocket.create_connection(f"ws://{host}/ws?clientId={self.client_id}", timeout=30)

    def close(self) -> None:
        self.ws.close()

    def get_json(self, path: str) -> Any:
        """GET any endpoint of the server (e.g. "/extensions") and decode its JSON answer."""
        return json.loads(_http(self.base_url + path))

    def object_info(self, node_class: str | None = None) -> dict[str, Any]:
        path = "/object_info" if node_class is None else f"/object_info/{urllib.parse.quote(node_class)}"
        return self.get_json(path)

    def system_stats(self) -> dict[str, Any]:
        return self.get_json("/system_stats")

    def post_prompt(self, graph: Mapping[str, Any] | Graph) -> str:
        prompt = graph.to_prompt() if isinstance(graph, Graph) else dict(graph)
        body = json.dumps({"prompt": prompt, "client_id": self.client_id}).encode()
        try:
            answer = json.loads(_http(self.base_url + "/prompt", data=body))
        except urllib.error.HTTPError as err:
            raw = err.read()
            try:
                parsed: Any = json.loads(raw)
            except ValueError:
                parsed = raw.decode(errors="replace")
            raise PromptRejected(err.code, parsed) from None
        return answer["prompt_id"]

    def iter_messages(self, timeout: float) -> Iterator[dict[str, Any]]:
        """Every JSON message the server sends this client (all prompts, broadcasts such as the pack's
        training events), until the caller stops or `timeout` seconds pass (then TimeoutError)."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"waited {timeout:.0f} s for websocket messages\n--- ComfyUI log tail ---\n{self._log_tail()}")
            self.ws.settimeout(remaining)
            try:
                raw = self.ws.recv()
            except websocket.WebSocketTimeoutException:
                continue
            except (websocket.WebSocketConnectionClosedException, ConnectionError) as err:
                raise RuntimeError(f"websocket closed (did ComfyUI die?): {err}\n"
                                   f"--- ComfyUI log tail ---\n{self._log_tail()}") from err
            if isinstance(raw, str):  # binary frames are latent previews
                yield json.loads(raw)

    def wait_for_prompt(self, prompt_id: str, timeout: float, *,
                        on_message: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
        """Websocket messages for prompt_id until `executing` with node None; raises on error or interrupt.

        on_message sees every message first, including those without a prompt_id (custom events)."""
        messages: list[dict[str, Any]] = []
        try:
            for message in self.iter_messages(timeout):
                if on_message is not None:
                    on_message(message)
                data = message.get("data") or {}
                if not isinstance(data, dict) or data.get("prompt_id") != prompt_id:
                    continue
                messages.append(message)
                kind = message.get("type")
                if kind in ("execution_error", "execution_interrupted"):
                    raise ExecutionFailed(kind, data, self._log_tail())
                if kind == "executing" and data.get("node") is None:
                    return messages
        except TimeoutError as err:
            raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout:.0f} s; its messages: "
                               f"{[m['type'] for m in messages]}\n{err}") from None
        raise AssertionError("unreachable: iter_messages ends only by raising")

    def run(self, graph: Mapping[str, Any] | Graph, *, timeout: float = 120.0,
            on_message: Callable[[dict[str, Any]], None] | None = None) -> RunResult:
        prompt_id = self.post_prompt(graph)
        messages = self.wait_for_prompt(prompt_id, timeout, on_message=on_message)
        result = RunResult(prompt_id=prompt_id, messages=messages, history=self.history(prompt_id))
        for message in messages:
            data = message["data"]
            if message["type"] == "executing" and data.get("node") is not None:
                result.ran.add(data["node"])
            elif message["type"] == "execution_cached":
                result.cached.update(data.get("nodes", []))
        return result

    def history(self, prompt_id: str) -> dict[str, Any]:
        entries = self.get_json(f"/history/{urllib.parse.quote(prompt_id)}")
        if prompt_id not in entries:
            raise KeyError(f"/history has no entry for prompt {prompt_id}")
        return entries[prompt_id]

    def view_file(self, filename: str, subfolder: str = "", type: str = "output") -> bytes:  # noqa: A002 - ComfyUI's name
        query = urllib.parse.urlencode({"filename": filename, "subfolder": subfolder, "type": type})
        return _http(f"{self.base_url}/view?{query}")

    def interrupt(self, prompt_id: str | None = None) -> None:
        """POST /interrupt: the running prompt (or only prompt_id, when it is the running one) stops."""
        body = json.dumps({"prompt_id": prompt_id} if prompt_id else {}).encode()
        _http(self.base_url + "/interrupt", data=body)


def load_api_workflow(path: Path) -> dict[str, dict[str, Any]]:
    """An API-format workflow (node id -> {class_type, inputs})."""
    prompt = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(prompt, dict) or not all(isinstance(n, dict) and "class_type" in n for n in prompt.values()):
        raise ValueError(f"{path} is not an API-format workflow (node id -> {{class_type, inputs}}); export it with 'Save (API)'.")
    return prompt
