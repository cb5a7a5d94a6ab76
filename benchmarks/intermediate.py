"""Throughput and memory of the two data stages before distillation: SMASH sentence pairs
(`rayapp.data.pairs.build_pairs`) and the teacher top-k cache (`rayapp.data.teacher_cache`).

What is measured, and why:
- Pairs, examples/s and peak memory at two corpus sizes (default 10k and 200k documents,
  same number of pairs from each). `build_pairs` claims memory O(N pairs), not O(corpus):
  the corpus is streamed twice and only sampled candidates are kept. So peak RSS should
  stay about flat while the corpus grows 20x; time grows with the corpus (two passes).
- Teacher cache, examples/s of MiniLM-L6 (the local sentence-transformers weights, so the
  MLM head is freshly initialised: right cost, meaningless distribution) at top_k=64, on
  pairs taken from the first build.
- Cache bytes per example: the distribution columns (topk_values fp16 + topk_indices
  int32 + lse + covered) in memory (Arrow) and on disk (parquet), and the whole shard
  files (which also hold the text and input_ids), against the dense fp16 distribution
  (vocab_size * 2 bytes) that the top-k cache replaces.

Corpora are synthesised from the local Wikipedia (WikiExtractor dump, 1,717 articles): its
paragraphs (lines of >= 20 words) are re-sampled with a seeded RNG into documents of 1-3
paragraphs, written as JSONL files of at most 2,500 documents (at least 4 files, so Ray
Data reads them in parallel). A file is read by one task, so a fixed file size keeps the
per-task working set the same at every corpus size (the default sizes give 4 and 80 files
of 2,500 documents each); only the number of files grows.

Every stage runs in a fresh process with its own `ray.init(num_cpus=2)`, so no measurement
inherits another's peak. Reported: the driver's peak RSS (VmHWM; not ru_maxrss, which
carries the launching process's peak across fork + exec) and the peak, sampled every
0.2 s, of the RSS summed over this process's Ray workers (descendants whose process title
starts with "ray::", the node's agents excepted). Summed RSS counts shared pages
(libraries, object-store mappings) once per worker, so it overstates their real footprint;
what matters here is how it moves with corpus size. Seconds are the wall time of the
`build_pairs` / `build_cache` call, Ray worker start-up included.

    python benchmarks/intermediate.py [--docs 10000 200000] [--pairs 20000] [--cache-examples 2000]
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import re
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # loopback only
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DOCS_PER_FILE = 2_500
DIST_COLUMNS = ["topk_values", "topk_indices", "lse", "covered"]


def wikipedia_paragraphs() -> list[str]:
    """Paragraphs of >= 20 words (drops titles and section headings) of the local dump."""
    from rayapp.assets import asset

    paragraphs = []
    for path in sorted(asset("corpus", "wikipedia-en", "AA").iterdir()):
        text = path.read_text(encoding="utf-8", errors="replace")
        for doc in re.findall(r"<doc\s[^>]*>(.*?)</doc>", text, re.S):
            paragraphs += [line for line in doc.splitlines() if len(line.split()) >= 20]
    return paragraphs


def write_corpus(paragraphs: list[str], docs: int, folder: Path, seed: int = 0) -> None:
    """`docs` JSONL documents of 1-3 paragraphs drawn at random from `paragraphs`."""
    rng = random.Random(seed)
    folder.mkdir()
    files = max(4, math.ceil(docs / DOCS_PER_FILE))
    for f in range(files):
        with open(folder / f"part-{f:03d}.jsonl", "w", encoding="utf-8") as out:
            for _ in range(docs // files + (f < docs % files)):
                text = "\n".join(rng.choices(paragraphs, k=rng.randint(1, 3)))
                out.write(json.dumps({"text": text}) + "\n")


def _workers_rss(me) -> int:
    """Summed RSS of this process's Ray workers: descendants titled "ray::..." (IDLE, a
    task or an actor), except the node's agents (ray::DashboardAgent, ray::RuntimeEnvAgent)."""
    import psutil

    total = 0
    for proc in me.children(recursive=True):
        try:
            title = proc.cmdline()[0] if proc.cmdline() else ""
            if title.startswith("ray::") and not title.endswith("Agent"):
                total += proc.memory_info().rss
        except psutil.Error:  # exited between listing and reading
            pass
    return total


