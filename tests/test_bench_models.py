"""The end-to-end benchmark of the ViT variants (bench/models.py, ``python -m effkern bench
models``) on CPU: the self-check passes for every variant, and the GPU path (timm, effkern and
published rows, ratios, verdicts, CSV, markdown) runs with the timer and the compiler faked.
Needs timm; skipped without it."""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path

import pytest
import torch

timm = pytest.importorskip("timm", reason="needs timm (and torchvision): pip install torch==2.14.1 "
                                           "torchvision==0.29.1 timm")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common, models  # noqa: E402
from effkern.__main__ import main as effkern_main  # noqa: E402


def test_self_check_passes_for_every_variant(capsys, monkeypatch):
    monkeypatch.setattr(common, "cuda_available", lambda: False)  # on a GPU machine too: nothing timed
    assert effkern_main(["bench", "models"]) == 0
    out = capsys.readouterr().out
    assert f"{len(models.checked(models.VARIANTS))} ok, 0 failed" in out
    for method in ("tome", "evit", "dynamicvit", "idlevit", "shift"):
        assert any(line.split()[:2] == ["ok", method] and "matches the published model code" in line
                   for line in out.splitlines()), method
    for method in ("shiftadd", "shift"):  # ShiftAddViT's PVTv2-B1 against tests/pvt_transcriptions.py, LinearShiftQ
        assert any(line.split()[:3] == ["ok", method, "PVTv2-B1"] and "matches the published model code" in line
                   for line in out.splitlines()), method


def test_self_check_reports_a_wrong_variant(monkeypatch):
    """A variant that departs from the published code fails the check (and the command)."""
    real = models.published_model

    def off(model, conv, v, config):
        f = real(model, conv, v, config)
        return lambda x: f(x) + 1e-2

    monkeypatch.setattr(models, "published_model", off)
    lines = []
    assert models.self_check("cpu", [v for v in models.VARIANTS if v.method == "evit"], out=lines.append) == 1
    assert lines[0].split()[:2] == ["FAILED", "evit"]


def test_usage_errors():
    for argv in (["--methods", "bogus"], ["--archs", "ViT-H"], ["--batches", "0"], ["--batches", "1,x"]):
        with pytest.raises(SystemExit) as e:
            models.main(argv)
        assert e.value.code == 2


def test_gpu_path_with_a_fake_timer(tmp_path):
    """Rows for timm, effkern and the published code in every mode, ratios from the times, a
    verdict on the best effkern row, then the markdown from the CSV."""
    times = iter(range(1, 10**6))

    def fake_time(fn):  # runs the call once (it must work), then a made-up, distinct time
        fn()
        t = float(next(times)) * 1000.0
        return common.Timing(t, t * 0.9, t * 1.1)

    runner = models.Runner(time_fn=fake_time, compile_fn=lambda fn, mode: fn)
    out = tmp_path / "models.csv"
    assert models.main(["--archs", "DeiT-S", "--batches", "1", "--methods", "tome,evit,ivit", "--dtype", "fp32", "--img-size", "64",
                        "--csv", str(out)],
                       runner=runner) == 0
    rows = list(csv.DictReader(out.open()))
    got = {(r["method"], r["impl"], r["mode"]) for r in rows}
    modes = ("eager", "compiled", "cudagraphs")  # B = 1: CUDA graphs too
    assert {("timm", "timm", m) for m in modes} <= got
    for method in ("tome", "evit"):
        assert {(method, "effkern", m) for m in modes} | {(method, "published", m) for m in modes[:2]} <= got
    assert {("ivit", "effkern", m) for m in modes} <= got and not any(k[:2] == ("ivit", "published") for k in got)
    timm_best = min(float(r["ms"]) for r in rows if r["impl"] == "timm")
    for r in rows:
        assert float(r["images_s"]) == pytest.approx(1 / (float(r["ms"]) * 1e-3), rel=1e-5)
        if r["impl"] != "timm":
            assert float(r["vs_timm"]) == pytest.approx(timm_best / float(r["ms"]), rel=1e-5)
    tome = [r for r in rows if r["method"] == "tome" and r["impl"] == "effkern"]
    judged = [r for r in tome if r["status"]]
    assert len(judged) == 1 and judged[0]["ms"] == min((r["ms"] for r in tome), key=float)
    # later calls got later (longer) fake times: effkern is slower than timm here, so a MISS
    assert judged[0]["status"] == "MISS" and ">=1.2x timm & >=1.2x published" == judged[0]["target"]
    assert all(0 < float(r["tokens"]) < 1 for r in tome) and rows[0]["gpu"] and rows[0]["commit"]
    md = out.with_suffix(".md").read_text()
    assert "| tome" in md and "MISS" in md


def test_pvt_rows_with_a_fake_timer(monkeypatch):
    """PVTv2-B1 (96 px: stage 3's 36 tokens at B = 1 fit the hash's 25 anchors): timm's rows, then
    shiftadd and shift (every linear) effkern's way and the published way, the MoE effkern's only."""
    from effkern.models import variants as V

    real_fit = V.fit_hash  # 2 iterations, not 100: the rows are checked here, not the hash's quality
    monkeypatch.setattr(V, "fit_hash", lambda model, images, **kw: real_fit(model, images, iterations=2, **kw))

    def fake_time(fn):
        fn()
        return common.Timing(1000.0, 900.0, 1100.0)

    runner = models.Runner(time_fn=fake_time, compile_fn=lambda fn, mode: fn)
    variants = [v for v in models.VARIANTS if "PVTv2-B1" in v.archs]
    assert len(variants) == 3 and "PVTv2-B1" in models.parser().format_help()
    rows = models.bench_arch("PVTv2-B1", 1, variants, runner, "cpu", torch.float32, lambda rows: None, img_size=96)
    by = {}
    for r in rows:
        assert not r.get("note"), r  # every row ran
        by.setdefault((r["method"], r["config"]), set()).add((r["impl"], r["mode"]))
    modes = ("eager", "compiled", "cudagraphs")
    assert by[("timm", "")] == {("timm", m) for m in modes}
    assert by[("shiftadd", "")] == {("effkern", m) for m in modes} | {("published", m) for m in modes[:2]}
    assert by[("shift", "targets=('q', 'kv', 'proj', 'fc1', 'fc2')")] == by[("shiftadd", "")]
    assert by[("shift", "targets=('q', 'kv', 'proj') moe=True")] == {("effkern", m) for m in modes}


def _small(device, dtype):
    torch.manual_seed(0)
    return timm.create_model("deit_small_patch16_224", pretrained=False, img_size=64).to(device, dtype).eval()


def test_tokens_fraction_counts_the_tokens_each_block_computes():
    import effkern

    model = _small("cpu", torch.float32)
    x = torch.randn(1, 3, 64, 64)
    # EViT: block 6 keeps 8 of 16 patch tokens and adds the fused one; IdleViT: 0.5, 0.5, 0.25, 0.25
    for method, cfg, want in (("evit", {"keep_rate": 0.5, "drop_loc": (6,)}, (7 * 16 + 5 * 9) / (12 * 16)),
                              ("idlevit", {"keep_rate": 0.5, "idle_layers": (8, 9, 10, 11)}, (8 * 16 + 24) / (12 * 16)),
                              ("tome", {"r": 0}, 1.0)):
        conv = effkern.convert(models.copy.deepcopy(model), method, **cfg).eval()
        conv(x)
        assert math.isclose(models.tokens_fraction(conv), want), method
