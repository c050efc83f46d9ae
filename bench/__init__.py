"""effkern's benchmarks: definitions (``bench/<family>.py``), shared timing helpers
(``bench/common.py``), the run loop, self-check and command line every family shares
(``bench/runner.py``), the CSV -> markdown/plot report (``bench/report.py``) and the recorded
results (``bench/results/``). GPU timings only; on a machine without CUDA each benchmark runs a
correctness self-check instead. See GUIDE.md section 5."""
