"""Tokens/s of the SMASH distillation step under Ray Train (1 worker) vs a bare PyTorch loop.

Same student (3 layers cut from MiniLM-L6-H384), same teacher top-k cache (pairs built from
the local Wikipedia, top-64 of the MiniLM teacher), same global batch, same loss and
optimizer; both runs in this process, one after the other, and the ratio is printed. Ray
Train's number includes what a user's run pays for: Ray Data streaming the cache into the
worker, DDP wrapping, progress reporting and one checkpoint at the end. On a machine with a
GPU (`--gpu`) the Ray Train run uses DeepSpeed ZeRO-2 in bf16 and MFU is printed too.

    python benchmarks/train_overhead.py [--steps 60] [--batch 32] [--threads 2] [--gpu]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def build_inputs(work: Path, examples: int) -> tuple[str, str, str]:
    from rayapp.assets import asset
    from rayapp.data.pairs import build_pairs
    from rayapp.recipes.pretrain import make_student
    from rayapp.data.teacher_cache import build_cache

    teacher = str(asset("models", "all-MiniLM-L6-v2"))
    corpus = str(asset("corpus", "wikipedia-en", "AA", "wiki_00"))
    build_pairs(corpus, str(work / "pairs"), num_examples=examples, seed=0)
    build_cache(str(work / "pairs"), teacher, str(work / "cache"), task="smash-pairs", top_k=64)
    return teacher, make_student(teacher, str(work / "student")), str(work / "cache")


def bare_loop(student_dir: str, cache: str, batch: int, steps: int, warmup: int, device: str) -> float:
    """The distillation step without Ray: same collate, loss, optimizer and schedule."""
    import pyarrow.parquet as pq

    from rayapp.recipes.distill import DistillConfig, cache_batch, make_loss_fn
    from rayapp.train.engine import linear_schedule
    from rayapp.modeling.models import LogitsAt, load_mlm, load_tokenizer

    rows = pq.read_table(cache).to_pydict()
    tok = load_tokenizer(student_dir)
    model = LogitsAt(load_mlm(student_dir)).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    sched = linear_schedule(opt, 0, steps)
    loss_fn = make_loss_fn(DistillConfig(data=cache), None, None)
    tokens, start = 0, None
    for step in range(steps):
        if step == warmup:
            tokens, start = 0, time.perf_counter()
        chunk = {k: v[step * batch:(step + 1) * batch] for k, v in rows.items()}
        b = {k: v.to(device) for k, v in cache_batch(chunk, tok.pad_token_id).items()}
        loss, _ = loss_fn(model, b)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        tokens += int(b["attention_mask"].sum())
    if device == "cuda":
        torch.cuda.synchronize()
    return tokens / (time.perf_counter() - start)


def ray_train(student_dir: str, cache: str, batch: int, steps: int, warmup: int, threads: int, gpu: bool,
              out: str) -> tuple[float, dict]:
    from rayapp.recipes.distill import DistillConfig, run
    from rayapp.train.engine import EngineConfig

    engine = (EngineConfig(num_workers=1, engine="deepspeed", zero_stage=2, precision="bf16", use_gpu=True)
              if gpu else EngineConfig(num_workers=1, cpus_per_worker=threads))
    rec = run(DistillConfig(student=student_dir, data=cache, batch_size=batch, lr=1e-4, max_steps=steps,
                            checkpoint_every=steps, log_every=warmup, output_dir=out, name="bench",
                            engine=engine))
    after = [tps for step, tps in rec["throughput"] if step > warmup]  # first window: start-up
    return sum(after) / len(after), rec


def main() -> None:
    import ray

    from rayapp.modeling.models import load_mlm

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=2, help="CPU threads for both loops")
    p.add_argument("--gpu", action="store_true", help="CUDA: DeepSpeed ZeRO-2 bf16 under Ray Train, MFU")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="accelerator bf16 dense peak (H100 SXM: 989)")
    args = p.parse_args()
    warmup = max(1, args.steps // 6)
    torch.set_num_threads(args.threads)
    ray.init(num_cpus=max(2, args.threads), include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        _, student, cache = build_inputs(work, args.batch * args.steps)
        device = "cuda" if args.gpu else "cpu"
        bare = bare_loop(student, cache, args.batch, args.steps, warmup, device)
        under_ray, rec = ray_train(student, cache, args.batch, args.steps, warmup, args.threads, args.gpu,
                                   str(work / "runs"))
        params = sum(t.numel() for t in load_mlm(student).parameters())
    print(f"\nSMASH distillation step, student {params / 1e6:.1f}M params, global batch {args.batch}, "
          f"{args.steps} steps (first {warmup} not timed), {device}")
    print(f"{'loop':28s}{'tokens/s':>12s}")
    print(f"{'bare PyTorch':28s}{bare:12.0f}")
    print(f"{'Ray Train (1 worker)':28s}{under_ray:12.0f}")
    print(f"ratio Ray Train / bare: {under_ray / bare:.3f}")
    if args.gpu:  # 6 N flops per token for forward + backward of a dense transformer
        print(f"MFU (Ray Train, DeepSpeed bf16): {6 * params * under_ray / (args.peak_tflops * 1e12):.3%}")


if __name__ == "__main__":
    main()
