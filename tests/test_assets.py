"""The asset lookup order (local path or URI, mirror `$RAYAPP_ASSETS`, hub) with a local
mirror and a moto S3 mirror, and `rayapp assets pull` from the HF cache."""
import os
import re
import shutil
import uuid
from pathlib import Path

import boto3
import pytest

from rayapp import assets, storage
from rayapp.cli import main
from rayapp.data.formats import load_hf
from rayapp.errors import ConfigError, DataError
from rayapp.tasks.registry import get_task
from rayapp.modeling.models import check_model, load_mlm, load_tokenizer, local_model_dir, portable_model


@pytest.fixture(params=["local", "s3"])
def mirror(request, tmp_path, monkeypatch):
    """An empty mirror root, as a local folder or an S3 prefix; node-local copies go to tmp."""
    monkeypatch.setenv("RAYAPP_CACHE", str(tmp_path / "cache"))
    if request.param == "local":
        root = str(tmp_path / "mirror")
        os.makedirs(root)
    else:
        request.getfixturevalue("s3_server")
        bucket = f"mirror-{uuid.uuid4().hex[:10]}"
        boto3.client("s3").create_bucket(Bucket=bucket)
        root = f"s3://{bucket}/assets"
    monkeypatch.setenv("RAYAPP_ASSETS", root)
    return root


def test_mirror_hit_loads_from_the_mirror(mirror, tiny_roberta, tmp_path):
    storage.copy_dir(tiny_roberta, storage.join(mirror, "models", "tiny-org", "tiny-roberta"))
    ref = "tiny-org/tiny-roberta"  # a hub id that exists nowhere but in the mirror
    assert assets.resolve(ref) == storage.join(mirror, "models", "tiny-org", "tiny-roberta")
    check_model(ref)
    assert len(load_tokenizer(ref)) == len(load_tokenizer(tiny_roberta))
    assert load_mlm(ref).config.vocab_size == load_mlm(tiny_roberta).config.vocab_size
    # workers get the mirror's location, not the hub id: they need not see RAYAPP_ASSETS
    assert portable_model(ref) in (assets.resolve(ref), os.path.abspath(assets.resolve(ref)))
    if mirror.startswith("s3://"):  # fetched once into the node-local cache
        local = local_model_dir(ref)
        assert local.startswith(str(tmp_path / "cache")) and Path(local, "config.json").is_file()


def test_mirror_miss_falls_back_to_the_hub_then_names_every_place(mirror):
    ref = "tiny-org/not-mirrored"
    assert assets.resolve(ref) == ref  # a miss leaves the hub id for the hub
    with pytest.raises(ConfigError) as err:
        check_model(ref)
    msg = str(err.value)
    assert "\n" not in msg
    for place in (os.path.abspath(ref), storage.join(mirror, "models", ref), "hub (HF_HUB_OFFLINE=1)",
                  f"rayapp assets pull {ref} --to ROOT"):
        assert place in msg, (place, msg)


def test_without_mirror_the_error_says_none_is_set(monkeypatch):
    monkeypatch.delenv("RAYAPP_ASSETS", raising=False)
    with pytest.raises(ConfigError, match=r"cannot find 'roberta-large': no local path .*roberta-large; "
                                          r"no mirror \(\$RAYAPP_ASSETS is not set\); not from the hub"):
        load_tokenizer("roberta-large")


def test_local_paths_and_uris_never_go_to_the_mirror(mirror, tiny_roberta, tmp_path, monkeypatch):
    storage.copy_dir(tiny_roberta, storage.join(mirror, "models", "x"))
    os.makedirs(tmp_path / "x")
    monkeypatch.chdir(tmp_path)  # `x` now names a local folder first
    assert assets.resolve("x") == "x"
    assert assets.resolve(tiny_roberta) == tiny_roberta
    assert assets.resolve("s3://b/models/x") == "s3://b/models/x"
    with pytest.raises(ConfigError, match=r"'/no/such/model' does not exist \(a local path\)"):
        load_tokenizer("/no/such/model")


def test_dataset_mirror_hit_and_miss(mirror, tmp_path):
    import datasets

    local = tmp_path / "split"
    datasets.Dataset.from_dict({"sentence": ["a fine film", "dull"], "label": [1, 0]}).save_to_disk(local)
    storage.copy_dir(str(local), storage.join(mirror, "datasets", "glue", "sst2", "train"))
    assert assets.resolve("hf://glue/sst2?split=train") == storage.join(mirror, "datasets/glue/sst2/train")
    # the readers of hf:// tables and corpora take the mirror's copy, without the hub
    assert load_hf("hf://glue/sst2?split=train")["sentence"] == ["a fine film", "dull"]
    assert [r["label"] for r in load_hf("hf://glue/sst2?split=train", streaming=True)] == [1, 0]
    assert assets.resolve("hf://glue/sst2?split=validation") == "hf://glue/sst2?split=validation"
    with pytest.raises(DataError) as err:  # a miss goes to the hub, which is offline here
        load_hf("hf://glue/sst2?split=validation")
    msg = str(err.value)
    assert "\n" not in msg
    assert storage.join(mirror, "datasets/glue/sst2/validation") in msg and "HF_HUB_OFFLINE=1" in msg


def _hf_cache_with(model_dir: str, repo: str, cache: Path) -> None:
    """The HF hub cache layout (refs/main -> snapshots/<rev>/<file> symlinked to blobs/),
    as `huggingface_hub` leaves it after a download on a machine with the hub."""
    entry = cache / f"models--{repo.replace('/', '--')}"
    (entry / "refs").mkdir(parents=True)
    (entry / "refs" / "main").write_text("0123abcd")
    snapshot, blobs = entry / "snapshots" / "0123abcd", entry / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for f in Path(model_dir).iterdir():
        shutil.copy(f, blobs / f.name)
        (snapshot / f.name).symlink_to(os.path.relpath(blobs / f.name, snapshot))


