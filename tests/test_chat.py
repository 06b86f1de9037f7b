"""Chat and eval on a checkpoint directory: the streamed text is exactly what generate() produces,
and batched evaluation gives the same predictions as answering one record at a time."""
from __future__ import annotations

import io
import json

import pytest
import torch

from minimind_v.chat import cli_chat, evaluate, load_chat_model, load_pixels, prompt_ids, reply, \
    user_message
from minimind_v.evaluation import cli as cli_eval
from minimind_v.checkpoint import atomic_save
from minimind_v.config import tiny_vlm
from minimind_v.generate import generate
from minimind_v.synthetic import answer_words, make_dataset
from minimind_v.tokenizer import Tokenizer
from minimind_v.rundir import WEIGHTS, write_config
from minimind_v.vlm import MiniMindVLM


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A random tiny VLM saved as a checkpoint directory, with a small generated dataset."""
    root = tmp_path_factory.mktemp("chat")
    data = make_dataset(root / "data", n_train=20, n_test=12, seed=1, image_size=48)
    tok = Tokenizer.train([data / "pretrain_train.jsonl", data / "sft_train.jsonl"], root / "tok" / "t",
                          vocab_size=1000, user_defined_symbols=answer_words())
    cfg = tiny_vlm(len(tok), tok.image_pad_id)
    torch.manual_seed(0)
    model = MiniMindVLM(cfg)
    with torch.no_grad():                 # larger weights than the init: varied, confident answers
        for p in model.lm.parameters():
            p.mul_(20.0)
    ckpt = root / "ckpt"
    write_config(ckpt, cfg, "sft", tok.model_file)
    atomic_save(model.state_dict(), ckpt / WEIGHTS)
    return ckpt, data, model.eval(), tok


def test_loaded_checkpoint_equals_the_saved_model(checkpoint):
    ckpt, _, model, _ = checkpoint
    loaded, tok, info = load_chat_model(ckpt)
    assert info["kind"] == "vlm" and len(tok) == model.cfg.lm.vocab_size
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k


def test_chat_streams_exactly_what_generate_produces(checkpoint, capsys):
    ckpt, data, model, tok = checkpoint
    image = data / "images" / "test_000003.png"
    question = "What colour is the circle?"
    assert cli_chat(["--checkpoint", str(ckpt), "--image", str(image), "--max-new-tokens", "12", question]) == 0
    printed = capsys.readouterr().out
    ids = torch.tensor([prompt_ids(tok, [user_message(question, 1)], 9)])
    # the image goes after the question, as in the training records
    assert ids[0, -(9 + len(tok.encode("<|im_end|>\n<|im_start|>assistant\n"))):].tolist()[:9] == [tok.image_pad_id] * 9
    out = generate(model, ids, 12, eos_id=tok.eos_id, images=load_pixels([image], 48)[None])[0, ids.shape[1]:].tolist()
    out = out[:out.index(tok.eos_id)] if tok.eos_id in out else out
    assert len(out) > 0
    assert printed == tok.decode(out) + "\n"


def test_chat_compile_prints_the_same_reply(checkpoint, capsys, monkeypatch):
    """--compile decodes through the compiled static-cache step (spied on): the same greedy text."""
    import minimind_v.generate as gen
    ckpt, data, _, _ = checkpoint
    built = []
    real = gen.compiled_step
    monkeypatch.setattr(gen, "compiled_step", lambda **kw: built.append(kw) or real(**kw))
    args = ["--checkpoint", str(ckpt), "--image", str(data / "images" / "test_000005.png"), "--max-new-tokens", "10",
            "What shape is it?"]
    assert cli_chat(args) == 0
    eager = capsys.readouterr().out
    assert built == []
    assert cli_chat(args + ["--compile"]) == 0
    assert capsys.readouterr().out == eager and len(eager.strip()) > 0
    assert built == [{"fullgraph": True}]


def test_the_image_changes_the_answer(checkpoint):
    _, data, model, tok = checkpoint
    msgs = [user_message("What is at the center?", 1)]
    answers = {reply(model, tok, msgs, load_pixels([data / "images" / f"test_{i:06d}.png"], 48), 8)
               for i in range(6)}
    assert len(answers) > 1


def test_interactive_chat_keeps_the_conversation(checkpoint, monkeypatch, capsys):
    ckpt, data, model, tok = checkpoint
    image = data / "images" / "test_000001.png"
    monkeypatch.setattr("sys.stdin", io.StringIO("How many shapes are there?\nAnd now?\n\n"))
    assert cli_chat(["--checkpoint", str(ckpt), "--image", str(image), "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr().out.splitlines()
    pixels = load_pixels([image], 48)
    first = reply(model, tok, [user_message("How many shapes are there?", 1)], pixels, 6)
    second = reply(model, tok, [user_message("How many shapes are there?", 1),
                                {"role": "assistant", "content": first},
                                {"role": "user", "content": "And now?"}], pixels, 6)
    assert out[1:] == ["> " + first, "> " + second, "> "]


def test_batched_evaluation_equals_one_record_at_a_time(checkpoint, capsys):
    ckpt, data, model, tok = checkpoint
    res = evaluate(model, tok, data / "sft_test.jsonl", data / "images", batch_size=4, max_new_tokens=6)
    records = [json.loads(x) for x in (data / "sft_test.jsonl").read_text(encoding="utf-8").splitlines()]
    assert res["total"] == len(records) == 12
    correct = 0
    for (paths, q, ref, pred), rec in zip(res["examples"], records):
        msgs = [rec["conversations"][0]]
        alone = reply(model, tok, msgs, load_pixels([data / "images" / rec["image"]], 48), 6)
        assert pred == alone.strip() and ref == rec["conversations"][1]["content"]
        correct += pred == ref
    assert res["correct"] == correct and res["accuracy"] == correct / 12
    assert sum(n for _, n in res["by_type"].values()) == 12
    assert cli_eval(["--checkpoint", str(ckpt), "--data", str(data / "sft_test.jsonl"), "--images",
                     str(data / "images"), "--max-new-tokens", "6"]) == 0
    assert f"exact match: {correct}/12" in capsys.readouterr().out


def test_chat_errors_are_clear(tmp_path, checkpoint):
    with pytest.raises(FileNotFoundError, match="not a checkpoint directory"):
        cli_chat(["--checkpoint", str(tmp_path), "hello"])
    ckpt, *_ = checkpoint
    with pytest.raises(ValueError, match="nope.png.*not found"):
        cli_chat(["--checkpoint", str(ckpt), "--image", str(tmp_path / "nope.png"), "hello"])
