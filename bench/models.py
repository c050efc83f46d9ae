"""End-to-end ViT variants (``python -m effkern bench models``): every method of
:func:`effkern.convert` on a real timm model against timm's own model and against the same method
implemented the published way.

For each architecture (DeiT-S, DeiT-B; ViT-L/16 for ToMe; PVTv2-B1 for ShiftAddViT's PVTv2) and
batch (1, 64, 256), bf16, 224 px, random weights (the GPU machine has no model hub; the work does
not depend on the values: every method keeps a fixed token count), on random images rotated over
two input sets:

- ``timm``: timm's model eager, ``torch.compile``'d (default mode: SDPA at the backend torch
  picks, its fastest on Hopper), and at B = 1 compiled with CUDA graphs (mode="reduce-overhead");
- ``effkern``: ``effkern.convert(model, method, **config)``, the same three ways;
- ``published``: the method's published model code (transcribed in tests/vit_transcriptions.py:
  explicit N x N attention in eager torch ops, the blocks built once; tests/shift_transcriptions.py:
  ShiftAddViT's LinearShiftQ; tests/pvt_transcriptions.py: ShiftAddViT's PVTv2 attention,
  LinAngularAttention_ksh, in stages 1-3 of timm's PVTv2), eager and compiled.

ShiftAddViT's PVTv2-B1 is three rows, since ``effkern.convert`` applies one method per model: the
binary-hash attention in stages 1-3 (``shiftadd``), every linear a shift layer (``shift``), and the
linears as shift layers with fc1 / fc2 multiply/shift mixtures of experts (``shift moe=True``; no
published row: effkern's router departs from the released gate).

Time per call is the median of back-to-back forward calls under ``torch.inference_mode`` (CUDA
events; host overhead counts, as in a serving loop), images/s = batch / time. ``tokens`` is the
mean over blocks of the patch tokens each block computes on, as a fraction of the input's
(IdleViT: the tokens its idle layers compute; the idle ones are carried unchanged). ``vs timm``
is the best timm time (compiled, or CUDA graphs at B = 1) over the best effkern time; ``vs
published`` the best published time over the best effkern time.

GPUSQ-ViT's 2:4-sparse int8 DeiT (``sparse24_int8``, frozen) has no published row: GPUSQ-ViT
released no code.

Targets (DeiT-B, B = 256, against timm compiled): ToMe r = 16 >= 1.8x; EViT and DynamicViT at
0.7 >= 1.5x; IdleViT at 0.7 >= 1.3x; 2:4 int8 >= 1.5x; every variant >= 1.2x its published
implementation; at
B = 1 ToMe and EViT >= 1.2x timm (CUDA graphs on both sides).

Without a GPU (or with --check) the command runs the correctness self-check: each variant
converted from a small timm ViT (PVTv2-B1 at 64 px for its rows) in float32 against the published
model code (the token-reduction methods, the shift layers, PVTv2's shiftadd), or run end to end
(the others), on CPU.
"""

from __future__ import annotations

import argparse
import copy
import csv
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

if __package__ in (None, ""):  # run as a script: make `bench`, `effkern` and `tests` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch._dynamo  # noqa: E402

from bench import common  # noqa: E402

TITLE = "End-to-end ViT variants"
CSV_PATH = common.RESULTS_DIR / "models.csv"
ARCHS = {"DeiT-S": "deit_small_patch16_224", "DeiT-B": "deit_base_patch16_224", "ViT-L": "vit_large_patch16_224",
         "PVTv2-B1": "pvt_v2_b1"}
PVT_ARCHS = ("PVTv2-B1",)  # timm's PyramidVisionTransformerV2: no img_size argument (any input size runs)
BATCHES = (1, 64, 256)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
IMPLS = ("timm", "effkern", "published")
FIELDS = [  # the environment columns first
    "date", "gpu", "cc", "sms", "l2_mb", "driver", "sm_mhz", "mem_mhz", "max_sm_mhz", "clock_source",
    "torch", "triton", "cuda", "python", "commit",
    "model", "batch", "dtype", "method", "config", "impl", "mode", "ms", "p20_ms", "p80_ms", "images_s",
    "tokens", "vs_timm", "vs_published", "target", "status", "note",
]


