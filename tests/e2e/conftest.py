"""Fixtures for the end-to-end tests: one real ComfyUI per session with this pack in custom_nodes."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# importlib import mode puts no test folder on sys.path; the tests import the harness by name.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from comfyui_harness import (  # noqa: E402
    ComfyClient,
    ComfyInstall,
    ComfyServer,
    DEFAULT_START_TIMEOUT_S,
    ComfyUINotConfigured,
    comfyui_install_from_env,
    make_base_directory,
)


@pytest.fixture(scope="session")
def comfyui_install() -> ComfyInstall:
    try:
        return comfyui_install_from_env()
    except ComfyUINotConfigured as reason:
        pytest.skip(str(reason))


@pytest.fixture(scope="session")
def comfyui_server(comfyui_install: ComfyInstall, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ComfyServer]:
    """ComfyUI on a free loopback port; base directory (custom_nodes/flux2_lora -> repo, models, input,
    output, temp, user) and log file in a temporary folder; the process group is ended at teardown."""
    root = tmp_path_factory.mktemp("comfyui")
    base = make_base_directory(root / "base")
    server = ComfyServer(comfyui_install, base_dir=base, log_path=root / "comfyui.log")
    server.start(timeout=float(os.environ.get("COMFYUI_START_TIMEOUT", DEFAULT_START_TIMEOUT_S)))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def comfy(comfyui_server: ComfyServer) -> Iterator[ComfyClient]:
    client = ComfyClient(comfyui_server.url, log_tail=comfyui_server.log_tail)
    try:
        yield client
    finally:
        client.close()
