"""Prompts: a task is a template + a verbalizer + a metric (SMASH Table 6, LM-BFF).

Template syntax
---------------
Literal text plus slots, e.g. ``"{x0|nopunct}? {mask}, {x1|lowerfirst}"``:

- ``{x0}``, ``{x1}``: the input sentence(s); a template uses ``{x0}`` or ``{x0}`` and ``{x1}``.
- ``{mask}``: exactly one, where the model predicts the label word.
- modifiers (from LM-BFF's template language), chainable with ``|``:
  ``{x0|nopunct}`` drops the sentence's final punctuation character (LM-BFF ``*sent-_0*``),
  ``{x1|lowerfirst}`` lowercases its first letter (``*sentl_1*``).

Special tokens (CLS/SEP, <s> </s>) are never written: the tokenizer's own post-processor adds
them around the single concatenated sequence. Outer whitespace of a template is ignored.

How a template is tokenised (works for byte-level BPE and WordPiece alike)
--------------------------------------------------------------------------
Each piece is tokenised on its own, so truncation can cut sentences without touching the
template. Whitespace before a slot belongs to the slot: a sentence written after whitespace
is tokenised as ``" " + sentence`` (BPE then yields ``Ġword`` tokens as it would in running
text; WordPiece ignores the space), and whitespace before ``{mask}`` is dropped because the
label word itself is the leading-space token (``Ġgreat``). Literal text keeps its leading
whitespace (``" It was"`` -> ``ĠIt Ġwas``). Label words are looked up as the tokenisation of
``" " + word`` and must be exactly one known token.

Truncation cuts only the input sentences, longest first, from the end of a sentence; the
template and the mask always survive, and every sentence keeps at least one token.

LM-BFF's exact tokenisation (``Task.lmbff_exact``)
-------------------------------------------------
By default two rules improve on LM-BFF's ``tokenize_multipart_input`` (src/dataset.py):
input sentences are stripped of outer whitespace, and ``nopunct`` drops the final character
only when it is punctuation (then strips the space before it). LM-BFF tokenises the sentence
as read from the file and its ``*sent-_0*`` drops the last character whatever it is, so an
unpunctuated premise loses its last letter ("... black" -> "... blac?") and, with byte-level
BPE, a trailing space in the data becomes a lone ``Ġ`` token. With ``lmbff_exact=True`` both
rules are LM-BFF's, and the built-in templates then give LM-BFF's token ids exactly, for
WordPiece and byte-level BPE (tests/test_prompts.py checks every example of RTE, MRPC, QNLI, SNLI
and MNLI against a direct implementation of LM-BFF's template language). Exact mode also
truncates like LM-BFF: the tail of the whole sequence goes, [SEP] included; where that would
cut the mask (LM-BFF fails there) it falls back to rayapp's rule. Not reproduced: LM-BFF's
optional ``first_sent_limit`` (its RTE runs cap the premise at 240 tokens of 256), and
special-token text inside a sentence stays text (LM-BFF would read "[MASK]" as a second
mask). LM-BFF looks a one-character literal up as a vocabulary entry rather than tokenising
it; for the built-in templates' ``? , . :`` the two give the same id.

Label words of several tokens (``multi_token: true`` on a task; off by default, when a word
that is not one token of the model's vocabulary is an error naming it and the tokenizer).
Scored as PET scores them (Schick & Schütze 2021, "It's Not Just Size That Matters", §3.3):
``{mask}`` becomes M masks, M the most pieces any label word has; piece i of a word is read
at mask i, and the word's score is the mean log-probability of its pieces; a class's score is
the mean over its words (`class_logits`). Where this differs from PET: one forward pass with
all M masks for every word, in training and at test (PET removes a shorter word's surplus
masks and, at test, fills the masks one at a time, most confident first). Prompt
fine-tuning and evaluation (`rayapp finetune` method=prompt / zero-shot, export) take such
tasks; the distillation recipes, which compare vocabulary distributions at one mask, refuse
them.

Regression (STS-B, SMASH §3.1): ``y`` in ``[l, u]`` is interpolated between the two label
words: ``p_gold = [(u-y)/(u-l), (y-l)/(u-l)]`` and ``y_hat = l*p(low) + u*p(high)``.

T5 (SMASH §4.7, App. A.3: "the same verbalizers and similar templates by removing <s> and
replacing <mask> with <extra_id_0>"). A tokenizer with no mask token but T5's sentinel
``<extra_id_0>`` gets the sentinel in the ``{mask}`` slot (`mask_slot_token`); its own
post-processor adds no ``<s>`` and appends ``</s>``, so the built-in NLI template renders as
SMASH's ``x1? <extra_id_0>, x2</s>``. Label words are looked up as SentencePiece tokenises
``" " + word`` (``▁Yes``). SentencePiece starts every piece's first word with ``▁``; a literal
written right after a sentence (the ``?`` of ``{x0|nopunct}?``) loses the lone ``▁`` it would
get on its own, so the pieces give the ids T5's tokenizer gives the whole prompt string. The
model side is `modeling.models.LogitsAt` (the label word is the decoder's second token).
Refused for T5: ``multi_token`` (the decoder reads one token after the sentinel, not one per
mask) and ``lmbff_exact`` (LM-BFF's rules are defined for its BERT/RoBERTa tokenisation only).

Demonstrations (LM-BFF §6, ``PromptEncoder(..., demonstrations=True)``)
----------------------------------------------------------------------
One training example per class follows the input, each rendered with the same template and
its class's label word in the mask slot, each segment closed by the separator token, as
LM-BFF's ``auto_demo`` template does (run.py: ``*cls*<template>*sep+*<template with sent_i and
label_0>*sep+*...``): ``[CLS] x It was [MASK] . [SEP] d0 It was terrible . [SEP] d1 It was
great . [SEP]`` (RoBERTa: ``<s> ... </s> ... </s> ... </s>``). A class with several label
words shows its first; a regression task's demonstrations show the word of their side
(`Task.class_of`). Which examples are shown is `rayapp.data.demonstrations`' business.
Truncation (rayapp's rule): the demonstrations' sentences are cut first, longest first, down
to one token each, then the input's as above; every demonstration keeps its template and
label word, and the mask always survives. Where this differs from LM-BFF: LM-BFF caps the
input's first sentence (``first_sent_limit``) and every other sentence (``other_sent_limit``)
by task-specific token counts and then cuts the tail of the whole sequence (the head with
``truncate_head``), so a long input can lose the last demonstrations entirely; with
``lmbff_exact`` the tail cut is LM-BFF's (without the per-sentence caps). LM-BFF also gives
BERT a segment id per ``*sep+*`` (token-type embeddings grown to 10, the new rows freshly
initialised); rayapp feeds no token-type ids (RoBERTa, SMASH's student, has none). T5 has
no separator token and is refused.
"""
from __future__ import annotations

