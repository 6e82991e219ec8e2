"""Putting a session together from names: model, method spec, preset, corpus."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ..methods import get_method, make_method
from ..methods.base import edits_single_layer, needs_statistics
from ..model.loading import LoadedModel
from ..sphere.projection import SphereProjection
from .presets import Preset, describe_choice, preset_for
from .session import EditSession
from .stats import Corpus, layer_second_moments, load_corpus
from .vstar import VStarConfig


@dataclass(frozen=True)
class MethodSpec:
    """``"memit"``, ``"alphaedit+sphere"``, ``"rome+sphere"``, ...: the name of a
    registered method (:func:`~sphere_edit.methods.get_method`), optionally with the
    SPHERE projection."""

    method: str
    sphere: bool

    @classmethod
    def parse(cls, spec: str) -> MethodSpec:
        parts = [p.strip().lower() for p in spec.split("+")]
        method, extras = parts[0], parts[1:]
        get_method(method)  # an unknown name fails here, naming the registered ones
        if any(e != "sphere" for e in extras) or len(extras) > 1:
            raise ValueError(f"method: cannot parse {spec!r}; the only suffix is '+sphere'")
        return cls(method=method, sphere=bool(extras))

    def __str__(self) -> str:
        return self.method + ("+sphere" if self.sphere else "")

    @property
    def dirname(self) -> str:
        """A folder name for this method's files in a run directory."""
        return str(self).replace("+", "_")


def parse_layers(text: str, num_layers: int) -> list[int]:
    """``"3,4,5"`` or ``"3-7"``; each layer must exist."""
    layers: list[int] = []
    try:
        for part in text.split(","):
            if "-" in part.strip()[1:]:
                lo, hi = part.split("-", 1)
                layers.extend(range(int(lo), int(hi) + 1))
            else:
                layers.append(int(part))
    except ValueError:
        raise ValueError(f"layers: cannot parse {text!r}; write e.g. '3,4,5' or '3-7'") from None
    for layer in layers:
        if not 0 <= layer < num_layers:
            raise ValueError(
                f"layers: layer {layer} is out of range; the model has layers 0..{num_layers - 1}"
            )
    return sorted(set(layers))


def build_session(
    loaded: LoadedModel,
    spec: MethodSpec | str,
    *,
    preset: Preset | None = None,
    layers: list[int] | None = None,
    corpus: Corpus | str | None = None,
    stats_tokens: int | None = None,
    eta: float | None = None,
    alpha: float | None = None,
    basis: str = "current",
    target_overrides: dict[str, Any] | None = None,
    method_overrides: dict[str, Any] | None = None,
    run_dir: str | Path | None = None,
    seed: int = 0,
    progress: bool = True,
    log=print,
) -> EditSession:
    """A session for ``spec`` with the preset's options; ``method_overrides`` replace
    single method options (e.g. ``{"epsilon": None}`` for unconstrained FT). A one-layer
    method (ROME, FT) edits the preset's layer for it unless ``layers`` names one."""
    spec = MethodSpec.parse(spec) if isinstance(spec, str) else spec
    if preset is None:
        preset = preset_for(loaded.name, loaded.layout.num_layers, loaded.model.config)
        log(describe_choice(preset))
    method = make_method(
        spec.method, **{**preset.method_options(spec.method), **(method_overrides or {})}
    )
    if layers is not None:
        layers = list(layers)
    elif edits_single_layer(method):
        layers = [preset.single_layer(spec.method)]
    else:
        layers = list(preset.layers)
    tokens = stats_tokens or preset.stats_tokens
    if needs_statistics(method):
        if not isinstance(corpus, Corpus):
            corpus = load_corpus(corpus, loaded, seed=seed)
        log(f"statistics: {corpus.description}")
        stats = layer_second_moments(loaded, layers, corpus, max_tokens=tokens, progress=progress)
        moments = {layer: m.moment for layer, m in stats.items()}
        corpus_header = {
            "corpus": corpus.description,
            "corpus_fingerprint": corpus.fingerprint,
            "stats_tokens": tokens,
        }
    else:
        # The method never reads C0: no corpus pass, and a zero placeholder in the state.
        log(f"statistics: not needed by {spec.method}")
        moments = {
            layer: torch.zeros(d, d, dtype=torch.float64)
            for layer in layers
            for d in [loaded.layout.key_dim(layer)]
        }
        corpus_header = {"corpus": None, "corpus_fingerprint": None, "stats_tokens": None}
    transform = None
    if spec.sphere:
        transform = SphereProjection(
            eta=preset.sphere_eta() if eta is None else eta,
            alpha=preset.sphere_alpha(spec.method) if alpha is None else alpha,
            basis=basis,  # type: ignore[arg-type]
        )
    target = replace(VStarConfig(), **{**preset.target, **(target_overrides or {})})
    session = EditSession(
        loaded,
        method,
        layers,
        moments,
        transform=transform,
        target=target,
        seed=seed,
        run_dir=run_dir,
        extra_header={
            "method_spec": str(spec),
            **preset.header(),
            **corpus_header,
        },
    )
    session.progress = progress
    return session
