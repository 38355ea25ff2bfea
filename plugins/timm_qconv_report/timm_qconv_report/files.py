"""The records as file content: CSV with a header row, or JSON."""
from __future__ import annotations

import csv
import io
import json
from typing import Any, Sequence

FIELDS = ("event", "epoch", "step", "layer", "n_bits", "rel_error", "n_levels")


def encode_records(records: Sequence[dict[str, Any]], fmt: str) -> bytes:
    """The records (dicts with the keys :data:`FIELDS`) as CSV with a header row, or as a JSON list."""
    if fmt == "json":
        return json.dumps(list(records), indent=1).encode()
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(records)
    return text.getvalue().encode()
