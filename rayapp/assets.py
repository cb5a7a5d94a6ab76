"""Where the local assets live (the read-only `shared/data` folder beside the repo).

Users with the hub never need this; tests, benchmarks and the demo read the LM-BFF splits,
the Wikipedia corpus and the MiniLM weights in place from here.
"""
from __future__ import annotations

import os
from pathlib import Path

from rayapp.errors import DataError

REPO_ROOT = Path(__file__).resolve().parent.parent


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
