"""Where models and datasets come from: a local path or URI, a mirror, the hub.

Every model or dataset reference resolves in one order:
1. a local path or an `s3://` URI names itself;
2. a hub reference (`roberta-large`, `org/name`, `hf://NAME[/CONFIG]?split=S`) is looked up
   under the mirror root `$RAYAPP_ASSETS` (a local dir or `s3://` prefix, what an
   air-gapped GPU cluster keeps): models at `ROOT/models/<id>` (an HF model dir), datasets
   at `ROOT/datasets/<name>/<config or default>/<split>` (a `save_to_disk` folder);
3. else the hub itself (unless `HF_HUB_OFFLINE=1`).
A reference found nowhere is one error naming every place looked (`not_found`).
`rayapp assets pull ID --to ROOT` fills a mirror on a machine that has the hub; `rayapp assets
push --to ROOT` copies the local few-shot data (LM-BFF splits and pools) there, where
`fewshot_dir` finds it.

`asset()`/`data_root()` are the repo's own local assets (`../shared/data`): tests, benchmarks
and the demo read the LM-BFF splits, the Wikipedia corpus and the MiniLM weights from there.
"""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from rayapp import storage
from rayapp.errors import DataError

REPO_ROOT = Path(__file__).resolve().parent.parent
MIRROR_ENV = "RAYAPP_ASSETS"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
# weights of other frameworks: a mirror keeps what transformers' PyTorch classes load
_SKIP_FILES = ["*.h5", "*.msgpack", "*.ot", "*.onnx", "*.tflite", "*.mlmodel", "onnx/*", "openvino/*",
               "coreml/*", "tf_model*", "flax_model*", "rust_model*"]


def data_root() -> Path:
    """`$RAYAPP_DATA`, else `<repo>/../shared/data`."""
    root = Path(os.environ.get("RAYAPP_DATA", REPO_ROOT.parent / "shared" / "data"))
    if not root.is_dir():
        raise DataError(
            f"local asset folder {root} does not exist; set RAYAPP_DATA to the folder that "
            "holds fewshot/, corpus/ and models/ (see README, 'Local assets')"
        )
    return root


def asset(*parts: str) -> Path:
    """Path of one asset below `data_root()`, e.g. `asset("fewshot", "k-shot")`."""
    path = data_root().joinpath(*parts)
    if not path.exists():
        raise DataError(f"local asset {path} is missing (RAYAPP_DATA={data_root()})")
    return path


# --- references: local path / URI, mirror, hub -------------------------------------------------

def mirror_root() -> str | None:
    return os.environ.get(MIRROR_ENV) or None


def mirror_key(ref: str) -> str | None:
    """Where a hub reference lives below a mirror root; None for local paths and URIs."""
    if ref.startswith("hf://"):
        name, config, split = storage.parse_hf_uri(ref)
        return "/".join(["datasets", name, config or "default", split])
    if storage.is_remote(ref) or Path(ref).expanduser().exists() or not _HUB_ID.match(ref):
        return None
    return f"models/{ref}"


def resolve(ref: str) -> str:
    """`ref` as something to load: itself (a local path or URI), its mirror copy (a local
    dir or `s3://` URI) when `$RAYAPP_ASSETS` has one, else the hub reference unchanged."""
    key, root = mirror_key(ref), mirror_root()
    if key is not None and root is not None:
        uri = storage.join(root, key)
        if storage.exists(uri):
            return uri
    return ref


def fewshot_dir(name: str) -> str:
    """LM-BFF's `fewshot/<name>` folder (`k-shot`: the splits, `pool`: the original train
    pools): under the mirror `$RAYAPP_ASSETS` when it holds one (every node of a cluster
    reads that), else the local assets."""
    root = mirror_root()
    if root is not None and storage.exists(storage.join(root, "fewshot", name)):
        return storage.join(root, "fewshot", name)
    try:
        return str(asset("fewshot", name))
    except DataError as e:
        looked = f"not in the mirror ({storage.join(root, 'fewshot', name)})" if root else \
            f"no mirror (${MIRROR_ENV} is not set)"
        raise DataError(f"no few-shot data fewshot/{name}: {looked}; {e}. Pass data_dir=s3://BUCKET/mirror/"
                        f"fewshot/k-shot, or copy the local assets with `rayapp assets push --to ROOT` "
                        f"and set {MIRROR_ENV}=ROOT") from None