@dataclass(frozen=True)
class Variant:
    """One method at one setting. ``archs``: where it is benchmarked; ``targets``: (arch, batch)
    -> the speedup over timm that is the goal; ``check_config``: the setting of the CPU
    self-check's small model (16 x 16 patches too few for the full one)."""

    method: str
    config: dict
    archs: tuple[str, ...] = ("DeiT-S", "DeiT-B")
    targets: dict = field(default_factory=dict)
    check_config: dict | None = None
    strict: bool = True

    @property
    def label(self) -> str:
        return self.method + "".join(f" {k}={v}" for k, v in self.config.items())


VARIANTS = (
    Variant("tome", {"r": 16}, ("DeiT-S", "DeiT-B"), {("DeiT-B", 256): 1.8, ("DeiT-S", 1): 1.2, ("DeiT-B", 1): 1.2},
            {"r": 4}),
    Variant("tome", {"r": 8}, ("ViT-L",), {("ViT-L", 1): 1.2}, {"r": 2}),  # ToMe's ViT-L setting (24 layers)
    Variant("evit", {"keep_rate": 0.7}, targets={("DeiT-B", 256): 1.5, ("DeiT-S", 1): 1.2, ("DeiT-B", 1): 1.2}),
    Variant("dynamicvit", {"keep_ratio": 0.7}, targets={("DeiT-B", 256): 1.5}, strict=False),
    Variant("idlevit", {"keep_rate": 0.7}, targets={("DeiT-B", 256): 1.3}),
    Variant("ecoformer", {}),
    Variant("shiftadd", {}, strict=False),
    Variant("ivit", {}),
    Variant("shift", {}),  # DeepShift-Q MLPs with 16.16 fixed point, as ShiftAddViT's linear layers
    # ShiftAddViT's PVTv2-B1 (pvt/pvt_v2.py). Its full model is the binary-hash attention in stages 1-3
    # plus shift linears and mult/shift MoE MLPs; convert takes one method per model, so the attention
    # and the linears are separate rows.
    Variant("shiftadd", {}, archs=PVT_ARCHS, strict=False),  # LinAngularAttention_ksh in stages 1-3
    Variant("shift", {"targets": ("q", "kv", "proj", "fc1", "fc2")}, archs=PVT_ARCHS),  # every linear LinearShiftQ
    # the linears as shift layers, fc1 / fc2 each a multiply/shift MoE (Mlp_FMoE); dynamic routing as
    # published (capacity None). No published row: effkern's router scales by the gate (ShiftAddMoE's departure)
    Variant("shift", {"targets": ("q", "kv", "proj"), "moe": True}, archs=PVT_ARCHS, strict=False),
    # GPUSQ-ViT: qkv, proj, fc1, fc2 2:4-sparse int8 (frozen: the sparse tensor-core op); no published code
    Variant("sparse24_int8", {}, targets={("DeiT-B", 256): 1.5}),
)
PUBLISHED_TARGET = 1.2
TOKEN_METHODS = ("tome", "evit", "dynamicvit", "idlevit")


# --------------------------------------------------------------------------------------------
# Building the three implementations of a variant
# --------------------------------------------------------------------------------------------


def timm_model(arch: str, device, dtype, **kw) -> torch.nn.Module:
    import timm

    if arch in PVT_ARCHS:  # PVTv2 takes no img_size: it runs at the inputs' size
        kw.pop("img_size", None)
    torch.manual_seed(0)
    return timm.create_model(ARCHS.get(arch, arch), pretrained=False, **kw).to(device=device, dtype=dtype).eval()


