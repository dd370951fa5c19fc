"""Model pieces assembled from the drop-in modules: SeMask, SegViT's ATM, Segmenter."""

from ._registry import create, list_models, register_model
from .atm import ATMDecoderLayer
from .segmenter import MaskTransformerHead
from .semask import SemanticLayer, reinit_linears, semantic_prior_logits, semask_loss

__all__ = ["create", "list_models", "register_model", "ATMDecoderLayer", "MaskTransformerHead", "SemanticLayer", "reinit_linears", "semantic_prior_logits",
           "semask_loss"]
