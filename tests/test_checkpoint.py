"""load_upstream: round trip through a .pth in upstream key names, strict errors, no code execution."""
from __future__ import annotations

import os
import pickle

import pytest
import torch

from minimind_v.checkpoint import KEY_TABLE, atomic_save, upstream_name, load_state_dict, load_upstream, translate_upstream
from minimind_v.config import LMConfig
from minimind_v.lm import MiniMindLM

TINY = dict(vocab_size=61, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=32)


def _our_to_upstream(model: MiniMindLM) -> dict:
    """Our state dict in upstream MiniMind's key names, spelled out independently of KEY_TABLE."""
    up = {}
    for k, v in model.state_dict().items():
        name = (k.replace("attn_norm", "input_layernorm").replace("ffn_norm", "post_attention_layernorm")
                 .replace(".attn.", ".self_attn.").replace(".ffn.", ".mlp."))
        up[name if k == "lm_head.weight" else "model." + name] = v.clone()
    return up


@pytest.fixture()
def model():
    torch.manual_seed(0)
    m = MiniMindLM(LMConfig(**TINY)).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.2) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    return m


def test_key_names_are_upstreams(model):
    up = _our_to_upstream(model)
    assert "model.layers.1.self_attn.q_proj.weight" in up and "model.layers.0.mlp.gate_proj.weight" in up
    assert "model.layers.0.input_layernorm.weight" in up and "model.norm.weight" in up
    ours, unknown = translate_upstream(up)
    assert unknown == [] and set(ours) == set(model.state_dict())
    assert len(KEY_TABLE) == 10          # 7 MiniMind2-V rows + q/k-norm, MoE router, MoE experts
    assert {upstream_name(k) for k in model.state_dict()} == set(up)      # the table read backwards


@pytest.mark.parametrize("with_lm_head", [True, False])
def test_round_trip_through_a_pth_file(model, tmp_path, with_lm_head):
    up = _our_to_upstream(model)
    if not with_lm_head:            # tied: some upstream files store only the embedding
        del up["lm_head.weight"]
    path = tmp_path / "llm_32.pth"
    atomic_save(up, path)
    loaded = load_upstream(path, LMConfig(**TINY)).eval()
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    ids = torch.randint(0, 61, (2, 12))
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))
    assert loaded.lm_head.weight is loaded.embed_tokens.weight


def test_missing_unexpected_and_misshaped_keys_are_listed(model):
    cfg = LMConfig(**TINY)
    up = _our_to_upstream(model)
    del up["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(ValueError, match=r"missing keys \(1\): model\.layers\.1\.mlp\.up_proj\.weight"):
        load_upstream(up, cfg)

    up = _our_to_upstream(model)
    up["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
    up["vision_encoder.weird"] = torch.ones(1)
    with pytest.raises(ValueError, match=r"unexpected keys .*\(2\): .*rotary_emb\.inv_freq.*vision_encoder\.weird"):
        load_upstream(up, cfg)

    up = _our_to_upstream(model)
    up["model.layers.0.self_attn.k_proj.weight"] = torch.ones(16, 16)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight: file \(16, 16\) vs model \(16, 32\)"):
        load_upstream(up, cfg)

    # a checkpoint of a bigger model: every layer's shape is reported
    with pytest.raises(ValueError, match="wrong shapes"):
        load_upstream(_our_to_upstream(model), LMConfig(**{**TINY, "hidden_size": 64}))


def test_untied_head_in_a_tied_config_is_an_error(model):
    up = _our_to_upstream(model)
    up["lm_head.weight"] = up["lm_head.weight"] + 1
    with pytest.raises(ValueError, match="lm_head.weight differs from model.embed_tokens.weight"):
        load_upstream(up, LMConfig(**TINY))
    untied = load_upstream(up, LMConfig(**TINY, tie_word_embeddings=False))
    assert torch.equal(untied.lm_head.weight, up["lm_head.weight"])


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))          # would create a file if ever unpickled


def test_pickle_with_code_is_refused(model, tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"model.norm.weight": torch.ones(32), "payload": _Evil(str(marker))}, path)
    # the payload is real: plain pickle would run it
    with pytest.raises(Exception):
        torch.load(path, weights_only=True)
    with pytest.raises(ValueError, match="evil.pth: not a loadable weights-only checkpoint"):
        load_upstream(path, LMConfig(**TINY))
    assert not marker.exists()
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_other_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_state_dict(tmp_path / "nope.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="junk.pth: not a loadable"):
        load_state_dict(tmp_path / "junk.pth")
    torch.save([torch.ones(2)], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="list.pth: expected a state dict"):
        load_state_dict(tmp_path / "list.pth")


def test_atomic_save_keeps_the_old_file_on_failure(tmp_path):
    path = tmp_path / "ckpt.pth"
    atomic_save({"w": torch.arange(3)}, path)
    with pytest.raises(Exception):
        atomic_save({"w": lambda: 0}, path)            # cannot be pickled: fails mid-write
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.arange(3))
    assert os.listdir(tmp_path) == ["ckpt.pth"]        # no temp file left behind


def test_a_weights_file_with_nan_is_refused_naming_the_key(model, tmp_path):
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd["layers.1.ffn.up_proj.weight"][3, 5] = float("nan")
    torch.save(sd, tmp_path / "nan.pt")
    with pytest.raises(ValueError, match=r"nan.pt: key 'layers.1.ffn.up_proj.weight': 1 of .* NaN or infinite"):
        load_state_dict(tmp_path / "nan.pt")
    torch.save({"model": sd, "step": 3}, tmp_path / "ckpt.pt")          # a checkpoint.pt's weights too
    with pytest.raises(ValueError, match="up_proj"):
        load_state_dict(tmp_path / "ckpt.pt")
