"""Binary-hash additive attention (EcoFormer / ShiftAddViT) against flash attention: B = 64, H = 6 (DeiT-S)
and 12 (DeiT-B), head dim 64, N = 197, 785, 3136 and 12544 (224 and 448 px at patch 16 and 4: ViT and
PVT-style stages), bf16, both forms (ecoformer {-1, +1} codes, shiftadd {0, 1} codes), 16-bit codes (32
and 64 at H = 12, N = 3136); KSH hash with 64 anchors per head.

*binary_attention* is the linear attention alone on packed codes (kernel µs: the backend kernel; op µs:
the public op). *hash_attention* is the inference path from q, k, v: `ksh_codes` (the fused KSH hash
and bit packing) of q and of k, then `binary_attention` (kernel µs: the backend's kernels in a row; op
µs: the public ops). *hash_attention.unfused* is the same path with `ksh_hash` then `pack_bits` (y
written and read back: what the fusion saves); *hash_attention.train* the trainable path's forward
(`binary_hash_attention`: `ksh_hash` of q and k, kept for the backward, then `hashed_attention`).
Outputs are compared with the torch backend within the bf16 tolerance (plus 1e-3 of max |out|); code
bits equal except where the reference hash |y| is within 1e-4 of max |y| of zero, the output compared
in the (batch, head) slices whose codes agree. *GB/s* counts the floor:
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
Y_TIE = 1e-4  # |y| < Y_TIE max|y|: the code bit may flip between backends
compare_out = close(atol_of_max=1e-3)
ksh_hash, ksh_codes, binary_attention = no_validate(bh.ksh_hash), no_validate(bh.ksh_codes), no_validate(bh.binary_attention)


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


def compare_hash(got, ref, s: dict | None = None, **_) -> tuple[bool, str]:
    """(q codes, k codes, out): code bits equal except where the reference hash y (the torch
    backend's, from ``s``; without ``s`` every bit must agree) is within Y_TIE of max |y| of zero;
    out within tolerance in the (batch, head) slices whose codes all agree."""
    if not isinstance(got, (tuple, list)) or len(got) != 3:
        return False, f"expected (q_codes, k_codes, out), got {type(got).__name__}"
    notes, differ = [], torch.zeros(ref[2].shape[:2], dtype=torch.bool, device=ref[2].device)
    for name, gc, rc, x in (("q codes", got[0], ref[0], "q"), ("k codes", got[1], ref[1], "k")):
        if gc.shape != rc.shape or gc.dtype != rc.dtype:
            notes.append(f"{name}: got {tuple(gc.shape)} {gc.dtype}, expected {tuple(rc.shape)} {rc.dtype}")
            continue
        nbits = 32 * rc.shape[-1] if s is None else s["proj"].shape[1]
        flips = bh.unpack_codes(gc, nbits, False, torch.int8) != bh.unpack_codes(rc, nbits, False, torch.int8)
        tie = torch.zeros_like(flips)
        if s is not None and flips.any():
            y = bh.ksh_hash_fwd(s[x], s["anchors"], s["mu"], s["proj"])
            tie = y.abs() < Y_TIE * float(y.abs().max())
        if bool((flips & ~tie).any()):
            notes.append(f"{name}: {int((flips & ~tie).sum())} bits differ away from a near-zero y")
        differ |= flips.flatten(2).any(-1)  # [B, H]
    if got[2].shape != ref[2].shape:
        notes.append(f"out: got {tuple(got[2].shape)}, expected {tuple(ref[2].shape)}")
    else:
        notes.append(mismatch("out", got[2][~differ], ref[2][~differ], atol_of_max=1e-3))
    ok = not any(notes)
    if bool(differ.any()):
        notes.append(f"(codes differ at near-zero y in {int(differ.sum())} (batch, head) slices; out not compared there)")
    return ok, "; ".join(n for n in notes if n)


# hash_attention's three paths from q, k, v: the backend kernels each calls
HASH_PATHS = {"hash_attention": ("ksh_codes", "binary_attention"),
              "hash_attention.unfused": ("ksh_hash", "pack_bits", "binary_attention"),
              "hash_attention.train": ("ksh_hash", "hashed_attention")}


def compare_train(got, ref, s: dict | None = None, **kw) -> tuple[bool, str]:
    """(y_q, y_k, out) of the trainable path, compared as their packed codes and out."""
    if not isinstance(got, (tuple, list)) or len(got) != 3:
        return False, f"expected (y_q, y_k, out), got {type(got).__name__}"
    return compare_hash((bh.pack_codes(got[0]), bh.pack_codes(got[1]), got[2]),
                        (bh.pack_codes(ref[0]), bh.pack_codes(ref[1]), ref[2]), s)


def case(op, model, b, h, n, nb, form, dt="bf16") -> Case:
    es, w, hashed = DTYPES[dt].itemsize, bh.num_words(nb), op.startswith("hash_attention")
    out_bytes = b * h * n * D * es
    prims = HASH_PATHS.get(op, ("binary_attention",))
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
                s["qc"], s["kc"] = (ksh_codes(s[x], r.c["anchors"], r.c["mu"], r.c["proj"]) for x in "qk")
        return s

    def attention(s, kk, qc, kc):
        return kk.binary_attention(q_codes=qc, k_codes=kc, v=s["v"], nbits=nb, form=form)

    if op == "hash_attention":
        def kernel(s, kk):  # the fused hash-and-pack (y never written), then the attention
            qc, kc = (kk.ksh_codes(x=s[x], anchors=s["anchors"], mu=s["mu"], proj=s["proj"]) for x in "qk")
            return qc, kc, attention(s, kk, qc, kc)

        def call(s):
            qc, kc = (ksh_codes(s[x], s["anchors"], s["mu"], s["proj"]) for x in "qk")
            return qc, kc, binary_attention(qc, kc, s["v"], nbits=nb, form=form)
    elif op == "hash_attention.unfused":  # the hash's y written and read back: what the fusion saves
        def kernel(s, kk):
            qc, kc = (kk.pack_bits(h=kk.ksh_hash(x=s[x], anchors=s["anchors"], mu=s["mu"], proj=s["proj"]))
                      for x in "qk")
            return qc, kc, attention(s, kk, qc, kc)

        def call(s):
            qc, kc = (bh.pack_bits(ksh_hash(s[x], s["anchors"], s["mu"], s["proj"])) for x in "qk")
            return qc, kc, binary_attention(qc, kc, s["v"], nbits=nb, form=form)
    elif op == "hash_attention.train":  # binary_hash_attention's forward: y kept for the backward
        def kernel(s, kk):
            yq, yk = (kk.ksh_hash(x=s[x], anchors=s["anchors"], mu=s["mu"], proj=s["proj"]) for x in "qk")
            return yq, yk, kk.hashed_attention(y_q=yq, y_k=yk, v=s["v"], form=form)

        def call(s):  # binary_hash_attention's own calls, its y returned too (for the comparison)
            yq, yk = (ksh_hash(s[x], s["anchors"], s["mu"], s["proj"]) for x in "qk")
            return yq, yk, torch.ops.effkern.hashed_attention(yq, yk, s["v"], form)
    if hashed:
        nbytes = 4 * out_bytes + 4 * (h * ANCHORS * D + h * ANCHORS + h * nb * ANCHORS)
        ref_note = f"torch linear ref: the torch backend's {' + '.join(prims)} kernels"
    else:
        kernel = lambda s, kk: attention(s, kk, s["qc"], s["kc"])  # noqa: E731
        call = lambda s: binary_attention(s["qc"], s["kc"], s["v"], nbits=nb, form=form)  # noqa: E731
        nbytes = 2 * b * h * n * w * 4 + 2 * out_bytes
        ref_note = "torch linear ref: the torch backend's binary_attention on the same codes"
    check = compare_train if op == "hash_attention.train" else compare_hash if hashed else compare_out
    target = (Target(f"op >={SPEEDUP_TARGETS[n]:.0f}x SDPA", op_speedup=SPEEDUP_TARGETS[n]) if op == "hash_attention"
              else Target(">=70% BW", bw=0.70)) if (n in SPEEDUP_TARGETS and hashed) or op == "binary_attention" else None
    return Case(op, model, b, f"{b}x{h}x{n}x{D} b{nb} {form}", dt, dt, inputs, kernel=kernel, call=call, setup=setup,
                kernels=prims, bytes=nbytes, check=check, targets={SDPA: target} if target else {},
                baselines=[Baseline(SDPA, lambda s: sdpa(s["q"], s["k"], s["v"]), 4 * out_bytes,
                                    flops=4 * b * h * n * n * D, gpu_only=True, variants=sdpa_variants(),
                                    note="SDPA best: softmax attention on the same q, k, v, the fastest of the "
                                         "cuDNN, flash and memory-efficient backends; not the same function"),
                           Baseline("torch linear ref", lambda s: kernel(s, ref_kernels), nbytes, note=ref_note,
                                    check=check)])


def cases(check: bool = False, quick: bool = False) -> list[Case]:
    """Per op: both forms x DeiT-S/B x N, 16-bit codes, then 32 and 64 bits at one shape; the
    unfused and trainable hash paths at DeiT-S, N >= 785 (--quick: the first two ops at H = 6,
    N >= 785, ecoformer, 16 bits). The self-check: batch 2, <= 2 heads,
    N <= 197, and 16-bit codes at N = 37 too (--quick: 16 bits, and 64 bits ecoformer)."""
    specs = [spec for op in ("binary_attention", "hash_attention") for spec in
             [(op, m, h, n, 16, form) for form, (m, h), n in itertools.product(bh.FORMS, MODELS, SEQ_LENS)]
             + [(op, *EXTRA[:3], nb, form) for form, nb in itertools.product(bh.FORMS, EXTRA[3])]]
    # the other two paths from q, k, v (not in --quick): at DeiT-S, ecoformer, 16 bits, the target N
    specs += [(op, *MODELS[0], n, 16, "ecoformer") for op in list(HASH_PATHS)[1:] for n in SPEEDUP_TARGETS]
    if not check:
        return [case(op, m, BATCH, h, n, nb, form) for op, m, h, n, nb, form in specs
                if not quick or (op in ("binary_attention", "hash_attention") and h == 6 and n in SPEEDUP_TARGETS
                                 and nb == 16 and form == "ecoformer")]
    small = [(op, min(h, 2), min(n, 197), nb, form) for op, m, h, n, nb, form in specs
             if not quick or (op in ("binary_attention", "hash_attention") and (nb == 16 or (nb == 64 and form == "ecoformer")))]
    small = list(dict.fromkeys(small))  # the paths' N all shrink to 197
    small += [] if quick else [(op, h, 37, nb, form) for op, h, n, nb, form in small if nb == 16]
    return [case(op, "small", 2, h, n, nb, form) for op, h, n, nb, form in small]


if __name__ == "__main__":
    sys.exit(main("binary_hash"))