import functools
import string
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from rayapp.errors import DataError, PromptError
from rayapp.tasks.metrics import METRICS

SLOT_NAMES = ("x0", "x1", "mask")
SENTINEL = "<extra_id_0>"  # T5's first span-corruption sentinel: the mask slot of a T5 prompt
WORD_START = "\u2581"  # SentencePiece's word-start mark


def mask_slot_token(tokenizer) -> str | None:
    """What fills the ``{mask}`` slot: the tokenizer's mask token, else T5's sentinel
    ``<extra_id_0>`` where the vocabulary has it, else None."""
    if tokenizer.mask_token is not None:
        return tokenizer.mask_token
    sentinel_id = tokenizer.convert_tokens_to_ids(SENTINEL)
    return SENTINEL if sentinel_id is not None and sentinel_id != tokenizer.unk_token_id else None


def _drop_final_punct(s: str) -> str:
    # LM-BFF drops the last character unconditionally; dropping only punctuation keeps the
    # last letter of an unpunctuated sentence.
    return s[:-1].rstrip() if s and s[-1] in string.punctuation else s


def _drop_last_char(s: str) -> str:
    return s[:-1]  # LM-BFF *sent-_i*


def _lower_first(s: str) -> str:
    return s[:1].lower() + s[1:]


MODIFIERS = {"nopunct": _drop_final_punct, "lowerfirst": _lower_first}
LMBFF_MODIFIERS = {**MODIFIERS, "nopunct": _drop_last_char}  # Task.lmbff_exact


