"""Integer-only ViT ops (I-ViT) on DeiT/ViT-S and -B shapes: `int_softmax` (int8 and int16 logits, N = 197
and 785), `int_gelu`, `int_layernorm`, `requantize` and `int8_linear` (qkv, proj, fc1, fc2), batch 1 and 64.

*kernel µs* is the backend kernel alone, its integer constants (x0, m, e, bias_int) precomputed as a
model caches them; *op µs* the public `effkern.ops` call (checks and constants included). Every
backend is compared bit for bit with the torch backend before it is timed. *GB/s* counts each input
read once and each output written once.

Baselines, on the same shapes: `torch.softmax`, `F.gelu` and `F.layer_norm` (affine) in bf16; for
requantize eager bf16 `round(x * s).clamp(-128, 127).to(int8)` (several kernels, not bit-equivalent
to the dyadic requantisation), and the same `torch.compile`d (one fused kernel; informative, no
target); for int8_linear `torch._int_mm` (int32 output, no epilogue) and `F.linear` in bf16 with bias.
*kernel µs* and the baselines' µs are device times (CUDA-graph replay); *op µs* back-to-back public
calls with host overhead (and any host synchronisation) included.

Targets: the row and elementwise ops at batch 64 reach >= 80% of the bandwidth of a same-size copy
and >= 1.2x the eager torch bf16 op; int8_linear, its requantising epilogue fused, is at least as fast
as `torch._int_mm`.
"""

from __future__ import annotations

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
from effkern.ops import integer as intops  # noqa: E402

from bench.runner import Baseline, Case, Target, compiled, exact, main  # noqa: E402

TITLE = "Integer-op benchmark"
QUICK = "ViT-B shapes at batch 64"

TOKENS, SEQ_LENS, BATCHES = 197, (197, 785), (1, 64)  # 224 px / 16 + cls; 448 px: 28 * 28 + 1
MODELS = (("ViT-S", 384, 6), ("ViT-B", 768, 12))  # name, width, heads
LINEAR_KN = (("ViT-S", 384, 1152), ("ViT-S", 384, 384), ("ViT-S", 384, 1536), ("ViT-S", 1536, 384),
             ("ViT-B", 768, 2304), ("ViT-B", 768, 768), ("ViT-B", 768, 3072), ("ViT-B", 3072, 768))  # qkv proj fc1 fc2
DTYPES = {"int8": torch.int8, "int16": torch.int16, "int32": torch.int32}
SOFTMAX_SCALE = {"int8": 0.08, "int16": 0.0005}  # logits within about +-10 and +-16
GELU_SCALE, SOFTMAX_N, GELU_N, LN_ITERS, OUT_BITS = 0.05, 15, 23, 10, 8
ROW_TARGET = Target(">=80% BW & >=1.2x", bw=0.80, speedup=1.2)  # at batch >= 64


def _case(op, model, batch, shape, dt, *, out_dtype, kernel, call, bytes, baselines, scale=1.0, flops=0,
          setup=None, n_out=0, targets=None) -> Case:
    """A row-wise integer op on x [..., C] (int8_linear: x [M, K], w [N, K]); xb: x in bf16, times scale."""
    rows, cols = math.prod(shape[:-1]), shape[-1]

    def inputs(r):
        x = r.randint(shape, DTYPES[dt]) if dt != "int32" else r.randint(shape, torch.int32, -(2**17), 2**17)
        s = {"x": x, "xb": (x.float() * scale).to(torch.bfloat16)}
        if n_out:
            s["w"] = r.randint((n_out, cols), torch.int8)
            s["wb"] = s["w"].to(torch.bfloat16)
        return s

    return Case(op, model, batch, "x".join(map(str, shape + ((n_out,) if n_out else ()))), dt, out_dtype,
                inputs=inputs, setup=setup, kernel=kernel, call=call, bytes=bytes, flops=flops, baselines=baselines,
                check=exact(), chunk="x", targets=targets if targets is not None else
                ({"*": ROW_TARGET} if batch >= 64 else {}))


