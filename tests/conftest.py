"""Shared fixtures: one tiny FLUX.2 per test session, written by the same code users run."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

# Two busy cores: more threads made tiny steps 20x slower here.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random FLUX.2 in the real diffusers layout (about 30 MB, a few seconds)."""
    from trainer.tiny import make_tiny

    return make_tiny(out_dir=tmp_path_factory.mktemp("tiny_flux2") / "model", seed=0)
