"""semask_fast: fast, exact, drop-in attention layers for transformer semantic segmentation.

One public function per op (shapes in each docstring)::

    window_attention            Swin W-MSA / SW-MSA          (B*nW, h, N, d)
    window_partition / _merge   fused pad + roll + partition (B, H, W, C) <-> (B*nW, Wh, Ww, C)
    shifted_window_attention    zero-copy SW-MSA on the image layout
    semantic_attention          SeMask score-and-mask update (B_, N, K), (B_, N, C)
    atm_attention               SegViT ATM cross-attention + head-mean mask logits
    mask_similarity             Segmenter's normalised patch-class similarity

Each dispatches to the best backend that supports its inputs (``backend="auto"``)
or to the one named; ``available_backends()`` says which can run here and why not.
"""

__version__ = "0.1.0"

from .backends import BackendNotSupportedError, available_backends, record_dispatch
from .ops import (atm_attention, mask_similarity, semantic_attention, shifted_window_attention, window_attention,
                  window_merge, window_partition)
from . import nn  # noqa: E402  (needs the ops above)
from .nn import patch_timm
from .patch import patch

__all__ = [
    "__version__", "BackendNotSupportedError", "available_backends", "record_dispatch", "atm_attention",
    "mask_similarity", "semantic_attention", "shifted_window_attention", "window_attention", "window_merge",
    "window_partition", "nn", "patch_timm", "patch",
]
