"""Thin nn.Module wrappers over effkern's ops, drop-in for the modules they replace."""

from effkern.nn.integer import IntGELU, IntLayerNorm, IntSoftmax, QuantAct, QuantLinear, QuantMatMul

__all__ = ["IntGELU", "IntLayerNorm", "IntSoftmax", "QuantAct", "QuantLinear", "QuantMatMul"]
