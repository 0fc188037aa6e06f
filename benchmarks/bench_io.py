"""Shared by the benchmark scripts: results are JSON files written whole (temp file, then rename)."""
from __future__ import annotations

import json
import os
from pathlib import Path


def write_json(path: str | os.PathLike, data: object) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)
    return path
