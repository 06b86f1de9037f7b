"""MiniMindVLM: the forward pass is exactly encoder -> projector -> splice -> LM; cached decoding
with images equals the full forward; the encoder stays frozen; upstream MiniMind-V weights load."""
from __future__ import annotations

import pytest
import torch

from minimind_v.attention import KVCache
from minimind_v.config import LMConfig, VisionConfig, VLMConfig
from minimind_v.generate import generate
from minimind_v.splice import splice_loop
from minimind_v.vlm import MiniMindVLM, VisionProjector

PAD = 5          # image placeholder id of the tiny config
P = 4            # patches per image: (32 / 16)^2


def tiny_cfg(projector="linear") -> VLMConfig:
    return VLMConfig(
        lm=LMConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                    max_seq_len=64),
        vision=VisionConfig(image_size=32, patch_size=16, hidden_size=64, num_layers=2, num_heads=4,
                            intermediate_size=128, projection_dim=32),
        image_pad_id=PAD, num_patches=P, projector=projector)


def tiny_model(projector="linear", seed=0, dtype=torch.float32) -> MiniMindVLM:
    torch.manual_seed(seed)
    model = MiniMindVLM(tiny_cfg(projector)).to(dtype).eval()
    # make every weight non-trivial (LayerNorm gains/biases start at 1/0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def prompts():
    """Row 0: two images; row 1: one image (its second image is padding); text ids avoid PAD."""
    ids = torch.tensor([[1, 2] + [PAD] * P + [3, 4] + [PAD] * P + [6, 7],
                        [8] + [PAD] * P + [9, 10, 11, 12, 13, 14, 15, 16, 17]])
    g = torch.Generator().manual_seed(1)
    pixels = torch.randn(2, 2, 3, 32, 32, generator=g)
    return ids, pixels


def manual_logits(model, ids, pixels):
    """The composition written out, with the loop splice as the reference."""
    B, N = pixels.shape[:2]
    hidden = model.vision_encoder(pixels.reshape(B * N, 3, 32, 32))        # (B*N, 1+P, Dv)
    feats = hidden[:, 1:, :].reshape(B, N, P, -1)                           # CLS dropped
    vec = model.vision_proj(feats)                                          # (B, N, P, D)
    h = splice_loop(ids, model.lm.embed_tokens(ids), vec, [PAD] * P)
    return model.lm.forward_embeds(h)


@pytest.mark.parametrize("projector", ["linear", "mlp"])
def test_forward_equals_manual_composition(projector):
    model = tiny_model(projector)
    ids, pixels = prompts()
    with torch.no_grad():
        ours = model(ids, pixels)
        ref = manual_logits(model, ids, pixels)
        text_only = model(ids)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
    # the images matter: positions after the first image see different logits than text-only
    assert (ours[:, -1] - text_only[:, -1]).abs().max() > 1e-3


def test_fused_splice_option_gives_the_same_logits_and_gradients():
    pytest.importorskip("minimind_v.ops", exc_type=RuntimeError)   # needs a C++ compiler
    ids, pixels = prompts()
    results = []
    for impl in ("vectorized", "fused"):
        model = tiny_model()
        model.cfg.splice_impl = impl
        logits = model(ids, pixels)
        (logits * torch.linspace(-1, 1, logits.shape[-1])).sum().backward()
        results.append((logits.detach(), model.vision_proj.vision_proj[0].weight.grad,
                        model.lm.embed_tokens.weight.grad))
    for a, b in zip(*results):
        assert a.abs().max() > 0
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="splice_impl must be"):
        VLMConfig(splice_impl="loop")


def test_features_are_taken_before_ln_post_without_cls():
    model = tiny_model()
    _, pixels = prompts()
    with torch.no_grad():
        feats = model.image_features(pixels)                                # (B, N, P, Dv)
        hidden = model.vision_encoder(pixels[1, 0][None])                   # (1, 1+P, Dv)
    assert feats.shape == (2, 2, P, 64)
    torch.testing.assert_close(feats[1, 0], hidden[0, 1:], rtol=0, atol=1e-6)
    assert not torch.allclose(feats[1, 0], model.vision_encoder.ln_post(hidden[0, 1:]), atol=1e-3)


