"""Registry packaging: comfy-cli validates the pack cleanly and packs exactly what users need."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _comfy() -> list[str]:
    exe = shutil.which("comfy", path=str(Path(sys.executable).parent)) or shutil.which("comfy")
    if exe is None:
        pytest.skip("comfy-cli is not installed (it is in requirements-test.txt; run bash .ci/test)")
    return [exe, "--skip-prompt", "--no-enable-telemetry"]


def test_pyproject_and_requirements_agree():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = [
        line.strip() for line in (REPO / "requirements.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert sorted(project["dependencies"]) == sorted(requirements)
    assert "comfyui" not in project["name"].lower()
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"])
    # Lower bounds only: the pack shares ComfyUI's environment.
    assert all("<" not in r and "==" not in r for r in requirements)
    comfy = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["comfy"]
    assert {"PublisherId", "DisplayName", "Icon"} <= set(comfy)


def test_comfy_node_validate_is_clean():
    result = subprocess.run(_comfy() + ["node", "validate"], cwd=REPO, capture_output=True, text=True, timeout=300)
    # comfy-cli exits 0 even with warnings; clean means it says every check passed.
    assert result.returncode == 0, result.stdout + result.stderr
    assert "All validation checks passed" in result.stdout + result.stderr, result.stdout + result.stderr


def test_comfy_node_pack_holds_only_what_users_need(tmp_path):
    clone = tmp_path / "clone"
    # comfy node pack packs git-tracked files, so it runs on a clone: what a release would contain.
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True, timeout=120)
    subprocess.run(_comfy() + ["node", "pack"], cwd=clone, capture_output=True, text=True, timeout=300, check=True)
    names = zipfile.ZipFile(clone / "node.zip").namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops <= {"__init__.py", "nodes", "trainer", "web", "workflows", "pyproject.toml", "requirements.txt",
                    "README.md", "LICENSE", "CHANGELOG.md"}, tops
    assert {"__init__.py", "nodes", "trainer", "web", "workflows", "pyproject.toml"} <= tops
    assert not any(n.startswith(("tests/", "bench/", ".ci/")) for n in names)


def test_tests_import_the_trainer_through_the_pack_only():
    """One name for the trainer in tests: a monkeypatch of `trainer.x` would miss the pack's `trainer.x` the nodes use."""
    pattern = re.compile(r"^\s*(from|import)\s+trainer\b|(import_module|__import__)\(\s*[\"']trainer\b|logger=[\"']trainer\.", re.M)
    offenders = [str(path.relative_to(REPO)) for path in (REPO / "tests").rglob("*.py")
                 if path.name != "comfy_lora_probe.py"  # runs in ComfyUI's interpreter, not in pytest
                 and pattern.search(path.read_text(encoding="utf-8"))]
    assert offenders == []
    assert "trainer" not in sys.modules or sys.modules["trainer"].__file__ is None
