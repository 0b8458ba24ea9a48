"""Security: no code runs from data, no shell, no path leaves its allowed folder, no private paths in LoRA files.

1. A static scan (AST) of the pack's own code (trainer/, nodes/, __init__.py, .ci/, bench/) for pickle,
   torch.load without weights_only=True, shell=True, os.system, eval/exec, object collectives (pickle over
   the network), remote code and non-safetensors weight loading. The scanner is itself tested on code that
   breaks each rule, so a clean result means something.
2. Every path a node takes from a widget (or any client of the server) is checked against its root.
3. LoRA headers hold no absolute paths.
"""

from __future__ import annotations

import ast
import importlib
import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCANNED = ["trainer", "nodes", "__init__.py", ".ci", "bench"]

PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "shelve", "marshal", "joblib"}
SHELL_CALLS = {("os", "system"), ("os", "popen"), ("os", "execl"), ("os", "execle"), ("os", "execlp"),
               ("os", "execv"), ("os", "execve"), ("os", "execvp"), ("os", "spawnl"), ("os", "spawnv"),
               ("subprocess", "getoutput"), ("subprocess", "getstatusoutput")}
SUBPROCESS_CALLS = {"run", "Popen", "call", "check_call", "check_output"}
OBJECT_COLLECTIVES = {"broadcast_object_list", "all_gather_object", "gather_object", "scatter_object_list",
                      "send_object_list", "recv_object_list"}