def softmax(model, b, shape, dt):
    numel, es, scale, cols = math.prod(shape), DTYPES[dt].itemsize, SOFTMAX_SCALE[dt], shape[-1]
    x0 = intops.shift_exp_x0(torch.tensor(scale))
    return _case("int_softmax", model, b, shape, dt, out_dtype="int8", scale=scale, bytes=numel * (es + 1),
                 kernel=lambda s, k: k.int_softmax(x=s["x"].reshape(-1, cols), x0=x0, n=SOFTMAX_N, out_bits=OUT_BITS),
                 call=lambda s: effkern.ops.int_softmax(s["x"], scale, out_bits=OUT_BITS, n=SOFTMAX_N)[0],
                 baselines=[Baseline("torch.softmax bf16", lambda s: torch.softmax(s["xb"], dim=-1), numel * 4)])


def gelu(model, b, shape):
    numel, cols = math.prod(shape), shape[-1]
    x0 = intops.shift_exp_x0(torch.tensor([GELU_SCALE]) * 1.702)
    return _case("int_gelu", model, b, shape, "int8", out_dtype="int32", scale=GELU_SCALE, bytes=numel * 5,
                 kernel=lambda s, k: k.int_gelu(x=s["x"].reshape(-1, cols), x0=x0, n=GELU_N, out_bits=OUT_BITS),
                 call=lambda s: effkern.ops.int_gelu(s["x"], GELU_SCALE, out_bits=OUT_BITS, n=GELU_N)[0],
                 baselines=[Baseline("F.gelu bf16", lambda s: F.gelu(s["xb"]), numel * 4)])


def layernorm(model, b, shape):
    numel, c = math.prod(shape), shape[-1]

    def setup(r):
        weight, bias = 1.0 + 0.1 * r.randn(c), 0.1 * r.randn(c)
        return {"weight": weight, "bias": bias, "bias_int": intops.layernorm_constants(c, weight, bias)[0],
                "wb": weight.to(torch.bfloat16), "bb": bias.to(torch.bfloat16)}

    return _case("int_layernorm", model, b, shape, "int8", out_dtype="int32", setup=setup,  # LN: scale-invariant
                 bytes=numel * 5 + c * 4,
                 kernel=lambda s, k: k.int_layernorm(x=s["x"].reshape(-1, c), bias_int=s["bias_int"], iters=LN_ITERS),
                 call=lambda s: effkern.ops.int_layernorm(s["x"], s["weight"], s["bias"], iters=LN_ITERS)[0],
                 baselines=[Baseline("F.layer_norm bf16", lambda s: F.layer_norm(s["xb"], (c,), s["wb"], s["bb"]),
                                     numel * 4 + c * 4)])


def _dyadic(r, in_scale, out_scale: float, n: int, on_device: bool = True) -> dict:
    m, e = rq.dyadic_params(in_scale, torch.tensor([out_scale]))
    where = r.device if on_device else "cpu"
    return {"in_scale": in_scale, "m": m.expand(n).contiguous().to(where), "e": e.expand(n).contiguous().to(where)}


def requantize(model, b, shape):
    numel, c, out_scale = math.prod(shape), shape[-1], 0.05

    def setup(r):  # per-channel in_scale, float32 on the host; (m, e) on the host, as the op has them
        d = _dyadic(r, 2e-5 * (1.0 + r.rand(c).cpu()), out_scale, c, on_device=False)
        return dict(d, ratio=(d["in_scale"] / out_scale).to(r.device, torch.bfloat16))

    eager = Baseline("torch bf16 x*s round clamp", lambda s: torch.round(s["xb"] * s["ratio"])
                     .clamp_(-128, 127).to(torch.int8), numel * 3 + c * 2,
                     note="requantize baseline: eager torch on a bf16 copy of the input, "
                          "round(x*s).clamp(-128,127).to(int8) (several kernels; not "
                          "bit-equivalent to the dyadic requantisation)")
    return _case("requantize", model, b, shape, "int32", out_dtype="int8", setup=setup, bytes=numel * 5 + c * 16,
                 kernel=lambda s, k: k.requantize(x=s["x"].reshape(-1, c), m=s["m"], e=s["e"], out_bits=OUT_BITS),
                 call=lambda s: effkern.ops.requantize(s["x"], s["in_scale"], out_scale, out_bits=OUT_BITS),
                 baselines=[eager, compiled(eager)], targets={eager.name: ROW_TARGET} if b >= 64 else {})


