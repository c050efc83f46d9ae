"""Recorded benchmark results: append rows to a CSV, regenerate the markdown table and the plot.

Every number in ``bench/results/*.md`` and ``*.png`` comes from the CSV beside it through this
module; never edit them by hand. Regenerate with::

    python bench/report.py [--csv bench/results/integer.csv] [--compact]

Rows measured elsewhere (the GPU script writes every family into one OUTDIR/bench.csv) are added
to bench/results/<family>.csv, and those reports regenerated, with::

    python bench/report.py --append-from OUTDIR/bench.csv

The markdown shows the latest run of each device (GPU name); the CSV keeps every run.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import math
import sys
from collections import OrderedDict, defaultdict
from pathlib import Path
from typing import Iterable, Sequence

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import RESULTS_DIR, fmt_num, text_table  # noqa: E402

# Column order of the CSV. A file written with other columns is rewritten with the union.
FIELDS = [
    "date", "gpu", "cc", "sms", "l2_mb", "driver", "sm_mhz", "mem_mhz", "max_sm_mhz", "clock_source",
    "torch", "triton", "cuda", "python", "commit", "family", "mode",
    "op", "model", "batch", "shape", "in_dtype", "out_dtype", "backend", "correct",
    "kernel_us", "kernel_p20_us", "kernel_p80_us", "kernel_timing", "op_us", "op_p20_us", "op_p80_us",
    "baseline", "baseline_variant", "baseline_us", "baseline_timing", "baseline_op_us", "speedup", "op_speedup",
    "bytes", "gbps", "bw_frac", "copy_same_us", "copy_same_gbps", "bw_frac_same", "baseline_gbps",
    "flops", "tops", "tops_frac", "baseline_tops",
    "copy_gbps", "matmul_tflops", "rot_sets", "target", "status", "note",
]

# Rows whose status is one of these met or missed a target.
TARGET_STATUSES = ("PASS", "MISS")


# --------------------------------------------------------------------------------------------
# CSV
# --------------------------------------------------------------------------------------------


def read_rows(csv_path: Path) -> list[dict[str, str]]:
    csv_path = Path(csv_path)
    if not csv_path.exists():
        return []
    with csv_path.open(newline="") as f:
        return list(csv.DictReader(f))


def append_rows(csv_path: Path, rows: Sequence[dict]) -> None:
    """Append ``rows`` (dicts keyed by FIELDS; missing keys left empty) to ``csv_path``."""
    csv_path = Path(csv_path)
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    header = list(FIELDS)
    old: list[dict[str, str]] = []
    rewrite = False
    if csv_path.exists() and csv_path.stat().st_size > 0:
        with csv_path.open(newline="") as f:
            reader = csv.DictReader(f)
            existing = list(reader.fieldnames or [])
            if existing != header:
                old = list(reader)
                header = existing + [k for k in FIELDS if k not in existing]
                rewrite = True
    else:
        rewrite = True
    extra = [k for r in rows for k in r if k not in header]
    header += list(OrderedDict.fromkeys(extra))
    if rewrite or extra:
        old = old or read_rows(csv_path)
        with csv_path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=header)
            w.writeheader()
            for r in old:
                w.writerow({k: r.get(k, "") for k in header})
    with csv_path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=header)
        for r in rows:
            w.writerow({k: _csv_value(r.get(k, "")) for k in header})


def update_rows(csv_path: Path, match: dict, **values) -> int:
    """Set ``values`` on the rows of ``csv_path`` whose columns equal ``match`` (e.g. how a run
    ended, on the rows it appended as it went); returns how many rows changed."""
    csv_path = Path(csv_path)
    if not csv_path.exists():
        return 0
    with csv_path.open(newline="") as f:
        reader = csv.DictReader(f)
        header, rows = list(reader.fieldnames or []), list(reader)
    hit = [r for r in rows if all(r.get(k) == str(v) for k, v in match.items())]
    if not hit:
        return 0
    header += [k for k in values if k not in header]
    for r in hit:
        r.update({k: _csv_value(v) for k, v in values.items()})
    tmp = csv_path.with_suffix(csv_path.suffix + ".tmp")
    with tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=header)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in header})
    tmp.replace(csv_path)  # atomic: a kill mid-write leaves the old file
    return len(hit)


def append_from(src: Path, results_dir: Path = RESULTS_DIR) -> list[Path]:
    """Append the rows of ``src`` (any families) to ``results_dir/<family>.csv`` each, then
    regenerate those reports; returns the CSVs written."""
    by_family: "OrderedDict[str, list[dict]]" = OrderedDict()
    for r in read_rows(src):
        if not r.get("family"):
            raise ValueError(f"{src}: a row without a family column: {r}")
        by_family.setdefault(r["family"], []).append(r)
    out = []
    for fam, rows in by_family.items():
        dst = Path(results_dir) / f"{fam}.csv"
        append_rows(dst, rows)
        regenerate(dst)
        out.append(dst)
    return out


def _csv_value(v) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "True" if v else "False"
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.6g}"
    return str(v)


def _f(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def latest_runs(rows: Iterable[dict[str, str]]) -> "OrderedDict[str, list[dict[str, str]]]":
    """gpu name -> the rows of its latest run (the largest date), devices in first-seen order.
    CPU rows (never timings) are ignored."""
    by_gpu: dict[str, dict[str, list]] = OrderedDict()
    for r in rows:
        gpu = r.get("gpu", "")
        if not gpu or gpu == "cpu":
            continue
        by_gpu.setdefault(gpu, defaultdict(list))[r.get("date", "")].append(r)
    return OrderedDict((gpu, runs[max(runs)]) for gpu, runs in by_gpu.items())


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------

# kernel µs / baseline µs: device time (graph replay; "*" marks a loop where capture failed);
# op µs / baseline op µs: host-inclusive back-to-back calls. % same-size copy: GB/s over a copy of
# the case's own bytes measured in the same run; % copy BW: over the large-copy ceiling.
TABLE_COLUMNS = [
    ("op", "op"), ("shape", "shape"), ("in", "in_dtype"), ("backend", "backend"), ("correct", "correct"),
    ("kernel µs", "kernel_us"), ("op µs", "op_us"), ("baseline", "baseline"), ("baseline µs", "baseline_us"),
    ("baseline op µs", "baseline_op_us"), ("speedup", "speedup"), ("op speedup", "op_speedup"), ("GB/s", "gbps"),
    ("% same-size copy", "bw_frac_same"), ("% copy BW", "bw_frac"), ("TOPS", "tops"),
    ("% bf16 MM", "tops_frac"), ("target", "target"), ("status", "status"),
]

COMPACT_COLUMNS = [
    ("op", "op"), ("shape", "shape"), ("in", "in_dtype"), ("be", "backend"), ("µs", "kernel_us"), ("op µs", "op_us"),
    ("baseline", "baseline"), ("base µs", "baseline_us"), ("x", "speedup"), ("op x", "op_speedup"),
    ("%cp", "bw_frac_same"), ("%BW", "bw_frac"), ("%MM", "tops_frac"), ("status", "status"),
]

_SHORT_OPS = {"int_softmax": "softmax", "int_gelu": "gelu", "int_layernorm": "layernorm",
              "requantize": "requant", "int8_linear": "linear"}
_SHORT_BASELINES = {"torch.softmax bf16": "softmax", "F.gelu bf16": "gelu", "F.layer_norm bf16": "layer_norm",
                    "torch bf16 x*s round clamp": "bf16 rq", "torch._int_mm": "_int_mm", "F.linear bf16": "linear"}


def cell(row: dict, key: str, compact: bool = False) -> str:
    v = _csv_value(row.get(key, ""))
    if key in ("kernel_us", "baseline_us") and str(row.get(key.replace("_us", "_timing"), "")).startswith("loop"):
        x = _f(v)  # device time from a loop: capture failed
        return "-" if math.isnan(x) else fmt_num(x) + "*"
    if key in ("bw_frac", "tops_frac", "bw_frac_same"):
        x = _f(v)
        return "-" if math.isnan(x) else f"{100 * x:.0f}%"
    if key in ("speedup", "op_speedup"):
        x = _f(v)
        return "-" if math.isnan(x) else f"{x:.2f}x"
    if key in ("kernel_us", "op_us", "baseline_us", "baseline_op_us", "gbps", "tops", "baseline_gbps"):
        x = _f(v)
        return "-" if math.isnan(x) else fmt_num(x)
    if compact and key == "op":
        return _SHORT_OPS.get(v, v)
    if key == "baseline":
        name = _SHORT_BASELINES.get(v, v) if compact else v
        variant = row.get("baseline_variant", "")
        return f"{name} ({variant})" if variant else (name or "-")
    if key == "correct":
        return {"True": "yes", "False": "NO", "": "-"}.get(v, v)
    return v if v != "" else "-"


def table(rows: Sequence[dict], markdown: bool = False, compact: bool = False) -> str:
    cols = COMPACT_COLUMNS if compact else TABLE_COLUMNS
    return text_table([[cell(r, k, compact) for _, k in cols] for r in rows], [h for h, _ in cols],
                      markdown=markdown, sep=" " if compact else "  ")


def speedup_summary(rows: Sequence[dict]) -> list[list[str]]:
    """torchao-style min/avg/max speedup per (op, backend, baseline), and target counts."""
    groups: "OrderedDict[tuple, list[dict]]" = OrderedDict()
    for r in rows:
        groups.setdefault((r.get("op", ""), r.get("backend", ""), r.get("baseline", "")), []).append(r)
    out = []
    for (op, be, base), rs in groups.items():
        sp = [_f(r.get("speedup")) for r in rs]
        sp = [s for s in sp if not math.isnan(s)]
        n_pass = sum(r.get("status") == "PASS" for r in rs)
        n_miss = sum(r.get("status") == "MISS" for r in rs)
        n_bad = sum(str(r.get("correct")) == "False" or r.get("status") in ("ERROR", "WRONG") for r in rs)
        out.append([op, be, base,
                    f"{min(sp):.2f}x" if sp else "-",
                    f"{sum(sp) / len(sp):.2f}x" if sp else "-",
                    f"{max(sp):.2f}x" if sp else "-",
                    f"{n_pass}/{n_pass + n_miss}" if n_pass + n_miss else "-",
                    str(n_bad)])
    return out


SUMMARY_HEADER = ["op", "backend", "baseline", "min speedup", "avg speedup", "max speedup",
                  "targets met", "wrong/errors"]


def family_text(rows: Sequence[dict], default: str = "") -> dict:
    """The report text of the rows' benchmark family (their "family" column, else ``default``,
    the CSV's stem): title, intro (the family module's docstring, in paragraphs), plot title,
    and per op the target speedup lines (from the family's declared targets)."""
    name = next((r["family"] for r in rows if r.get("family")), "") or default
    text = {"title": f"{name} benchmark (generated)", "intro": (), "plot_title": f"effkern {name}",
            "target_lines": lambda op: []}
    try:
        fam = importlib.import_module(f"bench.{name}")
        lines: dict[str, dict] = {}
        for case in fam.cases():
            for t in case.targets.values():
                for v in (t.speedup, t.op_speedup):
                    if v is not None:
                        lines.setdefault(case.op, {})[(v, f"target {t.label}")] = None
        intro = [" ".join(p.split()) for p in (fam.__doc__ or "").strip().split("\n\n")]
    except (ImportError, AttributeError) as e:
        print(f"report: no report text for family {name!r} ({type(e).__name__}: {e}); using the default")
        return text
    return {"title": f"{fam.TITLE} (generated)", "intro": intro, "plot_title": f"effkern: {fam.TITLE}",
            "target_lines": lambda op: list(lines.get(op, ()))}


def _span(rows: Sequence[dict], key: str) -> str:
    """'1980' or '1755-1980' over the rows' values of ``key`` ('?' if none)."""
    vals = sorted(v for v in {_f(r.get(key)) for r in rows} if not math.isnan(v))
    if not vals:
        return "?"
    return f"{vals[0]:.0f}" if vals[0] == vals[-1] else f"{vals[0]:.0f}-{vals[-1]:.0f}"


def render_markdown(all_rows: Sequence[dict], csv_name: str, png_name: str | None, text: dict | None = None) -> str:
    runs = latest_runs(all_rows)
    text = text or family_text(all_rows, Path(csv_name).stem)
    lines = [
        f"# {text['title']}",
        "",
        f"Generated by `bench/report.py` from `{csv_name}`; do not edit by hand. "
        "Latest run per device; every run is kept in the CSV.",
    ]
    for paragraph in text["intro"]:
        lines += ["", paragraph]
    if not runs:
        lines += ["", "No GPU results recorded yet."]
    for gpu, rows in runs.items():
        r0 = rows[0]
        lines += [
            "",
            f"## {gpu}",
            "",
            f"- date: {r0.get('date', '')}, commit `{r0.get('commit', '')}`, mode {r0.get('mode', '')}",
            f"- torch {r0.get('torch', '')}, triton {r0.get('triton', '')}, CUDA {r0.get('cuda', '')}, "
            f"Python {r0.get('python', '') or '?'}, compute capability {r0.get('cc', '')}, "
            f"{r0.get('sms', '') or '?'} SMs, L2 {r0.get('l2_mb', '') or '?'} MB, driver {r0.get('driver', '') or '?'}",
            f"- clocks (MHz, read after each case; {r0.get('clock_source', '') or 'not recorded'}): "
            f"SM {_span(rows, 'sm_mhz')} (max {r0.get('max_sm_mhz', '') or '?'}), memory {_span(rows, 'mem_mhz')}",
            "- kernel µs and baseline µs: device time per call, CUDA-graph replay (* = back-to-back calls "
            "where capture failed); op µs and baseline op µs: back-to-back calls on an idle GPU, host "
            "overhead included; % same-size copy: against a copy of the row's bytes measured in the same run",
            f"- measured ceilings: copy {fmt_num(_f(r0.get('copy_gbps')))} GB/s (read + write), "
            f"bf16 matmul {fmt_num(_f(r0.get('matmul_tflops')))} TFLOP/s",
            "",
            table(rows, markdown=True),
            "",
            "### Summary",
            "",
            text_table(speedup_summary(rows), SUMMARY_HEADER, markdown=True),
        ]
        notes = OrderedDict()
        for r in rows:
            if r.get("note"):
                notes.setdefault(r["note"], []).append(f"{r.get('op')} {r.get('shape')} {r.get('backend')}")
        if notes:
            lines += ["", "### Notes", ""]
            for note, where in notes.items():
                extra = f" (and {len(where) - 1} more)" if len(where) > 1 else ""
                lines.append(f"- {where[0]}{extra}: {note}")
    if png_name and runs:
        lines += ["", f"![speedup per shape]({png_name})"]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# Plot
# --------------------------------------------------------------------------------------------


def plot(all_rows: Sequence[dict], png_path: Path, text: dict | None = None) -> str | None:
    """Speedup per shape (one panel per op, bars per device/backend/baseline) for the latest run
    of each device. Returns None on success, else why no plot was made."""
    runs = latest_runs(all_rows)
    text = text or family_text(all_rows, png_path.stem)
    if not runs:
        return "no GPU rows to plot"
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed"
    multi = len(runs) > 1
    ops: "OrderedDict[str, OrderedDict[str, dict[str, float]]]" = OrderedDict()
    for gpu, rows in runs.items():
        for r in rows:
            s = _f(r.get("speedup"))
            if math.isnan(s):
                continue
            series = f"{r.get('backend')} vs {r.get('baseline')}" + (f" ({gpu})" if multi else "")
            label = f"{r.get('shape')} {r.get('in_dtype')}"
            ops.setdefault(r.get("op", ""), OrderedDict()).setdefault(series, {})[label] = s
    if not ops:
        return "no speedups to plot"
    fig, axes = plt.subplots(len(ops), 1, figsize=(14, 3.6 * len(ops)), squeeze=False)
    for ax, (op, series) in zip(axes[:, 0], ops.items()):
        labels = list(OrderedDict.fromkeys(lbl for vals in series.values() for lbl in vals))
        width = 0.8 / max(1, len(series))
        for i, (name, vals) in enumerate(series.items()):
            xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(labels))]
            ax.bar(xs, [vals.get(lbl, 0.0) for lbl in labels], width, label=name)
        ax.axhline(1.0, color="black", linewidth=0.8)
        for y, label in text["target_lines"](op):
            ax.axhline(y, color="red", linestyle="--", linewidth=0.8, label=label)
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=7)
        ax.set_ylabel("speedup (baseline / kernel)")
        ax.set_title(op)
        ax.legend(fontsize=7, loc="upper left")
    fig.suptitle(f"{text['plot_title']}: speedup per shape (" + ", ".join(runs) + ")")
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / fig.get_figheight()))
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return None


