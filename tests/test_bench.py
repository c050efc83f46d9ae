"""The benchmark runner (bench/runner.py) on CPU: the family list, the command line's usage
errors, the self-check, and the GPU path (rows, CSV, markdown) with the GPU faked: small inputs on
the CPU, the torch backend standing in for a kernel backend, fixed timings. Also the CPU-testable
pieces of the timing method: percentiles, the same-size copy's sizing, the choice of the fastest
baseline variant, compile failures, the environment record (commit, driver, clocks), the CSV
written case by case, the report merge, and the GPU script's syntax."""

from __future__ import annotations

import contextlib
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common, report, runner  # noqa: E402

FAMILIES = ("integer", "tokens", "binary_hash", "shift", "sparse24")
ONE_OP = {"integer": "int8_linear", "tokens": "tome_match_merge", "binary_hash": "hash_attention",
          "shift": "shift_linear.b4", "sparse24": "sparse24_int8_linear.int8"}


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
def test_self_check(family, capsys, monkeypatch):
    monkeypatch.setattr(common, "cuda_available", lambda: False)  # on a GPU machine too: nothing timed or saved
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
    monkeypatch.setattr(common, "device_us", lambda fn, n, *a: (fn(), (common.Timing(2.0, 1.5, 2.5), "graph"))[1])
    monkeypatch.setattr(common, "loop_us", lambda fn, *a, **kw: (fn(), common.Timing(3.0, 2.5, 3.5))[1])
    monkeypatch.setattr(common, "CopyMeter", lambda *a: (lambda nbytes: common.Timing(1.0, 1.0, 1.0)))
    monkeypatch.setattr(common, "gpu_state", lambda *a: {"sm_mhz": "1980", "mem_mhz": "3201", "clock_source": "fake"})
    monkeypatch.setattr(common, "compile_baseline", lambda fn: fn)  # torch.compile on the CPU: minutes
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
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
        assert float(r["kernel_us"]) == 2.0 and float(r["op_us"]) == 3.0 and r["kernel_timing"] == "graph", r
        assert float(r["speedup"]) == 1.0 and float(r["op_speedup"]) == 1.0, r  # baselines timed both ways too
        assert float(r["copy_same_us"]) == 1.0 and float(r["bw_frac_same"]) == 0.5, r  # the same-size copy
        assert r["sm_mhz"] == "1980" and r["clock_source"] == "fake" and r["mode"] == "quick", r
        assert r["status"] in ("-", "PASS", "MISS"), r
    md = csv.with_suffix(".md").read_text()
    assert fam.TITLE in md and "fake-gpu" in md and "same-size copy" in md


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
        assert b.extra_info["median_us"] == (3.0 if impl.endswith(":op") else 2.0) and bench.clock() > 0, impl
        if impl == "torch":
            assert b.extra_info["speedup_vs_clone+scatter_add_"] == 1.0 and b.extra_info["timing"] == "graph"


def test_pytest_benchmark_variants_and_compiled_params():
    bench = runner.PytestBench("binary_hash")
    bench.quick, bench.ops = True, ["binary_attention"]
    impls = [p.values[1] for p in bench.params()]
    assert {f"baseline:SDPA best@{b}" for b in ("cudnn", "flash", "efficient")} <= set(impls), impls
    bench = runner.PytestBench("tokens")
    bench.quick, bench.ops = True, ["tome_match_merge"]
    assert "baseline:eager ToMe compiled" in [p.values[1] for p in bench.params()]


# ------------------------------------------------------------------------------------------
# The timing method's CPU-testable pieces
# ------------------------------------------------------------------------------------------


def test_timing_of_percentiles():
    t = common.timing_of([5.0, 1.0, 4.0, 2.0, 3.0])
    assert (t.median_us, t.p20_us, t.p80_us) == (3.0, 2.0, 4.0)
    assert common.timing_of([7.0]) == common.Timing(7.0, 7.0, 7.0)
    with pytest.raises(ValueError):
        common.timing_of([])


