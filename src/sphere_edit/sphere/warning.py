"""An early warning of collapse from hyperspherical energy, batch by batch.

The rule, per edited layer: after a warm-up of ``warmup`` batches, a batch whose HE change
exceeds, in magnitude, ``k`` times the median of that layer's earlier absolute changes
raises an alarm. The median (not the mean) keeps one earlier jump from raising the bar
for the next one; the magnitude is used because collapse shows as HE falling as well as
rising.

The defaults (``k`` = :data:`DEFAULT_K`, ``warmup`` = :data:`DEFAULT_WARMUP`) were chosen
by replaying the rule (:func:`sphere_edit.bench.analysis.warning_evaluation`) on the
finished runs of ``docs/results.md``, section "The HE early warning replayed": the
smallest warm-up and k that flag the collapses that can be flagged without raising more
false alarms. ``sphere-edit edit`` and ``bench`` run the rule by default
(``--he-warning 0`` turns it off).
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

DEFAULT_K = 10.0
DEFAULT_WARMUP = 2


@dataclass(frozen=True)
class EnergyAlarm:
    """One layer's HE change that the rule flagged, in the batch it happened."""

    batch: int  # 1-based, counting every batch the rule has seen
    layer: int
    change: float
    threshold: float  # k times the median earlier absolute change

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def message(self) -> str:
        """One line naming the layer, the change and the threshold."""
        return (
            f"HE warning: batch {self.batch}, layer {self.layer}: HE change "
            f"{self.change:+.3e} exceeds the threshold {self.threshold:.3e} "
            "(k times the median earlier change); edits may be about to collapse"
        )


@dataclass
class EnergyWarning:
    """The rule above, fed one batch's HE changes (layer → after − before) at a time."""

    k: float = DEFAULT_K
    warmup: int = DEFAULT_WARMUP
    history: dict[int, list[float]] = field(default_factory=dict)  # layer → |changes|
    batches: int = 0

    def __post_init__(self) -> None:
        if not self.k > 0:
            raise ValueError(f"he_warning: k must be positive, got {self.k}; e.g. {DEFAULT_K:g}")
        if self.warmup < 1:
            raise ValueError(f"he_warning: warmup must be at least 1 batch, got {self.warmup}")

    def update(self, changes: Mapping[int, float]) -> list[EnergyAlarm]:
        """The alarms this batch raises (none during the warm-up); its changes then join
        the history the next batches are judged against."""
        self.batches += 1
        alarms = []
        for layer, change in changes.items():
            earlier = self.history.setdefault(int(layer), [])
            if len(earlier) >= self.warmup:
                threshold = self.k * statistics.median(earlier)
                if abs(change) > threshold:
                    alarms.append(EnergyAlarm(self.batches, int(layer), float(change), threshold))
            earlier.append(abs(float(change)))
        return alarms
