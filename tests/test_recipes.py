"""Recipes: explicit options win over a recipe, the recipe's initialisation touches only random
weights, `model-config` writes a loadable small config, and the demo's model is the recipe's."""
from __future__ import annotations

import json

import pytest
import torch

from minimind_v.cli import main
from minimind_v.config import VLMConfig
from minimind_v.recipes import RECIPES, ModelInit, apply_init, init_for, model_config, pick_patch_size, resolve
from minimind_v.synthetic import make_dataset
from minimind_v.train import TrainConfig
from minimind_v.vlm import MiniMindVLM


@pytest.fixture(autouse=True)
def one_thread(tmp_path, monkeypatch):
    monkeypatch.setenv("MINIMIND_V_CACHE", str(tmp_path / "cache"))        # the matmul peak, not in ~/.cache
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_explicit_options_override_the_recipe():
    r = RECIPES["from-scratch-small"]
    tcfg, src = resolve(TrainConfig, dict(r.stages["sft"], stage="sft"), {"lr": 1e-3, "stage": "sft"})
    assert tcfg.lr == 1e-3 and src["lr"] == "option"
    assert tcfg.batch_size == 64 and src["batch_size"] == "recipe" and tcfg.max_steps == 4000
    assert tcfg.trainable == ("lm", "projector") and tcfg.feature_cache and tcfg.warmup_steps == 0
    assert tcfg.weight_decay == 0.01 and src["weight_decay"] == "default"
    plain, _ = resolve(TrainConfig, {}, {"stage": "sft"})
    assert plain.lr == 1e-6 and plain.batch_size == 4                      # without a recipe: the real defaults


def test_init_scales_only_random_weights():
    cfg = model_config(60, 3, 48, "tiny")
    torch.manual_seed(0)
    ref = MiniMindVLM(cfg)
    torch.manual_seed(0)
    model = MiniMindVLM(cfg)
    apply_init(model, ModelInit(pos_scale=10.0, embed_std=0.1), log=lambda m: None)
    assert torch.equal(model.vision_encoder.position_embedding, 10.0 * ref.vision_encoder.position_embedding)
    assert abs(model.lm.embed_tokens.weight.std().item() - 0.1) < 0.01
    assert model.lm.lm_head.weight is model.lm.embed_tokens.weight          # still tied
    torch.manual_seed(0)
    kept = MiniMindVLM(cfg)
    apply_init(kept, ModelInit(pos_scale=10.0, embed_std=0.1), fresh_lm=False, fresh_vision=False, log=lambda m: None)
    for a, b in zip(kept.state_dict().values(), ref.state_dict().values()):
        assert torch.equal(a, b)


def test_model_config_command(tmp_path, capsys):
    data = make_dataset(tmp_path / "d", 8, 2, seed=0)
    assert main(["tokenizer", "train", str(data / "sft_train.jsonl"), "--out", str(tmp_path / "t"),
                 "--vocab-size", "400"]) == 0
    assert main(["model-config", "--tokenizer", str(tmp_path / "t.model"), "--image-size", "64",
                 "--out", str(tmp_path / "cfg.json")]) == 0
    cfg = VLMConfig(**json.loads((tmp_path / "cfg.json").read_text()))
    assert (cfg.lm.vocab_size, cfg.image_pad_id, cfg.num_patches, cfg.vision.patch_size) == (400, 3, 16, 16)
    assert (cfg.lm.hidden_size, cfg.lm.num_layers, cfg.vision.num_layers) == (128, 2, 1)
    MiniMindVLM(cfg)
    assert [pick_patch_size(s) for s in (48, 64, 32, 96, 72)] == [16, 16, 8, 16, 12]
    assert cfg.projector == "linear"                                       # MiniMind2-V's, unless asked
    assert main(["model-config", "--tokenizer", str(tmp_path / "t.model"), "--image-size", "64",
                 "--projector", "mlp", "--out", str(tmp_path / "mlp.json")]) == 0
    mlp = VLMConfig(**json.loads((tmp_path / "mlp.json").read_text()))
    assert mlp.projector == "mlp" and mlp.num_patches == 16
    layers = MiniMindVLM(mlp).vision_proj.vision_proj
    assert [type(m).__name__ for m in layers] == ["LayerNorm", "Linear", "GELU", "Linear"]
    assert (cfg.vision.stem, cfg.vision.stem_channels) == ("conv", 256)   # the preset's
    assert MiniMindVLM(cfg).vision_encoder.stem.conv.weight.shape == (256, 3, 5, 5)
    assert main(["model-config", "--tokenizer", str(tmp_path / "t.model"), "--image-size", "64",
                 "--stem", "both", "--stem-channels", "32", "--out", str(tmp_path / "both.json")]) == 0
    both = VLMConfig(**json.loads((tmp_path / "both.json").read_text()))
    assert (both.vision.stem, both.vision.stem_channels) == ("both", 32)
    assert MiniMindVLM(both).vision_encoder.stem.proj.weight.shape == (128, 32, 1, 1)
    assert main(["model-config", "--tokenizer", str(tmp_path / "t.model"), "--image-size", "64",
                 "--stem", "patch", "--out", str(tmp_path / "patch.json")]) == 0          # CLIP's, when asked
    assert json.loads((tmp_path / "patch.json").read_text())["vision"]["stem"] == "patch"
    assert main(["model-config", "--tokenizer", str(tmp_path / "t.model"), "--image-size", "101",
                 "--out", str(tmp_path / "x.json")]) == 2
    assert "image size 101" in capsys.readouterr().err


