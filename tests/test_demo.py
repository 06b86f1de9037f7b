"""The demo's quick mode runs the whole pipeline, and the checkpoint it writes chats correctly."""
from __future__ import annotations

import json

import pytest
import torch

from minimind_v.chat import cli_chat, load_chat_model, load_pixels, prompt_ids, user_message
from minimind_v.demo import cli
from minimind_v.generate import generate



def test_quick_demo_end_to_end_and_its_checkpoint_chats(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli(["--quick", "--out", str(out)]) == 0
    log = capsys.readouterr().out
    for stage_line in ("[1/5]", "[2/5]", "[3/5] pretrain", "[4/5] sft", "[5/5] held-out exact match"):
        assert stage_line in log
    # the vision-reliance controls, the image gain first
    gain = log.index("image gain (real - blank):")
    assert gain < log.index("qtype ") < log.index("baselines from the training split") < log.index("the words alone")
    for control in ("blank", "shuffled", "none", "majority", "question"):
        assert control in log[gain:]
    report = (out / "sft" / "report.md").read_text()
    assert "pretrain" in report and "Throughput and MFU" in report and "report/attention_0.png" in report
    for f in ("data/sft_test.jsonl", "pretrain/model.pt", "pretrain/loss.png", "sft/model.pt", "sft/config.json",
              "sft/tokenizer.model", "sft/metrics.jsonl", "sft/loss.png", "answers.png", "sft/report/loss.png",
              "sft/report/accuracy.png", "sft/report/answers.png"):
        assert (out / f).is_file(), f
    losses = [json.loads(x)["loss"] for x in (out / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 12 and losses[-1] < losses[0]            # it learns something even in seconds
    from PIL import Image
    assert Image.open(out / "answers.png").size[0] == 4 * 144

    # the SFT checkpoint chats: streamed text == generate() on the same prompt and picture
    model, tok, info = load_chat_model(out / "sft")
    assert info["stage"] == "sft"
    rec = json.loads((out / "data" / "sft_test.jsonl").read_text(encoding="utf-8").splitlines()[0])
    image = out / "data" / "images" / rec["image"]
    question = rec["conversations"][0]["content"]                  # already ends with <image>
    assert cli_chat(["--checkpoint", str(out / "sft"), "--image", str(image), "--max-new-tokens", "8",
                     question]) == 0
    printed = capsys.readouterr().out
    ids = torch.tensor([prompt_ids(tok, [user_message(question, 1)], model.cfg.num_patches)])
    new = generate(model, ids, 8, eos_id=tok.eos_id, images=load_pixels([image], 48)[None])[0, ids.shape[1]:].tolist()
    new = new[:new.index(tok.eos_id)] if tok.eos_id in new else new
    assert printed == tok.decode(new) + "\n"


def test_fast_sft_uses_bf16_only_where_the_cpu_has_it():
    from minimind_v.demo import fast_sft
    assert fast_sft(True) == {"compile": True, "dtype": "bf16"}
    assert fast_sft(False) == {"compile": True, "dtype": "fp32"}     # AVX2 emulates bf16, ~40x slower


def test_fast_demo_trains_sft_with_a_compiled_step(tmp_path, capsys):
    """--fast reaches train() as compile for SFT only, on two threads, in bf16 only where this CPU has
    native bf16; it runs end to end."""
    from minimind_v.checkpoint import load_state_dict
    from minimind_v.train import native_bf16

    native = native_bf16("cpu")
    threads = torch.get_num_threads()
    try:
        assert cli(["--quick", "--fast", "--out", str(tmp_path / "demo")]) == 0
        assert torch.get_num_threads() == 2
    except Exception as e:                                  # no C++ toolchain for inductor: say so, skip
        if "compile" in type(e).__name__.lower() or "inductor" in str(e).lower():
            pytest.skip(f"torch.compile cannot build here: {e}")
        raise
    finally:
        torch.set_num_threads(threads)
    assert "held-out exact match" in capsys.readouterr().out
    saved = {stage: load_state_dict(tmp_path / "demo" / stage / "checkpoint.pt")["train_config"]
             for stage in ("pretrain", "sft")}
    assert (saved["sft"]["dtype"], saved["sft"]["compile"]) == ("bf16" if native else "fp32", True)
    assert (saved["pretrain"]["dtype"], saved["pretrain"]["compile"]) == ("fp32", False)


def test_the_full_demo_trains_with_its_recipe_on_two_threads(tmp_path, monkeypatch):
    """Every stage of the full demo gets the recipe's settings (its seven seeds were measured so),
    and the command runs on two threads."""
    from minimind_v import demo
    from minimind_v.recipes import RECIPES

    seen = {}
    real_train = demo.train

    def spy(model, dataset, collate, tcfg, out, log=print):
        seen[tcfg.stage] = tcfg
        return real_train(model, dataset, collate, tcfg, out, log=log)

    monkeypatch.setattr(demo, "train", spy)
    monkeypatch.setattr(demo, "FULL", dict(demo.FULL, n_train=64, n_test=8))      # the full settings, few pictures
    threads = torch.get_num_threads()
    try:
        demo.run(tmp_path / "d", seed=0, threads=1, sft_steps=2, pretrain_steps=2, log=lambda m: None)
    finally:
        torch.set_num_threads(threads)
    for stage, given in RECIPES["from-scratch-small"].stages.items():
        for key, value in given.items():
            if key not in ("max_steps", "epochs"):
                assert getattr(seen[stage], key) == value, (stage, key)
    # the demo's own SFT step count (FULL) applies when none is given, an explicit one wins over it
    assert demo.FULL["sft_steps"] == 3500 and demo.FAST["sft_steps"] == demo.FULL["sft_steps"]
    monkeypatch.setattr(demo, "FULL", dict(demo.FULL, n_train=64, n_test=8, sft_steps=3))
    try:
        demo.run(tmp_path / "d3", seed=0, threads=1, pretrain_steps=2, log=lambda m: None)
    finally:
        torch.set_num_threads(threads)
    assert seen["sft"].max_steps == 3

    calls = []
    monkeypatch.setattr(demo, "run", lambda out, seed, quick, threads, **kw: calls.append(threads))
    assert demo.cli(["--out", str(tmp_path / "e")]) == 0 and calls == [2]
