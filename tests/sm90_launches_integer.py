"""Representative launches of every kernel in effkern.triton.integer, for
tests/test_triton_compile_sm90.py (which records them and compiles each for sm_90)."""

import torch

MODULE = "effkern.triton.integer"


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
    T.int_gelu_rows(ints((3, 64), torch.int8), -(2**29), 23, 8)  # DIV32=False: int64 division
    for dtype, bits in ((torch.int32, 8), (torch.int16, 16), (torch.int8, 32)):
        T.requantize_rows(ints((7, 1536), dtype), ints((1536,), torch.int64, 2**30, 2**31), ints((1536,), torch.int64, 0, 70), bits)
