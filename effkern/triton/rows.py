"""How the Triton row kernels (integer row ops, masked_softmax) lay rows over a program.

One place for the rule, because it decides most of these kernels' instruction count.
"""

from __future__ import annotations

import triton


def rows_per_program(rows: int, length: int, block: int, itemsize: int, row_tile: int) -> tuple[int, int]:
    """(ROWS, num_warps) for a row kernel holding ``ROWS`` rows of ``length`` elements in a
    [ROWS, BLOCK] tile (rows longer than ``block`` are chunked: one row per program).

    Rows whose starts are 16-byte aligned (``length * itemsize`` a multiple of 16) load in
    16-byte vectors; Triton then gives each thread a vector of one row, and rows are packed up
    to about ``row_tile`` elements a program, one warp per 512 of them.

    Otherwise (rows of 197 or 785 tokens) each element is its own load, and Triton lays a packed
    tile's columns over all its warps: every thread would hold a piece of every row and each
    row's reductions (max, sum) would cross all the warps through shared memory. There the warps
    are sized to the row instead (BLOCK / 256 of them, at least 8 elements of one row per
    thread) and rows packed up to about 16 elements per thread: on sm_90a this takes
    masked_softmax's forward at N = 197 from 109 to 42 SASS instructions per element slot.
    Such rows are not given 16-byte vectors by splitting them into an unaligned head, an
    aligned body and a tail: tried on int_softmax, Triton computes the body in the edges'
    one-element layout through shared memory, and the kernel's instructions grew by 70%.
    """
    one_pass = length <= block
    if (length * itemsize) % 16:
        num_warps = max(1, min(8, block // 256))
        n_rows = max(1, min(512 * num_warps // block, triton.next_power_of_2(rows))) if one_pass else 1
        return n_rows, num_warps
    n_rows = max(1, min(row_tile // block, triton.next_power_of_2(rows))) if one_pass else 1
    return n_rows, max(1, min(8, (n_rows * block) // 512))
