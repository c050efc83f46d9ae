"""Sparse token ops (EViT, DynamicViT, IdleViT, ToMe) on DeiT-S (C=384, H=6), DeiT-B (768, 12) and ViT-L
(1024, 16), N = 197 tokens (224 px / 16) and 785 (448 px; ViT-L/14 at 392 px), head dim 64, batch 1, 64
and 256, bf16 (and fp32 for two gather cases). Kept tokens K = ceil(0.7 N) (0.49 and 0.343, EViT's later
stages, at batch 64 for N = 197); ToMe's r = 16 at N = 197, 64 at 785.

*kernel µs* is the backend kernels' device time (CUDA-graph replay): token_scatter with its scatter
plan (sort + searchsorted), which every call pays; masked_softmax.fwd_bwd the forward then the backward
kernel; tome_match_merge ToMe's matching scores then the merge on a precomputed plan. *op µs* is the
public `effkern.ops` call without its validation pass, back-to-back calls with host overhead included
(tome_match_merge: `bipartite_matching` + `merge_tokens`; fwd_bwd: autograd). Outputs are compared with the torch backend exactly (row copies,
indices) or within the output dtype's tolerance. *GB/s* counts the minimal traffic (gather: K rows
read and written; scatter replace: the N - K surviving rows of x and the K rows of y read, N rows
written; add: x and y read, N written; cls_attention: k read once).

Baselines, on the same inputs: `torch.gather` and `x[arange, idx]`; `clone` + `scatter_` /
`scatter_add_` or `index_put_`; for cls_attention the eager `softmax(q_cls k^T)` and EViT's full
N x N attention; DynamicViT's `softmax_with_policy`; ToMe's `bipartite_soft_matching` + `merge_wavg`;
EViT's fuse (gather + weighted sum); `torch.topk` (EViT's call) and the equivalent stable `torch.sort`.
Every eager transcription of published code is also timed `torch.compile`d (default mode, static
shapes: "... compiled"; a compile failure is N/A with its reason).

Targets: token_gather and token_scatter at B >= 64: >= 85% of the bandwidth of a same-size copy and
>= 1.3x each torch baseline; cls_attention at B >= 64: >= 80% of that bandwidth; masked_softmax (fwd,
fwd+bwd) at B = 256, N = 197: >= 2x DynamicViT's code compiled; tome_match_merge there: op µs >= 2x
ToMe's code compiled.
"""

from __future__ import annotations

