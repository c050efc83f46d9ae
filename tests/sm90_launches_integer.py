"""Representative launches of every kernel in effkern.triton.integer, for
tests/test_triton_compile_sm90.py (which records them and compiles each for sm_90) and the
static read: the edge configurations (dtypes, one-pass and chunked rows, the int64 fallbacks),
then the benchmark shapes of bench/integer.py (batch 64; nothing is launched, so those large
tensors are left uninitialised)."""

import torch

MODULE = "effkern.triton.integer"

BENCH_ROWS = 64 * 197  # batch 64 of 197 tokens (the softmax's rows, B * H * N, only need >= 16)


def launch_all(T, g):
    def ints(shape, dtype, lo=-100, hi=100):
        return torch.randint(lo, hi, shape, generator=g).to(dtype)

    for dtype in (torch.int8, torch.int16, torch.int32):
        T.int_softmax_rows(ints((5, 197), dtype), -20, 15, 8)
        T.int_softmax_rows(ints((2, 5000), dtype), -20, 15, 16)
    T.int_softmax_rows(ints((2, 64), torch.int8), -(2**16) + 1, 15, 8)  # the largest x0 allowed
    for dtype in (torch.int8, torch.int16):
        T.int_gelu_rows(ints((5, 1536), dtype), -8, 23, 8)
        T.int_gelu_rows(ints((2, 5000), dtype), -8, 23, 16)
        T.int_layernorm_rows(ints((5, 768), dtype), ints((768,), torch.int32), 10)
        T.int_layernorm_rows(ints((2, 5000), dtype), ints((5000,), torch.int32), 10)
    T.int_gelu_rows(ints((3, 64), torch.int8), -(2**29), 23, 8)  # E32=False: the int64 path
    for dtype, bits in ((torch.int32, 8), (torch.int16, 16), (torch.int8, 32)):
        m, e = ints((1536,), torch.int64, 2**30, 2**31), ints((1536,), torch.int64, 0, 70)
        T.requantize_rows(ints((7, 1536), dtype), m, e, bits)  # the host picks the int64 epilogue
        T.requantize_rows(ints((7, 1536), dtype), m, e, bits, host_epilogue=False)  # both, per tile
        T.requantize_rows(ints((7, 1536), dtype), m[:1], e[:1].clamp(33, 62), bits)  # per tensor, 32-bit

    # bench/integer.py: softmax over N = 197 / 785 logits (int8 at scale 0.08: x0 = -13; int16
    # at 0.0005: x0 = -2000; n = 15, 8-bit out), GELU over 4C = 1536 / 3072 (x0 = floor(-1 /
    # (1.702 * 0.05)) = -12, n = 23), LayerNorm over C = 384 / 768, requantize int32 -> int8 at
    # C = 1536.
    empty = torch.empty
    for n_tok in (197, 785):
        T.int_softmax_rows(empty((BENCH_ROWS, n_tok), dtype=torch.int8), -13, 15, 8)
        T.int_softmax_rows(empty((BENCH_ROWS, n_tok), dtype=torch.int16), -2000, 15, 8)
    for c in (384, 768):
        T.int_gelu_rows(empty((BENCH_ROWS, 4 * c), dtype=torch.int8), -12, 23, 8)
        T.int_layernorm_rows(empty((BENCH_ROWS, c), dtype=torch.int8), empty((c,), dtype=torch.int32), 10)
    T.requantize_rows(empty((BENCH_ROWS, 1536), dtype=torch.int32), torch.full((1536,), 2**30 + 12345),
                      torch.full((1536,), 44), 8)  # host constants in the 32-bit range, as the op has them
