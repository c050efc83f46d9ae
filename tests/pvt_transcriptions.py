"""Transcription of ShiftAddViT's published PVTv2 attention, the oracle of
tests/test_pvt_shiftadd.py (its steps and semantics in plain torch, trimmed to what the tests
need; not the repository's text).

Source: GATECH-EIC/ShiftAddViT,

* ``pvt/pvt_v2.py``: ``LinAngularAttention_ksh`` (``attn_dict["LinAngular"]``, chosen by the
  ``configs/pvt_v2/pvt_v2_b*_LinAngular.py`` configs) in the blocks of every stage but the last
  one (``Block(..., last_stage=...)``: the last stage keeps the softmax ``Attention``).
  Forward (``sparse_reg`` off): ``qk = to_qk(x)`` and ``v = to_v(x)`` as ``[B, H, N, d]`` (one
  projection for queries and keys; no spatial reduction); ``qk`` L2-normalised over d and hashed
  (``EcoformerQuant`` -> ``KernelSH``); ``dconv_v = dconv(v)`` with ``dconv = Conv2d(H, H, (9, 1),
  padding=(4, 0), groups=H, bias=False)`` on ``[B, H, N, d]``; ``attn = qk^T v`` and
  ``x = 0.5 v + qk attn / pi`` (``MatAdd``: a matrix product of {0, 1} codes); ``x`` L2-normalised
  over d; ``x += dconv_v``; heads merged; ``proj``; ``proj_drop``.
* ``pvt/hashing/ksh.py``: ``KernelSH.forward``: squared distances D of the tokens to the anchors
  ``[H, m, d]``, ``sigma`` = mean of D over tokens and anchors (per batch element and head),
  ``K = exp(-D / (2 sigma)) - mvec``, ``y = K A^T`` with ``A`` ``[H, b, m]``; then
  ``pvt/hashing/utils.py``: ``BinaryQuantizer``: codes ``y > 0`` as {0, 1}; backward: the
  incoming gradient where ``0 < y < 1``, zero elsewhere.

The hash is taken as already fitted (the published module fits it on its first forward); the
buffers map to effkern's as anchors <- ``hash_anchors``, mvec <- ``hash_mu``, A <- ``hash_proj``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class BinaryQuantizer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y: Tensor) -> Tensor:
        ctx.save_for_backward(y)
        return (y > 0).to(y.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (y,) = ctx.saved_tensors
        return grad * ((y > 0) & (y < 1)).to(grad.dtype)


def ksh_hash(x: Tensor, anchors: Tensor, mvec: Tensor, a: Tensor) -> Tensor:
    """KernelSH.forward then BinaryQuantizer: {0, 1} codes [B, H, N, b] of x [B, H, N, d]."""
    dist = ((x.unsqueeze(-2) - anchors[None, :, None]) ** 2).sum(-1)  # [B, H, N, m]
    sigma = dist.mean(-1).mean(-1)
    k = torch.exp(-dist / (2 * sigma[..., None, None])) - mvec[None, :, None, :]
    y = torch.einsum("bhnm,hkm->bhnk", k, a)
    return BinaryQuantizer.apply(y)


class LinAngularAttentionKSH(nn.Module):
    """The published ``LinAngularAttention_ksh`` (inference and training forward; hash given)."""

    def __init__(self, dim: int, num_heads: int, nbits: int, num_anchors: int, qkv_bias: bool = True,
                 kernel_size: int = 9):
        super().__init__()
        self.num_heads = num_heads
        self.to_qk = nn.Linear(dim, dim, bias=qkv_bias)
        self.to_v = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(0.0)
        self.dconv = nn.Conv2d(num_heads, num_heads, (kernel_size, 1), padding=(kernel_size // 2, 0), bias=False,
                               groups=num_heads)
        head_dim = dim // num_heads
        self.register_buffer("anchor", torch.zeros(num_heads, num_anchors, head_dim))
        self.register_buffer("mvec", torch.zeros(num_heads, num_anchors))
        self.register_buffer("A", torch.zeros(num_heads, nbits, num_anchors))

    def forward(self, x: Tensor, H: int, W: int) -> Tensor:  # the published signature
        b, n, c = x.shape
        qk = self.to_qk(x).reshape(b, n, self.num_heads, c // self.num_heads).permute(0, 2, 1, 3)
        v = self.to_v(x).reshape(b, n, self.num_heads, c // self.num_heads).permute(0, 2, 1, 3)
        qk = qk / qk.norm(dim=-1, keepdim=True)
        qk = ksh_hash(qk, self.anchor, self.mvec, self.A)
        dconv_v = self.dconv(v)
        attn = qk.transpose(-2, -1) @ v
        out = 0.5 * v + 1.0 / math.pi * (qk @ attn)
        out = out / out.norm(dim=-1, keepdim=True)
        out = out + dconv_v
        out = out.transpose(1, 2).reshape(b, n, c)
        return self.proj_drop(self.proj(out))
