"""2:4 structured-sparse int8 GEMM (GPUSQ-ViT) on ViT-S / ViT-B / ViT-L linear shapes (qkv, proj,
fc1, fc2), M = B x 197: `sparse24_int8_linear` with a per-token x_scale, per-channel weight scale
and a float bias, requantised to int8 (per-tensor out_scale), in bf16, and in bf16 with GELU fused
(fc1). Every shape at B = 64; fc1 and fc2 also at B = 1 and 256.

*kernel µs* is the backend kernel alone, on a prebuilt Sparse24Weight (values ``[N, K/2]``, meta
``[N, K/8]``) with the per-row x_scale and 1 / out_scale already on the device; *op µs* the public
`effkern.ops.sparse24_int8_linear` call. Every backend is compared with the torch backend first
(int8 outputs bit for bit, bf16 within its tolerance). *GB/s* counts x, values (K/2 per row), meta
(K/8 per row), the scales, bias and the output once; TOPS use the dense-equivalent 2 M N K.

Baselines, on the same pruned weight: cuSPARSELt (`torch._cslt_sparse_mm` on
`torch._cslt_compress` of the dense pruned int8 weight, the weight as the sparse operand, x.t() as
the dense one, transpose_result=True for an ``[M, N]`` result, the per-channel scale as an alpha
vector, the bias and the output dtype fused, its best algorithm / split-K picked once by
`torch._C._cusparselt.mm_search`; it has no per-token scale, so x_scale is folded in per tensor,
and torch exposes none of its activations, so GELU is an eager `F.gelu` after it; M is padded to
a multiple of 16 as torch's own semi-structured wrapper does; the fused bias is checked once in
setup against alpha * (x @ W^T) + bias, and where cuSPARSELt refuses or misreads it a bf16 output
adds it eagerly, an int8 one is N/A with the reason; on CPU tensors, for the self-check only, an
emulation of its arithmetic stands in); `torch._int_mm` on the dense int8
weight (M > 16) with the epilogue in eager torch (int32 out, then the float scales, bias,
activation and rounding: the same function, unfused); effkern's dense `int8_linear` on the
decompressed weight (int8 output only; its dyadic requantisation has per-channel scales but no
per-token one: not bit-equivalent, not compared); cuBLAS `F.linear` in bf16 on the dequantised
weight.

Targets (H100/H200): >= 1.0x cuSPARSELt at the same output; at ViT-B fc1 and fc2 with int8
output and M = 64 x 197 and 256 x 197, >= 1.3x the dense int8 `int8_linear` (its requantising
epilogue fused) and >= 1.8x cuBLAS bf16. The end-to-end row (2:4-int8 DeiT-S/B against timm's
bf16 model compiled) is `python -m effkern bench models`.
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
from effkern.ops import sparse24 as sops  # noqa: E402

from bench.runner import Baseline, Case, Target, close, distinct, exact, main  # noqa: E402

TITLE = "2:4-sparse int8 GEMM benchmark"
QUICK = "ViT-B fc1 and fc2 at B = 1 and 64 (int8, bf16 and fc1's bf16 + GELU)"

TOKENS = 197  # 224 px / 16 + the class token
# (model, K, N, layer): qkv, proj, fc1, fc2
LINEARS = (("ViT-S", 384, 1152, "qkv"), ("ViT-S", 384, 384, "proj"), ("ViT-S", 384, 1536, "fc1"),
           ("ViT-S", 1536, 384, "fc2"),
           ("ViT-B", 768, 2304, "qkv"), ("ViT-B", 768, 768, "proj"), ("ViT-B", 768, 3072, "fc1"),
           ("ViT-B", 3072, 768, "fc2"),
           ("ViT-L", 1024, 3072, "qkv"), ("ViT-L", 1024, 1024, "proj"), ("ViT-L", 1024, 4096, "fc1"),
           ("ViT-L", 4096, 1024, "fc2"))
BATCHES = (1, 64, 256)  # every layer at 64; fc1 and fc2 also at 1 and 256
OUT_SCALE = 3.0 / 127  # outputs ~ N(0, 1): int8 outputs with a std of about 42
OUTS = {"int8": (torch.int8, None), "bf16": (torch.bfloat16, None), "bf16_gelu": (torch.bfloat16, "gelu")}
CSLT_ROWS = 16  # cuSPARSELt's int8 dense operand: M padded to a multiple of 16 (torch's semi-structured wrapper)
op = sops.sparse24_int8_linear
CSLT = Target(">=1.0x cuSPARSELt", speedup=1.0)
DENSE_INT8 = Target(">=1.3x dense int8_linear", speedup=1.3)
BF16 = Target(">=1.8x cuBLAS bf16", speedup=1.8)
loose = close(rtol=2e-2, atol_of_max=1e-2)  # cuBLAS bf16 (bf16 x, dequantised weight) against the int8 op


def _cslt_plan(w8, bias, alpha, out_dtype, x) -> dict:
    """cuSPARSELt's compressed weight, the fused bias it reads correctly, and its best (alg_id,
    split_k, split_k_mode) for this shape from torch._C._cusparselt.mm_search (older torch:
    torch._cslt_sparse_mm_search, the alg id only). The bias (output units) is tried as float32,
    then in the output dtype, each call checked against alpha[n] * (x @ w8^T) + bias[n] in float;
    if none agrees, a bf16 output adds it in eager torch after the call, an int8 one is N/A."""
    compressed = torch._cslt_compress(w8)
    xp = _pad_rows(x)
    xt = xp.t()
    int8_out = out_dtype is None
    b_out = bias / OUT_SCALE if int8_out else bias  # float32, in output units
    want_nb = (xp.float() @ w8.float().t()) * alpha[None, :]

    def agrees(y, v) -> bool:
        v = v.round().clamp(-128, 127) if int8_out else v
        tol = 1.0 if int8_out else 1e-2 * v.abs() + 1e-2 * float(v.abs().max())
        return bool(((y.float() - v).abs() <= tol).all())

    plan = {"w": compressed, "bias": None, "alpha": alpha, "out_dtype": out_dtype, "alg": {}, "eager_bias": None,
            "why": ""}
    tried = []
    for dt in (torch.float32,) if int8_out or out_dtype == torch.float32 else (torch.float32, out_dtype):
        try:
            y = torch._cslt_sparse_mm(compressed, xt, bias=b_out.to(dt), alpha=alpha, out_dtype=out_dtype,
                                      transpose_result=True)
        except RuntimeError as e:
            tried.append(f"{dt}: {str(e).splitlines()[0][:80]}")
            continue
        if agrees(y, want_nb + b_out[None, :]):
            plan["bias"] = b_out.to(dt)
            break
        tried.append(f"{dt}: wrong result")
    else:
        try:
            ok = agrees(torch._cslt_sparse_mm(compressed, xt, alpha=alpha, out_dtype=out_dtype, transpose_result=True),
                        want_nb)
        except RuntimeError as e:
            ok = False
            tried.append(f"no bias: {str(e).splitlines()[0][:80]}")
        if ok and not int8_out:
            plan["eager_bias"] = b_out.to(out_dtype)
        else:
            plan["why"] = "cuSPARSELt with the fused bias failed or disagreed: " + "; ".join(tried)
    search = getattr(getattr(torch._C, "_cusparselt", None), "mm_search", None)
    try:
        if search is not None:
            alg_id, split_k, split_k_mode, _ = search(compressed, xt, plan["bias"], alpha, out_dtype, True)
            plan["alg"] = {"alg_id": int(alg_id), "split_k": int(split_k), "split_k_mode": int(split_k_mode)}
        else:
            plan["alg"] = {"alg_id": int(torch._cslt_sparse_mm_search(compressed, xt, plan["bias"], alpha, out_dtype,
                                                                       True))}
    except RuntimeError:
        plan["alg"] = {}  # cuSPARSELt's default algorithm
    torch.cuda.synchronize()
    return plan


def _pad_rows(x):
    pad = -x.shape[0] % CSLT_ROWS
    return F.pad(x, (0, 0, 0, pad)) if pad else x


def _cslt(s, m: int, activation):
    """torch._cslt_sparse_mm(W_compressed, x.t(), bias, alpha[N], out_dtype, transpose_result=True):
    D[M, N] = alpha[n] * acc + bias[n], saturated to int8 or rounded to bf16."""
    plan = s["cslt"]
    if plan.get("why"):
        raise RuntimeError(plan["why"])
    if plan["w"] is None:  # CPU tensors (no cuSPARSELt): its arithmetic emulated, to check the folding
        acc = _pad_rows(s["x"]).to(torch.int64) @ s["w8"].to(torch.int64).t()
        v = acc.to(torch.float32) * plan["alpha"][None, :] + plan["bias"].float()[None, :]
        y = torch.round(v).clamp(-128, 127).to(torch.int8) if plan["out_dtype"] is None else v.to(plan["out_dtype"])
    else:
        y = torch._cslt_sparse_mm(plan["w"], _pad_rows(s["x"]).t(), bias=plan["bias"], alpha=plan["alpha"],
                                  out_dtype=plan["out_dtype"], transpose_result=True, **plan["alg"])
    if y.shape[0] != m:
        y = y[:m]
    if plan.get("eager_bias") is not None:
        y = y + plan["eager_bias"]
    return F.gelu(y) if activation == "gelu" else y


def _int_mm_epilogue(s, out_dtype, activation):
    """torch._int_mm, then the op's float epilogue in eager torch, step by step (several kernels)."""
    acc = torch._int_mm(s["x"], s["w8"].t())
    v = acc.to(torch.float32) * (s["xs"][:, None] * s["w"].scale[None, :])
    v = v + s["bias"][None, :]
    if activation == "gelu":
        v = 0.5 * v * (1 + torch.erf(v * sops.GELU_C))
    if out_dtype == torch.int8:
        return torch.round(v * s["inv"][None, :]).clamp(-128, 127).to(torch.int8)
    return v.to(out_dtype)


