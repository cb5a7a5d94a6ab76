"""`rayapp report` on hand-made run records: selection, cells, gaps, formats, bad input."""
from __future__ import annotations

import csv
import json
import math

import pytest

from rayapp.cli import main
from rayapp.errors import DataError
from rayapp.sweep import report
from rayapp.sweep.results import parse_run, read_runs


def _record(method, task, seed, lr, dev, test, *, status="done", metric="acc", curve=None, **extra):
    name = f"{method}-{task}-s{seed}-lr{lr}"
    rec = {"name": name, "status": status, "task": task, "seed": seed,
           "sweep": {"method": method, "task": task, "seed": seed, "point": {"lr": lr}}, **extra}
    if status == "done":
        rec.update(metric=metric, best_dev=dev, test=test, checkpoint=f"/ckpt/{name}",
                   dev_curve=curve or [[0, 0.5], [10, dev]])
    return rec


def _cells(md: str) -> dict[tuple[str, str], str]:
    """{(row label, column header): cell} of the first Markdown table in `md`."""
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in md.splitlines() if line.startswith("|")]
    header, body = rows[0], rows[2:]
    return {(r[0], h): c for r in body for h, c in zip(header[1:], r[1:])}


def _write(root, records):
    folder = root / "records"
    folder.mkdir(parents=True, exist_ok=True)
    for rec in records:
        (folder / f"{rec['name']}.json").write_text(json.dumps(rec))
    return str(root)


# method A on RTE: seed 13 picks lr=2 (dev 0.7 -> test 0.60), seed 21 picks lr=1 (dev 0.8 -> test 0.50)
# method B on RTE: a tie on dev at seed 13 goes to the earlier grid point (lr=1 -> test 0.70)
RUNS = [
    _record("A", "RTE", 13, 1, 0.6, 0.90), _record("A", "RTE", 13, 2, 0.7, 0.60),
    _record("A", "RTE", 21, 1, 0.8, 0.50), _record("A", "RTE", 21, 2, 0.7, 0.99),
    _record("B", "RTE", 13, 1, 0.7, 0.70), _record("B", "RTE", 13, 2, 0.7, 0.10),
    _record("B", "RTE", 21, 1, 0.5, 0.20), _record("B", "RTE", 21, 2, 0.6, 0.72),
    _record("A", "MRPC", 13, 1, 0.6, 0.81, metric="f1"), _record("A", "MRPC", 13, 2, 0.5, 0.1, metric="f1"),
    _record("A", "MRPC", 21, 1, 0.6, 0.79, metric="f1"), _record("A", "MRPC", 21, 2, 0.5, 0.1, metric="f1"),
    # B on MRPC: seed 21 lr=2 failed, so the cell is a gap
    _record("B", "MRPC", 13, 1, 0.6, 0.95, metric="f1"), _record("B", "MRPC", 13, 2, 0.5, 0.1, metric="f1"),
    _record("B", "MRPC", 21, 1, 0.9, 0.99, metric="f1"),
    _record("B", "MRPC", 21, 2, None, None, status="failed", error="CUDA out of memory"),
]


def test_cells_are_mean_std_of_best_dev_test_and_best_is_bold(tmp_path):
    out = report.write([_write(tmp_path / "sweep", RUNS)], str(tmp_path / "out"))
    md = out["markdown"]
    cells = _cells(md)
    # A/RTE: tests 0.60 and 0.50 -> 55.0 (5.0); B/RTE: 0.70 (tie -> lr=1) and 0.72 -> 71.0 (1.0), the best
    assert cells["A", "RTE (acc)"] == "55.0 (5.0)"
    assert cells["B", "RTE (acc)"] == "**71.0 (1.0)**"
    # A/MRPC: 0.81, 0.79 -> 80.0 (1.0), bold as the only number in its column; B/MRPC is a gap, not 97.0
    assert cells["A", "MRPC (f1)"] == "**80.0 (1.0)**"
    assert cells["B", "MRPC (f1)"] == "— [1]"
    assert "[1] B / MRPC: 1/2 splits; seed 21: lr=2 failed: CUDA out of memory" in md


