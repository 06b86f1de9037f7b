"""The conv stem (`VisionConfig.stem="conv"`): a KxK convolution, ReLU, the max over each patch;
and `stem="both"`: CLIP's stride-p patch vectors plus the conv stem's (through its own 1x1).

Checked against torch's own ops written out by hand, for the property it exists for (a shape
gives the same patch vector wherever it sits inside its patch, unlike the stride-p patch
convolution), and through the model: config round trip, checkpoint reload, the feature cache's
fingerprint.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from minimind_v.config import VisionConfig, VLMConfig, tiny_lm
from minimind_v.vision import CLIPVisionTransformer, ConvStem, patch_tokens
from minimind_v.vlm import MiniMindVLM


def small(**over) -> VisionConfig:
    return VisionConfig(**{**dict(image_size=30, patch_size=10, hidden_size=32, num_layers=1, num_heads=2,
                                  intermediate_size=64, projection_dim=8, stem="conv", stem_channels=12), **over})


def test_the_stem_is_conv_relu_then_the_max_of_each_patch():
    torch.manual_seed(0)
    cfg = small()
    stem = ConvStem(cfg).double()
    x = torch.randn(2, 3, 30, 30, dtype=torch.float64)
    maps = torch.relu(F.conv2d(x, stem.conv.weight, stem.conv.bias, padding=2))      # (2, 12, 30, 30)
    want = maps.reshape(2, 12, 3, 10, 3, 10).amax(dim=(3, 5))                           # (2, 12, 3, 3)
    torch.testing.assert_close(stem(x), want)
    # the patch at row 1, column 2 is the max over rows 10..19, columns 20..29
    torch.testing.assert_close(stem(x)[:, :, 1, 2], maps[:, :, 10:20, 20:30].amax(dim=(2, 3)))
    mean = maps.reshape(2, 12, 3, 10, 3, 10).mean(dim=(3, 5))                           # a plausible mistake
    assert (stem(x) - mean).abs().max() > 0.1


def test_both_adds_the_patch_convolution_and_the_stems_1x1_of_its_maxima():
    torch.manual_seed(0)
    enc = CLIPVisionTransformer(small(stem="both")).double()
    stem = enc.stem
    assert enc.patch_embed.weight.shape == (32, 3, 10, 10) and stem.proj.weight.shape == (32, 12, 1, 1)
    x = torch.randn(2, 3, 30, 30, dtype=torch.float64)
    patches = F.conv2d(x, enc.patch_embed.weight, stride=10)                            # (2, 32, 3, 3) CLIP's
    maxima = torch.relu(F.conv2d(x, stem.conv.weight, stem.conv.bias, padding=2)).reshape(2, 12, 3, 10, 3, 10)
    local = torch.einsum("dk,bkij->bdij", stem.proj.weight[:, :, 0, 0], maxima.amax(dim=(3, 5)))   # (2, 32, 3, 3)
    want = (patches + local).flatten(2).transpose(1, 2)                                 # (2, 9, 32)
    got = patch_tokens(enc.patch_embed, enc.cfg, x, stem)
    torch.testing.assert_close(got, want)
    for one in (patches, local):                                                        # either half alone is wrong
        assert (got - one.flatten(2).transpose(1, 2)).abs().max() > 0.1
    # and it is what the encoder embeds (before the class token, positions and ln_pre)
    cls = enc.class_embedding.expand(2, 1, -1)
    torch.testing.assert_close(enc.embed(x), enc.ln_pre(torch.cat([cls, want], 1) + enc.position_embedding))


def square(at: tuple[int, int], size: int = 30) -> torch.Tensor:
    """A 3x3 red square on a grey picture, its top-left corner at `at` = (row, column)."""
    x = torch.full((1, 3, size, size), -0.3)
    r, c = at
    x[0, 0, r:r + 3, c:c + 3], x[0, 1:, r:r + 3, c:c + 3] = 1.5, -1.0
    return x


def test_a_shape_gives_the_same_patch_vector_wherever_it_sits_in_its_patch():
    torch.manual_seed(0)
    conv = CLIPVisionTransformer(small()).eval()
    patch = CLIPVisionTransformer(small(stem="patch")).eval()
    with torch.no_grad():                                          # both squares inside patch (1, 1): rows/cols 10..19
        a, b = (conv.embed(square(at)) for at in ((12, 12), (15, 14)))
        pa, pb = (patch.embed(square(at)) for at in ((12, 12), (15, 14)))
        far = conv.embed(square((2, 22)))                          # in another patch
    centre = 1 + 4                                                 # token 0 is CLS; patch (1, 1) is the 5th
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)            # every token the same
    assert (pa[0, centre] - pb[0, centre]).norm() > 0.1 * pa[0, centre].norm()
    assert (a[0, centre] - far[0, centre]).norm() > 0.1 * a[0, centre].norm()   # an empty patch differs


@pytest.mark.parametrize("stem, patch_embed", [("conv", (32, 12, 1, 1)), ("both", (32, 3, 10, 10))])
def test_a_conv_stem_model_round_trips_and_keys_its_cache(tmp_path, stem, patch_embed):
    from minimind_v.checkpoint import atomic_save
    from minimind_v.features import FeatureCache
    from minimind_v.rundir import WEIGHTS, load_model, write_config

    torch.manual_seed(0)
    vis = small(stem=stem)
    cfg = VLMConfig(lm=tiny_lm(64, max_seq_len=64), vision=vis, image_pad_id=3, num_patches=vis.num_patches)
    again = VLMConfig(**cfg.to_dict())
    assert again.vision.stem == stem and again.vision.stem_channels == 12
    model = MiniMindVLM(cfg).eval()
    assert model.vision_encoder.patch_embed.weight.shape == patch_embed
    ids = torch.randint(4, 64, (1, 20))
    ids[0, 5:14] = 3
    pixels = torch.randn(1, 3, 30, 30)
    write_config(tmp_path, cfg, "sft")                             # a run directory, as `train` writes it
    atomic_save(model.state_dict(), tmp_path / WEIGHTS)
    loaded, info = load_model(tmp_path)
    assert info["model_config"]["vision"]["stem"] == stem
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, pixels), model(ids, pixels), rtol=0, atol=0)
    plain = MiniMindVLM(VLMConfig(**{**cfg.to_dict(), "vision": {**vis.to_dict(), "stem": "patch"}}))
    assert FeatureCache.fingerprint_of(model.vision_encoder) != FeatureCache.fingerprint_of(plain.vision_encoder)


def test_a_bad_stem_is_named():
    with pytest.raises(ValueError, match="stem must be one of 'patch', 'conv', 'both', got 'cnn'"):
        small(stem="cnn")
    with pytest.raises(ValueError, match="stem_kernel must be an odd"):
        small(stem_kernel=4)
    vis = small()
    with pytest.raises(ValueError, match="SigLIP encoder has only the patch stem"):
        VLMConfig(lm=tiny_lm(64), vision=vis, num_patches=vis.num_patches, vision_kind="siglip")
    with pytest.raises(ValueError, match="SigLIP encoder has only the patch stem"):
        VLMConfig(lm=tiny_lm(64), vision=small(stem="both"), num_patches=vis.num_patches, vision_kind="siglip")


def test_learner_modes_patchify_embed_keeps_a_conv_stem():
    """Learner mode swaps `embed` for a patchify version; a conv-stem encoder must keep its stem."""
    from minimind_v.learner import embed_by_patchify

    for stem in ("conv", "patch", "both"):
        torch.manual_seed(0)
        model = CLIPVisionTransformer(small(stem=stem)).double()
        x = torch.randn(2, 3, 30, 30, dtype=torch.float64)
        torch.testing.assert_close(embed_by_patchify(model, x), model.embed(x), rtol=1e-12, atol=1e-12)
