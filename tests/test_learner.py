"""Learner mode and `minimind-v lessons`, on a copy of lessons/ in a temporary folder.

- Untouched stubs: every exercise is "not started", nothing is swapped, the reference runs.
- Correct solutions (the reference's own code, copied into the exercise files with a call counter
  per exercise): they grade as passing, learner mode swaps them in, the learner's functions are
  really called while the quick demo trains, and the losses equal the reference run's.
"""
from __future__ import annotations

import ast
import inspect
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minimind_v import attention, demo, ffn, image, learner, lesson_progress, lm, norm, rope, splice, vision, vlm

ROOT = Path(__file__).resolve().parents[1]

COUNTER = '''
import collections as _collections
import functools as _functools

CALLS = _collections.Counter()


def _count(name):
    """Count the calls of an exercise (of its forward/update for a class): proof that it runs."""
    obj = globals()[name]

    def wrap(f):
        @_functools.wraps(f)
        def counted(*args, **kwargs):
            CALLS[name] += 1
            return f(*args, **kwargs)
        return counted
    if isinstance(obj, type):
        for method in ("forward", "update"):
            if method in vars(obj):
                setattr(obj, method, wrap(vars(obj)[method]))
    else:
        globals()[name] = wrap(obj)


for _name in REFERENCE:
    if _name in globals():
        _count(_name)
'''

HEADER = '''from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from minimind_v.linear import Linear, shared_input_linear
'''

RMSNORM_CLASS = '''


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)
'''

VISION_CLASSES = '''
class VisionAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.hidden_size // cfg.num_heads
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.out = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x, need_weights=False):
        B, T, D = x.shape
        q, k, v = self.qkv(x).reshape(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        out, probs = attention(q, k, v, need_weights)
        return self.out(out.transpose(1, 2).reshape(B, T, D)), probs


class VisionMLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x):
        return self.fc2(quick_gelu(self.fc1(x)))


class VisionBlock(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attn = VisionAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = VisionMLP(cfg)

    def forward(self, x, need_weights=False):
        a, probs = self.attn(self.ln_1(x), need_weights)
        x = x + a
        return x + self.mlp(self.ln_2(x)), probs


from minimind_v.image import preprocess as _preprocess


def preprocess(image, size=224):
    return _preprocess(image, size)
'''


def src(*objs) -> str:
    return "\n\n".join(inspect.getsource(o) for o in objs)


SOLUTIONS = {
    "02-rmsnorm": src(norm._acc_dtype, norm.rms_norm_forward, norm.rms_norm) + RMSNORM_CLASS,
    "03-rope": src(rope.rope_tables, rope.rotate_half, rope.apply_rope),
    "04-attention": src(attention.repeat_kv, attention.causal_mask, attention.attend, attention.KVCache),
    "05-transformer": "from minimind_v.attention import Attention\nfrom minimind_v.config import LMConfig\n"
                      "from minimind_v.lm import cross_entropy\nfrom minimind_v.norm import RMSNorm\n\n"
                      + src(ffn.SwiGLU, lm.Block, lm.next_token_targets, lm.lm_loss),
    "07-vision-transformer": src(vision.quick_gelu, vision.patchify, vision.attention) + VISION_CLASSES,
    "08-projector-and-splice": "from minimind_v.splice import check_splice_args\n\n"
                               + src(vlm.VisionProjector, splice.find_matches, splice.splice_loop,
                                     splice.select_runs, splice.image_starts, splice.splice)
                               + "\n\ndef runs_of_one_id(input_ids, pad_id, L):\n"
                                 "    return select_runs(find_matches(input_ids, [pad_id] * L), L)\n",
}
NOT_CALLED_BY_THE_DEMO = {("05-transformer", "MiniMindLM"), ("08-projector-and-splice", "splice_loop")}


def reference_line(lesson: Path) -> str:
    tree = ast.parse((lesson / "exercise.py").read_text())
    node = next(n for n in tree.body if isinstance(n, ast.Assign) and n.targets[0].id == "REFERENCE")
    return ast.get_source_segment((lesson / "exercise.py").read_text(), node)


@pytest.fixture
def lessons(tmp_path, monkeypatch):
    """A copy of lessons/ (stubs untouched), an empty grading cache, no learner mode left behind."""
    root = tmp_path / "lessons"
    shutil.copytree(ROOT / "lessons", root, ignore=shutil.ignore_patterns("__pycache__", "*.md"))
    from minimind_v import kernel_build
    monkeypatch.setenv("MINIMIND_V_KERNEL_CACHE", str(kernel_build._cache_root()))   # built kernels: reused
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    learner.deactivate()
    yield root
    learner.deactivate()


def write_solutions(root: Path) -> None:
    for lesson, body in SOLUTIONS.items():
        path = root / lesson / "exercise.py"
        path.write_text(HEADER + "\n" + reference_line(root / lesson) + "\n\n\n" + body + "\n" + COUNTER)


def quick_demo(out: Path) -> dict:
    n = torch.get_num_threads()
    try:
        return demo.run(out, quick=True, threads=1, log=lambda m: None)
    finally:
        torch.set_num_threads(n)


