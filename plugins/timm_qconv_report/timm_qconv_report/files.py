"""Writing report files atomically: readers never see a half-written file, even if the run dies."""
from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

FIELDS = ("event", "epoch", "step", "layer", "n_bits", "rel_error", "n_levels")


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, then rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def encode_records(records: Sequence[dict[str, Any]], fmt: str) -> bytes:
    """The records (dicts with the keys :data:`FIELDS`) as CSV with a header row, or as a JSON list."""
    if fmt == "json":
        return json.dumps(list(records), indent=1).encode()
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(records)
    return text.getvalue().encode()
