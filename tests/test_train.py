"""The training loop: it learns, freezes what it should, resumes exactly, survives a kill, scales out.

Tiny language models on a toy token dataset keep every test to a few seconds; the VLM-specific
parts (freeze rules with a projector and an encoder, the feature cache) use a tiny MiniMindVLM.
"""
from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from minimind_v import config
from minimind_v.lm import MiniMindLM
from minimind_v.checkpoint import load_state_dict
from minimind_v.freeze import apply_freeze, param_groups
from minimind_v.rundir import CHECKPOINT, LOSS_PNG, METRICS, WEIGHTS
from minimind_v.train import TrainConfig, TrainingError, lr_at, train

ROOT = Path(__file__).resolve().parents[1]


class ToyTokens(torch.utils.data.Dataset):
    """n random sequences; the first 4 positions of each are prompt (label -100), the rest targets."""

    def __init__(self, n=8, T=12, V=32, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randint(5, V, (n, T), generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        ids = self.x[i]
        labels = ids.clone()
        labels[:4] = -100
        return {"input_ids": ids, "labels": labels}


def collate(items):
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def tiny_lm(seed=0, dropout=0.0):
    torch.manual_seed(seed)
    return MiniMindLM(config.tiny_lm(dropout=dropout))


def quiet(*args, **kwargs):
    pass


def test_lr_schedule_warmup_then_cosine_to_ten_percent():
    peak, total, warm = 1e-3, 110, 10
    lrs = [lr_at(s, total, peak, warm) for s in range(total)]
    assert lrs[:warm] == pytest.approx([peak * (s + 1) / warm for s in range(warm)])
    assert lrs[warm] == pytest.approx(peak)
    assert lrs[-1] == pytest.approx(0.1 * peak)
    mid = warm + (total - warm - 1) / 2                       # halfway through the cosine
    assert lr_at(int(mid), total, peak, warm) == pytest.approx(0.1 * peak + 0.9 * peak * 0.5 *
                                                                (1 + math.cos(math.pi * int(mid - warm) / (total - warm - 1))))
    assert all(a >= b for a, b in zip(lrs[warm:], lrs[warm + 1:]))   # never rises after warmup


def test_param_groups_decay_matrices_only_and_skip_frozen():
    model = tiny_lm()
    apply_freeze(model, ("last_block",))
    decay, no_decay = param_groups(model, 0.1)
    last = model.layers[-1]
    assert {id(p) for p in decay["params"]} == {id(p) for p in last.parameters() if p.dim() == 2}
    assert {id(p) for p in no_decay["params"]} == {id(last.attn_norm.weight), id(last.ffn_norm.weight)}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    apply_freeze(model, ("lm",))
    decay, _ = param_groups(model, 0.1)
    # the tied embedding / lm_head matrix is one parameter and appears once
    assert sum(p is model.embed_tokens.weight for p in decay["params"]) == 1


def test_tiny_run_overfits_a_handful_of_samples(tmp_path):
    result = train(tiny_lm(), ToyTokens(n=8), collate,
                   TrainConfig(stage="sft", epochs=40, lr=1e-2, batch_size=4, log_every=1000), tmp_path, log=quiet)
    assert result.final_step == result.total_steps == 80
    assert result.losses[0] > 3.0                       # ~ln(32) at the start
    assert result.losses[-1] < 0.15 * result.losses[0]  # and far lower after
    rows = [json.loads(line) for line in (tmp_path / METRICS).read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 81))
    assert [r["loss"] for r in rows] == result.losses
    from PIL import Image
    assert Image.open(tmp_path / LOSS_PNG).size == (640, 400)


@pytest.mark.parametrize("native", [True, False])
def test_bf16_on_a_cpu_without_native_bf16_is_warned_about(tmp_path, monkeypatch, native):
    """An AVX2 CPU emulates bf16 products (~40x slower than fp32): train says so, once, and goes on."""
    import minimind_v.train as train_module
    monkeypatch.setattr(train_module, "native_bf16", lambda device: native)
    lines = []
    train(tiny_lm(), ToyTokens(n=4), collate, TrainConfig(stage="sft", epochs=1, batch_size=2, dtype="bf16",
                                                          log_every=1000), tmp_path, log=lines.append)
    warned = [m for m in lines if "without native bfloat16" in m]
    assert len(warned) == (0 if native else 1) and (native or "--dtype fp32" in warned[0])


def test_native_bf16_matches_the_cpu():
    from minimind_v.train import native_bf16
    # torch's AVX512 level needs AVX-512 F/BW/VL/DQ, which is what mkldnn's native bf16 needs too
    assert native_bf16("cpu") is (torch.backends.cpu.get_cpu_capability() not in ("DEFAULT", "AVX2"))
    assert native_bf16("cuda") is True


def test_pretrain_freeze_rule_only_changes_the_last_block(tmp_path):
    model = tiny_lm()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train(model, ToyTokens(), collate, TrainConfig(stage="pretrain", epochs=3, lr=1e-2, batch_size=4,
                                                   weight_decay=0.1), tmp_path, log=quiet)
    for k, v in model.state_dict().items():
        if k.startswith("layers.1."):
            assert not torch.equal(v, before[k]), f"{k} should have learned"
        else:
            assert torch.equal(v, before[k]), f"{k} is frozen in pretrain but changed"


def _run(tmp_path, name, **overrides):
    cfg = dict(stage="sft", epochs=3, lr=5e-3, batch_size=2, accum_steps=2, warmup_steps=2,
               save_every=2, log_every=1000, seed=3)
    cfg.update(overrides)
    model = tiny_lm(dropout=0.1)          # dropout: the RNG state must be restored too
    return model, train(model, ToyTokens(n=10), collate, TrainConfig(**cfg), tmp_path / name, log=quiet)


def test_interrupted_and_resumed_equals_uninterrupted_bitwise(tmp_path):
    full_model, full = _run(tmp_path, "full")
    assert full.total_steps == 6        # 10 samples, 2 per micro-batch, 2 micro-batches per step: 2 steps/epoch x 3
    _, part = _run(tmp_path, "split", stop_after=5)     # checkpoints at 2 and 4, stopped after 5
    assert part.stopped_early and part.final_step == 5
    assert part.losses == full.losses[:5]
    ckpt = load_state_dict(tmp_path / "split" / CHECKPOINT)
    assert ckpt["progress"]["step"] == 4 and ckpt["progress"]["epoch"] == 2 and ckpt["progress"]["batch"] == 0
    resumed_model, resumed = _run(tmp_path, "split", resume=True)
    assert resumed.steps == [5, 6]
    assert resumed.losses == full.losses[4:]            # bitwise, not approximately
    for (k, a), b in zip(full_model.state_dict().items(), resumed_model.state_dict().values()):
        assert torch.equal(a, b), k
    rows = [json.loads(line) for line in (tmp_path / "split" / METRICS).read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]   # step 5 of the interrupted run was replaced


def test_resume_refuses_a_different_schedule(tmp_path):
    _run(tmp_path, "a", stop_after=3)
    with pytest.raises(TrainingError, match="batch_size=2.*batch_size=5"):
        _run(tmp_path, "a", resume=True, batch_size=5)


class Poisoned(torch.nn.Module):
    """A model whose logits turn NaN from the `bad_call`-th forward on."""

    def __init__(self, lm, bad_call):
        super().__init__()
        self.lm, self.bad_call, self.calls = lm, bad_call, 0

    def forward(self, input_ids, **kwargs):
        self.calls += 1
        logits = self.lm(input_ids, **kwargs)
        return logits * float("nan") if self.calls >= self.bad_call else logits


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_checkpoint(tmp_path):
    model = Poisoned(tiny_lm(), bad_call=8)             # micro-batch 8 = step 4 with accum 2
    with pytest.raises(TrainingError) as err:
        train(model, ToyTokens(n=10), collate, TrainConfig(stage="sft", epochs=5, lr=1e-3, batch_size=2,
              accum_steps=2, save_every=3), tmp_path, log=quiet)
    msg = str(err.value)
    assert "loss is nan at step 4" in msg and str(tmp_path / CHECKPOINT) in msg and "(step 3)" in msg
    ckpt = load_state_dict(tmp_path / CHECKPOINT)
    assert ckpt["progress"]["step"] == 3
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert not (tmp_path / WEIGHTS).exists()            # no "final" weights from a diverged run


KILL_SCRIPT = textwrap.dedent("""
    import sys, time, torch
    from minimind_v.checkpoint import atomic_save
    path = sys.argv[1]
    atomic_save({"step": 1, "w": torch.arange(10.0)}, path)
    print("first", flush=True)

    class Slow:
        # a tensor whose pickling hangs half way, as a process killed mid-write would
        def __reduce_ex__(self, proto):
            print("writing", flush=True)
            time.sleep(60)
            return (int, (0,))

    atomic_save({"step": 2, "w": torch.randn(1_000_000), "slow": Slow()}, path)
""")


def test_process_killed_while_writing_leaves_previous_checkpoint_loadable(tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(KILL_SCRIPT)
    path = tmp_path / CHECKPOINT
    proc = subprocess.Popen([sys.executable, str(script), str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "first"
        assert proc.stdout.readline().strip() == "writing"
        temps = list(tmp_path.glob(f".{CHECKPOINT}.*.tmp"))
        assert len(temps) == 1                               # the second write had begun (not yet renamed)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    state = torch.load(path, weights_only=True)
    assert state["step"] == 1 and torch.equal(state["w"], torch.arange(10.0))


DDP_SCRIPT = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, sys.argv[2])
    from test_train import ToyTokens, collate, tiny_lm, quiet
    from minimind_v.train import TrainConfig, train
    import torch.distributed as dist
    torch.set_num_threads(1)
    model = tiny_lm()
    cfg = TrainConfig(stage="sft", epochs=2, lr=5e-3, batch_size=2, seed=1, log_every=1000)
    train(model, ToyTokens(n=8, T=12), collate, cfg, sys.argv[1], log=quiet)
    if dist.get_rank() == 0:
        torch.save(model.state_dict(), sys.argv[1] + "/ddp_final.pt")
    dist.destroy_process_group()
""")


def test_two_process_ddp_matches_one_process_with_the_same_global_batch(tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           f"--master_port={port}", "--master_addr=127.0.0.1", str(script),
                           str(tmp_path / "ddp"), str(ROOT / "tests")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = torch.load(tmp_path / "ddp" / "ddp_final.pt", weights_only=True)
    # one process, global batch 4 = 2 ranks x 2: every sample has the same number of target tokens,
    # so the mean of the ranks' mean losses is the global mean loss
    single = tiny_lm()
    train(single, ToyTokens(n=8, T=12), collate,
          TrainConfig(stage="sft", epochs=2, lr=5e-3, batch_size=4, seed=1, log_every=1000), tmp_path / "one",
          log=quiet)
    before = tiny_lm().state_dict()
    for k, v in single.state_dict().items():
        assert not torch.equal(v, before[k])                 # both runs really trained
        torch.testing.assert_close(ddp[k], v, rtol=1e-4, atol=1e-5, msg=k)


# ----------------------------------------------------------------------------- with a tiny VLM
@pytest.fixture(scope="module")
def vlm_data(tmp_path_factory):
    from minimind_v.data import VLMDataset
    from minimind_v.synthetic import answer_words, make_dataset
    from minimind_v.tokenizer import Tokenizer

    root = tmp_path_factory.mktemp("vlm")
    data = make_dataset(root / "data", n_train=16, n_test=4, seed=2, image_size=48)
    tok = Tokenizer.train([data / "pretrain_train.jsonl", data / "sft_train.jsonl"], root / "tok" / "t",
                          vocab_size=1000, user_defined_symbols=answer_words())
    sets = {s: VLMDataset(data / f"{s}_train.jsonl", data / "images", tok, max_length=64, num_patches=9,
                          image_size=48) for s in ("pretrain", "sft")}
    return tok, sets


def tiny_vlm(tok, seed=0):
    from minimind_v.vlm import MiniMindVLM

    torch.manual_seed(seed)
    return MiniMindVLM(config.tiny_vlm(len(tok), tok.image_pad_id))


@pytest.mark.parametrize("stage, learns", [("pretrain", ("vision_proj.", "lm.layers.1.")),
                                           ("sft", ("vision_proj.", "lm."))])
def test_vlm_stage_freeze_rules(vlm_data, tmp_path, stage, learns):
    from minimind_v.data import collate

    tok, sets = vlm_data
    model = tiny_vlm(tok)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train(model, sets[stage], collate, TrainConfig(stage=stage, epochs=2, lr=1e-2, batch_size=8, weight_decay=0.1),
          tmp_path, log=quiet)
    for k, v in model.state_dict().items():
        if k.startswith(learns) and not k.startswith("lm.rope"):
            assert not torch.equal(v, before[k]), f"{stage}: {k} should have learned"
        else:                                           # the encoder always, the rest of the LM in pretrain
            assert torch.equal(v, before[k]), f"{stage}: {k} is frozen but changed"


def test_feature_cache_gives_the_same_training_and_skips_the_encoder(vlm_data, tmp_path):
    from minimind_v.data import collate

    tok, sets = vlm_data
    cfg = dict(stage="sft", epochs=3, lr=5e-3, batch_size=4, seed=0)
    plain_model = tiny_vlm(tok)
    plain = train(plain_model, sets["sft"], collate, TrainConfig(**cfg), tmp_path / "plain", log=quiet)
    cached_model = tiny_vlm(tok)
    calls = []
    cached_model.vision_encoder.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    cached = train(cached_model, sets["sft"], collate, TrainConfig(feature_cache=True, **cfg), tmp_path / "cached",
                   log=quiet)
    assert sum(calls) == 16                             # each of the 16 pictures encoded once, for 3 epochs
    assert sets["sft"].load_pixels                      # the dataset is not changed
    torch.testing.assert_close(torch.tensor(cached.losses), torch.tensor(plain.losses), rtol=1e-5, atol=1e-6)
    assert plain.losses[-1] < plain.losses[0]
    # a second run finds the cache complete and encodes nothing
    calls.clear()
    train(cached_model, sets["sft"], collate, TrainConfig(feature_cache=True, max_steps=1, overwrite=True, **cfg),
          tmp_path / "cached", log=quiet)
    assert calls == []


def test_a_batch_read_from_the_feature_cache_equals_its_items_read_one_by_one(tmp_path):
    """`CachedFeatures.__getitems__` (one read of the cache per batch, what the DataLoader calls)
    gives the items `__getitem__` gives, for rows of 0, 1 and 2 pictures, in any order."""
    from minimind_v.features import CachedFeatures, FeatureCache

    class Items(torch.utils.data.Dataset):
        load_pixels = True
        counts = [1, 0, 2, 1, 2, 0, 1]

        def __len__(self):
            return len(self.counts)

        def __getitem__(self, i):
            paths = [f"img{(i + k) % 5}.png" for k in range(self.counts[i])]
            g = torch.Generator().manual_seed(i)
            return {"input_ids": torch.randint(0, 50, (6,), generator=g), "image_paths": paths,
                    **({"pixel_values": torch.stack([torch.full((3, 4, 4), float(p[3])) for p in paths])
                        if paths else torch.zeros(0, 3, 4, 4)} if self.load_pixels else {})}

    encode = lambda pix: pix.flatten(1)[:, :6].reshape(-1, 2, 3) * torch.arange(6.).reshape(2, 3)  # noqa: E731
    cache = FeatureCache.build(tmp_path, encode, Items(), "fp", batch_size=2, log=quiet)
    data = CachedFeatures(Items(), cache)
    for order in ([0, 1, 2, 3], [6, 4, 1, 2, 0], [1, 5]):
        batch = data.__getitems__(order)
        for i, got in zip(order, batch):
            want = data[i]
            assert got.keys() == want.keys() and "pixel_values" not in got
            assert got["image_paths"] == want["image_paths"] and torch.equal(got["input_ids"], want["input_ids"])
            assert got["image_features"].shape == (len(want["image_paths"]), 2, 3)
            assert torch.equal(got["image_features"], want["image_features"])
    assert data[2]["image_features"][1].abs().sum() > 0              # features, not zeros


def test_initialise_from_lm_weights_upstream_files_and_a_previous_stage(vlm_data, tmp_path):
    from minimind_v.checkpoint import upstream_name
    from minimind_v.rundir import initialise, write_config

    tok, _ = vlm_data
    source = tiny_vlm(tok, seed=1)
    lm_sd = source.lm.state_dict()
    # our LM's model.pt: the language model only
    torch.save(lm_sd, tmp_path / "lm.pt")
    target = tiny_vlm(tok, seed=2)
    proj_before = {k: v.clone() for k, v in target.vision_proj.state_dict().items()}
    initialise(target, str(tmp_path / "lm.pt"), log=quiet)
    assert all(torch.equal(v, target.lm.state_dict()[k]) for k, v in lm_sd.items())
    assert all(torch.equal(v, target.vision_proj.state_dict()[k]) for k, v in proj_before.items())
    # an upstream MiniMind-V .pth: upstream LM names + vision_proj.*, no encoder
    upstream = {upstream_name(k): v for k, v in lm_sd.items()}
    upstream.update({"vision_proj." + k: v for k, v in source.vision_proj.state_dict().items()})
    torch.save(upstream, tmp_path / "upstream.pth")
    target = tiny_vlm(tok, seed=2)
    initialise(target, str(tmp_path / "upstream.pth"), log=quiet)
    for k, v in source.trainable_state_dict().items():
        assert torch.equal(v, target.state_dict()[k]), k
    # a previous stage's directory: every weight, the encoder included
    write_config(tmp_path / "stage1", source.cfg, "pretrain", tok.model_file)
    torch.save(source.state_dict(), tmp_path / "stage1" / WEIGHTS)
    target = tiny_vlm(tok, seed=2)
    initialise(target, str(tmp_path / "stage1"), log=quiet)
    for k, v in source.state_dict().items():
        assert torch.equal(v, target.state_dict()[k]), k
    # a file that fits nothing names the problem
    torch.save({"foo.weight": torch.zeros(2)}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="foo.weight"):
        initialise(tiny_vlm(tok), str(tmp_path / "bad.pt"), log=quiet)


def test_vision_lr_scale_scales_only_the_encoders_steps(vlm_data, tmp_path):
    """One AdamW step is linear in the lr: the encoder moves `scale` times as far, the rest the same."""
    from minimind_v.data import collate

    tok, sets = vlm_data
    moved = {}
    for scale in (1.0, 0.1):
        model = tiny_vlm(tok)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        train(model, sets["sft"], collate,
              TrainConfig(stage="sft", max_steps=1, lr=1e-2, batch_size=8, weight_decay=0.0, grad_clip=0.0,
                          trainable=("lm", "projector", "vision"), vision_lr_scale=scale),
              tmp_path / str(scale), log=quiet)
        moved[scale] = {k: model.state_dict()[k] - before[k] for k in before}
    vision = [k for k in moved[1.0] if k.startswith("vision_encoder.") and moved[1.0][k].abs().max() > 0]
    rest = [k for k in moved[1.0] if not k.startswith("vision_encoder.")]
    assert len(vision) >= 4 and len(rest) >= 4
    for k in vision:
        torch.testing.assert_close(moved[0.1][k], 0.1 * moved[1.0][k], rtol=1e-4, atol=1e-6)   # atol: float32 rounding of the weights
    for k in rest:
        assert torch.equal(moved[0.1][k], moved[1.0][k]), k
    with pytest.raises(ValueError, match="vision_lr_scale"):
        TrainConfig(stage="sft", vision_lr_scale=0.0)
