"""Every CLIP weight format loads to the same encoder; bad files get clear errors; nothing runs code.

The reference weights are a random transformers CLIPModel (text tower included, so the loader
must ignore it). From them we write: OpenAI's TorchScript archive (a scripted module with
OpenAI's names and layout, float16 like the real `ViT-B-16.pt`), an OpenAI-layout plain state
dict, Hugging Face `model.safetensors` and `pytorch_model.bin`, and our converted file.
"""
from __future__ import annotations

import os
import pickle
import struct
import zipfile
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn

from minimind_v import safetensors_io
from minimind_v.clip_weights import CLIPWeightsError, load_clip_vision

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")
from transformers import CLIPConfig, CLIPModel  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")

WIDTH, HEADS, LAYERS, MLP, PATCH, IMAGE, EMBED = 64, 4, 2, 128, 8, 32, 24


# ------------------------------------------------------------------ OpenAI's module layout
class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, d: int, heads: int, mlp: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, heads)
        self.ln_1 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(d, mlp)), ("gelu", QuickGELU()),
                                              ("c_proj", nn.Linear(mlp, d))]))
        self.ln_2 = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, d: int, layers: int, heads: int, mlp: int):
        super().__init__()
        self.resblocks = nn.Sequential(*[ResidualAttentionBlock(d, heads, mlp) for _ in range(layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resblocks(x)


class VisionTransformer(nn.Module):
    def __init__(self):
        super().__init__()
        grid = IMAGE // PATCH
        self.conv1 = nn.Conv2d(3, WIDTH, PATCH, PATCH, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(WIDTH))
        self.positional_embedding = nn.Parameter(torch.zeros(grid * grid + 1, WIDTH))
        self.ln_pre = nn.LayerNorm(WIDTH)
        self.transformer = Transformer(WIDTH, LAYERS, HEADS, MLP)
        self.ln_post = nn.LayerNorm(WIDTH)
        self.proj = nn.Parameter(torch.zeros(WIDTH, EMBED))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x).flatten(2).permute(0, 2, 1)
        cls = self.class_embedding.to(x.dtype) + torch.zeros(x.shape[0], 1, x.shape[-1], dtype=x.dtype)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.transformer(self.ln_pre(x).permute(1, 0, 2)).permute(1, 0, 2)
        return self.ln_post(x[:, 0, :]) @ self.proj


class OpenAICLIP(nn.Module):
    def __init__(self):
        super().__init__()
        self.visual = VisionTransformer()
        self.token_embedding = nn.Embedding(10, WIDTH)         # a stand-in for the text tower
        self.logit_scale = nn.Parameter(torch.ones([]))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.visual(image)


def hf_to_openai(sd: dict) -> dict:
    """Hugging Face CLIPModel names -> OpenAI names (the test's independent inverse of our map)."""
    out = {"visual.conv1.weight": sd["vision_model.embeddings.patch_embedding.weight"],
           "visual.class_embedding": sd["vision_model.embeddings.class_embedding"],
           "visual.positional_embedding": sd["vision_model.embeddings.position_embedding.weight"],
           "visual.proj": sd["visual_projection.weight"].t().contiguous()}
    for a, b in [("ln_pre", "pre_layrnorm"), ("ln_post", "post_layernorm")]:
        for p in ("weight", "bias"):
            out[f"visual.{a}.{p}"] = sd[f"vision_model.{b}.{p}"]
    for i in range(LAYERS):
        h, o = f"vision_model.encoder.layers.{i}.", f"visual.transformer.resblocks.{i}."
        for p in ("weight", "bias"):
            out[o + f"attn.in_proj_{p}"] = torch.cat([sd[h + f"self_attn.{x}_proj.{p}"] for x in "qkv"])
            for a, b in [("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"),
                         ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")]:
                out[o + f"{a}.{p}"] = sd[h + f"{b}.{p}"]
    return out


@pytest.fixture(scope="module")
def hf_clip():
    """A random CLIPModel whose weights are exactly representable in float16."""
    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=99, bos_token_id=0, eos_token_id=1, pad_token_id=1),
        vision_config=dict(hidden_size=WIDTH, intermediate_size=MLP, num_hidden_layers=LAYERS,
                           num_attention_heads=HEADS, image_size=IMAGE, patch_size=PATCH),
        projection_dim=EMBED)
    model = CLIPModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
            p.copy_(p.half().float())             # so the fp16 archive holds the very same weights
    return model


@pytest.fixture(scope="module")
def pixels():
    torch.manual_seed(1)
    return torch.randn(2, 3, IMAGE, IMAGE)


@pytest.fixture(scope="module")
def expected(hf_clip, pixels):
    with torch.no_grad():
        vm = hf_clip.vision_model(pixel_values=pixels)
        return vm.last_hidden_state, vm.pooler_output, hf_clip.get_image_features(pixel_values=pixels)


def check(model, pixels, expected):
    hidden, pooled, embeds = expected
    with torch.no_grad():
        assert model(pixels).std() > 0.1
        torch.testing.assert_close(model(pixels), hidden, rtol=0, atol=1e-4)
        torch.testing.assert_close(model.pooled_output(pixels), pooled, rtol=0, atol=1e-4)
        embeds = getattr(embeds, "pooler_output", embeds)
        torch.testing.assert_close(model.image_embeds(pixels), embeds, rtol=0, atol=1e-4)


@pytest.fixture(scope="module")
def openai_archive(hf_clip, tmp_path_factory):
    module = OpenAICLIP()
    missing, unexpected = module.load_state_dict(hf_to_openai(hf_clip.state_dict()), strict=False)
    assert unexpected == [] and set(missing) == {"token_embedding.weight", "logit_scale"}
    path = tmp_path_factory.mktemp("openai") / "ViT-tiny.pt"
    torch.jit.save(torch.jit.script(module.half()), str(path))
    return path


# ------------------------------------------------------------------ every format, same outputs
def test_openai_torchscript_archive(openai_archive, pixels, expected):
    with zipfile.ZipFile(openai_archive) as z:                   # it really is a TorchScript archive
        assert any("/code/" in n for n in z.namelist())
    model, cfg = load_clip_vision(openai_archive)
    assert (cfg.hidden_size, cfg.num_heads, cfg.num_layers, cfg.patch_size, cfg.image_size,
            cfg.intermediate_size, cfg.projection_dim) == (WIDTH, WIDTH // 64, LAYERS, PATCH, IMAGE, MLP, EMBED)
    # shapes cannot tell the head count; CLIP's rule (width / 64) gives 1 here, so say it
    model, cfg = load_clip_vision(openai_archive, num_heads=HEADS)
    assert model.patch_embed.weight.dtype == torch.float32
    check(model, pixels, expected)
    half, _ = load_clip_vision(openai_archive, dtype=torch.float16, num_heads=HEADS)
    assert half.patch_embed.weight.dtype == torch.float16


def test_openai_plain_state_dict(hf_clip, tmp_path, pixels, expected):
    sd = {k: v.half() for k, v in hf_to_openai(hf_clip.state_dict()).items()}
    sd["logit_scale"] = torch.tensor(4.6)                         # non-vision keys are ignored
    torch.save(sd, tmp_path / "clip_state.pth")
    model, _ = load_clip_vision(tmp_path / "clip_state.pth", num_heads=HEADS)
    check(model, pixels, expected)


def test_hf_folder_safetensors_and_bin(hf_clip, tmp_path, pixels, expected):
    hf_clip.save_pretrained(tmp_path / "hf")
    for path in (tmp_path / "hf", tmp_path / "hf" / "model.safetensors"):
        model, cfg = load_clip_vision(path)                        # heads from config.json
        assert cfg.num_heads == HEADS
        check(model, pixels, expected)
    hf_clip.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    check(load_clip_vision(tmp_path / "sharded")[0], pixels, expected)
    (tmp_path / "bin").mkdir()
    torch.save(hf_clip.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    model, _ = load_clip_vision(tmp_path / "bin" / "pytorch_model.bin", num_heads=HEADS)
    check(model, pixels, expected)
    # keys without the `vision_model.` prefix (a bare vision tower), safetensors written by the library
    bare = {k[len("vision_model."):]: v for k, v in hf_clip.state_dict().items() if k.startswith("vision_model.")}
    safetensors_torch.save_file(bare, str(tmp_path / "bare.safetensors"))
    model, _ = load_clip_vision(tmp_path / "bare.safetensors", num_heads=HEADS)
    assert model.proj is None
    torch.testing.assert_close(model(pixels), expected[0], rtol=0, atol=1e-4)


def test_convert_clip_cli(openai_archive, tmp_path, pixels, expected):
    from minimind_v.cli import main
    dst = tmp_path / "clip_vision.pt"
    assert main(["convert-clip", str(openai_archive), str(dst), "--num-heads", str(HEADS)]) == 0
    obj = torch.load(dst, weights_only=True)                     # plain data, no code
    assert obj["config"]["num_heads"] == HEADS and "blocks.1.attn.qkv.weight" in obj["state_dict"]
    model, cfg = load_clip_vision(dst)
    assert cfg.num_heads == HEADS
    check(model, pixels, expected)
    assert main(["convert-clip", str(tmp_path / "nope.pt"), str(tmp_path / "x.pt")]) == 1


# ------------------------------------------------------------------ our safetensors reader
def test_safetensors_reader_and_writer_match_the_library(tmp_path):
    torch.manual_seed(0)
    tensors = {"f32": torch.randn(3, 5), "f16": torch.randn(7).half(), "bf16": torch.randn(2, 2, 3).bfloat16(),
               "f64": torch.randn(4, dtype=torch.float64), "i64": torch.arange(-5, 5),
               "u8": torch.randint(0, 255, (9,), dtype=torch.uint8), "bool": torch.rand(6) > 0.5,
               "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4)}
    safetensors_torch.save_file(tensors, str(tmp_path / "lib.safetensors"), metadata={"format": "pt"})
    ours = safetensors_io.load_file(tmp_path / "lib.safetensors")
    assert ours.keys() == tensors.keys()
    for k, v in tensors.items():
        assert ours[k].dtype == v.dtype and torch.equal(ours[k], v), k
    safetensors_io.save_file(tensors, tmp_path / "ours.safetensors", metadata={"format": "pt"})
    theirs = safetensors_torch.load_file(str(tmp_path / "ours.safetensors"))
    for k, v in tensors.items():
        assert theirs[k].dtype == v.dtype and torch.equal(theirs[k], v), k


# ------------------------------------------------------------------ bad files
def test_truncated_files(openai_archive, tmp_path):
    data = openai_archive.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CLIPWeightsError, match="cut.pt"):
        load_clip_vision(tmp_path / "cut.pt")
    safetensors_torch.save_file({"embeddings.patch_embedding.weight": torch.randn(8, 3, 4, 4)},
                                str(tmp_path / "full.safetensors"))
    raw = (tmp_path / "full.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(raw[:-10])
    with pytest.raises(CLIPWeightsError, match=r"cut.safetensors.*embeddings.patch_embedding.weight.*truncated"):
        load_clip_vision(tmp_path / "cut.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(struct.pack("<Q", 10 ** 12) + b"{}")
    with pytest.raises(CLIPWeightsError, match="junk.safetensors"):
        load_clip_vision(tmp_path / "junk.safetensors")


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_code_in_pickles_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "pwned"
    evil = pickle.dumps({"visual.conv1.weight": RunsCode(marker)}, protocol=2)
    # 1. dressed as a TorchScript archive (our restricted unpickler)
    with zipfile.ZipFile(tmp_path / "evil_ts.pt", "w") as z:
        z.writestr("archive/data.pkl", evil)
        z.writestr("archive/code/__torch__.py", "")
        z.writestr("archive/constants.pkl", pickle.dumps((), protocol=2))
    with pytest.raises(CLIPWeightsError, match=r"evil_ts.pt.*refusing.*system"):
        load_clip_vision(tmp_path / "evil_ts.pt")
    # 2. a torch.save file (torch.load(weights_only=True))
    torch.save({"visual.conv1.weight": RunsCode(marker)}, tmp_path / "evil_plain.pt")
    with pytest.raises(CLIPWeightsError, match=r"evil_plain.pt.*refused"):
        load_clip_vision(tmp_path / "evil_plain.pt")
    # 3. builtins.eval through a TorchScript-looking pickle
    payload = f"open({str(marker)!r}, 'w')".encode()          # GLOBAL builtins.eval, (payload,), REDUCE
    evil_eval = b"\x80\x02cbuiltins\neval\nX" + struct.pack("<I", len(payload)) + payload + b"\x85R."
    with zipfile.ZipFile(tmp_path / "evil_eval.pt", "w") as z:
        z.writestr("archive/data.pkl", evil_eval)
        z.writestr("archive/code/__torch__.py", "")
    with pytest.raises(CLIPWeightsError, match=r"refusing.*builtins.eval"):
        load_clip_vision(tmp_path / "evil_eval.pt")
    assert not marker.exists()


def test_wrong_shape_missing_key_and_not_clip(hf_clip, tmp_path):
    sd = hf_to_openai(hf_clip.state_dict())
    bad = dict(sd, **{"visual.transformer.resblocks.1.attn.in_proj_weight": torch.randn(3 * WIDTH, WIDTH + 1)})
    torch.save(bad, tmp_path / "shape.pt")
    with pytest.raises(CLIPWeightsError, match=r"shape.pt.*blocks.1.attn.qkv.weight.*\(192, 65\).*\(192, 64\)"):
        load_clip_vision(tmp_path / "shape.pt")
    missing = {k: v for k, v in sd.items() if k != "visual.transformer.resblocks.0.mlp.c_fc.bias"}
    torch.save(missing, tmp_path / "missing.pt")
    with pytest.raises(CLIPWeightsError, match=r"missing.pt.*'visual.transformer.resblocks.0.mlp.c_fc.bias'"):
        load_clip_vision(tmp_path / "missing.pt")
    torch.save({"model.layers.0.self_attn.q_proj.weight": torch.randn(4, 4)}, tmp_path / "llm.pth")
    with pytest.raises(CLIPWeightsError, match=r"llm.pth.*not a CLIP vision checkpoint.*model.layers.0"):
        load_clip_vision(tmp_path / "llm.pth")
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(CLIPWeightsError, match="text.pt"):
        load_clip_vision(tmp_path / "text.pt")
