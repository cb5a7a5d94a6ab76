"""`rayapp export RUN --out DIR`: a few-shot run's model as a folder users load with plain
`transformers`, an ONNX graph of its classifier and a model card (issue 29).

RUN is a run's record (`OUTPUT_DIR/records/NAME.json`, what `rayapp finetune` prints and a
sweep writes per trial) or the run's folder (`OUTPUT_DIR/NAME`). DIR (local or `s3://`) gets:
- the run's selected model (its best-dev checkpoint, LM-BFF's selection): `config.json`,
  weights and tokenizer, loaded by `AutoModelForMaskedLM` (prompt methods; T5:
  `AutoModelForSeq2SeqLM`, `models.load_mlm`) or `AutoModelForSequenceClassification`
  (`method=classifier`). `config.json` also holds
  `id2label` / `label2id` and, under `rayapp_prompt`, what turns the masked LM into the
  classifier it was selected as: the task, its template and verbalizer, the label-word ids
  under this tokenizer, `max_length` and `lmbff_exact`; a prompt-tuning run adds its soft
  prompt, `soft_prompt.safetensors` (`models.LogitsAt` inserts it after the first token);
- `model.onnx`: that classifier as one graph, (input_ids, attention_mask, mask_pos) -> class
  probabilities (the softmax of the label words' logits at the mask, PD eq. 1 / LM-BFF; a
  classifier run: (input_ids, attention_mask, and token_type_ids where the tokenizer makes them,
  as BERT's does) -> probabilities). It is checked against the
  PyTorch model on the run's own test examples before anything is written (`ONNX_TOLERANCE`);
- `README.md`, the model card: the few-shot results from the run's records (this run and,
  for a sweep trial, every split of its method and task), the teacher (when the model is a
  `rayapp distill` student, from the distillation's record beside it), the data and the
  commands.

`classify(DIR, texts_a, texts_b)` classifies with an exported folder: plain `transformers`
loads the model and tokenizer; the prompt is built by rayapp's `PromptEncoder` from the stored
template (the same tokenisation, truncation and mask placement the run was evaluated with).
"""
from __future__ import annotations

import json
import os
import statistics
import tempfile
import warnings
from dataclasses import dataclass

import torch

from rayapp import storage
from rayapp.config import InputPath, OutputPath
from rayapp.errors import ConfigError, DataError
from rayapp.train.records import record_uri

PROMPT_KEY = "rayapp_prompt"  # config.json entry holding the prompt
ONNX_TOLERANCE = 1e-4  # max abs difference of class probabilities, ONNX Runtime vs PyTorch
EXPORTABLE = ("finetune",)  # recipes whose records describe one few-shot classifier


@dataclass
class ExportConfig:
    run: InputPath      # a run's record (OUTPUT_DIR/records/NAME.json) or folder (OUTPUT_DIR/NAME)
    out: OutputPath     # the model folder to write (local or s3://)
    onnx: bool = True   # also write model.onnx (checked against PyTorch)
    check_examples: int = 64  # test examples the ONNX check compares on


def _record_of(run_folder: str) -> str:
    """The record of the run whose folder is `OUTPUT_DIR/NAME`."""
    return record_uri(os.path.dirname(run_folder) or ".", os.path.basename(run_folder))


def read_record(run: str) -> tuple[dict, str]:
    """The run's record and its URI, from a record file or a run folder."""
    run = run.rstrip("/")
    uri = run if run.endswith(".json") else _record_of(run)
    if not storage.exists(uri):
        raise DataError(f"run={run} is not a run: there is no record at {uri}; pass a run's record "
                        "(OUTPUT_DIR/records/NAME.json, printed by `rayapp finetune` and written per sweep "
                        "trial) or its folder (OUTPUT_DIR/NAME)")
    try:
        record = json.loads(storage.read_text(uri))
    except json.JSONDecodeError as exc:
        raise DataError(f"run={run}: the record {uri} is not JSON ({exc}); rerun the run or pass another") from None
    if record.get("recipe") not in EXPORTABLE:
        raise DataError(f"run={run} is a {record.get('recipe')!r} run; `rayapp export` takes a few-shot run "
                        f"({', '.join(EXPORTABLE)}: a prompt or classifier run, or a sweep trial of one). A "
                        "distillation's student is already a model folder (its record's `model`)")
    if record.get("status", "done") != "done" or not record.get("checkpoint"):
        raise DataError(f"run={run} has no selected model yet (status {record.get('status')!r}); export a "
                        "finished run")
    return record, uri


