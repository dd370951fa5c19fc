"""Drop-in modules built on the functional ops.

Each keeps the constructor, parameter and buffer names of the layer it
replaces, so state_dicts load both ways; ``forward`` is the original layer's
math with the attention core replaced by one op call.
"""

from .atm_attention import ATMAttention
from .semantic_attention import SemanticAttention
from .swin_families import ShiftedWindowAttention, ShiftWindowMSA, SwinWindowAttention
from .timm_patch import patch_timm
from .window_attention import WindowAttention

__all__ = ["ATMAttention", "SemanticAttention", "ShiftedWindowAttention", "ShiftWindowMSA", "SwinWindowAttention",
           "WindowAttention", "patch_timm"]
