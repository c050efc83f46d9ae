"""effkern's public ops. Each is a typed function over a ``torch.ops.effkern.*`` custom op
(fake impl for torch.compile, backend dispatch: cuda / triton / torch reference)."""

from effkern.ops.binary_hash import (
    KSHParams,
    RandomProjection,
    binary_attention,
    binary_hash_attention,
    ksh_hash,
    pack_bits,
    unpack_bits,
)
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
    "KSHParams",
    "MergePlan",
    "RandomProjection",
    "binary_attention",
    "binary_hash_attention",
    "bipartite_matching",
    "cls_attention",
    "fuse_tokens",
    "int8_linear",
    "int_gelu",
    "int_layernorm",
    "int_softmax",
    "ksh_hash",
    "masked_softmax",
    "pack_bits",
    "merge_tokens",
    "requantize",
    "token_gather",
    "token_scatter",
    "topk_tokens",
    "unmerge_tokens",
    "unpack_bits",
]