def _task(record: dict):
    from rayapp.recipes.finetune import find_task

    cfg = record["config"]
    return find_task(cfg["task"], cfg.get("tasks_file"), cfg.get("lmbff_exact", False))


class PromptClassifier(torch.nn.Module):
    """The masked LM as the classifier it was selected as: class probabilities from the
    label words' logits at the mask (`class_logits`), one graph for ONNX."""

    def __init__(self, mlm: torch.nn.Module, label_word_ids: list[list[int]], soft_prompt: torch.Tensor | None = None):
        super().__init__()
        from rayapp.modeling.models import LogitsAt

        self.at, self.label_word_ids = LogitsAt(mlm, soft_prompt), label_word_ids

    def forward(self, input_ids, attention_mask, mask_pos):
        from rayapp.tasks.prompts import class_logits

        return class_logits(self.at(input_ids, attention_mask, mask_pos)[0], self.label_word_ids).softmax(-1)


class HeadClassifier(torch.nn.Module):
    """A sequence classifier's probabilities (standard fine-tuning runs)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        types = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **types).logits.softmax(-1)


def _not_exported(folder: str) -> DataError:
    return DataError(f"{folder} has no `{PROMPT_KEY}` in its config.json: it is not a folder `rayapp export` "
                     "wrote; export the run first (`rayapp export RUN --out DIR`)")


def read_prompt(folder: str) -> dict:
    """The stored prompt of an exported folder (local or s3://), read from its config.json
    alone (the weights stay where they are)."""
    uri = storage.join(folder, "config.json")
    if not storage.exists(uri):
        raise DataError(f"model={folder} has no config.json: give a folder `rayapp export` wrote "
                        "(`rayapp export RUN --out DIR`)")
    prompt = json.loads(storage.read_text(uri)).get(PROMPT_KEY)
    if prompt is None:
        raise _not_exported(folder)
    return prompt


def load(folder: str):
    """(classifier module, tokenizer, task, PromptEncoder or None, the stored prompt) of an
    exported folder, loaded with plain `transformers` classes."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    from rayapp.modeling.models import load_mlm, load_soft_prompt
    from rayapp.tasks.prompts import PromptEncoder, Task

    config = AutoConfig.from_pretrained(folder)
    prompt = getattr(config, PROMPT_KEY, None)
    if prompt is None:
        raise _not_exported(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    task = Task(**prompt["task"])
    if prompt["method"] == "classifier":
        model = HeadClassifier(AutoModelForSequenceClassification.from_pretrained(folder)).eval()
        return model, tokenizer, task, None, prompt
    encoder = PromptEncoder(tokenizer, task, prompt["max_length"])
    # a prompt-tuned run's soft prompt lies beside the weights (`models.SOFT_PROMPT_FILE`)
    model = PromptClassifier(load_mlm(folder), encoder.label_word_ids, load_soft_prompt(folder)).eval()
    return model, tokenizer, task, encoder, prompt


class Classifier:
    """An exported folder loaded for inference with plain `transformers` classes: rows are
    encoded with the stored prompt (the same tokenisation, truncation and mask placement the
    run was evaluated with) and classified in batches of similar length. On a GPU the model
    runs under bf16 autocast (fp16 where bf16 is unsupported); probabilities are float32."""

    def __init__(self, folder: str, device: torch.device | str = "cpu"):
        self.model, self.tokenizer, self.task, self.encoder, self.prompt = load(folder)
        self.device = torch.device(device)
        self.model.to(self.device)
        self.half = None
        if self.device.type == "cuda":
            self.half = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16

    def encode(self, texts_a: list, texts_b: list | None = None) -> list[dict]:
        """Per row its `input_ids` and `mask_pos` (prompt models) or the tokenizer's own encoding
        (classifiers: BERT's sentence-pair `token_type_ids` too, as fine-tuning fed them); a
        missing text is empty."""
        def text(value) -> str:
            return "" if value is None else str(value)

        pairs = [(text(a), text(b) if self.task.num_inputs == 2 else None)
                 for a, b in zip(texts_a, texts_b if texts_b is not None else [None] * len(texts_a))]
        if self.encoder is not None:
            return [self.encoder.encode(a, b) for a, b in pairs]
        keep = ("input_ids", "token_type_ids")
        return [{k: v for k, v in self.tokenizer(a, b, truncation=True, max_length=self.prompt["max_length"]).items()
                 if k in keep} for a, b in pairs]

    def batch(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        """Encoded rows as the model's padded inputs (the ONNX graph's too)."""
        from rayapp.tasks.prompts import pad_ids

        input_ids, attention_mask = pad_ids([r["input_ids"] for r in rows], self.tokenizer.pad_token_id)
        if self.encoder is None:
            types = {"token_type_ids": pad_ids([r["token_type_ids"] for r in rows], 0)[0]} if "token_type_ids" in rows[0] else {}
            return {"input_ids": input_ids, "attention_mask": attention_mask, **types}
        return {"input_ids": input_ids, "attention_mask": attention_mask,
                "mask_pos": torch.tensor([r["mask_pos"] for r in rows], dtype=torch.long)}

    @torch.inference_mode()
    def probs(self, rows: list[dict], tokens_per_batch: int = 4096) -> torch.Tensor:
        """Class probabilities `[N, C]` of encoded rows, in row order, each forward pass at
        most `tokens_per_batch` padded tokens (`rayapp.modeling.scorer.token_batches`)."""
        import contextlib

        from rayapp.modeling.scorer import token_batches

        autocast = (torch.autocast(self.device.type, dtype=self.half) if self.half is not None
                    else contextlib.nullcontext())
        parts, order = [], []
        for index in token_batches([len(r["input_ids"]) for r in rows], tokens_per_batch):
            inputs = {k: v.to(self.device) for k, v in self.batch([rows[i] for i in index]).items()}
            with autocast:
                parts.append(self.model(**inputs).float().cpu())
            order.append(torch.as_tensor(index))
        if not parts:
            return torch.empty(0, len(self.task.labels))
        return torch.cat(parts)[torch.argsort(torch.cat(order))]

    def results(self, probs: torch.Tensor) -> list[dict]:
        """Per row `{"label", "probs": {label: p}}`; a regression task: `{"score"}`, the
        expected value over its two label words."""
        from rayapp.tasks.prompts import regression_prediction

        if self.task.is_regression:
            return [{"score": float(s)} for s in regression_prediction(probs, self.task.bounds)]
        return [{"label": self.task.labels[int(p.argmax())], "probs": dict(zip(self.task.labels, p.tolist()))}
                for p in probs]


def classify(folder: str, texts_a: list[str], texts_b: list[str] | None = None,
             tokens_per_batch: int = 4096) -> list[dict]:
    """Classify with an exported folder: per input `{"label", "probs": {label: p}}` (a
    regression task: `{"score"}`). For a table or corpus, `rayapp predict` runs the same
    classifier on Ray Data."""
    classifier = Classifier(folder)
    return classifier.results(classifier.probs(classifier.encode(texts_a, texts_b), tokens_per_batch))


def _write_config(folder: str, record: dict, task, encoder) -> dict:
    import dataclasses

    cfg = record["config"]
    # the whole task (a user's tasks file need not travel with the folder)
    prompt = {"task": {f.name: getattr(task, f.name) for f in dataclasses.fields(task)},
              "labels": list(task.labels), "method": cfg["method"], "max_length": cfg["max_length"],
              "label_word_ids": encoder.label_word_ids if encoder is not None else None}
    path = os.path.join(folder, "config.json")
    config = json.loads(open(path).read())
    config[PROMPT_KEY] = prompt
    if not task.is_regression:
        config["id2label"] = {str(i): label for i, label in enumerate(task.labels)}
        config["label2id"] = {label: i for i, label in enumerate(task.labels)}
    with open(path, "w") as f:
        json.dump(config, f, indent=2)
    return prompt


def _export_onnx(model: torch.nn.Module, example: dict, path: str) -> None:
    names = list(example)
    dims = {"input_ids": {0: "batch", 1: "tokens"}, "attention_mask": {0: "batch", 1: "tokens"},
            "token_type_ids": {0: "batch", 1: "tokens"}, "mask_pos": {0: "batch"}}
    torch.onnx.export(model, tuple(example.values()), path, input_names=names, output_names=["probs"],
                      dynamic_axes={**{n: dims[n] for n in names}, "probs": {0: "batch"}}, dynamo=False,
                      opset_version=17)


def onnx_difference(path: str, model: torch.nn.Module, batches: list[dict]) -> float:
    """Max abs difference of class probabilities, ONNX Runtime vs PyTorch, over `batches`."""
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    worst = 0.0
    with torch.no_grad():
        for batch in batches:
            want = model(**batch).numpy()
            got = session.run(["probs"], {k: v.numpy() for k, v in batch.items()})[0]
            worst = max(worst, float(abs(got - want).max()))
    return worst


def _results(record: dict, record_uri: str) -> list[dict]:
    """This run's record and, for a sweep trial, the records of every split of its method and task."""
    sweep = record.get("sweep")
    if not sweep:
        return [record]
    rows = []
    for uri in storage.list_files(os.path.dirname(record_uri), ".json"):
        try:
            r = json.loads(storage.read_text(uri))
        except (OSError, json.JSONDecodeError):
            continue
        s = r.get("sweep") or {}
        if (s.get("method"), s.get("task"), s.get("point")) == (sweep["method"], sweep["task"], sweep.get("point")) \
                and r.get("status", "done") == "done" and r.get("test") is not None:
            rows.append(r)
    return sorted(rows, key=lambda r: r["seed"]) or [record]


def distillation_of(model: str) -> dict | None:
    """The distillation record of a student folder `OUTPUT_DIR/NAME/student` (where `rayapp
    distill` writes it; its record is `OUTPUT_DIR/records/NAME.json`), or None."""
    uri = _record_of(os.path.dirname(model.rstrip("/")))
    try:
        record = json.loads(storage.read_text(uri)) if storage.exists(uri) else None
    except (OSError, json.JSONDecodeError):
        return None
    return record if record and record.get("recipe") == "distill" else None


def model_card(record: dict, results: list[dict], prompt: dict, onnx_diff: float | None, seq2seq: bool) -> str:
    cfg = record["config"]
    distilled = distillation_of(cfg.get("init") or cfg["model"])
    teacher = (f"`{cfg.get('init') or cfg['model']}` is a student distilled by `rayapp distill` "
               f"({distilled['objective']}, {distilled['step']} steps on `{distilled['config']['data']}`) from the "
               f"teacher `{distilled['config']['teacher']}`." if distilled else
               f"`{cfg.get('init') or cfg['model']}` was not distilled by rayapp (no distillation record "
               "beside it).")
    split = record.get("split") or {}
    tests = [r["test"] for r in results]
    mean = f"{100 * statistics.mean(tests):.1f}" + (f" ({100 * statistics.stdev(tests):.1f})" if len(tests) > 1 else "")
    rows = "\n".join(f"| {r['seed']} | {r['best_step']} | {100 * r['best_dev']:.1f} | {100 * r['test']:.1f} |"
                     for r in results)
    method = (record.get("sweep") or {}).get("method") or cfg["method"]
    words = ", ".join(f"{label} -> {word!r}" for label, word in prompt["task"]["verbalizer"].items())
    onnx = (f"`model.onnx`: the classifier as one graph, (input_ids, attention_mask"
            f"{', mask_pos' if prompt['label_word_ids'] else ' (and token_type_ids where the tokenizer makes them)'}"
            f") -> class probabilities; on {cfg['task']} "
            f"test examples its probabilities differ from PyTorch's by at most {onnx_diff:.1e}.") \
        if onnx_diff is not None else "No ONNX graph was exported (`onnx=false`)."
    init = f"initialised from `{cfg['init']}`, " if cfg.get("init") else ""
    score, auto, tag = (
        ("logit of the label word as T5's second decoder token, after `<extra_id_0>` in the mask slot",
         "AutoModelForSeq2SeqLM", "text2text-generation") if seq2seq else
        ("masked LM's logit of the label word at the mask", "AutoModelForMaskedLM", "fill-mask"))
    return f"""---
library_name: transformers
pipeline_tag: {tag if prompt['label_word_ids'] else 'text-classification'}
tags: [rayapp, few-shot, prompt-based-fine-tuning, {prompt['task']['name'].lower()}]
---
# {record['name']}

A {prompt['task']['name']} classifier from `rayapp` ({method}: `{cfg['method']}` fine-tuning of
`{cfg['model']}`, {init}{cfg['k']} examples per class), exported by `rayapp export`.

## Few-shot results

{prompt['task']['metric']} on the test set, in %, of the model selected by few-shot dev {prompt['task']['metric']}
(LM-BFF's protocol), per split seed; mean (std) over the splits: **{mean}**.

| split seed | best step | dev | test |
|---|---|---|---|
{rows}

This folder holds the model of split seed {record['seed']}.

## How it classifies

Template `{prompt['task']['template']}`, label words {words}: the class score is the
{score}. `config.json` stores these under
`{PROMPT_KEY}`. With rayapp installed:

```python
from rayapp.ship.export import classify
classify("THIS_FOLDER", ["a gripping, funny film."])  # [{{"label": ..., "probs": {{...}}}}]
```

The weights load with plain `transformers` (`{auto}.from_pretrained`).
{onnx}

## Teacher

{teacher}

## Data

Train and dev: `{split.get('train', '?')}`, `{split.get('dev', '?')}`; test:
`{split.get('test', '?')}` ({split.get('test_source', '')}).

## How it was made

```
rayapp finetune task={cfg['task']} method={cfg['method']} model={cfg['model']} k={cfg['k']} seed={cfg['seed']} \\
  lr={cfg['lr']} batch_size={cfg['batch_size']} max_steps={cfg['max_steps']} eval_every={cfg['eval_every']} \\
  max_length={cfg['max_length']}
rayapp export {record.get('record', record['name'])} --out THIS_FOLDER
```
"""


def run(cfg: ExportConfig) -> dict:
    """Write the export (module docstring); returns what was written."""
    from rayapp.data.fewshot import load_lmbff
    from rayapp.modeling.models import is_seq2seq, load_model_config, local_model_dir
    from rayapp.tasks.prompts import PromptEncoder

    record, record_uri = read_record(cfg.run)
    if storage.exists(cfg.out) and storage.list_files(cfg.out):
        raise ConfigError(f"out={cfg.out} is not empty; export into a new folder")
    task = _task(record)
    run_cfg = record["config"]
    if run_cfg.get("demonstrations"):
        raise ConfigError(f"run={cfg.run} was selected with LM-BFF's demonstrations from its train set in every "
                          "prompt, which an exported classifier does not carry; export a run without them")
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "model")
        storage.copy_dir(local_model_dir(record["checkpoint"]), folder)
        for leftover in ("optimizer.pt", "trainer_state.json"):
            if os.path.exists(os.path.join(folder, leftover)):
                os.remove(os.path.join(folder, leftover))
        from transformers import AutoTokenizer

        encoder = None if run_cfg["method"] == "classifier" else PromptEncoder(
            AutoTokenizer.from_pretrained(folder), task, run_cfg["max_length"])
        prompt = _write_config(folder, record, task, encoder)
        diff = None
        if cfg.onnx:
            classifier = Classifier(folder)
            model = classifier.model
            split = load_lmbff(run_cfg.get("data_dir"), task, k=run_cfg["k"], seed=run_cfg["seed"])
            examples = (split.test or split.dev)[:cfg.check_examples]
            rows = classifier.encode([e.text_a for e in examples], [e.text_b for e in examples])
            batches = [classifier.batch(rows[i:i + 16]) for i in range(0, len(rows), 16)]
            path = os.path.join(folder, "model.onnx")
            with warnings.catch_warnings():  # the tracer's notes on constant shapes: checked below instead
                warnings.simplefilter("ignore")
                _export_onnx(model, batches[0], path)
            diff = onnx_difference(path, model, batches)
            if diff > ONNX_TOLERANCE:
                raise DataError(f"the ONNX graph of run={cfg.run} differs from PyTorch by {diff:.2e} (> "
                                f"{ONNX_TOLERANCE}) on {len(examples)} test examples; nothing was written. "
                                "Export with onnx=false and file an issue with the model's architecture")
        with open(os.path.join(folder, "README.md"), "w") as f:
            f.write(model_card(record, _results(record, record_uri), prompt, diff,
                               is_seq2seq(load_model_config(folder))))
        storage.copy_dir(folder, cfg.out)
    return {"out": cfg.out, "onnx_max_abs_diff": diff, "files": sorted(os.path.basename(f)
                                                                     for f in storage.list_files(cfg.out))}
