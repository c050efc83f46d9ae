"""Representative launches of effkern.triton.int8_linear, for tests/test_triton_compile_sm90.py
(which records them and compiles each for sm_90)."""

import torch

MODULE = "effkern.triton.int8_linear"


def launch_all(T, g):
    def ints(shape, dtype, lo=-100, hi=100):
        return torch.randint(lo, hi, shape, generator=g).to(dtype)

    w = ints((384, 384), torch.int8)
    m, e = ints((384,), torch.int64, 2**30, 2**31), ints((384,), torch.int64, 20, 40)
    for rows in (197 * 4, 48, 1):
        T.int8_linear_rows(ints((rows, 384), torch.int8), w, ints((384,), torch.int32), m, e, 8)
        T.int8_linear_rows(ints((rows, 384), torch.int8), w, None, None, None, 32)
    T.int8_linear_rows(ints((33, 100), torch.int8), ints((17, 100), torch.int8), None, m[:17], e[:17], 16)
