"""minimind-3v's files load: random-weight stand-ins of upstream's two layouts (`sft_vlm_768.pth` with
q/k-norm and the `vision_proj.mlp.*` projector; `sft_vlm_768_moe.pth` with expert keys), saved in
float16 as upstream's trainer does, plus a SigLIP folder written by transformers' save_pretrained.
They reproduce the composition computed from the raw tensors, generate the same greedy tokens with
and without the KV cache, and a file of the other generation is refused with its keys named."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from minimind_v.checkpoint import load_upstream, upstream_generation
from minimind_v.config import LMConfig, VisionConfig, VLMConfig, minimind_3v, minimind_3v_moe
from minimind_v.generate import generate
from minimind_v.lm import MiniMindLM, count_parameters
from minimind_v.splice import splice_loop
from minimind_v.vlm import MiniMindVLM

transformers = pytest.importorskip("transformers")
from transformers import SiglipVisionConfig, SiglipVisionModel  # noqa: E402

PAD, P = 12, 16          # <|image_pad|> is id 12 in the 3v vocabulary; (64 / 16)^2 patches here


def tiny_3v(use_moe: bool = False) -> VLMConfig:
    """minimind_3v's options at a test's size."""
    return VLMConfig(
        lm=LMConfig(vocab_size=80, hidden_size=48, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                    intermediate_size=96, rms_norm_eps=1e-6, max_seq_len=128, qk_norm=True, use_moe=use_moe),
        vision=VisionConfig(image_size=64, patch_size=16, hidden_size=32, num_layers=2, num_heads=4,
                            intermediate_size=64, layer_norm_eps=1e-6),
        image_pad_id=PAD, num_patches=P, projector="mlp", vision_kind="siglip")


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory):
    torch.manual_seed(0)
    hf = SiglipVisionModel(SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                              num_attention_heads=4, image_size=64, patch_size=16)).eval()
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.2)
    folder = tmp_path_factory.mktemp("siglip2-ve")
    hf.save_pretrained(folder)
    return folder, hf


def source_model(cfg: VLMConfig, siglip_dir, seed: int = 0) -> MiniMindVLM:
    """Random LM + projector at float16 precision (what upstream's files hold), the given encoder."""
    from minimind_v.clip_weights import load_clip_vision
    torch.manual_seed(seed)
    model = MiniMindVLM(cfg).eval()
    model.vision_encoder = load_clip_vision(siglip_dir[0])[0]
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith("vision_encoder."):
                p.copy_((p.uniform_(0.5, 1.5) if p.dim() == 1 else p.normal_(0.0, 0.15)).half().float())
    return model


def upstream_file(model: MiniMindVLM) -> dict:
    """Our weights under upstream minimind-3v's names, written out by hand, float16 as upstream saves."""
    lm, proj = model.lm, model.vision_proj.vision_proj
    sd = {"model.embed_tokens.weight": lm.embed_tokens.weight, "model.norm.weight": lm.norm.weight,
          "lm_head.weight": lm.lm_head.weight}
    for n in (0, 1, 3):                               # LayerNorm, Linear, (GELU), Linear
        sd[f"vision_proj.mlp.{n}.weight"], sd[f"vision_proj.mlp.{n}.bias"] = proj[n].weight, proj[n].bias
    for i, block in enumerate(lm.layers):
        a = f"model.layers.{i}."
        for x in "qkvo":
            sd[a + f"self_attn.{x}_proj.weight"] = getattr(block.attn, f"{x}_proj").weight
        sd[a + "self_attn.q_norm.weight"], sd[a + "self_attn.k_norm.weight"] = block.attn.q_norm.weight, block.attn.k_norm.weight
        sd[a + "input_layernorm.weight"] = block.attn_norm.weight
        sd[a + "post_attention_layernorm.weight"] = block.ffn_norm.weight
        experts = [("", block.ffn)] if not lm.cfg.use_moe else [(f"experts.{e}.", ex) for e, ex in enumerate(block.ffn.experts)]
        if lm.cfg.use_moe:
            sd[a + "mlp.gate.weight"] = block.ffn.gate.weight
        for prefix, ffn in experts:
            for x in ("gate", "up", "down"):
                sd[a + f"mlp.{prefix}{x}_proj.weight"] = getattr(ffn, f"{x}_proj").weight
    return {k: v.detach().half().clone() for k, v in sd.items()}


def prompt():
    ids = torch.tensor([[1, 5] + [PAD] * P + [7, 8, 9], [3] + [PAD] * P + [20, 21, 22, 23]])
    pixels = torch.randn(2, 1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    return ids, pixels


@pytest.mark.parametrize("use_moe", [False, True], ids=["3v", "3v-moe"])
def test_upstream_3v_file_reproduces_the_composition_of_its_tensors(tmp_path, siglip_dir, use_moe):
    cfg = tiny_3v(use_moe)
    source = source_model(cfg, siglip_dir)
    path = tmp_path / ("sft_vlm_768_moe.pth" if use_moe else "sft_vlm_768.pth")
    up = upstream_file(source)
    torch.save(up, path)
    assert upstream_generation(up) == ("minimind-3v-moe" if use_moe else "minimind-3v")
    model = load_upstream(path, cfg, clip=siglip_dir[0]).eval()
    assert all(not p.requires_grad for p in model.vision_encoder.parameters())
    ids, pixels = prompt()
    with torch.no_grad():
        got = model(ids, pixels)
        torch.testing.assert_close(got, source(ids, pixels), rtol=0, atol=0)
        # the reference from the raw tensors: transformers' SigLIP, upstream's projector by hand, the loop splice
        feats = siglip_dir[1](pixel_values=pixels[:, 0]).last_hidden_state                 # (B, P, 32)
        w = {k: v.float() for k, v in up.items()}
        h = F.layer_norm(feats, (32,), w["vision_proj.mlp.0.weight"], w["vision_proj.mlp.0.bias"])
        h = F.linear(F.gelu(F.linear(h, w["vision_proj.mlp.1.weight"], w["vision_proj.mlp.1.bias"])),
                     w["vision_proj.mlp.3.weight"], w["vision_proj.mlp.3.bias"])             # (B, P, 48)
        spliced = splice_loop(ids, F.embedding(ids, w["model.embed_tokens.weight"]), h[:, None], [PAD] * P)
        ref = model.lm.forward_embeds(spliced)
    assert ref.std() > 0.5
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-4)
    with torch.no_grad():
        assert (got[:, -1] - model(ids)[:, -1]).abs().max() > 1e-2                        # the image matters


@pytest.mark.parametrize("use_moe", [False, True], ids=["3v", "3v-moe"])
def test_greedy_generation_with_and_without_the_cache(tmp_path, siglip_dir, use_moe):
    cfg = tiny_3v(use_moe)
    torch.save(upstream_file(source_model(cfg, siglip_dir, seed=2)), tmp_path / "w.pth")
    model = load_upstream(tmp_path / "w.pth", cfg, clip=siglip_dir[0]).eval()
    ids, pixels = prompt()
    out = generate(model, ids, max_new_tokens=8, images=pixels)
    seq = ids
    with torch.no_grad():
        for _ in range(8):
            seq = torch.cat([seq, model(seq, pixels)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)
    assert len(set(out[:, ids.shape[1]:].reshape(-1).tolist())) > 2           # not one repeated token


def test_a_file_of_the_other_generation_is_refused_with_its_keys(siglip_dir):
    up = upstream_file(source_model(tiny_3v(), siglip_dir))
    enc = siglip_dir[0]
    no_norms = {k: v for k, v in up.items() if "_norm.weight" not in k or "layernorm" in k}
    with pytest.raises(ValueError, match=r"missing keys \(4\): model\.layers\.0\.self_attn\.q_norm\.weight"):
        load_upstream(no_norms, tiny_3v(), clip=enc)
    # a MiniMind2-V-style config (no q/k-norm, linear projector) on a 3v file
    old = tiny_3v()
    old.lm.qk_norm, old.projector = False, "linear"
    with pytest.raises(ValueError, match=r"(?s)unexpected keys.*self_attn\.q_norm\.weight.*looks like minimind-3v "
                                         r"and the config like minimind2-v"):
        load_upstream(up, old, clip=enc)
    old.lm.qk_norm = True
    with pytest.raises(ValueError, match=r"(?s)unexpected keys.*vision_proj\.mlp\.0\.weight"):
        load_upstream(up, old, clip=enc)
    moe = upstream_file(source_model(tiny_3v(True), siglip_dir))
    with pytest.raises(ValueError, match=r"(?s)model\.layers\.0\.mlp\.experts\.0\.gate_proj\.weight.*"
                                         r"looks like minimind-3v-moe"):
        load_upstream(moe, tiny_3v(), clip=enc)
    clip_cfg = tiny_3v()
    clip_cfg.vision_kind = "clip"
    with pytest.raises(ValueError, match="a siglip vision encoder, but the config's vision_kind is 'clip'"):
        load_upstream(up, clip_cfg, clip=enc)
    assert upstream_generation({"model.layers.0.self_attn.q_proj.weight": 0, "vision_proj.vision_proj.0.weight": 0}) \
        == "minimind2-v"


def test_presets_have_upstreams_sizes():
    """minimind-3v: LLM 64M (+ projector 1.2M); -moe: 198M in all, 64M active per token (one expert); the LMs
    count exactly as transformers' Qwen3 / Qwen3-MoE at the same configuration."""
    dense, moe = minimind_3v(), minimind_3v_moe()
    assert dense.num_patches == 64 and dense.image_pad_id == 12 and dense.lm.head_dim == 96
    with torch.device("meta"):
        n_dense, n_moe = count_parameters(MiniMindLM(dense.lm)), count_parameters(MiniMindLM(moe.lm))
        n_proj = count_parameters(MiniMindVLM(dense).vision_proj)
        lm = dense.lm
        qwen3 = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
            vocab_size=6400, hidden_size=768, intermediate_size=2432, num_hidden_layers=8, num_attention_heads=8,
            num_key_value_heads=4, head_dim=96, tie_word_embeddings=True))
        qwen3_moe = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
            vocab_size=6400, hidden_size=768, moe_intermediate_size=2432, num_hidden_layers=8,
            num_attention_heads=8, num_key_value_heads=4, head_dim=96, num_experts=4, num_experts_per_tok=1,
            decoder_sparse_step=1, mlp_only_layers=[], tie_word_embeddings=True))
    assert n_dense == sum(p.numel() for p in qwen3.parameters()) == 63_912_192
    assert n_moe == sum(p.numel() for p in qwen3_moe.parameters()) == 198_416_640
    assert n_proj == 768 * 2 + 768 * 768 + 768 + 768 * 768 + 768
    per_expert = 3 * lm.hidden_size * lm.intermediate_size
    assert n_moe - n_dense == 8 * (3 * per_expert + 4 * lm.hidden_size)     # 3 more experts + a router per layer
