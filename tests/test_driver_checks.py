"""User mistakes are caught on the driver: one line `error: ...`, exit status 2, and no Ray
started (today's alternative: a Ray worker fails and 60 lines of tracebacks precede the one
useful line). All cases run in one fresh process, where nothing else has started Ray, so
"not initialised" there means no cluster, no worker, no actor was started for the command."""
import json
import subprocess
import sys

import pytest

RUNNER = """
import contextlib, io, json, sys
import ray
from rayapp.cli import main
results = {}
for name, argv in json.load(sys.stdin).items():
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:  # argparse
            code = e.code
    results[name] = {"code": code, "stderr": err.getvalue(), "ray": ray.is_initialized()}
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def bad(tiny_bert, bpe_tokenizer, tmp_path_factory):
    """Paths a user might get wrong: an empty folder, a file, a model without its tokenizer,
    BERT weights beside an 8k BPE tokenizer (another model's), a causal LM (no masked-LM
    head), a data folder that no rayapp stage finished, a task whose label word is two tokens."""
    import shutil

    from transformers import GPT2Config, GPT2LMHeadModel

    root = tmp_path_factory.mktemp("bad-inputs")
    (root / "empty").mkdir()
    (root / "file.bin").write_bytes(b"not a model")
    no_tok = root / "no-tokenizer"
    no_tok.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(f"{tiny_bert}/{f}", no_tok / f)
    shutil.copytree(no_tok, root / "other-vocab")
    bpe_tokenizer.save_pretrained(root / "other-vocab")
    (root / "tasks.yaml").write_text(
        "- {name: SST-2, template: '{x0} It was {mask} .', verbalizer: {'0': terrible, '1': supercalifragilistic}}\n")
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=1, n_embd=8, vocab_size=16, n_positions=16)).save_pretrained(root / "gpt2")
    (root / "unfinished").mkdir()
    (root / "unfinished" / "part-00000.parquet").write_bytes(b"PAR1")
    return root


def _cases(tiny, bad, out):
    ft = ["finetune", f"output_dir={out}", "max_steps=1"]
    dist = ["distill", f"output_dir={out}", "max_steps=1", f"teacher={tiny}"]
    cache = ["teacher-cache", "--out", f"{out}/cache"]
    return {  # name: (argv, what the one line must say)
        "model is an empty folder": ([*ft, f"model={bad}/empty"], r"is not an HF model directory: no config.json and no weights"),
        "model is a file": ([*ft, f"model={bad}/file.bin"], r"is a file; give the model's directory"),
        "tokenizer will not load": ([*ft, f"model={bad}/no-tokenizer"], r"its tokenizer has no vocabulary"),
        "model has no MLM head": ([*ft, f"model={bad}/gpt2"], r"\(gpt2\) has no masked-LM head class"),
        "hub id offline, no mirror": ([*ft, "model=no-org/no-such-model"],
                                      r"cannot find .no-org/no-such-model.: no local path .*; no mirror .*; not from the hub \(HF_HUB_OFFLINE=1\)"),
        "tokenizer of another model": ([*ft, f"model={bad}/other-vocab"],
                                       r"its tokenizer has 8000 tokens but the model embeds 30522"),
        "label word of several tokens": ([*ft, f"model={tiny}", f"tasks_file={bad}/tasks.yaml"],
                                         r"label word 'supercalifragilistic' of task 'SST-2' is not a single token"),
        "template longer than max_length": ([*ft, f"model={tiny}", "max_length=4"], r"more than max_length=4"),
        "zero-shot, template longer than max_length": (["evaluate", f"output_dir={out}", f"model={tiny}",
                                                        "max_length=4"], r"more than max_length=4"),
        "fewshot make without --train": (["fewshot", "make", "--task", "SST-2"],
                                         r"needs --train TABLE, --test TABLE, --out DIR"),
        "fewshot make, unknown column field": (["fewshot", "make", "--task", "SST-2", "--train", "a.tsv", "--test",
                                                "b.tsv", "--out", str(out), "--columns", "sentence=text"],
                                               r"--columns takes field=column pairs with field one of label, text_a"),
        "unknown task": ([*ft, f"model={tiny}", "task=NOPE"], r"NOPE"),
        "split does not exist": ([*ft, f"model={tiny}", "task=RTE", "seed=99"], r"seed|99"),
        "KD teacher without tokenizer": ([*ft, f"model={tiny}", f"teacher={bad}/no-tokenizer"], r"tokenizer has no vocabulary"),
        "distill student not a model": ([*dist, f"student={bad}/empty", f"data={bad}/unfinished"], r"not an HF model directory"),
        "distill data without _meta.json": ([*dist, f"student={tiny}", f"data={bad}/unfinished"], r"has no _meta.json"),
        "distill unknown intermediate task": ([*dist, f"student={tiny}", f"data={bad}/unfinished", "task=RTE"],
                                              r"task='RTE' is not an intermediate task"),
        "teacher cache: teacher not a model": ([*cache, "--teacher", f"{bad}/empty", "--examples", f"{bad}/unfinished"],
                                               r"not an HF model directory"),
        "teacher cache: examples without _meta.json": ([*cache, "--teacher", tiny, "--examples", f"{bad}/unfinished"],
                                                       r"has no _meta.json"),
    }


@pytest.fixture(scope="module")
def results(tiny_bert, bad, tmp_path_factory):
    cases = _cases(tiny_bert, bad, tmp_path_factory.mktemp("out"))
    done = subprocess.run([sys.executable, "-c", RUNNER], input=json.dumps({k: v[0] for k, v in cases.items()}),
                          capture_output=True, text=True, check=True)
    return {name: (json.loads(done.stdout.splitlines()[-1])[name], cases[name][1]) for name in cases}


def assert_one_line_error(got: dict, pattern: str) -> None:
    """A RUNNER result: exit 2, stderr one `error:` line matching `pattern`, Ray not started."""
    import re

    assert got["code"] == 2, got
    lines = got["stderr"].strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), got["stderr"]
    assert re.search(pattern, lines[0]), (pattern, lines[0])
    assert not got["ray"], "Ray was started for a mistake the driver can see"


@pytest.mark.parametrize("case", list(_cases("TINY", "BAD", "OUT")))
def test_bad_input_is_one_line_before_ray_starts(results, case):
    assert_one_line_error(*results[case])