@dataclass(frozen=True)
class Segment:
    """One parsed piece of a template."""

    kind: str  # "text" | "sent" | "mask"
    text: str = ""  # literal text ("text")
    slot: int = 0  # sentence index ("sent")
    modifiers: tuple[str, ...] = ()  # applied in order ("sent")
    space: bool = False  # the sentence follows whitespace: tokenise it with a leading space


@functools.lru_cache(maxsize=None)
def parse_template(template: str) -> tuple[Segment, ...]:
    """Split a template into literal text, sentence slots and the mask (see module docstring)."""
    hint = "slots are {x0}, {x1} (input sentences) and {mask}; sentence modifiers: |"
    hint += ", |".join(MODIFIERS)
    segments: list[Segment] = []
    rest = template.strip()
    while rest:
        literal, brace, rest = rest.partition("{")
        body, close, rest = rest.partition("}") if brace else ("", "", "")
        if "}" in literal or "{" in body or (brace and not close):
            raise PromptError(f"template {template!r} has an unbalanced brace; {hint}")
        # whitespace before a slot belongs to the slot (sentence: leading space; mask: dropped)
        stripped = literal.rstrip() if brace else literal
        if stripped:
            segments.append(Segment("text", text=stripped))
        if not brace:
            break
        name, *mods = [part.strip() for part in body.split("|")]
        if name not in SLOT_NAMES:
            raise PromptError(f"template {template!r} has unknown slot {{{body}}}; {hint}")
        if name == "mask":
            if mods:
                raise PromptError(f"template {template!r}: {{mask}} takes no modifiers, got {{{body}}}")
            segments.append(Segment("mask"))
            continue
        for mod in mods:
            if mod not in MODIFIERS:
                raise PromptError(
                    f"template {template!r} has unknown modifier |{mod} in {{{body}}}; {hint}"
                )
        space = bool(segments) and stripped != literal
        segments.append(Segment("sent", slot=int(name[1]), modifiers=tuple(mods), space=space))

    masks = sum(s.kind == "mask" for s in segments)
    if masks != 1:
        what = "no {mask} slot" if masks == 0 else f"{masks} {{mask}} slots"
        raise PromptError(
            f"template {template!r} has {what}; write exactly one {{mask}} where the label word goes"
        )
    slots = {s.slot for s in segments if s.kind == "sent"}
    if slots not in ({0}, {0, 1}):
        raise PromptError(
            f"template {template!r} must use {{x0}} (one input) or {{x0}} and {{x1}} (two inputs); "
            f"it uses {sorted(f'x{i}' for i in slots)}"
        )
    return tuple(segments)


def _words(entry: str | list[str]) -> list[str]:
    return [entry] if isinstance(entry, str) else list(entry)


