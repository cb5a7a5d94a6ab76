"""Seconds per step of `rayapp pretrain` (1 worker) vs a plain PyTorch MLM loop.

The reference is what a user would write without rayapp: HF's `AutoModelForMaskedLM(labels=)`
(vocabulary projection at every position), `DataCollatorForLanguageModeling`, AdamW, on the
same text chunks of the local Wikipedia, same model (the MiniLM-L6 MLM teacher asset), same
global batch and length, same CPU threads. rayapp's number is the recipe as `rayapp pretrain`
runs it: the corpus chunked into a data folder, streamed by Ray Data into the worker,
masked in the loop, logits only at the masked positions (`LogitsAt`), one evaluation and one
checkpoint at the end; the first `--warmup` steps of both loops are not timed. Both loops run
in this process, one after the other, and the ratio is printed. `--smoke`: the tests' tiny
random BERT, a few small steps (CI).

    python benchmarks/pretrain.py [--steps 24] [--batch 32] [--length 64] [--threads 2] [--smoke]
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # tiny.py

from rayapp import env  # noqa: E402

env.apply(env.LOCAL)


def plain_loop(model_dir: str, texts: list[str], batch: int, length: int, steps: int, warmup: int) -> float:
    """Tokens/s of the loop a user writes by hand (tokenised up front, masked per batch)."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer, DataCollatorForLanguageModeling

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForMaskedLM.from_pretrained(model_dir).train()
    collator = DataCollatorForLanguageModeling(tok, mlm_probability=0.15, seed=0)
    rows = tok(texts[:batch * steps], truncation=True, max_length=length)
    rows = [dict(zip(rows, values)) for values in zip(*rows.values())]
    opt = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.01)
    tokens, start = 0, None
    for step in range(steps):
        if step == warmup:
            tokens, start = 0, time.perf_counter()
        b = collator(rows[step * batch:(step + 1) * batch])
        model(**b).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += int(b["attention_mask"].sum())
    return tokens / (time.perf_counter() - start)


def rayapp_pretrain(model_dir: str, corpus: str, batch: int, length: int, steps: int, warmup: int,
                    threads: int, out: str) -> tuple[float, dict]:
    from rayapp.recipes.pretrain import PretrainConfig, run
    from rayapp.train.engine import EngineConfig

    rec = run(PretrainConfig(model=model_dir, data=corpus, batch_size=batch, max_length=length, lr=5e-5,
                             max_steps=steps, eval_every=steps, checkpoint_every=steps, log_every=warmup,
                             eval_examples=64, output_dir=out, name="bench",
                             engine=EngineConfig(num_workers=1, cpus_per_worker=threads)))
    after = [tps for step, tps in rec["throughput"] if step > warmup]  # first window: start-up
    return sum(after) / len(after), rec


def main() -> None:
    import ray

    from rayapp.assets import asset
    from rayapp.data.mlm_text import read_text_chunks
    from rayapp.modeling.models import load_mlm

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--length", type=int, default=64)
    p.add_argument("--threads", type=int, default=2, help="CPU threads for both loops")
    p.add_argument("--smoke", action="store_true", help="the tests' tiny random BERT, 6 steps of 4 x 32 (CI)")
    args = p.parse_args()
    if args.smoke:
        args.steps, args.batch, args.length = 6, 4, 32
    warmup = max(1, args.steps // 6)
    torch.set_num_threads(args.threads)
    work = tempfile.mkdtemp(prefix="bench-pretrain-")
    if args.smoke:
        from tiny import make_tiny_random_model

        model_dir = str(make_tiny_random_model("wordpiece", Path(work) / "tiny-bert", dropout=0.0))
    else:
        model_dir = str(asset("models", "minilm-l6-mlm-wiki"))
    corpus = str(asset("corpus", "wikipedia-en", "AA"))
    ray.init(num_cpus=max(2, args.threads), include_dashboard=False, log_to_driver=False)
    texts = [r["text"] for r in read_text_chunks(corpus, args.length).take(args.batch * args.steps)]
    plain = plain_loop(model_dir, texts, args.batch, args.length, args.steps, warmup)
    ours, rec = rayapp_pretrain(model_dir, corpus, args.batch, args.length, args.steps, warmup, args.threads,
                                str(Path(work) / "runs"))
    params = sum(t.numel() for t in load_mlm(model_dir).parameters())
    shutil.rmtree(work)
    per_step = args.batch * args.length  # chunks fill the window: tokens per step ~ batch x length
    print(f"\nMLM further pre-training of {Path(model_dir).name} ({params / 1e6:.1f}M params), "
          f"batch {args.batch} x {args.length} tokens, "
          f"{args.steps} steps (first {warmup} not timed), {args.threads} CPU threads")
    print(f"{'loop':30s}{'tokens/s':>10s}{'s/step':>9s}")
    print(f"{'plain PyTorch (HF labels=)':30s}{plain:10.0f}{per_step / plain:9.2f}")
    print(f"{'rayapp pretrain':30s}{ours:10.0f}{per_step / ours:9.2f}")
    print(f"ratio rayapp / plain (tokens/s): {ours / plain:.2f}; whole run {rec['seconds']:.0f} s wall, "
          f"masked accuracy {rec['masked_accuracy'][-1][1]:.3f}")


if __name__ == "__main__":
    main()
