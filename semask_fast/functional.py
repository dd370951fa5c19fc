"""The functional API, one function per op (``import semask_fast.functional as SF``)."""

from .ops import (atm_attention, mask_similarity, semantic_attention, shifted_window_attention, window_attention,
                  window_merge, window_partition)

__all__ = ["atm_attention", "mask_similarity", "semantic_attention", "shifted_window_attention",
           "window_attention", "window_merge", "window_partition"]
