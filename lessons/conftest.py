"""How a lesson's tests find the code they grade.

Every lesson folder holds `exercise.py`: stubs with real signatures that raise
NotImplementedError until the learner fills them in. Its `REFERENCE` dict maps each exercise
name to the place in `minimind_v` that implements the same thing, e.g.
`{"rms_norm": "minimind_v.norm:rms_norm"}`.

Tests never import either directly; they take the `ex` fixture and call `ex.rms_norm(...)`:
- `pytest lessons/02-rmsnorm`              grades the learner's exercise.py;
- `pytest lessons/02-rmsnorm --reference`  grades minimind_v (the same tests must pass there).

Two more modes, chosen by the environment variable MINIMIND_V_GRADE, are used by tools:
- `each`: every test runs once per exercise it calls (`ex.NAME` in its source), against the
  reference with only that one exercise taken from exercise.py. A failure then belongs to that
  exercise alone (`minimind-v lessons` and learner mode grade this way); MINIMIND_V_GRADE_ONLY
  (comma-separated names) limits the run to those exercises.
- `mutants:PATH`: PATH is a Python file with a list `MUTANTS` of objects with `.lesson` (folder
  name), `.name` (exercise name), `.id` and `.obj`; every test runs against the reference and
  against the reference with each mutant of a name it calls in place of that name
  (tests/test_lesson_mutations.py proves that every mutant fails some test).
Each run records which exercise or mutant it used as a junit property ("exercise" / "mutant").
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import re
import sys
import types
from pathlib import Path

import pytest


def load_exercise(lesson_dir: Path) -> types.ModuleType:
    """Import `lesson_dir/exercise.py` under a unique name (lesson folders are not packages)."""
    path = lesson_dir / "exercise.py"
    name = "lesson_exercise_" + lesson_dir.name.replace("-", "_")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def resolve(target: str):
    """'package.module:attr' -> the object."""
    module_name, _, attr = target.partition(":")
    obj = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def reference_mapping(exercise: types.ModuleType) -> dict:
    mapping = getattr(exercise, "REFERENCE", None)
    if not mapping:
        raise RuntimeError(f"{exercise.__file__} has no REFERENCE mapping to minimind_v")
    return mapping


def reference_namespace(exercise: types.ModuleType) -> types.SimpleNamespace:
    return types.SimpleNamespace(**{name: resolve(target) for name, target in reference_mapping(exercise).items()})


# ------------------------------------------------------------------------------ grading modes
_MUTANTS: dict = {}


def _mutants(path: str) -> list:
    if path not in _MUTANTS:
        spec = importlib.util.spec_from_file_location("lesson_mutants", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module              # dataclasses look their module up there
        spec.loader.exec_module(module)
        _MUTANTS[path] = list(module.MUTANTS)
    return _MUTANTS[path]


def names_called(func, names) -> list[str]:
    """The exercise names a test function calls as `ex.NAME` (in the order of `names`)."""
    source = inspect.getsource(func)
    return [n for n in names if re.search(rf"\bex\.{re.escape(n)}\b", source)]


def pytest_generate_tests(metafunc):
    mode = os.environ.get("MINIMIND_V_GRADE", "")
    if "ex" not in metafunc.fixturenames or not mode:
        return
    lesson_dir = Path(metafunc.definition.path).parent
    names = list(reference_mapping(load_exercise(lesson_dir)))
    called = names_called(metafunc.function, names)
    if mode == "each":
        params = [("exercise", n) for n in called] or [("exercise", "*")]
        only = os.environ.get("MINIMIND_V_GRADE_ONLY")
        if only:                                    # grade only these (the others are still stubs)
            keep = set(only.split(",")) | {"*"}
            params = [p for p in params if p[1] in keep]
    elif mode.startswith("mutants:"):
        params = [("mutant", "reference")] + [
            ("mutant", m.id) for m in _mutants(mode[len("mutants:"):])
            if m.lesson == lesson_dir.name and m.name in called]
    else:
        raise pytest.UsageError(f"MINIMIND_V_GRADE must be 'each' or 'mutants:PATH', got {mode!r}")
    metafunc.parametrize("ex", params, indirect=True, ids=[p[1] for p in params])


@pytest.fixture(autouse=True)
def _seeded():
    """Every lesson test starts from the same random state: no test depends on luck."""
    import torch
    torch.manual_seed(0)


@pytest.fixture
def ex(request):
    """The implementation under test: the lesson's exercise.py, or minimind_v with --reference
    (or, in the MINIMIND_V_GRADE modes, the reference with one name replaced)."""
    lesson_dir = Path(str(request.node.fspath)).parent
    exercise = load_exercise(lesson_dir)
    param = getattr(request, "param", None)
    if param is None:
        if request.config.getoption("--reference", default=False):
            return reference_namespace(exercise)
        return exercise
    kind, which = param
    request.node.user_properties.append((kind, which))
    if kind == "exercise" and which == "*":
        return exercise
    ns = reference_namespace(exercise)
    if kind == "exercise":
        setattr(ns, which, getattr(exercise, which))
    elif which != "reference":
        mutant = next(m for m in _mutants(os.environ["MINIMIND_V_GRADE"][len("mutants:"):]) if m.id == which)
        setattr(ns, mutant.name, mutant.obj)
    return ns
