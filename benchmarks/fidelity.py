"""The papers' claims at small scale on real data: SMASH Table 2's rows for a real local
teacher/student pair, as one resumable pipeline ending in `rayapp report` tables.

Teacher: the MiniLM-L6 MLM further trained on the local Wikipedia (`minilm-l6-mlm-wiki`,
ASSETS.md). Plain student: its every other layer (3 of 6, `rayapp init-student`). SMASH
students: the plain student distilled (eq. 1, soft cross-entropy at the mask) on (a) the
sentence-pairs task (`--pairs` pairs from the local Wikipedia) for the sentence-pair tasks RTE
and MRPC, and (b) the sentiment task (Wikipedia sentences the teacher labels confidently) for
SST-2 and MR (SMASH §3: the intermediate task matches the downstream task's shape). The
teacher runs online (`teacher_mode=online`, its full distribution) rather than from a top-k
cache: on 2 cores caching 100k pairs costs about 45 min of teacher forwards, while the
distillation budget here consumes `--distill-steps` x 16 examples of them. SMASH distils for
one epoch (App. A.1: "training for 200k steps takes exactly 1 epoch"), so by default each
half distils for one pass over its intermediate examples at batch 16 (`one_epoch`), and a
`--distill-steps` above that is refused: no example is seen twice.

Rows, on all 5 LM-BFF splits, test = the split's test file: zero-shot and prompt FT of the
plain student, the SMASH student and the teacher; standard FT (classification head) of the
plain student; "distill" = KD during prompt FT of the plain student from the teacher's best
prompt-FT checkpoint of the same split (eq. 1 at the mask). On SST-2 and MR also
Prompt-Distiller's rows (its student PT row is the plain student's prompt FT): Prompt-KD and
Prompt-Distiller, T' = the teacher, T = its best prompt-FT run of the same split, each once
from the plain student and once from the SMASH student (SMASH inside Prompt-Distiller).
SMASH's "Vanilla PPT": a 100-token soft prompt pre-trained (`rayapp ppt`, the plain student
frozen, PPT's lr 0.1) on the half's intermediate data with its labels, for as many steps at the
same batch as the SMASH student, then prompt tuning from it ("ppt"); and PPT's own baseline,
prompt tuning from a fresh prompt ("prompt-tuning"); both at PPT's downstream lr 0.05.
SMASH Table 3's iPET rows: the teacher as PET's models, 2 generations of PET's 4 patterns, one
model each (SMASH: 3 generations, 3 models each), each generation's labels over `IPET_UNLABELLED` pool examples per
label (SMASH: up to 10,000), and the plain student as the final classifier trained on the last
generation's merged logits: standard FT ("ipet"), prompt FT ("ipet-pt"), and prompt FT from
the SMASH student ("ipet-smash"); every trial at the sweep's one point and steps. The LM-BFF
row: the plain student's prompt FT with LM-BFF's demonstrations (one train example per class
after each input, drawn from the most similar half by the local SBERT, all-MiniLM-L6-v2; 4
sets averaged at dev/test, LM-BFF: 16) on the manual templates: no local T5 exists for LM-BFF's
template search (SMASH's row uses its auto templates).

Where this differs from the paper, to fit 2 CPU cores: `--finetune-steps` (default 40,
dev every 10; the paper 1000 / 100) at one fixed point (lr 1e-4, batch 4) instead of the
6-point grid (a grid would triple the runs; on these splits the two learning rates of the
local SMASH sweep, 5e-5 and 1e-4, were chosen about equally often); `--distill-steps` of
SMASH distillation (paper: 200k, one epoch; here at most one) at batch 16; zero-shot rows run on split 13 only (no
training, and the test file is the same for every split: the cell is the 5 splits' value).

The two halves run one after the other, each = its intermediate data, its SMASH student, its
sweep: sentiment (SST-2, MR) first, then pairs (RTE, MRPC).

Every stage keeps its output under `--work-dir` and is skipped when there (its JSON record
has the stage's wall time); the two sweeps resume (`rayapp sweep --resume`), so the table can
be built over several sittings by re-running the same command. Prints the tables at the end;
`report.html` beside them.

    python benchmarks/fidelity.py [--work-dir runs/fidelity] [--pairs 100000]
        [--sentiment-corpus PATH] [--distill-steps N]
        [--pairs-distill-steps N] [--finetune-steps 40] [--halves sentiment pairs] [--rows ROW ...] [--smoke]

`--smoke` (CI) runs every stage with tiny random models and tiny sizes: it checks that the
pipeline runs, its numbers mean nothing.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from rayapp import env

env.apply(env.LOCAL)  # before Ray is imported: these flags are read at import and by ray.init

PAIR_TASKS = ["RTE", "MRPC"]
SENTIMENT_TASKS = ["SST-2", "MR"]
# zero-shot trains nothing and LM-BFF's test file is one file for all 5 splits (the original dev
# set), so one split's test number is every split's: 12 trials instead of 60
ONE_SPLIT = [13]
ROWS = ["zero-shot", "prompt-ft", "fine-tune", "smash-zero-shot", "smash", "distill",
        "teacher-zero-shot", "teacher"]

PD_ROWS = ["prompt-kd", "prompt-distiller", "prompt-kd-smash", "prompt-distiller-smash"]
PPT_ROWS = ["prompt-tuning", "ppt"]
IPET_ROWS = ["ipet", "ipet-pt", "ipet-smash"]
LMBFF_ROWS = ["lm-bff"]
IPET_GENERATIONS = 2      # SMASH App. A.1: 3 generations of 4 patterns x 3 models; here 2 x 4 x 1 (2 cores)
IPET_UNLABELLED = 500     # unlabelled pool examples per label (SMASH: up to 10,000)
DISTILL_BATCH = 16
PROMPT_TUNING_LR = 0.05  # PPT's downstream lr (thu-coai/PPT scripts/*/few-shot/pt_pretrain.sh)


def one_epoch(data: str, steps: int | None, batch_size: int = DISTILL_BATCH) -> int:
    """Distillation steps for at most one pass over the examples folder `data` (SMASH App.
    A.1: one epoch): all of it when `steps` is None, else `steps` if that is no more."""
    from rayapp.data import shards

    rows = sum(entry["rows"] for entry in shards.require_meta(data)["shards"].values())
    epoch = max(1, -(-rows // batch_size))
    if steps is not None and steps > epoch:
        sys.exit(f"--distill-steps {steps} would show the student {data}'s {rows} examples more than once "
                 f"(one epoch = {epoch} steps at batch {batch_size}; SMASH distils for one epoch)")
    return epoch if steps is None else steps


def pd_methods(teacher: str, smash: str) -> dict:
    """Prompt-Distiller's rows on SST-2 and MR (its student PT row is `prompt-ft`): T' = the
    teacher, T = the teacher's best prompt-FT run of the same split, the paper's alpha,
    lambdas and n; the sweep's lr/batch/steps like every other row. The `-smash` rows start the
    student from the SMASH student instead of the plain one (SMASH inside Prompt-Distiller, a
    combination neither paper ran; issue 31)."""
    pd = {"recipe": "prompt-distill", "teacher": teacher, "tuned_teacher": "{best:teacher}"}
    return {"prompt-kd": {**pd, "method": "prompt-kd", "label": "Prompt-KD (PD Table 1)"},
            "prompt-distiller": {**pd, "method": "prompt-distiller", "label": "Prompt-Distiller"},
            "prompt-kd-smash": {**pd, "method": "prompt-kd", "model": smash, "label": "Prompt-KD, SMASH student"},
            "prompt-distiller-smash": {**pd, "method": "prompt-distiller", "model": smash,
                                       "label": "Prompt-Distiller, SMASH student"}}


def ppt_methods(ppt: str | None) -> dict:
    """SMASH's "Vanilla PPT" row: prompt tuning (the student frozen, 100 soft tokens) from the
    prompt PPT pre-trained on this half's intermediate data (`ppt`, None: not built), and PPT's
    own baseline, prompt tuning from a fresh prompt; at PPT's downstream lr, the sweep's steps."""
    pt = {"method": "prompt-tuning", "lr": PROMPT_TUNING_LR}
    rows = {"prompt-tuning": {**pt, "label": "student prompt tuning (frozen, 100 soft tokens)"}}
    if ppt is not None:
        rows["ppt"] = {**pt, "init": ppt, "label": "Vanilla PPT (prompt pre-trained on the intermediate data)"}
    return rows


def ipet_methods(teacher: str, smash: str, generations: int = IPET_GENERATIONS, patterns: int = 4) -> dict:
    """SMASH Table 3's rows: iPET with the teacher as PET's models (SMASH: RoBERTa-large), 3
    generations of PET's 4 patterns, and the final classifier (the plain student) trained on
    the last generation's merged logits over the unlabelled pool by standard FT ("ipet"),
    prompt FT ("ipet-pt"), or prompt FT from the SMASH student ("ipet-smash")."""
    pet = {"method": "prompt", "model": teacher, "grid": {"pattern": list(range(patterns))}}
    gens = {f"pet-g{g + 1}": {**pet, "label": f"PET generation {g + 1} (teacher)",
                              **({"extra_train": f"{{ipet:pet-g{g}}}"} if g else {})} for g in range(generations)}
    soft = {"soft_labels": f"{{soft:pet-g{generations}}}"}
    return {**gens, "ipet": {"method": "classifier", **soft, "label": "iPET (final classifier: student standard FT)"},
            "ipet-pt": {"method": "prompt", **soft, "label": "iPET + PT (student prompt FT)"},
            "ipet-smash": {"method": "prompt", "model": smash, **soft, "label": "iPET + PT + SMASH init"}}


def sweep_config(name: str, storage: str, tasks: list[str], student: str, smash: str, teacher: str, steps: int,
                 seeds: list[int] | None = None, rows: list[str] | None = None, ppt: str | None = None,
                 smoke: bool = False, demo_model: str = ""):
    """One of the two sweeps (same methods; `smash` = the SMASH student for these tasks, `ppt`
    the PPT-pre-trained prompt), on the 5 LM-BFF splits unless `seeds`; `rows`: only those
    methods (and the ones they read `{best:...}` from)."""
    from rayapp.data.ipet import IPetConfig
    from rayapp.sweep.spec import SweepConfig, TableSpec

    sentiment = set(tasks) <= set(SENTIMENT_TASKS)  # Prompt-Distiller's rows: SST-2 and MR only
    cfg = SweepConfig(
        name=name, storage=storage, tasks=tasks, grid={}, **({"seeds": seeds} if seeds else {}),
        base={"model": student, "batch_size": 4, "lr": 1e-4, "max_steps": steps, "eval_every": 10,
              "max_length": 128, "engine": {"engine": "ddp", "num_workers": 1}},
        per_task={t: {"max_length": 64} for t in tasks if t in SENTIMENT_TASKS},
        methods={
            "zero-shot": {"method": "zero-shot", "seeds": ONE_SPLIT, "label": "student (3 layers) zero-shot"},
            "prompt-ft": {"method": "prompt", "label": "student prompt FT"},
            "fine-tune": {"method": "classifier", "label": "student standard FT"},
            "smash-zero-shot": {"method": "zero-shot", "seeds": ONE_SPLIT, "model": smash,
                                "label": "SMASH student zero-shot"},
            "smash": {"method": "prompt", "model": smash, "label": "SMASH student prompt FT"},
            "distill": {"method": "prompt", "teacher": "{best:teacher}", "label": "distill (KD in prompt FT)"},
            "teacher-zero-shot": {"method": "zero-shot", "seeds": ONE_SPLIT, "model": teacher,
                                  "label": "teacher (MiniLM-L6) zero-shot"},
            "teacher": {"method": "prompt", "model": teacher, "label": "teacher (MiniLM-L6) prompt FT"},
            **(pd_methods(teacher, smash) if sentiment else {}),
            **ppt_methods(ppt),
            # (the smoke teacher's tiny BPE vocabulary lacks the words of PET's MNLI patterns, Wrong/Right)
            **(ipet_methods(teacher, smash, *((2, 2) if smoke else ())) if sentiment or not smoke else {}),
            # LM-BFF's demonstrations with the task's manual template (no local T5 for its
            # template search): the local SBERT picks them, 4 sets at dev/test, twice the length
            "lm-bff": {"method": "prompt", "demonstrations": True, "demo_samples": 4, "max_length": 256,
                       "demo_model": demo_model, "label": "LM-BFF (manual templates, SBERT demonstrations)"},
        },
        ipet=IPetConfig(unlabelled_per_label=IPET_UNLABELLED),
        tables=[TableSpec(name="fidelity", title="16-shot test, mean (std) over the 5 LM-BFF splits",
                          rows=ROWS + (PD_ROWS if sentiment else []) + PPT_ROWS[:1 + (ppt is not None)]
                          + (IPET_ROWS if sentiment or not smoke else []) + LMBFF_ROWS)])
    if rows is None:
        return cfg
    unknown = sorted(set(rows) - set(cfg.methods))
    if unknown:
        sys.exit(f"--rows {' '.join(unknown)}: not a row of the {name} sweep ({', '.join(cfg.methods)})")
    keep = set(rows)
    while not {need for r in keep for need in cfg.method(r).needs()} <= keep:  # iPET reads a chain of generations
        keep |= {need for r in keep for need in cfg.method(r).needs()}
    return SweepConfig(name=cfg.name, storage=cfg.storage, tasks=cfg.tasks, grid={}, seeds=cfg.seeds,
                       base=cfg.base, per_task=cfg.per_task, ipet=cfg.ipet,
                       methods={m: spec for m, spec in cfg.methods.items() if m in keep},
                       tables=[TableSpec(name="fidelity", title=cfg.tables[0].title,
                                         rows=[r for r in cfg.tables[0].rows if r in keep])])


def main() -> None:
    from rayapp.assets import asset
    from rayapp.data.pairs import build_pairs
    from rayapp.data.sentiment import build_sentiment
    from rayapp.demo import stage, start_local
    from rayapp.recipes.distill import DistillConfig
    from rayapp.recipes.distill import run as distill
    from rayapp.recipes.ppt import PPTConfig
    from rayapp.recipes.ppt import run as run_ppt
    from rayapp.recipes.pretrain import make_student
    from rayapp.sweep import report
    from rayapp.sweep import tune as sweep
    from rayapp.train.engine import EngineConfig

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work-dir", help="default: runs/fidelity (--smoke: runs/fidelity-smoke)")
    p.add_argument("--pairs", type=int, default=100_000)
    p.add_argument("--sentiment-corpus", help="corpus the teacher labels (default: one 1 MB file of the local "
                                              "Wikipedia; scoring all 25 MB takes about an hour on 2 cores)")
    p.add_argument("--distill-steps", type=int, help="SMASH distillation steps (default: one epoch of each "
                                                      "half's intermediate examples at batch 16, at most that)")
    p.add_argument("--pairs-distill-steps", type=int, help="SMASH distillation steps on the pairs task "
                                                            "(default: --distill-steps; a step costs 2.3x a "
                                                            "sentiment step: length 128 vs 64)")
    p.add_argument("--finetune-steps", type=int, default=40)
    p.add_argument("--smoke", action="store_true",
                   help="tiny random models, 64 pairs, 2 steps everywhere, split 13 of SST-2 and RTE only (CI)")
    p.add_argument("--with-sweep", nargs="*", default=[],
                   help="more finished sweeps for the report, e.g. the Prompt-Distiller local sweep "
                        "(runs/sweeps/pd-table1-local: its Tables 1 and 2)")
    p.add_argument("--halves", nargs="+", choices=["sentiment", "pairs"], default=["sentiment", "pairs"],
                   help="which halves to run (default both)")
    p.add_argument("--rows", nargs="+", help="only these rows (methods) and the rows they need, e.g. "
                                              "prompt-kd-smash prompt-distiller-smash (with the teacher's)")
    args = p.parse_args()
    halves = tuple((h, tasks) for h, tasks in (("sentiment", SENTIMENT_TASKS), ("pairs", PAIR_TASKS))
                   if h in args.halves)
    if args.smoke:
        args.pairs, args.distill_steps, args.pairs_distill_steps, args.finetune_steps = 64, 2, 2, 2
        halves = tuple((task, tasks[:1]) for task, tasks in halves)
    work = Path(args.work_dir or ("runs/fidelity-smoke" if args.smoke else "runs/fidelity")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    start_local()
    if args.smoke:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        from tiny import make_tiny_random_model

        teacher = str(make_tiny_random_model("bpe", work / "tiny-teacher", dropout=0.0))
    else:
        teacher = str(asset("models", "minilm-l6-mlm-wiki"))
    corpus = str(asset("corpus", "wikipedia-en", "AA"))
    student = str(work / "student")
    stage(work, "student", lambda: {"model": make_student(teacher, student)})

    sentiment_corpus = args.sentiment_corpus or str(asset("corpus", "wikipedia-en", "AA", "wiki_00"))
    builders = {"pairs": lambda out: build_pairs(corpus, out, num_examples=args.pairs, seed=0),
                # a random smoke teacher is confident about no sentence: keep them all
                "sentiment": lambda out: build_sentiment(sentiment_corpus, teacher, out,
                                                         **({"threshold": 0.0} if args.smoke else {}))}
    experiments = []
    # one branch at a time (intermediate data, SMASH student, its sweep), sentiment first: SST-2
    # and MR are where this teacher is clearly above chance (RTE is not), so a sitting cut short
    # still has the informative half of the table
    steps = {"sentiment": args.distill_steps, "pairs": args.pairs_distill_steps or args.distill_steps}
    for task, tasks in halves:
        data = str(work / task)
        stage(work, task, lambda: builders[task](data))
        steps[task] = one_epoch(data, steps[task])
        budget = {"data": data, "task": f"smash-{task}", "batch_size": DISTILL_BATCH, "max_steps": steps[task],
                  "checkpoint_every": max(1, steps[task] // 4), "log_every": 25, "output_dir": str(work / "runs"),
                  "engine": EngineConfig(num_workers=1)}
        smash = stage(work, f"distill-{task}", lambda: distill(DistillConfig(
            student=student, teacher=teacher, teacher_mode="online", lr=1e-4, name=f"smash-{task}",
            **budget)))["model"]
        # PPT's prompt, on the same examples for as many steps as the SMASH student (the model frozen)
        ppt = None if args.rows and "ppt" not in args.rows else stage(work, f"ppt-{task}", lambda: run_ppt(PPTConfig(
            student=student, prompt_tokens=2 if args.smoke else 100, name=f"ppt-{task}", **budget)))["model"]
        cfg = sweep_config(f"fidelity-{task}", str(work / "sweeps"), tasks, student, smash, teacher,
                           args.finetune_steps, seeds=ONE_SPLIT if args.smoke else None, rows=args.rows, ppt=ppt,
                           smoke=args.smoke, demo_model=str(asset("models", "all-MiniLM-L6-v2")))
        started = time.time()
        try:
            done = sweep.run(cfg, resume=(Path(cfg.storage) / cfg.name / "sweep.json").exists())
        except sweep.SweepInterrupted as stopped:  # Ctrl-C: the same command continues it
            sys.exit(f"{stopped}; or re-run this command")
        print(f"[sweep {cfg.name}] {done['done']} trials done, {done['failed']} failed, "
              f"{time.time() - started:.0f} s this sitting", flush=True)
        experiments.append(done["experiment"])
    rep = report.write(experiments + args.with_sweep, str(work / "report"))
    stages = {f.stem: json.loads(f.read_text()).get("stage_seconds") for f in sorted(work.glob("*.json"))}
    print("\nstage wall times (s):", json.dumps(stages))
    print("\n" + rep["markdown"])
    print(f"\nreport: {work / 'report' / 'report.html'}")


if __name__ == "__main__":
    main()
