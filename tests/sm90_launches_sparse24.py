"""Representative launches of effkern.triton.sparse24, for tests/test_triton_compile_sm90.py (which
records them and compiles each for sm_90): every output dtype and activation, per-tensor and
per-channel output scales, split-K at small M, at small and large M."""

import torch

MODULE = "effkern.triton.sparse24"


def launch_all(T, g):
    from effkern.ops.sparse24 import Sparse24Weight

    w = Sparse24Weight.from_float(torch.randn(384, 768, generator=g))
    for rows in (1, 48, 197 * 4):
        x = torch.randint(-128, 128, (rows, 768), generator=g).to(torch.int8)
        xs = torch.rand(rows, generator=g) * 1e-2 + 1e-3
        fbias = torch.randn(384, generator=g)
        args = (x, w.values, w.meta, w.scale)
        T.sparse24_int8_linear_rows(*args, torch.randint(-1000, 1000, (384,), generator=g).to(torch.int32), xs, None,
                                    768, torch.int32, None)
        for inv in (torch.full((1,), 20.0), torch.rand(384, generator=g) * 40 + 10):
            T.sparse24_int8_linear_rows(*args, fbias, xs, inv, 768, torch.int8, "gelu")
        for dtype, act in ((torch.bfloat16, "gelu"), (torch.float16, "relu"), (torch.float32, None)):
            T.sparse24_int8_linear_rows(*args, fbias, xs, None, 768, dtype, act)
