"""`rayapp`: one command line over every pipeline stage.

    rayapp tasks [--show TASK --tokenizer DIR]     built-in and YAML tasks
    rayapp fewshot show|make ...                   LM-BFF few-shot splits
    rayapp backtranslate --out DIR ...             few-shot splits augmented by back-translation (distil bt10)
    rayapp lmbff-search --config FILE ...          LM-BFF's automatic label words and templates, as tasks YAML
    rayapp finetune --config FILE key=value ...    prompt FT / classifier FT
    rayapp evaluate --config FILE key=value ...    zero-shot prompt evaluation
    rayapp intermediate pairs|sentiment ...        SMASH intermediate examples (Ray Data)
    rayapp teacher-cache ...                       teacher top-k cache (Ray Data batch inference)
    rayapp distill --config FILE key=value ...     SMASH distillation (Ray Train, DeepSpeed/DDP)
    rayapp ppt --config FILE key=value ...         PPT soft-prompt pre-training (Vanilla PPT baseline)
    rayapp pretrain --config FILE key=value ...    further MLM pre-training (makes a teacher)
    rayapp init-student --teacher DIR --out DIR    a student cut from every other teacher layer
    rayapp sweep --config FILE key=value ...       methods x tasks x splits x grid on Ray Tune (--resume DIR)
    rayapp report DIR... [--out DIR]               tables (Markdown/CSV), plots and report.html from run records
    rayapp export RUN --out DIR                    a run's model for plain transformers + ONNX + model card
    rayapp predict MODEL --input TABLE --out DIR   an exported model labels a table (Ray Data, resumable)
    rayapp assets pull ID --to ROOT                copy a hub model/dataset into a mirror (RAYAPP_ASSETS)
    rayapp assets push --to ROOT                   copy the local few-shot splits and pools there
    rayapp demo                                    the pipeline end to end on local assets

User mistakes print one line `error: ...` and exit 2; they are never tracebacks.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from rayapp.errors import find_user_error


def _print(record: dict, keys: tuple[str, ...]) -> None:
    print(json.dumps({k: record[k] for k in keys if k in record}, indent=1))


# --- subcommands ------------------------------------------------------------------------

def cmd_tasks(args) -> None:
    from rayapp.tasks.prompts import PromptEncoder
    from rayapp.tasks.registry import BUILTIN_TASKS, get_task, load_tasks

    tasks = dict(BUILTIN_TASKS)
    if args.tasks_file:
        tasks.update(load_tasks(args.tasks_file))
    if args.show:
        from rayapp.modeling.models import load_tokenizer

        task = tasks.get(args.show) or get_task(args.show)
        enc = PromptEncoder(load_tokenizer(args.tokenizer), task, args.max_length)
        b = "The second sentence." if task.num_inputs == 2 else None
        print(enc.render(args.example, b))
        for label, ids in zip(task.labels, enc.label_word_ids):
            print(f"  {label} -> {enc.tokenizer.convert_ids_to_tokens(ids)}")
        return
    for name, t in tasks.items():
        print(f"{name:8s} {t.metric:8s} {t.template!r:40s} {t.verbalizer}")


def cmd_fewshot(args) -> None:
    from rayapp.data import fewshot
    from rayapp.errors import ConfigError

    if args.action == "show":
        split = fewshot.load_lmbff(args.data_dir, args.task, k=args.k, seed=args.seed)
        print(json.dumps({"task": split.task, "k": split.k, "seed": split.seed, "train": len(split.train),
                          "dev": len(split.dev), "test": len(split.test), "source": split.source}, indent=1))
        return
    missing = [f"--{k} {what}" for k, what in (("train", "TABLE"), ("test", "TABLE"), ("out", "DIR"))
               if getattr(args, k) is None]
    if missing:
        raise ConfigError(f"`rayapp fewshot make` needs {', '.join(missing)}: --train is the labelled pool "
                          "to sample train/dev from, --test the labelled test set, --out where the splits go")
    fields = {f.name for f in dataclasses.fields(fewshot.Columns)}
    bad = [kv for kv in args.columns or () if kv.split("=", 1)[0] not in fields or "=" not in kv]
    if bad:
        raise ConfigError(f"--columns takes field=column pairs with field one of {', '.join(sorted(fields))} "
                          f"(e.g. text_a=sentence label=label), got {bad}")
    columns = fewshot.Columns(**dict(kv.split("=", 1) for kv in args.columns)) if args.columns else None
    pool = fewshot.read_table(args.train, columns, args.task)
    test = fewshot.read_table(args.test, columns, args.task)
    splits = fewshot.make_splits(pool, test, args.task, k=args.k, seeds=tuple(args.seeds), out_dir=args.out)
    for s in splits:
        print(f"{s.task} K={s.k} seed={s.seed}: train {len(s.train)} dev {len(s.dev)} test {len(s.test)}")
    print(f"splits written under {args.out}")


# what each recipe's command prints of its record
_SHOWN = {
    "finetune": ("name", "task", "method", "metric", "best_step", "best_dev", "test", "checkpoint"),
    "distill": ("name", "setting", "objective", "step", "first_loss", "last_loss", "restarts", "model"),
    "ppt": ("name", "objective", "step", "first_loss", "last_loss", "restarts", "model"),
    "pretrain": ("name", "step", "masked_accuracy", "model"),
    "prompt-distill": ("name", "task", "method", "metric", "best_step", "best_dev", "test", "probe_dev_acc",
                       "pseudo_label_agreement", "checkpoint"),
}


def cmd_recipe(args, recipe: str, overrides: tuple[str, ...] = ()) -> None:
    from rayapp.config import load_config
    from rayapp.recipes import get_recipe

    config_cls, run = get_recipe(recipe)
    record = run(load_config(config_cls, args.config, [*args.overrides, *overrides]))
    _print(record, _SHOWN.get(recipe, ("name",)))
    print(f"run record: {record['record']}")


def cmd_init_student(args) -> None:
    from rayapp.recipes.pretrain import make_student

    print(f"student written to {make_student(args.teacher, args.out, args.layers)}")


def cmd_pairs(args) -> None:
    from rayapp.data.pairs import PairsConfig, run

    cfg = _stage_config(PairsConfig, args, ("corpus", "out", "num_examples", "seed"))
    stats = run(cfg)
    print(json.dumps({k: v for k, v in stats.items() if k != "files"}, indent=1, default=str))
    print(f"examples written to {cfg.out}")


def _stage_config(cls, args, flags: tuple[str, ...]):
    """A data stage's typed config: `--config FILE`, then the flags given, then `key=value`.
    Flags travel as JSON scalars, which YAML reads back exactly (a path stays a string)."""
    from rayapp.config import load_config

    given = [f"{k}={json.dumps(getattr(args, k))}" for k in flags if getattr(args, k) is not None]
    return load_config(cls, args.config, [*given, *args.overrides])


def cmd_sentiment(args) -> None:
    from rayapp.data.sentiment import SentimentConfig, run

    cfg = _stage_config(SentimentConfig, args, ("corpus", "teacher", "out", "num_examples", "seed", "threshold",
                                                "batch_size", "num_actors", "use_gpu"))
    stats = run(cfg)
    print(json.dumps({k: v for k, v in stats.items() if k != "files"}, indent=1, default=str))
    print(f"examples written to {cfg.out}")


def cmd_teacher_cache(args) -> None:
    from rayapp.data.teacher_cache import CacheConfig, run

    cfg = _stage_config(CacheConfig, args, ("examples", "teacher", "out", "task", "top_k",
                                            "batch_size", "num_actors", "use_gpu"))
    print(json.dumps(run(cfg), indent=1, default=str))
    print(f"teacher cache written to {cfg.out}")


def cmd_backtranslate(args) -> None:
    from rayapp.data.backtranslate import BacktranslateConfig, run

    cfg = _stage_config(BacktranslateConfig, args, ("data_dir", "forward", "backward", "out", "factor",
                                                    "batch_size", "num_actors", "use_gpu"))
    print(json.dumps(run(cfg), indent=1))
    print(f"back-translated splits written to {cfg.out}")


def cmd_lmbff_search(args) -> None:
    from rayapp.tasks.search import SearchConfig, run

    cfg = _stage_config(SearchConfig, args, ("out", "batch_size", "num_actors", "use_gpu"))
    print(json.dumps(run(cfg), indent=1))
    print(f"search written to {cfg.out}: tasks files in auto-template/ and auto-label/, rankings in ranking/")


SWEEP_EXAMPLE = "rayapp sweep --config jobs/configs/sweep-smash-table2_local.yaml tasks=[RTE] seeds=[13]"


def cmd_sweep(args) -> None:
    from rayapp.config import load_config
    from rayapp.errors import ConfigError
    from rayapp.sweep import tune
    from rayapp.sweep.spec import SweepConfig

    if args.resume and (args.config or args.overrides):
        raise ConfigError("--resume DIR continues a sweep with the config it started with; drop --config/key=value")
    if not args.resume and args.config is None:
        raise ConfigError("give --config FILE (e.g. jobs/configs/sweep-smash-table2_local.yaml) or --resume DIR")
    try:
        summary = tune.resume(args.resume) if args.resume else \
            tune.run(load_config(SweepConfig, args.config, args.overrides))
    except tune.SweepInterrupted as stopped:
        print(stopped, file=sys.stderr)
        raise SystemExit(130) from None
    print(json.dumps(summary, indent=1))
    print(f"report: rayapp report {summary['experiment']}")


def cmd_report(args) -> None:
    from rayapp import storage
    from rayapp.sweep import report

    out = args.out or ("report" if storage.is_remote(args.dirs[0]) else storage.join(args.dirs[0], "report"))
    written = report.write(args.dirs, out)
    print(written["markdown"])
    print(f"written: {', '.join(written['files'])}")


def cmd_export(args) -> None:
    from rayapp.errors import ConfigError
    from rayapp.ship.export import ExportConfig, run

    if args.out is None and not args.config and not any(o.startswith("out=") for o in args.overrides):
        raise ConfigError("`rayapp export RUN` needs --out DIR: the new folder (local or s3://) to write the "
                          "model, its ONNX graph and its card to")
    cfg = _stage_config(ExportConfig, args, ("run", "out"))
    print(json.dumps(run(cfg), indent=1))
    print(f"model exported to {cfg.out}")


def cmd_predict(args) -> None:
    import os

    from rayapp.ship.predict import PredictConfig, run

    if args.model is not None and "=" in args.model and not os.path.exists(args.model):
        # `predict --config FILE key=value`: the model comes from the config; the first override lands here
        args.overrides.insert(0, args.model)
        args.model = None
    cfg = _stage_config(PredictConfig, args, ("model", "input", "out", "text_column", "text_b_column", "id_column",
                                              "tokens_per_batch", "num_actors", "use_gpu"))
    print(json.dumps(run(cfg), indent=1))
    print(f"predictions written to {cfg.out}")


def cmd_assets(args) -> None:
    from rayapp.assets import pull, push
    from rayapp.errors import ConfigError

    if args.action == "push":
        if args.ref is not None:
            raise ConfigError(f"`rayapp assets push` takes no ID (got {args.ref!r}); it copies --data's fewshot/")
        for uri in push(args.to, args.data):
            print(f"-> {uri}")
        return
    if args.ref is None:
        raise ConfigError("`rayapp assets pull` needs an ID: a hub model id or hf://NAME[/CONFIG][?split=S]")
    for uri in pull(args.ref, args.to):
        print(f"{args.ref} -> {uri}")


def cmd_demo(args) -> None:
    from rayapp.demo import main as demo

    demo(args.demo_args)


# --- parser -----------------------------------------------------------------------------

def _recipe(sub, name: str, help: str, func):
    p = sub.add_parser(name, help=help, description=help)
    p.add_argument("--config", help="YAML config file (see jobs/configs/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. lr=2e-5 engine.num_workers=2")
    p.set_defaults(func=func)
    return p


def _data_stage(sub, name: str, help: str, func):
    """A data stage's command: a typed config from `--config FILE key=value` (see
    `_stage_config`), the actor-pool flags, and the stage's own flags added by the caller."""
    p = _recipe(sub, name, help, func)
    p.add_argument("--batch-size", type=int, help="examples per forward pass (default: sized for the device)")
    p.add_argument("--num-actors", type=int, help="most scoring actors (default: as many as the cluster gives)")
    p.add_argument("--use-gpu", action="store_true", default=None, help="one GPU per scoring actor")
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rayapp", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("tasks", help="list tasks (templates, verbalizers, metrics) or render one")
    p.add_argument("--tasks-file", help="YAML file with extra tasks")
    p.add_argument("--show", metavar="TASK", help="render TASK's prompt with --tokenizer")
    p.add_argument("--tokenizer", default="roberta-large", help="HF id or local dir (for --show)")
    p.add_argument("--example", default="A gripping, beautifully made film.", help="sentence to render")
    p.add_argument("--max-length", type=int, default=128)
    p.set_defaults(func=cmd_tasks)

    p = sub.add_parser("fewshot", help="show or generate LM-BFF few-shot splits")
    p.add_argument("action", choices=["show", "make"])
    p.add_argument("--task", required=True)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--seed", type=int, default=13, help="(show) split seed")
    p.add_argument("--seeds", type=int, nargs="+", default=[13, 21, 42, 87, 100], help="(make) split seeds")
    p.add_argument("--data-dir", help="(show) LM-BFF k-shot root; default: local assets")
    p.add_argument("--train", help="(make) labelled table to sample train/dev from (tsv/csv/jsonl/json/parquet/hf://NAME/CONFIG?split=S)")
    p.add_argument("--test", help="(make) labelled test table")
    p.add_argument("--columns", nargs="*", metavar="field=column", help="(make) e.g. text_a=sentence label=label")
    p.add_argument("--out", help="(make) output root (TASK/K-SEED/{train,dev,test}.jsonl)")
    p.set_defaults(func=cmd_fewshot)

    _recipe(sub, "finetune", "few-shot fine-tuning (prompt or classifier)",
            lambda a: cmd_recipe(a, "finetune"))
    _recipe(sub, "evaluate", "zero-shot prompt evaluation of a model or checkpoint (dev + test)",
            lambda a: cmd_recipe(a, "finetune", ("method=zero-shot",)))
    _recipe(sub, "pretrain", "further masked-LM pre-training on a corpus (how rayapp makes a teacher)",
            lambda a: cmd_recipe(a, "pretrain"))
    p = sub.add_parser("init-student", help="a student cut from a teacher: every other layer, same embeddings/head")
    p.add_argument("--teacher", required=True, help="teacher MLM (HF id or local dir)")
    p.add_argument("--out", required=True, help="output HF model dir")
    p.add_argument("--layers", type=int, nargs="+", help="teacher layers to keep (default every other one)")
    p.set_defaults(func=cmd_init_student)

    p = sub.add_parser("intermediate", help="build SMASH intermediate examples from a corpus (Ray Data)")
    kinds = p.add_subparsers(dest="kind", required=True)
    p = _recipe(kinds, "pairs", "sentence pairs: different documents / same document / adjacent", cmd_pairs)
    p.add_argument("--corpus", help="text/WikiExtractor/JSONL/parquet files, s3:// prefix or hf://")
    p.add_argument("--out", help="output dir or s3:// prefix (parquet shards)")
    p.add_argument("--num-examples", type=int)
    p.add_argument("--seed", type=int)

    p = _data_stage(kinds, "sentiment", "corpus sentences the teacher labels confidently (resumable)", cmd_sentiment)
    p.add_argument("--corpus", help="text/WikiExtractor/JSONL/parquet files, s3:// prefix or hf://")
    p.add_argument("--teacher", help="teacher MLM that scores the sentences")
    p.add_argument("--out", help="output dir or s3:// prefix")
    p.add_argument("--num-examples", type=int, help="keep at most this many (seeded sample); default all")
    p.add_argument("--seed", type=int)
    p.add_argument("--threshold", type=float, help="keep sentences whose top class prob >= this (default 0.5)")

    p = _data_stage(sub, "backtranslate", "few-shot splits whose train sets grow to factor x by back-translation "
                    "(SMASH's distil bt10 data; resumable)", cmd_backtranslate)
    p.add_argument("--data-dir", help="LM-BFF k-shot root to augment (local or s3://); default: local assets")
    p.add_argument("--forward", help="English -> pivot translation model (default Helsinki-NLP/opus-mt-en-de)")
    p.add_argument("--backward", help="pivot -> English translation model (default Helsinki-NLP/opus-mt-de-en)")
    p.add_argument("--out", help="the new few-shot root (TASK/K-SEED/{train,dev,test}.jsonl), local or s3://")
    p.add_argument("--factor", type=int, help="train grows to factor x its size (default 10)")

    p = _data_stage(sub, "lmbff-search", "LM-BFF's automatic label words and templates per few-shot split, "
                    "written as tasks YAML files for finetune tasks_file= (resumable)", cmd_lmbff_search)
    p.add_argument("--out", help="the search folder (local or s3://)")

    p = _data_stage(sub, "teacher-cache", "cache the teacher's top-k logits at the mask (resumable)",
                    cmd_teacher_cache)
    p.add_argument("--examples", help="finished intermediate examples folder (local or s3://)")
    p.add_argument("--teacher", help="teacher MLM: HF id, local dir or s3://")
    p.add_argument("--out", help="cache folder (local or s3://)")
    p.add_argument("--task", help="smash-pairs (default) or smash-sentiment")
    p.add_argument("--top-k", type=int, help="logits kept per example (default 64)")

    _recipe(sub, "distill", "SMASH distillation of a student from a teacher cache or online teacher",
            lambda a: cmd_recipe(a, "distill"))
    _recipe(sub, "ppt", "PPT: pre-train a soft prompt on SMASH's intermediate data with the model frozen "
            "(then finetune method=prompt-tuning init=RUN/student)", lambda a: cmd_recipe(a, "ppt"))
    _recipe(sub, "prompt-distill", "Prompt-Distiller (and its KD baselines) from a prompt-tuned and a pre-trained "
            "teacher", lambda a: cmd_recipe(a, "prompt-distill"))

    p = sub.add_parser("sweep", help="few-shot sweep on Ray Tune: methods x tasks x splits x grid (SMASH Table 2)",
                       epilog=f"example: {SWEEP_EXAMPLE} (tasks= narrows the config's tasks; its per_task "
                       "entries and table columns of the others are ignored)")
    p.add_argument("--config", help="sweep YAML (see jobs/configs/sweep-*.yaml)")
    p.add_argument("--resume", metavar="DIR", help="continue the interrupted sweep in DIR (<storage>/<name>)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. tasks=[RTE] seeds=[13]")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("report", help="tables, plots and report.html from sweep or run directories")
    p.add_argument("dirs", nargs="+", metavar="DIR", help="sweep dirs, run output dirs or records/ folders (local or s3://)")
    p.add_argument("--out", help="local output dir (default: DIR/report for a local DIR, else ./report)")
    p.set_defaults(func=cmd_report)

    help = "a few-shot run's selected model as a folder for plain transformers, its ONNX classifier and a model card"
    p = sub.add_parser("export", help=help, description=help)
    p.add_argument("run", help="the run's record (OUTPUT_DIR/records/NAME.json) or folder (OUTPUT_DIR/NAME)")
    p.add_argument("--out", help="the folder to write (local or s3://)")
    p.add_argument("--config", help="YAML config file")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. onnx=false check_examples=128")
    p.set_defaults(func=cmd_export)

    help = "label a table or corpus with an exported model: Ray Data batch inference, parquet out, resumable"
    p = sub.add_parser("predict", help=help, description=help)
    p.add_argument("model", nargs="?", help="a folder `rayapp export` wrote (local or s3://); or model= in --config")
    p.add_argument("--input", help="file or folder of .tsv/.csv/.jsonl/.parquet, save_to_disk folder, hf://, s3://")
    p.add_argument("--out", help="the predictions folder (local or s3://)")
    p.add_argument("--text-column", help="column of the first sentence (default text; a position without header)")
    p.add_argument("--text-b-column", help="column of the second sentence (two-sentence tasks)")
    p.add_argument("--id-column", help="column of the row's id (default FILE#ROW)")
    p.add_argument("--tokens-per-batch", type=int, help="padded tokens per forward pass (default 4096)")
    p.add_argument("--num-actors", type=int, help="most actors (default: as many as the cluster gives)")
    p.add_argument("--use-gpu", action="store_true", default=None, help="one GPU per actor")
    p.add_argument("--config", help="YAML config file (see jobs/configs/predict*.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. header=false rows_per_shard=50000")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("assets", help="fill an asset mirror (RAYAPP_ASSETS): pull from the hub, push the few-shot data")
    p.add_argument("action", choices=["pull", "push"])
    p.add_argument("ref", nargs="?", help="(pull) hub model id (roberta-large, org/name) or dataset "
                   "hf://NAME[/CONFIG][?split=S]")
    p.add_argument("--to", required=True, help="mirror root: a local dir or s3:// prefix")
    p.add_argument("--data", help="(push) folder holding fewshot/k-shot and fewshot/pool; default: local assets")
    p.set_defaults(func=cmd_assets)

    p = sub.add_parser("demo", help="the whole SMASH pipeline on this machine's CPU (local assets)", add_help=False)
    p.add_argument("demo_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    from rayapp import env

    env.plain_output()
    env.console_logging()
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "demo":  # the demo parses its own options (argparse's REMAINDER drops leading ones)
        args.demo_args = extra + args.demo_args
    elif extra and hasattr(args, "overrides") and not any(e.startswith("-") or "=" not in e for e in extra):
        # key=value after a flag (`export RUN --out DIR onnx=false`): argparse ends the positionals at the flag
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        args.func(args)
    except Exception as exc:  # noqa: BLE001 - only user errors are caught below
        err = find_user_error(exc)
        if err is None:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