def effkern_model(model: torch.nn.Module, v: Variant, config: dict, calib: torch.Tensor) -> torch.nn.Module:
    """``effkern.convert`` of a copy of ``model``, made ready to run: the binary hash fitted and
    I-ViT calibrated on ``calib`` images; DynamicViT's predictors randomised (their initial
    scores are all near 0.5, which makes every ranking a near-tie)."""
    import effkern
    from effkern.models import variants

    dtype = next(model.parameters()).dtype
    conv = effkern.convert(copy.deepcopy(model), v.method, strict=v.strict, **config)
    if v.method == "dynamicvit":
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in conv.score_predictor.parameters():
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    if v.method in ("ecoformer", "shiftadd"):
        variants.fit_hash(conv, calib.to(dtype), progress=False)
    if v.method == "ivit":  # integer-only: float32 images in, no bf16 anywhere
        conv = variants.calibrate(conv.float(), [calib.float()], progress=False)
    if v.method == "shift":  # inference through effkern.ops.shift_linear
        for layer in variants.shift_layers(conv).values():
            layer.freeze()
    if v.method == "sparse24_int8":  # inference through effkern.ops.sparse24_int8_linear
        variants.freeze_sparse24(conv)
    return conv.eval()


def published_model(model: torch.nn.Module, conv: torch.nn.Module, v: Variant, config: dict) -> Callable | None:
    """The published model code (tests/vit_transcriptions.py) on ``model``'s weights, its blocks
    built once: a function of the images returning the logits. None where effkern has no
    model-level transcription of the method (a ViT's binary-hash attention, I-ViT, the MoE: its
    router departs from the released gate; GPUSQ-ViT: no published code). The shift variant's published model is timm's with
    ShiftAddViT's LinearShiftQ in place of the converted linears; PVTv2 shiftadd's is timm's
    PVTv2 with ShiftAddViT's LinAngularAttention_ksh (tests/pvt_transcriptions.py) in stages 1-3."""
    from tests import tokens_transcriptions as T
    from tests import vit_transcriptions as VT

    c = conv.effkern.config if hasattr(conv, "effkern") else {}
    if set(v.archs) <= set(PVT_ARCHS):
        return pvt_published_model(model, conv, v.method, c)
    if v.method == "tome":
        blocks = VT.tome_blocks(model)
        return lambda x: VT.tome_forward(model, x, c["r"], c["prop_attn"], blocks=blocks)[0]
    if v.method == "evit":
        blocks = VT.evit_blocks(model, c["keep_rate"], c["drop_loc"], c["fuse_token"])
        return lambda x: VT.evit_forward(model, x, c["keep_rate"], c["drop_loc"], c["fuse_token"], blocks=blocks)[0]
    if v.method == "dynamicvit":
        preds = []
        for mod in conv.score_predictor:
            ref = T.PredictorLG(mod.in_conv[0].normalized_shape[0])
            ref.load_state_dict(mod.state_dict(), strict=True)
            preds.append(ref.to(next(mod.parameters())).eval())
        blocks = [b.eval() for b in VT.dynamicvit_blocks(model)]
        return lambda x: VT.dynamicvit_forward(model, preds, x, c["pruning_loc"], c["token_ratio"], blocks=blocks)[0]
    if v.method == "idlevit":
        blocks = VT.idlevit_blocks(model, c["idle_layers"])
        return lambda x: VT.idlevit_forward(model, x, c["idle_layers"], c["keep_ratios"], blocks=blocks)
    if v.method == "shift":
        from tests import shift_transcriptions as ST

        return ST.shift_model(model, c["targets"], c["weight_bits"], c["fixed_point"]).eval()
    return None


class _TimmCall(torch.nn.Module):
    """timm's PVTv2 blocks call ``attn(x, feat_size)``; the published attention takes ``(x, H, W)``."""

    def __init__(self, attn: torch.nn.Module):
        super().__init__()
        self.attn = attn

    def forward(self, x, feat_size):
        return self.attn(x, *feat_size)


