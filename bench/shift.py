"""Shift GEMMs (DeepShift, ShiftAddViT) on DeiT-S / DeiT-B linear shapes (qkv, proj, fc1, fc2) and
PVTv2-B1's stage-3 MLP (320 -> 1280 -> 320), M = 1, 16 and B * N at B = 64: `shift_linear` in bf16
with the 5-bit (DeepShift) and the 4-bit weight form, `shift_linear_int8` (4-bit form, requantised to
int8) and DeepShift's integer `deepshift_linear` (CUDA cores); and the multiply/shift mixture of
experts (`effkern.nn.ShiftAddMoE`, 60% of the tokens to its shift expert) on DeiT-S/B and PVTv2-B1
MLPs at B = 1 and 64.

*kernel µs* is the backend kernel alone, on a prebuilt ShiftWeight; *op µs* the public `effkern.ops`
call. Every backend is compared with the torch backend first (float outputs within the output
dtype's tolerance, integer outputs bit for bit). *GB/s* counts x, the packed codes, the bases and
bias once and the output once.

Baselines, on the same shapes: cuBLAS `F.linear` in bf16 on the decoded dense weight (the float
function itself); for the int8 path also `torch._int_mm` followed by an eager requantisation
(int32 out, then float scale, round, clamp: the unfused form) and effkern's `int8_linear` on the
int8 decode with per-channel scales (the same epilogue, a dense int8 weight).

Targets (H100/H200): shift_linear >= 2.5x F.linear bf16 at M <= 16 and >= 0.95x at M >= 4096; the
int8 path >= 1.5x F.linear bf16 and >= 1.0x `torch._int_mm` + requantisation at M >= 4096; the
mixture of experts >= 1.2x the dense bf16 MLP at M >= 4096.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` and `effkern` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import effkern  # noqa: E402
from effkern import _requant as rq  # noqa: E402
from effkern.nn import ShiftAddMoE, ShiftLinear  # noqa: E402
from effkern.ops import shift as sops  # noqa: E402

from bench.runner import Baseline, Case, Target, Unavailable, close, distinct, exact, main, no_validate  # noqa: E402

TITLE = "Shift-GEMM benchmark"
QUICK = "DeiT-B fc1 and fc2 at M = 1, 16 and 64 x 197"

# (model, K, N, tokens per image): qkv, proj, fc1, fc2
LINEARS = (("DeiT-S", 384, 1152, 197), ("DeiT-S", 384, 384, 197), ("DeiT-S", 384, 1536, 197), ("DeiT-S", 1536, 384, 197),
           ("DeiT-B", 768, 2304, 197), ("DeiT-B", 768, 768, 197), ("DeiT-B", 768, 3072, 197), ("DeiT-B", 3072, 768, 197),
           ("PVTv2-B1", 320, 1280, 196), ("PVTv2-B1", 1280, 320, 196))
ROWS = (1, 16, 64)  # M = 1, 16, and B * N at B = 64
OUT_SCALE = 3.0 / 127
ops = {name: no_validate(getattr(effkern.ops, name)) for name in ("shift_linear", "shift_linear_int8", "deepshift_linear")}
SMALL_M = Target(">=2.5x cuBLAS bf16", speedup=2.5)
LARGE_M = Target(">=0.95x cuBLAS bf16", speedup=0.95)
loose = close(rtol=2e-2, atol_of_max=1e-2)  # cuBLAS bf16 against the op's float32-accumulated result


def _weight(r, n: int, k: int, bits: int) -> sops.ShiftWeight:
    """DeepShift-like weights: random signs (a tenth zero) and exponents in each channel's window."""
    span = sops.num_exponents(bits)
    sign = torch.where(r.rand(n, k) < 0.1, 0, torch.where(r.rand(n, k) < 0.5, -1, 1)).to(torch.int32)
    p = -14 + r.randint((n, k), torch.int64, 0, span - 1)
    return sops.ShiftWeight.from_sign_exponent(sign.cpu(), p.cpu(), bits=bits,
                                               exponent_range=(-14, -14 + span - 1)).to(r.device)


def _rows(b: int, tokens: int) -> int:
    return b * tokens if b == 64 else b


def shift_float(model, b, m, k, n, tokens, bits):
    def setup(r):
        w = _weight(r, n, k, bits)
        return {"w": w, "wd": w.decode(torch.bfloat16), "bias": r.randn(n, dtype=torch.bfloat16)}

    code_bytes = n * sops.code_columns(k, bits)
    nbytes, flops = 2 * m * k + code_bytes + 6 * n + 2 * m * n, 2 * m * n * k
    target = SMALL_M if m <= 16 else LARGE_M if m >= 4096 else None
    return Case(f"shift_linear.b{bits}", model, b, f"{m}x{k}x{n}", "bf16", "bf16",
                inputs=lambda r: {"x": r.randn(m, k, dtype=torch.bfloat16)}, setup=setup, bytes=nbytes, flops=flops,
                kernels=("shift_linear",),
                kernel=lambda s, kk: kk.shift_linear(x=s["x"], codes=s["w"].codes, base=s["w"].base, bias=s["bias"],
                                                     in_features=k, bits=bits),
                call=lambda s: ops["shift_linear"](s["x"], s["w"], s["bias"]),
                baselines=[Baseline("F.linear bf16", lambda s: F.linear(s["x"], s["wd"], s["bias"]),
                                    2 * (m * k + n * k + n + m * n), flops, check=loose)],
                targets={"F.linear bf16": target} if target else {})


