"""LM-BFF's demonstrations (Gao et al. 2021 §6; src/dataset.py, `demo_filter`): which training
examples follow an input in its prompt (how they are written: `tasks.prompts`, module docstring).

Per input, one training example per class, drawn from that class's share of the training
examples most similar to the input:
- similarity is the cosine between SBERT embeddings of the examples' text (`text_a`, or
  `text_a + " " + text_b` for pairs, as LM-BFF's tools/get_sbert_embedding.py writes them);
- the candidates are the training examples other than the input itself (in training; all
  of them at dev/test), sorted by similarity; each class keeps its first
  ``int(len(candidates) // num_classes * demo_filter_rate)`` (LM-BFF's limit, taken from the
  candidate count, not the class's: 7 of each class's 16 for a 16-shot binary train input, 8
  at test) and the demonstration is drawn uniformly from those (LM-BFF permutes the filtered
  list and takes each class's first, the same draw);
- a regression task's classes are the two sides of its range (`Task.class_of`);
- in training the draw is redone at every step (`for_training(i, step)`); dev and test
  examples get `demo_samples` drawn sets each (`for_evaluation`), fixed for the run (LM-BFF
  draws them once, when it builds its dev and test sets), over which prediction averages
  (`recipes.finetune.predict`).

Embeddings are computed once per run, in the worker that trains (`build`): one batched
SBERT call over the unique texts of the split's train, dev and test sets. A 16-shot split
has 32-96 train and dev texts and test sets of 0.3k-10k (QQP: 40k). That is one encoder pass
per text, where the run's final test evaluation alone makes `demo_samples` passes per test
example over sequences about 1 + num_classes times longer: at paper scale (roberta-large SBERT,
355M parameters; DistilRoBERTa student, 82M; 16 sets; binary tasks) about a tenth of that
evaluation, and less with the MiniLM SBERT here (SST-2's 936 texts: 11 s on one CPU core of
this machine). A data-stage job writing embedding files, as LM-BFF's tool does, would save
that once per split against every trial of a sweep at the price of a stage, files and their
invalidation; not worth it at these sizes.

Where this differs from LM-BFF: draws come from a generator seeded per (run seed, step,
example) or (run seed, example, set), so a resumed run draws what the first one would have,
where LM-BFF draws from numpy's global state; a split with a class of fewer than 2
training examples is refused (LM-BFF would show a train input of it no demonstration of its
class); LM-BFF's GPT-3
style in-context mode (``gpt3_in_context_*``) is not here.
"""
from __future__ import annotations

import importlib.util

import numpy as np

from rayapp.data.fewshot import Example, FewShotSplit
from rayapp.errors import ConfigError, DataError
from rayapp.tasks.prompts import Task

LMBFF_SBERT = "sentence-transformers/roberta-large-nli-stsb-mean-tokens"  # LM-BFF's sbert-roberta-large
_TRAIN, _EVAL = 0, 1  # random streams of the draws

Shown = list[tuple[tuple[str, ...], int]]  # one (input sentences, class) per class: `PromptEncoder.encode`'s demos


def _key(example: Example) -> tuple[str, str | None]:
    return example.text_a, example.text_b


def sbert_text(example: Example) -> str:
    """The text SBERT embeds (LM-BFF: the sentence, or both sentences joined by a space)."""
    return example.text_a if example.text_b is None else f"{example.text_a} {example.text_b}"


def check_sbert(model_ref: str) -> None:
    """On the driver: sentence-transformers is installed and `model_ref` is a model."""
    from rayapp.modeling.models import check_model as check

    if importlib.util.find_spec("sentence_transformers") is None:
        raise ConfigError("demonstrations=true embeds examples with sentence-transformers: "
                          "pip install 'rayapp[lmbff]'")
    try:
        check(model_ref, mlm=False)
    except ConfigError as e:
        raise ConfigError(f"demo_model (the SBERT that picks demonstrations): {e}") from None


def embed(model_ref: str, texts: list[str], device, batch_size: int = 64) -> np.ndarray:
    """SBERT embeddings of `texts`, `[N, D]` float32."""
    from sentence_transformers import SentenceTransformer

    from rayapp.modeling.models import local_model_dir

    model = SentenceTransformer(local_model_dir(model_ref), device=str(device))
    return model.encode(texts, batch_size=batch_size, convert_to_numpy=True, show_progress_bar=False)


def top_similar(query: np.ndarray, support: np.ndarray, classes: np.ndarray, num_classes: int, rate: float,
                exclude: int | None = None) -> list[np.ndarray]:
    """Per class, the support rows a demonstration is drawn from (module docstring): `support`
    unit vectors `[S, D]`, `query` a unit vector, `classes` each support row's class."""
    candidates = np.array([i for i in range(len(support)) if i != exclude])
    order = candidates[np.argsort(-(support[candidates] @ query), kind="stable")]
    limit = max(1, int(len(candidates) // num_classes * rate))
    return [order[classes[order] == c][:limit] for c in range(num_classes)]


def _unit(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.maximum(np.linalg.norm(vectors, axis=-1, keepdims=True), 1e-12)


class Demonstrations:
    """The demonstrations of one split: `support` (its train set) and a unit vector per text."""

    def __init__(self, task: Task, support: list[Example], vectors: dict, rate: float, samples: int, seed: int):
        self.task, self.support, self.rate, self.samples, self.seed = task, support, rate, samples, seed
        self._vectors = vectors
        self._support = np.stack([vectors[_key(e)] for e in support])
        self._classes = np.array([task.class_of(e.label) for e in support])
        counts = np.bincount(self._classes, minlength=len(task.labels))
        if counts.min() < 2:
            raise DataError(f"task {task.name}: demonstrations need at least 2 training examples per class (an input "
                            f"is never its own demonstration); class {task.labels[int(counts.argmin())]} has "
                            f"{counts.min()}")

    @classmethod
    def build(cls, task: Task, split: FewShotSplit, model_ref: str, rate: float, samples: int, seed: int,
              device) -> "Demonstrations":
        """Embed the split's texts with the SBERT `model_ref` (module docstring)."""
        examples = {_key(e): e for e in split.train + split.dev + split.test}
        vectors = _unit(embed(model_ref, [sbert_text(e) for e in examples.values()], device))
        return cls(task, split.train, dict(zip(examples, vectors)), rate, samples, seed)

    def _draw(self, pools: list[np.ndarray], rng: np.random.Generator) -> Shown:
        shown = [self.support[int(rng.choice(pool))] for pool in pools]
        return [((e.text_a,) if e.text_b is None else (e.text_a, e.text_b), self.task.class_of(e.label)) for e in shown]

    def _pools(self, example: Example, exclude: int | None) -> list[np.ndarray]:
        return top_similar(self._vectors[_key(example)], self._support, self._classes, len(self.task.labels),
                           self.rate, exclude)

    def for_training(self, i: int, step: int) -> Shown:
        """The demonstrations of train example `i` at `step`."""
        return self._draw(self._pools(self.support[i], exclude=i), np.random.default_rng([self.seed, _TRAIN, step, i]))

    def for_evaluation(self, example: Example, position: int) -> list[Shown]:
        """`samples` demonstration sets of the dev/test example at `position` of its set."""
        pools = self._pools(example, exclude=None)
        return [self._draw(pools, np.random.default_rng([self.seed, _EVAL, position, j])) for j in range(self.samples)]
