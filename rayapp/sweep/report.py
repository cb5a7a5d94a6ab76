"""`rayapp report DIR...`: the papers' tables, plots and one self-contained page from run records.

Tables have SMASH Table 2's shape (and Prompt-Distiller's Tables 1/2 with other rows):
rows = methods, columns = tasks, cells `mean (std)` over the few-shot splits of the task's
metric x100 with one decimal, the best cell of each column in bold. The selection behind
each cell is `rayapp.sweep.results` (best grid point by dev, its test metric). A cell with a
failed or missing run is a marked gap (`—` plus a numbered note saying which split and grid
point), never a number over the runs that happened to finish. Under each table a caption
says how many splits the cells are over; a cell over fewer splits than the others (a method
planned on fewer seeds) says `n=`, and a cell over one split shows `(1 split)`, not a std of 0.
A cell whose test sets were drawn from the task's pool (`fewshot._fallback_test`: the task's
test file is missing) is marked `†`, with a footnote: it is not a number on the task's test
set, so not one to compare with the papers'.

A sweep directory brings its plan (`sweep.json`): its methods' row labels and order, the
tables its config asks for (`tables:` rows/columns), and every trial it planned, so a
trial that never wrote a record is a gap too. Folders of runs started on their own
(`rayapp finetune`) are reported from their records alone.

Outputs in `--out`: `<table>.md` and `<table>.csv` per table, `selected.csv` (every split's
chosen run), `dev_curves.png` (dev metric vs step per method: mean over splits, shaded std),
`test_bars.png` (per task, a bar per method with std error bars) and `report.html` (all of
it, the plots inlined as base64 PNG: opens offline, in any browser).

A sweep with an axis (`sweep.axis`: K, templates, verbalizers) is reported per axis point:
every table once per point (`<table>-<point>.md/.csv`, the grid selected by dev inside each
point), `selected.csv` with an `axis` column, and instead of the two plots above the papers'
line figure `axis.png` (SMASH Figs. 3-4, Prompt-Distiller Fig. 2): per task the mean test
metric over the axis points, a line per method, the std over splits shaded ("Shaded area
indicates standard deviation"); K on a log2 axis. Unlike SMASH's Fig. 3, which omits some
methods' bands "for simplicity", every method gets its band. `axis_series` is what it plots.
"""
from __future__ import annotations

import base64
import csv
import html
import io
from dataclasses import dataclass, field
from pathlib import Path

from rayapp import storage
from rayapp.errors import DataError
from rayapp.sweep import spec as sweep_spec
from rayapp.sweep.axis import AxisSpec
from rayapp.sweep.results import Cell, Expected, Run, cells, expected_from_runs, point_text, read_runs
from rayapp.sweep.spec import TableSpec

GAP = "—"
POOL_MARK = "†"
POOL_NOTE = (f"{POOL_MARK} test set drawn from the task's labelled pool (its original train data), not the "
             "task's test set (the split's test file is missing): not comparable with published numbers.")


@dataclass
class Plan:
    """What the report covers: the runs, the planned cells, labels and tables."""
    runs: list[Run]
    expected: Expected
    labels: dict[str, str] = field(default_factory=dict)
    tables: list[TableSpec] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    axis: AxisSpec | None = None     # the sweeps' axis: cells per point (`cell_sets`)


def _merge(into: Expected, other: Expected) -> Expected:
    return Expected(
        methods=list(dict.fromkeys(into.methods + other.methods)),
        tasks=list(dict.fromkeys(into.tasks + other.tasks)),
        seeds={**other.seeds, **into.seeds},
        points={**other.points, **into.points},
    )


