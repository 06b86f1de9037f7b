"""Grading the learner's exercises: `minimind-v lessons` and the first half of learner mode.

Where it sits: beside the package, not in the model's data flow. A lesson folder
`lessons/NN-topic/` holds `exercise.py` (stubs the learner fills in, with a `REFERENCE` dict
naming the reference object each exercise re-implements) and the pytest tests that grade it.
This module tells, per exercise:
- "not started": its body is still `raise NotImplementedError` (read from the source, nothing runs);
- "passing" / "failing" with the first reason: the lesson's tests, run in a subprocess in the
  `MINIMIND_V_GRADE=each` mode of lessons/conftest.py, where each test runs against the reference
  with only that one exercise taken from the learner's file. A failure so belongs to the exercise
  under test alone, even when the test also calls other exercises.
Results are cached under $XDG_CACHE_HOME/minimind_v/learner (default ~/.cache/...), keyed by a hash
of the exercise file, the lesson's test files and the grading code: unchanged lessons cost nothing.
`minimind_v.learner` then builds the model from the exercises that pass.
"""
from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

GRADER_VERSION = "1"
PACKAGE_ROOT = Path(__file__).resolve().parent


@dataclass
class Exercise:
    lesson: str                          # folder name, e.g. "04-attention"
    name: str                            # e.g. "KVCache"
    target: str                          # its REFERENCE entry, e.g. "minimind_v.attention:KVCache"
    status: str = "not started"          # "passing" | "failing" | "not started" | "untested"
    reason: str = ""                     # for "failing": the first failing test and its message
    tests: list = field(default_factory=list)   # [(test id, outcome, message)]

    @property
    def label(self) -> str:
        return f"{self.lesson[:2]} {self.name}"


# ------------------------------------------------------------------------------ finding lessons
def lessons_dir(path=None) -> Path:
    """The lessons folder: `path`, else $MINIMIND_V_LESSONS, else the checkout's, else ./lessons."""
    for candidate in (path, os.environ.get("MINIMIND_V_LESSONS"), PACKAGE_ROOT.parent / "lessons", "lessons"):
        if candidate and Path(candidate).is_dir():
            return Path(candidate).resolve()
    raise FileNotFoundError("no lessons folder found: run from a checkout of the repository, "
                            "or pass --dir / set MINIMIND_V_LESSONS")


def find_lessons(root: Path, only: str | None = None) -> list[Path]:
    """Lesson folders `NN-*` in order; `only` = "04" or "04-attention" picks one."""
    lessons = sorted(p for p in Path(root).iterdir() if p.is_dir() and p.name[:2].isdigit()
                     and (p / "exercise.py").is_file())
    if only is not None:
        picked = [p for p in lessons if p.name == only or p.name[:2] == only.zfill(2)]
        if not picked:
            raise ValueError(f"no lesson {only!r} in {root} (there are: {', '.join(p.name[:2] for p in lessons)})")
        return picked
    return lessons


# ------------------------------------------------------------------------------ reading the source
def _is_stub(body: list) -> bool:
    """A body that is (docstring,) (super().__init__(),) raise NotImplementedError."""
    stmts = [s for s in body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant)
                                     and isinstance(s.value.value, str))]
    while stmts and isinstance(stmts[0], ast.Expr) and "super().__init__" in ast.unparse(stmts[0]):
        stmts = stmts[1:]
    if len(stmts) != 1 or not isinstance(stmts[0], ast.Raise) or stmts[0].exc is None:
        return False
    exc = stmts[0].exc.func if isinstance(stmts[0].exc, ast.Call) else stmts[0].exc
    return isinstance(exc, ast.Name) and exc.id == "NotImplementedError"


def read_exercise(path: Path) -> tuple[dict, dict, str]:
    """exercise.py -> (REFERENCE mapping, {name: stub description or ""}, syntax error or "").

    Nothing is executed: the mapping and the stubs are read from the syntax tree.
    """
    source = Path(path).read_text(encoding="utf-8")
    try:
        tree = ast.parse(source)
    except SyntaxError as e:
        mapping = dict(re.findall(r'"(\w+)":\s*"(minimind_v[\w.:]+)"', source))
        return mapping, {}, f"exercise.py line {e.lineno}: syntax error: {e.msg}"
    mapping, stubs, defined = {}, {}, set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defined.add(node.name)
        elif isinstance(node, ast.Assign):
            defined |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            defined |= {(a.asname or a.name).split(".")[0] for a in node.names}
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "REFERENCE" for t in node.targets):
            mapping = ast.literal_eval(node.value)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and _is_stub(node.body):
            stubs[node.name] = "still raises NotImplementedError"
        if isinstance(node, ast.ClassDef):
            left = [f.name for f in node.body if isinstance(f, ast.FunctionDef) and _is_stub(f.body)]
            if left:
                stubs[node.name] = ", ".join(left) + (" still raise" if len(left) > 1 else " still raises") \
                    + " NotImplementedError"
    for name in mapping:
        if name not in defined:
            stubs[name] = "not defined in exercise.py"
    return mapping, stubs, ""


