"""Binary-hash additive attention (EcoFormer, ShiftAddViT) as a drop-in for timm's ``Attention``.

:class:`BinaryHashAttention` subclasses :class:`effkern.nn.layers.Attention` (timm's names:
qkv, q_norm, k_norm, attn_drop, proj, proj_drop) and replaces softmax attention by
:func:`effkern.ops.binary_hash.binary_hash_attention`: queries and keys are hashed per head
(KSH or a random projection) to b-bit codes and attention is the linear form of the op
("ecoformer": {-1, +1} codes, "shiftadd": {0, 1} codes; see :mod:`effkern.ops.binary_hash`).

State dict. The hash (anchors / mu / proj, or the random projection's weight) lives in
*non-persistent* buffers, so ``state_dict()`` holds exactly timm's keys (plus ``dwconv.weight``
when the depthwise convolution is on): a timm / ``layers.Attention`` state dict loads strictly
into this module and (without dwconv) this module's state dict loads strictly into a
``layers.Attention``. The hash is saved and restored separately with :meth:`hash_state_dict`
and :meth:`load_hash_state_dict` (it is data-fitted, not trained). A state dict without any
``dwconv.*`` key (a plain attention checkpoint) leaves the convolution at its initial weights
instead of reporting it missing; a state dict that has some but not all of them still fails.

:class:`PVTBinaryHashAttention` is the same attention as a drop-in for timm's PVTv2 ``Attention``
(its ``q`` / ``kv`` names, ``forward(x, feat_size)``) in ShiftAddViT's published PVTv2 form.

Fitting. :meth:`BinaryHashAttention.fit_hash` fits the KSH hash of every head to calibration
inputs with EcoFormer's greedy bit-by-bit procedure (:func:`fit_ksh_head`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from effkern.nn.layers import Attention
from effkern.ops.binary_hash import (
    FORMS,
    KSHParams,
    RandomProjection,
    binary_attention,
    binary_hash_attention,
)

__all__ = ["BinaryHashAttention", "PVTBinaryHashAttention", "TokenDWConv", "fit_ksh_head", "ksh_code_loss",
           "ksh_similarity_targets"]

HASHES = ("ksh", "random")


# ============================================================================================
# EcoFormer's KSH fit (per head, plain torch, float64)
# ============================================================================================


def ksh_similarity_targets(x: Tensor, topk: int = 10) -> Tensor:
    """EcoFormer's target similarity S0 [N, N] of tokens x [N, d]: with cosine similarity
    between the L2-normalised tokens, S0[i, j] = +1 for the ``topk`` tokens j most similar to
    token i, -1 for its ``topk`` least similar, 0 otherwise. The token itself is excluded
    from both rankings (S0[i, i] = 0: its code always agrees with itself)."""
    n = x.shape[0]
    if n < 2 * topk + 1:
        raise ValueError(f"ksh_similarity_targets: need at least 2 * topk + 1 = {2 * topk + 1} tokens, got {n}")
    xn = F.normalize(x.to(torch.float64), dim=-1)
    sim = xn @ xn.T
    eye = torch.eye(n, dtype=torch.bool, device=x.device)
    top = sim.masked_fill(eye, float("-inf")).topk(topk, dim=1).indices
    bottom = sim.masked_fill(eye, float("inf")).topk(topk, dim=1, largest=False).indices
    s0 = torch.zeros(n, n, dtype=torch.float64, device=x.device)
    s0.scatter_(1, top, 1.0)
    s0.scatter_(1, bottom, -1.0)
    return s0


def ksh_code_loss(codes: Tensor, s: Tensor) -> Tensor:
    """-tr(Y^T S Y) / (N b) for codes Y [N, b] (values {-1, +1}) and a target S [N, N]: the
    objective the fit minimises (lower = codes agree better with S)."""
    y = codes.to(s.dtype)
    n, b = y.shape
    return -(y * (s @ y)).sum() / (n * b)


def _kernel_features(xn: Tensor, anchors: Tensor) -> tuple[Tensor, Tensor]:
    """(E = exp(-D / (2 sigma)) [N, m], sigma) with D the squared distances of xn to the anchors
    and sigma = mean(D) over the calibration set."""
    dist = (xn.pow(2).sum(-1, keepdim=True) + anchors.pow(2).sum(-1) - 2 * xn @ anchors.T).clamp_min(0)
    sigma = dist.mean()
    return torch.exp(-dist / (2 * sigma)), sigma


def fit_ksh_head(x: Tensor, nbits: int, num_anchors: int, *, topk: int = 10, iterations: int = 100,
                 lr: float = 1.0, momentum: float = 0.9, generator: torch.Generator | None = None
                 ) -> tuple[Tensor, Tensor, Tensor]:
    """EcoFormer's greedy bitwise KSH fit for one head; returns (anchors [m, d], mu [m],
    proj [b, m]) in float64.

    x [N, d] calibration tokens (normalised over d here, as the hash normalises). anchors: m
    tokens sampled without replacement; K = exp(-D / (2 sigma)) - mu with sigma = mean(D) and
    mu = mean over the tokens of exp(-D / (2 sigma)). S = S0 (:func:`ksh_similarity_targets`);
    for each bit j: a ~ N(0, I) (from ``generator``), ``iterations`` steps of SGD with Nesterov
    momentum on -y^T S y / (N b), y = 2 sigmoid(K a) - 1; the optimised a is kept only if its
    hard-sign loss (y = sign(K a), 0 -> -1) is lower than the initial a's, else the initial a
    is kept; then S <- S - y y^T with the kept bit's hard codes.
    """
    if x.dim() != 2:
        raise ValueError(f"fit_ksh_head: x must be [N, d], got {tuple(x.shape)}")
    n = x.shape[0]
    if not 1 <= num_anchors <= n:
        raise ValueError(f"fit_ksh_head: num_anchors must be in [1, N = {n}], got {num_anchors}")
    dev = x.device
    xn = F.normalize(x.detach().to(torch.float64), dim=-1)
    s = ksh_similarity_targets(xn, topk) * nbits  # KSH's residual R_0 = b S0 (as EcoFormer's code)
    idx = torch.randperm(n, generator=generator, device="cpu")[:num_anchors].to(dev)
    anchors = xn[idx]
    e, _ = _kernel_features(xn, anchors)
    mu = e.mean(0)
    k = e - mu
    proj = torch.empty(nbits, num_anchors, dtype=torch.float64, device=dev)
    scale = 1.0 / (n * nbits)

    def hard(a: Tensor) -> tuple[Tensor, Tensor]:
        y = torch.where(k @ a > 0, 1.0, -1.0).to(torch.float64)
        return -(y @ s @ y) * scale, y

    sym = s + s.T
    for j in range(nbits):
        a0 = torch.randn(num_anchors, generator=generator, dtype=torch.float64, device="cpu").to(dev)
        # SGD with Nesterov momentum (torch.optim.SGD's update, written out: the gradient of
        # -y^T S y / (N b) through y = 2 sigmoid(K a) - 1 is -K^T ((S + S^T) y * (1 - y^2) / 2) / (N b))
        a, buf = a0.clone(), None
        for _ in range(iterations):
            y = 2 * torch.sigmoid(k @ a) - 1
            grad = -(k.T @ ((sym @ y) * (1 - y * y) / 2)) * scale
            buf = grad if buf is None else momentum * buf + grad
            a = a - lr * (grad + momentum * buf)
        loss0, y0 = hard(a0)
        loss1, y1 = hard(a)
        keep, y = (a, y1) if loss1 < loss0 else (a0, y0)
        proj[j] = keep
        s = s - torch.outer(y, y)
    return anchors, mu, proj


# ============================================================================================
# The module
# ============================================================================================


class TokenDWConv(nn.Conv1d):
    """ShiftAddViT's depthwise convolution over the token axis of V: ``[B, H, N, d]`` ->
    ``[B, H, N, d]``, 9 taps (padding 4, no bias).

    ``heads=None`` (effkern's ViT form): one kernel per value channel (C = H d channels,
    groups = C). ``heads=H``: one kernel per head, shared by the head's d channels, as the
    published PVT code's ``dconv`` (``Conv2d(H, H, (9, 1), groups=H)`` on ``[B, H, N, d]``);
    the weight is then ``[H, 1, 9]``.

    A state dict with none of this module's keys (a plain attention checkpoint) leaves the
    weights as they are rather than reporting them missing."""

    def __init__(self, dim: int, kernel_size: int = 9, *, heads: int | None = None):
        channels = dim if heads is None else heads
        super().__init__(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels, bias=False)
        self.per_head = heads is not None

    def forward(self, v: Tensor) -> Tensor:  # type: ignore[override]
        b, h, n, d = v.shape
        if self.per_head:  # each of the d columns is one sequence of H channels
            x = v.permute(0, 3, 1, 2).reshape(b * d, h, n)
            return super().forward(x).reshape(b, d, h, n).permute(0, 2, 3, 1)
        x = v.permute(0, 1, 3, 2).reshape(b, h * d, n)
        return super().forward(x).reshape(b, h, d, n).permute(0, 1, 3, 2)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if not any(key.startswith(prefix) for key in state_dict):
            return
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class BinaryHashAttention(Attention):
    """Drop-in for timm's ``Attention`` with binary-hash linear attention (EcoFormer /
    ShiftAddViT).

    Args: timm's (dim, num_heads, qkv_bias, qk_norm, attn_drop, proj_drop, norm_layer), then
    keyword-only:
        form: ``"ecoformer"`` ({-1, +1} codes) or ``"shiftadd"`` ({0, 1} codes).
        nbits: code length b. num_anchors: KSH anchors m.
        hash: ``"ksh"`` (buffers hash_anchors [H, m, d], hash_mu [H, m], hash_proj [H, b, m])
            or ``"random"`` (hash_weight [H, d, b], Gaussian). All non-persistent.
        dwconv: add :class:`TokenDWConv` of V to the attention output before proj; default
            (None): on for ``"shiftadd"``, off for ``"ecoformer"``.

    Before :meth:`fit_hash` the KSH buffers are random: anchors Gaussian directions on the unit
    sphere, mu = 0, proj Gaussian (from the global RNG, like the weights).

    forward(x [B, N, C]): q, k, v = qkv (q_norm / k_norm on q, k); training:
    ``binary_hash_attention(q, k, v, hash, form)`` (gradients to q, k through the
    straight-through estimator); eval: the packed codes of the hash projections (KSH: hash and
    pack fused, ``ksh_codes``) then ``binary_attention`` (same values; differentiable in v only). Then + dwconv(v), proj,
    proj_drop. There is no attention matrix, so ``attn_drop`` is kept (timm's name) but unused;
    q is not multiplied by ``scale`` (the KSH hash normalises q; the signs of a random
    projection do not depend on it).
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, qk_norm: bool = False,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, norm_layer: type[nn.Module] = nn.LayerNorm,
                 *, form: str = "ecoformer", nbits: int = 16, num_anchors: int = 25, hash: str = "ksh",
                 dwconv: bool | None = None):
        super().__init__(dim, num_heads=num_heads, qkv_bias=qkv_bias, qk_norm=qk_norm, attn_drop=attn_drop,
                         proj_drop=proj_drop, norm_layer=norm_layer)
        self._init_hash(form=form, nbits=nbits, num_anchors=num_anchors, hash=hash, dwconv=dwconv,
                        make_dwconv=lambda: TokenDWConv(dim))

    def _init_hash(self, *, form: str, nbits: int, num_anchors: int, hash: str, dwconv: bool | None,
                   make_dwconv: Callable[[], nn.Module]) -> None:
        """The hash buffers and settings (after num_heads / head_dim are set), then the dwconv
        (``make_dwconv()``; dwconv None: on for "shiftadd") (in this order: the same RNG draws
        whatever the subclass)."""
        name = type(self).__name__
        if form not in FORMS:
            raise ValueError(f"{name}: form must be 'ecoformer' or 'shiftadd', got {form!r}")
        if hash not in HASHES:
            raise ValueError(f"{name}: hash must be 'ksh' or 'random', got {hash!r}")
        if isinstance(nbits, bool) or not isinstance(nbits, int) or nbits < 1:
            raise ValueError(f"{name}: nbits must be a positive integer, got {nbits!r}")
        if isinstance(num_anchors, bool) or not isinstance(num_anchors, int) or num_anchors < 1:
            raise ValueError(f"{name}: num_anchors must be a positive integer, got {num_anchors!r}")
        self.form = form
        self.nbits = nbits
        self.num_anchors = num_anchors
        self.hash_kind = hash
        h, d = self.num_heads, self.head_dim
        if hash == "ksh":
            self.register_buffer("hash_anchors", F.normalize(torch.randn(h, num_anchors, d), dim=-1),
                                 persistent=False)
            self.register_buffer("hash_mu", torch.zeros(h, num_anchors), persistent=False)
            self.register_buffer("hash_proj", torch.randn(h, nbits, num_anchors), persistent=False)
        else:
            self.register_buffer("hash_weight", torch.randn(h, d, nbits), persistent=False)
        if dwconv is None:
            dwconv = form == "shiftadd"
        self.dwconv = make_dwconv() if dwconv else None

    # ---- hash -------------------------------------------------------------------------------

    def hash_params(self) -> KSHParams | RandomProjection:
        """The hash as the op's parameter object (views of the buffers)."""
        if self.hash_kind == "ksh":
            return KSHParams(self.hash_anchors, self.hash_mu, self.hash_proj)
        return RandomProjection(self.hash_weight)

    def _hash_names(self) -> tuple[str, ...]:
        return ("hash_anchors", "hash_mu", "hash_proj") if self.hash_kind == "ksh" else ("hash_weight",)

    def hash_state_dict(self) -> dict[str, Tensor]:
        """The (non-persistent) hash buffers, detached copies, to save next to ``state_dict()``."""
        return {name: getattr(self, name).detach().clone() for name in self._hash_names()}

    def load_hash_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore :meth:`hash_state_dict`'s output (keys and shapes must match exactly)."""
        names = self._hash_names()
        if set(state) != set(names):
            raise KeyError(f"BinaryHashAttention.load_hash_state_dict: expected keys {sorted(names)}, "
                           f"got {sorted(state)}")
        for name in names:
            buf = getattr(self, name)
            if tuple(state[name].shape) != tuple(buf.shape):
                raise ValueError(f"BinaryHashAttention.load_hash_state_dict: {name} must have shape "
                                 f"{tuple(buf.shape)}, got {tuple(state[name].shape)}")
            buf.copy_(state[name])

    @torch.no_grad()
    def fit_hash(self, calibration_tokens: Tensor, *, topk: int = 10, iterations: int = 100, lr: float = 1.0,
                 momentum: float = 0.9, max_tokens: int = 1024, generator: torch.Generator | None = None
                 ) -> BinaryHashAttention:
        """Fit the KSH hash of every head to calibration inputs (EcoFormer's greedy bitwise fit,
        :func:`fit_ksh_head`); returns self.

        calibration_tokens [B, N, C]: inputs of this attention. Per head, q and k are computed
        through qkv (and q_norm / k_norm) and the B N queries and B N keys are pooled into one
        token set (the same hash codes both; :meth:`hash_features`, which for
        :class:`PVTBinaryHashAttention` is the shared q / k once); at most ``max_tokens`` of them, sampled without
        replacement, are used. Similarity: cosine of the normalised q / k features. Random
        choices (token subset, anchors, initial a per bit) come from ``generator`` (default:
        the global RNG)."""
        if self.hash_kind != "ksh":
            raise ValueError("BinaryHashAttention.fit_hash: only the KSH hash is fitted (hash='random' is a fixed "
                             "random projection)")
        x, dim = calibration_tokens, self.proj.in_features
        if x.dim() != 3 or x.shape[-1] != dim:
            raise ValueError(f"{type(self).__name__}.fit_hash: calibration_tokens must be [B, N, {dim}], got "
                             f"{tuple(x.shape)}")
        feats = self.hash_features(x.to(self.proj.weight.dtype))
        feats = feats.transpose(0, 1).reshape(self.num_heads, -1, self.head_dim)
        total = feats.shape[1]
        if total > max_tokens:
            sel = torch.randperm(total, generator=generator, device="cpu")[:max_tokens].to(feats.device)
            feats = feats[:, sel]
        for h in range(self.num_heads):
            anchors, mu, proj = fit_ksh_head(feats[h].float(), self.nbits, self.num_anchors, topk=topk,
                                             iterations=iterations, lr=lr, momentum=momentum, generator=generator)
            self.hash_anchors[h].copy_(anchors)
            self.hash_mu[h].copy_(mu)
            self.hash_proj[h].copy_(proj)
        return self

    def hash_features(self, x: Tensor) -> Tensor:
        """What the hash sees for inputs x [B, N, C], ``[B, H, T, d]``: the queries and the keys."""
        q, k, _ = self.qkv_heads(x)
        return torch.cat([q, k], dim=2)

    # ---- conversion -------------------------------------------------------------------------

    @classmethod
    def from_attention(cls, attn: nn.Module, *, form: str = "ecoformer", nbits: int = 16, num_anchors: int = 25,
                       hash: str = "ksh", dwconv: bool | None = None) -> BinaryHashAttention:
        """A BinaryHashAttention with the weights of a timm-style ``Attention`` (qkv, proj, and
        q_norm / k_norm, copied as modules), on its device and dtype. The state dict is loaded
        strictly, so an attention with extra parameters is refused."""
        dim = attn.qkv.in_features
        qk_norm = not isinstance(attn.q_norm, nn.Identity)
        new = cls(dim, num_heads=attn.num_heads, qkv_bias=attn.qkv.bias is not None, qk_norm=False,
                  attn_drop=getattr(attn.attn_drop, "p", 0.0), proj_drop=getattr(attn.proj_drop, "p", 0.0),
                  form=form, nbits=nbits, num_anchors=num_anchors, hash=hash, dwconv=dwconv)
        if qk_norm:
            new.q_norm = copy.deepcopy(attn.q_norm)
            new.k_norm = copy.deepcopy(attn.k_norm)
        w = attn.qkv.weight
        new.to(device=w.device, dtype=w.dtype)
        new.load_state_dict(attn.state_dict(), strict=True)
        new.train(attn.training)
        return new

    # ---- forward ----------------------------------------------------------------------------

    def attend(self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        """Binary-hash attention of q, k, v [B, H, N, d] (+ dwconv(v))."""
        if attn_mask is not None:
            raise NotImplementedError("BinaryHashAttention: attn_mask is not supported (linear binary-hash "
                                      "attention has no attention matrix to mask); pass attn_mask=None")
        hsh = self.hash_params()
        if self.training:
            out = binary_hash_attention(q, k, v, hsh, self.form)
        else:
            q_codes = hsh.codes(q)  # KSH: hash and pack fused
            k_codes = q_codes if k is q else hsh.codes(k)  # shared q / k (PVTBinaryHashAttention)
            out = binary_attention(q_codes, k_codes, v, nbits=self.nbits, form=self.form)
        if self.dwconv is not None:
            out = out + self.dwconv(v)
        return out

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, **kwargs) -> Tensor:
        if attn_mask is not None:
            raise NotImplementedError("BinaryHashAttention: attn_mask is not supported (linear binary-hash "
                                      "attention has no attention matrix to mask); pass attn_mask=None")
        return self.project(self.attend(*self.qkv_heads(x)))

    def extra_repr(self) -> str:
        return (f"form={self.form!r}, nbits={self.nbits}, num_anchors={self.num_anchors}, hash={self.hash_kind!r}, "
                f"dwconv={self.dwconv is not None}")


