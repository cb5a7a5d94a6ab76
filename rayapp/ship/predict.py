"""`rayapp predict MODEL --input TABLE --out DIR`: an exported student labels a table or a
corpus as a Ray Data batch-inference job (issue 29).

MODEL is a folder `rayapp export` wrote (local or `s3://`): its config holds the task, the
template and the verbalizer (`rayapp.ship.export.load`), so any recipe's exported model
predicts as it was evaluated. The input is a file or a folder of `.tsv`/`.csv`/`.jsonl`/
`.parquet` files (local or `s3://`), a `datasets` `save_to_disk` folder or `hf://NAME`
(its asset-mirror copy, else the hub through `datasets`). `text_column` (and
`text_b_column` for two-sentence tasks) name the inputs; a TSV/CSV without a header
(`header=false`) names them by 0-based position.

Output (`DIR`, local or `s3://`): parquet shards with `id` (the `id_column` value, else
`FILE#ROW`: the file's name under the input root and the row's 0-based number among its
data rows, independent of how the file was cut), `label` and `probs` (the class
probabilities, in the order of `labels` in `_meta.json`); a regression task writes
`score` (the expected value over its two label words) instead of both. Rows keep their
input order within a shard.

Pipeline, the teacher cache's (`rayapp.data.teacher_cache`): a driver-side shard plan, then
an autoscaling actor pool (`rayapp.modeling.scorer.pool_args`, one GPU per actor with
`use_gpu`) in which each call reads one shard's rows, classifies them in batches of at most
`tokens_per_batch` padded tokens (rows sorted by length, so short rows share batches and
padding stays small) and writes the shard whole. Resumable per shard: `_plan.json` first, a
re-run with the same plan skips the shards that exist, `_meta.json` last.

Shards are a pure function of the input and `rows_per_shard`: shard `part-FFFFF-CCCCC`
holds data rows [CCCCC*R, (CCCCC+1)*R) of input file FFFFF.
- Parquet files are cut by rows (the footer has the counts); a shard reads only its row groups.
- Text files (TSV/CSV/JSONL) are cut by bytes, at record starts found in one streaming pass
  over each file on the driver: a JSONL or TSV record is a line, a CSV record ends at the
  first line end outside a quoted field (an even number of `"` so far: RFC 4180 doubles a
  quote inside a quoted field), so a field holding newlines never splits a shard. The pass
  costs a read of the input; the shards then read only their own bytes.
- Arrow streams (`save_to_disk` and `datasets` cache files) cannot seek: a shard reads its
  file from the start and skips to its rows.
TSV follows GLUE (no quoting: a tab or newline never sits inside a field), CSV RFC 4180.
Blank lines are not rows. A `hf://` dataset without a mirror copy is loaded by `datasets`
on the driver: its cache files are on the driver's disk only, so on a multi-node cluster
that is refused (`storage.require_shared`); mirror it (`rayapp assets pull`) or give s3://.
"""
from __future__ import annotations

import csv
import io
import json
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import pyarrow as pa

from rayapp import env, storage
from rayapp.config import InputPath, OutputPath, require_counts
from rayapp.data import shards
from rayapp.data.corpus import relative_name
from rayapp.data.formats import iter_lines, suffix_format
from rayapp.errors import ConfigError, DataError

STAGE = "predict"
INPUT_FORMATS = ("tsv", "csv", "jsonl", "parquet", "arrow")


