"""Grades lesson 10: loss mask, schedule, AdamW groups, freeze rules, distributed batches."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from minimind_v.config import LMConfig, VisionConfig, VLMConfig
from minimind_v.lm import MiniMindLM
from minimind_v.vlm import MiniMindVLM


def tiny_vlm():
    torch.manual_seed(0)
    return MiniMindVLM(VLMConfig(
        lm=LMConfig(vocab_size=40, hidden_size=32, num_layers=3, num_heads=2, num_kv_heads=1, max_seq_len=64),
        vision=VisionConfig(image_size=32, patch_size=16, hidden_size=16, num_layers=1, num_heads=2,
                            intermediate_size=32),
        image_pad_id=3, num_patches=4))


def test_loss_counts_only_the_unmasked_next_tokens(ex):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 7, 11, generator=g)
    labels = torch.randint(0, 11, (2, 7), generator=g)
    labels[0, :3] = -100
    labels[1, 5:] = -100
    loss = ex.lm_loss(logits, labels)
    terms = [F.cross_entropy(logits[b, t], labels[b, t + 1]) for b in range(2) for t in range(6)
             if labels[b, t + 1] != -100]
    torch.testing.assert_close(loss, torch.stack(terms).mean(), rtol=1e-6, atol=1e-6, msg=lambda m: (
        f"not the mean cross-entropy of logits[t] against labels[t+1] over the pairs whose label is not -100\n{m}"))
    # logits whose next label is masked do not matter
    changed = logits.clone()
    changed[0, 1] += 100.0                               # predicts labels[0, 2] = -100
    torch.testing.assert_close(ex.lm_loss(changed, labels), loss)


def test_warmup_then_cosine_to_ten_percent(ex):
    peak, total, warm = 3e-3, 41, 5
    lrs = [ex.lr_at(s, total, peak, warm) for s in range(total)]
    assert lrs[:warm] == pytest.approx([peak * (s + 1) / warm for s in range(warm)]), \
        f"warmup steps 0..4 give {lrs[:warm]}, expected peak * (step + 1) / warmup (the first step is not 0)"
    assert lrs[warm] == pytest.approx(peak), f"step {warm} (the first after warmup) gives {lrs[warm]}, expected the peak"
    assert lrs[-1] == pytest.approx(0.1 * peak), f"the last step gives {lrs[-1]}, expected min_ratio * peak"
    s = warm + 9
    assert lrs[s] == pytest.approx(0.1 * peak + 0.9 * peak * 0.5 * (1 + math.cos(math.pi * 9 / 35)))
    assert all(a >= b for a, b in zip(lrs[warm:], lrs[warm + 1:]))
    assert ex.lr_at(0, 10, 1.0, 0, min_ratio=0.0) == pytest.approx(1.0)


def test_param_groups_decay_matrices_only(ex):
    model = MiniMindLM(LMConfig(vocab_size=40, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1))
    for p in model.layers[0].parameters():
        p.requires_grad_(False)
    decay, no_decay = ex.param_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in decay["params"]} == {id(p) for p in trainable if p.dim() >= 2}, \
        "the decay group must hold exactly the trainable matrices (dim >= 2): no frozen ones, no norm gains"
    assert {id(p) for p in no_decay["params"]} == {id(p) for p in trainable if p.dim() < 2}, \
        "the no-decay group must hold exactly the trainable vectors (norm gains, biases)"
    assert len(decay["params"]) == len({id(p) for p in decay["params"]})     # tied matrix once
    assert not any(p is q for p in decay["params"] for q in model.layers[0].parameters())


def test_freeze_rules_of_the_two_stages(ex):
    model = tiny_vlm()
    names = ex.apply_freeze(model, ("projector", "last_block"))          # pretrain
    assert names == [n for n, _ in model.named_parameters()
                     if n.startswith(("vision_proj.", "lm.layers.2."))]
    assert all(p.requires_grad == (n in names) for n, p in model.named_parameters()), \
        "parameters outside the groups must be frozen (requires_grad=False)"
    names = ex.apply_freeze(model, ("lm", "projector"))                  # sft
    assert names == [n for n, _ in model.named_parameters() if not n.startswith("vision_encoder.")]
    assert not any(p.requires_grad for p in model.vision_encoder.parameters())
    lm = MiniMindLM(LMConfig(vocab_size=40, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1))
    assert ex.apply_freeze(lm, ("projector", "last_block")) == [n for n, _ in lm.named_parameters()
                                                                 if n.startswith("layers.1.")]
    with pytest.raises(ValueError):
        ex.apply_freeze(model, ("decoder",))


def test_distributed_batches_cover_the_epoch_and_repeat_exactly(ex):
    n, bs, world = 11, 2, 3
    per_rank = [ex.epoch_batches(n, bs, epoch=4, seed=7, rank=r, world=world) for r in range(world)]
    flat = [[i for b in batches for i in b] for batches in per_rank]
    assert all(len(f) == 4 for f in flat)                                 # ceil(11 / 3)
    assert set().union(*map(set, flat)) == set(range(n))                  # every item, 1 repeated
    assert [len(b) for b in per_rank[0]] == [2, 2]
    # rank r holds positions r, r+3, ... of one shuffled order
    order = [flat[k % world][k // world] for k in range(12)]
    assert sorted(order[:11]) == list(range(11)) and order[11] == order[0]
    assert per_rank[1] == ex.epoch_batches(n, bs, epoch=4, seed=7, rank=1, world=world)
    assert ex.epoch_batches(n, bs, 5, 7, 0, 1) != ex.epoch_batches(n, bs, 4, 7, 0, 1), \
        "epochs 4 and 5 got the same order: seed the shuffle with seed + epoch"
    assert ex.epoch_batches(20, 20, 0, 7, 0, 1)[0] != list(range(20))     # shuffled
