"""The MoE feed-forward: routing and dispatch equal a plain per-token loop and transformers' Qwen3-MoE
block (same maths: softmax, top-k, renormalise); the load-balancing loss equals Qwen3-MoE's for one
layer and upstream's per-layer sum for several; the whole MoE LM equals Qwen3MoeForCausalLM."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from minimind_v.checkpoint import load_upstream
from minimind_v.config import LMConfig
from minimind_v.lm import MiniMindLM, lm_loss
from minimind_v.moe import MoEFeedForward, load_balancing_loss, route

transformers = pytest.importorskip("transformers")
from transformers.models.qwen3_moe import modeling_qwen3_moe as qwen3_moe  # noqa: E402

TINY = dict(vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
            intermediate_size=48, rms_norm_eps=1e-6, max_seq_len=64, qk_norm=True, use_moe=True,
            num_experts=4, num_experts_per_tok=1, moe_intermediate_size=40)


def moe_layer(seed=0, dtype=torch.float64, **kw) -> MoEFeedForward:
    torch.manual_seed(seed)
    layer = MoEFeedForward(LMConfig(**{**TINY, **kw})).to(dtype)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0.0, 0.3)
    return layer


def per_token_loop(layer: MoEFeedForward, x: torch.Tensor) -> torch.Tensor:
    """Upstream's rule, one token at a time: softmax over experts, top-k, renormalise, weighted sum."""
    out = torch.zeros_like(x)
    for n in range(x.shape[0]):
        p = torch.softmax(layer.gate.weight @ x[n], dim=-1)
        order = sorted(range(len(p)), key=lambda e: -p[e].item())[:layer.k]
        total = sum(p[e] for e in order) if layer.norm_topk_prob else 1.0
        for e in order:
            out[n] += p[e] / total * layer.experts[e](x[n][None])[0]
    return out


@pytest.mark.parametrize("k,norm", [(1, True), (2, True), (2, False), (3, True)])
def test_dispatch_equals_a_per_token_loop_with_grads(k, norm):
    layer = moe_layer(num_experts_per_tok=k, norm_topk_prob=norm)
    x = torch.randn(3, 7, 32, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    ref = per_token_loop(layer, x.reshape(-1, 32)).reshape(3, 7, 32)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    assert out.abs().max() > 0.1
    w = torch.randn_like(out)
    params = [x, *layer.parameters()]
    g = torch.autograd.grad((out * w).sum(), params, allow_unused=True)
    g_ref = torch.autograd.grad((ref * w).sum(), params, allow_unused=True)
    for a, b in zip(g, g_ref):
        if b is None:
            assert a is None or a.abs().max() == 0
        else:
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    # every expert gets some tokens here, so a wrong dispatch could not hide in an unused one
    _, _, experts = route(layer.gate(x.reshape(-1, 32)), k, norm)
    assert len(set(experts.reshape(-1).tolist())) == 4


def test_top1_weight_is_one_and_the_gate_gets_no_gradient_through_it():
    """Top-1 with renormalisation: the weight is p / p = 1, so without the aux loss the router
    learns nothing from the LM loss (upstream's setting); without renormalisation it does."""
    layer = moe_layer(dtype=torch.float32)
    x = torch.randn(10, 32)
    _, w, _ = route(layer.gate(x), 1, True)
    torch.testing.assert_close(w, torch.ones(10, 1))
    layer(x).sum().backward()
    assert layer.gate.weight.grad.abs().max() < 1e-5          # float32 rounding of p / p only
    layer = moe_layer(dtype=torch.float32, norm_topk_prob=False)
    layer(x).sum().backward()
    assert layer.gate.weight.grad.abs().max() > 1e-3


def hf_block(layer: MoEFeedForward, k: int, norm: bool):
    """A transformers Qwen3-MoE block with our layer's weights (its experts are fused 3-D tensors)."""
    cfg = transformers.Qwen3MoeConfig(hidden_size=32, moe_intermediate_size=40, num_experts=4,
                                      num_experts_per_tok=k, norm_topk_prob=norm, hidden_act="silu")
    block = qwen3_moe.Qwen3MoeSparseMoeBlock(cfg).to(layer.gate.weight.dtype)
    with torch.no_grad():
        block.gate.weight.copy_(layer.gate.weight)
        for e, ex in enumerate(layer.experts):
            block.experts.gate_up_proj[e].copy_(torch.cat([ex.gate_proj.weight, ex.up_proj.weight]))
            block.experts.down_proj[e].copy_(ex.down_proj.weight)
    return block


@pytest.mark.parametrize("k,norm", [(1, True), (2, True), (2, False)])
def test_equals_transformers_qwen3_moe_block(k, norm):
    # float32: transformers' router takes its softmax in float32 whatever the input dtype. An expert
    # that gets at most 8 tokens runs them through `few_rows_linear`, whose sums are ordered unlike
    # F.linear's: float32 rounding of a few 1e-6, hence 1e-5 (a wrong route or weight is off by ~0.1)
    layer = moe_layer(num_experts_per_tok=k, norm_topk_prob=norm, dtype=torch.float32)
    x = torch.randn(2, 9, 32)
    with torch.no_grad():
        out = layer(x)
        torch.testing.assert_close(out, hf_block(layer, k, norm)(x), rtol=1e-5, atol=1e-5)
    assert out.abs().max() > 0.1


def test_aux_loss_equals_qwen3_moe_for_one_layer_and_is_zero_in_eval():
    layer = moe_layer(num_experts_per_tok=2).train()
    x = torch.randn(4, 6, 32, dtype=torch.float64)
    layer(x)
    logits = layer.gate(x.reshape(-1, 32))
    ref = qwen3_moe.load_balancing_loss_func((logits,), num_experts=4, top_k=2)
    torch.testing.assert_close(layer.aux_loss, 5e-4 * ref.to(torch.float64), rtol=1e-6, atol=0)
    # by hand: E * sum_e f_e P_e with f_e = choices of e / N
    p = logits.softmax(-1)
    f = torch.stack([(p.topk(2, dim=-1).indices == e).sum() for e in range(4)]) / p.shape[0]
    torch.testing.assert_close(load_balancing_loss(p, p.topk(2, -1).indices, 4), 4 * (f * p.mean(0)).sum())
    layer.eval()
    layer(x)
    assert layer.aux_loss.item() == 0.0


def test_lm_aux_loss_is_the_sum_over_layers_and_trains_the_router():
    torch.manual_seed(0)
    model = MiniMindLM(LMConfig(**{**TINY, "num_layers": 3})).train()
    ids = torch.randint(0, 97, (2, 12))
    logits = model(ids)
    per_layer = [block.ffn.aux_loss for block in model.layers]
    assert all(a > 0 for a in per_layer)
    torch.testing.assert_close(model.aux_loss, sum(per_layer))
    model.aux_loss.backward(retain_graph=True)   # through P_e (the mean probabilities) into every router
    assert all(block.ffn.gate.weight.grad is not None and block.ffn.gate.weight.grad.abs().max() > 1e-7
               for block in model.layers)
    assert all(e.up_proj.weight.grad is None for e in model.layers[-1].ffn.experts)   # f_e only counts
    lm_loss(logits, ids).backward()
    dense = MiniMindLM(LMConfig(**{**TINY, "use_moe": False})).train()
    dense(ids)
    assert dense.aux_loss.item() == 0.0


def qwen3_moe_lm(cfg: LMConfig, seed=0):
    torch.manual_seed(seed)
    hf = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        moe_intermediate_size=cfg.moe_intermediate_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
        num_experts=cfg.num_experts, num_experts_per_tok=cfg.num_experts_per_tok, norm_topk_prob=True,
        decoder_sparse_step=1, mlp_only_layers=[], rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta,
        max_position_embeddings=cfg.max_seq_len, tie_word_embeddings=True, router_aux_loss_coef=5e-4,
        attention_bias=False, use_sliding_window=False)).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.uniform_(0.5, 1.5) if p.dim() == 1 else p.normal_(0.0, 0.1)
    return hf