@pytest.mark.parametrize("nbytes", [0, 1, 17, 1000, 3 * 2**20 + 5, 197 * 768 * 5, 2**31])
def test_same_bytes_copy_plan(nbytes):
    half, pairs = common.same_bytes_copy_plan(nbytes)
    assert half % 16 == 0 and half >= 16 and 2 * half >= nbytes and 2 * half - nbytes < 32 + 2 * 16
    assert pairs == common.rotation_sets(2 * half)  # the same rotation as a case of that size
    assert pairs * 2 * half >= common.ROTATE_BYTES or pairs == common.MAX_ROTATION_SETS


def test_graph_calls_cover_every_set():
    for n_sets in (1, 3, 8, 9, 4096):
        calls = common.graph_calls(n_sets)
        assert calls % n_sets == 0 and calls >= common.MIN_GRAPH_CALLS


def test_pick_fastest():
    best, note = runner.pick_fastest({"cudnn": 10.0, "flash": 8.0, "efficient": math.nan}, {"math": "no kernel"})
    assert best == "flash" and "flash 8.00 us (fastest)" in note and "cudnn 10.0 us" in note and "math N/A (no kernel)" in note
    assert runner.pick_fastest({"a": 1.0, "b": 1.0}, {})[0] == "a"  # a tie: the first listed
    best, note = runner.pick_fastest({}, {"cudnn": "RuntimeError: no", "flash": "RuntimeError: no"})
    assert best is None and note.count("N/A") == 2


def _sets(n=2):
    return [{"x": torch.randn(3, 5)} for _ in range(n)]


def test_time_baseline_variants_failures_and_compile(fake_gpu):
    def broken(s):
        raise RuntimeError("No available kernel")

    times = iter([5.0, 4.0])
    fake = lambda fn, n, *a: (fn(), (common.Timing(next(times), 0, 0), "graph"))[1]  # noqa: E731
    with pytest.MonkeyPatch.context() as m:
        m.setattr(common, "device_us", fake)
        bl = runner.Baseline("SDPA best", lambda s: s["x"], variants=(("cudnn", lambda s: s["x"] + 1), ("flash", broken),
                                                                        ("efficient", lambda s: s["x"] * 2)))
        got = runner.time_baseline(bl, _sets(), (1, 1))
    assert got.variant == "efficient" and got.us == 4.0 and got.op_us == 3.0 and not got.na
    assert "flash N/A (RuntimeError: No available kernel)" in got.note and "cudnn 5.00 us" in got.note

    def failing_compile(fn):
        def run(s):
            raise RuntimeError("BackendCompilerFailed: inductor raised\nlong trace")
        return run

    eager = runner.Baseline("eager thing", lambda s: s["x"] + 1, check=runner.close())
    with pytest.MonkeyPatch.context() as m:
        m.setattr(common, "compile_baseline", failing_compile)
        got = runner.time_baseline(runner.compiled(eager), _sets(), (1, 1))
    assert math.isnan(got.us) and got.na.startswith("torch.compile'd baseline failed: RuntimeError: BackendCompilerFailed")
    got = runner.time_baseline(runner.compiled(eager), _sets(), (1, 1), compile_ok=False)
    assert "--no-compile" in got.na
    got = runner.time_baseline(eager, _sets(), (1, 1), ref_op=torch.zeros(3, 5))
    assert "eager thing differs from the op" in got.note  # a baseline computing something else is noted
    assert runner.time_baseline(runner.Baseline("none", None, na="K % 8"), _sets(), (1, 1)).na == "K % 8"


