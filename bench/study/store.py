"""DIR/results.json: every configuration's raw result, written again (atomically) each time
one finishes, so an interrupted study keeps what it measured (--resume goes on from it)."""

from __future__ import annotations

import json
import os
from pathlib import Path

FORMAT = 1


def empty(meta: dict) -> dict:
    return {"format": FORMAT, "study": meta, "machine": {}, "versions": {}, "configs": {}}


def load(path) -> dict:
    doc = json.loads(Path(path).read_text())
    if not isinstance(doc, dict) or "configs" not in doc:
        raise ValueError(f"{path} is not a study results.json (no 'configs')")
    return doc


def save(doc: dict, path) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=_plain) + "\n")
    os.replace(tmp, path)


def _plain(x):
    try:
        return x.item()  # numpy scalars
    except AttributeError:
        return str(x)
