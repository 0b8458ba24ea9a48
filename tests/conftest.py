"""Shared fixtures: one tiny FLUX.2 per test session, written by the same code users run."""

from __future__ import annotations

import importlib.abc
import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
# Shared test helpers (block_tools, image_tools) import as top-level modules, also from fixtures.
if str(REPO_ROOT / "tests") not in sys.path:
    sys.path.insert(1, str(REPO_ROOT / "tests"))

# Two busy cores: more threads made tiny steps 20x slower here.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random FLUX.2 in the real diffusers layout (about 30 MB, a few seconds)."""
    from flux2_lora_pack.trainer.tiny import make_tiny

    return make_tiny(out_dir=tmp_path_factory.mktemp("tiny_flux2") / "model", seed=0)


def import_pack(name: str = "flux2_lora_pack"):
    """Import the repo as a package, the way ComfyUI imports a custom node folder."""
    import importlib.util

    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(
        name, REPO_ROOT / "__init__.py", submodule_search_locations=[str(REPO_ROOT)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# Tests import the trainer through the pack only (`flux2_lora_pack.trainer.*`), the copy the nodes use: a
# second copy under the name `trainer` would let a monkeypatch of one silently miss the other.
PACK = import_pack()


class _OneNameForTheTrainer(importlib.abc.MetaPathFinder):
    """Refuses an in-process `import trainer...` (subprocesses such as `python -m trainer` are not affected)."""

    def find_spec(self, name, path, target=None):
        if name == "trainer" or name.startswith("trainer."):
            raise ImportError(f"import {name}: tests import the trainer as flux2_lora_pack.trainer (tests/conftest.py)")
        return None


sys.meta_path.insert(0, _OneNameForTheTrainer())


@pytest.fixture(scope="session")
def pack():
    return PACK


@pytest.fixture
def comfy_root(tmp_path: Path, pack):
    """A ComfyUI-like folder (models/, output/) that the nodes use in place of ComfyUI's folder_paths."""
    import importlib

    bridge = importlib.import_module(f"{pack.__name__}.nodes.comfy_bridge")
    bridge.set_headless_root(tmp_path)
    (tmp_path / "models" / "diffusers").mkdir(parents=True)
    (tmp_path / "output").mkdir()
    yield tmp_path
    bridge.set_headless_root(None)


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_model_dir):
    """diffusers' own Flux2Pipeline on the tiny weights: the reference the conventions are checked against.

    The tokenizer is handed over separately: the real folder is a PixtralProcessor, which needs torchvision.
    """
    from diffusers import Flux2Pipeline
    from transformers import AutoTokenizer

    pipeline = Flux2Pipeline.from_pretrained(tiny_model_dir, tokenizer=None)
    pipeline.register_modules(tokenizer=AutoTokenizer.from_pretrained(tiny_model_dir / "tokenizer"))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline
