"""Causal tracing of the MLP states (ROME, Meng et al. 2022), to choose the layers to edit.

For a fact the model knows ("Vinson Massif is located in the continent of" -> " Antarctica"):

* the clean run records every layer's MLP output at every position and P(true first token);
* the corrupted runs add Gaussian noise to the embeddings of the subject tokens (``samples``
  draws, one row each, batched into one forward pass);
* each restored run is a corrupted run in which the clean MLP output of one layer (or of a
  window of consecutive layers centred on it) at one position is written back.

The indirect effect of (layer, position) is P(true | corrupted + restored) - P(true |
corrupted), averaged over the noise draws. Positions are summarised per fact as ROME does
(:data:`POSITION_GROUPS`) and the groups are averaged over facts.

Restoring at a position before the subject changes nothing (those states are clean in the
corrupted run too, the model being causal), so only positions from the first subject token
on are run. A restored run reuses the corrupted run's states below its lowest restored layer
instead of recomputing them.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..common.fileio import write_json
from ..editing.text import encode, pad_id_of, pad_left, target_token_ids
from ..model.arch import ModelLayout, get_module
from ..model.hooks import capture, edit_output, skipped_layers
from ..model.loading import LoadedModel
from ..model.placement import input_device, module_device

DATA_ENV = "SPHERE_EDIT_DATA"
KNOWNS_FILE = Path("knowns") / "known_1000.json"
POSITION_GROUPS: tuple[str, ...] = (
    "first subject token",
    "middle subject tokens",
    "last subject token",
    "first subsequent token",
    "further tokens",
    "last token",
)
LAST_SUBJECT = POSITION_GROUPS.index("last subject token")
VARIANTS: tuple[str, ...] = ("single", "window")


class TraceInputError(ValueError):
    """A facts file or a tracing setting is unusable; the message names the fix."""


@dataclass(frozen=True)
class KnownFact:
    """A prompt that contains ``subject`` and that the model should continue with
    ``attribute``."""

    subject: str
    prompt: str
    attribute: str


@dataclass(frozen=True)
class TraceConfig:
    """Settings of a trace.

    ``noise_factor`` scales the standard deviation of the embedding module's outputs
    over the whole vocabulary (for Gemma that includes its sqrt(d) scale) into the noise's.
    ``window`` is the number of consecutive layers restored together in the window variant
    and the width of the suggested layers. A fact is kept when its true first token is the
    clean run's top-1 next token with probability above ``min_prob``. ``bf16`` runs the
    passes under bfloat16 autocast (``--precision``); the probabilities are float32.
    """

    samples: int = 10
    noise_factor: float = 3.0
    window: int = 5
    min_prob: float = 0.1
    seed: int = 0
    n_facts: int | None = None
    rows_per_pass: int = 256
    bf16: bool = False

    def __post_init__(self) -> None:
        if self.samples < 1:
            raise TraceInputError(f"--samples: {self.samples} is below 1; give at least 1")
        if self.window < 1:
            raise TraceInputError(f"--window: {self.window} is below 1; give at least 1")
        if not 0.0 <= self.min_prob < 1.0:
            raise TraceInputError(f"--min-prob: {self.min_prob} is not in [0, 1); give e.g. 0.1")
        if self.noise_factor < 0:
            raise TraceInputError(f"--noise: {self.noise_factor} is negative; give e.g. 3")
        if self.n_facts is not None and self.n_facts < 1:
            raise TraceInputError(f"--n-facts: {self.n_facts} is below 1; give at least 1")
        if self.rows_per_pass < 1:
            raise TraceInputError("rows_per_pass must be at least 1")


# -- facts -----------------------------------------------------------------------------------


def default_facts_path() -> Path:
    """ROME's ``known_1000.json`` under ``$SPHERE_EDIT_DATA``."""
    root = os.environ.get(DATA_ENV)
    if not root:
        raise TraceInputError(
            f"--facts: none given and {DATA_ENV} is not set; set it to the data folder "
            f"(holding {KNOWNS_FILE}) or pass --facts FILE"
        )
    return Path(root) / KNOWNS_FILE


def load_facts(path: str | Path) -> list[KnownFact]:
    """Records with ``subject``, ``prompt`` and ``attribute`` from a JSON list or a JSONL
    file; other fields are ignored."""
    path = Path(path)
    if not path.is_file():
        raise TraceInputError(f"--facts: {path} does not exist; give a JSON or JSONL file")
    text = path.read_text(encoding="utf-8")
    try:
        if text.lstrip().startswith("["):
            records = json.loads(text)
        else:
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as error:
        raise TraceInputError(f"--facts: {path} is not JSON or JSONL ({error})") from None
    facts = []
    for i, record in enumerate(records):
        missing = [k for k in ("subject", "prompt", "attribute") if not isinstance(record, dict)
                   or not isinstance(record.get(k), str) or not record[k].strip()]  # fmt: skip
        if missing:
            raise TraceInputError(
                f"--facts: record {i} of {path} lacks {', '.join(missing)}; every record needs "
                "non-empty strings subject, prompt and attribute"
            )
        if record["subject"] not in record["prompt"]:
            raise TraceInputError(
                f"--facts: record {i} of {path}: the prompt does not contain the subject "
                f"{record['subject']!r}; write the subject into the prompt"
            )
        facts.append(KnownFact(record["subject"], record["prompt"], record["attribute"]))
    if not facts:
        raise TraceInputError(f"--facts: {path} holds no records")
    return facts


@dataclass(frozen=True)
class FactTokens:
    """A fact's prompt ids, its subject's tokens ``[start, stop)`` and the true first token."""

    ids: tuple[int, ...]
    subject: tuple[int, int]
    target: int


def subject_span(tokenizer: Any, text: str, start: int, stop: int) -> tuple[int, int]:
    """Indices ``[first, last + 1)`` of the tokens overlapping characters ``[start, stop)``."""
    if tokenizer.is_fast:
        enc = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
        inside = [i for i, (a, b) in enumerate(enc["offset_mapping"])
                  if b > a and a < stop and b > start]  # fmt: skip
        if inside:
            return inside[0], inside[-1] + 1
    first = len(encode(tokenizer, text[:start])) if start else len(encode(tokenizer, ""))
    return first, max(first + 1, len(encode(tokenizer, text[:stop])))


def fact_tokens(tokenizer: Any, fact: KnownFact) -> FactTokens:
    start = fact.prompt.index(fact.subject)
    span = subject_span(tokenizer, fact.prompt, start, start + len(fact.subject))
    target = target_token_ids(tokenizer, fact.prompt, fact.attribute, field="attribute")[0]
    return FactTokens(tuple(encode(tokenizer, fact.prompt)), span, target)


# -- runs ------------------------------------------------------------------------------------


def embedding_noise_std(model: nn.Module) -> float:
    """Standard deviation of the input embedding module's outputs over the vocabulary."""
    embed = model.get_input_embeddings()
    vocab = embed.weight.shape[0]
    device = module_device(embed)
    total, squares, count = 0.0, 0.0, 0
    with torch.inference_mode():
        for begin in range(0, vocab, 8192):
            ids = torch.arange(begin, min(begin + 8192, vocab), device=device)
            values = embed(ids.unsqueeze(0)).double()
            total += float(values.sum())
            squares += float((values * values).sum())
            count += values.numel()
    mean = total / count
    return math.sqrt(max(squares / count - mean * mean, 0.0) * count / max(count - 1, 1))


def subject_noise(samples: int, n_tokens: int, dim: int, std: float, seed: int) -> torch.Tensor:
    """``(samples, n_tokens, dim)`` Gaussian noise of standard deviation ``std``, the same
    for the same seed (drawn on the CPU, so on every device)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(samples, n_tokens, dim, generator=generator) * std


@dataclass
class _Resume:
    """Start a run at decoder layer ``first``: the layers below pass, and the last of them
    returns ``hidden`` (the corrupted run's states) in the structure of ``output``."""

    first: int
    output: Any
    hidden: torch.Tensor


def traced_probs(
    model: nn.Module,
    tokens: FactTokens,
    *,
    rows: int = 1,
    noise: torch.Tensor | None = None,
    modules: Sequence[nn.Module] = (),
    clean: Sequence[torch.Tensor] = (),
    restore: Sequence[torch.Tensor | None] = (),
    resume: _Resume | None = None,
    bf16: bool = False,
) -> torch.Tensor:
    """P(true first token) of ``rows`` runs of one prompt, as a float32 ``(rows,)`` tensor.

    ``noise`` ``(rows, n_subject, dim)`` is added to the subject tokens' embeddings.
    ``restore[m]`` ``(rows, T)`` (bool, or None for none) says where the output of
    ``modules[m]`` is replaced by the clean one, ``clean[m]`` ``(T, dim)``.
    """
    device = input_device(model)
    ids = torch.tensor(tokens.ids, device=device).unsqueeze(0).expand(rows, -1)
    start, stop = tokens.subject
    with ExitStack() as stack, torch.inference_mode():
        stack.enter_context(torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16))
        if noise is not None:
            added = noise.to(device)

            def corrupt(embeds: torch.Tensor) -> torch.Tensor:
                embeds = embeds.clone()
                embeds[:, start:stop] += added.to(embeds.dtype)
                return embeds

            stack.enter_context(edit_output(model.get_input_embeddings(), corrupt))
        for module, state, where in zip(modules, clean, restore, strict=True):
            if where is None or not bool(where.any()):
                continue
            # The restorer runs on the module's output, on the module's device.
            at = module_device(module)
            stack.enter_context(edit_output(module, _restorer(state.to(at), where.to(at))))
        if resume is not None and resume.first > 0:
            container = get_module(model, ModelLayout.of(model).spec.layers)
            stack.enter_context(
                skipped_layers(container, resume.first, resume.output, resume.hidden.to(device))
            )
        logits = model(input_ids=ids, use_cache=False, logits_to_keep=1).logits[:, -1]
    return logits.float().softmax(-1)[:, tokens.target].cpu()


