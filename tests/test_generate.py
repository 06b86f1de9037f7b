"""Generation: the KV cache changes nothing but speed; sampling filters against known answers."""
from __future__ import annotations

import pytest
import torch

from minimind_v.config import LMConfig
from minimind_v.generate import (apply_repetition_penalty, generate, generate_without_cache, next_token,
                                 stream, top_k_filter, top_p_filter)
from minimind_v.lm import MiniMindLM

TINY = dict(vocab_size=97, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=96)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = MiniMindLM(LMConfig(**TINY)).eval()
    with torch.no_grad():                      # larger weights: peaked, prompt-dependent predictions
        for p in m.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.15)
    return m


def _prompt(B, T, seed=1):
    return torch.randint(0, 97, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("B", [1, 3])
def test_greedy_with_cache_equals_recomputing(model, B):
    ids = _prompt(B, 10)
    out = generate(model, ids, 25)
    assert out.shape == (B, 35) and torch.equal(out[:, :10], ids)
    assert torch.equal(out, generate_without_cache(model, ids, 25))
    assert len(set(out[0, 10:].tolist())) > 1          # not a degenerate constant


def test_left_padded_batch_equals_each_prompt_alone(model):
    prompts = [_prompt(1, n, seed=n)[0] for n in (4, 9, 6)]
    T = max(len(p) for p in prompts)
    ids = torch.zeros(3, T, dtype=torch.long)
    mask = torch.zeros(3, T, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):] = p
        mask[i, T - len(p):] = 1
    batch = generate(model, ids, 12, attention_mask=mask)
    with torch.no_grad():
        logits = model(ids, attention_mask=mask)
    for i, p in enumerate(prompts):
        alone = generate(model, p[None], 12)
        assert torch.equal(batch[i, T:], alone[0, len(p):]), f"row {i} differs"
        with torch.no_grad():
            ref = model(p[None])[0]
        torch.testing.assert_close(logits[i, T - len(p):], ref, rtol=1e-4, atol=1e-4)


def test_stream_yields_what_generate_returns(model):
    ids = _prompt(2, 5)
    got = torch.stack(list(stream(model, ids, 7, temperature=0.8, top_k=20, seed=4)), dim=1)
    assert torch.equal(torch.cat([ids, got], 1), generate(model, ids, 7, temperature=0.8, top_k=20, seed=4))


def test_top_k_1_equals_greedy(model):
    ids = _prompt(2, 8)
    sampled = generate(model, ids, 15, temperature=1.3, top_k=1, seed=123)
    assert torch.equal(sampled, generate(model, ids, 15))


def test_seeded_sampling_is_reproducible(model):
    ids = _prompt(2, 6)
    a = generate(model, ids, 20, temperature=1.0, seed=7)
    b = generate(model, ids, 20, temperature=1.0, seed=7)
    c = generate(model, ids, 20, temperature=1.0, seed=8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_top_p_keeps_exactly_the_nucleus():
    probs = torch.tensor([[0.05, 0.5, 0.1, 0.15, 0.2]])      # sorted: .5 .2 .15 .1 .05
    logits = probs.log()
    def kept(p):
        return set(torch.isfinite(top_p_filter(logits, p))[0].nonzero().flatten().tolist())
    assert kept(0.4) == {1}                  # 0.5 alone reaches 0.4
    assert kept(0.6) == {1, 4}               # 0.5 + 0.2 = 0.7 >= 0.6
    assert kept(0.8) == {1, 4, 3}            # 0.85
    assert kept(0.9) == {1, 4, 3, 2}         # 0.95
    assert kept(0.99) == {0, 1, 2, 3, 4}
    # the kept logits are unchanged
    out = top_p_filter(logits, 0.8)
    assert torch.equal(out[0, [1, 3, 4]], logits[0, [1, 3, 4]])


def test_top_k_and_top_p_match_transformers():
    gen = pytest.importorskip("transformers.generation.logits_process")
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0)) * 3
    ids = torch.zeros(4, 1, dtype=torch.long)
    for k in (1, 5, 50):
        ref = gen.TopKLogitsWarper(top_k=k)(ids, logits.clone())
        assert torch.equal(top_k_filter(logits, k), ref)
    for p in (0.3, 0.75, 0.95):
        ref = gen.TopPLogitsWarper(top_p=p)(ids, logits.clone())
        assert torch.equal(torch.isinf(top_p_filter(logits, p)), torch.isinf(ref))


def test_repetition_penalty_matches_transformers():
    gen = pytest.importorskip("transformers.generation.logits_process")
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 40, generator=g) * 2             # positive and negative logits
    seen = torch.randint(0, 40, (3, 12), generator=g)        # with repeats
    for penalty in (1.3, 0.7):
        ref = gen.RepetitionPenaltyLogitsProcessor(penalty=penalty)(seen, logits.clone())
        out = apply_repetition_penalty(logits, seen, penalty)
        torch.testing.assert_close(out, ref, rtol=0, atol=0)
        assert not torch.equal(out, logits)


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.6, 0.3, 0.1, 0.0])
    logits = probs.clamp_min(1e-12).log().expand(4000, 4)
    g = torch.Generator().manual_seed(0)
    picks = next_token(logits, torch.zeros(4000, 0, dtype=torch.long), temperature=1.0, generator=g)
    freq = torch.bincount(picks, minlength=4).float() / 4000
    torch.testing.assert_close(freq, probs, rtol=0, atol=0.03)


def test_eos_stops_generation(model):
    ids = _prompt(1, 8)
    first = int(generate(model, ids, 1)[0, -1])
    out = generate(model, ids, 20, eos_id=first)
    assert out.shape == (1, 9) and int(out[0, -1]) == first
    # batch: a finished row keeps emitting eos while the other continues
    both = torch.cat([ids, _prompt(1, 8, seed=5)])
    out = generate(model, both, 6, eos_id=first)
    assert torch.all(out[0, 8:] == first)
    assert out.shape[1] == 14 or torch.all(out[1, -1] == first)   # stops early only once row 1 ends too


def test_prompt_longer_than_context_is_a_clear_error(model):
    with pytest.raises(ValueError, match="prompt of 90 tokens \\+ 10 new tokens exceeds the model's context of 96"):
        generate(model, _prompt(1, 90), 10)
    with pytest.raises(ValueError, match="input_ids must be \\(B, T\\)"):
        generate(model, _prompt(1, 5)[0], 3)


def test_training_mode_is_restored(model):
    model.train()
    generate(model, _prompt(1, 4), 2)
    assert model.training
    model.eval()