class PVTBinaryHashAttention(BinaryHashAttention):
    """Drop-in for timm's PVTv2 ``Attention`` (``timm.models.pvt_v2``; ``forward(x, feat_size)``)
    with ShiftAddViT's binary-hash attention as its published PVTv2 code has it
    (``pvt/pvt_v2.py``, ``LinAngularAttention_ksh``, the ``attn_type="LinAngular"`` configs).

    Keeps timm's names (q, kv, attn_drop, proj, proj_drop, and sr / norm / pool / act where timm's
    attention has them), so a timm PVTv2 state dict loads strictly (plus ``dwconv.weight``).
    Published semantics: shared query / key projection (``to_qk``, initialised from the query
    weights: here timm's ``q``) hashed once and used as both queries and keys; values (``to_v``:
    here the value half of timm's ``kv``; its key half is unused) at full resolution, i.e. the
    spatial reduction (``sr`` conv + ``norm``, or ``linear``'s pooling) is not applied (the
    ShiftAddViT form adds each token's own value, so keys / values must be the query tokens): those
    modules are kept, unused, only for the checkpoint; the depthwise convolution of V (``dwconv``,
    published ``dconv``) has one 9-tap kernel per head (:class:`TokenDWConv` with ``heads``).
    Then :class:`BinaryHashAttention`'s attention (``attend``, ``project``).
    """

    def __init__(self, dim: int, num_heads: int = 8, sr_ratio: int = 1, linear_attn: bool = False,
                 qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0, *, form: str = "shiftadd",
                 nbits: int = 16, num_anchors: int = 25, hash: str = "ksh", dwconv: bool | None = None):
        nn.Module.__init__(self)
        if dim % num_heads:
            raise ValueError(f"PVTBinaryHashAttention: dim={dim} is not divisible by num_heads={num_heads}")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        # timm's spatial reduction, kept (unused) for its checkpoint keys
        self.pool = self.sr = self.norm = self.act = None
        if linear_attn:
            self.pool = nn.AdaptiveAvgPool2d(7)
            self.sr = nn.Conv2d(dim, dim, kernel_size=1, stride=1)
            self.norm = nn.LayerNorm(dim)
            self.act = nn.GELU()
        elif sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim)
        self._init_hash(form=form, nbits=nbits, num_anchors=num_anchors, hash=hash, dwconv=dwconv,
                        make_dwconv=lambda: TokenDWConv(dim, heads=num_heads))

    def qkv_heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(q, q, v), ``[B, H, N, d]``: the shared query / key, and the values (kv's value half
        only: its key half is not computed)."""
        b, n, c = x.shape
        v_bias = None if self.kv.bias is None else self.kv.bias[c:]
        q = self.q(x).reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        v = F.linear(x, self.kv.weight[c:], v_bias).reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        return q, q, v

    def hash_features(self, x: Tensor) -> Tensor:
        return self.qkv_heads(x)[0]  # queries and keys are the same tokens: each once

    @classmethod
    def from_attention(cls, attn: nn.Module, *, form: str = "shiftadd", nbits: int = 16, num_anchors: int = 25,
                       hash: str = "ksh", dwconv: bool | None = None) -> PVTBinaryHashAttention:
        """A PVTBinaryHashAttention with the weights of timm's PVTv2 ``Attention`` (q, kv, proj,
        sr / norm), on its device and dtype; its state dict loaded strictly."""
        sr = getattr(attn, "sr", None)
        new = cls(attn.q.in_features, num_heads=attn.num_heads,
                  sr_ratio=sr.stride[0] if sr is not None and getattr(attn, "pool", None) is None else 1,
                  linear_attn=getattr(attn, "pool", None) is not None, qkv_bias=attn.q.bias is not None,
                  attn_drop=getattr(attn.attn_drop, "p", 0.0), proj_drop=getattr(attn.proj_drop, "p", 0.0),
                  form=form, nbits=nbits, num_anchors=num_anchors, hash=hash, dwconv=dwconv)
        if getattr(attn, "norm", None) is not None:
            new.norm = copy.deepcopy(attn.norm)  # timm's eps
        w = attn.q.weight
        new.to(device=w.device, dtype=w.dtype)
        new.load_state_dict(attn.state_dict(), strict=True)
        new.train(attn.training)
        return new

    def forward(self, x: Tensor, feat_size: Sequence[int] | None = None) -> Tensor:  # type: ignore[override]
        return self.project(self.attend(*self.qkv_heads(x)))