@dataclass
class PredictConfig:
    """`rayapp predict MODEL --input TABLE --out DIR [key=value ...]`"""

    model: InputPath  # a folder `rayapp export` wrote (local or s3://)
    input: InputPath  # file or folder (tsv/csv/jsonl/parquet), save_to_disk folder, hf://NAME, s3://
    out: OutputPath  # the predictions folder (local or s3://)
    text_column: str = "text"  # the first input; a 0-based position for a TSV/CSV without header
    text_b_column: str | None = None  # the second input, for two-sentence tasks
    id_column: str | None = None  # the row's id; None: FILE#ROW
    header: bool = True  # TSV/CSV: the first row names the columns
    fmt: str | None = None  # one of INPUT_FORMATS; None: from each file's suffix
    tokens_per_batch: int = 4096  # padded tokens per forward pass
    rows_per_shard: int = 10_000
    num_actors: int | None = None  # most actors; None: as many as the cluster gives
    use_gpu: bool = False  # one GPU per actor
    cpus_per_actor: int = 1

    def __post_init__(self) -> None:
        require_counts(self, "tokens_per_batch", "rows_per_shard", "cpus_per_actor", "num_actors")
        if self.fmt is not None and self.fmt not in INPUT_FORMATS:
            raise ConfigError(f"fmt={self.fmt!r} is not an input format; use one of {', '.join(INPUT_FORMATS)}")


@dataclass(frozen=True)
class Piece:
    """One output shard's input: data rows [row, row + rows) of file `uri`, which are its
    bytes [start, stop) for a text file and its rows [start, stop) otherwise; `columns`: where
    text_a, text_b and the id are in this file (names; positions in a TSV/CSV; None: not asked)."""

    name: str
    uri: str
    file: str  # the file's name under the input root (ids)
    fmt: str
    start: int
    stop: int
    row: int
    rows: int
    columns: tuple


# --- inputs ----------------------------------------------------------------------------------

def _files(uri: str, fmt: str | None) -> tuple[list[tuple[str, str]], str]:
    """`(uri, fmt)` of every input file, in name order, and the root their names are under."""
    from rayapp import assets

    if uri.startswith("hf://"):
        mirrored = assets.resolve(uri)
        if mirrored == uri:  # from the hub, into the driver's `datasets` cache
            from rayapp.data.formats import load_hf

            files = [f["filename"] for f in load_hf(uri).cache_files]
            return [(f, "arrow") for f in files], os.path.dirname(files[0]) if files else ""
        uri = mirrored
    if storage.exists(storage.join(uri, "state.json")):  # a save_to_disk folder
        state = json.loads(storage.read_text(storage.join(uri, "state.json")))
        return [(storage.join(uri, f["filename"]), "arrow") for f in state["_data_files"]], uri
    if not storage.exists(uri):
        raise DataError(f"input={uri} does not exist; give a file or folder of .tsv/.csv/.jsonl/.parquet, "
                        "a save_to_disk folder or hf://NAME")
    files = sorted(f for f in storage.list_files(uri) if not f.rsplit("/", 1)[-1].startswith((".", "_")))
    if not files:
        raise DataError(f"input={uri} holds no files; point it at a table or a folder of tables")
    found = []
    for f in files:
        kind = fmt or {"json": "jsonl"}.get(suffix_format(f), suffix_format(f))
        if kind not in INPUT_FORMATS:
            raise DataError(f"cannot tell the format of {f} from its name; supported: .tsv .csv .jsonl .parquet, "
                            "or pass fmt=")
        found.append((f, kind))
    return found, uri


def _records(uri: str, fmt: str) -> Iterator[tuple[int, bytes]]:
    """`(byte offset, first line)` of each non-blank record of a text file (module docstring)."""
    fs, path = storage.filesystem(uri)
    with fs.open_input_stream(path) as f:
        start, first, quotes = None, b"", 0
        for offset, line in iter_lines(f):
            if start is None:
                start, first = offset, line
            if fmt == "csv":
                quotes += line.count(b'"')
                if quotes % 2:  # inside a quoted field: the record goes on
                    continue
            if first.strip() or start != offset:
                yield start, first
            start, quotes = None, 0


