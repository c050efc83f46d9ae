"""effkern's public ops. Each is a typed function over a ``torch.ops.effkern.*`` custom op
(fake impl for torch.compile, backend dispatch: cuda / triton / torch reference)."""

from effkern.ops.integer import int8_linear, int_gelu, int_layernorm, int_softmax, requantize

__all__ = ["int8_linear", "int_gelu", "int_layernorm", "int_softmax", "requantize"]
