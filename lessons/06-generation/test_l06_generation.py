"""Grades lesson 06 against transformers' logits processors and a recompute-everything baseline."""
from __future__ import annotations

import pytest
import torch

from minimind_v.config import LMConfig
from minimind_v.lm import MiniMindLM


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = MiniMindLM(LMConfig(vocab_size=61, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                            max_seq_len=48)).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.2)
    return m


def test_repetition_penalty_matches_transformers(ex):
    gen = pytest.importorskip("transformers.generation.logits_process")
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 30, generator=g) * 2
    seen = torch.randint(0, 30, (3, 10), generator=g)
    ref = gen.RepetitionPenaltyLogitsProcessor(penalty=1.5)(seen, logits.clone())
    torch.testing.assert_close(ex.apply_repetition_penalty(logits, seen, 1.5), ref, rtol=0, atol=0)


def test_top_k_matches_transformers(ex):
    gen = pytest.importorskip("transformers.generation.logits_process")
    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(1))
    for k in (1, 4, 30):
        assert torch.equal(ex.top_k_filter(logits, k), gen.TopKLogitsWarper(top_k=k)(None, logits.clone()))


def test_top_p_keeps_the_nucleus(ex):
    logits = torch.tensor([[0.05, 0.5, 0.1, 0.15, 0.2]]).log()
    def kept(p):
        return torch.isfinite(ex.top_p_filter(logits, p))[0].nonzero().flatten().tolist()
    assert kept(0.45) == [1]
    assert kept(0.8) == [1, 3, 4]
    assert kept(0.9) == [1, 2, 3, 4]
    out = ex.top_p_filter(logits, 0.8)
    assert torch.equal(out[0, [1, 3, 4]], logits[0, [1, 3, 4]])


def test_next_token(ex):
    logits = torch.randn(5, 20, generator=torch.Generator().manual_seed(2))
    seen = torch.zeros(5, 0, dtype=torch.long)
    assert torch.equal(ex.next_token(logits, seen), logits.argmax(-1))
    g = torch.Generator().manual_seed(0)
    assert torch.equal(ex.next_token(logits, seen, temperature=2.0, top_k=1, generator=g), logits.argmax(-1))
    # sampling follows the distribution
    probs = torch.tensor([0.7, 0.2, 0.1])
    picks = ex.next_token(probs.log().expand(3000, 3), torch.zeros(3000, 0, dtype=torch.long),
                          temperature=1.0, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(torch.bincount(picks, minlength=3) / 3000.0, probs, rtol=0, atol=0.03)


def test_greedy_generate_equals_recomputing(ex, model):
    ids = torch.randint(0, 61, (2, 7), generator=torch.Generator().manual_seed(4))
    slow = ids
    with torch.no_grad():
        for _ in range(12):
            slow = torch.cat([slow, model(slow)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(ex.generate(model, ids, 12), slow)


def test_seeded_sampling_eos_and_context_limit(ex, model):
    ids = torch.randint(0, 61, (2, 5), generator=torch.Generator().manual_seed(5))
    a = ex.generate(model, ids, 10, temperature=1.0, top_p=0.9, seed=11)
    assert torch.equal(a, ex.generate(model, ids, 10, temperature=1.0, top_p=0.9, seed=11))
    assert a.shape == (2, 15)
    first = ex.generate(model, ids[:1], 1)[0, -1]
    assert ex.generate(model, ids[:1], 10, eos_id=int(first)).shape == (1, 6)
    with pytest.raises(ValueError):
        ex.generate(model, ids, 44)          # 5 + 44 > 48
