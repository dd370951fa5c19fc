"""Segmentation models by name (``create``, ``list_models``) and the pieces they are built from:
SeMask-Swin with its semantic FPN head, SegViT's ATM head, Segmenter's mask transformer."""

from ._registry import create, list_models, register_model
from .atm import ATMDecoder, ATMDecoderLayer, ATMHead, ATMLoss
from .segmenter import MaskTransformerHead, Segmenter
from .segvit import SegViT
from .semask import SemanticLayer, reinit_linears, semantic_prior_logits, semask_loss
from .semask_swin import SeMaskFPN, SeMaskSwinTransformer

__all__ = ["create", "list_models", "register_model", "ATMDecoder", "ATMDecoderLayer", "ATMHead", "ATMLoss",
           "MaskTransformerHead", "Segmenter", "SegViT", "SemanticLayer", "reinit_linears", "semantic_prior_logits",
           "semask_loss", "SeMaskFPN", "SeMaskSwinTransformer"]
