"""Our SigLIP encoder equals transformers' SiglipVisionModel at the same random weights (a tiny config
and the real ViT-B/32 at 256 px), loaded through `load_clip_vision` from each Hugging Face layout;
`preprocess_siglip` equals transformers' SiglipImageProcessor; bad files get clear errors."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from minimind_v.clip_weights import CLIPWeightsError, load_clip_vision, load_vision
from minimind_v.config import VisionConfig, siglip2_b32_256
from minimind_v.siglip import SiglipVisionTransformer, preprocess_siglip, preprocessor_settings
from minimind_v.vision import CLIPVisionTransformer

transformers = pytest.importorskip("transformers")
from transformers import SiglipConfig, SiglipModel, SiglipVisionConfig, SiglipVisionModel  # noqa: E402

TINY = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
            image_size=64, patch_size=16)


def hf_siglip(seed=0, cls=SiglipVisionModel, **kw):
    torch.manual_seed(seed)
    model = cls(SiglipVisionConfig(**{**TINY, **kw})).eval()
    with torch.no_grad():   # LayerNorm gains / biases away from 1 / 0, so none is trivially right
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.2)
    return model


@pytest.mark.parametrize("head", [True, False])
def test_tiny_equals_transformers(tmp_path, head):
    ref = hf_siglip(vision_use_head=head)
    ref.save_pretrained(tmp_path)
    ours, cfg = load_clip_vision(tmp_path)
    assert isinstance(ours, SiglipVisionTransformer) and ours.kind == "siglip"
    assert cfg == VisionConfig(image_size=64, patch_size=16, hidden_size=64, num_layers=2, num_heads=4,
                               intermediate_size=160, layer_norm_eps=1e-6)
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = ref(pixel_values=x)
        hidden = ours(x)
        assert hidden.shape == (3, 16, 64) and hidden.std() > 0.5
        torch.testing.assert_close(hidden, out.last_hidden_state, rtol=0, atol=1e-5)
        torch.testing.assert_close(ours.patch_features(x), hidden, rtol=0, atol=0)
        if head:
            torch.testing.assert_close(ours.pooled_output(x), out.pooler_output, rtol=0, atol=1e-5)
        else:
            with pytest.raises(RuntimeError, match="no pooling head"):
                ours.pooled_output(x)


def test_real_size_b32_256_equals_transformers(tmp_path):
    """siglip2-base-p32-256's architecture (93M parameters, random): the (1, 64, 768) that 3v projects."""
    torch.manual_seed(0)
    ref = SiglipVisionModel(SiglipVisionConfig(image_size=256, patch_size=32)).eval()
    ref.save_pretrained(tmp_path)
    ours, cfg = load_vision(tmp_path / "model.safetensors")
    assert cfg == siglip2_b32_256()
    x = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = ref(pixel_values=x)
        hidden = ours(x)
        assert hidden.shape == (1, 64, 768)
        # measured 3e-6 (float32 summation order); tanh vs erf gelu alone moves it by 9e-4
        torch.testing.assert_close(hidden, out.last_hidden_state, rtol=0, atol=2e-5)
        torch.testing.assert_close(ours.head(hidden), out.pooler_output, rtol=0, atol=2e-5)


def test_other_layouts_prefixed_bin_and_a_whole_siglip_model(tmp_path):
    ref = hf_siglip(seed=3)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = ref(pixel_values=x).last_hidden_state
    # a pytorch_model.bin with the `vision_model.` prefix (transformers 4.x's SiglipVisionModel layout)
    folder = tmp_path / "bin"
    folder.mkdir()
    torch.save({"vision_model." + k: v for k, v in ref.state_dict().items()}, folder / "pytorch_model.bin")
    (folder / "config.json").write_text(json.dumps(ref.config.to_dict()))
    ours, _ = load_clip_vision(folder)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), want, rtol=0, atol=1e-5)
    # a SiglipModel (text tower too): its vision half is taken, the rest ignored
    torch.manual_seed(4)
    full = SiglipModel(SiglipConfig(vision_config=dict(TINY), text_config=dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=50))).eval()
    full.save_pretrained(tmp_path / "full")
    ours, cfg = load_clip_vision(tmp_path / "full")
    assert cfg.num_heads == 4
    with torch.no_grad():
        torch.testing.assert_close(ours(x), full.vision_model(pixel_values=x).last_hidden_state, rtol=0, atol=1e-5)