def pvt_published_model(model: torch.nn.Module, conv: torch.nn.Module, method: str, c: dict) -> torch.nn.Module | None:
    """ShiftAddViT's PVTv2 the published way, as tests/test_pvt_shiftadd.py builds it. shiftadd: a
    copy of ``conv`` (timm's weights, the added dwconv, the fitted hash) with each converted
    attention replaced by the published LinAngularAttention_ksh holding its weights (to_qk <- q,
    to_v <- kv's value half, dconv <- dwconv, anchor / mvec / A <- the hash). shift: timm's model
    with LinearShiftQ at the converted linears. None for the MoE (no model-level transcription)."""
    from effkern.nn.binary_hash import PVTBinaryHashAttention
    from tests import pvt_transcriptions as PT

    if method not in ("shiftadd", "shift") or (method == "shift" and c["moe"]):
        return None
    out = copy.deepcopy(conv if method == "shiftadd" else model).eval()
    blocks = list(enumerate(blk for stage in out.stages for blk in stage.blocks))  # convert's `layers` order
    if method == "shiftadd":
        for _, blk in blocks:
            a = blk.attn
            if not isinstance(a, PVTBinaryHashAttention):
                continue  # stage 4 keeps timm's attention
            ref = PT.LinAngularAttentionKSH(a.dim, a.num_heads, a.nbits, a.num_anchors).to(a.q.weight)
            with torch.no_grad():
                ref.to_qk.load_state_dict(a.q.state_dict())
                ref.to_v.weight.copy_(a.kv.weight[a.dim:])
                ref.to_v.bias.copy_(a.kv.bias[a.dim:])
                ref.proj.load_state_dict(a.proj.state_dict())
                ref.dconv.weight.copy_(a.dwconv.weight[..., None])  # [H, 1, 9] -> [H, 1, 9, 1]
                ref.anchor.copy_(a.hash_anchors)
                ref.mvec.copy_(a.hash_mu)
                ref.A.copy_(a.hash_proj)
            blk.attn = _TimmCall(ref)
    else:
        from tests import shift_transcriptions as ST

        for i, blk in blocks:
            if i not in c["layers"]:
                continue
            for t in c["targets"]:
                parent = blk.attn if t in ("q", "kv", "proj") else blk.mlp
                setattr(parent, t, ST.PublishedShiftQ(getattr(parent, t), c["weight_bits"], c["fixed_point"]))
    return out


def tokens_fraction(conv: torch.nn.Module) -> float:
    """After a forward: the mean over blocks of the patch tokens each block computes on, as a
    fraction of the input's (1.0 for methods that keep every token)."""
    sh = getattr(conv, "effkern", None)
    if sh is None or sh.method not in TOKEN_METHODS:
        return 1.0
    n = conv.patch_embed.num_patches
    if sh.method == "idlevit":  # idle layers compute on their kept tokens only
        keep = dict(zip(sh.config["idle_layers"], sh.config["keep_ratios"]))
        return sum(int(n * keep[i]) if i in keep else n for i in range(sh.depth)) / (sh.depth * n)
    before = [n] + [sh.kept[i] for i in range(sh.depth - 1)]  # the tokens entering block i
    return sum(before) / (sh.depth * n)


# --------------------------------------------------------------------------------------------
# The self-check (CPU, or a GPU in float32)
# --------------------------------------------------------------------------------------------

# 16 patches; DeiT-S's blocks (depth 12, width 384). PVTv2-B1: token grids 16, 8, 4, 2 wide (stage 3's
# 16 tokens x 3 images are enough for the hash's 25 anchors). At 224 px its shiftadd check takes ~3x longer
# and its 47k stage-3 hash values include some within float32 rounding of 0 (1.5e-7 seen): a code flips,
# one image's logits move by 5e-3 - rounding, not the method, so the check stays at 64 px
CHECK_IMG = 64


def checked(variants: Sequence[Variant]) -> list[Variant]:
    """The variants the self-check runs: one per method, model family (ViT / PVTv2) and kind of
    setting (ToMe's two r values are one check; PVTv2's shift and shift-MoE are two)."""
    out, seen = [], set()
    for v in variants:
        key = (v.method, set(v.archs) <= set(PVT_ARCHS), tuple(v.config))
        if key not in seen:
            seen.add(key)
            out.append(v)
    return out


