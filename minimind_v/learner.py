"""Learner mode: the model runs your code from `lessons/*/exercise.py` wherever it passes its tests.

Where it sits: around the model, before anything is built. `activate()` grades every lesson
(`lesson_progress.grade`, cached), then, for each exercise that passes, puts the learner's function
or class in place of the reference one at the points where the model calls it, e.g. your
`rms_norm` becomes `minimind_v.norm.rms_norm`, which every `RMSNorm.forward` calls. Everything
else stays the reference. It prints a table: component, whose code, why.

Activation: `minimind-v demo --learner` (also train, chat, serve: cli.py strips the flag and calls
`activate()` before the command runs), or MINIMIND_V_LEARNER=1 in the environment, checked when
`minimind_v` is imported (for notebooks). `deactivate()` puts the reference back.

`CALL_SITES` below is the map: for each reference object (as the lessons' REFERENCE dicts name it),
the attributes the learner's version replaces. Some reference paths are faster rewrites that do not
call the simple function a lesson asks for (attention by grouped blocks instead of `repeat_kv` +
`attend`, the patch convolution instead of `patchify`, ...). For those, `HOOKS` also switches the
model to the plain path that calls the learner's function; the plain paths compute the same thing.
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
import time
from pathlib import Path

from . import lesson_progress

# reference object -> the "module:attr" places where the model looks it up
CALL_SITES = {
    "minimind_v.tokenizer:chat_template": ["minimind_v.tokenizer:chat_template"],
    "minimind_v.tokenizer:Tokenizer.encode_content": ["minimind_v.tokenizer:Tokenizer.encode_content"],
    "minimind_v.norm:rms_norm": ["minimind_v.norm:rms_norm"],                 # RMSNorm.forward
    "minimind_v.norm:RMSNorm": ["minimind_v.lm:RMSNorm"],                     # Block, MiniMindLM
    "minimind_v.rope:rope_tables": ["minimind_v.lm:rope_tables"],             # MiniMindLM.__init__
    "minimind_v.rope:rotate_half": ["minimind_v.rope:rotate_half"],           # apply_rope
    "minimind_v.rope:apply_rope": ["minimind_v.attention:apply_rope"],        # Attention.forward
    "minimind_v.attention:repeat_kv": ["minimind_v.attention:repeat_kv"],
    "minimind_v.attention:causal_mask": ["minimind_v.attention:causal_mask"], # build_mask, attention
    "minimind_v.attention:attend": ["minimind_v.attention:attend"],
    "minimind_v.attention:KVCache": ["minimind_v.generate:KVCache"],          # generate.stream
    "minimind_v.ffn:SwiGLU": ["minimind_v.lm:SwiGLU"],                        # Block
    "minimind_v.lm:Block": ["minimind_v.lm:Block"],                           # MiniMindLM
    "minimind_v.lm:lm_loss": ["minimind_v.lm:lm_loss"],                       # training's loss (HOOKS)
    "minimind_v.generate:apply_repetition_penalty": ["minimind_v.generate:apply_repetition_penalty"],
    "minimind_v.generate:top_k_filter": ["minimind_v.generate:top_k_filter"],
    "minimind_v.generate:top_p_filter": ["minimind_v.generate:top_p_filter"],
    "minimind_v.generate:next_token": ["minimind_v.generate:next_token"],     # generate.stream
    "minimind_v.vision:quick_gelu": ["minimind_v.vision:quick_gelu"],
    "minimind_v.vision:patchify": ["minimind_v.vision:patchify"],
    "minimind_v.vision:attention": ["minimind_v.vision:attention"],           # VisionAttention
    "minimind_v.vision:VisionBlock": ["minimind_v.vision:VisionBlock"],       # CLIPVisionTransformer
    "minimind_v.image:preprocess": ["minimind_v.image:preprocess", "minimind_v.chat:preprocess"],  # read_pixels
    "minimind_v.vlm:VisionProjector": ["minimind_v.vlm:VisionProjector"],     # MiniMindVLM
    "minimind_v.splice:find_matches": ["minimind_v.splice:find_matches"],
    "minimind_v.splice:select_runs": ["minimind_v.splice:select_runs"],
    "minimind_v.splice:splice": ["minimind_v.vlm:splice"],                    # MiniMindVLM.forward
    "minimind_v.splice:splice_loop": ["minimind_v.vlm:splice"],               # only if splice is not yours
    "minimind_v.data:truncate": ["minimind_v.data:truncate"],                 # encode_sample
    "minimind_v.data:encode_sample": ["minimind_v.data:encode_sample"],       # VLMDataset
    "minimind_v.data:collate": ["minimind_v.data:collate"],                   # demo, train
    "minimind_v.train:lr_at": ["minimind_v.train:lr_at"],
    "minimind_v.freeze:param_groups": ["minimind_v.train:param_groups"],
    "minimind_v.freeze:apply_freeze": ["minimind_v.train:apply_freeze"],
    "minimind_v.train:epoch_batches": ["minimind_v.train:epoch_batches"],
    "minimind_v.norm:rms_norm_forward": ["minimind_v.norm:rms_norm_forward"],  # the reference rms_norm
    "minimind_v.norm:RMSNormFunction": ["minimind_v.norm:rms_norm"],           # only if rms_norm is not yours
}
FALLBACK = {"minimind_v.splice:splice_loop", "minimind_v.norm:RMSNormFunction"}   # applied last, if the site is free
# why a passing exercise is not swapped in
NOT_CALLED = {
    "minimind_v.lm:MiniMindLM": "the VLM also needs embed/forward_embeds/logits_at, beyond the lesson",
    "minimind_v.generate:generate": "chat and eval stream with images through generate.stream",
    "minimind_v.norm:rms_norm_backward": "the eager model lets autograd derive the backward",
}


# ------------------------------------------------------------------------------ adapters
def _rmsnorm(mine, ref):
    """The model builds RMSNorm(dim, eps, impl); yours takes (dim, eps) and replaces the default
    ("auto") and the eager one; an explicit impl="fused" stays ours."""
    def RMSNorm(dim, eps=1e-5, impl="auto"):
        return mine(dim, eps) if impl in ("auto", "eager") else ref(dim, eps, impl)
    return RMSNorm, 1


def _vision_block(mine, ref):
    def VisionBlock(cfg, attn_impl="manual"):
        return mine(cfg) if attn_impl == "manual" else ref(cfg, attn_impl)
    return VisionBlock, 1


def _preprocess(mine, ref):
    """The model calls preprocess(image, size, alpha, reducing_gap); yours takes (image, size):
    yours runs for the default alpha ("white") and exact resizing, the other options stay ours."""
    def preprocess(image, size=224, alpha="white", reducing_gap=None):
        if alpha == "white" and reducing_gap is None:
            return mine(image, size)
        return ref(image, size, alpha=alpha, reducing_gap=reducing_gap)
    return preprocess, 2


def _function_apply(mine, ref):
    def rms_norm(x, weight, eps=1e-5):
        return mine.apply(x, weight, eps)
    return rms_norm, None


# target -> adapter(mine, ref) -> (object to install, reference parameters the adapter fills or None)
ADAPTERS = {"minimind_v.norm:RMSNorm": _rmsnorm, "minimind_v.vision:VisionBlock": _vision_block,
            "minimind_v.image:preprocess": _preprocess,
            "minimind_v.norm:RMSNormFunction": _function_apply}


# ------------------------------------------------------------------------------ plain paths (HOOKS)
def plain_attention_forward(self, x, cos, sin, mask, kv_cache=None):
    """Attention.forward as lesson 04 states it: repeat_kv, then attend with the full mask."""
    from . import attention as A
    B, T, _ = x.shape
    q = self.q_proj(x).view(B, T, self.n_heads, self.hd)             # (B, T, H, hd)
    k = self.k_proj(x).view(B, T, self.n_kv, self.hd)                # (B, T, H_kv, hd)
    v = self.v_proj(x).view(B, T, self.n_kv, self.hd)
    q, k = A.apply_rope(q, k, cos, sin)
    if kv_cache is not None:
        k, v = kv_cache.update(self.layer_idx, k, v)                 # (B, S, H_kv, hd)
    if getattr(self, "record", None) is not None:                    # capture_attention (the report's heatmaps)
        self.record.append(A.attention_weights(q, k, mask).detach())
    if mask is None:
        mask = A.causal_mask(T, k.shape[1], x.device)                # (T, S)
    q = q.transpose(1, 2)                                            # (B, H, T, hd)
    k = A.repeat_kv(k, self.n_rep).transpose(1, 2)                   # (B, H, S, hd)
    v = A.repeat_kv(v, self.n_rep).transpose(1, 2)
    out = A.attend(q, k, v, mask, self.dropout if self.training else 0.0, self.training)
    return self.resid_dropout(self.o_proj(out.transpose(1, 2).reshape(B, T, -1)))


def embed_by_patchify(self, pixels):
    """CLIPVisionTransformer.embed with patchify + one matmul instead of the stride-p convolution
    (a conv stem, which the lesson does not cover, is kept as it is)."""
    import torch
    from . import vision as V
    S, w = self.cfg.image_size, self.patch_embed.weight             # w (D, C, p, p)
    if pixels.dim() != 4 or pixels.shape[1:] != (self.cfg.num_channels, S, S):
        raise ValueError(f"expected pixels of shape (B, {self.cfg.num_channels}, {S}, {S}), got {tuple(pixels.shape)}")
    if self.cfg.stem == "conv":
        x = V.patch_tokens(self.patch_embed, self.cfg, pixels, self.stem)                   # (B, P, D)
    else:
        x = V.patchify(pixels.to(w.dtype), self.cfg.patch_size) @ w.reshape(w.shape[0], -1).T   # (B, P, D)
        if self.stem is not None:                                    # "both": + the conv stem's vectors
            x = x + self.stem(pixels.to(w.dtype)).flatten(2).transpose(1, 2)
    cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)                         # (B, 1, D)
    x = torch.cat([cls, x], dim=1) + self.position_embedding.to(x.dtype)                     # (B, 1+P, D)
    return self.ln_pre(x)


def runs_by_scan(input_ids, pad_id, L):
    """splice.runs_of_one_id by the general route: find_matches, then select_runs."""
    from . import splice as S
    return S.select_runs(S.find_matches(input_ids, [pad_id] * L), L)


def forward_loss_full(model, batch, device):
    """train.forward_loss with lm_loss on all logits (the reference computes only the counted ones)."""
    from . import lm
    kwargs = {}
    if batch.get("image_features") is not None:
        kwargs["image_features"] = batch["image_features"].to(device)
    elif batch.get("pixel_values") is not None:
        kwargs["pixel_values"] = batch["pixel_values"].to(device)
    input_ids = batch["input_ids"].to(device)
    return lm.lm_loss(model(input_ids, **kwargs), batch["labels"].to(device)), input_ids.numel()


def _vision_mlp_plain():
    from .vision import VisionMLP
    return VisionMLP.forward_plain


HOOKS = {   # target -> [(site, the plain path to install there)]
    "minimind_v.attention:repeat_kv": [("minimind_v.attention:Attention.forward", lambda: plain_attention_forward)],
    "minimind_v.attention:attend": [("minimind_v.attention:Attention.forward", lambda: plain_attention_forward)],
    "minimind_v.vision:quick_gelu": [("minimind_v.vision:VisionMLP.forward", _vision_mlp_plain)],
    "minimind_v.vision:patchify": [("minimind_v.vision:CLIPVisionTransformer.embed", lambda: embed_by_patchify)],
    "minimind_v.splice:find_matches": [("minimind_v.splice:runs_of_one_id", lambda: runs_by_scan)],
    "minimind_v.splice:select_runs": [("minimind_v.splice:runs_of_one_id", lambda: runs_by_scan)],
    "minimind_v.lm:lm_loss": [("minimind_v.train:forward_loss", lambda: forward_loss_full)],
}


# ------------------------------------------------------------------------------ swapping
def _locate(site: str):
    """'pkg.module:A.b' -> (owner object, attribute name)."""
    module_name, _, attr = site.partition(":")
    owner = importlib.import_module(module_name)
    *path, last = attr.split(".")
    for part in path:
        owner = getattr(owner, part)
    return owner, last


def _positional(obj, is_method: bool) -> list:
    """The parameters a call site can pass (self dropped); for a class: its __init__'s."""
    try:
        params = list(inspect.signature(obj).parameters.values())
    except (TypeError, ValueError):
        return []
    if is_method and params:
        params = params[1:]
    return [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def signature_problem(name: str, mine, ref, is_method: bool = False, filled: int | None = 0) -> str:
    """'' if `mine` accepts every call the model makes to `ref`, else what differs."""
    pairs = [("", mine, ref)]
    if inspect.isclass(mine) and inspect.isclass(ref):
        pairs += [(f".{m}", getattr(mine, m), getattr(ref, m)) for m in ("forward", "update")
                  if callable(getattr(ref, m, None)) and callable(getattr(mine, m, None))]
    for suffix, a, b in pairs:
        pa = _positional(a, is_method or bool(suffix))
        pb = _positional(b, is_method or bool(suffix))
        if filled is None and not suffix:
            continue
        if filled and not suffix:
            pb = pb[:len(pb) - filled]                # parameters the adapter passes for you
        required = [p for p in pa if p.default is p.empty]
        if len(pa) < len(pb) or len(required) > len(pb):
            want = ", ".join(p.name for p in pb)
            have = ", ".join(p.name for p in pa)
            return f"signature: the model calls {name}{suffix}({want}), yours takes ({have})"
    return ""


class Learner:
    """The swaps in force: (owner, attribute, previous value), and the table."""

    def __init__(self):
        self.patches: list[tuple] = []
        self.rows: list[tuple[str, str, str]] = []
        self.modules: dict[str, object] = {}
        self.from_cache = True
        self.seconds = 0.0

    def patch(self, site: str, value) -> None:
        owner, attr = _locate(site)
        self.patches.append((owner, attr, owner.__dict__.get(attr, _MISSING) if isinstance(owner, type)
                             else getattr(owner, attr)))
        setattr(owner, attr, value)

    def undo(self) -> None:
        for owner, attr, old in reversed(self.patches):
            if old is _MISSING:
                delattr(owner, attr)
            else:
                setattr(owner, attr, old)
        self.patches.clear()


_MISSING = object()
_active: Learner | None = None


def load_module(lesson: Path):
    """Import the learner's exercise.py (as lessons/conftest.py does), registered in sys.modules."""
    name = "minimind_v_learner_" + lesson.name.replace("-", "_")
    spec = importlib.util.spec_from_file_location(name, lesson / "exercise.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def activate(lessons=None, log=print, use_cache: bool = True) -> Learner:
    """Grade the lessons, swap in the learner's passing code, print the table. Idempotent."""
    global _active
    if _active is not None:
        return _active
    t0 = time.time()
    root = lesson_progress.lessons_dir(lessons)
    state = Learner()
    claimed: dict[str, str] = {}                      # site -> the exercise that took it
    chosen, everything = [], []                      # (exercise, module) that pass; all exercises
    for lesson in lesson_progress.find_lessons(root):
        exercises, hit = lesson_progress.grade(lesson, use_cache)
        state.from_cache &= hit
        everything += exercises
        module = None
        for e in exercises:
            if e.status != "passing":
                continue
            if module is None:
                try:
                    module = state.modules[lesson.name] = load_module(lesson)
                except Exception as err:               # noqa: BLE001  (their file, any error)
                    for other in exercises:
                        if other.status == "passing":
                            other.status = "failing"
                            other.reason = f"exercise.py does not import: {type(err).__name__}: {err}"
                    break
            chosen.append((e, module))
    table = {}
    for fallback in (False, True):
        for e, module in chosen:
            if (e.target in FALLBACK) == fallback:
                table[e.label] = _swap(state, e, module, claimed)
    for e in everything:
        whose, why = table.get(e.label) or ("reference", {
            "failing": f"failing: {e.reason}", "untested": f"untested: {e.reason}"}.get(e.status, "not started"))
        state.rows.append((e.label, whose, why))
    _active = state
    state.seconds = time.time() - t0
    log(format_table(state, root))
    return state


def _swap(state: Learner, e, module, claimed: dict) -> tuple[str, str]:
    """Install one passing exercise; -> (whose, why) for the table."""
    if e.target not in CALL_SITES:
        return "reference", "passing; " + NOT_CALLED.get(e.target, "the model does not call it (graded only)")
    mine = getattr(module, e.name)
    ref_owner, ref_attr = _locate(e.target)
    ref = getattr(ref_owner, ref_attr)
    is_method = inspect.isclass(ref_owner)
    adapter = ADAPTERS.get(e.target)
    install, filled = adapter(mine, ref) if adapter else (mine, 0)
    problem = signature_problem(e.name, mine, ref, is_method, filled)
    if problem:
        return "reference", "passing, but " + problem
    sites = CALL_SITES[e.target]
    taken = [claimed[s] for s in sites if s in claimed]
    if taken:
        return "reference", f"passing; the model calls your {taken[0]} there instead"
    for site in sites:
        state.patch(site, install)
        claimed[site] = e.label
    for site, make in HOOKS.get(e.target, []):
        if site not in claimed:
            state.patch(site, make())
            claimed[site] = e.label
    # the learner's own modules call their imports from minimind_v too: point them at the swap
    for other in state.modules.values():
        for name, value in list(vars(other).items()):
            if value is ref and other is not module:
                state.patch(f"{other.__name__}:{name}", install)
    return "yours", "passing"


def format_table(state: Learner, root: Path) -> str:
    width = max([len(r[0]) for r in state.rows] + [9])
    lines = [f"learner mode: {root} ({'cached' if state.from_cache else 'graded'} in {state.seconds:.1f} s)",
             f"  {'component'.ljust(width)}  {'whose code':10s}  why"]
    lines += [f"  {c.ljust(width)}  {w:10s}  {why}" for c, w, why in state.rows]
    return "\n".join(lines)


def deactivate() -> None:
    """Put the reference back everywhere."""
    global _active
    if _active is not None:
        _active.undo()
        _active = None


def active() -> Learner | None:
    return _active
