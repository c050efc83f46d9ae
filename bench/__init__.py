"""effkern's benchmarks: each family's declared cases (``bench/<family>.py``), the one runner that
verifies, times and reports them and its command line (``bench/runner.py``; ``python -m effkern bench``),
timing helpers (``bench/common.py``), the CSV -> markdown/plot report (``bench/report.py``) and the
recorded results (``bench/results/``). GPU timings only; on a machine without CUDA each benchmark runs
a correctness self-check instead. See GUIDE.md section 5."""