def self_check(device="cpu", variants: Sequence[Variant] = VARIANTS, out=print) -> int:
    """Each variant from a small timm model in float32 (DeiT-S-shaped; PVTv2-B1 at 64 px): the
    token-reduction methods, the shift layers and PVTv2's shiftadd against the published model
    code (logits to 1e-4 of their scale), the others run end to end (finite logits of the right
    shape). Returns the number of failures."""
    failed = 0
    todo = checked(variants)
    for v in todo:
        config = v.check_config if v.check_config is not None else v.config
        arch = v.archs[0] if set(v.archs) <= set(PVT_ARCHS) else "DeiT-S"
        model = timm_model(arch, device, torch.float32, img_size=CHECK_IMG)
        with torch.no_grad():  # timm's zero-initialised head would hide every difference
            model.head.weight.normal_(0, 0.5)
        x = torch.randn(3, 3, CHECK_IMG, CHECK_IMG, generator=torch.Generator().manual_seed(2)).to(device)
        t0 = time.perf_counter()
        try:
            conv = effkern_model(model, v, config, x)
            published = published_model(model, conv, v, config)
            with torch.inference_mode():
                got = conv(x)
                if published is not None:
                    want = published(x)
                    # float32 to 1e-4 of the logits' scale: sums in other orders (shift: 16.16 floors
                    # flip where they do, and 12 blocks carry it; PVTv2 shiftadd: the same {0, 1} codes
                    # (a hash value within rounding of 0 would flip one and fail: see CHECK_IMG), then
                    # sums in other orders through 8 blocks, as tests/test_pvt_shiftadd.py's 1e-4;
                    # measured 1.3e-5 on logits of scale 24)
                    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * max(1.0, float(want.abs().max())))
                    how = "matches the published model code"
                else:
                    if got.shape != (3, model.num_classes) or not bool(torch.isfinite(got).all()):
                        raise AssertionError(f"logits of shape {tuple(got.shape)}, finite: {bool(torch.isfinite(got).all())}")
                    how = "runs end to end (no model-level transcription of the published code)"
            status = "ok"
        except Exception as e:  # reported, counted, and the check goes on
            failed += 1
            status, how = "FAILED", common.short_exc(e)
        out(f"  {status:6} {v.method:10} {arch:8} {config}  {how}  ({time.perf_counter() - t0:.1f} s)")
    out(f"models self-check on {device}: {len(todo) - failed} ok, {failed} failed")
    return failed


# --------------------------------------------------------------------------------------------
# Timing (GPU)
# --------------------------------------------------------------------------------------------


@dataclass
class Runner:
    """How a function is timed and compiled: the real ones on a GPU; the tests substitute both."""

    timing: tuple[float, float] = common.FULL_TIMING
    time_fn: Callable | None = None  # fn -> common.Timing
    compile_fn: Callable | None = None  # (fn, mode) -> compiled fn

    def time(self, fn: Callable[[], object]) -> common.Timing:
        if self.time_fn is not None:
            return self.time_fn(fn)
        return common.loop_us(fn, *self.timing)

    def compile(self, fn: Callable, mode: str | None) -> Callable:
        if self.compile_fn is not None:
            return self.compile_fn(fn, mode)
        compiled = common.compile_baseline(fn)
        return compiled if mode is None else torch.compile(fn, mode=mode, dynamic=False)


def modes(batch: int) -> tuple[str, ...]:
    return ("eager", "compiled") + (("cudagraphs",) if batch == 1 else ())


