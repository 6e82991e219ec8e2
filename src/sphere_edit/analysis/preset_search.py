"""A preset for a new model, written from measurements (``sphere-edit preset``).

Three steps, each small enough for a CPU:

1. Causal tracing (:mod:`.tracing`) of a few known facts suggests a window of layers.
2. The v* learning rate of each candidate window follows the size of one coordinate of
   the model's residual at the window's last layer (:func:`scaled_lr`): v* adds ``delta``
   to that hidden state and Adam moves each coordinate by about ``lr`` per step, so
   ``lr · steps`` is kept the same fraction of that size as in SmolLM2's preset (lr 0.5,
   25 steps, :data:`REFERENCE_SIZES` at its last edited layer 11). The size is the median
   |coordinate| (``lr_rule="median"``, default) or the root mean square (``"rms"``, the
   first rule): a few massive coordinates (Gemma-3's reach thousands) inflate the RMS
   without making the other coordinates any larger. With ``lr_scales`` the sweep also
   tries that lr times each factor.
3. A sweep over windows (the suggestion and its neighbours shifted by ±step, ±2·step, ...) and
   MEMIT's λ (``mom2_weight``): one batch of CounterFact cases per candidate on the base
   model, scored by efficacy, then paraphrase (generalization), then specificity. The v*
   of a window is computed once and shared by its λ values (the targets do not depend on
   λ; :meth:`EditSession.apply` takes them as ``precomputed_vstar``).

The written preset holds the chosen values, the model's identity, and a ``measurements``
section with the trace's suggestion and every candidate's numbers.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..editing.presets import Preset, model_identity, preset_to_data
from ..model.loading import LoadedModel
from ..model.placement import input_device

# SmolLM2-135M's preset, the reference of the lr rule: v* lr, Adam steps, and the size of
# one coordinate of the hidden state after its last edited layer (11) at the last subject
# token of the first 24 CounterFact train cases (:func:`coordinate_size` under each rule;
# the mean norm there is 154.28).
REFERENCE_LR = 0.5
REFERENCE_STEPS = 25
REFERENCE_MODEL = "smollm2-135m"
REFERENCE_SIZES = {"median": 2.0218, "rms": 154.28 / 576**0.5}
LR_RULES = tuple(REFERENCE_SIZES)


@dataclass(frozen=True)
class SearchConfig:
    """Settings of the search: ``n_facts`` traced facts (``samples`` noise draws each),
    ``window`` layers per candidate, ``windows`` candidate windows ``window_step`` layers
    apart, ``lr_scales`` factors on each window's v* lr, ``cases`` CounterFact
    cases from ``offset`` in one batch per candidate, ``mom2_weights`` MEMIT's λ values,
    ``stats_tokens`` corpus tokens for C0 during the sweep, ``steps`` v* steps, ``min_prob``
    the tracer's threshold for a known fact, ``precision`` the trace's and the v* and key
    passes' arithmetic (resolved: "fp32" or "bf16"), ``lr_rule`` how the size of a
    residual coordinate is read (:data:`LR_RULES`)."""

    n_facts: int = 8
    samples: int = 3
    window: int = 5
    windows: int = 3
    window_step: int = 2
    lr_scales: tuple[float, ...] = (1.0,)
    cases: int = 24
    offset: int = 0
    mom2_weights: tuple[float, ...] = (1000.0, 5000.0, 15000.0)
    stats_tokens: int = 30_000
    steps: int = REFERENCE_STEPS
    seed: int = 0
    min_prob: float = 0.1
    precision: str = "fp32"
    lr_rule: str = "median"

    def __post_init__(self) -> None:
        for name in ("n_facts", "samples", "window", "windows", "window_step", "cases", "steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')}: must be at least 1")
        if self.offset < 0:
            raise ValueError("--offset: must be >= 0")
        if not self.lr_scales or any(f <= 0 for f in self.lr_scales):
            raise ValueError("--lr-scales: give one or more factors > 0, e.g. 1,0.25")
        if not self.mom2_weights or any(w < 0 for w in self.mom2_weights):
            raise ValueError("--mom2-weights: give one or more values >= 0, e.g. 1000,5000")
        if self.stats_tokens < 1000:
            raise ValueError("--stats-tokens: must be at least 1000")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"--precision: {self.precision!r} is not fp32 or bf16")
        if self.lr_rule not in LR_RULES:
            raise ValueError(f"--lr-rule: {self.lr_rule!r} is not one of {', '.join(LR_RULES)}")


def candidate_windows(
    suggested: Sequence[int], count: int, n_layers: int, step: int = 2
) -> list[list[int]]:
    """The suggested window, then it shifted by -step, +step, -2·step, +2·step, ... (kept
    inside the model), without repeats, at most ``count`` of them."""
    width = len(suggested)
    start = suggested[0]
    windows: list[list[int]] = []
    shift = 0
    while len(windows) < count and shift <= n_layers:
        for signed in (0,) if shift == 0 else (-shift, shift):
            first = min(max(0, start + signed), n_layers - width)
            window = list(range(first, first + width))
            if window not in windows and len(windows) < count:
                windows.append(window)
        shift += step
    return windows


def subject_last_states(
    loaded: LoadedModel, prompts: Sequence[tuple[str, str]], layer: int
) -> torch.Tensor:
    """The hidden state after decoder layer ``layer`` at the last subject token of each
    ``(prompt, subject)`` (the prompt holds ``{}``), as rows."""
    tokenizer, model = loaded.tokenizer, loaded.model
    device = input_device(model)
    rows = []
    for prompt, subject in prompts:
        head = prompt.partition("{}")[0] + subject
        text = prompt.replace("{}", subject)
        ids = tokenizer(text, return_tensors="pt")["input_ids"].to(device)
        position = len(tokenizer(head)["input_ids"]) - 1
        with torch.no_grad():
            hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
        # hidden_states[0] is the embedding output: layer i's output is entry i + 1.
        rows.append(hidden[layer + 1][0, min(position, ids.shape[1] - 1)].float().cpu())
    return torch.stack(rows)


def coordinate_size(states: torch.Tensor, rule: str) -> float:
    """The size of one coordinate of the rows of ``states`` (hidden states), averaged over
    rows: the median |coordinate| (torch's median, the lower middle value) under
    ``"median"``, the norm over √hidden under ``"rms"``."""
    if rule == "median":
        return float(states.abs().median(dim=1).values.mean())
    if rule == "rms":
        return float(states.norm(dim=1).mean()) / states.shape[1] ** 0.5
    raise ValueError(f"lr rule {rule!r} is not one of {', '.join(LR_RULES)}")


def scaled_lr(size: float, steps: int, rule: str) -> float:
    """The v* lr for which ``lr · steps / size`` equals SmolLM2's ``0.5 · 25 /
    REFERENCE_SIZES[rule]``; ``size`` is :func:`coordinate_size` under ``rule``."""
    return REFERENCE_LR * REFERENCE_STEPS / REFERENCE_SIZES[rule] * size / steps


def rank_key(metrics: dict[str, Any]) -> tuple[float, float, float]:
    """Efficacy, then generalization (paraphrase), then specificity: larger is better."""
    return tuple(
        float(metrics.get(k) or 0.0) for k in ("efficacy", "generalization", "specificity")
    )  # type: ignore[return-value]


def search_preset(
    loaded: LoadedModel,
    facts: Sequence[Any],
    cases: Sequence[Any],
    config: SearchConfig,
    out: str | Path,
    *,
    corpus: str | None = None,
    facts_source: str = "",
    dataset_source: str = "",
    progress: bool = True,
    log: Callable[[str], Any] = print,
) -> dict[str, Any]:
    """Trace, sweep and write the preset file ``out`` (its trace next to it, in
    ``<out stem>-trace/``); returns what the file holds."""
    from ..editing.build import build_session
    from ..editing.presets import check_preset_data
    from ..editing.runs import restore_weights, snapshot_weights
    from ..editing.stats import load_corpus
    from ..evaluation.metrics import aggregate, evaluate_cases
    from .tracing import TraceConfig, run_trace

    out = Path(out)
    n_layers = loaded.layout.num_layers
    window = min(config.window, n_layers)
    trace_config = TraceConfig(samples=config.samples, window=window, seed=config.seed,
                               n_facts=config.n_facts, min_prob=config.min_prob,
                               bf16=config.precision == "bf16")  # fmt: skip
    started = time.perf_counter()
    trace = run_trace(loaded, facts, trace_config, out.parent / f"{out.stem}-trace",
                      facts_source=facts_source, progress=progress)  # fmt: skip
    suggested = list(trace["suggested_layers"])
    traced = trace["counts"]["facts_traced"]
    log(f"trace: suggested layers {suggested[0]}-{suggested[-1]} ({traced} facts, "
        f"{time.perf_counter() - started:.0f}s)")  # fmt: skip
    windows = candidate_windows(suggested, config.windows, n_layers, config.window_step)
    requests = [case.request for case in cases]
    subject_prompts = [(r.prompt, r.subject) for r in requests]
    source = load_corpus(corpus, loaded, seed=config.seed)
    base = snapshot_weights(loaded, range(n_layers))
    candidates: list[dict[str, Any]] = []
    total = len(windows) * len(config.lr_scales) * len(config.mom2_weights)
    for layers in windows:
        states = subject_last_states(loaded, subject_prompts, layers[-1])
        sizes = {rule: coordinate_size(states, rule) for rule in LR_RULES}
        for scale in config.lr_scales:
            lr = scale * scaled_lr(sizes[config.lr_rule], config.steps, config.lr_rule)
            shared = None
            for weight in config.mom2_weights:
                clock = time.perf_counter()
                preset = Preset(name="search", models=(), layers=tuple(layers),
                                target={"lr": lr, "steps": config.steps},
                                methods={"memit": {"mom2_weight": weight}})  # fmt: skip
                session = build_session(
                    loaded, "memit", preset=preset, corpus=source, stats_tokens=config.stats_tokens,
                    seed=config.seed, progress=progress, log=lambda _line: None,
                    precision=config.precision,
                )  # fmt: skip
                try:
                    result = session.apply(requests, precomputed_vstar=shared)
                    shared = result.vstar
                    metrics = aggregate(evaluate_cases(loaded.model, loaded.tokenizer, cases))
                finally:
                    restore_weights(loaded, base)
                losses = [x for x in result.target_loss if x is not None]
                candidate = {
                    "layers": layers,
                    "lr": lr,
                    "lr_scale": scale,
                    "residual_norm": float(states.norm(dim=1).mean()),
                    "coordinate_size": sizes,
                    "mom2_weight": weight,
                    "efficacy": metrics.get("efficacy"),
                    "generalization": metrics.get("generalization"),
                    "specificity": metrics.get("specificity"),
                    "mean_vstar_loss": sum(losses) / len(losses) if losses else None,
                    "seconds": time.perf_counter() - clock,
                }
                candidates.append(candidate)
                log(f"candidate {len(candidates)}/{total}: layers {layers[0]}-{layers[-1]}, "
                    f"lr {lr:.3g}, mom2_weight {weight:g}: efficacy {_fmt(candidate['efficacy'])}, "
                    f"paraphrase {_fmt(candidate['generalization'])}, specificity "
                    f"{_fmt(candidate['specificity'])} ({candidate['seconds']:.0f}s)")  # fmt: skip
    best = max(candidates, key=rank_key)  # the first of equals: the suggestion wins ties
    data = _preset_data(loaded, best, config)
    data["notes"] = (
        f"sphere-edit preset {loaded.name}: traced {trace['counts']['facts_traced']} facts "
        f"(window of {window}), swept {len(windows)} windows {config.window_step} layers apart "
        f"x lr factors {','.join(f'{f:g}' for f in config.lr_scales)} on the "
        f"{config.lr_rule} rule lr x mom2_weight "
        f"{','.join(f'{w:g}' for w in config.mom2_weights)} on {len(cases)} cases; chosen by "
        "efficacy, then paraphrase, then specificity"
    )
    data["measurements"] = {
        "trace": {
            "suggested_layers": suggested,
            "suggestion_rule": trace["suggestion_rule"],
            "facts_traced": trace["counts"]["facts_traced"],
            "facts": facts_source,
            "window_curve": trace["last_subject_token"]["window"],
        },
        "lr_rule": (
            f"lr = {REFERENCE_LR} * {REFERENCE_STEPS} / {REFERENCE_SIZES[config.lr_rule]:.4g} * "
            f"size / steps, size = {_RULE_TEXT[config.lr_rule]} of the hidden state after the "
            "last edited layer at the last subject token (mean over the sweep's cases): lr * "
            f"steps is the fraction of one coordinate's size that {REFERENCE_MODEL}'s preset "
            "uses"
        ),
        "sweep": {
            "method": "memit",
            "dataset": dataset_source,
            "cases": len(cases),
            "offset": config.offset,
            "stats_tokens": config.stats_tokens,
            "steps": config.steps,
            "window_step": config.window_step,
            "lr_scales": list(config.lr_scales),
            "ranking": "efficacy, then generalization (paraphrase), then specificity",
        },
        "candidates": candidates,
        "chosen": {k: best[k] for k in ("layers", "lr", "mom2_weight")},
        "seconds": time.perf_counter() - started,
    }
    check_preset_data(str(out), data)  # what --preset will read back
    from ..common.fileio import write_json

    write_json(out, data)
    return data


_RULE_TEXT = {"median": "the median |coordinate|", "rms": "the norm over sqrt(hidden)"}


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _preset_data(loaded: LoadedModel, best: dict[str, Any], config: SearchConfig) -> dict:
    """The preset file for the chosen candidate; the one-layer methods edit the middle of
    its window, the other sections keep the shipped presets' values."""
    layers = best["layers"]
    middle = layers[len(layers) // 2]
    preset = Preset(
        name=loaded.name,
        models=(loaded.name,),
        identity=model_identity(loaded.model.config),
        layers=tuple(layers),
        target={"lr": best["lr"], "steps": config.steps},
        methods={
            "memit": {"mom2_weight": best["mom2_weight"]},
            "alphaedit": {"nullspace_threshold": 0.02, "l2": 10},
            "ft": {"layer": middle, "epsilon": 0.002, "lr": 0.0005, "steps": 25},
            "rome": {"layer": middle},
        },
        sphere={"eta": 0.5, "alpha_alphaedit": 0.5, "alpha_other": 0.8},
    )
    return preset_to_data(preset)