# --------------------------------------------------------------------------------------------
# Regeneration
# --------------------------------------------------------------------------------------------


def regenerate(csv_path: Path) -> tuple[Path, Path | None]:
    """Rewrite ``<stem>.md`` and ``<stem>.png`` beside ``csv_path`` from its rows (with the text
    of their benchmark family, see :func:`family_text`)."""
    csv_path = Path(csv_path)
    rows = read_rows(csv_path)
    text = family_text(rows, csv_path.stem)
    png = csv_path.with_suffix(".png")
    why = plot(rows, png, text)
    if why is not None:
        print(f"report: no plot ({why})")
        png_out = None
    else:
        png_out = png
    md = csv_path.with_suffix(".md")
    md.write_text(render_markdown(rows, csv_path.name, png.name if png_out else None, text))
    return md, png_out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--csv", type=Path, default=RESULTS_DIR / "integer.csv", help="results CSV")
    p.add_argument("--compact", action="store_true",
                   help="print a compact table of the latest run per device and do not rewrite files")
    p.add_argument("--last", action="store_true", help="with --compact: only the most recent run of all")
    p.add_argument("--append-from", type=Path, default=None, metavar="CSV",
                   help="append this CSV's rows to bench/results/<family>.csv per family and regenerate those")
    args = p.parse_args(argv)
    if args.append_from is not None:
        for dst in append_from(args.append_from):
            print(f"report: appended to {dst} and regenerated its markdown")
        return 0
    rows = read_rows(args.csv)
    if not rows:
        print(f"report: {args.csv} has no rows")
        return 1
    if args.compact:
        runs = latest_runs(rows)
        if args.last and runs:
            newest = max(runs, key=lambda g: runs[g][0].get("date", ""))
            runs = {newest: runs[newest]}
        for gpu, rs in runs.items():
            r0 = rs[0]
            print(f"== {gpu}  {r0.get('date')}  commit {r0.get('commit')}  copy {fmt_num(_f(r0.get('copy_gbps')))} GB/s"
                  f"  bf16 MM {fmt_num(_f(r0.get('matmul_tflops')))} TFLOP/s")
            print(table(rs, compact=True))
            print()
            print(text_table(speedup_summary(rs), SUMMARY_HEADER))
        return 0
    md, png = regenerate(args.csv)
    print(f"report: wrote {md}" + (f" and {png}" if png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
