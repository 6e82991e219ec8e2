"""How the speed benchmarks print and keep their result: one aligned line per field, and
the same dict as JSON with ``--out``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def print_and_save(result: dict[str, Any], out: Path | None, float_format: str = ".6g") -> None:
    for key, value in result.items():
        shown = format(value, float_format) if isinstance(value, float) else value
        print(f"{key:>28}: {shown}")
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
