"""The Python packages the pack needs (its requirements.txt), checked when ComfyUI imports the pack.

ComfyUI imports every custom node folder at start. Without this check a pack whose dependency is missing
registers its nodes silently and fails only when Run is pressed ("No module named 'diffusers'"). Instead one
message at start names every missing (or too old) package and the command that installs them into ComfyUI's own
Python; the nodes still register, so a saved workflow opens, and each refuses to run with the same message.

Standard library only: nodes/__init__.py runs this before the node modules import torch.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import logging
import re
import sys
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

REQUIREMENTS_FILE = Path(__file__).resolve().parents[1] / "requirements.txt"
IMPORT_NAMES = {"pillow": "PIL", "optimum-quanto": "optimum.quanto"}
"""Distribution name (lower case, as requirements.txt spells it) -> the module to look for, where they differ."""

_REQUIREMENT = re.compile(r"([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:>=\s*([0-9][0-9A-Za-z.+!_-]*))?")


class MissingDependencies(RuntimeError):
    """A node was run while a package from requirements.txt is missing or too old; the message says how to fix it."""


@dataclass(frozen=True, slots=True)
class Requirement:
    name: str
    """Distribution name, as requirements.txt spells it (what pip installs)."""
    minimum: str | None
    """The lower bound (requirements.txt has lower bounds only), or None."""
    module: str
    """What `import` needs to find."""


def read_requirements(path: Path = REQUIREMENTS_FILE) -> list[Requirement]:
    """The requirements file's packages, in file order; a line this reader does not understand is an error."""
    found = []
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = _REQUIREMENT.fullmatch(line)
        if match is None:
            raise ValueError(f"{path} line {number}: {raw.strip()!r} is not 'name' or 'name>=version'; "
                             "the pack's requirements use lower bounds only.")
        name, minimum = match.groups()
        found.append(Requirement(name=name, minimum=minimum,
                                 module=IMPORT_NAMES.get(name.lower(), name.lower().replace("-", "_"))))
    return found


def release(version: str) -> tuple[int, ...]:
    """The leading release numbers of a version: "2.14.1+cu128" -> (2, 14, 1), "0.36.0.dev0" -> (0, 36, 0)."""
    numbers = []
    for part in version.split("+", 1)[0].split("."):
        digits = re.match(r"\d+", part)
        if digits is None:
            break
        numbers.append(int(digits.group()))
        if digits.end() != len(part):  # "0rc1": the release ends here
            break
    return tuple(numbers)


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a missing parent package (optimum for optimum.quanto), or a broken entry
        return False


def unmet(requirements: list[Requirement]) -> tuple[list[str], list[str]]:
    """(missing, too old): each missing package as `name>=minimum`, each old one with its installed version."""
    missing, too_old = [], []
    for req in requirements:
        if not _importable(req.module):
            missing.append(f"{req.name}>={req.minimum}" if req.minimum else req.name)
            continue
        if req.minimum is None:
            continue
        try:
            installed = importlib.metadata.version(req.name)
        except importlib.metadata.PackageNotFoundError:
            continue  # importable without package metadata (a checkout on sys.path): its version is unknown
        if release(installed) < release(req.minimum):
            too_old.append(f"{req.name} {installed} (needs >={req.minimum})")
    return missing, too_old


def _shell_word(text: str) -> str:
    return f'"{text}"' if any(c.isspace() for c in text) else text


def install_command(python: str = sys.executable, requirements: Path = REQUIREMENTS_FILE) -> str:
    """The command that installs the pack's requirements into the Python running ComfyUI."""
    return f"{_shell_word(python)} -m pip install -r {_shell_word(str(requirements))}"


def dependency_problem(path: Path = REQUIREMENTS_FILE) -> str | None:
    """The message naming every missing or too old requirement and the install command, or None when all is there."""
    missing, too_old = unmet(read_requirements(path))
    if not missing and not too_old:
        return None
    found = ([f"missing {', '.join(missing)}"] if missing else []) + ([f"too old: {', '.join(too_old)}"] if too_old else [])
    return (f"FLUX.2 LoRA nodes: {'; '.join(found)}. The nodes are listed but refuse to run until the pack's "
            f"requirements are installed into ComfyUI's own Python (then restart ComfyUI):\n"
            f"    {install_command(requirements=path)}")


def report_at_start() -> str | None:
    """Log the dependency problem once (ComfyUI start); return it, or None when every requirement is met."""
    try:
        problem = dependency_problem()
    except (OSError, ValueError) as exc:  # an incomplete copy of the pack: say so, and let the nodes try
        log.warning("FLUX.2 LoRA nodes: could not check the pack's requirements: %s", exc)
        return None
    if problem is not None:
        log.error("%s", problem)
    return problem


def refuse_to_run(cls: type) -> type:
    """Make the node's FUNCTION raise MissingDependencies while a requirement is unmet (checked again at each Run:
    once the packages are installed, the node runs)."""
    original = getattr(cls, cls.FUNCTION)

    @functools.wraps(original)
    def guarded(self, *args, **kwargs):
        problem = dependency_problem()
        if problem is not None:
            raise MissingDependencies(problem)
        return original(self, *args, **kwargs)

    setattr(cls, cls.FUNCTION, guarded)
    return cls
