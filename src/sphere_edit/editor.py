"""Putting a session together from names: model, method spec, preset, corpus."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .methods import METHODS, make_method
from .models import LoadedModel
from .presets import Preset, preset_for
from .session import EditSession
from .sphere import SphereProjection
from .stats import Corpus, layer_second_moments, load_corpus
from .targets import TargetConfig


@dataclass(frozen=True)
class MethodSpec:
    """``"memit"``, ``"alphaedit"``, ``"alphaedit+sphere"``, ..."""

    method: str
    sphere: bool

    @classmethod
    def parse(cls, spec: str) -> MethodSpec:
        parts = [p.strip().lower() for p in spec.split("+")]
        method, extras = parts[0], parts[1:]
        if method not in METHODS:
            raise ValueError(
                f"method: unknown method {method!r}; choose one of {', '.join(METHODS)} "
                "(add '+sphere' for the SPHERE projection)"
            )
        if any(e != "sphere" for e in extras) or len(extras) > 1:
            raise ValueError(f"method: cannot parse {spec!r}; the only suffix is '+sphere'")
        return cls(method=method, sphere=bool(extras))

    def __str__(self) -> str:
        return self.method + ("+sphere" if self.sphere else "")


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
    spec = MethodSpec.parse(spec) if isinstance(spec, str) else spec
    preset = preset or preset_for(loaded.name, loaded.layout.num_layers)
    layers = list(layers) if layers is not None else list(preset.layers)
    if not isinstance(corpus, Corpus):
        corpus = load_corpus(corpus, loaded, seed=seed)
    log(f"statistics: {corpus.description}")
    tokens = stats_tokens or preset.stats_tokens
    moments = layer_second_moments(loaded, layers, corpus, max_tokens=tokens, progress=progress)
    method = make_method(
        spec.method, **{**preset.method_options(spec.method), **(method_overrides or {})}
    )
    transform = None
    if spec.sphere:
        transform = SphereProjection(
            eta=preset.sphere_eta() if eta is None else eta,
            alpha=preset.sphere_alpha(spec.method) if alpha is None else alpha,
            basis=basis,  # type: ignore[arg-type]
        )
    target = replace(TargetConfig(), **{**preset.target, **(target_overrides or {})})
    return EditSession(
        loaded,
        method,
        layers,
        {layer: m.moment for layer, m in moments.items()},
        transform=transform,
        target=target,
        seed=seed,
        run_dir=run_dir,
        extra_header={
            "method_spec": str(spec),
            "preset": preset.name,
            "corpus": corpus.description,
            "corpus_fingerprint": corpus.fingerprint,
            "stats_tokens": tokens,
        },
    )