def test_fresh_stubs_are_not_started_and_the_reference_runs(lessons, capsys):
    originals = (norm.rms_norm, vlm.splice, attention.Attention.forward, lm.RMSNorm)
    state = learner.activate(lessons)
    table = capsys.readouterr().out
    assert state.rows and all(whose == "reference" and why == "not started" for _, whose, why in state.rows), table
    assert "02 rms_norm" in table and "not started" in table
    assert not state.patches
    assert (norm.rms_norm, vlm.splice, attention.Attention.forward, lm.RMSNorm) == originals
    progress = lesson_progress.format_progress(lesson_progress.grade_all(lessons), lessons)
    assert "0/2 passing" in progress and "next: write `" in progress and "passing  " not in progress


def test_solutions_are_used_and_train_the_demo_to_the_same_losses(lessons, tmp_path, capsys):
    reference = quick_demo(tmp_path / "reference")
    write_solutions(lessons)
    originals = {site: getattr(*learner._locate(site)) for sites in learner.CALL_SITES.values() for site in sites}
    state = learner.activate(lessons)
    table = capsys.readouterr().out
    rows = {c: (w, why) for c, w, why in state.rows}
    for lesson in SOLUTIONS:
        for name in lesson_progress.read_exercise(lessons / lesson / "exercise.py")[0]:
            if (lesson, name) in NOT_CALLED_BY_THE_DEMO or not hasattr(state.modules[lesson], name):
                continue
            assert rows[f"{lesson[:2]} {name}"][0] == "yours", table
    assert rows["03 rope_tables"] == ("yours", "passing")
    assert rows["06 next_token"] == ("reference", "not started")
    assert "your 08 splice" in rows["08 splice_loop"][1]
    assert norm.rms_norm is state.modules["02-rmsnorm"].rms_norm
    assert vlm.splice is state.modules["08-projector-and-splice"].splice
    assert attention.Attention.forward is learner.plain_attention_forward

    for module in state.modules.values():
        module.CALLS.clear()
    mine = quick_demo(tmp_path / "mine")
    calls = {(lesson, n): state.modules[lesson].CALLS[n] for lesson in SOLUTIONS
             for n in lesson_progress.read_exercise(lessons / lesson / "exercise.py")[0]}
    uncalled = [k for k, v in calls.items() if v == 0 and k not in NOT_CALLED_BY_THE_DEMO]
    assert not uncalled, f"learner mode did not call these exercises: {uncalled}"
    for stage in ("pretrain", "sft"):
        torch.testing.assert_close(torch.tensor(mine["losses"][stage]), torch.tensor(reference["losses"][stage]),
                                   rtol=1e-4, atol=1e-5, msg=f"{stage} losses differ")

    # the reference comes back everywhere, and a second activation is served from the cache
    learner.deactivate()
    assert all(getattr(*learner._locate(site)) is obj for site, obj in originals.items())
    assert attention.Attention.forward is not learner.plain_attention_forward
    again = learner.activate(lessons, log=lambda m: None)
    assert again.from_cache and again.rows == state.rows


def test_failing_and_mismatched_exercises_fall_back_with_the_reason(lessons, capsys):
    two = lessons / "02-rmsnorm" / "exercise.py"          # rms_norm forgets eps
    two.write_text(two.read_text().replace('''    back to x.dtype, then multiplied by weight.
    """
    raise NotImplementedError''', '''    back to x.dtype, then multiplied by weight.
    """
    return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True)).to(x.dtype) * weight'''))
    four = lessons / "04-attention" / "exercise.py"       # causal_mask passes its tests, without `device`
    four.write_text(four.read_text().replace('''def causal_mask(T: int, S: int, device=None) -> torch.Tensor:
    """(T, S) bool: True where query i (absolute position S - T + i) may attend to key j (j <= S - T + i)."""
    raise NotImplementedError''', '''def causal_mask(T: int, S: int) -> torch.Tensor:
    return torch.ones(T, S, dtype=torch.bool).tril(diagonal=S - T)'''))
    original = (norm.rms_norm, attention.causal_mask)
    state = learner.activate(lessons)
    rows = {c: (w, why) for c, w, why in state.rows}
    whose, why = rows["02 rms_norm"]
    assert whose == "reference" and why.startswith("failing: test_"), why
    whose, why = rows["04 causal_mask"]
    assert whose == "reference" and "the model calls causal_mask(T, S, device), yours takes (T, S)" in why, why
    assert (norm.rms_norm, attention.causal_mask) == original
    assert lesson_progress.grade(lessons / "04-attention")[0][1].status == "passing"


def test_cli_learner_flag_and_lessons_check(lessons, monkeypatch, capsys):
    from minimind_v.cli import main
    monkeypatch.setenv("MINIMIND_V_LESSONS", str(lessons))
    assert main(["lessons", "--learner"]) == 0
    out = capsys.readouterr().out
    assert "learner mode:" in out and "next: write `" in out
    assert learner.active() is not None
    learner.deactivate()
    assert main(["lessons", "check", "04"]) == 1
    out = capsys.readouterr().out
    assert "KVCache: not started" in out
    assert main(["lessons", "check", "99"]) == 2


def test_environment_variable_activates_on_import_and_costs_nothing_unset(lessons):
    env = dict(os.environ, MINIMIND_V_LESSONS=str(lessons), PYTHONPATH=str(ROOT))
    env.pop("MINIMIND_V_LEARNER", None)
    code = "import sys, minimind_v; print('torch' in sys.modules, 'minimind_v.learner' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.split() == ["False", "False"], out.stderr
    env["MINIMIND_V_LEARNER"] = "1"
    code = "import minimind_v.learner as l; print(l.active() is not None)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT)
    assert "learner mode:" in out.stdout and out.stdout.strip().endswith("True"), out.stdout + out.stderr
