"""What the benchmark scripts share: where the data folder is, and how the speed benchmarks
print and keep their result (one aligned line per field, and the same dict as JSON with
``--out``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sphere_edit.evaluation.data import DataSourceError, data_root

DATA_HELP = "data folder with counterfact/ and corpus/ (default: $SPHERE_EDIT_DATA)"


def data_folder(value: Path | None) -> Path:
    """``--data`` when given, else ``$SPHERE_EDIT_DATA`` (:func:`data_root`); exits with
    its one-line message when neither is set."""
    try:
        return data_root(value)
    except DataSourceError as error:
        raise SystemExit(f"error: {error}") from None


def print_and_save(result: dict[str, Any], out: Path | None, float_format: str = ".6g") -> None:
    """Print ``result`` one field a line and, with ``out``, write it there as JSON."""
    for key, value in result.items():
        shown = format(value, float_format) if isinstance(value, float) else value
        print(f"{key:>28}: {shown}")
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
