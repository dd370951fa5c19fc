"""The public ops: validation, then the op's custom op (``torch.ops.semask_fast.<op>``).

Each op module describes its op once (an :class:`~semask_fast.ops._library.OpSpec`); ``SPECS``
holds them in this order, and every list of ops (the registry, ``info``, the tests) derives from it.
"""

# Import order is the order of SPECS (and of every table).
from .window_attention import window_attention
from .window_process import window_merge, window_partition
from .shifted_window_attention import shifted_window_attention
from .semantic_attention import semantic_attention
from .atm_attention import atm_attention
from .mask_similarity import mask_similarity
from ._library import SPECS, OpSpec, decompositions, lowered_to_reference

__all__ = ["SPECS", "OpSpec", "decompositions", "lowered_to_reference", "atm_attention", "mask_similarity", "semantic_attention", "shifted_window_attention",
           "window_attention", "window_merge", "window_partition"]
