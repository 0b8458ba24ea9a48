"""A ComfyUI whose Python lacks the pack's requirements: the start-up log names every missing package once, with
the pip command for ComfyUI's own Python; the nodes still register; Run refuses with the same message.

The packages are made missing for this server only: a sitecustomize.py on its PYTHONPATH sets
sys.modules[name] = None before ComfyUI starts, so importlib finds nothing and `import` fails, as when the package
was never installed (transformers, which ComfyUI itself imports, then also sees no peft)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from comfyui_harness import (
    PACK_PYTHON_MODULE,
    REPO_ROOT,
    TINY_MODEL_NAME,
    ComfyClient,
    ComfyInstall,
    ComfyServer,
    ExecutionFailed,
    Graph,
    install_tiny_model,
    make_base_directory,
)

pytestmark = pytest.mark.e2e

HIDDEN = ("diffusers", "peft")
"""Packages from requirements.txt that ComfyUI itself does not need: hiding them leaves ComfyUI working."""
START_TIMEOUT_S = 300.0


@pytest.fixture(scope="module")
def bare_server(comfyui_install: ComfyInstall, tmp_path_factory: pytest.TempPathFactory,
                tiny_model_dir: Path) -> Iterator[ComfyServer]:
    root = tmp_path_factory.mktemp("comfyui_without_deps")
    site = root / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import sys\n" + "".join(f"sys.modules[{name!r}] = None\n" for name in HIDDEN), encoding="utf-8")
    base = make_base_directory(root / "base")
    install_tiny_model(base, tiny_model_dir=tiny_model_dir)
    server = ComfyServer(comfyui_install, base_dir=base, log_path=root / "comfyui.log",
                         extra_env={"PYTHONPATH": str(site)})
    server.start(timeout=START_TIMEOUT_S)
    try:
        yield server
    finally:
        server.stop()


def test_start_names_the_missing_packages_and_run_refuses_with_the_same_message(bare_server: ComfyServer):
    log = bare_server.startup_log()
    lines = log.splitlines()
    start = [i for i, line in enumerate(lines) if "FLUX.2 LoRA nodes: missing" in line]
    assert len(start) == 1, log[-6000:]  # one message, not one per node or per import
    assert lines[start[0]].endswith("FLUX.2 LoRA nodes: missing diffusers>=0.36, peft>=0.17. The nodes are listed "
                                    "but refuse to run until the pack's requirements are installed into ComfyUI's "
                                    "own Python (then restart ComfyUI):"), lines[start[0]]
    command = f"{bare_server.install.python} -m pip install -r {REPO_ROOT / 'requirements.txt'}"
    assert lines[start[0] + 1].strip() == command
    assert "IMPORT FAILED" not in log and "Cannot import" not in log, log[-6000:]

    comfy = ComfyClient(bare_server.url, log_tail=bare_server.log_tail)
    try:
        registered = {name for name, spec in comfy.object_info().items()
                      if spec.get("python_module") == PACK_PYTHON_MODULE}
        assert {"Flux2LoraLoadModel", "Flux2LoraBuildDataset", "Flux2LoraTrain"} <= registered
        graph = Graph()
        model = graph.node("Flux2LoraLoadModel", model=TINY_MODEL_NAME, precision="fp32")
        graph.node("PreviewAny", source=model.out(0))
        with pytest.raises(ExecutionFailed) as caught:
            comfy.run(graph, timeout=120)
    finally:
        comfy.close()
    assert caught.value.kind == "execution_error"
    data = caught.value.data
    assert data["node_type"] == "Flux2LoraLoadModel"
    assert data["exception_type"].endswith("MissingDependencies")
    first = lines[start[0]]
    logged = first[first.index("FLUX.2 LoRA nodes:"):] + "\n" + lines[start[0] + 1]
    assert data["exception_message"].rstrip("\n") == logged  # ComfyUI ends the message with a newline
