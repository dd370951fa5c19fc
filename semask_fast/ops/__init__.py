"""The public ops: validation, then dispatch to a backend."""

from .atm_attention import atm_attention
from .mask_similarity import mask_similarity
from .semantic_attention import semantic_attention
from .shifted_window_attention import shifted_window_attention
from .window_attention import window_attention
from .window_process import window_merge, window_partition

__all__ = ["atm_attention", "mask_similarity", "semantic_attention", "shifted_window_attention",
           "window_attention", "window_merge", "window_partition"]