def gather(dirs: list[str]) -> Plan:
    """Runs of every dir, and the plan of every sweep among them."""
    if not dirs:
        raise DataError("give at least one sweep or run output directory")
    runs, expected, labels, tables, axes = [], Expected([], [], {}, {}), {}, [], {}
    for d in dirs:
        mine = read_runs([d])
        if storage.exists(storage.join(d, sweep_spec.SPEC_FILE)):
            # a record the trial has not annotated yet is a run still finishing: not a result
            runs += [r for r in mine if r.swept]
            cfg = sweep_spec.load(d)
            axes[d] = cfg.axis
            expected = _merge(expected, cfg.expected())
            labels.update({m: cfg.label(m) for m in cfg.method_names if m not in labels})
            tables += [t for t in cfg.table_specs() if t.name not in {x.name for x in tables}]
        else:
            runs += mine
            axes[d] = None
    axis = next((a for a in axes.values() if a is not None), None)
    if axis is not None and any(a != axis for a in axes.values()):
        raise DataError(f"{', '.join(dirs)}: report a sweep with an axis alone, or with sweeps of the same axis "
                        "(its cells are per axis point)")
    unplanned = [r for r in runs if (r.method, r.task) not in expected.seeds]
    if unplanned:
        expected = _merge(expected, expected_from_runs(unplanned))
    return Plan(runs, expected, labels, tables or [TableSpec()], list(dirs), axis)


def cell_sets(plan: Plan) -> list[tuple[str | None, dict[tuple[str, str], Cell]]]:
    """(axis point, its cells) for every point of the plan's axis, in order; one (None, cells)
    without an axis. Each point selects among its own runs only."""
    if plan.axis is None:
        return [(None, cells(plan.runs, plan.expected))]
    return [(name, cells([r for r in plan.runs if r.axis == name], plan.expected)) for name in plan.axis.point_names]


@dataclass
class Table:
    name: str
    title: str
    rows: list[str]                  # methods
    columns: list[str]               # tasks
    cells: dict[tuple[str, str], Cell]
    labels: dict[str, str]
    note: str = ""                   # a line for the caption (an axis point's values)

    def best(self, task: str) -> float | None:
        means = [c.mean for m in self.rows if (c := self.cells.get((m, task))) is not None and c.complete]
        return max(means) if means else None

    def header(self, task: str) -> str:
        metric = next((c.metric for m in self.rows if (c := self.cells.get((m, task))) and c.metric), None)
        return f"{task} ({metric})" if metric else task

    def split_counts(self) -> list[int]:
        """How many splits the complete cells are over, each count once, ascending."""
        return sorted({len(c.splits) for c in self.cells.values() if c.complete})

    def caption(self) -> str:
        counts = self.split_counts()
        if len(counts) <= 1:
            over = f"{counts[0]} few-shot split{'s' * (counts[0] != 1)}" if counts else "the few-shot splits"
            text = f"Cells: test metric x100, mean (std) over {over}."
        else:
            text = (f"Cells: test metric x100, mean (std) over {counts[-1]} few-shot splits, or as many as the cell "
                    "says.")
        return f"{text} {self.note}" if self.note else text

    def footnote(self) -> str:
        """What `†` means, when a cell of the table has it."""
        return POOL_NOTE if any(c.complete and c.pool_test for c in self.cells.values()) else ""

    def number(self, cell: Cell) -> str:
        """A complete cell's `mean (std)`, with `n=` when it is over fewer splits than others
        and `†` when its test sets came from the pool."""
        n = len(cell.splits)
        return (cell.text() + (f" n={n}" if 1 < n < max(self.split_counts()) else "")
                + (f" {POOL_MARK}" if cell.pool_test else ""))

    def notes(self) -> list[tuple[str, str, str]]:
        """(method, task, why) of every gap, numbered in table order."""
        return [(m, t, c.gap) for m in self.rows for t in self.columns
                if (c := self.cells.get((m, t))) is not None and c.gap]


def tables(plan: Plan) -> list[Table]:
    """The plan's tables; with an axis, each once per axis point (`<name>-<point>`)."""
    sets, out = cell_sets(plan), []
    for spec in plan.tables:
        rows = spec.rows or plan.expected.methods
        cols = spec.columns or plan.expected.tasks
        for point, all_cells in sets:
            name, title, note = spec.name, spec.title, ""
            if point is not None:
                values = {plan.axis.describe(t, point) for t in cols}
                numeric = all(plan.axis.x(t) is not None for t in cols)  # K: the value names the point
                at = f"{plan.axis.label} = {values.pop()}" if numeric and len(values) == 1 else \
                    f"{plan.axis.label}: {point}"
                name, title = f"{spec.name}-{point}", f"{spec.title or spec.name} ({at})"
                if not numeric:  # a prompt variant: say which
                    note = f"{point}: " + "; ".join(f"{t} {plan.axis.describe(t, point)}" for t in cols)
            out.append(Table(name, title, rows, cols,
                             {(m, t): all_cells[m, t] for m in rows for t in cols if (m, t) in all_cells},
                             {m: plan.labels.get(m, m) for m in rows}, note))
    return out


