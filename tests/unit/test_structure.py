"""The trainer's shape: no import cycle (lazy imports included), no module over 800 lines, a short loop and node."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TRAINER = REPO / "trainer"


def _imports(path: Path) -> set[str]:
    """Sibling modules `path` imports at run time (function-level imports too; `if TYPE_CHECKING:` ones not)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    type_only = {id(n) for block in ast.walk(tree)
                 if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test) for n in ast.walk(block)}
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1 and id(node) not in type_only:
            found |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
    return found


def test_trainer_has_no_import_cycle():
    graph = {p.stem: _imports(p) for p in TRAINER.glob("*.py")}
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        for nxt in sorted(graph.get(module, ())):
            if nxt in path:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt in graph:
                visit(nxt, path + [nxt])

    for module in graph:
        visit(module, [module])
    assert cycles == []


def test_no_trainer_or_node_module_is_over_800_lines():
    sizes = {str(p.relative_to(REPO)): len(p.read_text(encoding="utf-8").splitlines())
             for folder in ("trainer", "nodes") for p in (REPO / folder).glob("*.py")}
    assert {name: n for name, n in sizes.items() if n > 800} == {}


def _function_lines(path: Path, name: str) -> int:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    node = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == name)
    return node.end_lineno - node.lineno + 1


def test_the_train_loop_and_the_train_node_are_short():
    assert _function_lines(TRAINER / "loop.py", "train") < 60
    assert _function_lines(REPO / "nodes" / "train_nodes.py", "train") < 60
