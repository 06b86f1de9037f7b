"""MiniMind-V: a frozen CLIP encoder, a projector, and the language model, joined by a splice.

The whole model, in data-flow order (real sizes: S = 224, P = 196 patches, Dv = 768, D = 512):

    pixel_values (B, N, 3, S, S)            N images per row (rows with fewer are padded)
    -> vision_encoder (frozen CLIP ViT)     last block's output before ln_post   (B*N, 1+P, Dv)
    -> drop CLS                             image_features                       (B, N, P, Dv)
    -> vision_proj                          one vector per patch in the LM space (B, N, P, D)
    -> splice into lm.embed(input_ids)      each run of P image-pad ids <- one image (B, T, D)
    -> lm.forward_embeds                    the usual blocks, norm, head         (B, T, V)

The image enters the language model only as input vectors: the LM never knows which positions
came from pixels. That happens once, at prefill. A decode step feeds one new text token and
reads the images' keys and values from the KV cache like any other earlier position.

minimind-3v swaps the parts, not the flow (`VLMConfig.vision_kind="siglip"`, `projector="mlp"`):
a SigLIP2 encoder (siglip.py) whose 64 patch vectors are taken AFTER its final LayerNorm (it has
no CLS to drop), and LayerNorm -> Linear -> GELU -> Linear as the projector. Each encoder's
forward returns what its generation uses (CLIP: CLS + patches before ln_post; SigLIP: patches
after it), and the VLM keeps the last `num_patches` vectors, so this module does not branch on the kind.

Frozen means three things here: the encoder's parameters have requires_grad=False, it stays in
eval mode when the model is put in training mode, and `trainable_state_dict()` (what upstream
MiniMind-V files hold) leaves it out. `state_dict()` stays the full nn.Module one (every weight,
encoder included), so a checkpoint of ours restores the whole model on its own.
"""
from __future__ import annotations

import torch
from torch import nn

from .config import VLMConfig
from .lm import MiniMindLM
from .siglip import SiglipVisionTransformer
from .splice import splice
from .vision import CLIPVisionTransformer

ENCODERS = {"clip": CLIPVisionTransformer, "siglip": SiglipVisionTransformer}   # VLMConfig.vision_kind -> class


class VisionProjector(nn.Module):
    """Patch vectors of the vision encoder (.., Dv) -> vectors in the LM's embedding space (.., D).

    kind="linear": MiniMind2-V's single Linear(Dv, D) with bias, kept inside an nn.Sequential so
    the weight names match upstream (`vision_proj.vision_proj.0.weight` / `.bias`).
    kind="mlp": LayerNorm(Dv) -> Linear(Dv, D) -> GELU (exact, erf) -> Linear(D, D), the
    LLaVA-1.5-style projector of minimind-3v (ours `vision_proj.vision_proj.{0,1,3}.*`; upstream's
    file names them `vision_proj.mlp.{0,1,3}.*`, which `checkpoint.load_upstream` translates).
    """

    def __init__(self, in_dim: int = 768, out_dim: int = 512, kind: str = "linear"):
        super().__init__()
        if kind == "linear":
            self.vision_proj = nn.Sequential(nn.Linear(in_dim, out_dim))
        elif kind == "mlp":
            self.vision_proj = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, out_dim),
                                             nn.GELU(), nn.Linear(out_dim, out_dim))
        else:
            raise ValueError(f"projector kind must be 'linear' or 'mlp', got {kind!r}")

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.vision_proj(features)                  # (.., Dv) -> (.., D)


