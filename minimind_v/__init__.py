"""MiniMind-V from raw PyTorch ops.

Data flow: image -> `image.preprocess` -> `vision.CLIPVisionTransformer` -> `vlm.VisionProjector`
-> `splice.splice` into the token embeddings -> `lm.MiniMindLM` blocks -> logits -> `generate`.
"""
from .config import LMConfig, VisionConfig, VLMConfig

__all__ = ["LMConfig", "VisionConfig", "VLMConfig"]
__version__ = "0.1.0"

# Learner mode for notebooks: MINIMIND_V_LEARNER=1 builds the model from lessons/*/exercise.py
# wherever they pass their tests (see minimind_v/learner.py). Unset, this costs one lookup.
import os as _os

if _os.environ.get("MINIMIND_V_LEARNER", "") not in ("", "0"):
    from .learner import activate as _activate
    _activate()