def linear(model, layer, b, m, k, n, out, check):
    out_dtype, activation = OUTS[out]
    out_bytes = out_dtype.itemsize

    def setup(r):
        gen = torch.Generator().manual_seed(k * 7919 + n)
        w = sops.Sparse24Weight.from_float(torch.randn(n, k, generator=gen)).to(r.device)
        w8 = w.decompress()
        q_rms = float(w.values.float().pow(2).mean().sqrt())
        # x_scale ~ xs0: acc * x_scale * w.scale ~ N(0, 1) (K/2 products of x ~ U(int8), std 74, and q)
        xs0 = 1.0 / (math.sqrt(k / 2) * 74.0 * q_rms * float(w.scale.mean()))
        bias = 0.5 * r.randn(n)
        c = {"w": w, "w8": w8, "xs0": xs0, "bias": bias, "inv": torch.full((1,), 1.0 / OUT_SCALE, device=r.device),
             "os": torch.tensor(OUT_SCALE, device=r.device), "wd": w.dequantize().to(torch.bfloat16),
             "bias_b": bias.to(torch.bfloat16)}
        # int8_linear: per-channel in_scale = xs0 * w.scale and an int32 bias at acc's scale (host scales)
        in_scale = (xs0 * w.scale).float().cpu()
        c["in_scale"], c["bias_i32"] = in_scale, torch.round(bias.cpu() / in_scale).to(torch.int32).to(r.device)
        # cuSPARSELt: alpha[n] folds x_scale (per tensor: xs0), w.scale[n] (and 1 / out_scale)
        alpha = (xs0 * w.scale / (OUT_SCALE if out_dtype == torch.int8 else 1.0)).float().contiguous()
        cslt_dtype = None if out_dtype == torch.int8 else out_dtype  # None: int8 out, cuSPARSELt's default
        if r.device.type == "cuda":
            try:
                c["cslt"] = _cslt_plan(w8, bias, alpha, cslt_dtype, r.randint((m, k), torch.int8))
            except RuntimeError as e:  # cuSPARSELt missing or refusing the shape: the baseline is N/A
                c["cslt"] = {"why": f"cuSPARSELt setup failed: {str(e).splitlines()[0][:160]}"}
        else:
            c["cslt"] = {"w": None, "bias": bias / OUT_SCALE if out_dtype == torch.int8 else bias, "alpha": alpha,
                         "out_dtype": cslt_dtype}
        return c

    def inputs(r):
        x = r.randint((m, k), torch.int8)
        xs = r.c["xs0"] * (0.75 + 0.5 * r.rand(m))  # per token
        return {"x": x, "xs": xs, "xb": (x.float() * xs[:, None]).to(torch.bfloat16)}

    def bf16(s):
        y = F.linear(s["xb"], s["wd"], s["bias_b"])
        return F.gelu(y) if activation == "gelu" else y

    flops = 2 * m * n * k
    nbytes = m * k + n * (k // 2 + k // 8) + 4 * n + 4 * m + 4 * n + 4 + m * n * out_bytes
    cslt = Baseline("cuSPARSELt", lambda s: _cslt(s, m, activation),
                    m * k + n * (k // 2 + k // 8) + 8 * n + m * n * out_bytes, flops, gpu_only=True,
                    note="CUDA only (CPU tensors: its arithmetic emulated, for the self-check); "
                         "torch._cslt_sparse_mm(torch._cslt_compress(w), x.t(), bias, alpha=per-channel scale, "
                         "transpose_result=True), alg/split-K from mm_search: x_scale per tensor (no per-token "
                         "scale), M padded to a multiple of 16" + ("; GELU eager after it" if activation else "")
                         + ": not bit-equivalent, not compared")
    int_mm = (Baseline("torch._int_mm+epilogue", None, na="torch._int_mm needs M > 16") if m <= 16 else
              Baseline("torch._int_mm+epilogue", lambda s: _int_mm_epilogue(s, out_dtype, activation),
                       m * k + n * k + 8 * m * n + 8 * n + 4 * m + m * n * out_bytes, flops, gpu_only=True,
                       check=exact() if out_dtype == torch.int8 else close(),
                       note="torch._int_mm (int32 out) on the dense pruned weight, then the op's float epilogue "
                            "in eager torch (unfused)"))
    dense = (Baseline("effkern int8_linear", lambda s: effkern.ops.int8_linear(
                 s["x"], s["w8"], s["bias_i32"], in_scale=s["in_scale"], out_scale=OUT_SCALE, out_bits=8),
                      m * k + n * k + 20 * n + m * n, flops,
                      note="dense int8_linear on the decompressed weight, fused dyadic requantisation: per-channel "
                           "scale x_scale * w.scale with x_scale per tensor, int32 bias: not bit-equivalent, "
                           "not compared")
             if out_dtype == torch.int8 else
             Baseline("effkern int8_linear", None, na="int8_linear has no float output (int8/int16/int32 only)"))
    blf = Baseline("F.linear bf16", bf16, 2 * (m * k + n * k + n + m * n), flops,
                   check=loose if out_dtype == torch.bfloat16 else None,
                   note="cuBLAS bf16 on bf16(x * x_scale) and the dequantised weight" +
                        (", eager F.gelu" if activation else ""))
    targets = {} if check else {"cuSPARSELt": CSLT}
    if (not check and model == "ViT-B" and layer in ("fc1", "fc2") and out_dtype == torch.int8
            and b in (64, 256)):
        targets.update({"effkern int8_linear": DENSE_INT8, "F.linear bf16": BF16})
    return Case(f"sparse24_int8_linear.{out}", model, b, f"{m}x{k}x{n}", "int8",
                "int8" if out_dtype == torch.int8 else "bf16", inputs=inputs, setup=setup, bytes=nbytes, flops=flops,
                check=exact() if out_dtype == torch.int8 else close(),
                kernel=lambda s, kk: kk.sparse24_int8_linear(
                    x=s["x"], values=s["w"].values, meta=s["w"].meta, scale=s["w"].scale, bias=s["bias"],
                    x_scale=s["xs"], inv_out=s["inv"] if out_dtype == torch.int8 else None, in_features=k,
                    out_dtype=out_dtype, activation=activation),
                call=lambda s: op(s["x"], s["w"], s["bias"], x_scale=s["xs"], out_dtype=out_dtype,
                                  out_scale=s["os"] if out_dtype == torch.int8 else None, activation=activation),
                baselines=[cslt, int_mm, dense, blf], targets=targets)


def cases(check: bool = False, quick: bool = False) -> list[Case]:
    """Every layer at B = 64, fc1 and fc2 also at B = 1 and 256, each with int8 and bf16 output
    and fc1 with bf16 + GELU (--quick: ViT-B fc1 and fc2 at B = 1 and 64); the self-check: the
    same K and N on 33 rows (--quick: ViT-S fc1 only)."""
    out = []
    for (model, k, n, layer), b in itertools.product(LINEARS, BATCHES):
        if b != 64 and layer not in ("fc1", "fc2"):
            continue
        if check and quick:
            if (model, layer, b) != ("ViT-S", "fc1", 1):
                continue
        elif quick and (model != "ViT-B" or layer not in ("fc1", "fc2") or b == 256):
            continue
        m = b * TOKENS
        mm, bb, name = (min(m, 33), 0, "-") if check else (m, b, model)
        for o in OUTS:
            if o != "bf16_gelu" or layer == "fc1":
                out.append(linear(name, layer, bb, mm, k, n, o, check))
    return distinct(out)  # the self-check's clipped rows repeat shapes


if __name__ == "__main__":
    sys.exit(main("sparse24"))
