"""Thin nn.Module wrappers over effkern's ops, drop-in for the modules they replace."""

from effkern.nn.binary_hash import BinaryHashAttention, TokenDWConv, fit_ksh_head, ksh_code_loss, ksh_similarity_targets
from effkern.nn.integer import IntGELU, IntLayerNorm, IntSoftmax, QuantAct, QuantLinear, QuantMatMul
from effkern.nn.shift import ShiftAddMoE, ShiftLinear
from effkern.nn.sparse24 import GPUSQDistillationLoss, Sparse24Int8Linear
from effkern.nn.tokens import (
    DynamicViTAttention,
    DynamicViTBlock,
    DynamicViTPredictor,
    EViTAttention,
    EViTBlock,
    IdleViTBlock,
    ToMeAttention,
    ToMeBlock,
    dynamicvit_keep,
    evit_left_tokens,
    evit_reorganize,
    idle_select_compute_scatter,
    tome_merge,
)

__all__ = [
    "BinaryHashAttention",
    "DynamicViTAttention",
    "DynamicViTBlock",
    "DynamicViTPredictor",
    "EViTAttention",
    "EViTBlock",
    "GPUSQDistillationLoss",
    "IdleViTBlock",
    "IntGELU",
    "IntLayerNorm",
    "IntSoftmax",
    "QuantAct",
    "QuantLinear",
    "QuantMatMul",
    "ShiftAddMoE",
    "ShiftLinear",
    "Sparse24Int8Linear",
    "ToMeAttention",
    "ToMeBlock",
    "TokenDWConv",
    "dynamicvit_keep",
    "evit_left_tokens",
    "evit_reorganize",
    "fit_ksh_head",
    "idle_select_compute_scatter",
    "ksh_code_loss",
    "ksh_similarity_targets",
    "tome_merge",
]
