"""Putting a session together from names: model, method spec, preset, corpus."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ..common.precision import resolve_precision
from ..methods import get_method, make_method
from ..methods.base import edits_single_layer, needs_statistics
from ..model.loading import LoadedModel
from ..model.placement import input_device, require_resident
from ..sphere.projection import SphereProjection
from ..sphere.variants import EnergyBudget, NormCap, SphereVariant
from .presets import Preset, describe_choice, preset_for
from .routes import edited_modules
from .sampling import parse_template_tokens
from .session import EditSession
from .stats import Corpus, StatsRecipe, layer_second_moments, load_corpus
from .vstar import VStarConfig

# The spec suffixes after the method's name, and the SPHERE variant each selects.
SPHERE_SUFFIXES = {
    "sphere": "project", "sphere-solve": "solve", "sphere-budget": "budget", "sphere-cap": "cap",
}  # fmt: skip
# ``:name=value`` options a SPHERE spec may carry, and their types (see sphere/variants.py).
SPHERE_OPTIONS: dict[str, type] = {
    "eta": float, "alpha": float, "basis": str, "last_alpha": float,
    "budget_factor": float, "budget_batches": int, "alpha_max": float, "cap_factor": float,
}  # fmt: skip


@dataclass(frozen=True)
class MethodSpec:
    """``"memit"``, ``"alphaedit+sphere"``, ``"rome+sphere"``, ...: the name of a
    registered method (:func:`~sphere_edit.methods.get_method`), optionally with the
    SPHERE projection.

    Beyond the paper (none of them the default): ``+sphere-solve`` puts the projection
    inside the closed form, ``+sphere-budget`` chooses α per layer and batch from a
    budget on the change of HE, ``+sphere-cap`` caps each projected update's norm, and
    ``:name=value`` options after the suffix set the projection for this spec, e.g.
    ``alphaedit+sphere:alpha=0.3:last_alpha=0`` (names: :data:`SPHERE_OPTIONS`)."""

    method: str
    sphere: bool
    variant: str = "project"
    options: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def parse(cls, spec: str) -> MethodSpec:
        head, *settings = [p.strip() for p in spec.split(":")]
        parts = [p.strip().lower() for p in head.split("+")]
        method, extras = parts[0], parts[1:]
        get_method(method)  # an unknown name fails here, naming the registered ones
        if any(e not in SPHERE_SUFFIXES for e in extras) or len(extras) > 1:
            raise ValueError(
                f"method: cannot parse {spec!r}; the suffixes are "
                + ", ".join(f"'+{s}'" for s in SPHERE_SUFFIXES)
            )
        if settings and not extras:
            raise ValueError(f"method: {spec!r} has SPHERE options but no '+sphere' suffix")
        options = tuple(_sphere_option(spec, setting) for setting in settings)
        variant = SPHERE_SUFFIXES[extras[0]] if extras else "project"
        return cls(method=method, sphere=bool(extras), variant=variant, options=options)

    def __str__(self) -> str:
        if not self.sphere:
            return self.method
        suffix = next(s for s, v in SPHERE_SUFFIXES.items() if v == self.variant)
        return f"{self.method}+{suffix}" + "".join(f":{k}={v}" for k, v in self.options)

    @property
    def dirname(self) -> str:
        """A folder name for this method's files in a run directory."""
        return str(self).replace("+", "_").replace(":", "_")


