"""Throughput and memory of the two data stages before distillation: SMASH sentence pairs
(`rayapp.data.pairs.build_pairs`) and the teacher top-k cache (`rayapp.data.teacher_cache`).

What is measured, and why:
- Pairs at corpus scale (issue 18): 2.56M pairs (SMASH's size) from the local Wikipedia
  (WikiExtractor, 1,717 articles, 25 MB) repeated 10x and 40x (1 GB), written by
  `write_wikipedia_corpus` into a temporary folder in two shapes: one JSONL file with a
  document per line (like the common Wikipedia JSONL dumps) and 1,000 WikiExtractor files.
  Each case runs in a fresh process: `build_pairs` on its own `ray.init(num_cpus=2)`, then,
  Ray shut down, the plain builder (`plain_pairs`: one process, the whole corpus in
  memory as Python lists, the same sentence filter, labels and exact counts) on the same
  corpus, at the CPU priority Ray gives its workers (nice 15), so that others' work on
  this shared machine slows both alike. Reported: both wall times and their ratio (the
  speed of `build_pairs` relative to the plain builder), and peak memory as PSS summed
  over the whole process tree, sampled every 0.25 s (`TreeUsage`; with Ray: driver, GCS, raylet, agents, workers; PSS
  shares a page among the processes mapping it, so object-store and library pages count
  once). `build_pairs` should be ahead of the plain builder and its peak flat from 10x to
  40x. The machine is shared: the load average (others' work) is printed with each case,
  and so are the CPU seconds of each build (its whole process tree), which that load
  changes far less than wall time.
- The same build across nodes (issue 30): the largest corpus as one JSONL file, built by a
  driver of a local cluster (`cluster.local_cluster`) of one 2-CPU node, then of a 0-CPU
  head plus two one-CPU worker nodes (each in its own namespaces with a private /tmp), the
  corpus and the output on a folder all nodes see (as a shared filesystem would be; the
  benchmark's work folder is under `runs/`, not /tmp, for that). Spreading the build must
  not slow it: reported are both wall times, their ratio and each tree's peak PSS.
- Teacher cache against bare PyTorch, in one run: the real local teacher
  (`minilm-l6-mlm-wiki`) at top_k=64 on pairs taken from the first build, in
  `CACHE_SHARDS` shards (at least two per actor, so the actors finish together). Tokens/s
  (prompt tokens, padding excluded) of `build_cache`, over the whole call (Ray and actor
  start-up, teacher loading, reading, encoding, top-k, writing) and over its scoring window
  (first shard's start to last shard's end), next to a bare PyTorch loop over the same
  batches (same shards, same length-sorted batches, same `LogitsAt` forward: encoder plus
  the head at the mask) with `torch.set_num_threads(2)`, timing the forward passes only.
  The bare loop runs before and after the build so that load from others on this shared
  machine shows as the spread between its two runs. Tokens per CPU-second (the build: CPU
  time of all its Ray workers, start-up included; bare: the process's CPU time in the
  forward passes) compares the work each does, which others' load changes far less.
- Cache bytes per example: the distribution columns (topk_values fp16 + topk_indices
  int32 + lse + covered) in memory (Arrow) and on disk (parquet), and the whole shard
  files (which also hold the text and input_ids), against the dense fp16 distribution
  (vocab_size * 2 bytes) that the top-k cache replaces.

The cache stage runs in a fresh process with its own `ray.init(num_cpus=2)`. Reported for
it: the driver's peak RSS (VmHWM; not ru_maxrss, which carries the launching process's
peak across fork + exec) and the peak, sampled every 0.2 s, of the RSS summed over this
process's Ray workers (descendants whose process title starts with "ray::", the node's
agents excepted). Seconds are wall times of whole calls, Ray worker start-up included.

    python benchmarks/intermediate.py [--copies 10 40] [--pairs 2560000] [--cache-examples 2000]
    python benchmarks/intermediate.py --copies 1 --pairs 100000   # a quick run (minutes)
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import re
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # cluster/ (the local multi-node cluster)

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # loopback only
# Ray's default worker pool, as `rayapp` runs for a user (`make` exports the test session's
# 6 warm idle workers, which cost this build memory and start-up CPU)
os.environ.pop("RAY_num_workers_soft_limit", None)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CACHE_SHARDS = 8  # of the cache input: 4 per actor on 2 CPUs
TEACHER = ("models", "minilm-l6-mlm-wiki")
DIST_COLUMNS = ["topk_values", "topk_indices", "lse", "covered"]


# --- pairs: the 1 GB case ------------------------------------------------------------------

RAY_WORKER_NICENESS = 15  # Ray's default (RAY_worker_niceness): tasks run at this priority
SHAPES = {"jsonl": "one JSONL file", "wikiextractor": "1,000 WikiExtractor files"}


def write_wikipedia_corpus(folder: Path, copies: int, files: int = 1000) -> None:
    """The local Wikipedia (WikiExtractor, 1,717 articles, 25 MB) repeated `copies` times,
    in both SHAPES: `folder/jsonl/wiki.jsonl` (a document per line: id, url, title, text,
    like the common Wikipedia JSONL dumps) and `folder/wikiextractor/wiki_NNNN`, `files`
    files of consecutive documents. Copy c of article i is document `i-c`."""
    from rayapp.assets import asset

    articles = []
    for path in sorted(asset("corpus", "wikipedia-en", "AA").iterdir()):
        text = path.read_text(encoding="utf-8", errors="replace")
        articles += [(dict(re.findall(r'(\w+)="([^"]*)"', attrs)), body)
                     for attrs, body in re.findall(r"<doc\s([^>]*)>(.*?)</doc>", text, re.S)]
    (folder / "jsonl").mkdir(parents=True)
    (folder / "wikiextractor").mkdir()
    total = copies * len(articles)
    outs = [open(folder / "wikiextractor" / f"wiki_{f:04d}", "w", encoding="utf-8") for f in range(files)]
    with open(folder / "jsonl" / "wiki.jsonl", "w", encoding="utf-8") as jsonl:
        for n in range(total):
            attrs, body = articles[n % len(articles)]
            ident = f"{attrs['id']}-{n // len(articles)}"
            jsonl.write(json.dumps({"id": ident, "url": attrs["url"], "title": attrs["title"],
                                    "text": body.strip()}) + "\n")
            outs[n * files // total].write(f'<doc id="{ident}" url="{attrs["url"]}" title="{attrs["title"]}">'
                                           f"{body}</doc>\n")
    for out in outs:
        out.close()


def plain_pairs(files: list[str], fmt: str, out: str, num_examples: int, seed: int = 0) -> None:
    """The plain builder: one process, the whole corpus in memory as Python lists, the same
    sentence filter (`document_sentences`), labels, exact balanced counts and parquet shards."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from rayapp.data.corpus import document_sentences
    from rayapp.data.pairs import PAIRS_SCHEMA, label_counts

    docs = []  # (doc_id, sentences, positions) of documents with a kept sentence
    for path in files:
        data = Path(path).read_text(encoding="utf-8", errors="replace")
        if fmt == "jsonl":
            texts = [(f"{path}#{n}", json.loads(line)["text"]) for n, line in enumerate(data.splitlines())]
        else:
            texts = re.findall(r'<doc id="([^"]*)"[^>]*>(.*?)</doc>', data, re.S)
        for doc_id, text in texts:
            doc = document_sentences(text)
            if doc.sentences:
                docs.append((doc_id, doc.sentences, doc.positions))
    rng, need = random.Random(seed), label_counts(num_examples)
    adjacent = [(d, i, d, i + 1, 2) for d, (_, _, pos) in enumerate(docs)
                for i in range(len(pos) - 1) if pos[i + 1] == pos[i] + 1]
    rows = rng.sample(adjacent, need[2])
    picked = set()  # label 1: a document weighted by its ordered pairs, then a pair in it
    weights = [len(pos) * (len(pos) - 1) for _, _, pos in docs]
    while len(picked) < need[1]:
        for d in rng.choices(range(len(docs)), weights, k=need[1] - len(picked)):
            i, j = rng.sample(range(len(docs[d][2])), 2)
            if abs(docs[d][2][i] - docs[d][2][j]) > 1:
                picked.add((d, i, d, j, 1))
    rows += sorted(picked)
    sentences = [(d, i) for d, (_, s, _) in enumerate(docs) for i in range(len(s))]
    picked = set()
    while len(picked) < need[0]:
        (da, i), (db, j) = rng.choice(sentences), rng.choice(sentences)
        if da != db:
            picked.add((da, i, db, j, 0))
    rows += sorted(picked)
    rng.shuffle(rows)
    os.makedirs(out)
    for s in range(math.ceil(len(rows) / 100_000)):
        part = rows[s * 100_000:(s + 1) * 100_000]
        pq.write_table(pa.table({
            "text_a": [docs[d][1][i] for d, i, _, _, _ in part], "text_b": [docs[d][1][j] for _, _, d, j, _ in part],
            "label": [r[4] for r in part], "doc_a": [docs[r[0]][0] for r in part],
            "doc_b": [docs[r[2]][0] for r in part], "sent_a": [docs[d][2][i] for d, i, _, _, _ in part],
            "sent_b": [docs[d][2][j] for _, _, d, j, _ in part]}, schema=PAIRS_SCHEMA), f"{out}/part-{s:05d}.parquet")


