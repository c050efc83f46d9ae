"""Representative launches of :mod:`effkern.triton.binary_hash` for the sm_90 compile test
(tests/test_triton_compile_sm90.py): ``launch_all(T, g)`` calls every host function of T once
per constexpr specialisation (v dtype, form, nbits of one or more words and BLOCK_K 16 / 32,
BLOCK_D from 16 to 512, one or several chunks: the chunk sum) on CPU tensors drawn from
generator g (every shape in float16, two in the other dtypes, to keep the compile
count down), and the benchmark's bfloat16 shapes (bench/binary_hash.py: B = 64, d = 64; empty
tensors, never touched) so that the static read sees the launches as the benchmark binds them.
The kernels are recorders there, so nothing runs; outputs stay unwritten."""

import torch

MODULE = "effkern.triton.binary_hash"

FLOATS = (torch.float16, torch.bfloat16, torch.float32)
FORMS = ("ecoformer", "shiftadd")


def launch_all(T, g: torch.Generator) -> None:
    def randn(*shape, dtype=torch.float32):
        return torch.randn(shape, generator=g).to(dtype)

    def codes(b, h, n, nbits):
        return torch.randint(-(2**31), 2**31 - 1, (b, h, n, (nbits + 31) // 32), generator=g,
                             dtype=torch.int64).to(torch.int32)

    for dtype in FLOATS + (torch.float64,):
        T.pack_codes(randn(2, 3, 197, 64, dtype=dtype))
        T.pack_codes(randn(5, 17, dtype=dtype))
    # (B, H, N, d, nbits): DeiT-S-like heads (d = 64) with 16 / 64 bits, d = 32 / 128, an odd d
    # with a partial second word, one token, a wide head, B * H large (one chunk).
    shapes = [(1, 6, 197, 64, 16), (2, 3, 197, 32, 64), (1, 1, 785, 128, 32), (1, 3, 50, 17, 100),
              (1, 1, 1, 64, 8), (1, 2, 64, 512, 1024), (64, 12, 197, 64, 32)]
    # Every shape in float16; bfloat16 and float32 on two (the rest only changes block sizes).
    for dtype in FLOATS:
        for b, h, n, d, nbits in (shapes if dtype == torch.float16 else shapes[1:2] + shapes[3:4]):
            v = randn(b, h, n, d, dtype=dtype)
            q, k = codes(b, h, n, nbits), codes(b, h, n, nbits)
            grad = randn(b, h, n, d, dtype=dtype)
            for form in FORMS:
                T.binary_attention_fwd(q, k, v, nbits, form)
                T.binary_attention_bwd(grad, q, k, v, nbits, form)
    # bench/binary_hash.py, bfloat16, d = 64 (few, to keep the compile count down): N = 785 in
    # both forms (two chunks, summed by the kernels that read KV), and 64-bit codes at N = 3136
    # (two words, BLOCK_K 32, one chunk).
    T.pack_codes(torch.empty((64, 6, 785, 16)))  # the KSH hash's y, 16 bits
    for h, n, nbits, forms in ((6, 785, 16, FORMS), (12, 3136, 64, FORMS[:1])):
        v = torch.empty((64, h, n, 64), dtype=torch.bfloat16)
        q = torch.empty((64, h, n, (nbits + 31) // 32), dtype=torch.int32)
        for form in forms:
            T.binary_attention_fwd(q, q, v, nbits, form)
            T.binary_attention_bwd(v, q, q, v, nbits, form)