def _sphere_option(spec: str, setting: str) -> tuple[str, Any]:
    name, sep, text = setting.partition("=")
    name = name.strip().lower()
    if not sep or name not in SPHERE_OPTIONS:
        raise ValueError(
            f"method: cannot parse {setting!r} in {spec!r}; write name=value with a name "
            f"among {', '.join(SPHERE_OPTIONS)}"
        )
    try:
        return name, SPHERE_OPTIONS[name](text.strip())
    except ValueError:
        raise ValueError(f"method: {name} in {spec!r} must be a number, got {text!r}") from None


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
    stats_pieces: str | int | None = None,
    stats_samples: int | None = None,
    template_tokens: str | int | None = None,
    eta: float | None = None,
    alpha: float | None = None,
    basis: str = "current",
    target_overrides: dict[str, Any] | None = None,
    method_overrides: dict[str, Any] | None = None,
    run_dir: str | Path | None = None,
    seed: int = 0,
    progress: bool = True,
    log=print,
    precision: str | None = None,
    transform_order: str | None = None,
) -> EditSession:
    """A session for ``spec`` with the preset's options; ``method_overrides`` replace
    single method options (e.g. ``{"epsilon": None}`` for unconstrained FT). A one-layer
    method (ROME, FT) edits the preset's layer for it unless ``layers`` names one.
    ``stats_pieces`` (``"whole"`` or ``"256"``), ``stats_samples`` (the first N texts,
    instead of ``stats_tokens``) and ``template_tokens`` (``"authors"`` or 10) choose the
    statistics' and the context templates' recipes; the preset's by default.

    ``precision`` (``"auto"``, ``"fp32"``, ``"bf16"``, see
    :func:`~sphere_edit.common.precision.resolve_precision`) sets the arithmetic of the v*
    and key passes; without it they run as the preset and ``target_overrides`` say (float32
    by default), so library results stay bitwise the same on every machine.

    ``transform_order`` places the SPHERE projection and RECT's sparsification in MEMIT's
    schedule ("inside" or "after"; default: the method's, see ``EditSession``)."""
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
    elif get_method(spec.method).own_band:
        # A method with its own band of layers (UltraEdit), not the MEMIT window: the
        # preset's band where it has one, else the method's scaled to the depth.
        band = preset.band(spec.method)
        layers = (
            list(band) if band is not None else method.default_layers(loaded.layout.num_layers)  # type: ignore[union-attr]
        )
    else:
        layers = list(preset.layers)
    # An offloaded edited module is refused before the statistics pass, not after it.
    require_resident(loaded.layout, layers, edited_modules(method, loaded.layout))
    recipe = StatsRecipe.parse(
        preset.stats_pieces if stats_pieces is None else stats_pieces, stats_samples, stats_tokens
    )
    templates = parse_template_tokens(
        preset.template_tokens if template_tokens is None else template_tokens
    )
    tokens = None if stats_samples is not None else stats_tokens or preset.stats_tokens
    if needs_statistics(method):
        if not isinstance(corpus, Corpus):
            corpus = load_corpus(corpus, loaded, seed=seed)
        log(f"statistics: {corpus.description}")
        stats = layer_second_moments(
            loaded, layers, corpus, max_tokens=tokens, recipe=recipe, progress=progress
        )
        moments = {layer: m.moment for layer, m in stats.items()}
        corpus_header = {
            "corpus": corpus.description,
            "corpus_fingerprint": corpus.fingerprint,
            "stats_tokens": tokens,
            **recipe_header(recipe),
        }
    else:
        # The method never reads C0: no corpus pass, and a zero placeholder in the state.
        log(f"statistics: not needed by {spec.method}")
        # A method editing other modules than the MLP output (UltraEdit) takes none.
        other_modules = getattr(method, "modules", ("mlp_out",)) != ("mlp_out",)
        moments = {
            layer: torch.zeros(d, d, dtype=torch.float64)
            for layer in ([] if other_modules else layers)
            for d in [loaded.layout.key_dim(layer)]
        }
        corpus_header = {"corpus": None, "corpus_fingerprint": None, "stats_tokens": None}
    transform = None
    if spec.sphere:
        given = dict(spec.options)
        eta = given.get("eta", eta)
        alpha = given.get("alpha", alpha)
        transform = SphereProjection(
            eta=preset.sphere_eta() if eta is None else eta,
            alpha=preset.sphere_alpha(spec.method) if alpha is None else alpha,
            basis=given.get("basis", basis),  # type: ignore[arg-type]
        )
        if spec.variant != "project" or "last_alpha" in given:
            method, transform = sphere_variant(method, transform, spec, layers[-1]), None
    target = replace(VStarConfig(), **{**preset.target, **(target_overrides or {})})
    if precision is not None:
        chosen = resolve_precision(precision, input_device(loaded.model))
        target = replace(target, bf16=chosen == "bf16")
    session = EditSession(
        loaded,
        method,
        layers,
        moments,
        transform=transform,
        target=target,
        seed=seed,
        run_dir=run_dir,
        transform_order=transform_order,
        extra_header={
            "method_spec": str(spec),
            **preset.header(),
            **corpus_header,
            "template_tokens": templates,
        },
    )
    session.progress = progress
    session.template_tokens = templates
    return session


def recipe_header(recipe: StatsRecipe) -> dict[str, Any]:
    """The statistics recipe's journal-header fields (a journal without them, written
    before they were recorded, used the 256-token pieces: see ``Journal.verify``)."""
    header: dict[str, Any] = {"stats_pieces": recipe.pieces, "stats_samples": recipe.samples}
    if recipe.max_len is not None:
        header["stats_max_len"] = recipe.max_len
    return header


def sphere_variant(
    method: Any, projection: SphereProjection, spec: MethodSpec, last_layer: int
) -> SphereVariant:
    """``method`` wrapped with the SPHERE variant ``spec`` names (sphere/variants.py)."""
    given = dict(spec.options)
    budget = EnergyBudget(
        factor=given.get("budget_factor", 1.0),
        batches=given.get("budget_batches", 1),
        alpha_max=given.get("alpha_max", 1.0),
    )
    return SphereVariant(
        method,
        projection,
        mode=spec.variant,  # type: ignore[arg-type]
        last_alpha=given.get("last_alpha"),
        last_layer=last_layer,
        budget=budget,
        cap=NormCap(factor=given.get("cap_factor", 1.0)),
    )
