"""`minimind-v import-upstream`: upstream-layout files -> a run directory that chats, evaluates, fine-tunes.

The weights are random stand-ins written in upstream MiniMind-V's layout (upstream key names, no
vision encoder; a Hugging Face CLIP folder saved by transformers; upstream's real tokenizer from
../shared/upstream/, so these tests skip where that folder is absent). The greedy answer of
`minimind-v chat` is compared with a reply built independently, as upstream's eval_vlm.py builds
its prompt: the template text with `<image>` replaced by '@' x 196, tokenized in one go.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cli_run import run_cli
from minimind_v.checkpoint import upstream_name
from minimind_v.config import LMConfig, VisionConfig, VLMConfig
from minimind_v.vlm import MiniMindVLM

ROOT = Path(__file__).resolve().parents[1]
UPSTREAM = ROOT.parent / "shared" / "upstream" / "minimind2-v"
pytestmark = pytest.mark.skipif(not (UPSTREAM / "tokenizer.json").is_file(),
                                reason="upstream's tokenizer files (../shared/upstream/) are not here")


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """Upstream-layout stand-ins: sft_vlm.pth, a CLIP folder, the tokenizer folder; and the model."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    root = tmp_path_factory.mktemp("release")
    torch.manual_seed(0)
    clip = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                            num_attention_heads=2, image_size=224, patch_size=16)).eval()
    clip.save_pretrained(root / "clip")
    vision = VisionConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, projection_dim=512)
    cfg = VLMConfig(lm=LMConfig(vocab_size=6400, hidden_size=64, num_layers=2, num_heads=8, num_kv_heads=2,
                                intermediate_size=128, max_seq_len=32768), vision=vision)
    model = MiniMindVLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith("vision_encoder."):
                p.normal_(0.0, 0.3) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    state = {upstream_name(k): v for k, v in model.lm.state_dict().items()}
    state.update({"vision_proj." + k: v for k, v in model.vision_proj.state_dict().items()})
    torch.save(state, root / "sft_vlm_64.pth")
    out = root / "imported"
    proc = run_cli("import-upstream", str(root / "sft_vlm_64.pth"), "--clip", str(root / "clip"),
                   "--tokenizer", str(UPSTREAM), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    return root, out, proc.stdout


def test_import_detects_the_file_and_writes_a_run_directory(release):
    root, out, stdout = release
    assert "upstream minimind2-v, vocab 6400, hidden 64, 2 layers, 8 query / 2 key-value heads of 8, FFN 128" in stdout
    info = json.loads((out / "config.json").read_text())
    assert info["label_newline"] is True and info["image_alpha"] == "drop" and info["image_position"] == "before"
    assert info["model_config"]["image_pad_id"] == 34 and info["model_config"]["num_patches"] == 196
    assert info["model_config"]["lm"]["max_seq_len"] == 32768
    record = json.loads((out / "imported.json").read_text())
    assert record["detected"]["kind"] == "vlm" and len(record["weights"]["sha256"]) == 64
    assert (out / "tokenizer" / "tokenizer.json").is_file() and (out / "model.pt").is_file()


def test_chat_prints_the_greedy_answer_of_upstreams_prompt(release):
    from PIL import Image

    from minimind_v.checkpoint import load_upstream
    from minimind_v.clip_weights import load_clip_vision
    from minimind_v.generate import generate
    from minimind_v.image import preprocess
    from minimind_v.tokenizer import load_tokenizer

    root, out, _ = release
    rng = torch.Generator().manual_seed(1)
    Image.fromarray((torch.rand(60, 90, 3, generator=rng) * 255).byte().numpy()).save(root / "photo.png")
    proc = run_cli("chat", "--checkpoint", str(out), "--image", str(root / "photo.png"), "--temperature", "0",
                   "--max-new-tokens", "12", "请描述这张图。")
    assert proc.returncode == 0, proc.stderr
    # the same weights, loaded directly; the prompt as upstream's eval_vlm.py writes it
    tok = load_tokenizer(UPSTREAM)
    encoder, vision = load_clip_vision(root / "clip")
    info = json.loads((out / "config.json").read_text())
    model = load_upstream(str(root / "sft_vlm_64.pth"), VLMConfig(**info["model_config"]), clip=encoder).eval()
    text = tok.apply_chat_template([{"role": "user", "content": "@" * 196 + "\n请描述这张图。"}],
                                   add_generation_prompt=True)
    ids = torch.tensor([tok.encode(text)])
    assert (ids == 34).sum() == 196
    with Image.open(root / "photo.png") as im:
        pixels = preprocess(im.convert("RGB"), 224)[None, None]
    new = generate(model, ids, 12, eos_id=tok.eos_id, images=pixels)[0, ids.shape[1]:].tolist()
    new = new[:new.index(tok.eos_id)] if tok.eos_id in new else new
    assert proc.stdout.rstrip("\n") == tok.decode(new)
    assert len(new) > 0


def test_eval_and_fine_tune_take_the_imported_directory(release, tmp_path):
    from PIL import Image

    root, out, _ = release
    (tmp_path / "images").mkdir()
    records = []
    for i in range(8):
        Image.new("RGB", (32, 32), (30 * i, 200 - 20 * i, 90)).save(tmp_path / "images" / f"{i}.png")
        records.append({"conversations": [{"role": "user", "content": "<image>\n这是什么颜色？"},
                                          {"role": "assistant", "content": "红色" if i % 2 else "绿色"}],
                        "image": f"{i}.png"})
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    ev = run_cli("eval", "--checkpoint", str(out), "--data", str(data), "--images", str(tmp_path / "images"),
                 "--max-new-tokens", "4")
    assert ev.returncode == 0, ev.stderr
    assert "exact match:" in ev.stdout and "/8 = " in ev.stdout
    tuned = tmp_path / "tuned"
    tr = run_cli("train", "--stage", "sft", "--init", str(out), "--data", str(data), "--images",
                 str(tmp_path / "images"), "--out", str(tuned), "--batch-size", "4", "--max-steps", "2",
                 "--max-length", "300", "--lr", "1e-3", "--log-every", "1")
    assert tr.returncode == 0, tr.stderr
    assert "step 2/2" in tr.stdout and (tuned / "model.pt").is_file()
    info = json.loads((tuned / "config.json").read_text())
    assert info["label_newline"] is True and info["tokenizer"] == "tokenizer"


def test_import_refuses_files_that_do_not_fit(release, tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    root, _, _ = release
    wide = CLIPVisionModel(CLIPVisionConfig(hidden_size=48, intermediate_size=64, num_hidden_layers=1,
                                            num_attention_heads=2, image_size=224, patch_size=16))
    wide.save_pretrained(tmp_path / "wide")
    proc = run_cli("import-upstream", str(root / "sft_vlm_64.pth"), "--clip", str(tmp_path / "wide"),
                   "--tokenizer", str(UPSTREAM), "--out", str(tmp_path / "a"))
    assert proc.returncode == 2 and "48 wide, but the projector" in proc.stderr and "Traceback" not in proc.stderr
    state = torch.load(root / "sft_vlm_64.pth", weights_only=True)
    state["model.layers.0.self_attn.rotary.weight"] = torch.zeros(3)
    torch.save(state, tmp_path / "odd.pth")
    proc = run_cli("import-upstream", str(tmp_path / "odd.pth"), "--clip", str(root / "clip"),
                   "--tokenizer", str(UPSTREAM), "--out", str(tmp_path / "b"))
    assert proc.returncode == 2 and "model.layers.0.self_attn.rotary.weight" in proc.stderr
    small = {k: v for k, v in state.items() if "rotary" not in k}
    small["model.embed_tokens.weight"] = small["model.embed_tokens.weight"][:6000]
    small["lm_head.weight"] = small["model.embed_tokens.weight"]
    torch.save(small, tmp_path / "small.pth")
    proc = run_cli("import-upstream", str(tmp_path / "small.pth"), "--clip", str(root / "clip"),
                   "--tokenizer", str(UPSTREAM), "--out", str(tmp_path / "c"))
    assert proc.returncode == 2 and "6400 pieces but" in proc.stderr and "6000 embedding rows" in proc.stderr
    assert proc.returncode == 2 and not (tmp_path / "c" / "model.pt").exists()