def test_precomputed_image_features_give_the_same_logits():
    model = tiny_model()
    ids, pixels = prompts()
    with torch.no_grad():
        a = model(ids, pixels)
        b = model(ids, image_features=model.image_features(pixels))
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_one_image_per_row_as_4d_pixels():
    model = tiny_model()
    ids, pixels = prompts()
    with torch.no_grad():
        torch.testing.assert_close(model(ids, pixels[:, 0]), model(ids, pixels[:, :1]), rtol=0, atol=0)


def test_cached_decoding_with_images_equals_full_forward_at_every_step():
    model = tiny_model(dtype=torch.float64)
    ids, pixels = prompts()
    pixels = pixels.double()
    g = torch.Generator().manual_seed(2)
    continuation = torch.randint(20, 64, (2, 6), generator=g)
    cache = KVCache()
    with torch.no_grad():
        step_logits = [model(ids, pixels, kv_cache=cache)[:, -1]]
        for t in range(continuation.shape[1]):
            step_logits.append(model(continuation[:, t:t + 1], kv_cache=cache)[:, -1])
        for t, got in enumerate(step_logits):
            full = model(torch.cat([ids, continuation[:, :t]], dim=1), pixels)[:, -1]
            torch.testing.assert_close(got, full, rtol=0, atol=1e-10)


def test_generate_with_images_equals_greedy_without_cache():
    model = tiny_model(seed=1)
    # larger weights, so that greedy answers depend on the images (a small random LM only repeats)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.lm.parameters():
            p.add_(torch.randn_like(p) * p.std()) if p.dim() > 1 else p.mul_(1 + torch.randn_like(p))
        model.vision_proj.vision_proj[0].weight.mul_(10)
    ids, pixels = prompts()
    out = generate(model, ids, max_new_tokens=5, images=pixels)
    seq = ids
    with torch.no_grad():
        for _ in range(5):
            nxt = model(seq, pixels)[:, -1].argmax(-1)
            seq = torch.cat([seq, nxt[:, None]], dim=1)
    assert torch.equal(out, seq)
    # the images steer the answer: without them the greedy continuation is another one
    assert not torch.equal(generate(model, ids, max_new_tokens=5), out)


def test_encoder_is_frozen_and_out_of_the_trainable_state_dict():
    model = tiny_model()
    model.train()
    assert model.training and model.lm.training and not model.vision_encoder.training
    assert all(not p.requires_grad for p in model.vision_encoder.parameters())
    ids, pixels = prompts()
    model(ids, pixels).logsumexp(-1).mean().backward()
    assert all(p.grad is None for p in model.vision_encoder.parameters())
    assert model.vision_proj.vision_proj[0].weight.grad.abs().sum() > 0
    assert model.lm.layers[0].attn.q_proj.weight.grad.abs().sum() > 0
    trainable = model.trainable_state_dict()
    assert not any(k.startswith("vision_encoder.") for k in trainable)
    assert "vision_proj.vision_proj.0.weight" in trainable and "vision_proj.vision_proj.0.bias" in trainable
    assert any(k.startswith("vision_encoder.") for k in model.state_dict())


def test_projector_layouts():
    lin = VisionProjector(768, 512, "linear")
    assert {k: tuple(v.shape) for k, v in lin.state_dict().items()} == {
        "vision_proj.0.weight": (512, 768), "vision_proj.0.bias": (512,)}
    mlp = VisionProjector(768, 512, "mlp")
    x = torch.randn(2, 3, 768)
    ref = mlp.vision_proj[3](torch.nn.functional.gelu(mlp.vision_proj[1](
        torch.nn.functional.layer_norm(x, (768,), mlp.vision_proj[0].weight, mlp.vision_proj[0].bias))))
    torch.testing.assert_close(mlp(x), ref)
    with pytest.raises(ValueError, match="projector kind"):
        VisionProjector(768, 512, "conv")


def test_bad_input_is_named():
    model = tiny_model()
    ids, pixels = prompts()
    with pytest.raises(ValueError, match="not both"):
        model(ids, pixels, image_features=model.image_features(pixels))
    with pytest.raises(ValueError, match="image_features must be"):
        model(ids, image_features=torch.zeros(2, 1, P + 1, 64))
    with pytest.raises(ValueError, match="pixel_values must be"):
        model(ids, torch.zeros(2, 1, 1, 3, 32, 32))
    with pytest.raises(ValueError, match="rows of input_ids"):
        model(ids, pixels[:1])
    cache = KVCache()
    with torch.no_grad():
        model(ids, pixels, kv_cache=cache)
        with pytest.raises(ValueError, match="prefill only"):
            model(ids[:, :1], pixels, kv_cache=cache)


