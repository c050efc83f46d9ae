"""effkern's public ops. Each is a typed function over a ``torch.ops.effkern.*`` custom op
(fake impl for torch.compile, backend dispatch: cuda / triton / torch reference)."""

from effkern.ops.integer import int8_linear, int_gelu, int_layernorm, int_softmax, requantize
from effkern.ops.tokens import (
    MergePlan,
    bipartite_matching,
    cls_attention,
    fuse_tokens,
    masked_softmax,
    merge_tokens,
    token_gather,
    token_scatter,
    topk_tokens,
    unmerge_tokens,
)

__all__ = [
    "MergePlan",
    "bipartite_matching",
    "cls_attention",
    "fuse_tokens",
    "int8_linear",
    "int_gelu",
    "int_layernorm",
    "int_softmax",
    "masked_softmax",
    "merge_tokens",
    "requantize",
    "token_gather",
    "token_scatter",
    "topk_tokens",
    "unmerge_tokens",
]
