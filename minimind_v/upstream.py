"""`minimind-v import-upstream`: upstream MiniMind / MiniMind-V release files -> a run directory of ours.

Both generations: MiniMind2-V (CLIP ViT-B/16, a linear projector, '@' x 196) and minimind-3v /
minimind-3v-moe (SigLIP2 B/32 at 256 px, the MLP projector, 64 x <|image_pad|>, q/k-norm, MoE),
told apart by their keys (`checkpoint.upstream_generation`); the first MiniMind2-V release's old
key names are renamed first (`first_release.py`).

Where it sits: before chat, eval and fine-tuning, for users who hold upstream's released files:

    WEIGHTS.pth     the language model (and for MiniMind-V the projector), upstream's key names
    --clip CLIP     the CLIP ViT-B/16 weights (any file `load_clip_vision` reads): a MiniMind-V
                    `.pth` holds no vision encoder
    --tokenizer DIR upstream's tokenizer.json + tokenizer_config.json

The command reads the weights (never executing code from them), detects what the file is (a
MiniMind LLM or a MiniMind-V; its size: vocabulary, width, layers, heads, FFN width), checks that
the three files fit one another (the tokenizer's size equals the embedding rows, the encoder's
width equals the projector's input) and writes a directory that `chat`, `eval`, `serve` and
`train --init` take like one of ours:

    config.json   the model config + how to talk to it as upstream does: label_newline (SFT labels
                  include the "\\n" after <|im_end|>), image_alpha "drop" (PIL's convert('RGB')),
                  image_position "before" (upstream's prompt is "<image>\\n" + question)
    model.pt      every weight, the encoder included
    tokenizer/    upstream's tokenizer files
    imported.json what was imported: the files, their sizes and sha256, the detected shape

Upstream's context length (max_position_embeddings, 32768) is not stored in the weights; it is
the default here (`--max-seq-len`), as MiniMind's own config has it.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
from pathlib import Path

from .checkpoint import atomic_save, load_state_dict, load_upstream, translate_upstream, upstream_generation
from .config import PRESETS, LMConfig, VLMConfig
from .first_release import is_first_release, to_current
from .rundir import WEIGHTS, RunLock, prepare, write_config

UPSTREAM_CONTEXT = 32768            # MiniMind's max_position_embeddings
UPSTREAM_HEADS = 8                  # MiniMind's num_attention_heads at every released size


def detect(state: dict, source, num_heads: int = UPSTREAM_HEADS) -> dict:
    """What an upstream state dict is: its generation, kind ("lm" | "vlm") and the LM's sizes, from
    the shapes alone (minimind-3v's head size comes from its q_norm weight)."""
    if is_first_release(state):
        state = to_current(state, num_heads, source)
    generation = upstream_generation(state)
    ours, unknown = translate_upstream({k: v for k, v in state.items() if not k.startswith("vision_proj.")})
    if unknown:
        raise ValueError(f"{source}: keys that are not upstream MiniMind's ({len(unknown)}): "
                         f"{', '.join(unknown[:8])}; expected model.embed_tokens.weight, model.layers.N.*, ...")
    if "embed_tokens.weight" not in ours:
        raise ValueError(f"{source}: no model.embed_tokens.weight: not an upstream MiniMind checkpoint")
    vocab, hidden = ours["embed_tokens.weight"].shape
    layers = sorted({int(k.split(".")[1]) for k in ours if k.startswith("layers.")})
    if layers != list(range(len(layers))) or not layers:
        raise ValueError(f"{source}: layer indices {layers[:5]}... are not 0..N-1")
    q_norm = ours.get("layers.0.attn.q_norm.weight")
    head_dim = q_norm.shape[0] if q_norm is not None else hidden // num_heads
    experts = sorted({int(k.split(".")[4]) for k in ours if k.startswith("layers.0.ffn.experts.")})
    gate = ours["layers.0.ffn.experts.0.gate_proj.weight" if experts else "layers.0.ffn.gate_proj.weight"]
    found = {"generation": generation, "kind": "vlm" if any(k.startswith("vision_proj.") for k in state) else "lm",
             "vocab_size": vocab, "hidden_size": hidden, "num_layers": len(layers),
             "num_heads": ours["layers.0.attn.q_proj.weight"].shape[0] // head_dim, "head_dim": head_dim,
             "num_kv_heads": ours["layers.0.attn.k_proj.weight"].shape[0] // head_dim,
             "intermediate_size": gate.shape[0], "num_experts": len(experts),
             "tie_word_embeddings": "lm_head.weight" not in ours or bool(
                 (ours["lm_head.weight"] == ours["embed_tokens.weight"]).all())}
    if found["kind"] == "vlm":
        first = "vision_proj.mlp.1.weight" if generation != "minimind2-v" else "vision_proj.vision_proj.0.weight"
        w = state.get(first)
        if w is None or w.dim() != 2:
            raise ValueError(f"{source}: vision_proj.* keys without {first}: not a {generation} projector")
        found["projector_in"], found["projector_out"] = int(w.shape[1]), int(w.shape[0])
        if found["projector_out"] != hidden:
            raise ValueError(f"{source}: the projector writes {w.shape[0]}-wide vectors, the LM is {hidden} wide")
    return found


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def import_upstream(weights, out, clip=None, tokenizer=None, max_seq_len: int = UPSTREAM_CONTEXT,
                    num_heads: int = UPSTREAM_HEADS, overwrite: bool = False, log=print) -> dict:
    """Write the run directory `out` from upstream's files; returns what was detected."""
    from .clip_weights import load_clip_vision
    from .rundir import check_tokenizer_fits
    from .tokenizer import load_tokenizer

    weights, out = Path(weights), Path(out)
    state = load_state_dict(weights)
    found = detect(state, weights, num_heads)
    if is_first_release(state):
        log(f"{weights}: the first MiniMind2-V release's key names (interleaved RoPE): renamed, q/k rows reordered")
    log(f"{weights}: upstream {found['generation'] if found['kind'] == 'vlm' else 'MiniMind LLM'}, vocab "
        f"{found['vocab_size']}, hidden {found['hidden_size']}, {found['num_layers']} layers, "
        f"{found['num_heads']} query / {found['num_kv_heads']} key-value heads of {found['head_dim']}, FFN "
        f"{found['intermediate_size']}" + (f", {found['num_experts']} experts" if found["num_experts"] else ""))
    if tokenizer is None:
        raise ValueError("--tokenizer is required: upstream's tokenizer.json + tokenizer_config.json folder")
    tok = load_tokenizer(tokenizer)
    if len(tok) != found["vocab_size"]:
        raise ValueError(f"{tokenizer}: the tokenizer has {len(tok)} pieces but {weights} has "
                         f"{found['vocab_size']} embedding rows; expected the tokenizer released with these weights")
    sizes = dict(vocab_size=found["vocab_size"], hidden_size=found["hidden_size"], num_layers=found["num_layers"],
                 num_heads=found["num_heads"], num_kv_heads=found["num_kv_heads"],
                 intermediate_size=found["intermediate_size"], max_seq_len=max_seq_len,
                 tie_word_embeddings=found["tie_word_embeddings"])
    preset = PRESETS[found["generation"]]()                       # the generation's other settings
    if found["generation"] == "minimind2-v":
        lm = LMConfig(**sizes)
    else:
        lm = dataclasses.replace(preset.lm, head_dim=found["head_dim"], **sizes,
                                 **({"num_experts": found["num_experts"], "moe_intermediate_size": found["intermediate_size"]}
                                    if found["num_experts"] else {}))
    if found["kind"] == "lm":
        cfg, model = lm, load_upstream(state, lm)
    else:
        if clip is None:
            raise ValueError(f"{weights}: a MiniMind-V checkpoint holds no vision encoder: pass --clip "
                             f"(the CLIP ViT-B/16 weights: a Hugging Face folder, model.safetensors, .bin or .pt)")
        encoder, vision = load_clip_vision(clip)
        if vision.hidden_size != found["projector_in"]:
            raise ValueError(f"{clip}: the vision encoder is {vision.hidden_size} wide, but the projector of "
                             f"{weights} takes {found['projector_in']}-wide patch vectors")
        kind = getattr(encoder, "kind", "clip")
        if kind != preset.vision_kind:
            raise ValueError(f"{clip}: a {kind} vision encoder, but {weights} is {found['generation']}, "
                             f"which takes {preset.vision_kind}'s patch vectors")
        cfg = VLMConfig(lm=lm, vision=vision, image_pad_id=tok.image_pad_id, num_patches=vision.num_patches,
                        projector=preset.projector, vision_kind=preset.vision_kind)
        if tok.num_patches != cfg.num_patches:
            raise ValueError(f"{tokenizer}: upstream writes an image as {tok.num_patches} placeholders, but "
                             f"{clip} gives {cfg.num_patches} patch vectors")
        model = load_upstream(state, cfg, clip=encoder)
    check_tokenizer_fits(tok, cfg.to_dict(), tokenizer)
    with RunLock(out, log):
        prepare(out, resume=False, overwrite=overwrite, log=log)
        extra = {}
        if found["kind"] == "vlm" and cfg.vision_kind == "siglip":
            from .siglip import preprocessor_settings
            extra["image_preprocess"] = preprocessor_settings(clip) if Path(clip).is_dir() else {}
        write_config(out, cfg, "imported", tokenizer, label_newline=True, image_alpha="drop",
                     image_position="before", imported_from=str(weights), **extra)
        atomic_save(model.state_dict(), out / WEIGHTS)
        record = {"weights": {"path": str(weights), "bytes": weights.stat().st_size, "sha256": sha256(weights)},
                  "clip": str(clip) if clip else None, "tokenizer": str(tokenizer), "detected": found}
        (out / "imported.json").write_text(json.dumps(record, indent=2))
    log(f"wrote {out}: try `minimind-v chat --checkpoint {out} "
        + ("--image PICTURE " if found["kind"] == "vlm" else "") + '"question"`')
    return found


def cli(argv: list[str]) -> int:
    """`minimind-v import-upstream WEIGHTS.pth [--clip CLIP] --tokenizer TOKDIR --out DIR`"""
    p = argparse.ArgumentParser(prog="minimind-v import-upstream", description=__doc__.split("\n")[0])
    p.add_argument("weights", help="upstream MiniMind LLM or MiniMind-V .pth (e.g. sft_vlm_512.pth)")
    p.add_argument("--clip", help="CLIP ViT-B/16 weights for a MiniMind-V file (HF folder, safetensors, .bin, .pt)")
    p.add_argument("--tokenizer", required=True, help="folder with upstream's tokenizer.json + tokenizer_config.json")
    p.add_argument("--out", required=True, help="run directory to write")
    p.add_argument("--max-seq-len", type=int, default=UPSTREAM_CONTEXT, help="context length (RoPE table size)")
    p.add_argument("--num-heads", type=int, default=UPSTREAM_HEADS, help="query heads (shapes cannot tell)")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in OUT")
    a = p.parse_args(argv)
    if a.max_seq_len < 1 or a.num_heads < 1:
        p.error("--max-seq-len and --num-heads must be >= 1")
    import_upstream(a.weights, a.out, a.clip, a.tokenizer, a.max_seq_len, a.num_heads, a.overwrite)
    return 0
