"""bench/sparse24.py under pytest-benchmark (``pytest bench/ --benchmark-json=out.json``): the cases
of ``python -m effkern bench sparse24``, each baseline and each backend's kernel and public op;
see :class:`bench.runner.PytestBench`. Without CUDA every benchmark is skipped."""

import pytest

pytest.importorskip("pytest_benchmark")

from bench.runner import PytestBench  # noqa: E402

BENCH = PytestBench("sparse24")
pytestmark = BENCH.marks()


@pytest.mark.parametrize("case, impl", BENCH.params())
def test_sparse24(benchmark, case, impl):
    BENCH.run(benchmark, case, impl)