def _restorer(state: torch.Tensor, where: torch.Tensor):
    def restore(output: torch.Tensor) -> torch.Tensor:
        return torch.where(where.unsqueeze(-1), state.to(output.dtype).unsqueeze(0), output)

    return restore


@dataclass
class FactTrace:
    """One fact's trace: indirect effects ``(layers, T)`` per variant (zero before the
    subject, where restoring changes nothing)."""

    tokens: FactTokens
    clean_prob: float
    corrupted_prob: float
    effects: dict[str, torch.Tensor]


def restored_layers(layer: int, window: int, n_layers: int) -> list[int]:
    """The window of ``window`` consecutive layers centred on ``layer`` (ROME's rule: from
    ``layer - window // 2``), clipped to the model."""
    low = layer - window // 2
    return list(range(max(0, low), min(n_layers, low + window)))


class Tracer:
    """Causal tracing of one model's MLP outputs (the edited projection's output)."""

    def __init__(self, loaded: LoadedModel, config: TraceConfig) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.config = config
        self.layout = loaded.layout
        self.n_layers = self.layout.num_layers
        self.mlps = [self.layout.mlp_out(i) for i in range(self.n_layers)]
        self.layers = [self.layout.layer(i) for i in range(self.n_layers)]
        self.embedding_std = embedding_noise_std(self.model)
        self.noise_std = config.noise_factor * self.embedding_std

    def known(self, facts: Sequence[KnownFact], *, batch: int = 16) -> tuple[list[FactTokens], int]:
        """The facts the model knows, in order, up to ``n_facts`` of them, and how many
        facts were checked to find them."""
        kept: list[FactTokens] = []
        checked = 0
        device = input_device(self.model)
        limit = self.config.n_facts or len(facts)
        for begin in range(0, len(facts), batch):
            chunk = [fact_tokens(self.tokenizer, f) for f in facts[begin : begin + batch]]
            inputs = pad_left([c.ids for c in chunk], [0] * len(chunk),
                              pad_id_of(self.tokenizer), device)  # fmt: skip
            with (
                torch.inference_mode(),
                torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.config.bf16),
            ):
                logits = self.model(**inputs.model_inputs(), use_cache=False, logits_to_keep=1)
            probs = logits.logits[:, -1].float().softmax(-1)
            for row, tokens in enumerate(chunk):
                checked += 1
                p = float(probs[row, tokens.target])
                if int(probs[row].argmax()) == tokens.target and p > self.config.min_prob:
                    kept.append(tokens)
                    if len(kept) == limit:
                        return kept, checked
        return kept, checked

    def trace(self, tokens: FactTokens, seed: int) -> FactTrace:
        n, length = self.config.samples, len(tokens.ids)
        with ExitStack() as stack:
            seen = [stack.enter_context(capture(m)) for m in self.mlps]
            clean_prob = float(traced_probs(self.model, tokens, bf16=self.config.bf16)[0])
        clean = [s.output[0].detach() for s in seen]
        start, stop = tokens.subject
        noise = subject_noise(n, stop - start, clean[0].shape[-1], self.noise_std, seed)
        with ExitStack() as stack:
            below = [stack.enter_context(capture(layer)) for layer in self.layers]
            corrupted = traced_probs(self.model, tokens, rows=n, noise=noise, bf16=self.config.bf16)
        outputs = [(b.raw_output, b.output.detach()) for b in below]
        corrupted_prob = float(corrupted.mean())
        effects = {}
        for variant in VARIANTS:
            width = 1 if variant == "single" else self.config.window
            table = torch.zeros(self.n_layers, length)
            groups: dict[int, list[int]] = {}
            for layer in range(self.n_layers):
                groups.setdefault(restored_layers(layer, width, self.n_layers)[0], []).append(layer)
            for first, centres in groups.items():
                jobs = [(c, p) for c in centres for p in range(start, length)]
                probs = self._restored(tokens, noise, clean, outputs, first, jobs, width)
                for (centre, position), p in zip(jobs, probs, strict=True):
                    table[centre, position] = p - corrupted_prob
            effects[variant] = table
        return FactTrace(tokens, clean_prob, corrupted_prob, effects)

    def _restored(self, tokens, noise, clean, outputs, first, jobs, width) -> list[float]:
        """Mean P(true) over the noise draws of each (centre layer, position) job, all of
        whose restored layers start at ``first``."""
        n, length = noise.shape[0], len(tokens.ids)
        per_pass = max(1, self.config.rows_per_pass // n)
        means: list[float] = []
        for begin in range(0, len(jobs), per_pass):
            part = jobs[begin : begin + per_pass]
            rows = len(part) * n
            restore = [torch.zeros(rows, length, dtype=torch.bool) for _ in self.mlps]
            for j, (centre, position) in enumerate(part):
                for layer in restored_layers(centre, width, self.n_layers):
                    restore[layer][j * n : (j + 1) * n, position] = True
            resume = None
            if first > 0:
                raw, hidden = outputs[first - 1]
                resume = _Resume(first, raw, hidden.repeat(len(part), 1, 1))
            probs = traced_probs(
                self.model, tokens, rows=rows, noise=noise.repeat(len(part), 1, 1),
                modules=self.mlps, clean=clean, restore=restore, resume=resume,
                bf16=self.config.bf16,
            )  # fmt: skip
            means.extend(float(x) for x in probs.view(len(part), n).mean(1))
        return means


# -- summaries -------------------------------------------------------------------------------


def position_groups(subject: tuple[int, int], length: int) -> list[list[int]]:
    """The positions of each of :data:`POSITION_GROUPS` in a prompt of ``length`` tokens
    (a group can be empty: no middle for a subject of one or two tokens, no subsequent
    token when the subject ends the prompt)."""
    start, stop = subject
    last = length - 1
    after = list(range(stop, last))
    return [
        [start],
        list(range(start + 1, stop - 1)),
        [stop - 1],
        after[:1],
        after[1:],
        [last],
    ]


def summarise(traces: Sequence[FactTrace], n_layers: int) -> dict[str, Any]:
    """Average indirect effect per (position group, layer) and variant over the facts that
    have positions in that group, with those counts."""
    tables: dict[str, list[list[float | None]]] = {}
    counts = [0] * len(POSITION_GROUPS)
    for variant in VARIANTS:
        sums = torch.zeros(len(POSITION_GROUPS), n_layers, dtype=torch.float64)
        counts = [0] * len(POSITION_GROUPS)
        for trace in traces:
            groups = position_groups(trace.tokens.subject, len(trace.tokens.ids))
            for g, positions in enumerate(groups):
                if positions:
                    sums[g] += trace.effects[variant][:, positions].double().mean(1)
                    counts[g] += 1
        tables[variant] = [
            [float(v) / counts[g] for v in sums[g]] if counts[g] else [None] * n_layers
            for g in range(len(POSITION_GROUPS))
        ]
    return {"tables": tables, "group_counts": dict(zip(POSITION_GROUPS, counts, strict=True))}


def suggest_window(window_curve: Sequence[float], width: int) -> list[int]:
    """The ``width`` consecutive layers whose joint restoration (the window variant, at the
    last subject token) has the largest average indirect effect; only windows that fit
    inside the model are candidates, the lowest on ties."""
    n = len(window_curve)
    if width >= n:
        return list(range(n))
    centres = range(width // 2, n - (width - 1 - width // 2))
    best = max(centres, key=lambda c: (window_curve[c], -c))
    return restored_layers(best, width, n)


# -- the whole trace -------------------------------------------------------------------------


def run_trace(
    loaded: LoadedModel,
    facts: Sequence[KnownFact],
    config: TraceConfig,
    out: str | Path,
    *,
    facts_source: str = "",
    progress: bool = True,
) -> dict[str, Any]:
    """Trace the known facts among ``facts`` and write ``trace.json`` and ``trace.png``
    into ``out``; returns what ``trace.json`` holds."""
    out = Path(out)
    tracer = Tracer(loaded, config)
    kept, checked = tracer.known(facts)
    if not kept:
        raise TraceInputError(
            f"--facts: the model knows none of the {checked} facts checked (top-1 true first "
            f"token with P > {config.min_prob}); lower --min-prob or give other facts"
        )
    traces = []
    bar = tqdm(kept, desc="tracing", unit="fact", disable=not progress)
    for i, tokens in enumerate(bar):
        traces.append(tracer.trace(tokens, seed=config.seed + i))
    summary = summarise(traces, tracer.n_layers)
    tables = summary["tables"]
    suggestion = suggest_window(tables["window"][LAST_SUBJECT], config.window)
    result = {
        "model": loaded.name,
        "n_layers": tracer.n_layers,
        "module": loaded.layout.spec.layer_mlp_out,
        "settings": {
            **asdict(config),
            "facts": facts_source,
            "embedding_std": tracer.embedding_std,
            "noise_std": tracer.noise_std,
            "noise_std_rule": "noise_factor x std of the embedding module's outputs over "
            "the whole vocabulary",
        },
        "counts": {
            "facts_read": len(facts),
            "facts_checked": checked,
            "facts_known": len(kept),
            "facts_traced": len(traces),
            "facts_per_position_group": summary["group_counts"],
        },
        "mean_clean_prob": sum(t.clean_prob for t in traces) / len(traces),
        "mean_corrupted_prob": sum(t.corrupted_prob for t in traces) / len(traces),
        "last_subject_token": {v: tables[v][LAST_SUBJECT] for v in VARIANTS},
        "position_groups": list(POSITION_GROUPS),
        "tables": tables,
        "suggested_layers": suggestion,
        "suggestion_rule": f"the {config.window} consecutive layers whose joint restoration "
        "(window variant) at the last subject token has the largest average indirect effect",
    }
    write_json(out / "trace.json", result)
    plot_trace(result, out / "trace.png")
    return result


def plot_trace(result: dict[str, Any], path: str | Path) -> None:
    """ROME-style heatmaps (position groups × layers, colour = average indirect effect):
    one panel for single layers restored, one for windows; the suggested layers boxed."""
    from ..bench.figures import new_figure, save_png

    n_layers = result["n_layers"]
    window = result["settings"]["window"]
    tables = result["tables"]
    values = [v for variant in VARIANTS for row in tables[variant] for v in row if v is not None]
    top = max([1e-6, *values])
    figure = new_figure(max(8.0, 0.32 * n_layers * 2 + 4), 3.4)
    axes = figure.subplots(1, 2, sharey=True)
    titles = {"single": "one MLP layer restored", "window": f"{window} MLP layers restored"}
    for ax, variant in zip(axes, VARIANTS, strict=True):
        grid = [[math.nan if v is None else v for v in row] for row in tables[variant]]
        image = ax.imshow(grid, cmap="Greens", vmin=0.0, vmax=top, aspect="auto",
                          interpolation="nearest")  # fmt: skip
        ax.set_title(titles[variant], fontsize=10)
        ax.set_xlabel("layer (centre of the restored window)" if variant == "window" else "layer")
        ax.set_xticks(range(0, n_layers, max(1, n_layers // 10)))
        ax.set_yticks(range(len(POSITION_GROUPS)))
        ax.set_yticklabels(POSITION_GROUPS, fontsize=8)
        if variant == "window":
            low, high = result["suggested_layers"][0], result["suggested_layers"][-1]
            ax.add_patch(_box(low - 0.5, LAST_SUBJECT - 0.5, high - low + 1, 1.0))
    figure.colorbar(image, ax=list(axes), label="average indirect effect")
    n = result["counts"]["facts_traced"]
    figure.suptitle(f"Causal trace of {result['model']}: {n} known facts", fontsize=11)
    save_png(figure, path)


def _box(x: float, y: float, width: float, height: float):
    from matplotlib.patches import Rectangle

    return Rectangle((x, y), width, height, fill=False, edgecolor="crimson", linewidth=1.5)