def not_found(ref: str, detail: str = "") -> str:
    """One line naming every place `ref` was looked for, and how to fix it."""
    key, root = mirror_key(ref), mirror_root()
    if key is None:
        return f"{ref!r} does not exist (a local path{' or URI' if storage.is_remote(ref) else ''}); check the path"
    places = [f"no local path {os.path.abspath(ref)}" if not ref.startswith("hf://") else None,
              f"not in the mirror ({storage.join(root, key)})" if root else f"no mirror (${MIRROR_ENV} is not set)",
              "not from the hub (HF_HUB_OFFLINE=1)" if _offline() else
              f"not from the hub ({detail})" if detail else "not from the hub"]
    return (f"cannot find {ref!r}: " + "; ".join(p for p in places if p)
            + f". Fix the name, or on a machine with the hub run `rayapp assets pull {ref} --to ROOT` "
            f"and set {MIRROR_ENV}=ROOT")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


# --- filling a mirror ---------------------------------------------------------------------------

def pull(ref: str, root: str) -> list[str]:
    """Copy a hub model (`org/name`) or dataset (`hf://NAME[/CONFIG][?split=S]`, every split
    when none is named) from the hub into the mirror at `root`; returns the URIs written."""
    key = mirror_key(ref)
    if key is None:
        raise DataError(f"{ref!r} is a local path or URI, not a hub reference; give a hub id "
                        "(roberta-large, org/name) or hf://NAME[/CONFIG][?split=S]")
    if ref.startswith("hf://"):
        with tempfile.TemporaryDirectory() as tmp:
            return _pull_dataset(ref, root, tmp)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:  # through the HF cache (a snapshot of symlinks to blobs), so a second pull is free
        local = snapshot_download(ref, ignore_patterns=_SKIP_FILES)
    except (RepositoryNotFoundError, LocalEntryNotFoundError, HfHubHTTPError) as e:
        raise DataError(f"cannot pull {ref!r} from the hub: {str(e).splitlines()[0]}") from None
    storage.copy_dir(local, storage.join(root, key))
    return [storage.join(root, key)]


def push(root: str, data: str | Path | None = None) -> list[str]:
    """Copy the few-shot data (`DATA/fewshot/k-shot` and `DATA/fewshot/pool`; DATA default:
    the local assets) to `ROOT/fewshot/...`, a task folder at a time with a progress bar, so
    that every node of a cluster reads it from `ROOT` (`$RAYAPP_ASSETS` or `data_dir=`).
    Returns the folders written."""
    from tqdm.auto import tqdm

    base = Path(data).expanduser() if data is not None else data_root()
    folders = {name: base / "fewshot" / name for name in ("k-shot", "pool")}
    for name, folder in folders.items():
        if not folder.is_dir():
            raise DataError(f"{folder} does not exist; --data must be a folder holding fewshot/k-shot and "
                            "fewshot/pool (the layout of the local assets, README 'Local assets')")
    written = []
    for name, folder in folders.items():
        dst = storage.join(root, "fewshot", name)
        for task in tqdm(sorted(p for p in folder.iterdir() if p.is_dir()), desc=f"fewshot/{name}", unit="task"):
            storage.copy_dir(str(task), storage.join(dst, task.name))
        written.append(dst)
    return written


def _pull_dataset(ref: str, root: str, tmp: str) -> list[str]:
    import datasets

    name, config, split = storage.parse_hf_uri(ref)
    split = split if "split=" in ref else None  # parse_hf_uri defaults to train; pull takes them all
    try:
        loaded = datasets.load_dataset(name, config, split=split)
    except (datasets.exceptions.DatasetNotFoundError, FileNotFoundError, ValueError, ConnectionError) as e:
        raise DataError(f"cannot pull {ref!r} from the hub: {str(e).splitlines()[0]}") from None
    splits = {split: loaded} if split else dict(loaded)
    written = []
    for s, ds in splits.items():
        local = os.path.join(tmp, s)
        ds.save_to_disk(local)
        written.append(storage.join(root, "datasets", name, config or "default", s))
        storage.copy_dir(local, written[-1])
    return written