def hf_to_upstream(hf) -> dict:
    """Qwen3-MoE's fused experts -> upstream minimind-3v-moe's per-expert names (written out here)."""
    out = {}
    for k, v in hf.state_dict().items():
        if k.endswith("mlp.experts.gate_up_proj"):
            base = k[: -len("gate_up_proj")]
            for e in range(v.shape[0]):
                gate, up = v[e].chunk(2, dim=0)
                out[f"{base}{e}.gate_proj.weight"], out[f"{base}{e}.up_proj.weight"] = gate, up
        elif k.endswith("mlp.experts.down_proj"):
            base = k[: -len("down_proj")]
            for e in range(v.shape[0]):
                out[f"{base}{e}.down_proj.weight"] = v[e]
        else:
            out[k] = v
    return out


@pytest.mark.parametrize("layers", [1, 2])
def test_moe_lm_equals_qwen3_moe_for_causal_lm(layers):
    cfg = LMConfig(**{**TINY, "num_layers": layers})
    hf = qwen3_moe_lm(cfg)
    up = hf_to_upstream(hf)
    assert "model.layers.0.mlp.experts.3.down_proj.weight" in up and "model.layers.0.mlp.gate.weight" in up
    ours = load_upstream(up, cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 15), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids, labels=ids, output_router_logits=True)
        logits = ours(ids)
        torch.testing.assert_close(logits, ref.logits, rtol=1e-5, atol=1e-5)
        assert ref.logits.std() > 0.5
        ours.train()                          # dropout 0: the same logits, and the aux loss is on
        ours(ids)
    if layers == 1:   # Qwen3-MoE pools the layers' routing before the formula; upstream sums per layer
        torch.testing.assert_close(ours.aux_loss, 5e-4 * ref.aux_loss, rtol=1e-5, atol=0)
        torch.testing.assert_close(lm_loss(logits, ids) + ours.aux_loss, ref.loss, rtol=1e-5, atol=1e-6)
    else:
        by_layer = [load_balancing_loss(F.softmax(rl, -1), rl.topk(1, -1).indices, 4) for rl in ref.router_logits]
        torch.testing.assert_close(ours.aux_loss, 5e-4 * sum(by_layer), rtol=1e-5, atol=0)
