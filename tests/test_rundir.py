"""The run directory's promises: one run per directory, nothing overwritten or lost, exact resume.

Each case here broke once: two runs into one `--out` mixed their files, a finished run was
replaced without a word, `--resume` without a checkpoint started from scratch silently, and a
resumed run with the feature cache rebuilt the cache from an uninitialised encoder.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cli_run import run_cli
from minimind_v.rundir import CHECKPOINT, LOCK, METRICS, WEIGHTS, RunDirError, RunLock, read_metrics
from minimind_v.train import TrainConfig, TrainingError, train
from test_train import ToyTokens, collate, quiet, tiny_lm

ROOT = Path(__file__).resolve().parents[1]


def small(**over):
    return TrainConfig(**{**dict(stage="sft", epochs=2, lr=5e-3, batch_size=2, save_every=2, log_every=1000,
                                 seed=1), **over})


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_a_finished_run_is_not_overwritten_without_resume_or_overwrite(tmp_path):
    train(tiny_lm(), ToyTokens(n=8), collate, small(), tmp_path, log=quiet)
    before = snapshot(tmp_path)
    assert {WEIGHTS, CHECKPOINT, METRICS} <= before.keys()
    with pytest.raises(RunDirError, match=r"already holds a run.*--resume.*--overwrite"):
        train(tiny_lm(seed=5), ToyTokens(n=8), collate, small(), tmp_path, log=quiet)
    assert snapshot(tmp_path) == before                          # nothing lost, nothing changed
    logs = []
    train(tiny_lm(seed=5), ToyTokens(n=8), collate, small(overwrite=True), tmp_path, log=logs.append)
    assert any("--overwrite: removed" in m for m in logs)
    assert snapshot(tmp_path)[WEIGHTS] != before[WEIGHTS]


def test_resume_without_a_checkpoint_is_an_error(tmp_path):
    with pytest.raises(RunDirError, match=f"--resume: .* has no {CHECKPOINT}"):
        train(tiny_lm(), ToyTokens(n=8), collate, small(resume=True), tmp_path, log=quiet)
    assert not (tmp_path / METRICS).exists()


def test_a_second_run_into_a_directory_in_use_fails_at_once(tmp_path):
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / LOCK).write_text(json.dumps({"pid": other.pid, "host": os.uname().nodename,
                                                 "started": "2026-12-01 10:00:00"}))
        with pytest.raises(RunDirError, match=rf"in use by another run \(process {other.pid}"):
            train(tiny_lm(), ToyTokens(n=8), collate, small(), tmp_path, log=quiet)
        assert not (tmp_path / METRICS).exists() and (tmp_path / LOCK).exists()
    finally:
        other.kill()
        other.wait()
    # the same lock, its process now dead: reported, replaced, and released at the end
    logs = []
    train(tiny_lm(), ToyTokens(n=8), collate, small(), tmp_path, log=logs.append)
    assert any(f"stale lock of process {other.pid}" in m for m in logs)
    assert not (tmp_path / LOCK).exists()


def test_the_lock_is_reentrant_in_one_process_and_exclusive_across(tmp_path):
    with RunLock(tmp_path, quiet):
        with RunLock(tmp_path, quiet):                           # train() inside the CLI's lock
            pass
        assert (tmp_path / LOCK).exists()
        code = (f"from minimind_v.rundir import RunLock\n"
                f"with RunLock({str(tmp_path)!r}): pass\n")
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert proc.returncode != 0 and "in use by another run" in proc.stderr
    assert not (tmp_path / LOCK).exists()


def test_resume_may_change_the_learning_rate_and_says_so(tmp_path):
    train(tiny_lm(), ToyTokens(n=8), collate, small(stop_after=2, epochs=3), tmp_path, log=quiet)
    logs = []
    res = train(tiny_lm(), ToyTokens(n=8), collate, small(resume=True, epochs=3, lr=1e-3), tmp_path,
                log=logs.append)
    assert "resume: lr changed from 0.005 to 0.001" in logs
    assert res.steps[0] == 3 and all(r["lr"] <= 1e-3 for r in read_metrics(tmp_path / METRICS)[2:])
    with pytest.raises(TrainingError, match="batch_size=2.*batch_size=4"):
        train(tiny_lm(), ToyTokens(n=8), collate, small(resume=True, epochs=3, batch_size=4), tmp_path, log=quiet)


def test_half_written_metrics_line_and_leftover_temp_files_are_tolerated(tmp_path):
    train(tiny_lm(), ToyTokens(n=8), collate, small(stop_after=2, epochs=3), tmp_path, log=quiet)
    with open(tmp_path / METRICS, "a") as f:
        f.write('{"step": 3, "lo')                               # killed mid-write
    (tmp_path / f".{CHECKPOINT}.abc123.tmp").write_bytes(b"half a checkpoint")
    logs = []
    res = train(tiny_lm(), ToyTokens(n=8), collate, small(resume=True, epochs=3), tmp_path, log=logs.append)
    assert res.final_step == 12                                  # 8 samples / 2 = 4 steps an epoch, 3 epochs
    assert [r["step"] for r in read_metrics(tmp_path / METRICS)] == list(range(1, 13))
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))
    assert any("interrupted" in m for m in logs)


def test_a_nan_message_gives_advice_that_can_be_followed(tmp_path):
    from test_train import Poisoned
    with pytest.raises(TrainingError, match=r"--resume --lr X") as err:
        train(Poisoned(tiny_lm(), bad_call=4), ToyTokens(n=10), collate, small(epochs=5), tmp_path, log=quiet)
    assert "(step 2)" in str(err.value)
    healthy = Poisoned(tiny_lm(), bad_call=10 ** 9)               # the same model, no longer poisoned
    res = train(healthy, ToyTokens(n=10), collate, small(epochs=5, resume=True, lr=1e-3), tmp_path, log=quiet)
    assert res.steps[0] == 3 and all(map(torch.isfinite, map(torch.tensor, res.losses)))


@pytest.mark.parametrize("bad, expected", [(dict(lr=-1.0), "lr must be a finite number > 0"),
                                           (dict(batch_size=0), "batch_size must be >= 1"),
                                           (dict(min_lr_ratio=2.0), "min_lr_ratio must be between 0 and 1"),
                                           (dict(betas=(0.9, 1.5)), "betas must be two numbers"),
                                           (dict(grad_clip=float("nan")), "grad_clip must be")])
def test_numeric_settings_are_validated(bad, expected):
    with pytest.raises(ValueError, match=expected):
        TrainConfig(stage="sft", **bad)


# ----------------------------------------------------------------------------- through the CLI
@pytest.fixture(scope="module")
def cli_data(tmp_path_factory):
    from minimind_v.config import tiny_vlm
    from minimind_v.synthetic import answer_words, make_dataset
    from minimind_v.tokenizer import Tokenizer

    root = tmp_path_factory.mktemp("cli")
    data = make_dataset(root / "data", n_train=24, n_test=4, seed=4, image_size=48)
    tok = Tokenizer.train([data / "pretrain_train.jsonl", data / "sft_train.jsonl"], root / "tok" / "t",
                          vocab_size=1000, user_defined_symbols=answer_words())
    cfg = tiny_vlm(len(tok), tok.image_pad_id)
    (root / "model.json").write_text(json.dumps(cfg.to_dict()))
    return root, data, tok


def cli_args(root, data, tok, out, *extra):
    return ["--stage", "sft", "--data", str(data / "sft_train.jsonl"), "--images", str(data / "images"),
            "--tokenizer", str(tok.model_file), "--model-config", str(root / "model.json"), "--out", str(out),
            "--batch-size", "4", "--lr", "3e-3", "--epochs", "3", "--save-every", "2", "--log-every", "1000",
            "--feature-cache", *extra]


def test_cli_kill_and_resume_with_the_feature_cache_equals_an_uninterrupted_run(cli_data, tmp_path, capsys):
    """The resumed run rebuilds nothing from an untrained encoder: every loss is bitwise the same."""
    from minimind_v.train_cli import cli
    root, data, tok = cli_data
    torch.set_num_threads(1)
    assert cli(cli_args(root, data, tok, tmp_path / "full")) == 0
    full = [r["loss"] for r in read_metrics(tmp_path / "full" / METRICS)]
    out = tmp_path / "split"
    for stop in (3, 7, 12):                                      # stop (as if killed), resume, again and again
        extra = ["--stop-after", str(stop)] + (["--resume"] if stop != 3 else [])
        assert cli(cli_args(root, data, tok, out, *extra)) == 0
    assert cli(cli_args(root, data, tok, out, "--resume")) == 0
    split = [r["loss"] for r in read_metrics(out / METRICS)]
    assert len(full) == 18 and split == full


def test_cli_errors_are_one_message_without_a_traceback(cli_data, tmp_path):
    root, data, tok = cli_data
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"conversations": [{"role": "user", "content": "hi \xff"}]}\n')
    proc = run_cli("train", *cli_args(root, data, tok, tmp_path / "out")[:3], str(bad),
                   *cli_args(root, data, tok, tmp_path / "out")[4:])
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "bad.jsonl" in proc.stderr
    assert proc.stderr.startswith("minimind-v train: ")
    debug = run_cli("train", "--debug", *cli_args(root, data, tok, tmp_path / "out")[:3], str(bad),
                    *cli_args(root, data, tok, tmp_path / "out")[4:])
    assert debug.returncode == 2 and "Traceback" in debug.stderr
    missing = run_cli("chat", "--checkpoint", str(tmp_path / "nothing"), "hello")
    assert missing.returncode == 2 and "not a checkpoint directory" in missing.stderr
    assert "Traceback" not in missing.stderr
    resume = run_cli("train", *cli_args(root, data, tok, tmp_path / "fresh", "--resume"))
    assert resume.returncode == 2 and f"has no {CHECKPOINT}" in resume.stderr


def test_chat_refuses_bad_numbers_and_a_tokenizer_that_does_not_fit(cli_data, tmp_path):
    import shutil

    from minimind_v.config import tiny_vlm
    from minimind_v.rundir import load_chat_model, write_config
    from minimind_v.tokenizer import Tokenizer
    from minimind_v.vlm import MiniMindVLM
    root, data, tok = cli_data
    for flags, expected in ((["--temperature", "-1"], "--temperature must be >= 0"),
                            (["--top-p", "1.5"], "--top-p must be in (0, 1]"),
                            (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1")):
        proc = run_cli("chat", "--checkpoint", str(tmp_path), *flags, "hi")
        assert proc.returncode == 2 and expected in proc.stderr, proc.stderr
    # a checkpoint whose tokenizer was swapped for a bigger one: refused before the weights load
    small_tok = Tokenizer.train([data / "sft_train.jsonl"], tmp_path / "tok" / "s", vocab_size=400)
    cfg = tiny_vlm(len(small_tok), small_tok.image_pad_id)
    write_config(tmp_path / "ckpt", cfg, "sft", small_tok.model_file)
    torch.save(MiniMindVLM(cfg).state_dict(), tmp_path / "ckpt" / WEIGHTS)
    load_chat_model(tmp_path / "ckpt")                             # fits
    shutil.copyfile(tok.model_file, tmp_path / "ckpt" / "tokenizer.model")
    with pytest.raises(ValueError, match=rf"tokenizer has {len(tok)} pieces but the model's embedding has "
                                         rf"{len(small_tok)} rows"):
        load_chat_model(tmp_path / "ckpt")


def test_every_switch_can_be_turned_off_again():
    """A recipe may switch the feature cache on; `--no-feature-cache` must win over it (and be parsed)."""
    import argparse

    from minimind_v.options import add_config_options, config_from_args
    p = argparse.ArgumentParser()
    add_config_options(p, TrainConfig)
    assert p.parse_args([]).feature_cache is None                         # not given: the default or the recipe
    assert config_from_args(p.parse_args(["--stage", "sft", "--feature-cache"]), TrainConfig).feature_cache
    off = p.parse_args(["--stage", "sft", "--feature-cache", "--no-feature-cache"])
    assert off.feature_cache is False and config_from_args(off, TrainConfig).feature_cache is False
    assert config_from_args(p.parse_args(["--stage", "sft", "--no-plot"]), TrainConfig).plot is False
