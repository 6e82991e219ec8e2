"""Figures without pyplot's global state: an Agg canvas per figure, atomic PNG writes,
and PNGs embedded in HTML."""

from __future__ import annotations

import base64
import html
from pathlib import Path

from ..common.fileio import write_with


def new_figure(width: float, height: float):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError(f"figures need matplotlib: pip install matplotlib ({error})") from None
    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def save_png(figure, path: str | Path) -> None:
    # No "Software" metadata: the same figure gives the same bytes.
    write_with(path, lambda tmp: figure.savefig(tmp, format="png", metadata={"Software": None}))


def img_tag(path: str | Path, alt: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return (
        f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}" style="max-width:100%">'
    )
