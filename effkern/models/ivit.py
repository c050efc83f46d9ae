"""I-ViT: an integer-only Vision Transformer (DeiT/ViT layout) assembled from effkern.nn.

Every activation between the patch embedding and the classifier head is an integer tensor with
a scale (8-bit, attention logits 16-bit); LayerNorm, softmax and GELU run as I-ViT's integer
kernels, linear layers as the int8 GEMM, residual adds and rescaling as dyadic requantisation.

Parameter names follow timm's VisionTransformer (``patch_embed.proj``, ``cls_token``,
``pos_embed``, ``blocks.N.norm1/attn.qkv/attn.proj/norm2/mlp.fc1/mlp.fc2``, ``norm``, ``head``),
so a float checkpoint loads with :meth:`IViT.load_float_state_dict`. The quantisers then need
their ranges: run :meth:`IViT.calibrate` on a few batches, or fine-tune (quantisation-aware
training) in train mode.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor, nn

from effkern.nn import IntGELU, IntLayerNorm, IntSoftmax, QuantAct, QuantLinear, QuantMatMul
from effkern.nn.layers import PatchEmbed


class IntAttention(nn.Module):
    """Multi-head self-attention on integers (timm's ``Attention`` names: qkv, proj)."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"IntAttention: dim={dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = QuantLinear(dim, dim * 3, bias=qkv_bias)
        self.qact_qkv = QuantAct(8)
        self.matmul_qk = QuantMatMul()
        # 8-bit logits, as I-ViT: with finer scales Shiftmax's row sum of exps saturates at
        # 2^31 - 1 (see effkern.ops.int_softmax) and the probabilities lose their normalisation.
        self.qact_logits = QuantAct(8)
        self.int_softmax = IntSoftmax(output_bit=8)
        self.matmul_av = QuantMatMul()
        self.qact_out = QuantAct(8)
        self.proj = QuantLinear(dim, dim)

    def forward(self, x: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
        b, n, c = x.shape
        x, s = self.qkv(x, scale)
        x, s_qkv = self.qact_qkv(x, s)
        q, k, v = x.reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        logits, s = self.matmul_qk(q, s_qkv, k.transpose(-2, -1), s_qkv)
        logits, s = self.qact_logits(logits * self.scale, s * self.scale)
        attn, s = self.int_softmax(logits, s)
        x, s = self.matmul_av(attn, s, v, s_qkv)
        x, s = self.qact_out(x.transpose(1, 2).reshape(b, n, c), s)
        return self.proj(x, s)


class IntMlp(nn.Module):
    """fc1 -> ShiftGELU -> fc2 on integers (timm's ``Mlp`` names: fc1, fc2)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = QuantLinear(dim, hidden)
        self.qact_gelu = QuantAct(8)
        self.act = IntGELU()
        self.qact_fc2 = QuantAct(8)
        self.fc2 = QuantLinear(hidden, dim)

    def forward(self, x: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
        x, s = self.fc1(x, scale)
        x, s = self.qact_gelu(x, s)
        x, s = self.act(x, s)
        x, s = self.qact_fc2(x, s)
        return self.fc2(x, s)


class IntBlock(nn.Module):
    """Pre-norm transformer block; the residual adds are requantised by QuantAct(identity=...)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True):
        super().__init__()
        self.norm1 = IntLayerNorm(dim)
        self.qact_norm1 = QuantAct(8)
        self.attn = IntAttention(dim, num_heads, qkv_bias)
        self.qact_residual1 = QuantAct(8)
        self.norm2 = IntLayerNorm(dim)
        self.qact_norm2 = QuantAct(8)
        self.mlp = IntMlp(dim, int(dim * mlp_ratio))
        self.qact_residual2 = QuantAct(8)

    def forward(self, x: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
        h, s = self.qact_norm1(*self.norm1(x, scale))
        h, s = self.attn(h, s)
        x, scale = self.qact_residual1(h, s, identity=x, identity_scaling_factor=scale)
        h, s = self.qact_norm2(*self.norm2(x, scale))
        h, s = self.mlp(h, s)
        return self.qact_residual2(h, s, identity=x, identity_scaling_factor=scale)


class IViT(nn.Module):
    """I-ViT classifier. ``forward(images) -> logits`` (float, from the integer head output)."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, num_classes: int = 1000,
                 embed_dim: int = 192, depth: int = 12, num_heads: int = 3, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True):
        super().__init__()
        # float, timm's: its output enters the integer domain through qact_embed
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.randn(1, self.patch_embed.num_patches + 1, embed_dim) * 0.02)
        self.qact_embed = QuantAct(8)
        self.blocks = nn.ModuleList(IntBlock(embed_dim, num_heads, mlp_ratio, qkv_bias) for _ in range(depth))
        self.norm = IntLayerNorm(embed_dim)
        self.qact_head = QuantAct(8)
        self.head = QuantLinear(embed_dim, num_classes)

    def forward(self, images: Tensor) -> Tensor:
        x = self.patch_embed(images)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x, s = self.qact_embed(x)
        for block in self.blocks:
            x, s = block(x, s)
        x, s = self.qact_head(*self.norm(x, s))
        logits, _ = self.head(x[:, 0], s)
        return logits

    def load_float_state_dict(self, state_dict: dict[str, Tensor]) -> None:
        """Load a float (timm-layout) checkpoint; only the quantisers' range buffers may be
        missing from it, anything else missing or unexpected raises."""
        result = self.load_state_dict(state_dict, strict=False)
        missing = [k for k in result.missing_keys if not k.endswith(("x_min", "x_max", "act_scaling_factor"))]
        if missing or result.unexpected_keys:
            raise KeyError(f"IViT.load_float_state_dict: missing {missing}, unexpected {result.unexpected_keys}")

    @torch.no_grad()
    def calibrate(self, batches: Iterable[Tensor]) -> None:
        """Set every quantiser's range from calibration images (train-mode passes, then eval)."""
        self.train()
        for images in batches:
            self(images)
        self.eval()
