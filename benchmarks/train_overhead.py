"""Tokens/s of the SMASH distillation step as `rayapp distill` runs it (1 worker: the local
launcher, and forced onto Ray Train with `engine.launcher=train`) vs a bare PyTorch loop.

Same student (3 layers cut from the local MiniLM-L6 teacher), same teacher top-k cache
(pairs built from the local Wikipedia, top-64 of that teacher), same global batch, same
collate (`cache_batch`), objective (`objectives.bind("ce-cache")`), AdamW, linear schedule
and gradient clipping; all three in this process, one after the other, with the same number
of CPU threads. rayapp's numbers include what a user's run pays for: streaming the cache's
parquet shards into the worker, progress reporting and one checkpoint at the end; the first
`--steps/6` steps (start-up) are not timed on either side. With `--gpu` the Ray Train run
uses DeepSpeed ZeRO-2 in bf16 (the local launcher is DDP only) and MFU is printed too.
`--smoke`: the tests' tiny random RoBERTa and its 1-layer cut, a few steps (CI runs it).

    python benchmarks/train_overhead.py [--steps 60] [--batch 32] [--threads 2] [--gpu] [--smoke]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # tiny.py

from rayapp import env  # noqa: E402

env.apply(env.LOCAL)


def build_inputs(work: Path, examples: int, smoke: bool) -> tuple[str, str]:
    """(student dir, cache dir)."""
    from rayapp.assets import asset
    from rayapp.data.pairs import build_pairs
    from rayapp.data.teacher_cache import build_cache
    from rayapp.recipes.pretrain import make_student

    if smoke:
        from tiny import make_tiny_random_model

        teacher, layers = str(make_tiny_random_model("bpe", work / "teacher", dropout=0.0)), [0]
    else:
        teacher, layers = str(asset("models", "minilm-l6-mlm-wiki")), [0, 2, 4]
    build_pairs(str(asset("corpus", "wikipedia-en", "AA", "wiki_00")), str(work / "pairs"), num_examples=examples,
                seed=0)
    build_cache(str(work / "pairs"), teacher, str(work / "cache"), task="smash-pairs", top_k=64)
    return make_student(teacher, str(work / "student"), layers=layers), str(work / "cache")


def distill_config(student: str, cache: str, batch: int, steps: int, **kw):
    from rayapp.recipes.distill import DistillConfig

    return DistillConfig(student=student, data=cache, batch_size=batch, lr=1e-4, weight_decay=0.01, max_steps=steps,
                         checkpoint_every=steps, **kw)


def bare_loop(student: str, cache: str, batch: int, steps: int, warmup: int, device: str) -> float:
    """The distillation step without Ray or rayapp's loop: same collate, objective,
    optimizer, schedule and clipping, over the cache's rows in file order."""
    import pyarrow.dataset as ds
    from transformers import get_linear_schedule_with_warmup

    from rayapp.modeling.batches import cache_batch
    from rayapp.modeling.models import LogitsAt, load_mlm, load_tokenizer
    from rayapp.recipes import objectives
    from rayapp.tasks.registry import INTERMEDIATE_TASKS

    cfg = distill_config(student, cache, batch, steps)
    rows = ds.dataset(cache, format="parquet").to_table().to_pydict()
    pad = load_tokenizer(student).pad_token_id
    model = LogitsAt(load_mlm(student)).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = get_linear_schedule_with_warmup(opt, 0, steps)
    objective = objectives.bind(cfg.objective_name, None, objectives.Context(cfg, INTERMEDIATE_TASKS[cfg.task]))
    n = len(rows["input_ids"])
    tokens, start = 0, time.perf_counter()
    for step in range(steps):
        if step == warmup:
            tokens, start = 0, time.perf_counter()
        ids = [(step * batch + i) % n for i in range(batch)]
        b = {k: v.to(device) for k, v in cache_batch({k: [v[i] for i in ids] for k, v in rows.items()}, pad).items()}
        loss, _ = objective(model, b)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        tokens += int(b["attention_mask"].sum())
    if device == "cuda":
        torch.cuda.synchronize()
    return tokens / (time.perf_counter() - start)


def rayapp_run(student: str, cache: str, batch: int, steps: int, warmup: int, threads: int, gpu: bool,
               out: str, launcher: str) -> float:
    """Mean tokens/s of `rayapp distill` after the first `warmup` steps."""
    from rayapp.recipes.distill import run
    from rayapp.train.engine import EngineConfig

    engine = (EngineConfig(num_workers=1, engine="deepspeed", zero_stage=2, precision="bf16", use_gpu=True)
              if gpu else EngineConfig(num_workers=1, cpus_per_worker=threads, launcher=launcher))
    rec = run(distill_config(student, cache, batch, steps, log_every=warmup, output_dir=out, name=launcher,
                             engine=engine))
    after = [tps for step, tps in rec["throughput"] if step > warmup]  # first window: start-up
    return sum(after) / len(after)


def main() -> None:
    import ray

    from rayapp.modeling.models import load_mlm

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=2, help="CPU threads for every loop")
    p.add_argument("--gpu", action="store_true", help="CUDA: DeepSpeed ZeRO-2 bf16 under Ray Train, MFU")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="accelerator bf16 dense peak (H100 SXM: 989)")
    p.add_argument("--smoke", action="store_true", help="tiny random models, 6 steps of batch 8")
    args = p.parse_args()
    if args.smoke:
        args.steps, args.batch = 6, 8
    warmup = max(1, args.steps // 6)
    torch.set_num_threads(args.threads)
    # the workers get OMP_NUM_THREADS = their CPUs, i.e. --threads, like this process
    ray.init(num_cpus=args.threads, include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        student, cache = build_inputs(work, args.batch * args.steps, args.smoke)
        device = "cuda" if args.gpu else "cpu"
        bare = bare_loop(student, cache, args.batch, args.steps, warmup, device)
        rows = [("bare PyTorch", bare)]
        for label, launcher in ([] if args.gpu else [("rayapp, local launcher", "auto")]) + [
                ("rayapp on Ray Train (1 worker)", "train")]:
            rows.append((label, rayapp_run(student, cache, args.batch, args.steps, warmup, args.threads, args.gpu,
                                           str(work / "runs"), launcher)))
        params = sum(t.numel() for t in load_mlm(student).parameters())
    print(f"\nSMASH distillation step, student {params / 1e6:.1f}M params, global batch {args.batch}, "
          f"{args.steps} steps (first {warmup} not timed), {device}, {args.threads} threads")
    print(f"{'loop':32s}{'tokens/s':>10s}{'/ bare':>8s}")
    for label, tps in rows:
        print(f"{label:32s}{tps:10.0f}{tps / bare:8.3f}")
    if args.gpu:  # 6 N flops per token for forward + backward of a dense transformer
        print(f"MFU (Ray Train, DeepSpeed bf16): {6 * params * rows[-1][1] / (args.peak_tflops * 1e12):.3%}")


if __name__ == "__main__":
    main()