def _text_file(uri: str, fmt: str, header: bool, rows_per_shard: int) -> tuple[list, int, list[str] | None]:
    """A text file's `(byte start, byte stop, first row)` per shard, its rows and its column
    names (a header's; a JSONL file's first record's keys; None: a TSV/CSV without header)."""
    cuts, names, row = [], None, 0
    for offset, line in _records(uri, fmt):
        if names is None and (header or fmt == "jsonl"):
            names = _parse(line.decode("utf-8-sig", errors="replace"), fmt, uri)[0] if fmt != "jsonl" \
                else list(_json_record(line, uri, 0))
            if fmt != "jsonl":
                continue
        if row % rows_per_shard == 0:
            cuts.append((offset, row))
        row += 1
    fs, path = storage.filesystem(uri)
    ends = [o for o, _ in cuts[1:]] + [fs.get_file_info(path).size]
    return [(s, e, first) for (s, first), e in zip(cuts, ends)], row, names


def _table_file(uri: str, fmt: str) -> tuple[int, list[str]]:
    """Rows and column names of a parquet file or an Arrow stream."""
    import pyarrow.parquet as pq

    fs, path = storage.filesystem(uri)
    try:
        if fmt == "parquet":
            with fs.open_input_file(path) as f:
                meta = pq.ParquetFile(f).metadata
            return meta.num_rows, meta.schema.to_arrow_schema().names
        with fs.open_input_stream(path) as f:
            reader = pa.ipc.open_stream(f)
            return sum(b.num_rows for b in reader), reader.schema.names
    except pa.ArrowException as e:
        raise DataError(f"input file {uri} is not a readable {fmt} file ({e}); replace or remove it") from None


def _columns(cfg: PredictConfig, names: list[str] | None, fmt: str, uri: str) -> tuple:
    """Where text_a, text_b and the id are in one file: names, or positions in a TSV/CSV."""
    refs = []
    for key in ("text_column", "text_b_column", "id_column"):
        column = getattr(cfg, key)
        if column is None:
            refs.append(None)
        elif names is None:
            if not str(column).lstrip("-").isdigit():
                raise DataError(f"{uri} is read without a header (header=false), so {key}={column!r} must be a "
                                "0-based column position")
            refs.append(int(column))
        elif str(column) not in names:
            raise DataError(f"{uri} has no column {column!r} ({key}); its columns are {names}. Pass {key}=<one of "
                            "them>")
        else:
            refs.append(names.index(str(column)) if fmt in ("tsv", "csv") else str(column))
    return tuple(refs)


def plan(cfg: PredictConfig, num_inputs: int) -> tuple[list[Piece], int]:
    """The shard plan (module docstring) and the input's total rows; the columns are
    checked on every file before any work."""
    if num_inputs == 2 and cfg.text_b_column is None:
        raise ConfigError("the model's task takes two sentences: pass text_b_column=<column of the second one>")
    if num_inputs == 1 and cfg.text_b_column is not None:
        raise ConfigError(f"the model's task takes one sentence, but text_b_column={cfg.text_b_column!r} is set; "
                          "drop it")
    files, root = _files(cfg.input, cfg.fmt)
    pieces: list[Piece] = []
    for f, (uri, fmt) in enumerate(files):
        if fmt in ("parquet", "arrow"):
            rows, names = _table_file(uri, fmt)
            cuts = [(s, min(s + cfg.rows_per_shard, rows), s) for s in range(0, rows, cfg.rows_per_shard)]
        else:
            cuts, rows, names = _text_file(uri, fmt, cfg.header, cfg.rows_per_shard)
        if not rows:
            continue
        columns, name = _columns(cfg, names, fmt, uri), relative_name(uri, root)
        pieces += [Piece(shards.shard_name(f, c), uri, name, fmt, start, stop, first,
                         min(cfg.rows_per_shard, rows - first), columns)
                   for c, (start, stop, first) in enumerate(cuts)]
    if not pieces:
        raise DataError(f"input={cfg.input} has no data rows; give a table with at least one row to label")
    return pieces, sum(p.rows for p in pieces)


def _read_bytes(uri: str, start: int, stop: int) -> bytes:
    fs, path = storage.filesystem(uri)
    with fs.open_input_file(path) as f:
        f.seek(start)
        return f.read(stop - start)


