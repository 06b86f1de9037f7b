"""The lesson mechanism itself: every lesson is complete, and no lesson test passes vacuously.

The lesson tests run against the reference in the main suite (`pytest --reference`). Here we
run them once more, in a subprocess, against the untouched `exercise.py` stubs: every single
one must fail, otherwise it would grade nothing.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LESSONS = sorted(p for p in (ROOT / "lessons").iterdir() if p.is_dir() and p.name[:2].isdigit())


def test_there_are_lessons():
    assert len(LESSONS) >= 1


@pytest.mark.parametrize("lesson", LESSONS, ids=lambda p: p.name)
def test_lesson_is_complete(lesson):
    assert (lesson / "README.md").is_file(), f"{lesson.name} has no README.md"
    exercise = (lesson / "exercise.py").read_text()
    assert "NotImplementedError" in exercise, f"{lesson.name}/exercise.py has no stubs"
    assert "REFERENCE" in exercise, f"{lesson.name}/exercise.py has no REFERENCE mapping"
    assert list(lesson.glob("test_*.py")), f"{lesson.name} has no tests"
    assert (ROOT / "notebooks" / f"{lesson.name}.ipynb").is_file(), f"no notebooks/{lesson.name}.ipynb"


def test_test_file_names_are_unique():
    names = [p.name for p in ROOT.glob("lessons/*/test_*.py")] + [p.name for p in ROOT.glob("tests/test_*.py")]
    dupes = sorted({n for n in names if names.count(n) > 1})
    assert not dupes, f"test file names must be unique across tests/ and lessons/: {dupes}"


def test_every_lesson_test_fails_on_the_stubs(tmp_path):
    report = tmp_path / "stubs.xml"
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "lessons", "-q", "-p", "no:cacheprovider",
         f"--junitxml={report}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert report.exists(), f"lesson run produced no report:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    cases = ET.parse(report).getroot().iter("testcase")
    passed, failed = [], []
    for case in cases:
        outcome = {child.tag for child in case}
        name = f"{case.get('classname')}::{case.get('name')}"
        if outcome & {"failure", "error"}:
            failed.append(name)
        elif "skipped" in outcome:
            passed.append(name + " (skipped)")
        else:
            passed.append(name)
    assert failed, "no lesson test ran against the stubs"
    assert not passed, "these lesson tests do not fail on the untouched stubs:\n" + "\n".join(passed)


@pytest.mark.parametrize("lesson", LESSONS, ids=lambda p: p.name)
def test_every_exercise_is_called_by_a_test(lesson):
    # `minimind-v lessons` grades an exercise by the tests that call `ex.NAME`: each needs one
    from minimind_v.lesson_progress import read_exercise
    mapping, _, error = read_exercise(lesson / "exercise.py")
    assert not error and mapping, f"{lesson.name}/exercise.py: {error or 'empty REFERENCE'}"
    tests = "\n".join(p.read_text(encoding="utf-8") for p in lesson.glob("test_*.py"))
    uncalled = [n for n in mapping if not re.search(rf"\bex\.{re.escape(n)}\b", tests)]
    assert not uncalled, f"{lesson.name}: no test calls ex.{', ex.'.join(uncalled)}"