def measure(stage: str, source: str, out: str, examples: int) -> dict:
    """Run one stage in this (fresh) process on its own Ray cluster: seconds and peak RSS."""
    import psutil
    import ray

    from rayapp.assets import asset
    from rayapp.data.pairs import build_pairs
    from rayapp.data.teacher_cache import build_cache

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    peak, stop, me = [0], threading.Event(), psutil.Process()

    def sample() -> None:
        while not stop.wait(0.2):
            peak[0] = max(peak[0], _workers_rss(me))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    if stage == "pairs":
        build_pairs(source, out, num_examples=examples, seed=0)
    else:
        examples = build_cache(source, str(asset("models", "all-MiniLM-L6-v2")), out,
                               task="smash-pairs", top_k=64)["examples"]
    seconds = time.perf_counter() - start
    stop.set()
    sampler.join()
    ray.shutdown()
    hwm_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    return {"examples": examples, "seconds": seconds, "driver_mb": hwm_kb / 1024,
            "workers_mb": peak[0] / 2**20}


def in_fresh_process(*args) -> dict:
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        return pool.submit(measure, *args).result()


def cache_bytes(cache: str) -> tuple[dict[str, float], int]:
    """Bytes per example of the cache's distribution columns and shard files; vocab size."""
    import pyarrow.parquet as pq

    from rayapp.data.teacher_cache import cache_meta

    files = sorted(Path(cache).glob("*.parquet"))
    dist = pq.read_table(cache, columns=DIST_COLUMNS)  # the folder's parquet files, not _meta.json
    rows, on_disk = dist.num_rows, 0
    for f in files:
        meta = pq.ParquetFile(f).metadata
        on_disk += sum(meta.row_group(g).column(c).total_compressed_size
                       for g in range(meta.num_row_groups) for c in range(meta.num_columns)
                       if meta.row_group(g).column(c).path_in_schema.split(".")[0] in DIST_COLUMNS)
    sizes = {
        "top-k columns, in memory (Arrow)": dist.nbytes / rows,
        "top-k columns, on disk (parquet)": on_disk / rows,
        "whole shard files (parquet)": sum(f.stat().st_size for f in files) / rows,
    }
    return sizes, cache_meta(cache)["vocab_size"]


def main() -> None:
    import pyarrow.parquet as pq

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--docs", type=int, nargs="+", default=[10_000, 200_000], help="corpus sizes, documents")
    p.add_argument("--pairs", type=int, default=20_000, help="pairs built from each corpus")
    p.add_argument("--cache-examples", type=int, default=2_000, help="pairs scored by the teacher")
    args = p.parse_args()
    paragraphs = wikipedia_paragraphs()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for docs in args.docs:
            corpus = work / f"corpus-{docs}"
            write_corpus(paragraphs, docs, corpus)
            r = in_fresh_process("pairs", str(corpus), str(work / f"pairs-{docs}"), args.pairs)
            rows.append(("pairs", str(docs), r))
        (work / "cache-input").mkdir()
        first = pq.read_table(str(work / f"pairs-{args.docs[0]}"))  # parquet files, not _meta.json
        pq.write_table(first.slice(0, args.cache_examples), work / "cache-input" / "part-00000.parquet")
        r = in_fresh_process("cache", str(work / "cache-input"), str(work / "cache"), args.cache_examples)
        rows.append(("teacher cache (top-64)", "-", r))
        sizes, vocab = cache_bytes(str(work / "cache"))

    print(f"\n{len(paragraphs)} Wikipedia paragraphs re-sampled into documents of 1-3 paragraphs; "
          f"Ray num_cpus=2; MiniLM-L6 teacher on CPU")
    print(f"{'stage':24s}{'corpus docs':>12s}{'examples':>10s}{'seconds':>9s}{'examples/s':>12s}"
          f"{'driver peak RSS MB':>20s}{'workers peak RSS MB':>21s}")
    for stage, docs, r in rows:
        print(f"{stage:24s}{docs:>12s}{r['examples']:>10d}{r['seconds']:>9.1f}"
              f"{r['examples'] / r['seconds']:>12.1f}{r['driver_mb']:>20.0f}{r['workers_mb']:>21.0f}")
    dense = 2 * vocab
    print(f"\n{'cache bytes/example':36s}{'bytes':>10s}{'dense fp16 / this':>19s}")
    for name, size in sizes.items():
        print(f"{name:36s}{size:>10.1f}{dense / size:>18.1f}x")
    print(f"{f'dense fp16 (vocab {vocab} x 2 B)':36s}{dense:>10.1f}{1:>18.1f}x")


if __name__ == "__main__":
    main()
