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
    before = logits.clone()
    got = ex.apply_repetition_penalty(logits, seen, 1.5)
    assert torch.equal(logits, before), "apply_repetition_penalty changed its input logits in place: return new ones"
    torch.testing.assert_close(got, ref, rtol=0, atol=0, msg=lambda m: (
        "not transformers' repetition penalty: each seen token once (even if seen twice), positive logits divided "
        f"by the penalty, negative ones multiplied\n{m}"))


def test_top_k_matches_transformers(ex):
    gen = pytest.importorskip("transformers.generation.logits_process")
    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(1))
    for k in (1, 4, 30):
        assert torch.equal(ex.top_k_filter(logits, k), gen.TopKLogitsWarper(top_k=k)(None, logits.clone())), \
            f"top_k_filter(logits, {k}) does not keep exactly the {k} largest logits per row (others -inf)"
    tied = torch.tensor([[3.0, 1.0, 2.0, 2.0, 0.0]])
    kept = torch.isfinite(ex.top_k_filter(tied, 2))[0].tolist()
    assert kept == [True, False, True, True, False], (
        f"top_k_filter(k=2) on [3, 1, 2, 2, 0] kept {kept}: a logit equal to the k-th largest is kept too")


def test_top_p_keeps_the_nucleus(ex):
    logits = torch.tensor([[0.05, 0.5, 0.1, 0.15, 0.2]]).log()
    def kept(p):
        return torch.isfinite(ex.top_p_filter(logits, p))[0].nonzero().flatten().tolist()
    for p, want in ((0.45, [1]), (0.8, [1, 3, 4]), (0.9, [1, 2, 3, 4])):
        assert kept(p) == want, (f"probabilities [0.05, 0.5, 0.1, 0.15, 0.2], p={p}: kept tokens {kept(p)}, expected "
                                 f"{want}: take the most likely until their total first reaches p (that one included)")
    before = logits.clone()
    out = ex.top_p_filter(logits, 0.8)
    assert torch.equal(logits, before), "top_p_filter changed its input logits in place"
    assert torch.equal(out[0, [1, 3, 4]], logits[0, [1, 3, 4]]), "top_p_filter changed the logits it keeps"


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
    torch.testing.assert_close(torch.bincount(picks, minlength=3) / 3000.0, probs, rtol=0, atol=0.03,
                               msg="sampled frequencies do not follow softmax(logits / temperature)")
    # the generator decides, not the global random state
    torch.manual_seed(1)
    a = ex.next_token(logits, seen, temperature=1.0, generator=torch.Generator().manual_seed(5))
    torch.manual_seed(2)
    b = ex.next_token(logits, seen, temperature=1.0, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b), "two calls with equally seeded generators sampled differently: pass generator= to multinomial"


def test_greedy_generate_equals_recomputing(ex, model):
    ids = torch.randint(0, 61, (2, 7), generator=torch.Generator().manual_seed(4))
    slow = ids
    with torch.no_grad():
        for _ in range(12):
            slow = torch.cat([slow, model(slow)[:, -1].argmax(-1, keepdim=True)], dim=1)
    lengths = []

    class Spy(torch.nn.Module):
        max_seq_len = model.max_seq_len

        def forward(self, ids, kv_cache=None, **kw):
            lengths.append((ids.shape[1], kv_cache is not None))
            return model(ids, kv_cache=kv_cache, **kw)
    out = ex.generate(Spy().eval(), ids, 12)
    assert torch.equal(out, slow), f"greedy generate gave {out.tolist()}, recomputing the whole sequence gives {slow.tolist()}"
    assert all(cached for _, cached in lengths), "generate called the model without a kv_cache"
    assert [t for t, _ in lengths[1:]] == [1] * (len(lengths) - 1), (
        f"the model saw inputs of lengths {[t for t, _ in lengths]}: after the prefill, feed one new token per step")


def test_seeded_sampling_eos_and_context_limit(ex, model):
    ids = torch.randint(0, 61, (2, 5), generator=torch.Generator().manual_seed(5))
    a = ex.generate(model, ids, 10, temperature=1.0, top_p=0.9, seed=11)
    assert torch.equal(a, ex.generate(model, ids, 10, temperature=1.0, top_p=0.9, seed=11))
    assert a.shape == (2, 15)
    first = ex.generate(model, ids[:1], 1)[0, -1]
    assert ex.generate(model, ids[:1], 10, eos_id=int(first)).shape == (1, 6), \
        "a row whose first new token is eos_id: generation stops after it"
    free = ex.generate(model, ids, 8)
    eos = int(free[0, 6])                       # row 0's second new token
    out = ex.generate(model, ids, 8, eos_id=eos)
    assert (out[0, 6:] == eos).all(), f"row 0 emitted eos_id={eos} and went on with {out[0, 6:].tolist()}: a finished row keeps emitting eos_id"
    assert ex.generate(model, ids, 43).shape == (2, 48), "5 + 43 = 48 tokens fit max_seq_len=48"
    with pytest.raises(ValueError):
        ex.generate(model, ids, 44)          # 5 + 44 > 48