# --- text formats ---------------------------------------------------------------------------

def _cell_texts(table: Table, bold: tuple[str, str]) -> dict[tuple[str, str], str]:
    """Cell strings with gaps numbered by their note and the column's best wrapped in `bold`."""
    notes = {(m, t): i for i, (m, t, _) in enumerate(table.notes(), 1)}
    out = {}
    for m in table.rows:
        for t in table.columns:
            c = table.cells.get((m, t))
            if c is None:
                out[m, t] = ""
            elif not c.complete:
                out[m, t] = f"{GAP} [{notes[m, t]}]"
            else:
                text = table.number(c)
                out[m, t] = f"{bold[0]}{text}{bold[1]}" if c.mean == table.best(t) else text
    return out


def markdown(table: Table) -> str:
    texts = _cell_texts(table, ("**", "**"))
    lines = [f"### {table.title or table.name}", "",
             "| method | " + " | ".join(table.header(t) for t in table.columns) + " |",
             "|---|" + "---|" * len(table.columns)]
    lines += ["| " + table.labels[m] + " | " + " | ".join(texts[m, t] for t in table.columns) + " |"
              for m in table.rows]
    lines += ["", table.caption()] + ([table.footnote()] if table.footnote() else [])
    notes = table.notes()
    if notes:
        lines += [""] + [f"[{i}] {table.labels[m]} / {t}: {why}" for i, (m, t, why) in enumerate(notes, 1)]
    return "\n".join(lines) + "\n"


def table_csv(table: Table) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["method"] + [table.header(t) for t in table.columns])
    for m in table.rows:
        row = []
        for t in table.columns:
            c = table.cells.get((m, t))
            row.append("" if c is None else table.number(c) if c.complete else f"gap: {c.gap}")
        w.writerow([table.labels[m]] + row)
    return buf.getvalue()


def selected_csv(plan: Plan) -> str:
    """Every (method, task, split), per axis point with an axis: its chosen run (grid point,
    dev, test) or why none."""
    buf = io.StringIO()
    w = csv.writer(buf)
    axis = ["axis"] if plan.axis is not None else []
    w.writerow(["method", "task", *axis, "seed", "chosen", "point", "best_dev", "test", "test_set", "run",
                "checkpoint", "gaps"])
    for point, all_cells in cell_sets(plan):
        for (m, t), cell in all_cells.items():
            for s in cell.splits:
                r = s.chosen
                w.writerow([m, t, *([point] if axis else []), s.seed, "yes" if r else "no",
                            point_text(r.point) if r else "", r.best_dev if r else "", r.test if r else "",
                            ("pool" if r.pool_test else "task") if r else "", r.name if r else "",
                            (r.checkpoint or "") if r else "", "; ".join(s.gaps)])
    return buf.getvalue()


# --- plots ------------------------------------------------------------------------------------

def _figure(n: int):
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    cols = min(n, 4)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return plt, fig, list(axes.flat[:n])


def _png(plt, fig) -> bytes:
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def _colors(methods: list[str]) -> dict[str, str]:
    palette = [f"C{i}" for i in range(10)]
    return {m: palette[i % len(palette)] for i, m in enumerate(methods)}


def dev_curves_png(table: Table) -> bytes:
    """Dev metric (x100) vs step of each method's chosen runs: mean over splits, std shaded."""
    import numpy as np

    plt, fig, axes = _figure(len(table.columns))
    colors = _colors(table.rows)
    for ax, task in zip(axes, table.columns):
        for m in table.rows:
            c = table.cells.get((m, task))
            curves = [dict(s.chosen.dev_curve) for s in (c.splits if c else []) if s.chosen and s.chosen.dev_curve]
            if not curves:
                continue
            steps = sorted(set.intersection(*(set(cv) for cv in curves)))
            if not steps:
                continue
            values = np.array([[100 * cv[s] for s in steps] for cv in curves])
            mean, std = values.mean(0), values.std(0)
            label = table.labels[m] + ("" if c.complete else " (partial)")
            if len(steps) == 1:  # nothing trained (zero-shot): one evaluation
                ax.errorbar(steps, mean, yerr=std, fmt="o", color=colors[m], label=label, capsize=3)
            else:
                ax.plot(steps, mean, color=colors[m], label=label)
                ax.fill_between(steps, mean - std, mean + std, color=colors[m], alpha=0.2)
        ax.set_title(table.header(task))
        ax.set_xlabel("step")
        ax.set_ylabel("dev x100")
        ax.grid(alpha=0.3)
    if axes:
        axes[0].legend(fontsize=7)
    return _png(plt, fig)


