"""Binary-hash additive attention (EcoFormer / ShiftAddViT) against flash attention: B = 64, H = 6 (DeiT-S)
and 12 (DeiT-B), head dim 64, N = 197, 785, 3136 and 12544 (224 and 448 px at patch 16 and 4: ViT and
PVT-style stages), bf16, both forms (ecoformer {-1, +1} codes, shiftadd {0, 1} codes), 16-bit codes (32
and 64 at H = 12, N = 3136); KSH hash with 64 anchors per head.

*binary_attention* is the linear attention alone on packed codes (kernel µs: the backend kernel; op µs:
the public op). *hash_attention* is the inference path from q, k, v: `ksh_hash` of q and of k,
`pack_bits` of both, `binary_attention` (kernel µs: the backend's kernels in a row; op µs: the public
ops). Outputs are compared with the torch backend within the bf16 tolerance (plus 1e-3 of max |out|);
hash projections within float32 tolerance, code bits equal except where |y| is within 1e-4 of max |y|
of zero, the output compared in the (batch, head) slices whose codes agree. *GB/s* counts the floor:
binary_attention reads q codes, k codes and v and writes out once; hash_attention reads q, k, v (and
the hash parameters) and writes out once.

Baselines, on the same q, k, v (or codes): `SDPA best` (`F.scaled_dot_product_attention` under
`sdpa_kernel` of each of cuDNN, flash and memory-efficient attention, each timed on the shape, the
fastest taken: the "baseline" column names it, the note lists them all; softmax attention, the speed
reference a model would otherwise use, not the same function) and `torch linear ref` (the torch
backend's kernels of the same linear form). *kernel µs* and the baselines' µs are device times
(CUDA-graph replay); *op µs* back-to-back public calls with host overhead included.

Targets: hash_attention vs the best SDPA on op µs: >= 1x at N = 785, >= 3x at 3136, >= 10x at 12544;
binary_attention >= 70% of the bandwidth of a same-size copy at its floor bytes (on its SDPA row).
"""

from __future__ import annotations

