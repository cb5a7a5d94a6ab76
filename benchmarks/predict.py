"""Rows/s of `rayapp predict` against a bare PyTorch forward loop over the same rows.

Model: the local MiniLM-L6 MLM (`minilm-l6-mlm-wiki`), prompt fine-tuned for 2 steps on
SST-2 split 13 and exported with `rayapp export` (throughput does not depend on the
weights). Rows: the first `--rows` sentences of full SST-2's train.tsv, as a TSV (what a
user brings). Both sides classify with the exported prompt (label words at the mask), 2 CPU
threads, batches of at most `--tokens` padded tokens over length-sorted rows: the bare loop
is the strongest plain loop, so the ratio is what Ray Data, the shard plan, reading and
writing parquet cost.
- bare: in this process, the model loaded from the exported folder with `transformers`, the
  rows read with `csv`, encoded, classified; load included. Run before and after rayapp, the
  mean is the reference (load from others on a shared machine moves both).
- rayapp: `rayapp.ship.predict.run` end to end on a local Ray cluster (2 CPUs) started
  before the clock: the plan, the actor pool's start-up and model load, and the parquet
  shards written; one actor with 2 CPUs (`--layouts 1x2 2x1` adds two actors of 1 CPU each:
  0.83x against 0.85x for 1x2 at 20,000 rows, the same run).
`--smoke`: the tests' tiny random BERT, a few hundred rows (CI runs it).

    python benchmarks/predict.py [--rows 60000] [--tokens 4096] [--layouts 1x2 2x1] [--smoke]
"""
from __future__ import annotations

import argparse
import csv
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # tiny.py

from rayapp import env  # noqa: E402

env.apply(env.LOCAL)


def exported_model(work: Path, smoke: bool) -> str:
    """An exported prompt FT run (2 steps) of the benchmark's model."""
    from rayapp.assets import asset
    from rayapp.recipes.finetune import FinetuneConfig, run
    from rayapp.ship.export import ExportConfig, run as export
    from rayapp.train.engine import EngineConfig

    if smoke:
        from tiny import make_tiny_random_model

        model = str(make_tiny_random_model("wordpiece", work / "tiny-bert", dropout=0.0))
    else:
        model = str(asset("models", "minilm-l6-mlm-wiki"))
    record = run(FinetuneConfig(task="SST-2", model=model, max_steps=2, eval_every=2, batch_size=8, max_length=128,
                                output_dir=str(work / "runs"), name="predict-bench", engine=EngineConfig(num_workers=1)))
    export(ExportConfig(run=record["record"], out=str(work / "model"), onnx=False))
    return str(work / "model")


def bare_loop(model: str, table: str, tokens: int) -> dict:
    """The exported classifier over the TSV's sentences: load, read, encode, classify."""
    import torch

    from rayapp.ship.export import Classifier

    start = time.perf_counter()
    classifier = Classifier(model)
    with open(table, newline="") as f:
        rows = [r[0] for r in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)][1:]
    probs = classifier.probs(classifier.encode(rows), tokens)
    labels = probs.argmax(-1)
    assert len(labels) == len(rows) and torch.isfinite(probs).all()
    return {"seconds": time.perf_counter() - start, "rows": len(rows)}


def rayapp_predict(model: str, table: str, out: str, tokens: int, actors: int, cpus: int) -> dict:
    from rayapp.ship.predict import PredictConfig, run

    start = time.perf_counter()
    stats = run(PredictConfig(model=model, input=table, out=out, text_column="sentence", tokens_per_batch=tokens,
                              num_actors=actors, cpus_per_actor=cpus, rows_per_shard=2000))
    return {"seconds": time.perf_counter() - start, "rows": stats["rows"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=60_000)
    p.add_argument("--layouts", nargs="+", default=["1x2"], help="actors x CPUs per actor, e.g. 1x2 2x1")
    p.add_argument("--tokens", type=int, default=4096, help="padded tokens per forward pass")
    p.add_argument("--smoke", action="store_true", help="tiny random BERT, 300 rows, both layouts (CI)")
    args = p.parse_args()
    rows = 300 if args.smoke else args.rows
    layouts = ["1x2", "2x1"] if args.smoke else args.layouts

    import ray
    import torch

    from rayapp.assets import asset

    torch.set_num_threads(2)
    ray.init(num_cpus=2, include_dashboard=False)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = exported_model(work, args.smoke)
        table = work / "sst2.tsv"
        with open(asset("glue", "SST-2", "train.tsv")) as f:
            table.write_text("".join(line for _, line in zip(range(rows + 1), f)))
        bare = [bare_loop(model, str(table), args.tokens)]
        ours = {f"{a} actor(s) x {c} CPU(s)": rayapp_predict(model, str(table), str(work / f"out-{a}"), args.tokens,
                                                              a, c)
                for a, c in (map(int, layout.split("x")) for layout in layouts)}
        bare.append(bare_loop(model, str(table), args.tokens))
    reference = sum(b["seconds"] for b in bare) / len(bare)
    print(f"\nrayapp predict vs bare PyTorch, {'tiny BERT' if args.smoke else 'MiniLM-L6'}, {rows} SST-2 rows, "
          f"<= {args.tokens} padded tokens per batch, 2 CPUs")
    print(f"{'':40s}{'seconds':>9s}{'rows/s':>9s}{'/ bare':>8s}")
    for name, r in [("bare PyTorch loop (before)", bare[0]), ("bare PyTorch loop (after)", bare[1]), *ours.items()]:
        print(f"{name:40s}{r['seconds']:9.1f}{r['rows'] / r['seconds']:9.1f}{reference / r['seconds']:8.2f}")


if __name__ == "__main__":
    main()
