"""Representative launches of effkern.triton.shift, for tests/test_triton_compile_sm90.py (which
records them and compiles each for sm_90): both code forms, the three float dtypes, the
requantised and int32 int8 paths (host and device constants), DeepShift's integer kernel, at
small and large M."""

import torch

MODULE = "effkern.triton.shift"


def launch_all(T, g):
    def weight(n, k, bits):
        cols = k if bits == 5 else 32 * -(-k // 64)
        hi = 32 if bits == 5 else 256
        return (torch.randint(0, hi, (n, cols), generator=g).to(torch.uint8),
                torch.randint(-14, -6, (n,), generator=g).to(torch.int32))

    for rows in (1, 48, 197 * 4):
        for bits in (4, 5):
            codes, base = weight(384, 384, bits)
            for dtype in (torch.bfloat16, torch.float16, torch.float32):
                x = torch.randn(rows, 384, generator=g).to(dtype)
                T.shift_linear_rows(x, codes, base, torch.randn(384, generator=g).to(dtype), 384, bits)
            T.deepshift_linear_rows(torch.randint(-2**20, 2**20, (rows, 384), generator=g).to(torch.int32),
                                    codes, base, None, 384, bits)
        codes, base = weight(384, 384, 4)
        x = torch.randint(-128, 128, (rows, 384), generator=g).to(torch.int8)
        bias = torch.randint(-1000, 1000, (384,), generator=g).to(torch.int32)
        m = torch.full((1,), 2**30 + 12345, dtype=torch.int64)
        T.shift_linear_int8_rows(x, codes, base, bias, m, torch.full((1,), 40, dtype=torch.int64), 384, 8)
        T.shift_linear_int8_rows(x, codes, base, bias, m.expand(384).contiguous(),
                                 40 - base.to(torch.int64), 384, 8)  # the op's per-column e - base
        T.shift_linear_int8_rows(x, codes, base, None, None, None, 384, 32)
    x = torch.randn(33, 100, generator=g).to(torch.bfloat16)  # odd shapes
    codes, base = weight(17, 100, 4)
    T.shift_linear_rows(x, codes, base, None, 100, 4)
