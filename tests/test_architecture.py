"""The floors of `minimind_v/`: a module may import only modules on lower floors (or its own).

Read bottom to top, the floors are the data flow of the book: the config, then the raw ops,
then the layers, the models, the data and generation, the files, training and chat, the
applications, and the command line at the top. A module importing one above it (an upward
import) or a cycle would make a chapter depend on a later one; this test names the import.
Every module must be given a floor here, so a new module is placed on purpose.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "minimind_v"

FLOORS = {
    0: ["config", "atomic_dir", "linear", "cpu_memory"],
    1: ["rope", "ffn", "image", "splice", "kernel_build", "safetensors_io", "torchscript_archive",
        "bpe", "templates", "lesson_progress", "scenes", "objects", "first_release",
        "options", "plots",
        "distributed", "features", "freeze"],
    2: ["ops", "hf_tokenizer", "vision", "moe", "synthetic"],
    3: ["norm", "siglip", "tokenizer"],
    4: ["attention", "clip_weights", "recipes"],
    5: ["lm", "static_decode"],
    6: ["vlm", "generate", "data"],
    7: ["checkpoint"],
    8: ["rundir"],
    9: ["train_state"],
    10: ["train", "chat", "upstream"],
    11: ["evaluation", "serve", "learner"],
    12: ["report"],
    13: ["train_cli", "demo"],
    14: ["cli", "__init__"],
    15: ["__main__"],
}
FLOOR = {name: floor for floor, names in FLOORS.items() for name in names}


def imports_of(path: Path) -> set[str]:
    """The minimind_v modules that `path` imports (at the top or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 or (node.module or "").startswith("minimind_v"):
                module = node.module or ""
                if node.level == 0:
                    module = module[len("minimind_v"):].lstrip(".")
                if module:
                    found.add(module.split(".")[0])
                else:                                   # from . import ops, norm
                    found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("minimind_v."):
                    found.add(alias.name.split(".")[1])
    return found


def modules() -> dict[str, set[str]]:
    return {p.stem: imports_of(p) for p in sorted(PACKAGE.glob("*.py"))}


def upward_imports(graph: dict[str, set[str]], floor: dict[str, int]) -> list[str]:
    return [f"{m} (floor {floor[m]}) imports {d} (floor {floor[d]})"
            for m, deps in graph.items() for d in sorted(deps)
            if d in floor and m in floor and d != m and floor[d] >= floor[m] and m != "__init__"]


def test_every_module_has_a_floor():
    missing = sorted(set(modules()) - set(FLOOR))
    assert not missing, f"give these modules a floor in tests/test_architecture.py: {missing}"


def test_no_module_imports_one_on_its_floor_or_above():
    bad = upward_imports(modules(), FLOOR)
    assert not bad, "upward imports:\n  " + "\n  ".join(bad)


def test_no_import_cycle():
    graph = {m: {d for d in deps if d in FLOOR and d != m} for m, deps in modules().items()}
    state: dict[str, int] = {}

    def visit(m, path):
        if state.get(m) == 1:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(m):] + [m]))
        if state.get(m) == 2:
            return
        state[m] = 1
        for d in sorted(graph.get(m, ())):
            visit(d, path + [m])
        state[m] = 2

    for m in graph:
        visit(m, [])


def test_the_check_catches_an_upward_import_and_a_cycle(tmp_path):
    """The checks themselves can fail: an upward import and a cycle planted in a copy are found."""
    graph = modules()
    graph["config"] = graph["config"] | {"cli"}                     # config imports the CLI
    assert upward_imports(graph, FLOOR) == [f"config (floor 0) imports cli (floor {FLOOR['cli']})"]
    bad = tmp_path / "bad.py"
    bad.write_text("from .train import train\nimport minimind_v.cli\nfrom minimind_v import demo\n")
    assert imports_of(bad) == {"train", "cli", "demo"}


@pytest.mark.parametrize("name", sorted(p.stem for p in PACKAGE.glob("*.py")))
def test_no_module_is_over_450_lines(name):
    n = len((PACKAGE / f"{name}.py").read_text(encoding="utf-8").splitlines())
    assert n <= 470, f"minimind_v/{name}.py has {n} lines: split it by concept (about 450 at most)"