class MiniMindVLM(nn.Module):
    def __init__(self, cfg: VLMConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or VLMConfig()
        self.vision_encoder = ENCODERS[cfg.vision_kind](cfg.vision)
        self.vision_proj = VisionProjector(cfg.vision.hidden_size, cfg.lm.hidden_size, cfg.projector)
        self.lm = MiniMindLM(cfg.lm)
        self.image_ids = cfg.image_ids                      # the placeholder run of one image
        self.freeze_vision_encoder()

    # -- the frozen encoder ---------------------------------------------------------------------
    def freeze_vision_encoder(self) -> None:
        for p in self.vision_encoder.parameters():
            p.requires_grad_(False)
        self.vision_encoder.eval()

    def train(self, mode: bool = True):
        """Training mode for the projector and the LM; the encoder always stays in eval mode."""
        super().train(mode)
        self.vision_encoder.eval()
        return self

    def trainable_state_dict(self) -> dict:
        """Every weight except the frozen encoder's (the layout upstream MiniMind-V saves)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("vision_encoder.")}

    @property
    def max_seq_len(self) -> int:
        return self.lm.max_seq_len

    @property
    def aux_loss(self) -> torch.Tensor:
        """The LM's MoE load-balancing loss of the last forward (0 without MoE or in eval mode)."""
        return self.lm.aux_loss

    # -- images -> vectors ------------------------------------------------------------------------
    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The encoder's patch vectors: CLIP's without CLS, before its final LayerNorm (MiniMind2-V);
        SigLIP's after it (minimind-3v), the same as each encoder's `patch_features`.

        pixel_values (B, N, 3, S, S) -> (B, N, P, Dv); also (n, 3, S, S) -> (n, P, Dv).
        No gradient flows into a frozen encoder (it runs under no_grad unless some of its
        parameters were explicitly set to require gradients).
        """
        if pixel_values.dim() not in (4, 5):
            raise ValueError(f"pixel_values must be (B, N, 3, S, S) or (n, 3, S, S), "
                             f"got shape {tuple(pixel_values.shape)}")
        lead = pixel_values.shape[:-3]                                  # (B, N) or (n,)
        pixels = pixel_values.reshape(-1, *pixel_values.shape[-3:])     # (B*N, 3, S, S)
        needs_grad = any(p.requires_grad for p in self.vision_encoder.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and needs_grad):
            hidden = self.vision_encoder(pixels)                        # (B*N, 1+P, Dv) CLIP, (B*N, P, Dv) SigLIP
        features = hidden[:, hidden.shape[1] - self.cfg.num_patches:, :]   # (B*N, P, Dv): CLIP's CLS dropped
        return features.reshape(*lead, *features.shape[1:])

    def image_embeds(self, pixel_values: torch.Tensor | None = None,
                     image_features: torch.Tensor | None = None) -> torch.Tensor:
        """Pixels (B, N, 3, S, S) or precomputed features (B, N, P, Dv) -> (B, N, P, D)."""
        if image_features is None:
            image_features = self.image_features(pixel_values)
        if image_features.dim() != 4 or image_features.shape[2:] != (self.cfg.num_patches,
                                                                      self.cfg.vision.hidden_size):
            raise ValueError(f"image_features must be (B, N, {self.cfg.num_patches}, "
                             f"{self.cfg.vision.hidden_size}), got {tuple(image_features.shape)}")
        return self.vision_proj(image_features.to(self.vision_proj.vision_proj[0].weight.dtype))

    # -- the forward pass ---------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                kv_cache=None, attention_mask: torch.Tensor | None = None,
                image_features: torch.Tensor | None = None,
                logits_at: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, T) -> logits (B, T, V).

        Images, given as pixel_values (B, N, 3, S, S) (or (B, 3, S, S) for one each) or as the
        encoder's image_features (B, N, P, Dv) (e.g. from a cache), are spliced in at prefill:
        the n-th run of `image_ids` in row b becomes image (b, n). A decode step (the cache already
        holds tokens) takes text only, and so does a batch with no images (N = 0): its logits are the
        LM's on the same ids. `logits_at` (B, T) bool: logits at those positions only, (K, V).
        """
        if pixel_values is not None and image_features is not None:
            raise ValueError("pass pixel_values or image_features, not both")
        h = self.lm.embed(input_ids)                                    # (B, T, D)
        if pixel_values is not None or image_features is not None:
            if kv_cache is not None and kv_cache.length > 0:
                raise ValueError("images are spliced at prefill only; this call continues a KV cache "
                                 f"of {kv_cache.length} tokens (pass the images with the prompt)")
            if pixel_values is not None and pixel_values.dim() == 4:
                pixel_values = pixel_values[:, None]                    # one image per row
            if pixel_values is not None and pixel_values.shape[0] != input_ids.shape[0] or \
                    image_features is not None and image_features.shape[0] != input_ids.shape[0]:
                raise ValueError(f"{input_ids.shape[0]} rows of input_ids but images for "
                                 f"{(pixel_values if pixel_values is not None else image_features).shape[0]}")
            n_images = (pixel_values if pixel_values is not None else image_features).shape[1]
            if n_images == 0:       # a text-only batch (collate gives (B, 0, 3, S, S)): nothing to splice
                return self.lm.forward_embeds(h, kv_cache, attention_mask, logits_at)
            vectors = self.image_embeds(pixel_values, image_features)   # (B, N, P, D)
            if self.cfg.splice_impl == "fused":
                from .ops import fused_splice  # builds/loads the kernels on first use
                h = fused_splice(input_ids, h, vectors, self.image_ids)  # (B, T, D), each row written once
            else:
                h = splice(input_ids, h, vectors, self.image_ids)       # (B, T, D)
        return self.lm.forward_embeds(h, kv_cache, attention_mask, logits_at)   # (B, T, V) or (K, V)


def pixel_transform(cfg: VLMConfig, settings: dict | None = None):
    """The encoder's own preprocessing as `transform(pil_image) -> (3, S, S)`, or None for CLIP's.

    SigLIP resizes the whole picture to S x S (no crop) and scales to -1..1 (`siglip.preprocess_siglip`);
    `settings` are the vision folder's preprocessor_config.json values (size, resample, mean, std).
    """
    if cfg.vision_kind != "siglip":
        return None
    from .siglip import preprocess_siglip
    kwargs = {"size": cfg.vision.image_size, **(settings or {})}
    return lambda image: preprocess_siglip(image, **kwargs)