def test_the_demo_model_is_the_recipes_preset():
    from minimind_v.demo import demo_config
    cfg = demo_config(627, 3, RECIPES["from-scratch-small"])
    lm, v = cfg.lm, cfg.vision
    # the demo's numbers, which its measured accuracy depends on
    assert (lm.hidden_size, lm.num_layers, lm.num_heads, lm.num_kv_heads, lm.max_seq_len) == (128, 2, 4, 2, 256)
    assert (v.image_size, v.patch_size, v.hidden_size, v.num_layers, v.num_heads, v.intermediate_size) == \
           (48, 16, 128, 1, 4, 512)
    assert cfg.num_patches == 9 and v.stem == "patch" and cfg.projector == "linear"
    # and its initialisation: the patch stem's x10 positions, as its seven seeds were measured
    assert init_for(RECIPES["from-scratch-small"], v.stem) == {"pos_scale": 10.0, "embed_std": 0.1}


def test_the_recipe_scales_positions_by_the_models_stem(tmp_path, capsys):
    """A conv-stem model (model-config's default) keeps its positions as drawn (x1); the patch
    stem's get x10: `train` picks the recipe's value for the --model-config it is given."""
    data = make_dataset(tmp_path / "d", 16, 2, seed=0)
    assert main(["tokenizer", "train", str(data / "sft_train.jsonl"), "--out", str(tmp_path / "t"),
                 "--vocab-size", "400"]) == 0
    for stem, scale in (("conv", 1.0), ("patch", 10.0), ("both", 3.0)):
        cfg_path = tmp_path / f"{stem}.json"
        assert main(["model-config", "--tokenizer", str(tmp_path / "t.model"), "--preset", "tiny",
                     "--stem", stem, "--stem-channels", "8", "--out", str(cfg_path)]) == 0
        capsys.readouterr()
        assert main(["train", "--stage", "sft", "--recipe", "smoke", "--model-config", str(cfg_path),
                     "--data", str(data / "sft_train.jsonl"), "--images", str(data / "images"),
                     "--tokenizer", str(tmp_path / "t.model"), "--out", str(tmp_path / stem),
                     "--max-steps", "1"]) == 0
        out = capsys.readouterr().out
        assert f"{stem} vision stem" in out and f"pos_scale = {scale}  (recipe)" in out
        info = json.loads((tmp_path / stem / "config.json").read_text())
        assert info["model_init"]["pos_scale"] == scale


def test_train_cli_prints_the_effective_settings(tmp_path, capsys):
    data = make_dataset(tmp_path / "d", 32, 4, seed=0)
    assert main(["tokenizer", "train", str(data / "sft_train.jsonl"), "--out", str(tmp_path / "t"),
                 "--vocab-size", "400"]) == 0
    assert main(["train", "--stage", "sft", "--recipe", "smoke", "--data", str(data / "sft_train.jsonl"),
                 "--images", str(data / "images"), "--tokenizer", str(tmp_path / "t.model"), "--out",
                 str(tmp_path / "run"), "--lr", "0.001", "--pos-scale", "4"]) == 0
    out = capsys.readouterr().out
    assert "lr = 0.001  (option)" in out and "batch_size = 16  (recipe)" in out
    assert "pos_scale = 4.0  (option)" in out and "embed_std = 0.1  (recipe)" in out
    assert "throughput:" in out and "MFU" in out
    info = json.loads((tmp_path / "run" / "config.json").read_text())
    assert info["recipe"] == "smoke" and info["model_init"] == {"pos_scale": 4.0, "embed_std": 0.1}
    assert info["model_config"]["num_patches"] == 9                     # the smoke preset at 48 px
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and rows[0]["images"] == 16 and rows[0]["rows"] == 16
    assert (tmp_path / "run" / "report.md").is_file()


def test_a_trainable_encoder_refuses_the_recipes_feature_cache(tmp_path, capsys):
    """The recipes cache the frozen encoder's features; asking for 'vision' to learn with such a
    recipe is one clear error (exit status 2), not a silently stale cache."""
    data = make_dataset(tmp_path / "d", 16, 2, seed=0)
    assert main(["tokenizer", "train", str(data / "sft_train.jsonl"), "--out", str(tmp_path / "t"),
                 "--vocab-size", "400"]) == 0
    args = ["train", "--stage", "sft", "--recipe", "smoke", "--data", str(data / "sft_train.jsonl"),
            "--images", str(data / "images"), "--tokenizer", str(tmp_path / "t.model")]
    assert main(args + ["--out", str(tmp_path / "v"), "--trainable", "lm,projector,vision"]) == 2
    assert "feature cache needs a frozen vision encoder" in capsys.readouterr().err
    assert main(args + ["--out", str(tmp_path / "ok"), "--trainable", "lm,projector"]) == 0