def test_bars_png(table: Table) -> bytes:
    """Per task: the test mean (x100) of every method with std error bars; gaps marked."""
    plt, fig, axes = _figure(len(table.columns))
    colors = _colors(table.rows)
    for ax, task in zip(axes, table.columns):
        xs = range(len(table.rows))
        for x, m in zip(xs, table.rows):
            c = table.cells.get((m, task))
            if c is None:  # not planned (a method run on other tasks only): empty, as in the table
                continue
            if c.complete:
                ax.bar(x, c.mean, yerr=c.std, color=colors[m], capsize=3)
            else:  # a gap is drawn as one, never as a bar
                ax.text(x, 0, "gap", rotation=90, ha="center", va="bottom", color="red", fontsize=8)
        ax.set_xticks(list(xs))
        ax.set_xticklabels([table.labels[m] for m in table.rows], rotation=45, ha="right", fontsize=7)
        ax.set_title(table.header(task))
        ax.set_ylabel("test x100")
        ax.grid(axis="y", alpha=0.3)
    return _png(plt, fig)


Series = dict[str, dict[str, list[tuple[float, float, float]]]]


def axis_series(plan: Plan) -> Series:
    """What `axis_png` draws: task -> method -> (x, mean, std) of the method's complete cells
    over the axis points, x the value on a numeric axis (K), else the point's position from
    1; the first table's rows and columns (PD's Figure 2 draws two of its sweep's methods). A
    point with a gap is left out of the line (the tables mark it)."""
    sets, spec = cell_sets(plan), plan.tables[0]
    out: Series = {}
    for task in spec.columns or plan.expected.tasks:
        xs = plan.axis.x(task) or [float(i) for i in range(1, len(sets) + 1)]
        out[task] = {m: [(x, c.mean, c.std) for x, (_, at) in zip(xs, sets)
                         if (c := at.get((m, task))) is not None and c.complete]
                     for m in spec.rows or plan.expected.methods}
    return out


def axis_png(plan: Plan, series: Series) -> bytes:
    """The papers' line figure of an axis: per task the test metric (x100) over the axis
    points, a line per method (the sweep's row labels) with the std over splits shaded."""
    import numpy as np

    plt, fig, axes = _figure(len(series))
    colors = _colors(plan.expected.methods)
    names = plan.axis.point_names
    metrics = {t: c.metric for _, at in cell_sets(plan) for (_, t), c in at.items() if c.metric}
    legends = legend_panels(series)
    for ax, (task, lines) in zip(axes, series.items()):
        for m, points in lines.items():
            if points:
                x, mean, std = (np.array(v) for v in zip(*points))
                ax.plot(x, mean, marker="o", color=colors[m], label=plan.labels.get(m, m))
                ax.fill_between(x, mean - std, mean + std, color=colors[m], alpha=0.2)
        values = plan.axis.x(task)
        if values is not None and plan.axis.key == "k":  # K doubles from point to point
            ax.set_xscale("log", base=2)
            ax.minorticks_off()
        ticks = values or range(1, len(names) + 1)
        ax.set_xticks(list(ticks), [f"{v:g}" for v in values] if values else names)
        ax.set_title(f"{task} ({metrics[task]})" if task in metrics else task)
        ax.set_xlabel(plan.axis.label)
        ax.set_ylabel("test x100")
        ax.grid(alpha=0.3)
        if task in legends:
            ax.legend(fontsize=7)
    return _png(plt, fig)


def legend_panels(series: Series) -> list[str]:
    """The tasks whose panel gets a legend: the first, and each that draws a method no earlier
    legend names (SMASH Fig. 2: MNLI's settings differ from SST-2's, and each panel has its own)."""
    shown, out = set(), []
    for task, lines in series.items():
        drawn = {m for m, points in lines.items() if points}
        if not out or drawn - shown:
            out.append(task)
            shown |= drawn
    return out


