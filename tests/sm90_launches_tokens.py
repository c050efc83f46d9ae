"""Representative launches of :mod:`effkern.triton.tokens` for the sm_90 compile test
(tests/test_triton_compile_sm90.py): ``launch_all(T, g)`` calls every host function of T once
per constexpr specialisation (dtype, index dtype, add, size / grad_size present, keep_cls,
narrow and wide C, short and long rows) on CPU tensors drawn from generator g. The kernels are
recorders there, so nothing runs; outputs stay unwritten."""

import torch

MODULE = "effkern.triton.tokens"

FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def _plan(idx: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """scatter_plan without importing effkern.ops (same result)."""
    b = idx.shape[0]
    sorted_idx, order = torch.sort(idx.to(torch.int64), dim=1, stable=True)
    bounds = torch.arange(n + 1, dtype=torch.int64).expand(b, n + 1).contiguous()
    return order, torch.searchsorted(sorted_idx.contiguous(), bounds)


def launch_all(T, g: torch.Generator) -> None:
    def randn(*shape, dtype=torch.float32):
        return torch.randn(shape, generator=g).to(dtype)

    def randint(lo, hi, shape, dtype=torch.int64):
        return torch.randint(lo, hi, shape, generator=g).to(dtype)

    # (B, N, C, K): ViT-S tokens (C = 384, a multiple of 16: vectorised rows), an odd C, a big
    # C-block, and a one-column case.
    shapes = [(4, 197, 384, 137), (2, 50, 67, 31), (1, 785, 768, 600), (3, 5, 1, 4)]
    for dtype in FLOATS:
        for idx_dtype in (torch.int64, torch.int32):
            for b, n, c, k in shapes:
                x = randn(b, n, c, dtype=dtype)
                idx = randint(-1, n + 1, (b, k), idx_dtype)
                T.gather_rows(x, idx)
                order, starts = _plan(idx, n)
                y = randn(b, k, c, dtype=dtype)
                for add in (False, True):
                    T.scatter_rows(x, y, idx, order, starts, add)
                T.weighted_sum_rows(x, randn(b, n, dtype=dtype), idx)
        T.weighted_sum_rows(randn(2, 197, 384, dtype=dtype), randn(2, 197), randint(0, 197, (2, 60)))
        # topk_rank: short and long rows, both keep_cls values
        for m, k in ((196, 137), (3136, 2000), (5, 4)):
            scores = randn(3, m, dtype=dtype)
            for keep_cls in (False, True):
                T.topk_rank(scores, k, keep_cls)
        # ToMe merge / its gradient: with and without sizes (and grad_size), narrow and wide C
        for b, n, c, m in ((2, 197, 384, 120), (1, 50, 67, 30), (2, 9, 1, 5)):
            x = randn(b, n, c, dtype=dtype)
            dest = randint(0, m, (b, n))
            sources, starts = _plan(dest, m)
            size = randn(b, n).abs() + 1
            for sz in (None, size):
                out, size_out = T.segment_mean_rows(x, sz, dest, sources, starts)
                out, size_out = randn(b, m, c, dtype=dtype), randn(b, m).abs() + 1
                grad = randn(b, m, c, dtype=dtype)
                for gs in (None, randn(b, m)):
                    T.segment_mean_rows_bwd(grad, gs, x, sz, out, size_out, dest)