def time_impl(runner: Runner, fn: Callable, mode: str, inputs: Sequence[torch.Tensor]) -> tuple[float, float, float, str]:
    """(median, p20, p80 ms; note) of ``fn`` run ``mode`` way over rotated ``inputs``; a failure
    (a compile error, out of memory) is NaN with its reason."""
    try:
        f = fn if mode == "eager" else runner.compile(fn, None if mode == "compiled" else "reduce-overhead")
        i = [0]

        def call():
            i[0] += 1
            return f(inputs[i[0] % len(inputs)])

        with torch.inference_mode():
            t = runner.time(call)
        return t.median_us / 1e3, t.p20_us / 1e3, t.p80_us / 1e3, ""
    except Exception as e:  # noqa: BLE001 - the row says why
        nan = float("nan")
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        return nan, nan, nan, f"N/A: {common.short_exc(e)[:200]}"
    finally:
        torch._dynamo.reset()  # each implementation compiles afresh


def best(rows: Sequence[dict], impl: str) -> float:
    times = [r["ms"] for r in rows if r["impl"] == impl and not math.isnan(r["ms"])]
    return min(times) if times else float("nan")


def bench_arch(arch: str, batch: int, variants: Sequence[Variant], runner: Runner, device, dtype,
               write: Callable[[list[dict]], None], img_size: int = 224) -> list[dict]:
    """The rows of one (arch, batch): timm's model, then each variant effkern's way and the
    published way; each variant's rows written as soon as they are measured."""
    base = {"model": arch, "batch": batch, "dtype": str(dtype).replace("torch.", "")}
    model = timm_model(arch, device, dtype, img_size=img_size)
    gen = torch.Generator(device=device).manual_seed(batch)
    inputs = [torch.randn(batch, 3, img_size, img_size, device=device, generator=gen).to(dtype) for _ in range(2)]
    timm_rows = []
    for mode in modes(batch):
        ms, p20, p80, note = time_impl(runner, model, mode, inputs)
        timm_rows.append(dict(base, method="timm", config="", impl="timm", mode=mode, ms=ms, p20_ms=p20, p80_ms=p80,
                              tokens=1.0, note=note))
    write(finish(timm_rows, float("nan")))
    out = list(timm_rows)
    timm_best = best(timm_rows, "timm")
    for v in variants:
        if arch not in v.archs:
            continue
        vbase = dict(base, method=v.method, config=" ".join(f"{k}={x}" for k, x in v.config.items()))
        rows = []
        try:
            conv = effkern_model(model, v, v.config, inputs[0][: min(batch, 8)])
            published = published_model(model, conv, v, v.config)
        except Exception as e:  # noqa: BLE001
            rows.append(dict(vbase, impl="effkern", mode="eager", ms=float("nan"), note=f"N/A: {common.short_exc(e)[:200]}"))
            write(finish(rows, timm_best))
            out += rows
            continue
        ivit = v.method == "ivit"
        v_inputs = [x.float() for x in inputs] if ivit else inputs
        with torch.inference_mode():
            conv(v_inputs[0])
        tokens = tokens_fraction(conv)
        for mode in modes(batch):
            ms, p20, p80, note = time_impl(runner, conv, mode, v_inputs)
            rows.append(dict(vbase, impl="effkern", mode=mode, ms=ms, p20_ms=p20, p80_ms=p80, tokens=tokens,
                             note="; ".join(n for n in ("float32 images, integer-only inside" if ivit else "", note)
                                            if n)))
        if published is not None:
            for mode in ("eager", "compiled"):
                ms, p20, p80, note = time_impl(runner, published, mode, inputs)
                rows.append(dict(vbase, impl="published", mode=mode, ms=ms, p20_ms=p20, p80_ms=p80, tokens=tokens,
                                 note=note))
        del conv, published
        target = v.targets.get((arch, batch))
        write(finish(rows, timm_best, target))
        out += rows
    return out


