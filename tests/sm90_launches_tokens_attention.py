"""Representative launches of every kernel of effkern.triton.tokens_attention, for the sm_90
compile test (tests/test_triton_compile_sm90.py): ``launch_all(T, g)`` calls each host wrapper of
module T (whose ``*_kernel`` functions have been replaced by recorders) so that every constexpr
specialisation is recorded: dtypes, softmax on/off, class_token on/off, one-pass and chunked
rows, one and several metric chunks, and the block sizes that the shapes select. Nothing is
launched, so the large tensors are left uninitialised."""

import torch

MODULE = "effkern.triton.tokens_attention"

FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def launch_all(T, g: torch.Generator) -> None:
    def randn(*shape, dtype=torch.float32):
        return torch.randn(shape, generator=g).to(dtype)

    for dtype in FLOATS:
        # cls_attention: d in {32, 64, 128, 17} (BLOCK_D, BLOCK_N); N = 1 (one small chunk),
        # 197 / 785 (several chunks), 5000 (more chunks than one STAT_BLOCK); H = 1 .. 12
        # (BLOCK_H of the head-mean kernel).
        for b, h, n, d in ((2, 12, 197, 64), (2, 3, 785, 32), (1, 2, 1, 128), (1, 6, 197, 17), (1, 1, 5000, 64)):
            q, k = randn(b, h, d, dtype=dtype), torch.empty((b, h, n, d), dtype=dtype)
            for softmax in (True, False):
                T.cls_attention_fwd(q, k, d ** -0.5, softmax)
                T.cls_attention_bwd(randn(b, n), q, k, d ** -0.5, softmax)

        # masked_softmax: short rows packed several per program (N = 3, 197), rows of one full
        # block (N = 4096) and chunked rows (N = 4097); policy in fp32 (what the op passes) and
        # in the logits' dtype.
        # The benchmark's sequence lengths (bench/tokens.py: N = 197 and 785, 6 heads) are
        # read at their own shapes below.
        for n in (3, 197, 4096, 4097):
            x = torch.empty((1, 1, n, n), dtype=dtype)
            for pdtype in {torch.float32, dtype}:
                policy = torch.ones((1, n), dtype=pdtype)
                T.masked_softmax_fwd(x, policy, 1e-6)
                T.masked_softmax_bwd(torch.empty_like(x), x, policy, 1e-6)

        for b, h, n in ((64, 6, 197), (2, 6, 785)):
            x = torch.empty((b, h, n, n), dtype=dtype)
            policy = torch.ones((b, n), dtype=torch.float32)
            T.masked_softmax_fwd(x, policy, 1e-6)
            T.masked_softmax_bwd(torch.empty_like(x), x, policy, 1e-6)

        # tome_match: metric widths of one chunk (C = 16, 17) or several (C = 64, 300, 1024);
        # row blocks of 16 (N = 5), 32 x 16 (N = 33) and 32 x 64 (N = 197); class_token both ways;
        # and with the distillation token.
        for b, n, c in ((2, 197, 64), (1, 5, 17), (1, 5, 16), (1, 33, 300), (1, 197, 1024)):
            for class_token in (True, False):
                T.tome_match(randn(b, n, c, dtype=dtype), class_token)
        T.tome_match(randn(2, 198, 64, dtype=dtype), True, True)  # a distillation token (DeiT)
