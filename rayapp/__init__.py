"""rayapp: prompt-based knowledge distillation for few-shot learners, on Ray.

Importing rayapp raises CPython's third garbage-collection threshold (full collections) to at
least 1000. Every rayapp process (a CLI or job driver, a Tune trial, a Train worker, a Ray Data
actor) starts by importing torch, transformers and Ray: about 480,000 long-lived objects,
over which the default thresholds (700, 10, 10) run a full collection every 70,000 allocations
that finds no garbage. That was 11-19% of each process's import time (`benchmarks/startup.py`),
paid again by every trial and worker. Young collections keep their defaults, and a long run
still gets a full collection every 7 million allocations, so reference cycles are still freed.
"""
import gc


def fewer_full_collections() -> None:
    """Raise the third threshold to at least 1000, keeping a user's higher setting. Also the
    `worker_process_setup_hook` of every cluster rayapp starts or submits to
    (`rayapp.env.SETUP_HOOK`): a Ray worker then has it before it imports Ray Train, Tune or
    Data for the actor it becomes, not only from the point its task imports rayapp."""
    young, middle, full = gc.get_threshold()
    gc.set_threshold(young, middle, max(full, 1000))


fewer_full_collections()
