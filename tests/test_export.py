"""`rayapp export`: a run's selected model for plain transformers, its ONNX classifier and a
model card; what the folder predicts is what the run's test evaluation predicted."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from rayapp import cli
from rayapp.data.fewshot import load_lmbff


def _export(tmp_path, *args: str) -> tuple[int, str]:
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = cli.main(["export", *args])
    return code, err.getvalue()


@pytest.mark.parametrize("method", ["prompt", "classifier", "multi-token"])
def test_the_exported_folder_predicts_what_the_run_was_tested_on(fewshot_runs, method, tmp_path):
    """Export -> load with plain transformers -> the run's test predictions: the test
    accuracy the run recorded, example by example the predictions of the run's own
    evaluation code on its selected checkpoint, and ONNX Runtime within 1e-4 of PyTorch."""
    import onnxruntime
    from transformers import AutoConfig, AutoModelForMaskedLM, AutoModelForSequenceClassification

    from rayapp.modeling.models import LogitsAt, load_classifier, load_mlm, load_tokenizer
    from rayapp.recipes.finetune import find_task, make_batch, predict
    from rayapp.ship.export import classify, load
    from rayapp.tasks.prompts import PromptEncoder

    record = fewshot_runs[method]
    code, err = _export(tmp_path, record["record"], "--out", str(tmp_path / "model"))
    assert code == 0, err
    folder = str(tmp_path / "model")

    # plain transformers loads it, labels and prompt in its config
    config = AutoConfig.from_pretrained(folder)
    assert config.id2label == {0: "0", 1: "1"} and config.rayapp_prompt["task"]["template"] == "{x0} It was {mask}."
    plain = (AutoModelForSequenceClassification if method == "classifier" else AutoModelForMaskedLM).from_pretrained(
        folder)
    assert plain is not None

    task = find_task("SST-2", record["config"]["tasks_file"], False)
    assert task.multi_token == (method == "multi-token")
    test = load_lmbff(None, task, k=16, seed=13).test
    got = classify(folder, [e.text_a for e in test])
    accuracy = np.mean([g["label"] == e.label for g, e in zip(got, test)])
    assert accuracy == pytest.approx(record["test"], abs=1e-12)

    # the run's own evaluation path on its selected checkpoint, example by example
    tokenizer = load_tokenizer(record["checkpoint"])
    if method != "classifier":
        model, encoder = LogitsAt(load_mlm(record["checkpoint"])).eval(), PromptEncoder(tokenizer, task, 48)
    else:
        model, encoder = load_classifier(record["checkpoint"], 2).eval(), None
    want = []
    for i in range(0, len(test), 64):
        want += predict(model, make_batch(test[i:i + 64], task, tokenizer, encoder, 48), task, encoder).tolist()
    assert [task.labels[w] for w in want] == [g["label"] for g in got]

    # ONNX: the same probabilities from ONNX Runtime, on real test inputs of several lengths
    exported, tok, _, enc, _ = load(folder)
    session = onnxruntime.InferenceSession(f"{folder}/model.onnx", providers=["CPUExecutionProvider"])
    for lo in (0, 300, 700):
        texts = [e.text_a for e in test[lo:lo + 24]]
        if enc is not None:
            b = enc.encode_batch(texts)
            inputs = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"], "mask_pos": b["mask_pos"]}
        else:
            inputs = dict(tok(texts, truncation=True, max_length=48, padding=True, return_tensors="pt"))
        with torch.no_grad():
            reference = exported(**inputs).numpy()
        onnx_probs = session.run(["probs"], {k: v.numpy() for k, v in inputs.items()})[0]
        assert onnx_probs.shape == (len(texts), 2)
        assert np.abs(onnx_probs - reference).max() <= 1e-4

    card = (tmp_path / "model" / "README.md").read_text()
    assert f"| 13 | {record['best_step']} | {100 * record['best_dev']:.1f} | {100 * record['test']:.1f} |" in card
    assert "rayapp export" in card and "16-13/test" in card


def test_export_refuses_what_it_cannot_export(fewshot_runs, tmp_path):
    """One error line each: no run there, no --out, a folder already holding files, a record
    that is not a few-shot run."""
    record = fewshot_runs["prompt"]
    cases = [
        ([str(tmp_path / "nowhere"), "--out", str(tmp_path / "a")], "is not a run: there is no record"),
        ([record["record"]], "needs --out DIR"),
    ]
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.txt").write_text("x")
    cases.append(([record["record"], "--out", str(tmp_path / "full")], "is not empty"))
    distill = tmp_path / "records" / "d.json"
    distill.parent.mkdir()
    distill.write_text(json.dumps({"recipe": "distill", "model": "x"}))
    cases.append(([str(distill), "--out", str(tmp_path / "b")], "is a 'distill' run"))
    for args, message in cases:
        code, err = _export(tmp_path, *args)
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert code == 2 and lines and message in lines[0], err
        assert "Traceback" not in err


def test_a_sentence_pair_classifier_reads_the_token_types_it_was_trained_with(ray_cluster, tiny_bert, tmp_path):
    """BERT's tokenizer marks the second sentence with token type 1, and standard fine-tuning
    fed those types: the exported classifier (PyTorch and ONNX) gives the probabilities of the
    run's own evaluation path on RTE, not those of an all-0 type sequence."""
    import onnxruntime

    from rayapp.modeling.models import load_classifier, load_tokenizer
    from rayapp.recipes.finetune import FinetuneConfig, find_task, make_batch, run
    from rayapp.ship.export import Classifier
    from rayapp.train.engine import EngineConfig

    record = run(FinetuneConfig(task="RTE", model=tiny_bert, method="classifier", max_steps=2, eval_every=2,
                                batch_size=8, lr=2e-3, max_length=64, output_dir=str(tmp_path / "runs"),
                                engine=EngineConfig(num_workers=1)))
    code, err = _export(tmp_path, record["record"], "--out", str(tmp_path / "model"))
    assert code == 0, err
    task = find_task("RTE", None, False)
    test = load_lmbff(None, task, k=16, seed=13).test[:32]
    classifier = Classifier(str(tmp_path / "model"))
    rows = classifier.encode([e.text_a for e in test], [e.text_b for e in test])
    got = classifier.probs(rows)
    model = load_classifier(record["checkpoint"], 2).eval()
    batch = make_batch(test, task, load_tokenizer(record["checkpoint"]), None, 64)
    assert bool((batch["token_type_ids"] == 1).any())
    with torch.no_grad():
        want = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.softmax(-1)
        untyped = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.softmax(-1)
    assert torch.allclose(got, want, atol=1e-5) and not torch.allclose(got, untyped, atol=1e-5)
    inputs = classifier.batch(rows[:8])
    session = onnxruntime.InferenceSession(str(tmp_path / "model" / "model.onnx"), providers=["CPUExecutionProvider"])
    onnx_probs = session.run(["probs"], {k: v.numpy() for k, v in inputs.items()})[0]
    assert np.abs(onnx_probs - got[:8].numpy()).max() <= 1e-4
