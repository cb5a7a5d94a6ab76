"""`rayapp demo` (`make demo`): the whole SMASH pipeline on one CPU machine, real assets.

1. sentence pairs from the local Wikipedia (Ray Data)            -> rayapp intermediate pairs
2. teacher: MiniLM-L6 encoder + fresh MLM head, further MLM pre-training on that text
3. student: every other teacher layer (3 of 6, DistilBERT's recipe)
4. teacher top-k cache (Ray Data batch inference)                 -> rayapp teacher-cache
5. SMASH distillation of the student from the cache (Ray Train)   -> rayapp distill
6. prompt FT of the student with and without SMASH on LM-BFF 16-shot RTE and SST-2

Finished stages are reused on a re-run (their outputs stay in `--work-dir`), so only the
first run pays for the teacher. Sizes are small so it runs in minutes: the numbers show the
pipeline works end to end, not the paper's accuracy (see README).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from rayapp import env

env.apply(env.LOCAL)  # one machine, local assets: loopback-only Ray, no hub; before ray is imported

from rayapp import storage  # noqa: E402
from rayapp.train.engine import EngineConfig  # noqa: E402


def _once(path: Path, build):
    """Run `build()` unless its record is already at `path` (stages are resumable)."""
    if path.exists():
        return json.loads(path.read_text())
    record = build()
    path.write_text(json.dumps(record, indent=1, default=str))
    return record


def main(argv: list[str] | None = None) -> dict:
    import ray

    from rayapp.recipes import distill, finetune, pretrain
    from rayapp.assets import asset
    from rayapp.data.pairs import build_pairs
    from rayapp.data.teacher_cache import build_cache

    p = argparse.ArgumentParser(prog="rayapp demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--work-dir", default=".cache/demo")
    p.add_argument("--pairs", type=int, default=3000)
    p.add_argument("--teacher-steps", type=int, default=80)
    p.add_argument("--distill-steps", type=int, default=120)
    p.add_argument("--finetune-steps", type=int, default=100)
    p.add_argument("--tasks", nargs="+", default=["RTE", "SST-2"])
    args = p.parse_args(argv)
    work = Path(args.work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    if not ray.is_initialized():
        ray.init(include_dashboard=False)
    engine = EngineConfig(num_workers=1)
    runs = str(work / "runs")

    pairs = str(work / "pairs")
    _once(work / "pairs.json", lambda: build_pairs(str(asset("corpus", "wikipedia-en", "AA")), pairs,
                                                   num_examples=args.pairs, seed=0))
    teacher = _once(work / "teacher.json", lambda: pretrain.run(pretrain.PretrainConfig(
        model=str(asset("models", "all-MiniLM-L6-v2")), data=pairs, max_length=48, batch_size=16, lr=5e-4,
        max_steps=args.teacher_steps, checkpoint_every=args.teacher_steps, output_dir=runs, name="teacher",
        engine=engine)))
    student = str(work / "student")
    if not (work / "student" / "config.json").exists():
        pretrain.make_student(teacher["model"], student)
    cache = str(work / "cache")
    _once(work / "cache.json", lambda: build_cache(pairs, teacher["model"], cache, task="smash-pairs", top_k=64))
    smash = _once(work / "distill.json", lambda: distill.run(distill.DistillConfig(
        student=student, teacher=teacher["model"], data=cache, batch_size=16, lr=1e-4,
        max_steps=args.distill_steps, checkpoint_every=args.distill_steps, log_every=20, output_dir=runs,
        name="smash", engine=engine)))

    table = {}
    for task in args.tasks:
        for label, init in (("student", None), ("student + SMASH", smash["model"])):
            rec = _once(work / f"ft-{task}-{label.replace(' ', '').replace('+', '-')}.json",
                        lambda: finetune.run(finetune.FinetuneConfig(
                            task=task, model=student, init=init, batch_size=4, lr=5e-5,
                            max_steps=args.finetune_steps, eval_every=25, output_dir=runs, engine=engine,
                            max_length=128 if task != "SST-2" else 64)))
            table.setdefault(label, {})[task] = rec["test"]
    summary = {
        "teacher_masked_accuracy": teacher["masked_accuracy"],
        "distill_loss": [smash["first_loss"], smash["last_loss"]],
        "test": table,
    }
    print("\nteacher masked-token accuracy (step, acc):", teacher["masked_accuracy"])
    print(f"distillation soft-CE: {smash['first_loss']:.3f} -> {smash['last_loss']:.3f} "
          f"over {smash['steps']} steps; student: {smash['model']}")
    print(f"\n{'16-shot test (seed 13)':24s}" + "".join(f"{t:>10s}" for t in args.tasks))
    for label, row in table.items():
        print(f"{label:24s}" + "".join(f"{row[t]:10.3f}" for t in args.tasks))
    print(f"\nall records: {storage.join(runs, 'results.jsonl')}")
    return summary


if __name__ == "__main__":
    main()