def _parse(text: str, fmt: str, uri: str) -> list[list[str]]:
    """The non-blank rows of TSV/CSV text."""
    quoting = csv.QUOTE_NONE if fmt == "tsv" else csv.QUOTE_MINIMAL
    try:
        return [r for r in csv.reader(io.StringIO(text, newline=""), delimiter="\t" if fmt == "tsv" else ",",
                                      quoting=quoting) if r and (len(r) > 1 or r[0].strip())]
    except csv.Error as e:
        raise DataError(f"{uri} cannot be read as {fmt.upper()} ({e}); fix the file") from None


def _json_record(line: bytes, uri: str, row: int) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{uri} data row {row} is not valid JSON ({e}); fix or delete that line") from None
    if not isinstance(record, dict):
        raise DataError(f"{uri} data row {row} is not a JSON object (JSONL needs one object a line)")
    return record


def read_piece(piece: Piece) -> list[list]:
    """`[text_a, text_b, id]` per row of a piece (None where a column is not asked for)."""
    if piece.fmt in ("tsv", "csv", "jsonl"):
        data = _read_bytes(piece.uri, piece.start, piece.stop)
        if piece.fmt == "jsonl":
            rows = [_json_record(line, piece.uri, piece.row + i)
                    for i, line in enumerate(line for line in data.split(b"\n") if line.strip())]
        else:
            rows = _parse(data.decode("utf-8-sig", errors="replace"), piece.fmt, piece.uri)
        if len(rows) != piece.rows:
            raise DataError(f"{piece.uri} changed since the plan: bytes {piece.start}..{piece.stop} hold {len(rows)} "
                            f"rows, not {piece.rows}; write predictions of the new file to a new --out")
        try:
            return [[(r.get(c) if isinstance(r, dict) else r[c]) if c is not None else None for c in piece.columns]
                    for r in rows]
        except IndexError:
            raise DataError(f"{piece.uri}: a row among data rows {piece.row}..{piece.row + piece.rows - 1} has too "
                            "few fields for the columns asked; fix that row") from None
    table = _read_rows(piece)
    return [list(t) for t in zip(*[table[c].to_pylist() if c is not None else [None] * table.num_rows
                                   for c in piece.columns])]


def _read_rows(piece: Piece) -> pa.Table:
    """Rows [start, stop) of a parquet file or an Arrow stream."""
    if piece.fmt == "parquet":
        from rayapp.data.teacher_cache import read_range

        return read_range(piece.uri, piece.start, piece.stop, None)
    fs, path = storage.filesystem(piece.uri)
    batches, seen = [], 0
    with fs.open_input_stream(path) as f:
        for batch in pa.ipc.open_stream(f):
            lo, hi = max(piece.start - seen, 0), min(piece.stop - seen, batch.num_rows)
            if hi > lo:
                batches.append(batch.slice(lo, hi - lo))
            seen += batch.num_rows
            if seen >= piece.stop:
                break
    return pa.Table.from_batches(batches)


# --- the batch-inference job -------------------------------------------------------------------

