"""The house rules of minillm/, read from the source: imports point one way, and no module grows too large."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "minillm"

# Each folder (or top-level module) and the rooms it may import besides itself. Lower rooms never import
# higher ones: model and data know nothing of each other or of anything above them.
BASE = {"files", "device", "streams"}
MAY_IMPORT = {
    "files": set(),
    "device": set(),
    "streams": set(),
    "model": BASE,
    "data": BASE,
    "infer": BASE | {"model", "data"},
    "export": BASE | {"model", "data"},
    "eval": BASE | {"model", "data", "infer", "export"},
    "train": BASE | {"model", "data", "infer", "export", "eval"},
    "cli": BASE | {"model", "data", "infer", "eval", "export", "train"},
    "api": BASE | {"model", "data", "infer", "eval", "export", "train"},  # minillm/__init__.py, the stable names
}


def room(module: str) -> str:
    """The room of a dotted module name under minillm ('minillm.infer.server' -> 'infer'; the package -> 'api')."""
    parts = module.split(".")
    return "api" if len(parts) == 1 else parts[1]


def module_name(path: Path) -> str:
    """minillm/infer/server.py -> minillm.infer.server; minillm/model/__init__.py -> minillm.model."""
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import of minillm in a file, function-level imports included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}:{node.lineno}: relative import; write minillm.… in full"
            if node.module and node.module.split(".")[0] == "minillm":
                found += [(node.lineno, node.module)]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "minillm"]
    return found


def sources() -> list[Path]:
    """Every Python file of the package."""
    return sorted(PACKAGE.rglob("*.py"))


def test_every_module_lives_in_a_known_room():
    assert {room(module_name(p)) for p in sources()} == set(MAY_IMPORT)


def test_imports_point_one_way():
    wrong = []
    for path in sources():
        here = room(module_name(path))
        for line, target in imports(path):
            there = room(target)
            if there != here and there not in MAY_IMPORT[here]:
                wrong.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {here} imports {target} ({there})")
    assert wrong == []


def test_no_import_cycles_between_modules():
    graph = {module_name(p): {t for _, t in imports(p)} for p in sources()}
    graph = {m: {t for t in targets if t in graph and t != m} for m, targets in graph.items()}
    graph.pop("minillm")  # the package re-exports names of every room
    for m in graph:
        graph[m].discard("minillm")
    state: dict[str, int] = {}

    def visit(m: str, trail: list[str]) -> None:
        state[m] = 1
        for t in graph[m]:
            if state.get(t) == 1:
                raise AssertionError(" -> ".join([*trail, m, t]))
            if t not in state:
                visit(t, [*trail, m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])


def test_the_checks_catch_a_wrong_arrow(tmp_path, monkeypatch):
    """A model module that imports the trainer is reported (the check itself can fail)."""
    fake = tmp_path / "minillm"
    (fake / "model").mkdir(parents=True)
    (fake / "model" / "bad.py").write_text("from minillm.train.trainer import train\n", encoding="utf-8")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", fake)
    with pytest.raises(AssertionError, match=r"model/bad.py:1: model imports minillm.train.trainer"):
        test_imports_point_one_way()


@pytest.mark.parametrize("path", sources(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_is_over_400_lines(path):
    assert len(path.read_text(encoding="utf-8").splitlines()) <= 400
