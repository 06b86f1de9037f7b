"""Configuration dataclasses for the three parts of MiniMind-V.

The defaults are the real model (the "MiniMind2-V" generation):
- `LMConfig`: the 26M-parameter decoder-only language model (hidden 512, 8 layers,
  8 query heads sharing 2 key/value heads, SwiGLU FFN 1408, RMSNorm, RoPE, vocab 6400).
- `VisionConfig`: CLIP ViT-B/16 (224 px, patch 16, width 768, 12 layers, 12 heads).
- `VLMConfig`: the two joined by a projector; an image is a run of `num_patches`
  placeholder ids (`image_pad_id`) in the text, replaced by projected patch vectors.

Upstream's current generation, minimind-3v, is the same skeleton with other options (see
`minimind_3v` below): a SigLIP2 encoder (`vision_kind="siglip"`), the LayerNorm + MLP projector,
an LM of hidden 768 with per-head q/k RMSNorm (`qk_norm`), an explicit `head_dim`, and optionally
a mixture-of-experts FFN (`use_moe`). Every new field defaults to MiniMind2-V's behaviour.

Every other module reads its sizes from these objects, so a tiny model for a test or
a demo is just a config with smaller numbers.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field


def ffn_hidden_size(hidden_size: int, multiple_of: int = 64) -> int:
    """SwiGLU width as upstream MiniMind derives it: 8/3 * hidden, rounded up to `multiple_of`.

    8/3 keeps the parameter count of a 4x GELU MLP while using three matrices instead of two.
    For hidden 512: int(512 * 8 / 3) = 1365 -> 1408.
    """
    size = int(hidden_size * 8 / 3)
    return multiple_of * ((size + multiple_of - 1) // multiple_of)


@dataclass
class LMConfig:
    vocab_size: int = 6400
    hidden_size: int = 512
    num_layers: int = 8
    num_heads: int = 8           # query heads
    num_kv_heads: int = 2        # key/value heads (GQA: each serves num_heads // num_kv_heads queries)
    intermediate_size: int | None = None   # None -> ffn_hidden_size(hidden_size)
    head_dim: int | None = None  # width of one head; None -> hidden_size // num_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1e6
    rope_scaling: dict | None = None   # YaRN-style frequency scaling, upstream's keys (see lm.rope_tables_for)
    qk_norm: bool = False        # RMSNorm over each head of q and of k before RoPE (minimind-3v, Qwen3)
    max_seq_len: int = 8192      # length of the precomputed RoPE tables (the context limit)
    dropout: float = 0.0
    tie_word_embeddings: bool = True
    attn_impl: str = "manual"    # "manual": hand-written softmax(QK^T)V; "sdpa": F.scaled_dot_product_attention
    norm_impl: str = "auto"      # "eager": RMSNorm from raw ops; "fused": the kernels/ custom op;
                                 # "auto": fused where it can run, else eager (norm.RMSNorm says when)
    # mixture of experts (moe.py), used when use_moe: every FFN becomes num_experts SwiGLUs and a router
    use_moe: bool = False
    num_experts: int = 4
    num_experts_per_tok: int = 1           # top-k routing
    moe_intermediate_size: int | None = None   # None -> intermediate_size
    norm_topk_prob: bool = True            # renormalise the k chosen router probabilities to sum to 1
    router_aux_loss_coef: float = 5e-4     # weight of the load-balancing loss (0 = none)

    def __post_init__(self):
        if self.intermediate_size is None:
            self.intermediate_size = ffn_hidden_size(self.hidden_size)
        if self.head_dim is None:
            if self.hidden_size % self.num_heads != 0:
                raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
            self.head_dim = self.hidden_size // self.num_heads
        if self.moe_intermediate_size is None:
            self.moe_intermediate_size = self.intermediate_size
        if self.num_heads % self.num_kv_heads != 0:
            raise ValueError(f"num_heads {self.num_heads} is not divisible by num_kv_heads {self.num_kv_heads}")
        if self.head_dim % 2 != 0:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.use_moe and not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ValueError(f"num_experts_per_tok must be in 1..num_experts={self.num_experts}, "
                             f"got {self.num_experts_per_tok}")
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, dict):
            raise ValueError(f"rope_scaling must be a dict (upstream's YaRN keys) or None, got {self.rope_scaling!r}")
        if self.attn_impl not in ("manual", "sdpa"):
            raise ValueError(f"attn_impl must be 'manual' or 'sdpa', got {self.attn_impl!r}")
        if self.norm_impl not in ("auto", "eager", "fused"):
            raise ValueError(f"norm_impl must be 'auto', 'eager' or 'fused', got {self.norm_impl!r}")

    def to_dict(self) -> dict:
        return asdict(self)


STEMS = ("patch", "conv", "both")     # how a picture becomes patch vectors (VisionConfig.stem)


@dataclass
class VisionConfig:
    image_size: int = 224
    patch_size: int = 16
    hidden_size: int = 768       # "width" in OpenAI's CLIP
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    layer_norm_eps: float = 1e-5
    projection_dim: int = 512    # CLIP's joint image-text embedding size (visual.proj)
    num_channels: int = 3
    stem: str = "patch"          # "patch": CLIP's stride-p convolution; "conv": vision.ConvStem (small models);
                                 # "both": the two summed (vision.patch_tokens)
    stem_channels: int = 64      # the conv stem's feature maps
    stem_kernel: int = 5         # its kernel, px (odd)

    def __post_init__(self):
        if self.stem not in STEMS:
            raise ValueError(f"vision stem must be one of {', '.join(map(repr, STEMS))}, got {self.stem!r}")
        if self.stem_kernel % 2 != 1 or self.stem_kernel < 1:
            raise ValueError(f"stem_kernel must be an odd number of px, got {self.stem_kernel}")
        if self.image_size % self.patch_size != 0:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.hidden_size % self.num_heads != 0:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class VLMConfig:
    lm: LMConfig = field(default_factory=LMConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    image_pad_id: int = 34       # upstream MiniMind2-V: the id of '@', repeated num_patches times
    num_patches: int = 196       # placeholder run length = patch vectors per image
    projector: str = "linear"    # "linear": MiniMind2-V's Linear(768, 512); "mlp": LN -> Linear -> GELU -> Linear
    splice_impl: str = "vectorized"  # "vectorized": splice.splice (torch ops); "fused": the kernels/ op (CPU)
    vision_kind: str = "clip"    # "clip": vision.CLIPVisionTransformer; "siglip": siglip.SiglipVisionTransformer

    def __post_init__(self):
        if isinstance(self.lm, dict):
            self.lm = LMConfig(**self.lm)
        if isinstance(self.vision, dict):
            self.vision = VisionConfig(**self.vision)
        if self.projector not in ("linear", "mlp"):
            raise ValueError(f"projector must be 'linear' or 'mlp', got {self.projector!r}")
        if self.splice_impl not in ("vectorized", "fused"):
            raise ValueError(f"splice_impl must be 'vectorized' or 'fused', got {self.splice_impl!r}")
        if self.vision_kind not in ("clip", "siglip"):
            raise ValueError(f"vision_kind must be 'clip' or 'siglip', got {self.vision_kind!r}")
        if self.vision_kind == "siglip" and self.vision.stem != "patch":
            raise ValueError(f"the SigLIP encoder has only the patch stem, got vision stem {self.vision.stem!r}")
        if self.num_patches != self.vision.num_patches:
            raise ValueError(
                f"num_patches {self.num_patches} must equal the encoder's patch count "
                f"{self.vision.num_patches} ((image_size / patch_size)^2)")

    @property
    def image_ids(self) -> list[int]:
        """The placeholder run that stands for one image in the token ids."""
        return [self.image_pad_id] * self.num_patches

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------- named configurations
def minimind2_v() -> VLMConfig:
    """The real MiniMind2-V: CLIP ViT-B/16 + Linear(768, 512) + the 26M LM (the defaults)."""
    return VLMConfig()


def tiny_lm(vocab_size: int = 32, **overrides) -> LMConfig:
    """A language model small enough for a unit test to train in a second (hidden 32, 2 layers)."""
    return LMConfig(**{**dict(vocab_size=vocab_size, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                              max_seq_len=64), **overrides})


def tiny_vision(image_size: int = 48, **overrides) -> VisionConfig:
    """A one-layer ViT with 16 px patches (a 3x3 grid at 48 px), 32 wide."""
    return VisionConfig(**{**dict(image_size=image_size, patch_size=16, hidden_size=32, num_layers=1, num_heads=2,
                                  intermediate_size=64), **overrides})


def tiny_vlm(vocab_size: int, image_pad_id: int, image_size: int = 48) -> VLMConfig:
    """The tests' tiny VLM: `tiny_vision` + a 2-layer LM with 2 query heads sharing 1 key/value head."""
    vision = tiny_vision(image_size)
    return VLMConfig(lm=tiny_lm(vocab_size, num_heads=2, num_kv_heads=1, max_seq_len=128), vision=vision,
                     image_pad_id=image_pad_id, num_patches=vision.num_patches)