class Predictor:
    """Ray Data actor: classifies whole pieces with the exported model and writes each
    shard. Output: one row per shard (`name`, `rows`, `tokens` scored without padding,
    `start`/`end` wall clock, `entry` for `_meta.json`)."""

    def __init__(self, model: str, out: str, tokens_per_batch: int):
        from rayapp.modeling.models import local_model_dir
        from rayapp.modeling.scorer import actor_device
        from rayapp.ship.export import Classifier

        self.classifier = Classifier(local_model_dir(model), actor_device())  # s3://: fetched once per node
        self.out, self.tokens_per_batch = out, tokens_per_batch

    def __call__(self, batch: pa.Table) -> pa.Table:
        done = {"name": [], "rows": [], "tokens": [], "start": [], "end": [], "entry": []}
        for item in batch.to_pylist():
            done["start"].append(time.time())
            piece = Piece(**{**item, "columns": tuple(item["columns"])})
            table, tokens = self.predict(piece)
            done["entry"].append(shards.write_table(storage.join(self.out, piece.name), table))
            done["name"].append(piece.name)
            done["rows"].append(table.num_rows)
            done["tokens"].append(tokens)
            done["end"].append(time.time())
        return pa.table(done)

    def predict(self, piece: Piece) -> tuple[pa.Table, int]:
        rows = read_piece(piece)
        ids = [f"{piece.file}#{piece.row + i}" if r[2] is None else str(r[2]) for i, r in enumerate(rows)]
        encoded = self.classifier.encode([r[0] for r in rows], [r[1] for r in rows])
        probs = self.classifier.probs(encoded, self.tokens_per_batch)
        task = self.classifier.task
        columns = {"id": pa.array(ids, pa.string())}
        if task.is_regression:
            from rayapp.tasks.prompts import regression_prediction

            columns["score"] = pa.array(regression_prediction(probs, task.bounds).numpy(), pa.float32())
        else:
            from rayapp.modeling.scorer import fixed_lists

            columns["label"] = pa.array([task.labels[i] for i in probs.argmax(-1).tolist()], pa.string())
            columns["probs"] = fixed_lists(probs, pa.float32())
        return pa.table(columns), sum(len(e["input_ids"]) for e in encoded)


def run(cfg: PredictConfig) -> dict:
    """Label every input row with the exported model and write the predictions (module
    docstring). Resumable. Returns stats: rows (in the whole output), computed (this run),
    shards_written, shards_skipped, seconds (the Ray job), rows_per_s, tokens_per_s."""
    import ray

    from rayapp.modeling.models import portable_model
    from rayapp.modeling.scorer import pool_args
    from rayapp.ship.export import PROMPT_KEY, read_prompt
    from rayapp.tasks.prompts import Task

    prompt = read_prompt(cfg.model)  # not an export: one line, before Ray starts
    task = Task(**prompt["task"])
    pieces, total = plan(cfg, task.num_inputs)
    # actors on any node read the input and the model and write the shards
    storage.makedirs(cfg.out)
    storage.require_shared({"model": cfg.model, "out": cfg.out, "input": pieces[0].uri})
    env.start_ray()
    settings = {"stage": STAGE, "model": cfg.model, PROMPT_KEY: prompt, "input": cfg.input,
                "columns": [cfg.text_column, cfg.text_b_column, cfg.id_column], "header": cfg.header,
                "rows_per_shard": cfg.rows_per_shard, "pieces": [[p.name, p.uri, p.start, p.stop] for p in pieces]}
    done = shards.begin(cfg.out, settings, "predictions folder")
    todo = [p for p in pieces if p.name not in done]
    start, written = time.perf_counter(), []
    if todo:
        written = ray.data.from_items([asdict(p) for p in todo], override_num_blocks=len(todo)).map_batches(
            Predictor, fn_constructor_kwargs={"model": portable_model(cfg.model), "out": cfg.out,
                                              "tokens_per_batch": cfg.tokens_per_batch},
            **pool_args(cfg.num_actors, cfg.use_gpu, cfg.cpus_per_actor),
        ).take_all()
    seconds = time.perf_counter() - start
    shards.write_meta(cfg.out, {
        "stage": STAGE, "plan": settings, "rows": total, "files": [p.name for p in pieces],
        "columns": ["id", "score"] if task.is_regression else ["id", "label", "probs"],
        "labels": None if task.is_regression else list(task.labels),
    }, {r["name"]: r["entry"] for r in written})
    computed, tokens = sum(r["rows"] for r in written), sum(r["tokens"] for r in written)
    return {"rows": total, "computed": computed, "shards_written": len(todo), "shards_skipped": len(pieces) - len(todo),
            "seconds": seconds, "rows_per_s": computed / seconds if computed else 0.0,
            "tokens_per_s": tokens / seconds if tokens else 0.0}