import itertools
import math
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` and `effkern` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import effkern  # noqa: E402
from effkern.ops import binary_hash as bh  # noqa: E402

from bench.runner import Baseline, Case, Kernels, Target, close, main, mismatch, no_validate  # noqa: E402

TITLE = "Binary-hash attention benchmark"
QUICK = "B=64, H=6, N=785/3136/12544, 16-bit ecoformer codes, both ops"

MODELS, SEQ_LENS, BATCH, D, ANCHORS = (("DeiT-S", 6), ("DeiT-B", 12)), (197, 785, 3136, 12544), 64, 64, 64
EXTRA = ("DeiT-B", 12, 3136, (32, 64))  # the longer codes, at one shape
SPEEDUP_TARGETS = {785: 1.0, 3136: 3.0, 12544: 10.0}  # hash_attention op µs vs the best SDPA
SDPA = "SDPA best"
SDPA_BACKENDS = ("cudnn", "flash", "efficient")  # what a user can pick with sdpa_kernel
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
Y_RTOL, Y_ATOL_OF_MAX, Y_TIE = 1e-3, 1e-4, 1e-4  # hash projections; |y| < Y_TIE max|y|: the bit may flip
compare_out = close(atol_of_max=1e-3)
ksh_hash, binary_attention = no_validate(bh.ksh_hash), no_validate(bh.binary_attention)


def sdpa(q, k, v, backend: str | None = None):
    """Softmax attention through F.scaled_dot_product_attention: torch's own choice, or one backend
    forced with sdpa_kernel (raises where that backend cannot run the inputs)."""
    if backend is None:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    names = {"cudnn": "CUDNN_ATTENTION", "flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION"}
    with sdpa_kernel(getattr(SDPBackend, names[backend])):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)


def sdpa_variants() -> tuple:
    """(name, fn of an input set) per SDPA backend, for the runner to time and take the fastest."""
    return tuple((b, lambda s, b=b: sdpa(s["q"], s["k"], s["v"], b)) for b in SDPA_BACKENDS)


def compare_hash(got, ref, **_) -> tuple[bool, str]:
    """(y_q, y_k, q codes, k codes, out): y within float32 tolerance, code bits equal except at
    near-zero y, out within tolerance in the (batch, head) slices whose codes all agree."""
    if not isinstance(got, (tuple, list)) or len(got) != 5:
        return False, f"expected (y_q, y_k, q_codes, k_codes, out), got {type(got).__name__}"
    notes, differ = [], torch.zeros(ref[4].shape[:2], dtype=torch.bool, device=ref[4].device)
    for name, g, r in (("y_q", got[0], ref[0]), ("y_k", got[1], ref[1])):
        notes.append(mismatch(name, g, r, rtol=Y_RTOL, atol_of_max=Y_ATOL_OF_MAX))
    for name, gc, rc, y in (("q codes", got[2], ref[2], ref[0]), ("k codes", got[3], ref[3], ref[1])):
        if gc.shape != rc.shape or gc.dtype != rc.dtype:
            notes.append(f"{name}: got {tuple(gc.shape)} {gc.dtype}, expected {tuple(rc.shape)} {rc.dtype}")
            continue
        flips = bh.unpack_codes(gc, y.shape[-1], False, torch.int8) != bh.unpack_codes(rc, y.shape[-1], False, torch.int8)
        tie = y.abs() < Y_TIE * float(y.abs().max()) if y.numel() else torch.zeros_like(flips)
        if bool((flips & ~tie).any()):
            notes.append(f"{name}: {int((flips & ~tie).sum())} bits differ away from a near-zero y")
        differ |= flips.flatten(2).any(-1)  # [B, H]
    if got[4].shape != ref[4].shape:
        notes.append(f"out: got {tuple(got[4].shape)}, expected {tuple(ref[4].shape)}")
    else:
        notes.append(mismatch("out", got[4][~differ], ref[4][~differ], atol_of_max=1e-3))
    ok = not any(notes)
    if bool(differ.any()):
        notes.append(f"(codes differ at near-zero y in {int(differ.sum())} (batch, head) slices; out not compared there)")
    return ok, "; ".join(n for n in notes if n)


def case(op, model, b, h, n, nb, form, dt="bf16") -> Case:
    es, w, hashed = DTYPES[dt].itemsize, bh.num_words(nb), op == "hash_attention"
    out_bytes = b * h * n * D * es
    prims = ("ksh_hash", "pack_bits", "binary_attention") if hashed else ("binary_attention",)
    ref_kernels = Kernels("torch", prims)

    def setup(r):
        anchors = r.randn(h, ANCHORS, D)
        # for unit x and anchors in d = 64, ||x - a||^2 ~ 2 and sigma ~ 2, so K ~ exp(-1/2): centre there
        return {"anchors": anchors / anchors.norm(dim=-1, keepdim=True), "mu": math.exp(-0.5) + 0.01 * r.randn(h, ANCHORS),
                "proj": r.randn(h, nb, ANCHORS)}

    def inputs(r):
        s = {name: r.randn(b, h, n, D, dtype=DTYPES[dt]) for name in ("q", "k", "v")}
        if not hashed:
            with effkern.backend("torch"):
                s["qc"], s["kc"] = (bh.pack_bits(ksh_hash(s[x], r.c["anchors"], r.c["mu"], r.c["proj"])) for x in "qk")
        return s

    def attention(s, kk, qc, kc):
        return kk.binary_attention(q_codes=qc, k_codes=kc, v=s["v"], nbits=nb, form=form)

    if hashed:
        def kernel(s, kk):
            yq, yk = (kk.ksh_hash(x=s[x], anchors=s["anchors"], mu=s["mu"], proj=s["proj"]) for x in "qk")
            qc, kc = kk.pack_bits(h=yq), kk.pack_bits(h=yk)
            return yq, yk, qc, kc, attention(s, kk, qc, kc)

        def call(s):
            yq, yk = (ksh_hash(s[x], s["anchors"], s["mu"], s["proj"]) for x in "qk")
            qc, kc = bh.pack_bits(yq), bh.pack_bits(yk)
            return yq, yk, qc, kc, binary_attention(qc, kc, s["v"], nbits=nb, form=form)

        nbytes = 4 * out_bytes + 4 * (h * ANCHORS * D + h * ANCHORS + h * nb * ANCHORS)
        ref_note = "torch linear ref: the torch backend's ksh_hash x2, pack_bits x2, binary_attention"
    else:
        kernel = lambda s, kk: attention(s, kk, s["qc"], s["kc"])  # noqa: E731
        call = lambda s: binary_attention(s["qc"], s["kc"], s["v"], nbits=nb, form=form)  # noqa: E731
        nbytes = 2 * b * h * n * w * 4 + 2 * out_bytes
        ref_note = "torch linear ref: the torch backend's binary_attention on the same codes"
    check = compare_hash if hashed else compare_out
    target = (Target(f"op >={SPEEDUP_TARGETS[n]:.0f}x SDPA", op_speedup=SPEEDUP_TARGETS[n]) if hashed
              else Target(">=70% BW", bw=0.70)) if n in SPEEDUP_TARGETS or not hashed else None
    return Case(op, model, b, f"{b}x{h}x{n}x{D} b{nb} {form}", dt, dt, inputs, kernel=kernel, call=call, setup=setup,
                kernels=prims, bytes=nbytes, check=check, targets={SDPA: target} if target else {},
                baselines=[Baseline(SDPA, lambda s: sdpa(s["q"], s["k"], s["v"]), 4 * out_bytes,
                                    flops=4 * b * h * n * n * D, gpu_only=True, variants=sdpa_variants(),
                                    note="SDPA best: softmax attention on the same q, k, v, the fastest of the "
                                         "cuDNN, flash and memory-efficient backends; not the same function"),
                           Baseline("torch linear ref", lambda s: kernel(s, ref_kernels), nbytes, note=ref_note,
                                    check=check)])


def cases(check: bool = False, quick: bool = False) -> list[Case]:
    """Per op: both forms x DeiT-S/B x N, 16-bit codes, then 32 and 64 bits at one shape
    (--quick: H = 6, N >= 785, ecoformer, 16 bits). The self-check: batch 2, <= 2 heads,
    N <= 197, and 16-bit codes at N = 37 too (--quick: 16 bits, and 64 bits ecoformer)."""
    specs = [spec for op in ("binary_attention", "hash_attention") for spec in
             [(op, m, h, n, 16, form) for form, (m, h), n in itertools.product(bh.FORMS, MODELS, SEQ_LENS)]
             + [(op, *EXTRA[:3], nb, form) for form, nb in itertools.product(bh.FORMS, EXTRA[3])]]
    if not check:
        return [case(op, m, BATCH, h, n, nb, form) for op, m, h, n, nb, form in specs
                if not quick or (h == 6 and n in SPEEDUP_TARGETS and nb == 16 and form == "ecoformer")]
    small = [(op, min(h, 2), min(n, 197), nb, form) for op, m, h, n, nb, form in specs
             if not quick or nb == 16 or (nb == 64 and form == "ecoformer")]
    small += [] if quick else [(op, h, 37, nb, form) for op, h, n, nb, form in small if nb == 16]
    return [case(op, "small", 2, h, n, nb, form) for op, h, n, nb, form in small]


if __name__ == "__main__":
    sys.exit(main("binary_hash"))