def siglip2_b32_256() -> VisionConfig:
    """SigLIP2 ViT-B/32 at 256 px (upstream's siglip2-base-p32-256-ve): 8x8 = 64 patches, width 768."""
    return VisionConfig(image_size=256, patch_size=32, hidden_size=768, num_layers=12, num_heads=12,
                        intermediate_size=3072, layer_norm_eps=1e-6)


def minimind_3v(use_moe: bool = False) -> VLMConfig:
    """Upstream's minimind-3v: SigLIP2 B/32 + LayerNorm/MLP projector + a 768-wide LM.

    LM: 8 layers, 8 query / 4 key-value heads of 96, SwiGLU 2432 (= ceil(768 pi / 64) * 64),
    RMSNorm eps 1e-6 (also over each q/k head), RoPE theta 1e6, context 32768, the new 6400-piece
    vocabulary whose `<|image_pad|>` is id 12 (64 of them per image). `use_moe`: minimind-3v-moe,
    every FFN four experts of the same width, one chosen per token.
    """
    lm = LMConfig(vocab_size=6400, hidden_size=768, num_layers=8, num_heads=8, num_kv_heads=4, head_dim=96,
                  intermediate_size=2432, rms_norm_eps=1e-6, rope_theta=1e6, max_seq_len=32768, qk_norm=True,
                  use_moe=use_moe, num_experts=4, num_experts_per_tok=1, norm_topk_prob=True,
                  router_aux_loss_coef=5e-4)
    vision = siglip2_b32_256()
    return VLMConfig(lm=lm, vision=vision, image_pad_id=12, num_patches=vision.num_patches, projector="mlp",
                     vision_kind="siglip")


def minimind_3v_moe() -> VLMConfig:
    """Upstream's minimind-3v-moe (the dense model with `use_moe=True`)."""
    return minimind_3v(use_moe=True)


PRESETS = {"minimind2-v": minimind2_v,     # name -> a function returning the VLMConfig
           "minimind-3v": minimind_3v,
           "minimind-3v-moe": minimind_3v_moe}
