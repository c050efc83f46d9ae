"""timm's generic ViT layers (``DropPath``, ``LayerScale``, ``Mlp``, ``Attention``, ``Block``,
``PatchEmbed``), shared by every family module in :mod:`effkern.nn` and every model in
:mod:`effkern.models`.

They live here, apart from any one method, so that a family (tokens, binary_hash, integer, ...)
subclasses or assembles them without importing another family's module: dependencies point
one way, models -> nn (this module, then the families) -> ops.

Module and parameter names and the forward are timm's (``timm.models.vision_transformer`` and
``timm.layers``), so timm / DeiT checkpoints load into them with ``load_state_dict`` and the
method-specific subclasses stay drop-ins for the modules they replace. Pure torch: no effkern
op is needed for the dense ViT.

LayerNorm eps: ``Block``'s default ``norm_layer`` is ``nn.LayerNorm`` (eps 1e-5), as timm
0.x's ``Block`` class and the DynamicViT / EViT / IdleViT / ToMe block transcriptions that the
token tests compare against (``tests/tokens_transcriptions.py``). A timm ViT uses eps 1e-6: its
``VisionTransformer`` passes ``partial(nn.LayerNorm, eps=1e-6)`` to its blocks (and timm 1.0.31's
``Block`` defaults to eps 1e-6). Pass ``norm_layer=partial(nn.LayerNorm, eps=1e-6)`` to
reproduce a timm ViT's outputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Attention", "Block", "DropPath", "LayerScale", "Mlp", "PatchEmbed"]


class _StraightThrough(torch.autograd.Function):
    """Forward: ``value``; backward: the gradient passes to ``x`` unchanged."""

    @staticmethod
    def forward(ctx, x: Tensor, value: Tensor) -> Tensor:
        return value

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


def straight_through(x: Tensor, value: Tensor) -> Tensor:
    """``value`` exactly in the forward pass, the gradient straight to ``x`` in the backward pass
    (the straight-through estimator of the shift and 2:4-int8 layers' rounding)."""
    return _StraightThrough.apply(x, value.detach())


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


class PatchEmbed(nn.Module):
    """timm's ``PatchEmbed``: a ``patch_size``-strided convolution ``proj`` cuts the image into
    patches, flattened to tokens ``[B, num_patches, embed_dim]`` (``flatten=False``: kept
    ``[B, embed_dim, H', W']``), then ``norm`` (Identity unless ``norm_layer``).

    As timm with its default ``strict_img_size``, the input must be ``img_size`` (the position
    embedding of a model is sized for it), checked with a ValueError naming the size rather than
    a shape error further on; unlike timm, an ``img_size`` that is not a multiple of
    ``patch_size`` is refused instead of silently cropping the border.
    """

    def __init__(self, img_size: int | tuple[int, int] = 224, patch_size: int | tuple[int, int] = 16,
                 in_chans: int = 3, embed_dim: int = 768, norm_layer: type[nn.Module] | None = None,
                 flatten: bool = True, bias: bool = True):
        super().__init__()
        self.img_size, self.patch_size = _pair(img_size), _pair(patch_size)
        if any(s % p for s, p in zip(self.img_size, self.patch_size)):
            raise ValueError(f"PatchEmbed: img_size={img_size} is not a multiple of patch_size={patch_size}")
        self.grid_size = (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.flatten = flatten
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size, bias=bias)
        self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(f"PatchEmbed: images must be [B, C, {self.img_size[0]}, {self.img_size[1]}] "
                             f"(img_size), got {tuple(x.shape)}")
        x = self.proj(x)
        if self.flatten:
            x = x.flatten(2).transpose(1, 2)  # [B, C, H', W'] -> [B, H' W', C]
        return self.norm(x)


class DropPath(nn.Module):
    """Stochastic depth per sample (timm's DropPath): in training, zero a sample's branch with
    probability ``drop_prob`` and scale the survivors by 1 / (1 - drop_prob)."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: Tensor) -> Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep


class LayerScale(nn.Module):
    """timm's LayerScale: ``x * gamma``, gamma initialised to ``init_values``."""

    def __init__(self, dim: int, init_values: float = 1e-5):
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class Mlp(nn.Module):
    """timm's Mlp: fc1 -> act -> drop1 -> norm (Identity) -> fc2 -> drop2."""

    def __init__(self, in_features: int, hidden_features: int | None = None, out_features: int | None = None,
                 act_layer: type[nn.Module] = nn.GELU, drop: float = 0.0):
        super().__init__()
        hidden_features = hidden_features or in_features
        out_features = out_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.norm = nn.Identity()
        self.fc2 = nn.Linear(hidden_features, out_features)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1(x))))))


class Attention(nn.Module):
    """timm's ``Attention`` (fused path): multi-head self-attention through
    ``F.scaled_dot_product_attention``. The base of the method-specific attentions below, which
    reuse :meth:`qkv_heads`, :meth:`attend` and :meth:`project`."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, qk_norm: bool = False,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, norm_layer: type[nn.Module] = nn.LayerNorm):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"{type(self).__name__}: dim={dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def qkv_heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(q, k, v), each ``[B, H, N, d]``, q and k through q_norm / k_norm."""
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return self.q_norm(q), self.k_norm(k), v

    def attend(self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        """softmax(q k^T * scale + attn_mask) v with attention dropout in training."""
        p = self.attn_drop.p if self.training else 0.0
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p, scale=self.scale)

    def project(self, o: Tensor) -> Tensor:
        """``[B, H, N, d]`` head outputs -> ``[B, N, C]`` through proj and proj_drop."""
        b, _, n, _ = o.shape
        return self.proj_drop(self.proj(o.transpose(1, 2).reshape(b, n, -1)))

    def forward(self, x: Tensor) -> Tensor:
        return self.project(self.attend(*self.qkv_heads(x)))


class Block(nn.Module):
    """timm's pre-norm ViT ``Block``: ``x + drop_path1(ls1(attn(norm1(x))))`` then
    ``x + drop_path2(ls2(mlp(norm2(x))))``. Subclasses swap the attention (``attn_layer``)."""

    attn_layer: type[Attention] = Attention

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = False,
                 qk_norm: bool = False, proj_drop: float = 0.0, attn_drop: float = 0.0,
                 init_values: float | None = None, drop_path: float = 0.0, act_layer: type[nn.Module] = nn.GELU,
                 norm_layer: type[nn.Module] = nn.LayerNorm):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = self.attn_layer(dim, num_heads=num_heads, qkv_bias=qkv_bias, qk_norm=qk_norm,
                                    attn_drop=attn_drop, proj_drop=proj_drop, norm_layer=norm_layer)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def mlp_residual(self, x: Tensor) -> Tensor:
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        return self.mlp_residual(x)
