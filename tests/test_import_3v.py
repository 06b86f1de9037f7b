"""`minimind-v import-upstream` on minimind-3v files (dense and MoE): detect, chat, fine-tune.

The stand-ins are random weights in upstream minimind-3v's layout (written by
test_upstream_3v.upstream_file), a SigLIP folder saved by transformers at a tiny width but the
real geometry (256 px, 32 px patches: 64 patch vectors) and upstream's real 3v tokenizer from
../shared/upstream/ (these tests skip without it). The chat answer is compared with a reply built
as upstream's eval_vlm.py builds it: `<image>` replaced by 64 `<|image_pad|>`, the template text
tokenized, SigLIP's preprocessing.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cli_run import run_cli
from minimind_v.config import LMConfig, VisionConfig, VLMConfig
from test_upstream_3v import source_model, upstream_file

ROOT = Path(__file__).resolve().parents[1]
UPSTREAM = ROOT.parent / "shared" / "upstream" / "minimind-3v"
pytestmark = pytest.mark.skipif(not (UPSTREAM / "tokenizer.json").is_file(),
                                reason="upstream's minimind-3v tokenizer (../shared/upstream/) is not here")


def config(use_moe: bool) -> VLMConfig:
    return VLMConfig(
        lm=LMConfig(vocab_size=6400, hidden_size=48, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                    intermediate_size=96, rms_norm_eps=1e-6, max_seq_len=32768, qk_norm=True, use_moe=use_moe),
        vision=VisionConfig(image_size=256, patch_size=32, hidden_size=32, num_layers=1, num_heads=4,
                            intermediate_size=64, layer_norm_eps=1e-6),
        image_pad_id=12, num_patches=64, projector="mlp", vision_kind="siglip")


@pytest.fixture(scope="module")
def siglip(tmp_path_factory):
    from transformers import SiglipVisionConfig, SiglipVisionModel
    torch.manual_seed(0)
    hf = SiglipVisionModel(SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                              num_attention_heads=4, image_size=256, patch_size=32)).eval()
    folder = tmp_path_factory.mktemp("siglip2-base-p32-256-ve")
    hf.save_pretrained(folder)
    return folder, hf


@pytest.mark.parametrize("use_moe", [False, True], ids=["dense", "moe"])
def test_import_chat_and_fine_tune_a_minimind_3v_file(siglip, tmp_path, use_moe):
    from PIL import Image

    from minimind_v.checkpoint import load_upstream
    from minimind_v.generate import generate
    from minimind_v.siglip import preprocess_siglip
    from minimind_v.tokenizer import load_tokenizer

    cfg = config(use_moe)
    torch.save(upstream_file(source_model(cfg, siglip)), tmp_path / "sft_vlm_48.pth")
    out = tmp_path / "imported"
    proc = run_cli("import-upstream", str(tmp_path / "sft_vlm_48.pth"), "--clip", str(siglip[0]),
                   "--tokenizer", str(UPSTREAM), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    gen = "minimind-3v-moe" if use_moe else "minimind-3v"
    assert f"upstream {gen}, vocab 6400, hidden 48, 2 layers, 4 query / 2 key-value heads of 16, FFN 96" \
        in proc.stdout
    info = json.loads((out / "config.json").read_text())
    assert info["model_config"]["vision_kind"] == "siglip" and info["model_config"]["num_patches"] == 64
    assert info["model_config"]["lm"]["qk_norm"] and info["model_config"]["lm"]["use_moe"] == use_moe

    rng = torch.Generator().manual_seed(3)
    Image.fromarray((torch.rand(90, 60, 3, generator=rng) * 255).byte().numpy()).save(tmp_path / "photo.png")
    chat = run_cli("chat", "--checkpoint", str(out), "--image", str(tmp_path / "photo.png"), "--temperature", "0",
                   "--max-new-tokens", "10", "描述这张图片")
    assert chat.returncode == 0, chat.stderr
    tok = load_tokenizer(UPSTREAM)
    model = load_upstream(str(tmp_path / "sft_vlm_48.pth"), VLMConfig(**info["model_config"]),
                          clip=str(siglip[0])).eval()
    text = tok.apply_chat_template([{"role": "user", "content": "<|image_pad|>" * 64 + "\n描述这张图片"}],
                                   add_generation_prompt=True)
    ids = torch.tensor([tok.encode(text)])
    assert (ids == 12).sum() == 64
    with Image.open(tmp_path / "photo.png") as im:
        pixels = preprocess_siglip(im, 256)[None, None]
    new = generate(model, ids, 10, eos_id=tok.eos_id, images=pixels)[0, ids.shape[1]:].tolist()
    new = new[:new.index(tok.eos_id)] if tok.eos_id in new else new
    assert chat.stdout.rstrip("\n") == tok.decode(new) and new

    (tmp_path / "images").mkdir()
    Image.new("RGB", (40, 40), (200, 30, 30)).save(tmp_path / "images" / "r.png")
    rec = {"conversations": [{"role": "user", "content": "<image>\n什么颜色？"},
                             {"role": "assistant", "content": "红色"}], "image": "r.png"}
    (tmp_path / "sft.jsonl").write_text((json.dumps(rec, ensure_ascii=False) + "\n") * 4, encoding="utf-8")
    tuned = run_cli("train", "--stage", "sft", "--init", str(out), "--data", str(tmp_path / "sft.jsonl"),
                    "--images", str(tmp_path / "images"), "--out", str(tmp_path / "tuned"), "--batch-size", "2",
                    "--max-steps", "2", "--max-length", "200", "--lr", "1e-3", "--log-every", "1")
    assert tuned.returncode == 0, tuned.stderr
    assert "step 2/2" in tuned.stdout and (tmp_path / "tuned" / "model.pt").is_file()


def test_the_moe_auxiliary_loss_enters_training(siglip):
    import torch.nn.functional as F

    from minimind_v.lm import loss_positions
    from minimind_v.train import forward_loss

    model = source_model(config(True), siglip).train()
    ids = torch.randint(20, 6400, (2, 80), generator=torch.Generator().manual_seed(4))
    ids[:, 2:66] = 12
    labels = ids.clone()
    labels[:, :70] = -100
    batch = {"input_ids": ids, "labels": labels, "pixel_values": torch.randn(2, 1, 3, 256, 256)}
    loss, _ = forward_loss(model, batch, torch.device("cpu"))
    at, targets = loss_positions(labels)
    ce = F.cross_entropy(model(ids, pixel_values=batch["pixel_values"], logits_at=at).float(), targets)
    assert model.aux_loss > 0
    torch.testing.assert_close(loss, ce + model.aux_loss)