def shift_int8(model, b, m, k, n, tokens):
    def setup(r):
        w = _weight(r, n, k, 4)
        in_scale = 1.0 / (math.sqrt(k) * 74.0 * 16)  # acc * scale ~ N(0, 1): int8 outputs of std ~ 42
        cols = in_scale * torch.ldexp(torch.ones(n), w.base.cpu().float())  # column n's scale
        # the dense int8 reference: int8_linear with (m, e) per column, as the op derives them
        mm, e = rq.dyadic_columns("bench", torch.tensor(in_scale), torch.tensor(OUT_SCALE), n, None)
        return {"w": w, "w8": sops.decode_int8(w.codes, k), "in_scale": in_scale, "cols": cols.to(r.device),
                "cols_host": cols,
                "m": mm.to(r.device), "e": (e - w.base.cpu().to(torch.int64)).to(r.device),
                "bias": r.randint((n,), torch.int32, -(2**12), 2**12), "wd": w.decode(torch.bfloat16)}

    def inputs(r):
        x = r.randint((m, k), torch.int8)
        return {"x": x, "xb": x.to(torch.bfloat16)}

    def int_mm_requant(s):  # cuBLASLt int8 GEMM, then the epilogue in eager torch (several kernels)
        acc = torch._int_mm(s["x"], s["w8"].t()) + s["bias"]
        return torch.round(acc.float() * (s["cols"] / OUT_SCALE)).clamp_(-128, 127).to(torch.int8)

    flops = 2 * m * n * k
    nbytes = m * k + n * sops.code_columns(k, 4) + 12 * n + m * n
    int_mm = (Baseline("torch._int_mm+requant", None, na="torch._int_mm needs M > 16") if m <= 16 else
              Baseline("torch._int_mm+requant", int_mm_requant, m * k + n * k + 8 * m * n, flops, gpu_only=True,
                       note="torch._int_mm (int32 out) then an eager float requantisation: not bit-equivalent to "
                            "the dyadic epilogue"))
    targets = {"F.linear bf16": Target(">=1.5x cuBLAS bf16", speedup=1.5),
               "torch._int_mm+requant": Target(">=1.0x _int_mm+requant", speedup=1.0)} if m >= 4096 else {}
    return Case("shift_linear_int8", model, b, f"{m}x{k}x{n}", "int8", "int8", inputs=inputs, setup=setup,
                bytes=nbytes, flops=flops, check=exact(),
                kernel=lambda s, kk: kk.shift_linear_int8(x=s["x"], codes=s["w"].codes, base=s["w"].base, bias=s["bias"],
                                                          m=s["m"], e=s["e"], in_features=k, out_bits=8),
                call=lambda s: ops["shift_linear_int8"](s["x"], s["w"], s["bias"], in_scale=s["in_scale"],
                                                        out_scale=OUT_SCALE, out_bits=8),
                baselines=[Baseline("effkern int8_linear", lambda s: effkern.ops.int8_linear(
                               s["x"], s["w8"], s["bias"], in_scale=s["cols_host"], out_scale=OUT_SCALE, out_bits=8),
                                    m * k + n * k + 20 * n + m * n, flops, check=exact(),
                                    note="int8_linear on the int8 decode, per-channel in_scale * 2^base: the same bits"),
                           int_mm,
                           Baseline("F.linear bf16", lambda s: F.linear(s["xb"], s["wd"]), 2 * (m * k + n * k + m * n),
                                    flops)],
                targets=targets)


def deepshift(model, b, m, k, n, tokens):
    def setup(r):
        w = _weight(r, n, k, 5)
        return {"w": w, "wd": w.decode(torch.bfloat16), "bias": r.randint((n,), torch.int32, -(2**20), 2**20)}

    def inputs(r):
        x = r.randint((m, k), torch.int32, -(2**20), 2**20)
        return {"x": x, "xb": (x.float() / 2**16).to(torch.bfloat16)}

    flops = 2 * m * n * k
    return Case("deepshift_linear", model, b, f"{m}x{k}x{n}", "int32", "int32", inputs=inputs, setup=setup,
                bytes=4 * m * k + n * k + 8 * n + 4 * m * n, flops=flops, check=exact(),
                kernel=lambda s, kk: kk.deepshift_linear(x=s["x"], codes=s["w"].codes, base=s["w"].base, bias=s["bias"],
                                                         in_features=k, bits=5),
                call=lambda s: ops["deepshift_linear"](s["x"], s["w"], s["bias"]),
                baselines=[Baseline("F.linear bf16", lambda s: F.linear(s["xb"], s["wd"]), 2 * (m * k + n * k + m * n),
                                    flops, note="deepshift_linear baseline: the float layer on tensor cores (what "
                                                "shift_linear replaces the shift-add with)")])