def finish(rows: list[dict], timm_best: float, target: float | None = None) -> list[dict]:
    """Images/s and the ratios of each row; the variant's verdict on its best effkern row."""
    pub_best = best(rows, "published")
    for r in rows:
        r["images_s"] = r["batch"] / (r["ms"] * 1e-3) if not math.isnan(r["ms"]) else float("nan")
        r["vs_timm"] = timm_best / r["ms"] if r["impl"] != "timm" else float("nan")
        r["vs_published"] = pub_best / r["ms"] if r["impl"] == "effkern" else float("nan")
    eff = [r for r in rows if r["impl"] == "effkern" and not math.isnan(r["ms"])]
    if eff:
        top = min(eff, key=lambda r: r["ms"])
        goals = [(top["vs_timm"], target, f">={target}x timm")] if target else []
        if not math.isnan(pub_best):
            goals.append((top["vs_published"], PUBLISHED_TARGET, f">={PUBLISHED_TARGET}x published"))
        if goals:
            top["target"] = " & ".join(g[2] for g in goals)
            top["status"] = "-" if any(math.isnan(g[0]) for g in goals) else (
                "PASS" if all(g[0] >= g[1] for g in goals) else "MISS")
    return rows


# --------------------------------------------------------------------------------------------
# CSV, markdown, plot
# --------------------------------------------------------------------------------------------


def append_csv(path: Path, rows: Sequence[dict], env: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        if new:
            w.writeheader()
        for r in rows:
            w.writerow({k: _cell(v) for k, v in {**env, **r}.items() if k in FIELDS})


def _cell(v) -> str:
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.6g}"
    return str(v)


def latest_run(rows: Sequence[dict]) -> list[dict]:
    """The rows of the latest run (its commit and date's day) of each GPU."""
    out, by_gpu = [], {}
    for r in rows:
        by_gpu.setdefault(r["gpu"], []).append(r)
    for gpu_rows in by_gpu.values():
        last = gpu_rows[-1]
        out += [r for r in gpu_rows if (r["commit"], r["date"][:10]) == (last["commit"], last["date"][:10])]
    return out


def markdown(rows: Sequence[dict], png: str | None) -> str:
    head = ["gpu", "model", "batch", "method", "impl", "mode", "ms", "images/s", "tokens", "vs timm", "vs published",
            "target", "status", "note"]
    keys = ["gpu", "model", "batch", "method", "impl", "mode", "ms", "images_s", "tokens", "vs_timm", "vs_published",
            "target", "status", "note"]
    table = common.text_table([[common.fmt_num(r[k]) if k in ("ms", "images_s", "tokens", "vs_timm", "vs_published")
                                and r[k] else r[k] for k in keys] for r in rows], head, markdown=True)
    envs = sorted({f"{r['gpu']} (driver {r['driver']}), torch {r['torch']}, triton {r['triton']}, commit {r['commit']}, "
                   f"{r['date']}" for r in rows})
    doc = (__doc__ or "").split("\n\n")
    lines = [f"# {TITLE}", "", "Generated by bench/models.py from models.csv (latest run per GPU); do not edit.", ""]
    lines += [doc[0].replace("\n", " "), ""] + [f"- {e}" for e in envs] + ["", table, ""]
    if png:
        lines += [f"![speedup against tokens kept]({png})", ""]
    return "\n".join(lines)


def plot(rows: Sequence[dict], png_path: Path) -> str | None:
    """Speed over timm (best effkern row per variant) against tokens kept, one panel per batch.
    Returns None on success, else why no plot was made."""
    points = [r for r in rows if r["impl"] == "effkern" and r.get("status")]
    points = points or [r for r in rows if r["impl"] == "effkern" and r["vs_timm"]]
    if not points:
        return "no effkern rows to plot"
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed"
    batches = sorted({int(r["batch"]) for r in rows})
    fig, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 4), squeeze=False)
    for ax, b in zip(axes[0], batches):
        for r in rows:
            if r["impl"] != "effkern" or int(r["batch"]) != b or not r["vs_timm"]:
                continue
            ax.scatter(float(r["tokens"]), float(r["vs_timm"]), marker="o" if r["mode"] != "eager" else "x")
            ax.annotate(f"{r['method']} {r['model']} {r['mode']}", (float(r["tokens"]), float(r["vs_timm"])), fontsize=6)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xlabel("tokens computed (fraction)")
        ax.set_ylabel("speed over timm's best")
        ax.set_title(f"batch {b}")
    fig.suptitle(f"{TITLE} ({', '.join(sorted({r['gpu'] for r in rows}))})")
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return None