TOKENIZER_LIKE = ("Tokenizer", "Processor", "Scheduler", "Config")


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _kw(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_const(node: ast.expr | None, value) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def scan_source(source: str, *, filename: str) -> list[str]:
    """Violations in one file, as 'file:line: rule'."""
    tree = ast.parse(source, filename=filename)
    found: list[str] = []

    def flag(node: ast.AST, rule: str) -> None:
        found.append(f"{filename}:{getattr(node, 'lineno', 0)}: {rule}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in PICKLE_MODULES:
                    flag(node, f"imports {alias.name} (unpickling runs code)")
        elif isinstance(node, ast.ImportFrom):
            if (node.module or "").split(".")[0] in PICKLE_MODULES:
                flag(node, f"imports from {node.module} (unpickling runs code)")
            if node.module == "torch" and any(a.name == "load" for a in node.names):
                flag(node, "imports torch.load by name (the weights_only check cannot see its calls)")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            parts = tuple(name.split("."))
            if name in ("eval", "exec", "compile", "__import__"):
                flag(node, f"calls {name}()")
            if parts[-2:] in SHELL_CALLS or name in {f"{a}.{b}" for a, b in SHELL_CALLS}:
                flag(node, f"calls {name} (runs a shell)")
            shell = _kw(node, "shell")
            if shell is not None and not _is_const(shell, False):
                flag(node, "passes shell= (subprocess only with argument lists)")
            if len(parts) == 2 and parts[0] == "subprocess" and parts[1] in SUBPROCESS_CALLS and node.args:
                first = node.args[0]
                if isinstance(first, (ast.Constant, ast.JoinedStr, ast.BinOp)):
                    flag(node, f"calls {name} with a command string (use an argument list)")
            if parts[-1] == "load" and len(parts) >= 2 and parts[0] == "torch" \
                    and not _is_const(_kw(node, "weights_only"), True):
                flag(node, f"calls {name} without weights_only=True")
            allow_pickle = _kw(node, "allow_pickle")
            if parts[-1] == "load" and parts[0] in ("np", "numpy") and allow_pickle is not None \
                    and not _is_const(allow_pickle, False):
                flag(node, f"calls {name} with allow_pickle")
            if parts[0] == "yaml" and parts[-1] in ("load", "unsafe_load", "full_load", "load_all"):
                loader = _kw(node, "Loader")
                if parts[-1] != "load" or loader is None or "Safe" not in _dotted(loader):
                    flag(node, f"calls {name} without SafeLoader")
            if parts[-1] in OBJECT_COLLECTIVES:
                flag(node, f"calls {name} (pickles objects between processes)")
            if len(parts) >= 2 and parts[0] == "torch" and parts[1] == "hub":
                flag(node, f"calls {name} (downloads and runs code)")
            if _is_const(_kw(node, "trust_remote_code"), True):
                flag(node, "passes trust_remote_code=True")
            tokenizer_like = len(parts) >= 2 and any(t in parts[-2] for t in TOKENIZER_LIKE)
            if parts[-1] == "from_pretrained" and not tokenizer_like and not _is_const(_kw(node, "use_safetensors"), True):
                flag(node, f"calls {name} without use_safetensors=True (could fall back to pickled .bin)")
    return found


def _python_files() -> list[Path]:
    files: list[Path] = []
    for entry in SCANNED:
        path = REPO / entry
        if path.is_file():
            files.append(path)
            continue
        for child in sorted(path.rglob("*")):
            if "__pycache__" in child.parts or not child.is_file():
                continue
            if child.suffix == ".py" or (child.suffix == "" and child.read_bytes()[:30].startswith(b"#!/usr/bin/env python")):
                files.append(child)
    return files


def test_scanner_flags_every_rule_on_code_that_breaks_it():
    bad = '''
import pickle
from dill import loads
from torch import load
import subprocess, os, torch, yaml, numpy as np
torch.load("x.pt")
torch.load("x.pt", weights_only=False)
os.system("ls")
subprocess.run("ls -l", shell=True)
subprocess.Popen(f"ls {x}")
eval("1")
exec("x = 1")
yaml.load(text)
np.load("a.npy", allow_pickle=True)
torch.distributed.broadcast_object_list([x])
torch.hub.load("a/b", "m")
AutoModel.from_pretrained("x", trust_remote_code=True)
Flux2Transformer2DModel.from_pretrained("x")
'''
    found = scan_source(bad, filename="bad.py")
    rules = [f.split(": ", 1)[1] for f in found]
    expected_fragments = [
        "imports pickle", "imports from dill", "imports torch.load by name", "torch.load without weights_only",
        "os.system", "shell=", "command string", "eval()", "exec()", "yaml.load without SafeLoader", "allow_pickle",
        "broadcast_object_list", "torch.hub", "trust_remote_code", "use_safetensors=True",
    ]
    for fragment in expected_fragments:
        assert any(fragment in r for r in rules), (fragment, rules)
    # torch.load with weights_only=True passes twice ("x.pt" lines): exactly two torch.load findings.
    assert sum("torch.load without" in r for r in rules) == 2
    good = '''
import subprocess, torch, json
torch.load("x.pt", weights_only=True, map_location="cpu")
subprocess.run(["ls", "-l"], check=False)
subprocess.run(cmd, shell=False)
AutoTokenizer.from_pretrained(folder)
Model.from_pretrained(folder, use_safetensors=True)
re.compile("x")
'''
    assert scan_source(good, filename="good.py") == []


def test_pack_code_has_no_pickle_shell_eval_or_unsafe_loading():
    files = _python_files()
    # Not vacuous: the trainer, the nodes, the CI runner and the bench script are all read.
    names = {str(f.relative_to(REPO)) for f in files}
    assert {"__init__.py", "trainer/loop.py", "trainer/checkpoint.py", "nodes/train_nodes.py", "nodes/routes.py",
            ".ci/run_workflow.py", "bench/train_overhead.py"} <= names
    violations = [v for f in files for v in scan_source(f.read_text(encoding="utf-8"), filename=str(f.relative_to(REPO)))]
    assert violations == []


def test_single_file_weights_are_only_read_behind_the_safetensors_suffix_check():
    # diffusers' from_single_file also reads pickled .ckpt files: only model_files may call it, after its check.
    callers = {str(f.relative_to(REPO)) for f in _python_files() if "from_single_file(" in f.read_text(encoding="utf-8")}
    assert callers <= {"trainer/model_files.py"}
    from flux2_lora_pack.trainer.model_files import _check_single_file

    with pytest.raises(ValueError, match="only .safetensors is loaded"):
        _check_single_file(Path(__file__), what="transformer file")


# ---------------------------------------------------------------------------------------------------------------
# Paths from widgets and clients


@pytest.fixture
def nodes_mod(pack, comfy_root):
    (comfy_root / "input").mkdir(exist_ok=True)
    return importlib.import_module(f"{pack.__name__}.nodes.train_nodes")


@pytest.fixture
def dataset_nodes(pack, comfy_root):
    (comfy_root / "input").mkdir(exist_ok=True)
    return importlib.import_module(f"{pack.__name__}.nodes.dataset_nodes")


@pytest.fixture
def model_nodes(pack, comfy_root):
    return importlib.import_module(f"{pack.__name__}.nodes.model_nodes")


@pytest.fixture
def outside(tmp_path_factory) -> Path:
    """A folder outside every ComfyUI root, holding what an attacker would like to read."""
    root = tmp_path_factory.mktemp("outside")
    (root / "images").mkdir()
    (root / "images" / "secret.png").write_bytes(b"\x89PNG not really")
    (root / "lib.json").write_text(json.dumps({"p": "a prompt"}))
    return root


@pytest.mark.parametrize("typed", ["../../outside/images", "OUTSIDE/images", "input/../../outside/images"])
def test_image_folder_must_stay_in_the_input_folder(dataset_nodes, comfy_root, outside, typed):
    typed = typed.replace("OUTSIDE", str(outside))
    message = dataset_nodes.Flux2BuildDataset.VALIDATE_INPUTS(image_folder=typed)
    assert isinstance(message, str) and "image_folder" in message and "outside the folders" in message
    with pytest.raises(ValueError, match="image_folder .* outside the folders"):
        dataset_nodes.resolve_image_folder(typed)
    assert dataset_nodes.Flux2BuildDataset.IS_CHANGED(image_folder=typed).startswith("refused:")


def test_image_folder_inside_input_or_a_configured_root_is_accepted(dataset_nodes, comfy_root, outside, monkeypatch):
    (comfy_root / "input" / "mine").mkdir()
    assert dataset_nodes.resolve_image_folder("mine") == comfy_root / "input" / "mine"
    monkeypatch.setenv("FLUX2LORA_DATASET_ROOTS", str(outside))
    assert dataset_nodes.resolve_image_folder(str(outside / "images")) == outside / "images"


def test_data_backend_config_and_its_folders_are_checked(dataset_nodes, comfy_root, outside):
    message = dataset_nodes.Flux2BuildDataset.VALIDATE_INPUTS(image_folder="", data_backend_config=str(outside / "lib.json"))
    assert isinstance(message, str) and "data_backend_config" in message and "outside the folders" in message
    from types import SimpleNamespace

    spec = SimpleNamespace(id="ds", instance_data_dir=outside / "images", cache_dir_vae=None)
    config = SimpleNamespace(datasets=(spec,), conditioning={}, text_embeds=())
    with pytest.raises(ValueError, match="'ds' instance_data_dir .* outside the folders"):
        dataset_nodes.check_backend_paths(config)
    inside = SimpleNamespace(id="ds", instance_data_dir=comfy_root / "input" / "x", cache_dir_vae=outside / "cache")
    with pytest.raises(ValueError, match="cache_dir_vae"):
        dataset_nodes.check_backend_paths(SimpleNamespace(datasets=(inside,), conditioning={}, text_embeds=()))


@pytest.mark.parametrize("key", ["output_dir", "--output_dir", "pretrained_model_name_or_path", "dataset_manifest",
                                 "data_backend_config", "pretrained_transformer_model_name_or_path"])
def test_extra_config_json_cannot_redirect_where_the_run_reads_or_writes(nodes_mod, key):
    with pytest.raises(ValueError, match=f"extra_config_json key '{key}' cannot be set here"):
        nodes_mod.check_extra_paths({key: "/etc"})


def test_extra_config_json_prompt_library_and_resume_stay_in_their_folders(nodes_mod, comfy_root, outside):
    with pytest.raises(ValueError, match="user_prompt_library .* outside the folders"):
        nodes_mod.check_extra_paths({"user_prompt_library": str(outside / "lib.json")})
    extra = {"user_prompt_library": "prompts.json"}
    nodes_mod.check_extra_paths(extra)
    assert extra["user_prompt_library"] == str(comfy_root / "input" / "prompts.json")
    for bad in ("/etc", "../checkpoint-4", "checkpoint-4/../../x"):
        with pytest.raises(ValueError, match="resume_from_checkpoint"):
            nodes_mod.check_extra_paths({"resume_from_checkpoint": bad})
    nodes_mod.check_extra_paths({"resume_from_checkpoint": "checkpoint-12"})
    nodes_mod.check_extra_paths({"resume_from_checkpoint": "latest"})


def test_extra_config_json_logging_dir_stays_in_the_run_folder(nodes_mod):
    for bad in ("/etc", "~/logs", "../logs", "logs/../../x"):
        with pytest.raises(ValueError, match=r"extra_config_json logging_dir .* must be a folder inside the run folder"):
            nodes_mod.check_extra_paths({"logging_dir": bad})
    nodes_mod.check_extra_paths({"logging_dir": "tensorboard/logs"})


def test_attach_run_folder_must_be_in_the_output_folder(nodes_mod, comfy_root, outside):
    (outside / "events.jsonl").write_text(json.dumps({"event": "end", "lora_path": "x.safetensors"}) + "\n")
    with pytest.raises(ValueError, match="attach_run_folder .* outside the folders"):
        nodes_mod.Flux2TrainLora._attach(str(outside))
    with pytest.raises(ValueError, match="attach_run_folder .* outside the folders"):
        nodes_mod.Flux2TrainLora._attach(str(comfy_root / "output" / ".." / ".." / outside.name))


def test_an_events_file_cannot_point_the_node_at_a_file_outside_its_run(nodes_mod, comfy_root, outside):
    run = comfy_root / "output" / "flux2_lora" / "runs" / "r-1"
    run.mkdir(parents=True)
    target = outside / "stolen.safetensors"
    target.write_bytes(b"x")
    for lora_path in (str(target), f"../../../../../{outside.name}/stolen.safetensors", "../r-1/../r-2/x.safetensors"):
        (run / "events.jsonl").write_text(json.dumps({"event": "end", "lora_path": lora_path}) + "\n")
        assert nodes_mod.finished_run(run) is None


def test_model_folder_path_must_be_in_the_models_folders(model_nodes, comfy_root, outside, monkeypatch):
    with pytest.raises(ValueError, match="folder_path .* outside the folders"):
        model_nodes.resolve_model_folder("x", str(outside))
    with pytest.raises(ValueError, match="folder_path .* outside the folders"):
        model_nodes.resolve_model_folder("x", str(comfy_root / "models" / "diffusers" / ".." / ".." / ".." / outside.name))
    inside = comfy_root / "models" / "diffusers" / "m"
    assert model_nodes.resolve_model_folder("x", str(inside)) == inside
    monkeypatch.setenv("FLUX2LORA_MODEL_ROOTS", str(outside))
    assert model_nodes.resolve_model_folder("x", str(outside)) == outside


def test_model_file_names_cannot_leave_the_model_folders(pack, comfy_root, outside):
    bridge = importlib.import_module(f"{pack.__name__}.nodes.comfy_bridge")
    (outside / "w.safetensors").write_bytes(b"x")
    (comfy_root / "models" / "vae").mkdir(parents=True)
    assert bridge.resolve_model_file("vae", f"../../../{outside.name}/w.safetensors") is None
    assert bridge.resolve_model_file("vae", str(outside / "w.safetensors")) is None


@pytest.mark.parametrize("filename", ["../../escape", "../x", "a/b/c", "/", "NUL", "x/CON.safetensors", "a\x00b"])
def test_save_lora_filename_never_leaves_models_loras(nodes_mod, comfy_root, filename, tmp_path):
    lora = tmp_path / "l.safetensors"
    lora.write_bytes(b"not read before the name check")
    with pytest.raises(ValueError, match="filename"):
        nodes_mod.Flux2SaveLora().save(nodes_mod.TrainedLora(path=str(lora)), filename)
    assert not (comfy_root / "models" / "loras").exists() or not any((comfy_root / "models" / "loras").rglob("*"))


@pytest.mark.parametrize("name", ["../escape", "/abs/path", "a\\b", "CON", "lpt1", "nul.txt", "bad\x1bname", ".."])
def test_output_name_is_a_plain_file_name(nodes_mod, name):
    with pytest.raises(ValueError, match="output_name"):
        nodes_mod.sanitize_name(name, input_name="output_name")


def test_routes_serve_only_run_folders_of_this_pack():
    # The routes' own tests (tests/unit/test_routes.py) cover traversal, symlinks and encodings in detail;
    # here: the same guard is what the registered handlers call.
    source = (REPO / "nodes" / "routes.py").read_text(encoding="utf-8")
    tree = ast.parse(source)
    handlers = {n.name: n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name in ("events", "image")}
    for name, fn in handlers.items():
        calls = {_dotted(c.func) for c in ast.walk(fn) if isinstance(c, ast.Call)}
        assert calls & {"run_events", "run_events_since", "run_image"}, name


# ---------------------------------------------------------------------------------------------------------------
# LoRA headers


def test_lora_metadata_holds_no_absolute_paths():
    from flux2_lora_pack.trainer.lora_keys import lora_metadata

    meta = lora_metadata(rank=4, alpha=2.0, targets="all", base_model="FLUX.2-dev", steps=10,
                         dataset_fingerprint="abc123")
    assert set(meta) == {"rank", "alpha", "targets", "base_model", "steps", "dataset_fingerprint", "trainer_version"}
    assert_no_paths(meta)


def assert_no_paths(meta: dict[str, str]) -> None:
    home = os.path.expanduser("~")
    for key, value in meta.items():
        text = str(value)
        assert home not in text and "/tmp" not in text and ":\\" not in text, (key, text)
        assert not text.strip('"').startswith("/"), (key, text)


def test_only_the_final_save_writes_lora_metadata():
    # Every caller of lora_metadata passes names and numbers only: there is exactly one, in the loop.
    callers = [str(f.relative_to(REPO)) for f in _python_files()
               if "lora_metadata(" in f.read_text(encoding="utf-8") and f.name != "lora_keys.py"]
    assert callers == ["trainer/loop.py"]
    source = (REPO / "trainer" / "loop.py").read_text(encoding="utf-8")
    call = next(n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Call) and _dotted(n.func) == "lora_metadata")
    # extra: the adapter type and, for a LoKr, its lycoris_config's fields (trainer/lokr.py accepts no path field)
    assert {k.arg for k in call.keywords} == {"rank", "alpha", "targets", "base_model", "steps", "dataset_fingerprint",
                                              "extra"}