# (model, C, hidden, tokens per image): the MLPs the mixture of experts replaces
MLPS = (("DeiT-S", 384, 1536, 197), ("DeiT-B", 768, 3072, 197), ("PVTv2-B1", 320, 1280, 196))
SHIFT_SHARE = 0.6  # ShiftAddViT's balance point (alpha = (6, 4))
# x_0 ~ N(-MOE_SHIFT_MEAN, 1): the gate below routes a token to shift when x_0 < 0, P(x_0 < 0) = 0.6
MOE_SHIFT_MEAN = 0.2533


def moe(model, b, m, c, hidden, tokens):
    """effkern.nn.ShiftAddMoE (eval, frozen 5-bit shift expert, no capacity) against the dense
    bf16 MLP it replaces; its gate sends 60% of the tokens to the shift expert."""
    def setup(r):
        gen = torch.Generator().manual_seed(c + hidden)
        mlp = torch.nn.Sequential(torch.nn.Linear(c, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, c))
        for lin in (mlp[0], mlp[2]):
            torch.nn.init.normal_(lin.weight, std=lin.in_features ** -0.5, generator=gen)
        shift = torch.nn.Sequential(ShiftLinear.from_linear(mlp[0]).freeze(), torch.nn.GELU(),
                                    ShiftLinear.from_linear(mlp[2]).freeze())
        layer = ShiftAddMoE(mlp, shift, c).eval()
        with torch.no_grad():
            layer.w_gate.zero_()
            layer.w_gate[0] = torch.tensor([1.0, -1.0])  # logits (x_0, -x_0): shift when x_0 < 0
        layer = layer.to(device=r.device, dtype=torch.bfloat16)
        for lin in (shift[0], shift[2]):
            lin.freeze()  # encode again on the device
        return {"moe": layer, "w1": mlp[0].weight.to(r.device, torch.bfloat16),
                "b1": mlp[0].bias.to(r.device, torch.bfloat16), "w2": mlp[2].weight.to(r.device, torch.bfloat16),
                "b2": mlp[2].bias.to(r.device, torch.bfloat16)}

    def inputs(r):
        x = r.randn(m, c, dtype=torch.float32)
        x[:, 0] -= MOE_SHIFT_MEAN
        return {"x": x.to(torch.bfloat16)}

    def run(s, backend=None):
        try:
            with torch.no_grad(), (effkern.backend(backend) if backend else contextlib.nullcontext()):
                return s["moe"](s["x"])
        except effkern.BackendNotSupported as e:  # the whole layer is forced onto one backend
            raise Unavailable("N/A", str(e).splitlines()[-1].strip()) from None

    def dense(s):
        return F.linear(F.gelu(F.linear(s["x"], s["w1"], s["b1"])), s["w2"], s["b2"])

    flops = 4 * m * c * hidden
    shift_bytes = 2 * hidden * c + 4 * (hidden + c)  # 5-bit codes (a byte each) and bases, both layers
    return Case("shift_add_moe", model, b, f"{m}x{c}x{hidden}", "bf16", "bf16", inputs=inputs, setup=setup,
                bytes=2 * 2 * m * c + 2 * (2 * hidden * c) + shift_bytes, flops=flops,
                kernels=("shift_linear", "token_gather", "token_scatter"),
                kernel=lambda s, kk: run(s, kk.backend), call=run, check=loose,
                baselines=[Baseline("dense MLP bf16", dense, 2 * (2 * m * c + 2 * hidden * c + m * hidden * 2), flops,
                                    note="timm's Mlp in bf16 on every token (cuBLAS, eager GELU): the layer the "
                                         "mixture replaces, another function (not compared)")],
                targets={"dense MLP bf16": Target(">=1.2x dense MLP bf16", speedup=1.2)} if m >= 4096 else {})


def cases(check: bool = False, quick: bool = False) -> list[Case]:
    """Every linear shape at M = 1, 16 and 64 x tokens (--quick: DeiT-B fc1 and fc2); the
    self-check: the same K and N at M = 1 and 13 (--quick: DeiT-S fc1 only)."""
    linears = [x for x in LINEARS if x[0] == "DeiT-B" and x[1:3] in ((768, 3072), (3072, 768))] if quick else LINEARS
    if check and quick:
        linears = [LINEARS[2]]
    out = []
    for (model, k, n, tokens), b in itertools.product(linears, ROWS):
        m = _rows(b, tokens)
        if check:
            model, b, m = "-", 0, min(m, 13)
        out += [shift_float(model, b, m, k, n, tokens, bits) for bits in (5, 4)]
        out.append(shift_int8(model, b, m, k, n, tokens))
        if model in ("DeiT-S", "-") and (k, n) == (384, 1536):
            out.append(deepshift(model, b, m, k, n, tokens))
    for (model, c, hidden, tokens), b in itertools.product(MLPS[:1] if quick else MLPS, (1, 64)):
        m = b * tokens
        if check:
            model, b, m = "-", 0, 37
        out.append(moe(model, b, m, c, hidden, tokens))
    return distinct(out)  # the self-check's clipped rows repeat shapes


if __name__ == "__main__":
    sys.exit(main("shift"))
