"""A missing dependency is named at ComfyUI start, once, with the command that installs it; the nodes still
register and each refuses at Run with the same message.

A missing package is simulated in a fresh interpreter (sys.modules[name] = None makes find_spec and import both
fail, as for an uninstalled package) that imports the pack the way ComfyUI does: under its folder's name, from
its folder."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
REQUIREMENTS = REPO / "requirements.txt"

# Runs in a subprocess: SETUP simulates the environment, then the pack is imported as ComfyUI imports a custom node
# folder, with logging captured; prints what was logged, what registered and what each node does at Run.
PROBE = r"""
import importlib.util, json, logging, sys
records = []

class Keep(logging.Handler):
    def emit(self, record):
        records.append({"level": record.levelname, "logger": record.name, "message": record.getMessage()})

logging.getLogger().addHandler(Keep())
logging.getLogger().setLevel(logging.INFO)
# SETUP
repo = sys.argv[1]
spec = importlib.util.spec_from_file_location("flux2_lora", repo + "/__init__.py",
                                              submodule_search_locations=[repo])
pack = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = pack
out = {"records": records}
try:
    spec.loader.exec_module(pack)
except ImportError as exc:
    out["import_error"] = f"{type(exc).__name__}: {exc}"
else:
    out["nodes"] = sorted(pack.NODE_CLASS_MAPPINGS)
    out["display_names"] = sorted(pack.NODE_DISPLAY_NAME_MAPPINGS)
    runs = {}
    for name, cls in sorted(pack.NODE_CLASS_MAPPINGS.items()):
        try:
            getattr(cls(), cls.FUNCTION)()  # no inputs: a guarded node refuses before it looks at any
            runs[name] = ["returned"]
        except Exception as exc:
            runs[name] = [type(exc).__name__, str(exc)]
    out["runs"] = runs
print(json.dumps(out))
"""

MISSING = "import sys\nfor name in {names!r}:\n    sys.modules[name] = None\n"
TOO_OLD = """
import importlib.metadata
_version = importlib.metadata.version
importlib.metadata.version = lambda name: {fake!r}.get(name) or _version(name)
"""


def probe(setup: str) -> dict:
    script = PROBE.replace("# SETUP\n", setup)
    done = subprocess.run([sys.executable, "-c", script, str(REPO)], capture_output=True, text=True, timeout=300,
                          cwd=REPO)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def pack_records(out: dict) -> list[dict]:
    return [r for r in out["records"] if r["logger"].startswith("flux2_lora.")]


def expected_command() -> str:
    return f"{sys.executable} -m pip install -r {REQUIREMENTS}"


@pytest.fixture(scope="module")
def deps(pack):
    return importlib.import_module(f"{pack.__name__}.nodes.dependencies")


def test_every_requirement_is_read_and_found_here(deps, pack):
    lines = [line.strip() for line in REQUIREMENTS.read_text().splitlines() if line.strip() and not line.startswith("#")]
    requirements = deps.read_requirements()
    assert [f"{r.name}>={r.minimum}" for r in requirements] == lines
    # The module each distribution provides is right: this environment has every one of them.
    assert {r.name: r.module for r in requirements if r.module != r.name} == {
        "optimum-quanto": "optimum.quanto", "pillow": "PIL"}
    assert deps.unmet(requirements) == ([], [])
    assert deps.dependency_problem() is None
    # Nothing is wrapped when every requirement is met: the nodes run their own functions.
    for cls in pack.NODE_CLASS_MAPPINGS.values():
        assert not hasattr(getattr(cls, cls.FUNCTION), "__wrapped__"), cls


def test_versions_compare_by_release_numbers(deps):
    assert deps.release("2.14.1+cu128") == (2, 14, 1)
    assert deps.release("0.36.0.dev0") == (0, 36, 0)
    assert deps.release("1.0rc1") == (1, 0)
    assert deps.release("0.9") < deps.release("0.36") < deps.release("0.42.1")


def test_a_requirement_line_it_cannot_read_is_an_error(deps, tmp_path):
    bad = tmp_path / "requirements.txt"
    bad.write_text("torch>=2.7\ndiffusers<1.0\n")
    with pytest.raises(ValueError, match=r"line 2: 'diffusers<1.0' is not 'name' or 'name>=version'"):
        deps.read_requirements(bad)


def test_the_install_command_quotes_paths_with_spaces(deps):
    assert deps.install_command("/opt/ComfyUI/.venv/bin/python", Path("/srv/nodes/flux2/requirements.txt")) == (
        "/opt/ComfyUI/.venv/bin/python -m pip install -r /srv/nodes/flux2/requirements.txt")
    assert deps.install_command(r"C:\Comfy UI\python_embeded\python.exe", Path("/x y/requirements.txt")) == (
        r'"C:\Comfy UI\python_embeded\python.exe" -m pip install -r "/x y/requirements.txt"')


def test_missing_packages_are_named_once_at_start_and_every_node_refuses_with_it(pack):
    out = probe(MISSING.format(names=["diffusers", "peft", "optimum"]))
    records = pack_records(out)
    assert len(records) == 1, out["records"]
    message = records[0]["message"]
    assert records[0]["level"] == "ERROR"
    assert message.startswith("FLUX.2 LoRA nodes: missing diffusers>=0.36, peft>=0.17, optimum-quanto>=0.2.7. ")
    assert "transformers" not in message and "torch" not in message  # only what is missing
    assert message.endswith(expected_command())
    # Every node still registers, and each refuses at Run with exactly the start-up message.
    assert out["nodes"] == out["display_names"] == sorted(pack.NODE_CLASS_MAPPINGS)
    assert out["runs"] == {name: ["MissingDependencies", message] for name in out["nodes"]}


def test_a_too_old_package_is_named_with_its_version():
    out = probe(TOO_OLD.format(fake={"diffusers": "0.35.2", "peft": "0.17.0"}))
    records = pack_records(out)
    assert [r["message"].split(". The nodes")[0] for r in records] == [
        "FLUX.2 LoRA nodes: too old: diffusers 0.35.2 (needs >=0.36)"]  # peft 0.17.0 meets >=0.17
    assert records[0]["message"].endswith(expected_command())
    assert {tuple(run) for run in out["runs"].values()} == {("MissingDependencies", records[0]["message"])}


def test_without_torch_the_message_still_comes_before_the_import_fails():
    # torch comes with ComfyUI, and the node modules import it at the top: the pack cannot register without it,
    # but the start-up log still names it (and what else is missing) before ComfyUI reports the failed import.
    out = probe(MISSING.format(names=["torch", "diffusers"]))
    records = pack_records(out)
    assert [r["message"].split(". The nodes")[0] for r in records] == [
        "FLUX.2 LoRA nodes: missing torch>=2.7, diffusers>=0.36"]
    assert out["import_error"].startswith("ModuleNotFoundError: import of torch halted")
    assert "nodes" not in out
