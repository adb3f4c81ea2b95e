"""The model: sparse-MoE FFN layers, LoRA, upcycling of dense FFNs, backbones and the classifier."""

from ubsmoe.model.classifier import MoEClassifier, ModelSpec, build_classifier, load_tokenizer
from ubsmoe.model.moe_layer import MoEHook, RoutingContext, RoutingRecord, SparseMoEFFN

__all__ = ["MoEClassifier", "ModelSpec", "build_classifier", "load_tokenizer", "MoEHook", "RoutingContext",
           "RoutingRecord", "SparseMoEFFN"]