def regenerate(csv_path: Path = CSV_PATH) -> Path:
    """Rewrite models.md and models.png beside ``csv_path`` from its latest run per GPU."""
    with Path(csv_path).open(newline="") as f:
        rows = latest_run(list(csv.DictReader(f)))
    png = Path(csv_path).with_suffix(".png")
    why = plot(rows, png)
    if why:
        print(f"bench models: no plot ({why})")
    md = Path(csv_path).with_suffix(".md")
    md.write_text(markdown(rows, None if why else png.name))
    return md


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m effkern bench models", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="DeiT-B at B = 1 and 256, the token methods only")
    p.add_argument("--methods", default="", help=f"a comma list of methods (default: all of {', '.join(dict.fromkeys(v.method for v in VARIANTS))})")
    p.add_argument("--archs", default="", help=f"a comma list of {', '.join(ARCHS)}")
    p.add_argument("--batches", default="", help="a comma list of batch sizes (default 1,64,256)")
    p.add_argument("--img-size", type=int, default=224, help="image size (default 224: 196 patches)")
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16", help="the models' dtype (default bf16)")
    p.add_argument("--csv", type=Path, default=CSV_PATH, help="where rows are appended (default %(default)s)")
    p.add_argument("--check", action="store_true", help="the correctness self-check only (what runs without a GPU)")
    return p


def _listed(text: str, allowed: Sequence, what: str, p: argparse.ArgumentParser, cast=str) -> list:
    if not text:
        return list(allowed)
    values = [cast(t) for t in text.split(",") if t]
    bad = [v for v in values if v not in allowed]
    if bad or not values:
        p.error(f"unknown {what} {bad or text!r} (choose from {', '.join(map(str, allowed))})")
    return values


def main(argv: Sequence[str] | None = None, runner: Runner | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    methods = _listed(args.methods, list(dict.fromkeys(v.method for v in VARIANTS)), "method", p)
    archs = _listed(args.archs, list(ARCHS), "arch", p)
    try:
        batches = [int(b) for b in args.batches.split(",") if b] if args.batches else list(BATCHES)
    except ValueError:
        batches = []
    if not batches or min(batches) < 1:
        p.error(f"--batches must be a comma list of positive integers, got {args.batches!r}")
    if args.quick:
        methods = [m for m in methods if m in TOKEN_METHODS]
        archs, batches = ["DeiT-B"], [1, 256]
    variants = [v for v in VARIANTS if v.method in methods and set(v.archs) & set(archs)]  # checked and timed
    try:
        import timm  # noqa: F401
    except ImportError as e:
        print(f"bench models needs timm (pip install timm, beside torchvision): {e}", file=sys.stderr)
        return 2
    if args.check or not (common.cuda_available() or runner is not None):  # (the tests time on a CPU)
        print(f"{TITLE}: " + ("--check" if args.check else "no GPU") + ": the correctness self-check")
        return 1 if self_check("cpu" if not common.cuda_available() else "cuda", variants) else 0
    runner = runner or Runner(common.QUICK_TIMING if args.quick else common.FULL_TIMING)
    device = "cuda" if common.cuda_available() else "cpu"
    if self_check(device, variants):
        print("bench models: the self-check failed; nothing timed")
        return 1
    env = common.environment()
    for arch in archs:
        for batch in batches:
            print(f"{arch} B={batch}:", flush=True)

            def write(rows):
                append_csv(args.csv, rows, env)
                for r in rows:
                    print(f"  {r['method']:10} {r['impl']:9} {r['mode']:10} {_cell(r['ms']):>9} ms  "
                          f"vs timm {_cell(r.get('vs_timm', float('nan'))):>6}  {r.get('status', '')} {r.get('note', '')}",
                          flush=True)

            bench_arch(arch, batch, variants, runner, device, DTYPES[args.dtype], write, args.img_size)
    print(f"wrote {args.csv} and {regenerate(args.csv)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