def linear(model, b, m_rows, k, n):
    out_scale, flops = 3.0 / 127, 2 * m_rows * n * k  # int8 outputs with a std of about 45

    def setup(r):  # acc has std ~ sqrt(K) * 74^2: this in_scale makes acc * in_scale ~ N(0, 1)
        in_scale = (1.0 / (math.sqrt(k) * 74.0**2)) * (1.0 + 0.25 * r.rand(n).cpu())
        bias = r.randint((n,), torch.int32, -(2**14), 2**14)
        # m, e on the host, as the op passes host-scale constants: the Triton kernel then picks its
        # epilogue on the host (device constants compile both epilogues into one kernel)
        return dict(_dyadic(r, in_scale, out_scale, n, on_device=False), bias=bias, bias_b=bias.to(torch.bfloat16))

    # torch._int_mm (cuBLASLt) needs M > 16 and K, N multiples of 8; w.t() is its usual [K, N] operand
    int_mm = (Baseline("torch._int_mm", None, na=f"K={k} and N={n} must be multiples of 8") if k % 8 or n % 8 else
              Baseline("torch._int_mm", lambda s: torch._int_mm(s["x"], s["w"].t()), m_rows * k + n * k + 4 * m_rows * n,
                       flops, gpu_only=True))
    return _case("int8_linear", model, b, (m_rows, k), "int8", out_dtype="int8", n_out=n, setup=setup, flops=flops,
                 bytes=m_rows * k + n * k + 20 * n + m_rows * n, targets={"torch._int_mm": Target(">=1.0x _int_mm", speedup=1.0)},
                 kernel=lambda s, kk: kk.int8_linear(x=s["x"], w=s["w"], bias=s["bias"], m=s["m"], e=s["e"],
                                                     out_bits=OUT_BITS),
                 call=lambda s: effkern.ops.int8_linear(s["x"], s["w"], s["bias"], in_scale=s["in_scale"],
                                                        out_scale=out_scale, out_bits=OUT_BITS),
                 baselines=[int_mm, Baseline("F.linear bf16", lambda s: F.linear(s["xb"], s["wb"], s["bias_b"]),
                                             2 * (m_rows * k + n * k + n + m_rows * n), flops)])


def cases(check: bool = False, quick: bool = False) -> list[Case]:
    """Batch 1 and 64 of ViT-S and ViT-B (--quick: ViT-B at 64); the self-check: the same row
    lengths on 197 rows (--quick: 13 rows, 33 for int8_linear, and fewer linear layers)."""
    models = MODELS[1:] if quick and not check else MODELS
    batches = (64,) if quick and not check else BATCHES
    names = {m for m, _, _ in models}

    def at(model, b, shape, rows_cap=13 if quick else TOKENS):  # the self-check: 2-D, few rows
        return ("-", 0, (min(rows_cap, math.prod(shape[:-1])), shape[-1])) if check else (model, b, shape)

    out = [softmax(*at(m, b, (b, h, n, n)), dt) for (m, _, h), n, b, dt in
           itertools.product(models, SEQ_LENS, batches, ("int8", "int16"))]
    out += [gelu(*at(m, b, (b * TOKENS, 4 * c))) for (m, c, _), b in itertools.product(models, batches)]
    out += [layernorm(*at(m, b, (b * TOKENS, c))) for (m, c, _), b in itertools.product(models, batches)]
    out += [requantize(*at("ViT-S", b, (b * TOKENS, 1536))) for b in batches]
    linears = LINEAR_KN[::3][:2] if check and quick else [x for x in LINEAR_KN if x[0] in names]
    for (m, k, n), b in itertools.product(linears, batches):
        model, bb, (rows, _) = at(m, b, (b * TOKENS, k), 33 if quick else TOKENS)
        out.append(linear(model, bb, rows, k, n))
    return out


if __name__ == "__main__":
    sys.exit(main("integer"))