# --- the page -------------------------------------------------------------------------------

_STYLE = """body{font-family:sans-serif;margin:2em;max-width:75em}table{border-collapse:collapse;margin:1em 0}
td,th{border:1px solid #bbb;padding:.3em .6em;text-align:right}td:first-child,th:first-child{text-align:left}
.notes{color:#a00;font-size:90%}img{max-width:100%}"""


def _html_table(table: Table) -> str:
    texts = _cell_texts(table, ("\0b", "\0/b"))
    esc = lambda s: html.escape(s).replace("\0b", "<b>").replace("\0/b", "</b>")  # noqa: E731
    head = "<tr><th>method</th>" + "".join(f"<th>{html.escape(table.header(t))}</th>" for t in table.columns) + "</tr>"
    body = "".join("<tr><td>" + html.escape(table.labels[m]) + "</td>"
                   + "".join(f"<td>{esc(texts[m, t])}</td>" for t in table.columns) + "</tr>" for m in table.rows)
    notes = "".join(f"<li>{html.escape(table.labels[m])} / {html.escape(t)}: {html.escape(why)}</li>"
                    for m, t, why in table.notes())
    caption = " ".join(filter(None, (table.caption(), table.footnote())))
    return (f"<h2>{html.escape(table.title or table.name)}</h2><table>{head}{body}</table><p>{html.escape(caption)}</p>"
            + (f'<ol class="notes">{notes}</ol>' if notes else ""))


def page(plan: Plan, tabs: list[Table], images: dict[str, bytes]) -> str:
    counts = {s: sum(r.status == s for r in plan.runs) for s in ("done", "failed", "stopped")}
    imgs = "".join(f"<h2>{html.escape(title)}</h2><img alt='{html.escape(title)}' "
                   f"src='data:image/png;base64,{base64.b64encode(png).decode()}'>" for title, png in images.items())
    selected = list(csv.reader(io.StringIO(selected_csv(plan))))
    sel = "<table>" + "".join("<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in row) + "</tr>"
                              for row in selected) + "</table>"
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>rayapp report</title>"
            f"<style>{_STYLE}</style></head><body><h1>rayapp report</h1>"
            f"<p>{html.escape(', '.join(plan.sources))}: {len(plan.runs)} runs ({counts['done']} done, "
            f"{counts['failed']} failed, {counts['stopped']} stopped early). Cells: mean (std) over the "
            f"few-shot splits of the test metric x100 at each split's best-dev grid point; bold: best in "
            f"the column; {GAP} [n]: a gap, see the note.</p>"
            + "".join(_html_table(t) for t in tabs) + imgs
            + f"<details><summary>Chosen run of every split</summary>{sel}</details></body></html>")


def write(dirs: list[str], out: str) -> dict:
    """Write the report of `dirs` into the local directory `out`; returns {"markdown", "files"}."""
    plan = gather(dirs)
    tabs = tables(plan)
    outdir = Path(out)
    outdir.mkdir(parents=True, exist_ok=True)
    files, md = [], []
    for t in tabs:
        md.append(markdown(t))
        for suffix, text in ((".md", md[-1]), (".csv", table_csv(t))):
            (outdir / f"{t.name}{suffix}").write_text(text)
            files.append(str(outdir / f"{t.name}{suffix}"))
    (outdir / "selected.csv").write_text(selected_csv(plan))
    if plan.axis is not None:
        images = {"axis.png": (f"Test metric vs {plan.axis.label} (mean over splits, std shaded)",
                               axis_png(plan, axis_series(plan)))}
    else:  # the plots cover every planned method and task (the first table's order)
        everything = Table("all", "", plan.expected.methods, plan.expected.tasks, cells(plan.runs, plan.expected),
                           {m: plan.labels.get(m, m) for m in plan.expected.methods})
        images = {"dev_curves.png": ("Dev metric during training (chosen grid point, mean ± std over splits)",
                                     dev_curves_png(everything)),
                  "test_bars.png": ("Test metric per task (mean ± std over splits)", test_bars_png(everything))}
    for name, (_, png) in images.items():
        (outdir / name).write_bytes(png)
    (outdir / "report.html").write_text(page(plan, tabs, dict(images.values())))
    files += [str(outdir / f) for f in ("selected.csv", *images, "report.html")]
    return {"markdown": "\n".join(md), "files": files}