# ---------------------------------------------------------------------------------------------
# upstream MiniMind-V checkpoints
# ---------------------------------------------------------------------------------------------

def upstream_state_dict(model: MiniMindVLM) -> dict:
    """Our weights under upstream MiniMind-V's names (written out by hand, as upstream has them)."""
    lm = model.lm
    sd = {"model.embed_tokens.weight": lm.embed_tokens.weight, "model.norm.weight": lm.norm.weight,
          "lm_head.weight": lm.lm_head.weight,
          "vision_proj.vision_proj.0.weight": model.vision_proj.vision_proj[0].weight,
          "vision_proj.vision_proj.0.bias": model.vision_proj.vision_proj[0].bias}
    for i, block in enumerate(lm.layers):
        for x in "qkvo":
            sd[f"model.layers.{i}.self_attn.{x}_proj.weight"] = getattr(block.attn, f"{x}_proj").weight
        for x in ("gate", "up", "down"):
            sd[f"model.layers.{i}.mlp.{x}_proj.weight"] = getattr(block.ffn, f"{x}_proj").weight
        sd[f"model.layers.{i}.input_layernorm.weight"] = block.attn_norm.weight
        sd[f"model.layers.{i}.post_attention_layernorm.weight"] = block.ffn_norm.weight
    return {k: v.detach().clone() for k, v in sd.items()}


def test_upstream_checkpoint_and_clip_file_reproduce_our_logits(tmp_path):
    from minimind_v.checkpoint import load_upstream
    from minimind_v.clip_weights import save_converted

    source = tiny_model(seed=3)
    pth = tmp_path / "sft_vlm_512.pth"
    torch.save(upstream_state_dict(source), pth)
    clip = tmp_path / "clip.pt"
    save_converted(source.vision_encoder, source.cfg.vision, clip)
    ids, pixels = prompts()
    with torch.no_grad():
        want = source(ids, pixels)
        for clip_arg in (clip, source.vision_encoder):
            loaded = load_upstream(pth, tiny_cfg(), clip=clip_arg).eval()
            assert isinstance(loaded, MiniMindVLM)
            assert all(not p.requires_grad for p in loaded.vision_encoder.parameters())
            torch.testing.assert_close(loaded(ids, pixels), want, rtol=0, atol=0)


def test_upstream_checkpoint_errors_are_clear(tmp_path):
    from minimind_v.checkpoint import load_upstream

    source = tiny_model(seed=3)
    good = upstream_state_dict(source)
    enc = source.vision_encoder
    bad = dict(good)
    bad["model.layers.0.attention.wq.weight"] = bad.pop("model.layers.0.self_attn.q_proj.weight")
    with pytest.raises(ValueError, match=r"model\.layers\.0\.attention\.wq\.weight"):
        load_upstream(bad, tiny_cfg(), clip=enc)
    missing = {k: v for k, v in good.items() if k != "model.layers.1.mlp.up_proj.weight"}
    with pytest.raises(ValueError, match=r"missing keys.*model\.layers\.1\.mlp\.up_proj\.weight"):
        load_upstream(missing, tiny_cfg(), clip=enc)
    wrong_proj = dict(good)
    wrong_proj["vision_proj.vision_proj.0.weight"] = torch.zeros(32, 65)
    with pytest.raises(ValueError, match=r"vision_proj\.vision_proj\.0\.weight: file \(32, 65\)"):
        load_upstream(wrong_proj, tiny_cfg(), clip=enc)
    text_only = {k: v for k, v in good.items() if not k.startswith("vision_proj.")}
    with pytest.raises(ValueError, match="no vision_proj"):
        load_upstream(text_only, tiny_cfg(), clip=enc)
    with pytest.raises(ValueError, match="clip="):
        load_upstream(good, tiny_cfg())
    with_encoder = dict(good, **{"vision_encoder.ln_pre.weight": torch.ones(64)})
    with pytest.raises(ValueError, match="vision encoder weights"):
        load_upstream(with_encoder, tiny_cfg(), clip=enc)
    other = tiny_cfg()
    other.vision.num_layers = 3
    from minimind_v.vision import CLIPVisionTransformer
    with pytest.raises(ValueError, match="num_layers: 3 \\(expected 2\\)"):
        load_upstream(good, tiny_cfg(), clip=CLIPVisionTransformer(other.vision))
