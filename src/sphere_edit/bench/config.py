"""The benchmark's settings: :class:`BenchConfig`, its validation and the edit counts
at which a run evaluates, with the case order's parser and the settings the pre-edit
evaluation depends on. :mod:`.runner` runs a benchmark from them (and re-exports them).
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..common.settings import first_difference
from ..editing.build import MethodSpec
from ..editing.sampling import parse_template_tokens
from ..editing.stats import StatsRecipe
from ..evaluation.data import EditCase
from ..sphere.warning import DEFAULT_K
from .rundir import BenchRunDir

# The settings the pre-edit evaluation depends on (a run may reuse another run's pre-edit
# results when all of them agree, see ``Benchmark(pre_edit_from=...)``).
PRE_EDIT_SETTINGS = (
    "dataset", "n_edits", "offset", "seed", "fluency_cases", "general_every",
    "general_data", "general_items", "skip_invalid", "eval_batch_size",
    "case_order", "general_tasks",
)  # fmt: skip
# Settings that watch a run without changing its edits: a resumed run may change them.
WATCH_SETTINGS = ("he_warning",)


# What a batch with two cases of one prompt and subject does (BenchConfig.repeats).
REPEATS = ("refuse", "edit")


@dataclass(frozen=True)
class BenchConfig:
    """The settings of one benchmark run, checked when made: each error names the field
    and what it takes."""

    model: str = "smollm2-135m"
    methods: tuple[str, ...] = ("memit", "alphaedit", "alphaedit+sphere")
    dataset: str = "counterfact"
    n_edits: int = 1000
    batch_size: int = 100
    checkpoint_every: int | None = None  # None: only the final evaluation
    seed: int = 0
    offset: int = 0
    layers: tuple[int, ...] | None = None
    corpus: str | None = None
    stats_tokens: int | None = None
    # The statistics' and templates' recipes (build_session): "whole" or "256" pieces, a
    # sample count instead of stats_tokens, "authors" or 10 new template tokens.
    stats_pieces: str = "whole"
    stats_samples: int | None = None
    template_tokens: str | int = "authors"
    fluency_cases: int = 0  # generations (fluency, consistency) for the first K cases
    general_every: int | None = None  # general abilities every K edits (and pre-edit)
    general_data: str | None = None
    general_items: int = 200
    skip_invalid: bool = False
    eval_batch_size: int = 64
    # v* memory cap (VStarConfig.positions_per_pass): None the default, 0 no cap.
    positions_per_pass: int | None = None
    # None: the data set's order; "shuffle:SEED": a seeded shuffle of the selected cases.
    case_order: str | None = None
    # The HE early warning's k (sphere.warning.EnergyWarning); 0: off. One of
    # WATCH_SETTINGS: a resumed run may change it.
    he_warning: float = DEFAULT_K
    general_tasks: tuple[str, ...] | None = None  # None: every general-abilities task
    # Where MEMIT's schedule applies SPHERE and RECT's mask: None each method's default.
    transform_order: str | None = None
    # A preset file (--preset); None: the model's shipped preset.
    preset: str | None = None
    # The v* and key passes' arithmetic, resolved ("fp32" or "bf16", never "auto"): a run
    # resumed on another machine continues in the precision it began with.
    precision: str = "fp32"
    # A batch holding two cases of one prompt and subject: "refuse" stops the run before
    # any work; "edit" edits both, as the authors' code does (CounterFact has such pairs).
    repeats: str = "refuse"

    def __post_init__(self) -> None:
        if not self.methods:
            raise ValueError("methods: give at least one method, e.g. memit,alphaedit+sphere")
        for spec in self.methods:
            MethodSpec.parse(spec)
        if self.n_edits < 1:
            raise ValueError(f"n_edits: must be at least 1, got {self.n_edits}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size: must be at least 1, got {self.batch_size}")
        for name in ("checkpoint_every", "general_every"):
            every = getattr(self, name)
            if every is not None and (every < 1 or every % self.batch_size):
                raise ValueError(
                    f"{name}: must be a positive multiple of the batch size "
                    f"({self.batch_size}), got {every}"
                )
        if self.offset < 0:
            raise ValueError(f"offset: must be >= 0, got {self.offset}")
        if self.fluency_cases < 0:
            raise ValueError(f"fluency_cases: must be >= 0, got {self.fluency_cases}")
        if len(set(self.methods)) != len(self.methods):
            raise ValueError("methods: a method is listed twice")
        StatsRecipe.parse(self.stats_pieces, self.stats_samples, self.stats_tokens)
        parse_template_tokens(self.template_tokens)
        order_seed(self.case_order)
        if not isinstance(self.he_warning, (int, float)) or not self.he_warning >= 0:
            raise ValueError(
                f"he_warning: must be 0 (off) or positive, got {self.he_warning}; "
                f"e.g. {DEFAULT_K:g}"
            )
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(
                f"precision: must be 'fp32' or 'bf16' (auto is resolved before), "
                f"got {self.precision!r}"
            )
        if self.repeats not in REPEATS:
            raise ValueError(f"repeats: must be one of {', '.join(REPEATS)}, got {self.repeats!r}")
        if self.transform_order not in (None, "inside", "after"):
            raise ValueError(
                f"transform_order: must be 'inside' or 'after', got {self.transform_order!r}"
            )

    def checkpoints(self) -> list[int]:
        """Numbers of edits after which the cases edited so far are evaluated."""
        ends = list(range(self.batch_size, self.n_edits, self.batch_size)) + [self.n_edits]
        if self.checkpoint_every is None:
            return [self.n_edits]
        marks = [e for e in ends if e % self.checkpoint_every == 0]
        return sorted(set(marks) | {self.n_edits})

    def general_marks(self) -> list[int]:
        """Numbers of edits after which the general abilities are evaluated."""
        if self.general_every is None:
            return []
        ends = list(range(self.batch_size, self.n_edits, self.batch_size)) + [self.n_edits]
        return sorted({e for e in ends if e % self.general_every == 0} | {self.n_edits})


def order_seed(case_order: str | None) -> int | None:
    """The seed of a ``shuffle:SEED`` case order; None for the data set's order."""
    if case_order is None or case_order == "file":
        return None
    kind, _, seed = case_order.partition(":")
    if kind != "shuffle" or not seed.strip().lstrip("-").isdigit():
        raise ValueError(
            f"case_order: {case_order!r} is not an order; give 'file' or 'shuffle:SEED', "
            "e.g. shuffle:1"
        )
    return int(seed)