def test_assets_pull_fills_the_mirror_from_the_hub_cache(mirror, tiny_roberta, tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants

    _hf_cache_with(tiny_roberta, "tiny-org/pulled", tmp_path / "hf")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    assert assets.resolve("tiny-org/pulled") == "tiny-org/pulled"
    assert main(["assets", "pull", "tiny-org/pulled", "--to", mirror]) == 0
    target = storage.join(mirror, "models", "tiny-org", "pulled")
    assert target in capsys.readouterr().out
    assert sorted(f.rsplit("/", 1)[-1] for f in storage.list_files(target)) == \
        sorted(p.name for p in Path(tiny_roberta).iterdir())
    assert assets.resolve("tiny-org/pulled") == target
    check_model("tiny-org/pulled")


def test_assets_pull_errors_are_one_line(mirror, tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-hf"))
    assert main(["assets", "pull", "tiny-org/absent", "--to", mirror]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot pull 'tiny-org/absent' from the hub") and "\n" not in err
    with pytest.raises(DataError, match="is a local path or URI, not a hub reference"):
        assets.pull(str(tmp_path), mirror)


def _small_data(tmp_path) -> Path:
    """A data root in the local assets' layout: SST-2 split 16-13, MNLI split 16-13 (its
    test file absent, as locally: the test falls back to the pool) and both tasks' pools."""
    data = tmp_path / "data"
    kshot, pool = assets.asset("fewshot", "k-shot"), assets.asset("fewshot", "pool")
    for task in ("SST-2", "MNLI"):
        shutil.copytree(kshot / task / "16-13", data / "fewshot" / "k-shot" / task / "16-13")
        shutil.copytree(pool / task, data / "fewshot" / "pool" / task)
    return data


def test_assets_push_and_the_splits_read_from_the_mirror(mirror, tmp_path, monkeypatch, capsys):
    """`rayapp assets push` copies the few-shot data; with the local assets gone (a cluster
    node) every default reads the mirror's copy: splits, the pool-test fallback, X~'s pool."""
    from rayapp.data.fewshot import load_lmbff
    from rayapp.data.unlabelled import draw_unlabelled

    data = _small_data(tmp_path)
    local = {t: load_lmbff(data / "fewshot" / "k-shot", t) for t in ("SST-2", "MNLI")}
    main(["assets", "push", "--to", mirror, "--data", str(data)])
    assert capsys.readouterr().out.split() == ["->", storage.join(mirror, "fewshot", "k-shot"),
                                               "->", storage.join(mirror, "fewshot", "pool")]
    monkeypatch.setenv("RAYAPP_DATA", str(tmp_path / "no-local-assets"))
    for task in ("SST-2", "MNLI"):
        split = load_lmbff(None, task)
        assert (split.train, split.dev, split.test) == (local[task].train, local[task].dev, local[task].test)
        assert split.source["root"] == storage.join(mirror, "fewshot", "k-shot")
    assert split.source["test"] == storage.join(mirror, "fewshot", "pool", "MNLI", "dev.json")  # the fallback
    xu = draw_unlabelled(load_lmbff(None, "SST-2"), get_task("SST-2"), n=2)
    assert xu.source["pool"] == storage.join(mirror, "fewshot", "pool", "SST-2", "train.json")
    assert len(xu.examples) == 2 * len(local["SST-2"].train)
    missing = storage.join(mirror, "fewshot", "k-shot", "RTE", "16-13", "train.tsv")
    with pytest.raises(DataError, match=rf"^{re.escape(missing)} does not exist"):
        load_lmbff(None, "RTE")


def test_a_split_given_as_a_uri_draws_x_tilde_from_the_pool_beside_it(mirror, tmp_path, monkeypatch):
    """data_dir=ROOT/fewshot/k-shot (no $RAYAPP_ASSETS): X~ comes from ROOT/fewshot/pool."""
    from rayapp.data.fewshot import load_lmbff
    from rayapp.data.unlabelled import draw_unlabelled

    assets.push(mirror, _small_data(tmp_path))
    monkeypatch.delenv("RAYAPP_ASSETS")
    split = load_lmbff(storage.join(mirror, "fewshot", "k-shot"), "SST-2")
    assert draw_unlabelled(split, get_task("SST-2"), n=1).source["pool"] == storage.join(
        mirror, "fewshot", "pool", "SST-2", "train.json")


def test_no_few_shot_data_anywhere_says_what_to_do(tmp_path, monkeypatch, capsys):
    from rayapp.data.fewshot import load_lmbff

    monkeypatch.delenv("RAYAPP_ASSETS", raising=False)
    monkeypatch.setenv("RAYAPP_DATA", str(tmp_path / "none"))
    with pytest.raises(DataError, match=r"no few-shot data fewshot/k-shot: no mirror \(\$RAYAPP_ASSETS is not "
                       r"set\); .*Pass data_dir=s3://.*`rayapp assets push --to ROOT`"):
        load_lmbff(None, "SST-2")
    assert main(["assets", "push", "--to", str(tmp_path / "m"), "--data", str(tmp_path / "none")]) == 2
    assert "none/fewshot/k-shot does not exist; --data must be a folder" in capsys.readouterr().err
    assert main(["assets", "pull", "--to", str(tmp_path / "m")]) == 2
    assert "`rayapp assets pull` needs an ID" in capsys.readouterr().err