def test_the_tolerance_tells_the_plausible_mistakes_apart(tmp_path):
    """CLIP's quick_gelu, or the features before the final LayerNorm, miss by far more than 1e-5."""
    ref = hf_siglip(seed=5)
    ref.save_pretrained(tmp_path)
    ours, _ = load_clip_vision(tmp_path)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = ref(pixel_values=x).last_hidden_state
        h = ours.embed(x)
        for block in ours.blocks:
            h = block(h)[0]
        assert (h - want).abs().max() > 0.1                         # before ln_post
        exact = [b.mlp.forward for b in ours.blocks]
        for b in ours.blocks:
            b.mlp.forward = lambda y, m=b.mlp: m.fc2(m.fc1(y) * torch.sigmoid(1.702 * m.fc1(y)))
        assert (ours(x) - want).abs().max() > 1e-3                  # quick_gelu instead of tanh gelu
        for b in ours.blocks:
            b.mlp.forward = lambda y, m=b.mlp: m.fc2(F.gelu(m.fc1(y)))
        assert (ours(x) - want).abs().max() > 1e-5                  # exact (erf) gelu instead of tanh
        for b, f in zip(ours.blocks, exact):
            b.mlp.forward = f
        torch.testing.assert_close(ours(x), want, rtol=0, atol=1e-5)


def test_bad_files_are_named(tmp_path):
    ref = hf_siglip()
    sd = {"vision_model." + k: v for k, v in ref.state_dict().items()}
    path = tmp_path / "m.bin"
    torch.save({k: v for k, v in sd.items() if "layers.1.mlp.fc2.weight" not in k}, path)
    with pytest.raises(CLIPWeightsError, match=r"m\.bin: missing key 'vision_model\.encoder\.layers\.1\.mlp\.fc2\.weight'"):
        load_clip_vision(path)
    torch.save(dict(sd, **{"vision_model.encoder.layers.0.extra.weight": torch.ones(2)}), path)
    with pytest.raises(CLIPWeightsError, match=r"unexpected key.*layers\.0\.extra\.weight"):
        load_clip_vision(path)
    bad = dict(sd)
    bad["vision_model.encoder.layers.0.mlp.fc1.bias"] = torch.ones(7)
    torch.save(bad, path)
    with pytest.raises(CLIPWeightsError, match=r"blocks\.0\.mlp\.fc1\.bias has shape \(7,\)"):
        load_clip_vision(path)
    folder = tmp_path / "act"
    ref.save_pretrained(folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(cfg, hidden_act="relu")))
    with pytest.raises(CLIPWeightsError, match="hidden_act='relu'"):
        load_clip_vision(folder)


def test_a_clip_file_still_loads_as_clip(tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModel
    torch.manual_seed(0)
    CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=2, image_size=32, patch_size=16)).save_pretrained(tmp_path)
    assert isinstance(load_vision(tmp_path)[0], CLIPVisionTransformer)


# ------------------------------------------------------------------------------ preprocessing
def images():
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (83, 141, 3), dtype=np.uint8), "RGB")
    tall = Image.fromarray(rng.integers(0, 256, (300, 97, 3), dtype=np.uint8), "RGB")
    rgba = Image.fromarray(rng.integers(0, 256, (64, 50, 4), dtype=np.uint8), "RGBA")
    grey = Image.fromarray(rng.integers(0, 256, (40, 70), dtype=np.uint8), "L")
    return {"rgb": rgb, "tall": tall, "rgba": rgba, "grey": grey}


@pytest.mark.parametrize("settings", [dict(size=256, resample="bilinear"), dict(size=224, resample="bicubic")])
def test_preprocess_equals_siglip_image_processor(settings):
    from transformers.image_utils import PILImageResampling
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil
    S = settings["size"]
    proc = SiglipImageProcessorPil(size={"height": S, "width": S},
                                   resample=getattr(PILImageResampling, settings["resample"].upper()))
    for name, img in images().items():
        ours = preprocess_siglip(img, **settings)
        # upstream's image2tensor: RGBA / LA -> RGB (alpha dropped) before the processor
        theirs_in = img.convert("RGB") if img.mode in ("RGBA", "LA") else img
        ref = proc(images=theirs_in, return_tensors="pt")["pixel_values"][0]
        assert ours.shape == (3, S, S) and ours.dtype == torch.float32, name
        torch.testing.assert_close(ours, ref, rtol=0, atol=0, msg=name)
        assert ours.min() < -0.9 and ours.max() > 0.9
    other = "bicubic" if settings["resample"] == "bilinear" else "bilinear"
    assert not torch.equal(preprocess_siglip(images()["rgb"], S, other), preprocess_siglip(images()["rgb"], **settings))


def test_preprocessor_settings_from_a_saved_processor(tmp_path):
    from transformers.image_utils import PILImageResampling
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil
    SiglipImageProcessorPil(size={"height": 256, "width": 256},
                            resample=PILImageResampling.BILINEAR).save_pretrained(tmp_path)
    assert preprocessor_settings(tmp_path) == dict(size=256, resample="bilinear", mean=(0.5, 0.5, 0.5),
                                                   std=(0.5, 0.5, 0.5))
    assert preprocessor_settings(tmp_path / "nothing") == {}
    with pytest.raises(ValueError, match="resample must be one of"):
        preprocess_siglip(images()["rgb"], resample="box")
