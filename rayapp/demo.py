"""`rayapp demo` (`make demo`): the SMASH pipeline on one CPU machine, on real local assets.

1. sentence pairs from the local Wikipedia (Ray Data)                  rayapp intermediate pairs
2. the teacher: the real MiniLM-L6 MLM (`../shared/data/models/minilm-l6-mlm-wiki`);
   the student: its every other layer (3 of 6)                          rayapp init-student
3. the teacher's top-k cache (Ray Data batch inference)                  rayapp teacher-cache
4. SMASH distillation of the student from the cache (Ray Train)          rayapp distill
5. a Ray Tune sweep: teacher, plain student and SMASH student, prompt FT
   on 2 tasks x 2 LM-BFF splits, best dev step, test                     rayapp sweep
6. the report table and report.html                                     rayapp report

Every stage keeps its output in `--work-dir` and is skipped when it is there, so a second
run only re-prints the report. Sizes are small so the first run takes minutes on 2 cores:
the numbers show the method's direction on a small teacher, not the paper's (README).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def stage(work: Path, name: str, build) -> dict:
    """Run `build()` unless its record is already in `work` (stages resume); print timing."""
    path = work / f"{name}.json"
    if path.exists():
        print(f"[{name}] done before: {path}")
        return json.loads(path.read_text())
    print(f"[{name}] ...", flush=True)
    started = time.time()
    record = build()
    record = {**record, "stage_seconds": round(time.time() - started, 1)}
    path.write_text(json.dumps(record, indent=1, default=str))
    print(f"[{name}] {record['stage_seconds']} s", flush=True)
    return record


def start_local() -> None:
    """A local Ray cluster for a pipeline on this machine, with the LOCAL flags and a clean log."""
    from rayapp import env

    env.apply(env.LOCAL)
    env.start_ray()


def main(argv: list[str] | None = None) -> dict:
    import ray

    from rayapp.assets import asset
    from rayapp.data.pairs import build_pairs
    from rayapp.data.teacher_cache import build_cache
    from rayapp.recipes.distill import DistillConfig
    from rayapp.recipes.distill import run as distill
    from rayapp.recipes.pretrain import make_student
    from rayapp.sweep import report
    from rayapp.sweep import tune as sweep
    from rayapp.sweep.spec import SweepConfig, TableSpec
    from rayapp.train.engine import EngineConfig

    p = argparse.ArgumentParser(prog="rayapp demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--work-dir", default=".cache/demo")
    p.add_argument("--pairs", type=int, default=2000)
    p.add_argument("--distill-steps", type=int, default=120)  # one pass over the 2,000 pairs at batch 16
    p.add_argument("--finetune-steps", type=int, default=30)
    p.add_argument("--tasks", nargs="+", default=["SST-2", "RTE"])
    p.add_argument("--seeds", type=int, nargs="+", default=[13, 21])
    args = p.parse_args(argv)
    work = Path(args.work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    start_local()
    teacher = str(asset("models", "minilm-l6-mlm-wiki"))
    # the distillation runs alone: one worker on every CPU of the machine (its threads), where
    # the sweep's trials take one CPU each, side by side
    engine = EngineConfig(num_workers=1, cpus_per_worker=max(1, int(ray.cluster_resources().get("CPU", 1))))

    pairs = str(work / "pairs")
    stage(work, "pairs", lambda: build_pairs(str(asset("corpus", "wikipedia-en", "AA")), pairs,
                                             num_examples=args.pairs, seed=0))
    student = str(work / "student")
    stage(work, "student", lambda: {"model": make_student(teacher, student)})
    cache = str(work / "cache")
    stage(work, "cache", lambda: build_cache(pairs, teacher, cache, task="smash-pairs", top_k=64))
    smash = stage(work, "distill", lambda: distill(DistillConfig(
        student=student, teacher=teacher, data=cache, batch_size=16, lr=1e-4, max_steps=args.distill_steps,
        checkpoint_every=args.distill_steps, log_every=25, output_dir=str(work / "runs"), name="smash",
        engine=engine)))

    cfg = SweepConfig(
        name="demo", storage=str(work / "sweeps"), tasks=args.tasks, seeds=args.seeds, grid={},
        base={"batch_size": 4, "lr": 5e-5, "max_steps": args.finetune_steps, "eval_every": 10,
              "engine": {"num_workers": 1}},
        per_task={"SST-2": {"max_length": 64}},
        # zero-shot rows are in the fidelity table (README): the demo keeps to its 15 minutes
        methods={"teacher": {"method": "prompt", "model": teacher, "label": "teacher (MiniLM-L6) prompt FT"},
                 "student": {"method": "prompt", "model": student, "label": "student (3 layers) prompt FT"},
                 "smash": {"method": "prompt", "model": smash["model"], "label": "student + SMASH prompt FT"}},
        tables=[TableSpec(name="demo", title="16-shot test, mean (std) over the splits",
                          rows=["teacher", "student", "smash"])])
    done = sweep.run(cfg, resume=(Path(cfg.storage) / cfg.name / "sweep.json").exists())
    out = work / "report"
    rep = report.write([done["experiment"]], str(out))
    covered = json.loads((work / "cache.json").read_text()).get("mean_covered")
    print(f"\nSMASH distillation: soft CE {smash['first_loss']:.3f} -> {smash['last_loss']:.3f} over "
          f"{smash['step']} steps; the top-64 cache covers {covered:.0%} of the teacher's mass on average")
    print("\n" + rep["markdown"])
    print(f"\nreport: {out / 'report.html'}")
    return {"sweep": done, "report": rep}
