"""The model: sparse-MoE FFN layers, LoRA, upcycling of dense FFNs, backbones, and the model a task's head sits on."""

from ubsmoe.model.moe_layer import MoEHook, RoutingContext, RoutingRecord, SparseMoEFFN
from ubsmoe.model.moe_model import HeadFactory, MoEModel, ModelSpec, TaskHead, build_model
from ubsmoe.model.pretrained import load_tokenizer

__all__ = ["HeadFactory", "MoEModel", "ModelSpec", "TaskHead", "build_model", "load_tokenizer", "MoEHook",
           "RoutingContext", "RoutingRecord", "SparseMoEFFN"]