@dataclass(frozen=True)
class Task:
    """A prompt-based task. Labels are the verbalizer keys, in class-index order."""

    name: str
    template: str
    verbalizer: dict[str, str | list[str]]
    metric: str = "acc"
    bounds: tuple[float, float] | None = None  # regression: (l, u); labels = (low word, high word)
    lmbff_exact: bool = False  # LM-BFF's own nopunct and whitespace rules (module docstring)
    multi_token: bool = False  # label words of several tokens, PET-style (module docstring)

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name.strip():
            raise PromptError(f"task name must be a non-empty string, got {self.name!r}")
        where = f"task {self.name!r}"
        if not isinstance(self.template, str):
            raise PromptError(f"{where}: template must be a string, got {self.template!r}")
        try:
            parse_template(self.template)
        except PromptError as e:
            raise PromptError(f"{where}: {e}") from None
        for flag in ("lmbff_exact", "multi_token"):
            if not isinstance(getattr(self, flag), bool):
                raise PromptError(f"{where}: {flag} must be true or false, got {getattr(self, flag)!r}")
        if self.metric not in METRICS:
            raise PromptError(
                f"{where}: unknown metric {self.metric!r}; choose one of {', '.join(METRICS)}"
            )
        if not isinstance(self.verbalizer, dict) or len(self.verbalizer) < 2:
            raise PromptError(
                f"{where}: verbalizer must map at least 2 labels to words, got {self.verbalizer!r}"
            )
        for label, entry in self.verbalizer.items():
            words = _words(entry) if isinstance(entry, (str, list, tuple)) else [entry]
            if not words or not all(isinstance(w, str) and w.strip() for w in words):
                hint = ""
                if isinstance(entry, bool):
                    hint = ": YAML reads unquoted No/Yes/On/Off as booleans, quote the word"
                raise PromptError(
                    f"{where}: label {label!r} must map to a word or a list of words, got {entry!r}{hint}"
                )
        if self.metric == "pearson" and self.bounds is None:
            raise PromptError(
                f"{where}: metric pearson makes it a regression task, which needs bounds: [low, high] "
                "(the label range, e.g. [0, 5] for STS-B)"
            )
        if self.bounds is not None:
            if len(self.bounds) != 2 or not self.bounds[0] < self.bounds[1]:
                raise PromptError(f"{where}: bounds must be [low, high] with low < high, got {self.bounds!r}")
            if len(self.verbalizer) != 2:
                raise PromptError(
                    f"{where}: a regression task needs exactly 2 labels (low word, high word), "
                    f"got {list(self.verbalizer)}"
                )

    @property
    def segments(self) -> tuple[Segment, ...]:
        return parse_template(self.template)

    @property
    def labels(self) -> list[str]:
        return list(self.verbalizer)

    @property
    def num_inputs(self) -> int:
        return len({s.slot for s in self.segments if s.kind == "sent"})

    @property
    def is_regression(self) -> bool:
        return self.bounds is not None

    def label_index(self, label) -> int:
        """Class index of a label as written in the data files ("1", 1, "entailment")."""
        if self.is_regression:
            raise DataError(
                f"task {self.name!r} is a regression task: its labels are numbers in {self.bounds}, "
                "not classes; read them with float()"
            )
        key = str(label).strip()
        try:
            return self.labels.index(key)
        except ValueError:
            raise DataError(
                f"unknown label {key!r} for task {self.name!r}; known labels: {self.labels}"
            ) from None

    def class_of(self, label) -> int:
        """The class whose label word stands for `label`: its class index, or for a regression
        score its side of the range, low at or below the midpoint of `bounds` (LM-BFF's
        demonstrations split STS-B at its median_mapping, 2.5: the midpoint of [0, 5])."""
        if not self.is_regression:
            return self.label_index(label)
        low, high = self.bounds
        return int(float(label) > (low + high) / 2)


def _truncate(sentences: list[list[int]], budget: int) -> None:
    """Cut tokens off the end of the longest sentence until all fit in `budget` (in place)."""
    total = sum(map(len, sentences))
    while total > budget:
        max(sentences, key=len).pop()
        total -= 1