def order_cases(cases: list[EditCase], case_order: str | None) -> list[EditCase]:
    """``cases`` in the configured order: as given, or shuffled by a generator seeded
    with the order's seed (the same seed gives the same order on every machine)."""
    seed = order_seed(case_order)
    if seed is None:
        return cases
    shuffled = list(cases)
    random.Random(seed).shuffle(shuffled)
    return shuffled


# Runs started before these were recorded: 256-token pieces, 10 tokens, float32 passes,
# repeated facts refused.
LEGACY_RECIPE = {
    "stats_pieces": "256", "stats_samples": None, "template_tokens": 10, "precision": "fp32",
    "repeats": "refuse",
}  # fmt: skip


def load_resume_state(config: BenchConfig, run_dir: Path) -> dict[str, Any]:
    """Check that ``config`` is the configuration ``run_dir`` was started with (naming the
    first field that differs) and return what the run recorded as complete."""
    layout = BenchRunDir(run_dir)
    stored = {**LEGACY_RECIPE, **layout.read_config()["config"]}
    mine = json.loads(json.dumps(asdict(config)))
    if (stored["repeats"], mine["repeats"]) == ("refuse", "edit"):
        # A run that refused repeats has edited no batch holding one, so its journal is
        # also the journal of the same run with repeats edited: it may go on that way.
        stored["repeats"] = "edit"
    compared = sorted((set(stored) | set(mine)) - set(WATCH_SETTINGS))
    difference = first_difference(stored, mine, compared)
    if difference is not None:
        key, theirs, value = difference
        raise ValueError(
            f"--resume: {key} differs from {layout.config}: the run was "
            f"started with {theirs!r}, this command gives {value!r}; "
            "repeat the original options"
        )
    return layout.read_progress()
