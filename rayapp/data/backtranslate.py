"""Back-translated few-shot splits: SMASH's "distil bt10" baseline data (Ray Data).

SMASH §4.1 augments each few-shot training set to 10 times its size by back-translation
(Sennrich et al. 2015) and runs its "distill" baseline (prompt FT + KD from the teacher) on
it. This stage writes the augmented splits; the sweep's `distill-bt10` method is "distill"
with `data_dir:` pointing here (`jobs/configs/sweep-smash-table2.yaml`).

    (task, split seed) items ──► autoscaling actor pool, one split per call:
    (driver)                     load_lmbff ─► en→pivot→en paraphrases ─► write the split folder

Output: `OUT/TASK/K-SEED/{train,dev,test}.jsonl` (`fewshot.write_split`, the layout
`make_splits` writes and `load_lmbff` reads) and `OUT/TASK/K-SEED/_meta.json`. train = the
original K-per-label examples (first, in their order) and then, source by source, up to
`factor - 1` paraphrases of each, with its source's label; for two-sentence tasks both
sentences are translated and the i-th translations of each pair go together. dev and test
are the source split's, as read. The split's `_meta.json` holds what `load_lmbff` adds to the
split's `source` (`backtranslated`: models, factor, where the original split lives; and the
original's `test_source`/`test_fallback`, so a pool-drawn test set is still marked as one) and
per source example the number of paraphrases kept (train's rows after the originals follow
that order).

Decoding. The paper names neither the MT models nor the decoding. Paraphrases come from
sampling, not beam search, in both directions: n beams of one sentence differ in a word or
two and many collapse to the same English on the way back, while sampling gives the varied
sentences augmentation is for (Edunov et al. 2018, "Understanding Back-Translation at
Scale": sampled back-translations train better than beam ones). Sampling is restricted to the
`top_k` (default 10) most likely tokens, the middle ground Edunov et al. found: unrestricted
sampling reaches improbable tokens that could change a sentence's meaning and so its label,
which matters more for 16 examples per class than for their millions of sentences. Each
source sentence gets n pivots (`num_return_sequences`), each pivot one sampled translation back.

Dedup and shortfall. A paraphrase identical to its source or to a paraphrase already kept
(after collapsing runs of whitespace), or whose translation came back empty, is dropped. An
example with fewer than `factor - 1` paraphrases after a round takes part in the next round,
which draws `factor - 1` new candidates for it, up to `max_rounds` rounds. After that the
split keeps what it has: train then has fewer than `factor` x the original rows, the
split's `_meta.json` says how many paraphrases are missing and for how many examples, the
run's stats and the folder's `_meta.json` add them up, and a warning names the split.

Seeds. Every round of every split seeds torch from (`seed`, task, K, split seed, round,
sentence field), so a split does not depend on which actor made it or when. The draws do
depend on how sentences are batched (`batch_size`) and on the device's kernels: the same
config on the same kind of device gives the same splits.

Resume. `_plan.json` (the settings that shape a split: models, K, factor, decoding, seed,
rounds, source root) is written first (`shards.begin`); a split's `_meta.json` is written
last, after its three files (each written whole), so a split folder with one is complete. A
re-run into the same folder with the same plan skips those splits (adding tasks or seeds
adds only their splits); another plan is refused. The folder's own `_meta.json` comes last,
listing every split of the run with its counts.

Models: any HF encoder-decoder by hub id (through the `$RAYAPP_ASSETS` mirror), local dir
or `s3://`, loaded with `AutoModelForSeq2SeqLM` and `AutoTokenizer` (`models.load_seq2seq`);
Marian's tokenizer needs `sentencepiece`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Callable

import pyarrow as pa
import torch

from rayapp import env, storage
from rayapp.assets import fewshot_dir
from rayapp.config import InputPath, ModelRef, OutputPath, require_counts
from rayapp.data import shards
from rayapp.data.fewshot import SEEDS, Example, FewShotSplit, load_lmbff, write_split
from rayapp.errors import ConfigError, RayappError
from rayapp.modeling.models import check_model, load_model_config, load_seq2seq, load_tokenizer, portable_model
from rayapp.modeling.scorer import actor_device, default_batch_size, length_batches, pool_args
from rayapp.tasks.registry import get_task

log = logging.getLogger(__name__)

STAGE = "backtranslate"


@dataclass
class BacktranslateConfig:
    """`rayapp backtranslate --config FILE key=value ...`"""

    out: OutputPath  # the new few-shot root (TASK/K-SEED/...), local or s3://
    tasks: list[str]  # built-in task names (SMASH Table 2's: jobs/configs/backtranslate-bt10.yaml)
    forward: ModelRef = "Helsinki-NLP/opus-mt-en-de"  # English -> pivot: HF id, local dir or s3://
    backward: ModelRef = "Helsinki-NLP/opus-mt-de-en"  # pivot -> English
    data_dir: InputPath | None = None  # LM-BFF k-shot root to augment; None: the mirror's or the local assets
    k: int = 16
    seeds: list[int] = field(default_factory=lambda: list(SEEDS))
    factor: int = 10  # train grows to factor x its size: factor - 1 paraphrases per example
    top_k: int = 10  # sample among the k most likely tokens (module doc, "Decoding")
    temperature: float = 1.0
    max_rounds: int = 3  # sampling rounds for examples still short of distinct paraphrases
    max_length: int = 256  # tokens of a sentence read, and of a translation generated
    seed: int = 0
    batch_size: int | None = None  # sequences decoded at once; None: sized for the device
    num_actors: int | None = None  # most translating actors; None: as many as the cluster gives
    use_gpu: bool = False  # one GPU per actor
    cpus_per_actor: int = 1

    def __post_init__(self) -> None:
        if self.factor < 1:
            raise ConfigError(f"factor={self.factor} must be >= 1: train grows to factor x its size "
                              "(SMASH's bt10 is factor=10; 1 copies the splits)")
        require_counts(self, "k", "max_rounds", "max_length", "top_k", "cpus_per_actor", "batch_size", "num_actors")
        if not self.temperature > 0:
            raise ConfigError(f"temperature={self.temperature} must be > 0")
        if not self.tasks or not self.seeds:
            raise ConfigError("give at least one task and one seed (tasks=[SST-2] seeds=[13])")
        for name in self.tasks:
            try:
                get_task(name)
            except RayappError as e:
                raise ConfigError(f"tasks: {e}") from None


def check_translator(name_or_path: str, key: str) -> None:
    """Driver-side: `name_or_path` is a model with a tokenizer (`check_model`) and an
    encoder-decoder, before Ray starts; one-line ConfigError naming the config key otherwise."""
    try:
        check_model(name_or_path, mlm=False)
        config = load_model_config(name_or_path)
    except ConfigError as e:
        raise ConfigError(f"{key}: {e}") from None
    if not getattr(config, "is_encoder_decoder", False):
        raise ConfigError(f"{key}={name_or_path!r} is a {config.model_type} model, not an encoder-decoder: "
                          "back-translation needs a translation model such as Helsinki-NLP/opus-mt-en-de")


class Translator:
    """One direction: a seq2seq model and its tokenizer on a device, sampling translations."""

    def __init__(self, model: str, device: torch.device, max_length: int, top_k: int, temperature: float):
        self.tokenizer = load_tokenizer(model)
        self.model = load_seq2seq(model, "translation model").to(device).eval()
        self.device, self.max_length = device, max_length
        # num_beams=1: plain sampling, whatever the model's generation config says (opus-mt: 4 beams)
        self.decoding = {"do_sample": True, "top_k": top_k, "temperature": temperature, "num_beams": 1,
                         "max_new_tokens": max_length}

    def sample(self, texts: list[str], n: int, batch_size: int) -> list[list[str]]:
        """`n` sampled translations of each text, in input order; batches of about
        `batch_size` decoded sequences over length-sorted texts."""
        encode = {"truncation": True, "max_length": self.max_length}
        lengths = [len(ids) for ids in self.tokenizer(texts, **encode)["input_ids"]]
        out: list[list[str]] = [[] for _ in texts]
        for index in length_batches(lengths, max(1, batch_size // n)):
            batch = self.tokenizer([texts[i] for i in index], return_tensors="pt", padding=True, **encode)
            with torch.inference_mode():
                ids = self.model.generate(**batch.to(self.device), num_return_sequences=n, **self.decoding)
            decoded = self.tokenizer.batch_decode(ids, skip_special_tokens=True)
            for j, i in enumerate(index):
                out[i] = [t.strip() for t in decoded[j * n:(j + 1) * n]]
        return out


def _normal(ex: Example) -> tuple[str, ...]:
    """What two examples must differ in to count as two: their texts, whitespace collapsed."""
    return tuple(" ".join(t.split()) for t in (ex.text_a, ex.text_b or ""))


def paraphrase(examples: list[Example], need: int, max_rounds: int,
               round_trip: Callable[[list[str], int, str], list[list[str]]]) -> tuple[list[list[Example]], int]:
    """Up to `need` distinct paraphrases of each example, with its label (module doc, "Dedup
    and shortfall"). `round_trip(texts, n, salt)` gives n paraphrases of each text; `salt`
    ("ROUND/FIELD") names the draw for seeding. Returns (paraphrases per example, rounds run)."""
    fields = ["text_a", "text_b"] if any(ex.text_b is not None for ex in examples) else ["text_a"]
    kept: list[list[Example]] = [[] for _ in examples]
    seen = [{_normal(ex)} for ex in examples]
    rounds = 0
    while rounds < max_rounds and need > 0:
        short = [i for i, got in enumerate(kept) if len(got) < need]
        if not short:
            break
        drawn = {}
        for name in fields:
            texts = [getattr(examples[i], name) for i in short]
            todo = [j for j, t in enumerate(texts) if t.strip()]  # an empty sentence stays empty
            back = round_trip([texts[j] for j in todo], need, f"{rounds}/{name}") if todo else []
            drawn[name] = [[""] * need for _ in short]
            for j, got in zip(todo, back):
                drawn[name][j] = got
        for j, i in enumerate(short):
            source = examples[i]
            for c in range(need):
                texts = {name: drawn[name][j][c] for name in fields}
                if any(not texts[name] and getattr(source, name).strip() for name in fields):
                    continue  # a translation came back empty
                candidate = Example(texts["text_a"], texts.get("text_b"), source.label)
                if len(kept[i]) < need and _normal(candidate) not in seen[i]:
                    seen[i].add(_normal(candidate))
                    kept[i].append(candidate)
        rounds += 1
    return kept, rounds


def draw_seed(seed: int, task: str, k: int, split: int, salt: str) -> int:
    """The torch seed of one draw (module doc, "Seeds"); blake2b, unlike `hash()`, is the same
    in every process."""
    digest = hashlib.blake2b(f"{seed}/{task}/{k}-{split}/{salt}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little")


class SplitWriter:
    """Ray Data actor: back-translates whole splits and writes each one's folder.

    Input rows `{task, seed}`; output one row per split: `split` (`TASK/K-SEED`) and `actor`
    (its process id)."""

    def __init__(self, forward: str, backward: str, data_dir: str, out: str, k: int, factor: int, max_rounds: int,
                 top_k: int, temperature: float, max_length: int, batch_size: int, seed: int):
        device = actor_device()
        self.ways = [Translator(m, device, max_length, top_k, temperature) for m in (forward, backward)]
        self.about = {"forward": forward, "backward": backward, "factor": factor, "original": data_dir}
        self.data_dir, self.out, self.k, self.factor, self.max_rounds = data_dir, out, k, factor, max_rounds
        self.batch_size, self.seed = batch_size, seed

    def __call__(self, batch: pa.Table) -> pa.Table:
        names = []
        for row in batch.to_pylist():
            self.write(load_lmbff(self.data_dir, row["task"], self.k, row["seed"]))
            names.append(split_name(row["task"], self.k, row["seed"]))
        return pa.table({"split": names, "actor": [os.getpid()] * len(names)})

    def write(self, split: FewShotSplit) -> None:
        """Augment `split`'s train set, write the split folder, its `_meta.json` last."""
        start = time.time()

        def round_trip(texts: list[str], n: int, salt: str) -> list[list[str]]:
            torch.manual_seed(draw_seed(self.seed, split.task, split.k, split.seed, salt))
            forward, backward = self.ways
            pivots = forward.sample(texts, n, self.batch_size)
            back = backward.sample([p for group in pivots for p in group], 1, self.batch_size)
            return [[b for (b,) in back[i * n:(i + 1) * n]] for i in range(len(texts))]

        kept, rounds = paraphrase(split.train, self.factor - 1, self.max_rounds, round_trip)
        train = split.train + [p for group in kept for p in group]
        folder = write_split(self.out, FewShotSplit(split.task, split.k, split.seed, train, split.dev, split.test))
        counts = [len(group) for group in kept]
        missing = sum(self.factor - 1 - n for n in counts)
        source = {"backtranslated": self.about, "original_train": split.source.get("train")}
        source.update({key: split.source[key] for key in ("test_source", "test_fallback", "test_note")
                       if key in split.source})
        meta = {"stage": STAGE, "task": split.task, "k": split.k, "seed": split.seed, "source": source,
                "train_original": len(split.train), "train": len(train), "dev": len(split.dev),
                "test": len(split.test), "paraphrases": counts, "missing": missing,
                "short_examples": sum(n < self.factor - 1 for n in counts), "rounds": rounds,
                "seconds": time.time() - start}
        storage.write_text(storage.join(folder, shards.META), json.dumps(meta, indent=1))


def split_name(task: str, k: int, seed: int) -> str:
    return f"{task}/{k}-{seed}"


def finished_splits(out: str) -> set[str]:
    """`TASK/K-SEED` of the split folders in `out` that hold their `_meta.json` (complete)."""
    names = (uri[len(storage.join(out, "")):] for uri in storage.list_files(out))
    return {name.rsplit("/", 1)[0] for name in names if name.count("/") == 2 and name.endswith(shards.META)}


def run(cfg: BacktranslateConfig) -> dict:
    """Write the back-translated splits of `cfg.tasks` x `cfg.seeds` to `cfg.out`.

    Resumable (module doc). Returns stats: splits (in the folder's `_meta.json`), written
    and skipped (this run), train_rows (train examples of this run's splits), paraphrases,
    missing (paraphrases short of factor - 1 per example, this run), actors, seconds (the
    Ray job)."""
    import ray

    # every model checked and every source split read on the driver: one line, before Ray starts
    for key in ("forward", "backward"):
        check_translator(getattr(cfg, key), key)
    data_dir = cfg.data_dir or fewshot_dir("k-shot")
    wanted = [(task, seed) for task in dict.fromkeys(get_task(t).name for t in cfg.tasks) for seed in cfg.seeds]
    for task, seed in wanted:
        load_lmbff(data_dir, task, cfg.k, seed)
    storage.makedirs(cfg.out)
    storage.require_shared({"data_dir": data_dir, "forward": cfg.forward, "backward": cfg.backward, "out": cfg.out})
    env.start_ray()
    plan = {"stage": STAGE, "data_dir": data_dir, "forward": cfg.forward, "backward": cfg.backward, "k": cfg.k,
            "factor": cfg.factor, "top_k": cfg.top_k, "temperature": cfg.temperature, "max_rounds": cfg.max_rounds,
            "max_length": cfg.max_length, "seed": cfg.seed}
    done = shards.begin(cfg.out, plan, "back-translated split folder", done=finished_splits, outputs=(".jsonl",))
    todo = [{"task": task, "seed": seed} for task, seed in wanted if split_name(task, cfg.k, seed) not in done]
    log.info("back-translation %s: %d splits to write, %d already written", cfg.out, len(todo), len(wanted) - len(todo))
    start, written = time.perf_counter(), []
    if todo:
        written = ray.data.from_items(todo, override_num_blocks=len(todo)).map_batches(
            SplitWriter,
            fn_constructor_kwargs={
                "forward": portable_model(cfg.forward), "backward": portable_model(cfg.backward),
                "data_dir": data_dir, "out": cfg.out, "k": cfg.k, "factor": cfg.factor,
                "max_rounds": cfg.max_rounds, "top_k": cfg.top_k, "temperature": cfg.temperature,
                "max_length": cfg.max_length, "batch_size": cfg.batch_size or default_batch_size(cfg.use_gpu),
                "seed": cfg.seed},
            **pool_args(cfg.num_actors, cfg.use_gpu, cfg.cpus_per_actor),
        ).take_all()
    seconds = time.perf_counter() - start
    metas = {s: shards.read_meta(storage.join(cfg.out, s)) for s in sorted(finished_splits(cfg.out))}
    new = [metas[r["split"]] for r in written]
    for m in new:
        if m["missing"]:
            log.warning("%s: %d of %d examples have fewer than %d distinct paraphrases after %d rounds "
                        "(%d missing): train has %d rows, not %d; raise max_rounds, top_k or temperature",
                        split_name(m["task"], m["k"], m["seed"]), m["short_examples"], m["train_original"],
                        cfg.factor - 1, m["rounds"], m["missing"], m["train"], cfg.factor * m["train_original"])
    storage.write_text(storage.join(cfg.out, shards.META), json.dumps({
        "stage": STAGE, "plan": plan, "splits": list(metas),
        "missing": sum(m["missing"] for m in metas.values()),
        "short_splits": [s for s, m in metas.items() if m["missing"]],
        "counts": {s: {key: m[key] for key in ("train_original", "train", "dev", "test", "missing")}
                   for s, m in metas.items()},
    }, indent=1))
    return {
        "splits": len(metas), "written": len(written), "skipped": len(wanted) - len(todo),
        "train_rows": sum(m["train"] for m in new), "paraphrases": sum(m["train"] - m["train_original"] for m in new),
        "missing": sum(m["missing"] for m in new), "actors": len({r["actor"] for r in written}), "seconds": seconds,
    }


def backtranslate(out: str, **settings) -> dict:
    """`run(BacktranslateConfig(out, **settings))`, for Python callers."""
    return run(BacktranslateConfig(out=out, **settings))