class PromptEncoder:
    """Turns input sentences into token ids of the task's prompt for one tokenizer; with
    `demonstrations`, followed by one demonstration per class (module docstring)."""

    def __init__(self, tokenizer, task: Task, max_length: int = 128, demonstrations: bool = False):
        self.tokenizer, self.task, self.max_length = tokenizer, task, max_length
        self.demonstrations = demonstrations
        name = type(tokenizer).__name__
        mask = mask_slot_token(tokenizer)
        if mask is None:
            raise PromptError(
                f"tokenizer {name} has no mask token; task {task.name!r} needs a masked-LM "
                f"tokenizer (BERT, RoBERTa, ...) or T5's, whose {SENTINEL} fills the mask slot"
            )
        self.mask_id = tokenizer.convert_tokens_to_ids(mask)
        if mask == SENTINEL:
            for flag, why in (("multi_token", "T5's decoder reads one label-word token after the sentinel"),
                              ("lmbff_exact", "LM-BFF's rules are defined for BERT/RoBERTa tokenizers only")):
                if getattr(task, flag):
                    raise PromptError(f"task {task.name!r} sets {flag}, which T5 tokenizers ({name}) do not take "
                                      f"({why}); drop {flag} or use a masked LM")
        if tokenizer.pad_token_id is None:
            raise PromptError(
                f"tokenizer {name} has no pad token; set tokenizer.pad_token before encoding batches"
            )
        # The tokenizer's special-token frame around a single sequence ([CLS] .. [SEP], <s> .. </s>),
        # read off a one-token probe so any post-processor works.
        probe = tokenizer.encode(mask, add_special_tokens=True)
        at = probe.index(self.mask_id)
        self._prefix, self._suffix = probe[:at], probe[at + 1 :]
        # per class, its words: one id each, or (multi_token) a tuple of piece ids each
        self.label_word_ids = [
            [self._label_word_id(word) for word in _words(entry)] for entry in task.verbalizer.values()
        ]
        self.num_masks = max((len(w) for ids in self.label_word_ids for w in ids), default=1) \
            if task.multi_token else 1
        flat = [i for ids in self.label_word_ids for i in set(ids)]
        if len(flat) != len(set(flat)):
            raise PromptError(
                f"task {task.name!r}: two labels share a label word under tokenizer {name} "
                f"({task.verbalizer}); give each label its own words"
            )
        # Literal and mask pieces are tokenised once; sentence pieces stay Segments until encode().
        word_start = tokenizer.convert_tokens_to_ids(WORD_START)
        self._pieces: list[list[int] | Segment] = []
        for before, segment in zip((None, *task.segments), task.segments):
            if segment.kind == "text":
                ids = self._ids(segment.text)
                glued = before is not None and before.kind == "sent" and not segment.text[0].isspace()
                if glued and ids[:1] == [word_start] and word_start != tokenizer.unk_token_id:
                    ids = ids[1:]  # SentencePiece's lone "▁" (module docstring)
                if self.mask_id in ids:
                    raise PromptError(
                        f"task {task.name!r}: template {task.template!r} spells the mask token; "
                        "write {mask}"
                    )
                self._pieces.append(ids)
            else:
                self._pieces.append([self.mask_id] * self.num_masks if segment.kind == "mask" else segment)
        literal = sum(len(p) for p in self._pieces if isinstance(p, list))
        fixed = len(self._prefix) + literal + len(self._suffix)
        num_sentences = sum(isinstance(p, Segment) for p in self._pieces)
        shown = ""
        if demonstrations:
            if tokenizer.sep_token_id is None:
                raise PromptError(f"tokenizer {name} has no separator token, which closes each demonstration "
                                  "(LM-BFF's [SEP] / </s>); use demonstrations with a masked LM (BERT, RoBERTa, ...)")
            # a demonstration: the template's text, its label word for the mask, a separator
            classes = range(len(self.label_word_ids))
            fixed += sum(literal - self.num_masks + len(self._demo_word(c)) + 1 for c in classes)
            num_sentences *= 1 + len(classes)
            shown = f" and {len(classes)} demonstrations"
        if fixed + num_sentences > max_length:
            raise PromptError(
                f"task {task.name!r}: template {task.template!r}{shown} takes {fixed} tokens with {name} plus at "
                f"least one per sentence, more than max_length={max_length}; raise max_length"
            )
        self._budget = max_length - fixed

    def _ids(self, text: str, split_special: bool = False) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False, split_special_tokens=split_special)

    def _label_word_id(self, word: str) -> int | tuple[int, ...]:
        """The word's token id; with `multi_token`, the tuple of its piece ids."""
        ids = self._ids(" " + word.strip())
        name, where = type(self.tokenizer).__name__, f"label word {word!r} of task {self.task.name!r}"
        if len(ids) != 1 and not self.task.multi_token:
            raise PromptError(
                f"{where} is not a single token for tokenizer {name}: it tokenizes to "
                f"{self.tokenizer.convert_ids_to_tokens(ids)}; choose a word that is one token of this "
                "vocabulary (with a leading space for BPE vocabularies), or set multi_token: true on the "
                "task to score its pieces at one mask each (prompt fine-tuning only)"
            )
        if not ids or self.tokenizer.unk_token_id in ids:
            raise PromptError(
                f"{where} is unknown to tokenizer {name} (maps to {self.tokenizer.unk_token}); "
                "choose another word"
            )
        return tuple(ids) if self.task.multi_token else ids[0]

    def _sentence_ids(self, segment: Segment, texts: list[str]) -> list[int]:
        text = texts[segment.slot]
        modifiers = LMBFF_MODIFIERS if self.task.lmbff_exact else MODIFIERS
        for mod in segment.modifiers:
            text = modifiers[mod](text)
        # split_special: a literal "[MASK]"/"<mask>" in user text is text, never a second mask
        return self._ids((" " if segment.space else "") + text, split_special=True)

    def _texts(self, texts: list[str], where: str = "") -> list[str]:
        """`texts` (of the input, or `where`: a demonstration) checked against the template's
        inputs; stripped unless `lmbff_exact`."""
        task = self.task
        if len(texts) != task.num_inputs:
            raise DataError(
                f"task {task.name!r} takes {task.num_inputs} input sentence(s) "
                f"(template {task.template!r}) but got {len(texts)}{where}"
            )
        for i, text in enumerate(texts):
            # an empty sentence renders as the template alone: published test sets (LM-BFF's
            # cr) contain such rows and must keep their size
            if not isinstance(text, str):
                raise DataError(f"input sentence x{i}{where} for task {task.name!r} must be a string, got {text!r}")
        return list(texts) if task.lmbff_exact else [t.strip() for t in texts]

    def _demo_word(self, c: int) -> list[int]:
        """What fills the mask slot of class `c`'s demonstration: its first label word's ids."""
        word = self.label_word_ids[c][0]
        return list(word) if isinstance(word, tuple) else [word]

    def _parts(self, texts: list[str], word: list[int] | None = None) -> list[list[int]]:
        """The template's pieces as ids, the sentences from `texts`; `word` in the mask slot
        (a demonstration) when given."""
        # the mask piece is the one list starting with the mask id (literal text never spells it)
        return [self._sentence_ids(p, texts) if isinstance(p, Segment)
                else word if word is not None and p and p[0] == self.mask_id else p for p in self._pieces]

    def encode(self, text_a: str, text_b: str | None = None,
               demos: Sequence[tuple[Sequence[str], int]] = ()) -> dict:
        """``{"input_ids", "attention_mask", "mask_pos"}`` of one example (lists, no padding);
        with `demonstrations`, `demos` holds one (input sentences, class index) per class."""
        task = self.task
        texts = self._texts([text_a] if text_b is None else [text_a, text_b])
        wanted = len(self.label_word_ids) if self.demonstrations else 0
        if len(demos) != wanted:
            raise DataError(f"task {task.name!r}: this encoder takes {wanted} demonstrations, got {len(demos)}")
        parts = self._parts(texts)
        shown = [self._parts(self._texts(list(d), f" in demonstration {i}"), self._demo_word(c))
                 for i, (d, c) in enumerate(demos)]
        sep = [self.tokenizer.sep_token_id]

        def joined() -> list[int]:
            pieces = [parts, *([sep, *d] for d in shown)]
            return self._prefix + [t for ps in pieces for p in ps for t in p] + self._suffix

        input_ids = joined()
        if len(input_ids) > self.max_length:
            if task.lmbff_exact and input_ids[: self.max_length].count(self.mask_id) == self.num_masks:
                input_ids = input_ids[: self.max_length]  # LM-BFF cuts the tail, [SEP] included
            else:  # (where LM-BFF's cut would lose the mask, LM-BFF fails; exact mode cuts here)
                def sentences(ps: list[list[int]]) -> list[list[int]]:
                    return [part for part, piece in zip(ps, self._pieces) if isinstance(piece, Segment)]

                # demonstrations give way first, down to a token per sentence; then the input
                theirs = [s for d in shown for s in sentences(d)]
                _truncate(theirs, max(len(theirs), sum(map(len, theirs)) - (len(input_ids) - self.max_length)))
                _truncate(sentences(parts), self._budget - sum(map(len, theirs)))
                input_ids = joined()
        assert input_ids.count(self.mask_id) == self.num_masks and len(input_ids) <= self.max_length, "mask lost"
        mask_pos = input_ids.index(self.mask_id)
        if self.task.multi_token:  # the masks are consecutive: one position per piece
            mask_pos = list(range(mask_pos, mask_pos + self.num_masks))
        return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "mask_pos": mask_pos}

    def encode_batch(self, texts_a: list[str], texts_b: list[str] | None = None,
                     demos: list | None = None) -> dict[str, torch.Tensor]:
        """Encode and right-pad to the longest example: input_ids, attention_mask [B, T], mask_pos [B]
        (a `multi_token` task: [B, M], the M mask positions); `demos`: each example's (`encode`)."""
        if texts_b is not None and len(texts_b) != len(texts_a):
            raise DataError(f"got {len(texts_a)} first sentences but {len(texts_b)} second sentences")
        if not texts_a:
            raise DataError(f"task {self.task.name!r}: cannot encode an empty batch")
        encoded = [self.encode(a, b, d) for a, b, d in
                   zip(texts_a, texts_b or [None] * len(texts_a), demos or [()] * len(texts_a))]
        input_ids, attention_mask = pad_ids([e["input_ids"] for e in encoded], self.tokenizer.pad_token_id)
        mask_pos = torch.tensor([e["mask_pos"] for e in encoded], dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "mask_pos": mask_pos}

    def render(self, text_a: str, text_b: str | None = None) -> str:
        """The prompt as the model sees it, for humans (``rayapp tasks --show``)."""
        return self.tokenizer.decode(self.encode(text_a, text_b)["input_ids"])


