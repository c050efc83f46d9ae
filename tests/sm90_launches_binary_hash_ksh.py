"""Representative launches of :mod:`effkern.triton.binary_hash_ksh` for the sm_90 compile test
(tests/test_triton_compile_sm90.py): ``launch_all(T, g)`` calls the host functions of T (hash,
fused hash-and-pack, backward) once per constexpr specialisation (x dtype, parameter dtype,
grad_y dtype, BLOCK_M 16 / 32 / 64, BLOCK_D 32 / 64 with one and several d chunks, BLOCK_B 32 / 64
with one and several b chunks), then at the benchmark shapes (bench/binary_hash.py), on
CPU tensors drawn from generator g. The kernels are recorders there, so nothing runs; outputs
stay unwritten (the torch arithmetic between launches runs on those garbage values)."""

import torch

MODULE = "effkern.triton.binary_hash_ksh"

FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def launch_all(T, g: torch.Generator) -> None:
    def randn(*shape, dtype=torch.float32):
        return torch.randn(shape, generator=g).to(dtype)

    # (B, H, N, d, m, b): EcoFormer-like (m = 25, b = 16, d = 64), small m / odd d, wide m and
    # several d chunks, many bits (several b chunks).
    shapes = [(2, 6, 197, 64, 25, 16), (1, 3, 50, 17, 7, 8), (1, 2, 65, 128, 64, 64), (1, 1, 9, 32, 25, 1024)]
    for dtype in FLOATS:
        for bsz, h, n, d, m, nb in shapes:
            x = randn(bsz, h, n, d, dtype=dtype)
            args = (randn(h, m, d), randn(h, m), randn(h, nb, m))
            T.ksh_hash_fwd(x, *args)
            if dtype == torch.bfloat16:  # the packing epilogue does not depend on x's dtype
                T.ksh_hash_codes(x, *args)
            T.ksh_hash_bwd(randn(bsz, h, n, nb), x, *args)
    # parameters (and grad_y) of other float dtypes
    for pdtype in (torch.float16, torch.bfloat16):
        x = randn(2, 6, 197, 64, dtype=torch.float16)
        args = (randn(6, 25, 64, dtype=pdtype), randn(6, 25, dtype=pdtype), randn(6, 16, 25, dtype=pdtype))
        T.ksh_hash_fwd(x, *args)
        T.ksh_hash_codes(x, *args)
        T.ksh_hash_bwd(randn(2, 6, 197, 16, dtype=pdtype), x, *args)
    # the benchmark: B = 64, d = 64, 64 anchors, bf16 q / k, float32 buffers; N = 197 (odd: the
    # same specialisation as 785) and 12544 at H = 6, b = 16; 32 and 64 bits at H = 12, N = 3136
    # (12544 / 16 bits binds as 3136 / 32 bits: compiled once)
    # (torch.empty: nothing reads these, and untouched pages cost no memory)
    for h, n, nb in ((6, 197, 16), (6, 12544, 16), (12, 3136, 32), (12, 3136, 64)):
        x = torch.empty(64, h, n, 64, dtype=torch.bfloat16)
        args = (randn(h, 64, 64), randn(h, 64), randn(h, nb, 64))
        T.ksh_hash_fwd(x, *args)
        T.ksh_hash_codes(x, *args)
        T.ksh_hash_bwd(torch.empty(64, h, n, nb), x, *args)
