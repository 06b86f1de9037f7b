"""How a lesson's tests find the code they grade.

Every lesson folder holds `exercise.py`: stubs with real signatures that raise
NotImplementedError until the learner fills them in. Its `REFERENCE` dict maps each exercise
name to the place in `minimind_v` that implements the same thing, e.g.
`{"rms_norm": "minimind_v.norm:rms_norm"}`.

Tests never import either directly; they take the `ex` fixture and call `ex.rms_norm(...)`:
- `pytest lessons/02-rmsnorm`              grades the learner's exercise.py;
- `pytest lessons/02-rmsnorm --reference`  grades minimind_v (the same tests must pass there).
"""
from __future__ import annotations

import importlib
import importlib.util
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


def reference_namespace(exercise: types.ModuleType) -> types.SimpleNamespace:
    mapping = getattr(exercise, "REFERENCE", None)
    if not mapping:
        raise RuntimeError(f"{exercise.__file__} has no REFERENCE mapping to minimind_v")
    return types.SimpleNamespace(**{name: resolve(target) for name, target in mapping.items()})


@pytest.fixture
def ex(request):
    """The implementation under test: the lesson's exercise.py, or minimind_v with --reference."""
    lesson_dir = Path(str(request.node.fspath)).parent
    exercise = load_exercise(lesson_dir)
    if request.config.getoption("--reference"):
        return reference_namespace(exercise)
    return exercise
