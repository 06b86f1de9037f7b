"""The MiniMind language model: a decoder-only transformer of pre-norm blocks.

    ids (B, T) -> embed (B, T, D) -> [Block] x L -> RMSNorm -> lm_head -> logits (B, T, V)
    Block:  h = h + Attention(RMSNorm(h));  h = h + SwiGLU(RMSNorm(h))

Pre-norm (normalise the input of each sub-layer, add its output back unnormalised) keeps a
clean residual path from the embeddings to the top, which is what lets deep stacks train
without warmup tricks. The output matrix is tied to the embedding matrix (one 6400 x 512
table serves both), which is 3.3M of the 25.8M parameters.

The VLM reuses this class: it calls `embed` to get token vectors, overwrites the image
placeholder positions with projected patch vectors, then `forward_embeds` for the rest.

minimind-3v's options change the parts, not the flow: `qk_norm` (attention.py), an explicit
`head_dim`, `use_moe` (every FFN a `moe.MoEFeedForward`; a forward then leaves the layers'
load-balancing loss in `model.aux_loss`, which training adds to the cross-entropy), and
`rope_scaling` (YaRN, `rope_tables_for`).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .attention import Attention, KVCache, build_mask
from .config import LMConfig
from .cpu_memory import keep_freed_memory
from .ffn import SwiGLU
from .linear import Linear
from .moe import MoEFeedForward
from .norm import RMSNorm
from .rope import rope_tables

IGNORE = -100   # the label of every position the loss skips (data.py writes it; the defaults below spell it)


def rope_tables_for(cfg: LMConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (max_seq_len, head_dim) for this config: plain RoPE, or YaRN when `rope_scaling`.

    YaRN as upstream MiniMind applies it (keys and defaults: original_max_position_embeddings 2048,
    factor 16, beta_fast 32, beta_slow 1, attention_factor 1), only when max_seq_len exceeds the
    original context. Frequency pair i keeps its speed where it turns many times within the original
    context (i < low) and is slowed by `factor` where it turns less than once (i > high), with a linear
    ramp between:  f'_i = f_i * ((1 - r_i) + r_i / factor),  r_i = clamp((i - low) / (high - low), 0, 1),
    where dim(b) = hd * ln(orig / (2 pi b)) / (2 ln theta) is the pair that turns b times in the original
    context, low = floor(dim(beta_fast)), high = ceil(dim(beta_slow)). cos and sin are scaled by
    attention_factor.
    """
    hd, theta, sc = cfg.head_dim, cfg.rope_theta, cfg.rope_scaling
    if not sc:
        return rope_tables(hd, cfg.max_seq_len, theta)
    orig, factor = sc.get("original_max_position_embeddings", 2048), sc.get("factor", 16)
    beta_fast, beta_slow = sc.get("beta_fast", 32.0), sc.get("beta_slow", 1.0)
    inv_freq = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))      # (hd/2,)
    if cfg.max_seq_len / orig > 1.0:
        pair = lambda b: hd * math.log(orig / (b * 2 * math.pi)) / (2 * math.log(theta))  # noqa: E731
        low, high = max(math.floor(pair(beta_fast)), 0), min(math.ceil(pair(beta_slow)), hd // 2 - 1)
        ramp = ((torch.arange(hd // 2, dtype=torch.float64) - low) / max(high - low, 0.001)).clamp(0, 1)
        inv_freq = inv_freq * (1 - ramp + ramp / factor)
    angles = torch.outer(torch.arange(cfg.max_seq_len, dtype=torch.float64), inv_freq)   # (L, hd/2)
    angles = torch.cat([angles, angles], dim=-1)                                          # (L, hd)
    a = sc.get("attention_factor", 1.0)
    return (angles.cos() * a).float(), (angles.sin() * a).float()


class Block(nn.Module):
    def __init__(self, cfg: LMConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_impl)
        self.attn = Attention(cfg, layer_idx)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_impl)
        self.ffn = MoEFeedForward(cfg) if cfg.use_moe else SwiGLU(cfg.hidden_size, cfg.intermediate_size,
                                                                  cfg.dropout)

    def forward(self, h, cos, sin, mask, kv_cache=None, rows=None):
        """h (B, T, D) -> (B, T, D). rows (K,) flat positions (row-major over B*T): return only their
        outputs, (1, K, D). Attention still reads every position (keys and values, and the cache),
        but the FFN after it runs on the K rows alone: the model's last block does this when only a
        few positions reach the loss (`MiniMindLM.forward_embeds`)."""
        h = h + self.attn(self.attn_norm(h), cos, sin, mask, kv_cache)   # (B, T, D)
        if rows is not None:
            h = h.reshape(1, -1, h.shape[-1]).index_select(1, rows)       # (1, K, D): one row of K tokens
        return h + self.ffn(self.ffn_norm(h))


_BLOCK_FORWARD = Block.forward   # the block that knows `rows`; another (a lesson's, a variant) runs in full


class MiniMindLM(nn.Module):
    def __init__(self, cfg: LMConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or LMConfig()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.dropout = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_impl)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        cos, sin = rope_tables_for(cfg)
        # not in the state dict: they are a function of the config
        self.register_buffer("rope_cos", cos, persistent=False)   # (max_seq_len, hd)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.aux_loss = torch.zeros(())      # the MoE layers' load-balancing loss of the last forward
        self.apply(self._init_weights)
        keep_freed_memory()   # malloc reuses freed activations, no page faults every step (cpu_memory.py)

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @property
    def max_seq_len(self) -> int:
        return self.cfg.max_seq_len

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) ids -> (B, T, D) token vectors."""
        return self.embed_tokens(input_ids)

    def forward_embeds(self, h: torch.Tensor, kv_cache: KVCache | None = None,
                       attention_mask: torch.Tensor | None = None,
                       logits_at: torch.Tensor | None = None, head: bool = True) -> torch.Tensor:
        """Run the blocks on token vectors h (B, T, D) -> logits (B, T, V).

        With a cache holding `past` tokens, h are the next T tokens (positions past..past+T-1).
        attention_mask (B, past+T): 1 = real token, 0 = padding (e.g. left-padded prompts).
        logits_at (B, T) bool: compute logits only where True and return them as (K, V), K = the
        number of True entries in row-major order. Training needs logits only where a label is
        taken (the answer tokens of SFT: a few of every row), and the head (D x V) is one of the
        biggest matrices, so this skips most of its work. logits_at may also be the flat indices
        (K,) int64 of those positions (`logits_at.flatten().nonzero()[:, 0]`): the same rows, but a
        gather `torch.compile` can trace (a boolean index has a data-dependent size). The last block
        then runs its FFN on those K rows only (its attention still reads every position): nothing
        above it reads the other rows. In a 2-layer model with a few answer tokens per row that is a
        third of the FLOPs of a training step.
        head=False returns the final-normed hidden states (B, T, D) or (K, D) instead of logits,
        for `chunked_lm_loss`.
        """
        B, T, _ = h.shape
        past = kv_cache.length if kv_cache is not None else 0
        if past + T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {past + T} tokens exceeds the context limit "
                             f"max_seq_len={self.cfg.max_seq_len}")
        cos = self.rope_cos[past:past + T].to(h.dtype)                 # (T, hd)
        sin = self.rope_sin[past:past + T].to(h.dtype)
        # (B, 1, T, S) with padding; None = plain causal (each layer builds/uses it as it prefers)
        mask = None if attention_mask is None else build_mask(T, past + T, attention_mask, h.device)
        rows = None                                                     # (K,) flat positions
        if logits_at is not None:
            rows = logits_at.flatten().nonzero()[:, 0] if logits_at.dtype == torch.bool else logits_at
        h = self.dropout(h)
        last = len(self.layers) - 1
        rows_inside = (rows is not None and not self.cfg.use_moe
                       and type(self.layers[last]).forward is _BLOCK_FORWARD)
        for i, block in enumerate(self.layers):
            if i == last and rows_inside:
                h = block(h, cos, sin, mask, kv_cache, rows=rows)[0]    # (K, D): its FFN on K rows only
            else:
                h = block(h, cos, sin, mask, kv_cache)                  # (B, T, D)
        if self.cfg.use_moe:                                            # 0 in eval mode, as upstream
            self.aux_loss = sum(block.ffn.aux_loss for block in self.layers)
        if rows is not None and not rows_inside:
            h = h.reshape(B * T, -1).index_select(0, rows)              # (K, D)
        h = self.norm(h)
        return self.lm_head(h) if head else h                           # (B, T, V) or (K, V)

    def forward(self, input_ids: torch.Tensor, kv_cache: KVCache | None = None,
                attention_mask: torch.Tensor | None = None,
                logits_at: torch.Tensor | None = None, head: bool = True) -> torch.Tensor:
        """input_ids (B, T) -> logits (B, T, V) (or (K, V) with `logits_at`, see `forward_embeds`)."""
        return self.forward_embeds(self.embed(input_ids), kv_cache, attention_mask, logits_at, head)


def next_token_targets(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """labels (B, T) -> targets (B, T): position t predicts labels[t+1]; the last predicts nothing.

    Shifting the labels, not the logits: logits are the biggest tensor of the step, and slicing
    off their last position would make a copy of them (and of their gradient).
    """
    return F.pad(labels[:, 1:], (0, 1), value=ignore_index)


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Next-token cross-entropy: position t predicts labels[t+1]; -100 labels are ignored.

    logits (B, T, V), labels (B, T) -> scalar mean over the counted positions, the value of
    `F.cross_entropy(logits.float().reshape(-1, V), targets.reshape(-1), ignore_index=ignore_index)`,
    computed by `cross_entropy` (the same numbers, less memory traffic).
    """
    targets = next_token_targets(labels, ignore_index)             # (B, T)
    return cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index)


def _softmax_minus_onehot_(z: torch.Tensor, t_safe: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The cross-entropy's gradient, in place of z = logits - logsumexp (C, V) in float:
    (softmax - onehot(target)) * scale, with t_safe (C, 1) the targets, scale (C, 1) (0 on ignored rows)."""
    z.exp_()                                                                # softmax
    z.scatter_add_(1, t_safe, torch.full_like(t_safe, -1, dtype=z.dtype))  # - onehot
    return z.mul_(scale)


class _CrossEntropy(torch.autograd.Function):
    """mean over counted rows of logsumexp(logits) - logits[target], row chunk by row chunk."""

    @staticmethod
    def forward(ctx, logits, targets, ignore_index, chunk_size):
        # logits (N, V) in their own dtype, targets (N,); every sum in >= float32
        acc = torch.promote_types(logits.dtype, torch.float32)
        counted = targets != ignore_index                                   # (N,)
        t_safe = torch.where(counted, targets, 0)[:, None]                  # (N, 1)
        lse = torch.cat([c.to(acc).logsumexp(dim=-1) for c in logits.split(chunk_size)])   # (N,)
        picked = logits.gather(1, t_safe)[:, 0].to(acc)                     # (N,) the target's logit
        n = counted.sum()                            # 0 counted rows: nan, as F.cross_entropy
        ctx.save_for_backward(logits, lse, t_safe, counted, n)
        ctx.chunk_size = chunk_size
        return ((lse - picked) * counted).sum() / n

    @staticmethod
    def backward(ctx, grad_loss):
        logits, lse, t_safe, counted, n = ctx.saved_tensors
        grad = torch.empty_like(logits)                                     # (N, V), logits' dtype
        scale = (counted.to(lse.dtype) * (grad_loss / n))[:, None]          # (N, 1): 0 on ignored rows
        for s in range(0, logits.shape[0], ctx.chunk_size):
            e = s + ctx.chunk_size
            z = logits[s:e].to(lse.dtype) - lse[s:e, None]                  # (C, V), a new tensor
            grad[s:e] = _softmax_minus_onehot_(z, t_safe[s:e], scale[s:e])
        return grad, None, None, None


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                  chunk_size: int = 64) -> torch.Tensor:
    """`F.cross_entropy(logits.float(), targets, ignore_index=ignore_index)` (the mean over counted
    rows) without a float32 copy of all the logits. logits (N, V), targets (N,) -> scalar.

    The plain statement converts the logits, the biggest tensor of a training step (4 x 640 x 6400
    of them), to float32, keeps their log_softmax for backward and, in backward, fills a zero
    gradient of that size, scatters into it, and converts it back. Here the forward reads the logits
    once, `chunk_size` rows at a time in float32, and keeps one logsumexp per row; the backward
    computes softmax - onehot chunk by chunk straight into a gradient of the logits' own dtype. The
    same float32 math, so the values agree with the plain statement to float rounding
    (`tests/test_speed_paths.py`). Code being compiled gets the plain statement: the compiler fuses
    it itself.
    """
    if torch.compiler.is_compiling():
        return F.cross_entropy(logits.float(), targets, ignore_index=ignore_index)
    with torch.autocast(logits.device.type, enabled=False):
        return _CrossEntropy.apply(logits, targets, ignore_index, chunk_size)


class _LinearCrossEntropy(torch.autograd.Function):
    """mean cross-entropy of h @ W^T, chunk by chunk; see `linear_cross_entropy`."""

    @staticmethod
    def forward(ctx, h, weight, targets, ignore_index, chunk_size, dtype):
        # h (N, D), weight (V, D), targets (N,); matmuls in `dtype` (autocast's), softmax in float32
        counted = targets != ignore_index                                   # (N,)
        n = counted.sum()                            # 0 counted rows: nan, as F.cross_entropy
        acc = torch.promote_types(dtype, torch.float32)                     # softmax, sums: >= float32
        hc, wc = h.to(dtype), weight.to(dtype)
        grad_h = torch.empty_like(hc)                                       # (N, D)
        grad_w = torch.zeros(weight.shape, dtype=acc, device=h.device)   # (V, D)
        total = torch.zeros((), dtype=acc, device=h.device)
        for s in range(0, h.shape[0], chunk_size):
            h_c, t_c, m_c = hc[s:s + chunk_size], targets[s:s + chunk_size], counted[s:s + chunk_size]
            logits = (h_c @ wc.t()).to(acc)                                 # (C, V): the only logits held
            lse = logits.logsumexp(dim=-1)                                  # (C,)
            t_safe = torch.where(m_c, t_c, 0)[:, None]                      # (C, 1)
            total += ((lse - logits.gather(1, t_safe)[:, 0]) * m_c).sum()
            # d(mean of counted losses)/d logits = (softmax - onehot(target)) / n, zero on ignored rows
            logits.sub_(lse[:, None])                                       # (C, V), in place: its own
            g = _softmax_minus_onehot_(logits, t_safe, (m_c.to(acc) / n)[:, None]).to(dtype)
            grad_h[s:s + chunk_size] = g @ wc                               # (C, D)
            if dtype == acc:
                grad_w.addmm_(g.t(), h_c)                                   # (V, D)
            else:                                       # a bf16 product per chunk, summed in float32
                grad_w += g.t() @ h_c
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = h.dtype, weight.dtype
        return total / n

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        return ((grad_h * grad_loss).to(ctx.dtypes[0]), (grad_w * grad_loss).to(ctx.dtypes[1]),
                None, None, None, None)


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         ignore_index: int = -100, chunk_size: int = 512) -> torch.Tensor:
    """`F.cross_entropy(h @ weight.T, targets)` without ever holding the (N, V) logits.

    h (N, D), weight (V, D) (the head), targets (N,) with `ignore_index` where no loss is taken
    -> the mean over the counted rows. The rows go in chunks of `chunk_size`: each chunk's logits
    (C, V) are computed, reduced to their loss, and turned at once into their gradient
    (softmax - onehot), which two matmuls fold into grad h and grad W; then the chunk is dropped.
    With the full logits in float32 (4 x 640 x 6400 of them are 65 MB, more than the model) the
    plain loss spends its time moving them: log_softmax forward and backward, each a few passes.
    Under autocast the matmuls run in autocast's dtype and the softmax in float32, as the plain
    head + `lm_loss` do. The gradients are computed in the forward, so call backward once.
    """
    dtype = h.dtype
    if torch.is_autocast_enabled(h.device.type):
        dtype = torch.get_autocast_dtype(h.device.type)
    with torch.autocast(h.device.type, enabled=False):
        return _LinearCrossEntropy.apply(h, weight, targets, ignore_index, chunk_size, dtype)


def chunked_lm_loss(model, input_ids: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100,
                    chunk_size: int = 512) -> torch.Tensor:
    """`lm_loss(model(input_ids), labels)` computed through `linear_cross_entropy`: the same loss and
    gradients (up to float rounding), without the (B, T, V) logits. input_ids, labels (B, T)."""
    h = model(input_ids, head=False)                                    # (B, T, D), after the final norm
    targets = next_token_targets(labels, ignore_index)                  # (B, T)
    return linear_cross_entropy(h.reshape(-1, h.shape[-1]), model.lm_head.weight, targets.reshape(-1),
                                ignore_index, chunk_size)


def loss_positions(labels: torch.Tensor, ignore_index: int = -100) -> tuple[torch.Tensor, torch.Tensor]:
    """The positions `lm_loss` counts, for `forward(..., logits_at=...)`.

    labels (B, T) -> (logits_at (B, T) bool: position t is kept when labels[t+1] is a target,
    targets (K,): those labels in the same row-major order). Then
    `F.cross_entropy(model(ids, logits_at=logits_at), targets)` equals `lm_loss(model(ids), labels)`.
    """
    targets = next_token_targets(labels, ignore_index)             # (B, T)
    logits_at = targets != ignore_index
    return logits_at, targets[logits_at]


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Unique parameters (a tied matrix counts once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
