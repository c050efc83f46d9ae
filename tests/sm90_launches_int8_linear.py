"""Representative launches of effkern.triton.int8_linear, for tests/test_triton_compile_sm90.py
(which records them and compiles each for sm_90), and the benchmark shapes of bench/integer.py
(ViT-S / ViT-B qkv, proj, fc1, fc2 at batch 1 and 64, M = B * 197) for the static read:
    python /work/tools/kstat.py triton tests.sm90_launches_int8_linear
(kstat is a session tool; the repo's static report reads the same file)."""

import torch

MODULE = "effkern.triton.int8_linear"

# (K, N) of qkv, proj, fc1, fc2: bench/integer.py's LINEAR_KN
BENCH_KN = ((384, 1152), (384, 384), (384, 1536), (1536, 384), (768, 2304), (768, 768), (768, 3072), (3072, 768))


def launch_all(T, g):
    def ints(shape, dtype, lo=-100, hi=100):
        return torch.randint(lo, hi, shape, generator=g).to(dtype)

    def scales(cols):
        return ints((cols,), torch.int64, 2**30, 2**31), ints((cols,), torch.int64, 36, 48)

    w = ints((384, 384), torch.int8)
    m, e = scales(384)
    for rows in (197 * 4, 48, 1):
        T.int8_linear_rows(ints((rows, 384), torch.int8), w, ints((384,), torch.int32), m, e, 8)
        T.int8_linear_rows(ints((rows, 384), torch.int8), w, None, None, None, 32)
    T.int8_linear_rows(ints((33, 100), torch.int8), ints((17, 100), torch.int8), None, m[:17], e[:17], 16)
    # the benchmark shapes, as the op calls them (per-column in_scale: per-column constants on
    # the host, 32-bit epilogue), plus per-tensor constants, 16-bit output, and the kernel-decided
    # (device constants) epilogue at the ViT-S qkv shapes
    for b in (1, 64):
        for k, n in BENCH_KN:
            x, w, bias = ints((b * 197, k), torch.int8), ints((n, k), torch.int8), ints((n,), torch.int32)
            T.int8_linear_rows(x, w, bias, *scales(n), 8)
            T.int8_linear_rows(x, w, bias, *scales(1), 8)
            if (k, n) == (384, 1152):
                T.int8_linear_rows(x, w, bias, *scales(n), 16)
                T.int8_linear_rows(x, w, None, None, None, 32)
                T.int8_linear_rows(x, w, bias, *scales(n), 8, host_epilogue=False)
                T.int8_linear_rows(x, w, bias, *scales(1), 8, host_epilogue=False)
    x, w = ints((33, 768), torch.int8), ints((3072, 768), torch.int8)  # tiny M, split-K
    T.int8_linear_rows(x, w, ints((3072,), torch.int32), *scales(3072), 16)
