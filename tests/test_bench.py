"""The benchmark runner (bench/runner.py) on CPU: the family list, the command line's usage
errors, the self-check, and the GPU path (rows, CSV, markdown) with the GPU faked: small inputs on
the CPU, the torch backend standing in for a kernel backend, a fixed timing."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common, report, runner  # noqa: E402

FAMILIES = ("integer", "tokens", "binary_hash")
ONE_OP = {"integer": "int8_linear", "tokens": "tome_match_merge", "binary_hash": "hash_attention"}


def test_families_and_cases():
    assert set(FAMILIES) <= set(runner.families())
    for name in FAMILIES:
        fam = runner.load(name)
        for check in (False, True):
            cases = fam.cases(check=check)
            assert cases and len({c.key for c in cases}) == len(cases) or check, name
            for c in cases:
                assert c.baselines and c.bytes > 0, c.name
                for k in c.kernels:
                    assert "torch" in runner.kernel_dispatcher(k).impls, (c.name, k)
        assert {c.key for c in fam.cases(quick=True)} <= {c.key for c in fam.cases()}, name
    assert runner.unbenched_ops(runner.load("integer")) == []  # every public op of the family has a case


@pytest.mark.parametrize("argv", [["integer", "--ops", "int_softmax,bogus"], ["nofamily"], [], ["tokens", "--ops", ","]])
def test_cli_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as e:
        runner.cli(argv)
    assert e.value.code == 2
    assert "error" in capsys.readouterr().err


@pytest.mark.parametrize("family", FAMILIES)
def test_self_check(family, capsys):
    args = runner.family_parser(runner.load(family), "bench").parse_args(["--quick", "--ops", ONE_OP[family]])
    assert runner.run(runner.load(family), args) == 0
    out = capsys.readouterr().out
    assert "0 failed" in out and ONE_OP[family] in out


@pytest.fixture
def fake_gpu(monkeypatch):
    env = {"date": "2000-01-01T00:00:00Z", "gpu": "fake-gpu", "cc": "9.0", "torch": torch.__version__,
           "triton": "-", "cuda": "-", "commit": "test"}
    monkeypatch.setattr(common, "cuda_available", lambda: True)
    monkeypatch.setattr(common, "environment", lambda: dict(env))
    monkeypatch.setattr(common, "measure_ceilings", lambda *a: {"copy_gbps": 4000.0, "matmul_tflops": 800.0})
    monkeypatch.setattr(common, "do_bench_us", lambda fn, *a: (fn(), common.Timing(2.0, 1.5, 2.5))[1])
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda *a: None)
    sets, select = runner.input_sets, runner.select_cases
    monkeypatch.setattr(runner, "input_sets", lambda case, device, rotate=True: sets(case, "cpu", rotate=False))
    monkeypatch.setattr(runner, "select_cases", lambda fam, quick, ops, check=False: select(fam, True, ops, check=True))
    monkeypatch.setattr(runner.Case, "backends", lambda self, include_reference=False: ["torch"])


@pytest.mark.parametrize("family", FAMILIES)
def test_gpu_rows_csv_markdown(family, fake_gpu, tmp_path, capsys):
    fam = runner.load(family)
    csv = tmp_path / f"{family}.csv"
    args = runner.family_parser(fam, "bench").parse_args(["--quick", "--ops", ONE_OP[family], "--csv", str(csv)])
    assert runner.run(fam, args) == 0, capsys.readouterr().out
    rows = report.read_rows(csv)
    cases = runner.select_cases(fam, True, [ONE_OP[family]])
    assert len(rows) == sum(len(c.baselines) for c in cases)
    for r in rows:
        assert r["family"] == family and r["gpu"] == "fake-gpu" and r["correct"] == "True", r
        assert float(r["kernel_us"]) == 2.0 and float(r["op_us"]) == 2.0 and r["status"] in ("-", "PASS"), r
    md = csv.with_suffix(".md").read_text()
    assert fam.TITLE in md and "fake-gpu" in md


class _Benchmark:  # the pytest-benchmark fixture's surface that PytestBench uses
    def __init__(self):
        self.group, self.extra_info = None, {}

    def pedantic(self, target, rounds, warmup_rounds, iterations):
        for _ in range(2):
            target()


def test_pytest_benchmark_path(fake_gpu, monkeypatch):
    monkeypatch.setattr(common, "cuda_event_time_s", lambda fn, flush=None: (fn(), 1e-6)[1])
    monkeypatch.setattr(common, "L2Flusher", lambda: (lambda: None))
    bench = runner.PytestBench("tokens")
    bench.quick, bench.ops = True, ["token_scatter.add"]
    params = [p.values for p in bench.params()]
    assert [impl for _, impl in params] == ["baseline:clone+scatter_add_", "baseline:clone+index_put_(acc)", "torch",
                                            "torch:op"]
    for case, impl in params:
        b = _Benchmark()
        bench.run(b, case, impl)
        assert b.extra_info["do_bench_median_us"] == 2.0 and bench.clock() > 0, impl
    assert b.extra_info["speedup_vs_clone+scatter_add_"] == 1.0