# ------------------------------------------------------------------------------ running the tests
def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "minimind_v" / "learner"


def _key(lesson: Path, names: list[str]) -> str:
    h = hashlib.sha256(f"{GRADER_VERSION} {sorted(names)}".encode())
    for f in [lesson / "exercise.py", *sorted(lesson.glob("test_*.py")), lesson.parent / "conftest.py",
              Path(__file__)]:
        if f.is_file():
            h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:24]


def _first_line(message: str) -> str:
    line = next((x for x in (message or "").splitlines() if x.strip()), "").strip()
    return re.sub(r"^(AssertionError|E\s+AssertionError):\s*", "", line)[:300]


def _parse_junit(path: Path) -> list[tuple[str, str, str, str]]:
    """-> [(exercise, test id, outcome, message)] from pytest's junit xml."""
    rows = []
    for case in ET.parse(path).getroot().iter("testcase"):
        props = {p.get("name"): p.get("value") for p in case.iter("property")}
        name = case.get("name", "")
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = "failed"
                message = _first_line(child.get("message", ""))
                line = re.search(r"exercise\.py:(\d+): NotImplementedError", child.text or "")
                if "NotImplementedError" in message or line:
                    message = "NotImplementedError" + (f" raised at exercise.py line {line.group(1)}" if line else "")
            elif child.tag == "skipped" and outcome == "passed":
                outcome, message = "skipped", _first_line(child.get("message", ""))
        rows.append((props.get("exercise", ""), name, outcome, message))
    return rows


def _drop_param(test: str, name: str) -> str:
    """'test_x[attend]' -> 'test_x', 'test_y[attend-3]' -> 'test_y[3]' (the grading mode's own id)."""
    test = re.sub(rf"\[{name}\]$", "", test)
    return re.sub(rf"(?<=[\[-]){name}-|-{name}(?=\])", "", test)


def run_tests(lesson: Path, names: list[str], timeout: int = 900) -> list:
    """Run the lesson's tests for `names` (each against the reference + that one exercise)."""
    env = dict(os.environ, MINIMIND_V_GRADE="each", MINIMIND_V_GRADE_ONLY=",".join(names),
               MINIMIND_V_LEARNER="0", PYTHONDONTWRITEBYTECODE="1")
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONPATH"] = os.pathsep.join([str(PACKAGE_ROOT.parent)] + [p for p in [env.get("PYTHONPATH")] if p])
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.xml"
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", str(lesson), "-q", "-p", "no:cacheprovider", "-o", "addopts=",
             f"--junitxml={report}", f"--rootdir={lesson.parent}"],
            cwd=lesson.parent, env=env, capture_output=True, text=True, timeout=timeout)
        if not report.exists():
            tail = (proc.stdout + proc.stderr).strip().splitlines()[-5:]
            return [("*", "(collection)", "failed", " / ".join(tail) or f"pytest exit status {proc.returncode}")]
        return _parse_junit(report)