import itertools
import math
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` and `effkern` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import Tensor  # noqa: E402

import effkern  # noqa: E402
from effkern.ops import tokens as tokops  # noqa: E402

from bench.runner import Baseline, Case, Target, close, compiled, exact, main, mismatch, no_validate  # noqa: E402

TITLE = "Sparse token-op benchmark"
QUICK = "one case per op: DeiT-B, B=256, N=197"

MODELS = (("DeiT-S", 384, 6), ("DeiT-B", 768, 12), ("ViT-L", 1024, 16))  # name, width C, heads H
SEQ_LENS, BATCHES, RATIOS, D = (197, 785), (1, 64, 256), (0.7, 0.49, 0.343), 64
TOME_R = {197: 16, 785: 64}
EPS, TIE = 1e-6, 1e-5  # DynamicViT's eps; ToMe scores closer than TIE may rank either way
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
COPY_TARGET = Target(">=85% BW & >=1.3x", bw=0.85, speedup=1.3)
ops = {name: no_validate(getattr(effkern.ops, name)) for name in (
    "token_gather", "token_scatter", "fuse_tokens", "cls_attention", "masked_softmax", "topk_tokens")}

# ------------------------------------------------------------------- eager baselines (published code)


def dynamicvit_softmax_with_policy(attn: Tensor, policy: Tensor, eps: float = EPS) -> Tensor:
    """DynamicViT's ``Attention.softmax_with_policy`` (raoyongming/DynamicViT), policy [B, N, 1]."""
    b, n, _ = policy.size()
    attn_policy = policy.reshape(b, 1, 1, n)
    eye = torch.eye(n, dtype=attn_policy.dtype, device=attn_policy.device).view(1, 1, n, n)
    attn_policy = attn_policy + (1.0 - attn_policy) * eye
    max_att = torch.max(attn, dim=-1, keepdim=True)[0]
    attn = (attn - max_att).to(torch.float32).exp_() * attn_policy.to(torch.float32)
    attn = (attn + eps / n) / (attn.sum(dim=-1, keepdim=True) + eps)
    return attn.type_as(max_att)


def tome_eager(metric: Tensor, x: Tensor, size: Tensor, r: int) -> tuple[Tensor, Tensor]:
    """ToMe's ``bipartite_soft_matching`` (class token kept) then ``merge_wavg`` (tome/merge.py)."""
    r = min(r, (metric.shape[1] - 1) // 2)
    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True)
        scores = metric[..., ::2, :] @ metric[..., 1::2, :].transpose(-1, -2)
        scores[..., 0, :] = -math.inf
        node_max, node_idx = scores.max(dim=-1)
        edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
        unm_idx, src_idx = edge_idx[..., r:, :].sort(dim=1)[0], edge_idx[..., :r, :]
        dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)

    def merge(x: Tensor) -> Tensor:
        src, dst = x[..., ::2, :], x[..., 1::2, :]
        n, t1, c = src.shape
        unm = src.gather(dim=-2, index=unm_idx.expand(n, t1 - r, c))
        src = src.gather(dim=-2, index=src_idx.expand(n, r, c))
        return torch.cat([unm, dst.scatter_reduce(-2, dst_idx.expand(n, r, c), src, reduce="sum")], dim=1)

    x, size = merge(x * size), merge(size)
    return x / size, size


def evit_cls_full(q_all: Tensor, k: Tensor, scale: float) -> Tensor:
    """EViT: the attention probabilities of every query, then the CLS row's mean over heads."""
    return ((q_all @ k.transpose(-2, -1)) * scale).softmax(dim=-1)[:, :, 0, 1:].mean(dim=1)


def eager_cls(q: Tensor, k: Tensor, scale: float) -> Tensor:
    """The cheapest eager form: only the CLS query's logits, softmax in float32, head mean."""
    return torch.softmax(torch.matmul(q[:, :, None] * scale, k.transpose(-2, -1))[:, :, 0], -1, torch.float32).mean(1)


def evit_fuse(x: Tensor, weights: Tensor, idx: Tensor) -> Tensor:
    """EViT's fused token: gather the inattentive rows and their attention, weighted sum."""
    rows = torch.gather(x, 1, idx[..., None].expand(-1, -1, x.shape[-1]))
    return torch.sum(rows * torch.gather(weights, 1, idx)[..., None], dim=1, keepdim=True)


def sort_topk(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """topk_tokens(scores, k, keep_cls=True) in eager torch: stable sort, CLS first, drop sorted."""
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    return torch.cat([order.new_zeros(order.shape[0], 1), order[:, :k] + 1], 1), order[:, k:].sort(dim=1).values + 1


def eager_and_compiled(*eager: Baseline) -> list[Baseline]:
    """Each eager transcription, then its torch.compile'd twin (timed on the GPU only)."""
    return [b for bl in eager for b in (bl, compiled(bl))]


# ------------------------------------------------------------------- comparisons


def loose(got, ref) -> tuple[bool, str]:  # an eager bf16 computation against the op's float32 result
    return close(rtol=3e-2, atol_of_max=1e-2)(got.float(), ref)


eager_softmax = close(rtol=5e-2, atol_of_max=1e-3)  # DynamicViT subtracts the row max in bf16


def compare_tome(got, ref, s, level) -> tuple[bool, str]:
    """ToMe's plan is a discrete function of float scores: differences are accepted only in the
    batch rows whose reference scores have a near-tie (within TIE)."""
    m = s["metric"].float()
    m = m / m.norm(dim=-1, keepdim=True).clamp_min(tokops.NORM_EPS)
    scores = m[:, ::2] @ m[:, 1::2].transpose(1, 2)
    scores[:, 0] = -math.inf
    top2 = scores.topk(min(2, scores.shape[-1]), dim=-1).values
    arg_tie = ((top2[..., 0] - top2[..., -1]).abs() < TIE) & (top2.shape[-1] == 2)
    ranked = top2[..., 0].sort(dim=1, descending=True).values[:, : s["plan"].num_merged + 1]
    row_tie = arg_tie.any(1) | ((ranked[:, :-1] - ranked[:, 1:]).abs() < TIE).any(1)
    if level == "kernel":  # (node_max, node_idx, merged x, merged size) on the reference plan
        notes = [mismatch("node_max", got[0], ref[0]), mismatch("merged x", got[2], ref[2]),
                 mismatch("node_idx", got[1].masked_fill(arg_tie, 0), ref[1].masked_fill(arg_tie, 0), True),
                 mismatch("merged size", got[3], ref[3])]
        return not any(notes), "; ".join(n for n in notes if n)
    (gp, gx, gs), (rp, rx, rs) = got, ref
    if any(a.shape != b.shape for a, b in zip(gp, rp)):
        return False, "plan shapes differ"
    differ = torch.stack([(a != b).flatten(1).any(1) for a, b in zip(gp, rp)]).any(0)  # [B]
    if bool((differ & ~row_tie).any()):
        return False, f"plan differs in {int((differ & ~row_tie).sum())} batch rows without a near-tie"
    same = ~differ
    notes = [n for n in (mismatch("merged x", gx[same], rx[same]), mismatch("merged size", gs[same], rs[same])) if n]
    ok = not notes
    if bool(differ.any()):
        notes.append(f"(plan differs at near-ties in {int(differ.sum())} batch rows; not compared there)")
    return ok, "; ".join(notes)


# ------------------------------------------------------------------- cases


def kept(n: int, ratio: float) -> int:
    return math.ceil(ratio * n - 1e-9)


def gather(model, b, n, c, h, ratio, dt, es):
    k, nbytes = kept(n, ratio), 2 * b * kept(n, ratio) * c * es + b * kept(n, ratio) * 8

    def inputs(r):
        idx = r.perm(b, n)[:, :k].contiguous()
        return {"x": r.randn(b, n, c, dtype=DTYPES[dt]), "idx": idx, "idx_x": idx[..., None].expand(b, k, c)}

    return Case("token_gather", model, b, f"{b}x{n}x{c} k{k}", dt, dt, inputs, check=exact(), bytes=nbytes,
                setup=lambda r: {"ar": torch.arange(b, device=r.device)[:, None]},
                kernel=lambda s, kk: kk.token_gather(x=s["x"], idx=s["idx"]),
                call=lambda s: ops["token_gather"](s["x"], s["idx"]),
                baselines=[Baseline("torch.gather", lambda s: torch.gather(s["x"], 1, s["idx_x"]), nbytes, check=exact()),
                           Baseline("x[arange, idx]", lambda s: s["x"][s["ar"], s["idx"]], nbytes, check=exact())],
                targets={"*": COPY_TARGET} if b >= 64 else {})


def scatter(model, b, n, c, h, ratio, dt, es, add):
    k, reduce, chk = kept(n, ratio), "add" if add else "replace", close() if add else exact()
    nbytes = ((n if add else n - k) + k + n) * b * c * es + b * k * 8

    def inputs(r):
        idx = r.perm(b, n)[:, :k].contiguous()
        return {"x": r.randn(b, n, c, dtype=DTYPES[dt]), "y": r.randn(b, k, c, dtype=DTYPES[dt]), "idx": idx,
                "idx_x": idx[..., None].expand(b, k, c)}

    def kernel(s, kk):  # the plan is part of every call's cost (the op makes it each time)
        order, starts = tokops.scatter_plan(s["idx"], n)
        return kk.token_scatter(x=s["x"], y=s["y"], idx=s["idx"], order=order, starts=starts, add=add)

    scatter_ = (lambda s: s["x"].clone().scatter_add_(1, s["idx_x"], s["y"])) if add else (
        lambda s: s["x"].clone().scatter_(1, s["idx_x"], s["y"]))
    return Case(f"token_scatter.{reduce}", model, b, f"{b}x{n}x{c} k{k}", dt, dt, inputs, check=chk, bytes=nbytes,
                setup=lambda r: {"ar": torch.arange(b, device=r.device)[:, None]},
                kernel=kernel, call=lambda s: ops["token_scatter"](s["x"], s["y"], s["idx"], reduce=reduce),
                baselines=[Baseline("clone+scatter_add_" if add else "clone+scatter_", scatter_, nbytes, check=chk),
                           Baseline("clone+index_put_(acc)" if add else "clone+index_put_", lambda s: s["x"].clone()
                                    .index_put_((s["ar"], s["idx"]), s["y"], accumulate=add), nbytes, check=chk)],
                targets={"*": COPY_TARGET} if b >= 64 else {})


def cls(model, b, n, c, h, ratio, dt, es):
    scale, nbytes = D**-0.5, b * h * n * D * es + b * h * D * es + b * n * 4

    def inputs(r):
        q_all = r.randn(b, h, n, D, dtype=DTYPES[dt])
        return {"q_all": q_all, "q": q_all[:, :, 0].contiguous(), "k": r.randn(b, h, n, D, dtype=DTYPES[dt])}

    return Case("cls_attention", model, b, f"{b}x{h}x{n}x{D}", dt, "fp32", inputs, bytes=nbytes,
                kernel=lambda s, kk: kk.cls_attention(q=s["q"], k=s["k"], scale=scale, softmax=True),
                call=lambda s: ops["cls_attention"](s["q"], s["k"], scale=scale),
                baselines=eager_and_compiled(
                    Baseline("eager softmax(q_cls k^T)", lambda s: eager_cls(s["q"], s["k"], scale), nbytes, check=loose),
                    Baseline("EViT full attention", lambda s: evit_cls_full(s["q_all"], s["k"], scale),
                             2 * b * h * n * D * es + b * (n - 1) * es, check=lambda g, r: loose(g, r[:, 1:]),
                             note="EViT baseline: softmax(q k^T * scale) over all queries (the N x N map), "
                                  "[:, :, 0, 1:].mean(1), in bf16")),
                targets={"eager softmax(q_cls k^T)": Target(">=80% BW", bw=0.80)} if b >= 64 else {})


def masked(model, b, n, c, h, ratio, dt, es, bwd):
    numel = b * h * n * n
    nbytes = numel * es * (5 if bwd else 2) + b * n * 4 * (2 if bwd else 1)

    def inputs(r):
        policy = (r.rand(b, n) < 0.7).float()
        policy[:, 0] = 1.0  # the class token is always kept
        s = {"logits": (3.0 * r.randn(b, h, n, n)).to(DTYPES[dt]), "policy": policy}
        if bwd:
            s.update(grad=r.randn(b, h, n, n, dtype=DTYPES[dt]), logits_leaf=s["logits"].detach().clone().requires_grad_(),
                     policy_leaf=policy.clone().requires_grad_())
        return s

    def autograd(f, s):
        out = f(s["logits_leaf"], s["policy_leaf"])
        return (out.detach(),) + torch.autograd.grad(out, (s["logits_leaf"], s["policy_leaf"]), s["grad"])

    def kernel(s, kk):
        out = kk.masked_softmax(logits=s["logits"], policy=s["policy"], eps=EPS)
        if not bwd:
            return out
        return (out,) + tuple(kk.masked_softmax_backward(grad=s["grad"], logits=s["logits"], policy=s["policy"], eps=EPS))

    op, eager = (lambda a, p: ops["masked_softmax"](a, p, eps=EPS)), (lambda a, p: dynamicvit_softmax_with_policy(a, p[..., None]))
    baseline = (Baseline("eager DynamicViT fwd+bwd", lambda s: autograd(eager, s), nbytes,
                         check=lambda g, r: eager_softmax(g[0], r[0]),
                         note="masked_softmax fwd+bwd: kernel = forward then backward kernel; op and "
                              "baseline = autograd forward + torch.autograd.grad for logits and policy")
                if bwd else Baseline("eager DynamicViT", lambda s: eager(s["logits"], s["policy"]), nbytes,
                                     check=eager_softmax))
    return Case("masked_softmax.fwd_bwd" if bwd else "masked_softmax", model, b, f"{b}x{h}x{n}x{n}", dt, dt, inputs,
                kernel=kernel, kernels=("masked_softmax", "masked_softmax_backward") if bwd else (), bytes=nbytes,
                call=(lambda s: autograd(op, s)) if bwd else (lambda s: op(s["logits"], s["policy"])),
                check=close(atol_of_max=1e-5) if bwd else close(),  # d policy: sums of H x N terms of both signs
                baselines=eager_and_compiled(baseline),
                targets={compiled(baseline).name: Target(">=2x compiled", speedup=2.0)} if (b, n) == (256, 197) else {})


def tome(model, b, n, c, h, r_, dt, es):
    m = n - tokops._effective_r(n, r_, True)
    nbytes = b * n * (D + c + 1) * es + b * m * (c + 1) * es

    def inputs(r):
        s = {"metric": r.randn(b, n, D, dtype=DTYPES[dt]), "x": r.randn(b, n, c, dtype=DTYPES[dt]),
             "size": r.randint((b, n, 1), torch.int64, 1, 4).to(DTYPES[dt])}
        with effkern.backend("torch"):
            s["plan"] = effkern.ops.bipartite_matching(s["metric"], r_)
        return dict(s, size32=s["size"][..., 0].float())

    def kernel(s, kk):
        p = s["plan"]
        return tuple(kk.bipartite_matching(metric=s["metric"], class_token=True)) + tuple(
            kk.merge_tokens(x=s["x"], size=s["size32"], dest=p.dest, sources=p.sources, starts=p.starts))

    def call(s):
        plan = effkern.ops.bipartite_matching(s["metric"], r_)
        return (plan,) + effkern.ops.merge_tokens(plan, s["x"], s["size"])

    return Case("tome_match_merge", model, b, f"{b}x{n}x{c} r{r_}", dt, dt, inputs, kernel=kernel, call=call,
                kernels=("bipartite_matching", "merge_tokens"), bytes=nbytes, check=compare_tome,
                baselines=eager_and_compiled(
                    Baseline("eager ToMe", lambda s: tome_eager(s["metric"], s["x"], s["size"], r_), nbytes,
                             note="tome_match_merge: kernel = matching scores + merge kernels on a precomputed "
                                  "plan; op = bipartite_matching + merge_tokens (its target uses op µs)")),
                targets={"eager ToMe compiled": Target("op >=2x compiled", op_speedup=2.0)} if (b, n) == (256, 197)
                else {})


def fuse(model, b, n, c, h, ratio, dt, es):
    k = kept(n - 1, ratio)
    j = n - 1 - k

    def inputs(r):
        w = torch.softmax(r.randn(b, n), dim=1)
        idx = (r.perm(b, n - 1)[:, k:].sort(dim=1).values + 1).contiguous()  # EViT's dropped tokens
        return {"x": r.randn(b, n, c, dtype=DTYPES[dt]), "w": w, "w_lp": w.to(DTYPES[dt]), "idx": idx}

    return Case("fuse_tokens", model, b, f"{b}x{n}x{c} j{j}", dt, dt, inputs, bytes=b * j * (c * es + 12) + b * c * es,
                kernel=lambda s, kk: kk.fuse_tokens(x=s["x"], weights=s["w"], idx=s["idx"]),
                call=lambda s: ops["fuse_tokens"](s["x"], s["w"], s["idx"]),
                baselines=eager_and_compiled(
                    Baseline("eager EViT fuse", lambda s: evit_fuse(s["x"], s["w_lp"], s["idx"]),
                             b * j * (c * es + es + 8) + b * c * es, check=close(rtol=5e-2, atol_of_max=2e-2),
                             note="fuse_tokens baseline: EViT's gather + weighted sum, weights in the model dtype")))


def topk(model, b, n, c, h, ratio, dt, es):
    m, k = n - 1, kept(n - 1, ratio)
    nbytes = b * m * 4 + b * (m + 1) * 8
    return Case("topk_tokens", model, b, f"{b}x{m} k{k}", dt, "int64", lambda r: {"scores": r.rand(b, m)},
                kernel=lambda s, kk: kk.topk_tokens(scores=s["scores"], k=k, keep_cls=True),
                call=lambda s: ops["topk_tokens"](s["scores"], k), check=exact(), bytes=nbytes,
                baselines=[*eager_and_compiled(Baseline("torch.sort stable", lambda s: sort_topk(s["scores"], k), nbytes,
                                                        check=exact())),
                           Baseline("torch.topk", lambda s: torch.topk(s["scores"], k, dim=1), b * m * 4 + b * k * 12,
                                    note="torch.topk baseline: EViT's call, kept indices and values only (no CLS, "
                                         "no dropped list)")])


def cases(check: bool = False, quick: bool = False) -> list[Case]:
    """The cases in report order; --quick: B = 256, N = 197, DeiT-B, ratio 0.7 (where the targets
    apply). The self-check: batch 2, <= 2 heads; every width at N = 197 and ratio 0.7 in bf16, the
    rest at the narrowest width (--quick: N = 197, ratio 0.7 and the narrowest width only)."""
    names = {("ViT-L", 197): "ViT-L/16", ("ViT-L", 785): "ViT-L/14@392"}
    pairs = [(names.get((m, n), m if n == 197 else f"{m}@448"), c, h, n) for n in SEQ_LENS for m, c, h in MODELS]
    specs = [(gather, m, b, n, c, h, 0.7, "bf16", {}) for (m, c, h, n), b in itertools.product(pairs, BATCHES)]
    specs += [(gather, m, 64, n, c, h, ratio, "bf16", {}) for (m, c, h, n), ratio in itertools.product(pairs, RATIOS[1:])
              if n == 197]
    specs += [(gather, m, 64, n, c, h, 0.7, "fp32", {}) for m, c, h, n in pairs[:2]]
    specs += [(scatter, m, b, n, c, h, 0.7, "bf16", {"add": add}) for add in (False, True)
              for (m, c, h, n), b in itertools.product(pairs, BATCHES)]
    specs += [(cls, m, b, n, c, h, 0.0, "bf16", {}) for (m, c, h, n), b in itertools.product(pairs, BATCHES)]
    specs += [(masked, m, b, n, c, h, 0.0, "bf16", {"bwd": bwd}) for bwd in (False, True)
              for (m, c, h, n), b in itertools.product(pairs, (64, 256)) if n == 197]
    specs += [(tome, m, b, n, c, h, TOME_R[n], "bf16", {}) for (m, c, h, n), b in itertools.product(pairs, BATCHES)]
    specs += [(fuse, m, b, n, c, h, 0.7, "bf16", {}) for (m, c, h, n), b in itertools.product(pairs, (64, 256))]
    specs += [(topk, "-", b, n, 0, 0, 0.7, "fp32", {}) for n, b in itertools.product(SEQ_LENS, BATCHES)]
    out = []
    for f, m, b, n, c, h, ratio, dt, kw in specs:
        main_shape = n == 197 and ratio in (0.7, TOME_R[197], 0.0)
        if check:
            if not (main_shape and c in (0, 384) if quick else c in (0, 384) or (main_shape and dt == "bf16")):
                continue
            m, b, h = "small", 2, min(h, 2)
        elif quick and not (b == 256 and main_shape and m in ("DeiT-B", "-") and dt == ("fp32" if f is topk else "bf16")):
            continue
        out.append(f(m, b, n, c, h, ratio, dt, DTYPES[dt].itemsize, **kw))
    return out


if __name__ == "__main__":
    sys.exit(main("tokens"))