def _process_kind(cmdline: list[str]) -> str:
    """A short name for a process of the tree: Ray's title (`ray::IDLE`, `ray::_split_source`),
    its daemon (gcs_server, raylet) or script."""
    if not cmdline:
        return "?"
    if cmdline[0].startswith("ray::"):
        return cmdline[0].split()[0]
    return next((Path(a).name for a in cmdline if a.endswith((".py", "raylet", "gcs_server"))),
                Path(cmdline[0]).name)


class TreeUsage:
    """This process and its descendants (with Ray running: the driver, GCS, raylet, agents
    and workers) while the block runs: the peak, sampled every 0.25 s, of their summed PSS
    (a shared page is split among the processes that map it, so object-store and library
    pages count once) and the CPU seconds they used (user + system), which others' load on
    the machine changes far less than wall time."""

    def __init__(self):
        import psutil

        self.me, self.peak, self.stop = psutil.Process(), 0, threading.Event()
        self.at_peak: dict[str, int] = {}  # process kind -> summed PSS at the peak
        self.cpu: dict[int, list[float]] = {}  # pid -> CPU seconds at the start (0: started later), now
        self.started = False

    def _sample(self) -> None:
        import psutil

        total, parts = 0, {}
        for proc in [self.me, *self.me.children(recursive=True)]:
            try:
                pss = proc.memory_full_info().pss
                total += pss
                name = _process_kind(proc.cmdline())
                parts[name] = parts.get(name, 0) + pss
                times = proc.cpu_times()
                now = times.user + times.system
                self.cpu.setdefault(proc.pid, [now if not self.started else 0.0, now])[1] = now
            except psutil.Error:  # exited between listing and reading
                pass
        if total > self.peak:
            self.peak, self.at_peak = total, parts

    @property
    def cpu_seconds(self) -> float:
        return sum(end - start for start, end in self.cpu.values())

    def __enter__(self):
        self._sample()  # CPU baseline of the processes that exist already
        self.started = True

        def sample():
            while not self.stop.wait(0.25):
                self._sample()

        self.thread = threading.Thread(target=sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self._sample()


def measure_pairs(corpus: str, fmt: str, out: str, examples: int) -> dict:
    """In this (fresh) process: `build_pairs` on a local Ray cluster, then, with Ray shut
    down, the plain builder: seconds and peak PSS of each (Ray: the whole process tree)."""
    import ray

    from rayapp.data.pairs import build_pairs

    load = [os.getloadavg()[0]]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    with TreeUsage() as ray_usage:
        start = time.perf_counter()
        stats = build_pairs(corpus, f"{out}-ray", examples, seed=0, fmt=fmt)
        ray_seconds = time.perf_counter() - start
    ray.shutdown()
    load.append(os.getloadavg()[0])
    os.nice(RAY_WORKER_NICENESS - os.nice(0))  # the CPU priority Ray's workers ran at
    with TreeUsage() as plain_usage:
        start = time.perf_counter()
        plain_pairs(sorted(str(f) for f in Path(corpus).iterdir()), fmt, f"{out}-plain", examples)
        plain_seconds = time.perf_counter() - start
    load.append(os.getloadavg()[0])
    return {"sources": stats["sources"], "load": load,
            "ray": {"s": ray_seconds, "cpu_s": ray_usage.cpu_seconds, "mb": ray_usage.peak / 2**20},
            "plain": {"s": plain_seconds, "cpu_s": plain_usage.cpu_seconds, "mb": plain_usage.peak / 2**20}}


def measure_on_nodes(corpus: str, fmt: str, out: str, examples: int, workers: int) -> dict:
    """In this (fresh) process: `build_pairs` as the driver of a cluster started here
    (`cluster.local_cluster`), either one node of 2 CPUs (`workers=0`: a `ray start --head`)
    or a 0-CPU head plus `workers` one-CPU worker nodes, each in its own namespaces with a
    private /tmp; `corpus` and `out` are on a folder every node sees, as a shared filesystem
    would be. Seconds and peak PSS of the whole tree (head, nodes, driver)."""
    from cluster.local_cluster import LocalCluster

    cluster = LocalCluster(head_cpus=0 if workers else 2)
    try:
        for _ in range(workers):
            cluster.add_node(num_cpus=1)
        os.environ.update(cluster.env)  # token auth: read when Ray is imported
        import ray

        from rayapp.data.pairs import build_pairs

        ray.init(address=cluster.head.gcs_address, log_to_driver=False, logging_level=logging.WARNING)
        with TreeUsage() as usage:
            start = time.perf_counter()
            build_pairs(corpus, out, examples, seed=0, fmt=fmt)
            seconds = time.perf_counter() - start
        ray.shutdown()
    finally:
        cluster.stop()
    return {"s": seconds, "cpu_s": usage.cpu_seconds, "mb": usage.peak / 2**20}


def in_fresh_process(*args, fn) -> dict:
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def pairs_at_scale(work: Path, copies: list[int], examples: int, node_repeats: int) -> str:
    """Every case of the pairs benchmark, printed as a table, then the largest JSONL case on
    one node against three; returns the first case's `build_pairs` output (the cache stage's
    input)."""
    rows, first = [], None
    for c in copies:
        folder = work / f"wikipedia-x{c}"
        write_wikipedia_corpus(folder, c)
        for fmt, shape in SHAPES.items():
            corpus, out = folder / fmt, work / f"pairs-x{c}-{fmt}"
            gb = sum(f.stat().st_size for f in corpus.iterdir()) / 1e9
            rows.append((shape, c, gb, in_fresh_process(str(corpus), fmt, str(out), examples, fn=measure_pairs)))
            shutil.rmtree(f"{out}-plain")
            if first is None:
                first = f"{out}-ray"
            else:
                shutil.rmtree(f"{out}-ray")
        if c == copies[-1]:  # the largest corpus, as one JSONL file, on the local multi-node cluster
            nodes = {0: [], 2: []}
            for _ in range(node_repeats):  # alternating, so that others' load on the machine hits both
                for workers, runs in nodes.items():
                    out = work / f"pairs-nodes-{workers}"
                    runs.append(in_fresh_process(str(folder / "jsonl"), "jsonl", str(out), examples, workers,
                                                 fn=measure_on_nodes))
                    shutil.rmtree(out)
        shutil.rmtree(folder)
    print(f"\nSMASH sentence pairs: {examples:,} from the local Wikipedia repeated N times; Ray num_cpus=2 on "
          "this shared machine (load average: others' work, before / after Ray / after plain)")
    print(f"{'corpus':26s}{'N':>4s}{'GB':>6s}{'sources':>8s}{'Ray s':>8s}{'plain s':>8s}{'speed':>7s}"
          f"{'Ray CPU s':>10s}{'plain CPU s':>12s}{'Ray tree PSS MB':>16s}{'plain PSS MB':>13s}   load")
    for shape, c, gb, r in rows:
        ray_, plain = r["ray"], r["plain"]
        print(f"{shape:26s}{c:>4d}{gb:>6.2f}{r['sources']:>8d}{ray_['s']:>8.1f}{plain['s']:>8.1f}"
              f"{plain['s'] / ray_['s']:>6.2f}x{ray_['cpu_s']:>10.1f}{plain['cpu_s']:>12.1f}{ray_['mb']:>16.0f}"
              f"{plain['mb']:>13.0f}   " + " / ".join(f"{x:.0f}" for x in r["load"]))
    one, many = (min(runs, key=lambda r: r["s"]) for runs in nodes.values())
    print(f"\nthe same build ({SHAPES['jsonl']}, N={copies[-1]}) on a local cluster (`cluster.local_cluster`), "
          f"corpus and output on a folder every node sees; the faster of {node_repeats} alternating runs each")
    print(f"{'cluster':40s}{'seconds':>9s}{'CPU s':>8s}{'tree PSS MB':>13s}   all runs (s)")
    for name, r, runs in (("one node, 2 CPUs", one, nodes[0]), ("0-CPU head + 2 one-CPU worker nodes", many, nodes[2])):
        print(f"{name:40s}{r['s']:>9.1f}{r['cpu_s']:>8.1f}{r['mb']:>13.0f}   "
              + " / ".join(f"{x['s']:.1f}" for x in runs))
    print(f"three nodes / one node (wall): {many['s'] / one['s']:.2f}x")
    return first


# --- teacher cache -------------------------------------------------------------------------

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


def _workers_cpu(me, seen: dict) -> None:
    """Record in `seen[pid]` the CPU seconds (user + system) so far of each Ray worker of
    this process (the same processes as `_workers_rss`)."""
    import psutil

    for proc in me.children(recursive=True):
        try:
            title = proc.cmdline()[0] if proc.cmdline() else ""
            if title.startswith("ray::") and not title.endswith("Agent"):
                times = proc.cpu_times()
                seen[proc.pid] = times.user + times.system
        except psutil.Error:
            pass


def measure(stage: str, source: str, out: str, examples: int) -> dict:
    """Run one stage in this (fresh) process on its own Ray cluster: seconds and peak RSS."""
    import psutil
    import ray

    from rayapp.assets import asset
    from rayapp.data.teacher_cache import build_cache

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    peak, stop, me, cpu = [0], threading.Event(), psutil.Process(), {}

    def sample() -> None:
        while not stop.wait(0.2):
            peak[0] = max(peak[0], _workers_rss(me))
            _workers_cpu(me, cpu)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    # both actors from the start (`--num-actors 2`, the machine's CPUs): without it the pool
    # starts with one actor and grows while it is busy, the right default on an autoscaling
    # cluster but one core idle for the first actor's start-up here
    stats = build_cache(source, str(asset(*TEACHER)), out, task="smash-pairs", top_k=64, num_actors=2,
                        rows_per_shard=math.ceil(examples / CACHE_SHARDS))
    examples = stats["examples"]
    seconds = time.perf_counter() - start
    stop.set()
    sampler.join()
    ray.shutdown()
    hwm_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    return {"examples": examples, "seconds": seconds, "driver_mb": hwm_kb / 1024,
            "workers_mb": peak[0] / 2**20, "workers_cpu_s": sum(cpu.values()),
            "build": stats}


def bare_forward(source: str, examples: int) -> dict:
    """The teacher's forward passes over the cache build's batches, timed without Ray."""
    import pyarrow.parquet as pq
    import torch

    from rayapp.assets import asset
    from rayapp.data.teacher_cache import plan_shards
    from rayapp.modeling.scorer import TeacherScorer, default_batch_size, length_batches
    from rayapp.tasks.prompts import pad_ids
    from rayapp.tasks.registry import INTERMEDIATE_TASKS

    torch.set_num_threads(2)
    scorer = TeacherScorer(str(asset(*TEACHER)), INTERMEDIATE_TASKS["smash-pairs"], 128)
    table = pq.read_table(source)
    batches = []
    for shard in plan_shards([("input", table.num_rows)], math.ceil(examples / CACHE_SHARDS)):
        encoded = scorer.encode(table.slice(shard.start, shard.stop - shard.start))
        for index in length_batches([len(e["input_ids"]) for e in encoded], default_batch_size(False)):
            ids, mask = pad_ids([encoded[i]["input_ids"] for i in index], scorer.encoder.tokenizer.pad_token_id)
            batches.append((ids, mask, torch.tensor([encoded[i]["mask_pos"] for i in index])))
    scorer.logits(*batches[0])  # warm-up
    start, cpu = time.perf_counter(), time.process_time()
    for batch in batches:
        scorer.logits(*batch)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    tokens = sum(int(mask.sum()) for _, mask, _ in batches)
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds, "cpu_s": cpu}


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

    from rayapp.data import shards
    from rayapp.modeling.scorer import default_batch_size

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--copies", type=int, nargs="+", default=[10, 40],
                   help="pairs: corpora of the local Wikipedia repeated this many times (40: 1 GB)")
    p.add_argument("--pairs", type=int, default=2_560_000, help="pairs built from each corpus")
    p.add_argument("--cache-examples", type=int, default=2_000, help="pairs scored by the teacher")
    p.add_argument("--smoke", action="store_true", help="the corpus once, 2,000 pairs, 64 cached (CI)")
    args = p.parse_args()
    if args.smoke:
        args.copies, args.pairs, args.cache_examples = [1], 2_000, 64
    rows = []
    # not under /tmp: the local cluster's worker nodes each have a private one
    (ROOT / "runs").mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-intermediate-", dir=ROOT / "runs") as tmp:
        work = Path(tmp)
        pairs = pairs_at_scale(work, args.copies, args.pairs, node_repeats=1 if args.smoke else 2)
        (work / "cache-input").mkdir()
        first = pq.read_table(pairs)  # parquet files, not _meta.json
        pq.write_table(first.slice(0, args.cache_examples), work / "cache-input" / "part-00000.parquet")
        shards.write_meta(str(work / "cache-input"), {"files": ["part-00000.parquet"]})
        bare = [in_fresh_process(str(work / "cache-input" / "part-00000.parquet"), args.cache_examples,
                                 fn=bare_forward)]
        r = in_fresh_process("cache", str(work / "cache-input"), str(work / "cache"), args.cache_examples,
                             fn=measure)
        rows.append(("teacher cache (top-64)", "-", r))
        bare.append(in_fresh_process(str(work / "cache-input" / "part-00000.parquet"), args.cache_examples,
                                     fn=bare_forward))
        sizes, vocab = cache_bytes(str(work / "cache"))

    print(f"\nRay num_cpus=2; {TEACHER[1]} teacher on CPU")
    print(f"{'stage':24s}{'corpus docs':>12s}{'examples':>10s}{'seconds':>9s}{'examples/s':>12s}"
          f"{'driver peak RSS MB':>20s}{'workers peak RSS MB':>21s}")
    for stage, docs, r in rows:
        print(f"{stage:24s}{docs:>12s}{r['examples']:>10d}{r['seconds']:>9.1f}"
              f"{r['examples'] / r['seconds']:>12.1f}{r['driver_mb']:>20.0f}{r['workers_mb']:>21.0f}")
    build = r["build"]
    reference = sum(b["tokens_per_s"] for b in bare) / len(bare)
    per_cpu = sum(b["tokens"] / b["cpu_s"] for b in bare) / len(bare)
    print(f"\nteacher cache vs bare PyTorch, {TEACHER[1]}, {build['tokens']} prompt tokens in "
          f"{CACHE_SHARDS} shards, batch {default_batch_size(False)}, {build['actors']} actors of 1 CPU; "
          f"load average {os.getloadavg()[0]:.1f} at the end")
    print(f"{'':52s}{'seconds':>9s}{'tokens/s':>10s}{'/ bare':>8s}{'tokens/CPU-s':>14s}{'/ bare':>8s}")
    for name, seconds, speed, cpu in (
            ("build_cache, whole call (Ray + actor start-up)", build["seconds"], build["tokens_per_s"],
             build["tokens"] / r["workers_cpu_s"]),
            ("build_cache, scoring window (first to last shard)", build["tokens"] / build["scoring_tokens_per_s"],
             build["scoring_tokens_per_s"], None),
            *((f"bare PyTorch forward, 2 threads ({when})", b["seconds"], b["tokens_per_s"], b["tokens"] / b["cpu_s"])
              for when, b in zip(("before", "after"), bare))):
        cpu_cells = f"{cpu:>14.0f}{cpu / per_cpu:>7.2f}x" if cpu else ""
        print(f"{name:52s}{seconds:>9.1f}{speed:>10.0f}{speed / reference:>7.2f}x{cpu_cells}")
    dense = 2 * vocab
    print(f"\n{'cache bytes/example':36s}{'bytes':>10s}{'dense fp16 / this':>19s}")
    for name, size in sizes.items():
        print(f"{name:36s}{size:>10.1f}{dense / size:>18.1f}x")
    print(f"{f'dense fp16 (vocab {vocab} x 2 B)':36s}{dense:>10.1f}{1:>18.1f}x")


if __name__ == "__main__":
    main()