def test_compile_failure_is_na_row_not_a_crash(fake_gpu, monkeypatch, tmp_path, capsys):
    def failing_compile(fn):
        def run(s):
            raise RuntimeError("torch._dynamo.exc.Unsupported: something")
        return run

    monkeypatch.setattr(common, "compile_baseline", failing_compile)
    fam = runner.load("tokens")
    csv = tmp_path / "t.csv"
    args = runner.family_parser(fam, "bench").parse_args(["--quick", "--ops", "tome_match_merge", "--csv", str(csv)])
    assert runner.run(fam, args) == 0, capsys.readouterr().out
    rows = {r["baseline"]: r for r in report.read_rows(csv)}
    assert set(rows) == {"eager ToMe", "eager ToMe compiled"}
    assert rows["eager ToMe compiled"]["baseline_us"] == "" and "torch._dynamo.exc.Unsupported" in rows[
        "eager ToMe compiled"]["note"]
    assert rows["eager ToMe"]["status"] == "-"  # the target is on the compiled baseline


def test_rows_are_written_case_by_case(fake_gpu, monkeypatch, tmp_path, capsys):
    """A run killed after its first case (a timeout) keeps that case's rows in the CSV."""
    real, calls = runner.bench_case, []

    def bench_case(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise SystemExit(143)  # what the SIGTERM handler raises
        return real(*a, **kw)

    monkeypatch.setattr(runner, "bench_case", bench_case)
    fam = runner.load("tokens")
    csv = tmp_path / "t.csv"
    args = runner.family_parser(fam, "bench").parse_args(["--quick", "--ops", "token_gather,topk_tokens",
                                                          "--csv", str(csv), "--no-report"])
    with pytest.raises(SystemExit):
        runner.run(fam, args)
    rows = report.read_rows(csv)
    assert rows and {r["op"] for r in rows} == {"token_gather"} and all("interrupted" in r["mode"] for r in rows)
    assert not csv.with_suffix(".md").exists()  # --no-report


def test_targets_name_baselines_of_their_case():
    for name in FAMILIES:
        for c in runner.load(name).cases():
            names = {b.name for b in c.baselines}
            assert set(c.targets) <= names | {"*"}, (c.name, set(c.targets) - names)


def test_compiled_twins_and_sdpa_variants():
    tok = runner.load("tokens").cases(quick=True)
    by_op = {c.op: [b.name for b in c.baselines] for c in tok}
    for op, eager in (("masked_softmax", "eager DynamicViT"), ("masked_softmax.fwd_bwd", "eager DynamicViT fwd+bwd"),
                      ("tome_match_merge", "eager ToMe"), ("fuse_tokens", "eager EViT fuse"),
                      ("cls_attention", "EViT full attention")):
        assert eager in by_op[op] and f"{eager} compiled" in by_op[op], (op, by_op[op])
    req = [c for c in runner.load("integer").cases(quick=True) if c.op == "requantize"][0]
    assert [b.compile for b in req.baselines] == [False, True]
    for c in runner.load("binary_hash").cases(quick=True):
        sdpa = c.baselines[0]
        assert sdpa.name == "SDPA best" and [v for v, _ in sdpa.variants] == ["cudnn", "flash", "efficient"]


def test_scatter_plan_is_timed_with_the_scatter(monkeypatch):
    """token_scatter's kernel time includes its plan (sort + searchsorted), as every op call pays it."""
    from effkern.ops import tokens as tokops

    case = [c for c in runner.load("tokens").cases(check=True, quick=True) if c.op.startswith("token_scatter")][0]
    s = runner.input_sets(case, "cpu", rotate=False)[0]
    assert "order" not in s and "starts" not in s
    real, n = tokops.scatter_plan, []
    monkeypatch.setattr(tokops, "scatter_plan", lambda *a: (n.append(1), real(*a))[1])
    case.kernel(s, runner.Kernels("torch", case.kernels))
    assert n == [1]


def test_environment_record(monkeypatch):
    monkeypatch.setenv("EFFKERN_COMMIT", "abc1234")
    assert common.git_commit() == "abc1234"  # the sender's commit first: the copied tree has no .git
    env = common.environment()
    for k in runner.ENV_COLUMNS:
        assert k in env, k
    assert env["commit"] == "abc1234" and env["torch"] == torch.__version__
    monkeypatch.delenv("EFFKERN_COMMIT")

    def no_git(*a, **kw):
        raise FileNotFoundError("git")

    monkeypatch.setattr(common.subprocess, "run", no_git)
    commit = common.git_commit()
    assert commit.startswith("nogit-tree-") and len(commit) == len("nogit-tree-") + 12 and "unknown" not in commit
    assert commit == f"nogit-tree-{common.tree_digest()}"


def test_tree_digest_changes_with_a_source_file(tmp_path):
    (tmp_path / "effkern").mkdir()
    f = tmp_path / "effkern" / "a.py"
    f.write_text("x = 1\n")
    d1 = common.tree_digest(tmp_path)
    (tmp_path / "effkern" / "b.so").write_bytes(b"build output")  # not a source
    assert common.tree_digest(tmp_path) == d1
    f.write_text("x = 2\n")
    assert common.tree_digest(tmp_path) != d1


def test_parse_nvidia_smi():
    got = common.parse_nvidia_smi("580.159.04, 1980, 3201, 1980, 3201\n")
    assert got == {"driver": "580.159.04", "sm_mhz": "1980", "mem_mhz": "3201", "max_sm_mhz": "1980", "max_mem_mhz": "3201"}
    assert common.parse_nvidia_smi("580.1, [N/A], 3201, [N/A], N/A")["sm_mhz"] == ""
    with pytest.raises(ValueError):
        common.parse_nvidia_smi("NVIDIA-SMI has failed")


def test_gpu_state_says_why_clocks_are_unavailable(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails

    def no_smi(*a, **kw):
        raise FileNotFoundError("nvidia-smi")

    monkeypatch.setattr(common.subprocess, "run", no_smi)
    st = common.gpu_state()
    assert st["sm_mhz"] == "" and st["clock_source"].startswith("unavailable (nvml: ") and "nvidia-smi" in st["clock_source"]
    monkeypatch.setattr(common.subprocess, "run", lambda *a, **kw: subprocess.CompletedProcess(
        a, 0, stdout="580.159.04, 1755, 3201, 1980, 3201\n", stderr=""))
    st = common.gpu_state()
    assert (st["driver"], st["sm_mhz"], st["clock_source"]) == ("580.159.04", "1755", "nvidia-smi")


def test_run_plan_quick_cases_of_every_family_first():
    fams = [runner.load(n) for n in ("integer", "tokens")]
    plan = runner.run_plan(fams, False, None)
    quick = [(runner.family_name(f), c.key) for f in fams for c in f.cases(quick=True)]
    assert [(runner.family_name(f), c.key) for f, c in plan[:len(quick)]] == quick
    assert len(plan) == sum(len(f.cases()) for f in fams)
    assert runner.parse_families("all", ["a", "b"]) == ["a", "b"]
    assert runner.parse_families("b,a", ["a", "b"]) == ["b", "a"]
    assert runner.parse_families("a,c", ["a", "b"]) is None and runner.parse_families("a,a", ["a", "b"]) is None


def test_report_update_rows_and_append_from(tmp_path, monkeypatch):
    src = tmp_path / "bench.csv"
    rows = [{"date": "d1", "gpu": "g", "family": fam, "op": "x", "mode": "quick", "kernel_us": 1.0}
            for fam in ("integer", "tokens")]
    report.append_rows(src, rows)
    assert report.update_rows(src, {"date": "d1", "family": "tokens"}, mode="quick, interrupted") == 1
    got = report.read_rows(src)
    assert [r["mode"] for r in got] == ["quick", "quick, interrupted"]
    monkeypatch.setattr(report, "regenerate", lambda p: (p.with_suffix(".md"), None))
    out = report.append_from(src, tmp_path / "results")
    assert [p.name for p in out] == ["integer.csv", "tokens.csv"]
    assert [r["family"] for r in report.read_rows(tmp_path / "results" / "tokens.csv")] == ["tokens"]


def test_report_cells_mark_loop_timings_and_variants():
    row = {"kernel_us": "2.5", "kernel_timing": "loop (RuntimeError: capture)", "baseline": "SDPA best",
           "baseline_variant": "cudnn", "bw_frac_same": "0.5"}
    assert report.cell(row, "kernel_us") == "2.50*" and report.cell(row, "baseline") == "SDPA best (cudnn)"
    assert report.cell(row, "bw_frac_same") == "50%"


def test_gpu_check_script_syntax():
    script = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert "EFFKERN_COMMIT" in text and "timeout" in text


class _FakeCuda:
    """Just enough of torch.cuda for the timers' control flow: a device clock that each call of
    the timed function advances by ``us``; a graph replays what was captured."""

    def __init__(self, us: float, fail_capture: bool = False):
        self.us, self.now, self.capturing, self.fail_capture = us, 0.0, None, fail_capture
        fake = self

        class Event:
            def __init__(self, enable_timing=False):
                self.t = None

            def record(self):
                self.t = fake.now

            def synchronize(self):
                pass

            def elapsed_time(self, end):
                return (end.t - self.t) / 1e3  # ms

        class Graph:
            def __init__(self):
                self.calls = 0

            def replay(self):
                fake.now += self.calls * fake.us

        class Capture:
            def __init__(self, g, stream=None, capture_error_mode="global"):
                self.g = g

            def __enter__(self):
                fake.capturing = self.g

            def __exit__(self, *exc):
                fake.capturing = None
                if fake.fail_capture:
                    raise RuntimeError("CUDA error: operation not permitted when stream is capturing")

        class Stream:
            def wait_stream(self, other):
                pass

        self.patches = {"Event": Event, "CUDAGraph": Graph, "graph": Capture, "Stream": Stream,
                        "current_stream": lambda: Stream(), "stream": lambda s: contextlib.nullcontext(),
                        "synchronize": lambda *a: None, "_sleep": lambda cycles: None}

    def fn(self):
        if self.capturing is not None:
            self.capturing.calls += 1
        else:
            self.now += self.us


@pytest.mark.parametrize("fail_capture", [False, True])
def test_timers_control_flow(monkeypatch, fail_capture):
    fake = _FakeCuda(us=5.0, fail_capture=fail_capture)
    for name, value in fake.patches.items():
        monkeypatch.setattr(torch.cuda, name, value, raising=False)
    t, how = common.device_us(fake.fn, 3, 1.0, 2.0)
    assert t.median_us == pytest.approx(5.0) and t.p20_us == pytest.approx(5.0)
    assert how == "graph" if not fail_capture else how.startswith("loop (RuntimeError: CUDA error: operation not")
    assert common.loop_us(fake.fn, 1.0, 2.0).median_us == pytest.approx(5.0)
    if not fail_capture:
        calls = []
        monkeypatch.setattr(fake, "fn", lambda: (calls.append(fake.capturing is not None), _FakeCuda.fn(fake)))
        common.graph_us(fake.fn, 3, 1.0, 2.0)
        assert sum(calls) == common.graph_calls(3)  # every set captured, in rotation


def test_copy_meter_sizes_and_caches(monkeypatch):
    """The same-size copy: one measurement per rounded size, on buffers of that size (CPU
    buffers, the fake clock of _FakeCuda)."""
    fake = _FakeCuda(us=1.0)
    for name, value in fake.patches.items():
        monkeypatch.setattr(torch.cuda, name, value, raising=False)
    seen = []
    real = common.device_us

    def device_us(fn, n_sets, *a):
        seen.append(n_sets)
        return real(lambda: (fn(), fake.fn()), n_sets, *a)

    monkeypatch.setattr(common, "device_us", device_us)
    meter = common.CopyMeter(1.0, 2.0, device="cpu")
    t = meter(100_000)
    assert t.median_us == pytest.approx(1.0)
    assert meter(100_000 - 20) is t and seen == [common.same_bytes_copy_plan(100_000)[1]]  # same rounded size: cached
    meter(3 * 2**20)
    assert len(seen) == 2