def grade(lesson: Path, use_cache: bool = True) -> tuple[list[Exercise], bool]:
    """-> (one Exercise per REFERENCE entry, whether the result came from the cache)."""
    lesson = Path(lesson)
    mapping, stubs, error = read_exercise(lesson / "exercise.py")
    exercises = [Exercise(lesson.name, n, t) for n, t in mapping.items()]
    started = [e.name for e in exercises if e.name not in stubs]
    if error:
        for e in exercises:
            e.status, e.reason = "failing", error
        return exercises, False
    for e in exercises:
        if e.name in stubs:
            e.status, e.reason = "not started", f"not started ({stubs[e.name]})"
    if not started:
        return exercises, True
    cached = cache_dir() / f"{lesson.name}-{_key(lesson, started)}.json"
    from_cache = use_cache and cached.is_file()
    if from_cache:
        rows = [tuple(r) for r in json.loads(cached.read_text())]
    else:
        rows = run_tests(lesson, started)
        if not any(r[0] == "*" and r[1] == "(collection)" for r in rows):
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = cached.with_suffix(".tmp")
            tmp.write_text(json.dumps(rows))
            os.replace(tmp, cached)
    for e in exercises:
        if e.name not in started:
            continue
        e.tests = [(_drop_param(t, e.name), o, m) for who, t, o, m in rows if who in (e.name, "*")]
        failed = [(t, m) for t, o, m in e.tests if o == "failed"]
        if failed:
            e.status, e.reason = "failing", f"{failed[0][0]}: {failed[0][1]}"
        elif not any(o == "passed" for _, o, _ in e.tests):
            e.status = "untested"
            e.reason = "its tests were skipped: " + e.tests[0][2] if e.tests else "no test calls it"
        else:
            e.status, e.reason = "passing", "passing"
    return exercises, from_cache


def grade_all(root: Path, use_cache: bool = True, only: str | None = None) -> dict[str, list[Exercise]]:
    return {lesson.name: grade(lesson, use_cache)[0] for lesson in find_lessons(root, only)}


# ------------------------------------------------------------------------------ `minimind-v lessons`
MARK = {"passing": "ok ", "failing": "XX ", "not started": " . ", "untested": " ? "}


def format_progress(results: dict[str, list[Exercise]], root: Path) -> str:
    lines = []
    for lesson, exercises in results.items():
        done = sum(e.status == "passing" for e in exercises)
        lines.append(f"{lesson:28s} {done}/{len(exercises)} passing")
        for e in exercises:
            why = "" if e.status == "passing" else "  " + (e.reason if e.status != "not started" else "")
            lines.append(f"   {MARK[e.status]} {e.name:26s} {e.status}{why}".rstrip())
    todo = [(lesson, e) for lesson, ex in results.items() for e in ex if e.status != "passing"]
    if todo:
        lesson, e = next(((ls, e) for ls, e in todo if e.status == "failing"), todo[0])
        verb = "fix" if e.status == "failing" else "write"
        lines += ["", f"next: {verb} `{e.name}` in {root / lesson / 'exercise.py'} "
                      f"(lessons/{lesson}/README.md explains it), then `minimind-v lessons check {lesson[:2]}`"]
    else:
        lines += ["", "every exercise passes: `minimind-v demo --learner` trains the demo on your code"]
    return "\n".join(lines)


def format_check(lesson: str, exercises: list[Exercise]) -> str:
    lines = [f"lesson {lesson}: each exercise graded against the reference for the rest of the lesson"]
    for e in exercises:
        lines.append(f"\n{MARK[e.status]} {e.name}: {e.status}")
        if e.status == "not started":
            lines.append(f"     {e.reason}")
        for test, outcome, message in e.tests:
            if outcome == "failed":
                lines.append(f"     FAIL {test}\n          {message}")
            elif outcome == "skipped":
                lines.append(f"     skip {test}: {message}")
            else:
                lines.append(f"     pass {test}")
    return "\n".join(lines)


def cli(argv: list[str]) -> int:
    """`minimind-v lessons [check NN] [--dir DIR] [--no-cache]`"""
    p = argparse.ArgumentParser(prog="minimind-v lessons",
                                description="your progress through lessons/: which exercises pass, which fail and why")
    p.add_argument("action", nargs="?", choices=["check"], help="check NN: grade one lesson and show every test")
    p.add_argument("lesson", nargs="?", help="lesson number or folder name (with `check`)")
    p.add_argument("--dir", help="the lessons folder (default: the checkout's lessons/)")
    p.add_argument("--no-cache", action="store_true", help="grade again even if nothing changed")
    a = p.parse_args(argv)
    root = lessons_dir(a.dir)
    if a.action == "check":
        if not a.lesson:
            raise ValueError("`minimind-v lessons check` needs a lesson number, e.g. `minimind-v lessons check 04`")
        (lesson,) = find_lessons(root, a.lesson)
        exercises, _ = grade(lesson, use_cache=not a.no_cache)
        print(format_check(lesson.name, exercises))
        return 0 if all(e.status == "passing" for e in exercises) else 1
    print(format_progress(grade_all(root, use_cache=not a.no_cache), root))
    return 0
