"""Which parameters learn: the stage's freeze rule, and the weight-decay groups of AdamW.

Where it sits: at the start of every `train` run. A VLM has four named parts: the language model
(`lm`), its last block (`last_block`), the projector and the vision encoder. MiniMind2-V's
pretraining teaches the projector (and lets the last LM block adapt); its SFT teaches the whole
LM and the projector. The vision encoder is frozen in both.
"""
from __future__ import annotations

from torch import nn

# Which parts learn in each stage (vision is never in a default rule).
FREEZE_RULES = {
    "pretrain": ("projector", "last_block"),
    "sft": ("lm", "projector"),
}
GROUPS = ("lm", "last_block", "projector", "vision")


def model_parts(model: nn.Module) -> dict[str, nn.Module]:
    """The named parts a freeze rule can switch on: lm, last_block, projector, vision.

    A plain `MiniMindLM` is its own `lm` (it has no projector or vision encoder).
    """
    lm = getattr(model, "lm", model)
    parts = {"lm": lm, "last_block": lm.layers[-1]}
    if hasattr(model, "vision_proj"):
        parts["projector"] = model.vision_proj
    if hasattr(model, "vision_encoder"):
        parts["vision"] = model.vision_encoder
    return parts


def apply_freeze(model: nn.Module, groups) -> list[str]:
    """requires_grad=True exactly on the parameters of `groups`; returns the trainable names.

    Parts the model does not have are skipped (a text-only LM has no projector).
    """
    parts = model_parts(model)
    unknown = [g for g in groups if g not in GROUPS]
    if unknown:
        raise ValueError(f"unknown trainable group(s) {unknown}; choose from {', '.join(GROUPS)}")
    for p in model.parameters():
        p.requires_grad_(False)
    for g in groups:
        if g in parts:
            for p in parts[g].parameters():
                p.requires_grad_(True)
    return [n for n, p in model.named_parameters() if p.requires_grad]


def param_groups(model: nn.Module, weight_decay: float, vision_lr_scale: float = 1.0) -> list[dict]:
    """AdamW groups: decay matrices (linear weights, embeddings); never norms' gains or biases.

    Decaying a norm gain pulls it towards 0, which shrinks the whole layer's output; the usual
    rule (GPT-2, Llama) is to decay only tensors with 2 or more dimensions.
    Each group carries an `lr_scale` (the step's lr is multiplied by it): a vision encoder that
    learns beside a fresh LM usually needs a smaller lr than the LM (`vision_lr_scale`), or its
    patch vectors drift until every picture looks alike. Without it there are two groups.
    """
    vision = {id(p) for p in model_parts(model)["vision"].parameters()} if (
        vision_lr_scale != 1.0 and "vision" in model_parts(model)) else set()
    groups = {}
    for _, p in model.named_parameters():          # a tied matrix appears once
        if p.requires_grad:
            key = (p.dim() >= 2, id(p) in vision)
            groups.setdefault(key, []).append(p)
    order = [(True, False), (False, False), (True, True), (False, True)]
    return [{"params": groups.get(k, []), "weight_decay": weight_decay if k[0] else 0.0,
             "vision": k[1], "lr_scale": vision_lr_scale if k[1] else 1.0}
            for k in order if k in groups or not k[1]]