def pad_ids(rows, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id sequences to the longest: (input_ids, attention_mask), both [B, T]."""
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, :len(r)] = torch.as_tensor(np.asarray(r, dtype=np.int64))
        attention_mask[i, :len(r)] = 1
    return input_ids, attention_mask


def class_logits(mask_logits: torch.Tensor, label_word_ids: list[list]) -> torch.Tensor:
    """MLM logits at the mask ``[..., V]`` -> class scores ``[..., C]``: the mean logit of each
    class's label words (PD eq. 1; one word per class is the usual case). Scores are float32.
    Words of several pieces (`multi_token`: each word a tuple of piece ids, logits at the M
    masks ``[..., M, V]``): `multi_token_scores`."""
    if label_word_ids and label_word_ids[0] and isinstance(label_word_ids[0][0], (tuple, list)):
        return multi_token_scores(mask_logits, label_word_ids)
    vocab = mask_logits.shape[-1]
    for c, ids in enumerate(label_word_ids):
        if not ids or min(ids) < 0 or max(ids) >= vocab:
            raise PromptError(
                f"verbalizer class {c} has label word ids {list(ids)}, which are not ids of a "
                f"vocabulary of {vocab} tokens; build the verbalizer with the model's tokenizer"
            )
    return torch.stack([mask_logits[..., list(ids)].float().mean(-1) for ids in label_word_ids], dim=-1)


def multi_token_scores(mask_logits: torch.Tensor, label_words: list[list[tuple[int, ...]]]) -> torch.Tensor:
    """PET's score of label words of several pieces (module docstring): logits at the M masks
    ``[..., M, V]`` -> class scores ``[..., C]``, each the mean over the class's words of the
    mean log-probability of word piece i at mask i (float32)."""
    logp = mask_logits.float().log_softmax(-1)
    classes = []
    for words in label_words:
        per_word = [torch.stack([logp[..., i, t] for i, t in enumerate(word)], -1).mean(-1) for word in words]
        classes.append(torch.stack(per_word, -1).mean(-1))
    return torch.stack(classes, -1)


def predicted(scores: torch.Tensor, task: Task) -> torch.Tensor:
    """Class scores ``[..., C]`` -> the predicted class index, or for a regression task the
    expected score (`regression_prediction`)."""
    return regression_prediction(scores.softmax(-1), task.bounds) if task.is_regression else scores.argmax(-1)


def regression_target(y: torch.Tensor, bounds: tuple[float, float]) -> torch.Tensor:
    """Gold distribution over (low word, high word) for ``y`` in ``[l, u]``: ``[B] -> [B, 2]``."""
    low, high = bounds
    outside = (y < low) | (y > high)
    if outside.any():
        raise DataError(f"regression labels {y[outside].tolist()[:5]} lie outside bounds {tuple(bounds)}")
    frac = (y - low) / (high - low)
    return torch.stack([1 - frac, frac], dim=-1)


def regression_prediction(probs: torch.Tensor, bounds: tuple[float, float]) -> torch.Tensor:
    """Expected value under the (low, high) probabilities: ``[B, 2] -> [B]``."""
    low, high = bounds
    return low * probs[..., 0] + high * probs[..., 1]