def test_csv_and_selected_runs(tmp_path):
    report.write([_write(tmp_path / "sweep", RUNS)], str(tmp_path / "out"))
    rows = list(csv.reader((tmp_path / "out" / "table.csv").open()))
    assert rows[0] == ["method", "MRPC (f1)", "RTE (acc)"]
    assert rows[1] == ["A", "80.0 (1.0)", "55.0 (5.0)"]
    assert rows[2][2] == "71.0 (1.0)" and rows[2][1].startswith("gap: 1/2 splits")
    sel = {(r["method"], r["task"], r["seed"]): r for r in csv.DictReader((tmp_path / "out" / "selected.csv").open())}
    assert sel["A", "RTE", "13"]["point"] == "lr=2" and float(sel["A", "RTE", "13"]["test"]) == 0.6
    assert sel["B", "MRPC", "21"]["chosen"] == "no"


def test_png_and_self_contained_html(tmp_path):
    from matplotlib.image import imread

    out = report.write([_write(tmp_path / "sweep", RUNS)], str(tmp_path / "out"))
    for name in ("dev_curves.png", "test_bars.png"):
        png = tmp_path / "out" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and imread(png).shape[0] > 100
    page = (tmp_path / "out" / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 2
    assert "<b>71.0 (1.0)</b>" in page and "CUDA out of memory" in page
    assert "http://" not in page and "https://" not in page and "src='/" not in page  # nothing to fetch
    assert set(out["files"]) >= {str(tmp_path / "out" / f) for f in ("table.md", "report.html")}


def test_missing_split_is_a_gap(tmp_path):
    """A seed one method has and the other lacks: the lacking cell is a gap, not a mean of one split."""
    runs = [r for r in RUNS if not (r["sweep"]["method"] == "A" and r["task"] == "RTE" and r["seed"] == 21)]
    md = report.write([_write(tmp_path / "s", runs)], str(tmp_path / "out"))["markdown"]
    assert _cells(md)["A", "RTE (acc)"] == "— [1]"
    assert "A / RTE: 1/2 splits; seed 21: lr=1 missing; lr=2 missing" in md


def test_sweep_plan_orders_rows_labels_tables_and_marks_unrun_trials(tmp_path):
    """With sweep.json the planned trials are known: a trial without any record is a gap."""
    from rayapp.config import build
    from rayapp.sweep import spec

    cfg = build(spec.SweepConfig, {
        "name": "plan", "storage": str(tmp_path), "tasks": ["RTE"], "seeds": [13, 21], "grid": {"lr": [1, 2]},
        "methods": {"B": {"label": "method B"}, "A": {}, "C": {}},
        "tables": [{"name": "t1", "title": "Table 1", "rows": ["A", "B"]}, {"name": "t2", "rows": ["C"]}]})
    spec.save(cfg)
    # C's run of seed 13 wrote its recipe record but its trial has not annotated it yet: not a result
    unfinished = {"name": "C-unannotated", "method": "prompt", "task": "RTE", "seed": 13, "metric": "acc",
                  "best_dev": 0.9, "test": 0.9, "config": {"lr": 1}}
    _write(tmp_path / "plan", [r for r in RUNS if r["task"] == "RTE"] + [unfinished])
    out = report.write([str(tmp_path / "plan")], str(tmp_path / "out"))
    t1 = (tmp_path / "out" / "t1.md").read_text()
    assert t1.index("| A |") < t1.index("| method B |") and "### Table 1" in t1
    t2 = (tmp_path / "out" / "t2.md").read_text()
    assert "| C | — [1] |" in t2 and "0/2 splits" in t2 and "prompt" not in out["markdown"]
    assert "Table 1" in out["markdown"] and "| C |" in out["markdown"]


def test_cli_prints_the_table(tmp_path, capsys):
    assert main(["report", _write(tmp_path / "sweep", RUNS), "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert _cells(printed)["B", "RTE (acc)"] == "**71.0 (1.0)**" and "report.html" in printed


def test_records_on_s3(s3_server, tmp_path):
    import boto3

    boto3.client("s3").create_bucket(Bucket="reports")
    from rayapp import storage

    for rec in RUNS[:8]:
        storage.write_text(f"s3://reports/sweep/records/{rec['name']}.json", json.dumps(rec))
    md = report.write(["s3://reports/sweep"], str(tmp_path / "out"))["markdown"]
    assert _cells(md)["B", "RTE (acc)"] == "**71.0 (1.0)**"


# --- bad input: one line naming the input ---------------------------------------------------

def test_folder_without_records(tmp_path, capsys):
    (tmp_path / "empty" / "records").mkdir(parents=True)
    assert main(["report", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "holds no run records" in err and str(tmp_path / "empty") in err
    with pytest.raises(DataError, match="holds no run records"):
        read_runs([str(tmp_path / "nothing-here")])


def test_damaged_records_name_the_file_and_field(tmp_path):
    folder = tmp_path / "records"
    folder.mkdir()
    (folder / "x.json").write_text("{not json")
    with pytest.raises(DataError, match=r"x\.json is not JSON"):
        read_runs([str(tmp_path)])
    bad = _record("A", "RTE", 13, 1, 0.5, 0.5)
    bad["best_dev"] = "0.5"  # a string where a number belongs: read as data, never evaluated
    with pytest.raises(DataError, match=r"r\.json: 'best_dev' must be int/float, got '0\.5'"):
        parse_run(bad, "r.json")
    with pytest.raises(DataError, match=r"r\.json has no 'test'|r\.json has no 'metric'"):
        parse_run({k: v for k, v in _record("A", "RTE", 13, 1, 0.5, 0.5).items() if k != "metric"}, "r.json")
    with pytest.raises(DataError, match="status must be one of"):
        parse_run({**bad, "status": "maybe"}, "r.json")


def test_plain_run_records_report_by_their_method(tmp_path):
    """Records of runs started on their own (no sweep block): rows by the recipe's method."""
    recs = [{"name": f"prompt-RTE-{s}", "recipe": "finetune", "method": "prompt", "task": "RTE", "seed": s,
             "metric": "acc", "best_dev": 0.6, "test": t, "dev_curve": [[0, 0.5], [5, 0.6]],
             "config": {"lr": 1e-5, "batch_size": 2}} for s, t in ((13, 0.5), (21, 0.7))]
    md = report.write([_write(tmp_path / "runs", recs)], str(tmp_path / "out"))["markdown"]
    assert "| prompt | **60.0 (10.0)** |" in md
    assert math.isclose(report.gather([str(tmp_path / "runs")]).runs[0].test, 0.5)


def test_cells_say_how_many_splits_they_are_over(tmp_path):
    """A method planned on one split has no std to show (not `(0.0)`); in a table that mixes
    split counts a cell over fewer splits says n=; the caption says what the cells are over."""
    from rayapp.config import build
    from rayapp.sweep import spec

    cfg = build(spec.SweepConfig, {
        "name": "counts", "storage": str(tmp_path), "tasks": ["RTE"], "seeds": [13, 21, 42], "grid": {"lr": [1]},
        "methods": {"one": {"seeds": [13]}, "two": {"seeds": [13, 21]}, "three": {}}})
    spec.save(cfg)
    runs = [_record("one", "RTE", 13, 1, 0.7, 0.60),
            _record("two", "RTE", 13, 1, 0.7, 0.60), _record("two", "RTE", 21, 1, 0.7, 0.70),
            _record("three", "RTE", 13, 1, 0.7, 0.50), _record("three", "RTE", 21, 1, 0.7, 0.50),
            _record("three", "RTE", 42, 1, 0.7, 0.80)]
    _write(tmp_path / "counts", runs)
    md = report.write([str(tmp_path / "counts")], str(tmp_path / "out"))["markdown"]
    cells = _cells(md)
    assert cells["one", "RTE (acc)"] == "60.0 (1 split)"
    assert cells["two", "RTE (acc)"] == "**65.0 (5.0) n=2**"
    assert cells["three", "RTE (acc)"] == "60.0 (14.1)"
    assert "mean (std) over 3 few-shot splits, or as many as the cell says." in md
    rows = {r[0]: r[1] for r in csv.reader((tmp_path / "out" / "table.csv").open())}
    assert rows["two"] == "65.0 (5.0) n=2" and rows["one"] == "60.0 (1 split)"
    # one count for every cell: said once, no n= on the cells
    uniform = report.write([_write(tmp_path / "u", RUNS)], str(tmp_path / "out2"))["markdown"]
    assert "Cells: test metric x100, mean (std) over 2 few-shot splits." in uniform and "n=" not in uniform


def test_an_axis_sweep_gets_a_table_per_point_and_a_line_per_method(tmp_path):
    """Selection by dev inside each K; a table per K; the figure's series are (K, mean, std)
    of the complete cells, a K with a gap left out of its line; tables and figure follow the
    config's first table (PD's Figure 2 draws two of its methods)."""
    from matplotlib.image import imread

    from rayapp.config import build
    from rayapp.sweep import spec

    cfg = build(spec.SweepConfig, {
        "name": "k", "storage": str(tmp_path), "tasks": ["RTE"], "seeds": [13, 21], "grid": {"lr": [1, 2]},
        "methods": {"A": {"label": "method A"}, "B": {}, "T": {}}, "tables": [{"name": "fig", "rows": ["A", "B"]}],
        "axis": {"key": "k", "title": "K", "values": [16, 32, 64]}})
    spec.save(cfg)
    tests = {("A", 16): (0.5, 0.7), ("A", 32): (0.6, 0.8), ("A", 64): (0.9, 0.9), ("B", 16): (0.4, 0.4),
             ("B", 32): (0.5, 0.7)}  # B at K=64: seed 21 failed
    runs = []
    for (m, k), by_seed in tests.items():
        for seed, test in zip((13, 21), by_seed):
            # lr=2 is best on dev (0.8 > 0.2) and carries the test; lr=1's test would be 0.0
            for lr, dev, t in ((1, 0.2, 0.0), (2, 0.8, test)):
                runs.append({**_record(m, "RTE", seed, lr, dev, t), "name": f"{m}-k{k}-s{seed}-lr{lr}"})
                runs[-1]["sweep"]["axis"] = f"k{k}"
    runs += [{**_record("B", "RTE", 13, lr, 0.5, 0.5), "name": f"B-k64-s13-lr{lr}"} for lr in (1, 2)]
    for r in runs[-2:]:
        r["sweep"]["axis"] = "k64"
    _write(tmp_path / "k", runs)
    out = report.write([str(tmp_path / "k")], str(tmp_path / "out"))
    assert _cells((tmp_path / "out" / "fig-k32.md").read_text())["method A", "RTE (acc)"] == "**70.0 (10.0)**"
    assert "B / RTE: 1/2 splits; seed 21: lr=1 missing" in (tmp_path / "out" / "fig-k64.md").read_text()
    series = report.axis_series(report.gather([str(tmp_path / "k")]))
    assert series == {"RTE": {"A": [(16.0, 60.0, 10.0), (32.0, pytest.approx(70.0), pytest.approx(10.0)),
                                    (64.0, 90.0, 0.0)],
                              "B": [(16.0, 40.0, 0.0), (32.0, 60.0, pytest.approx(10.0))]}}
    assert imread(tmp_path / "out" / "axis.png").shape[0] > 100
    assert not (tmp_path / "out" / "dev_curves.png").exists()
    sel = list(csv.DictReader((tmp_path / "out" / "selected.csv").open()))
    assert {(r["method"], r["axis"], r["seed"]) for r in sel if r["chosen"] == "yes"} >= {("A", "k64", "21")}
    assert str(tmp_path / "out" / "fig-k16.csv") in out["files"]
