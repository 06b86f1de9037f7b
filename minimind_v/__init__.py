"""MiniMind-V from raw PyTorch ops.

Data flow: image -> `image.preprocess` -> `vision.CLIPVisionTransformer` -> `vlm.VisionProjector`
-> `splice.splice` into the token embeddings -> `lm.MiniMindLM` blocks -> logits -> `generate`.
"""
from .config import LMConfig, VisionConfig, VLMConfig

__all__ = ["LMConfig", "VisionConfig", "VLMConfig"]
__version__ = "0.1.0"
