"""What one method's benchmark run records as it goes: batches, HE, checkpoints, general
abilities and phase times, all JSON-ready, and their correlations."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ..evaluation.metrics import consecutive_difference_fit, spearman
from ..sphere.warning import EnergyWarning

HEADLINE_METRICS = ("efficacy", "generalization", "specificity")


def _finite_or_none(value: float) -> float | None:
    return None if value is None or math.isnan(value) else float(value)


@dataclass
class MethodRun:
    """What one method's run records as it goes (everything JSON-ready)."""

    spec: str
    layers: list[int] = field(default_factory=list)
    batches: list[dict[str, Any]] = field(default_factory=list)
    energy: list[dict[str, Any]] = field(default_factory=list)  # edits, layer, energy
    checkpoints: list[dict[str, Any]] = field(default_factory=list)
    general: list[dict[str, Any]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    warning: EnergyWarning | None = None  # the HE early warning, when configured

    def add_time(self, phase: str, seconds: float) -> None:
        self.timings[phase] = self.timings.get(phase, 0.0) + seconds

    def mean_energy(self, edits: int) -> float:
        values = [row["energy"] for row in self.energy if row["edits"] == edits]
        return sum(values) / len(values)

    def correlations(self) -> dict[str, Any]:
        """Spearman ρ between mean HE and each headline metric across checkpoints, and the
        linear fit of their consecutive differences."""
        he = [self.mean_energy(c["edits"]) for c in self.checkpoints]
        result: dict[str, Any] = {"n_points": len(he), "energy": "mean over edited layers"}
        for metric in HEADLINE_METRICS:
            series = [c["metrics"].get(metric) for c in self.checkpoints]
            if len(he) < 3 or any(v is None for v in series):
                result[metric] = {"spearman": None, "reason": "needs 3 or more checkpoints"}
                continue
            fit = consecutive_difference_fit(he, series)
            result[metric] = {
                "spearman": _finite_or_none(spearman(he, series)),
                "difference_fit": {
                    "slope": _finite_or_none(fit.slope),
                    "intercept": _finite_or_none(fit.intercept),
                    "r": _finite_or_none(fit.r),
                    "n": fit.n,
                },
            }
        return result

    def add_batch(
        self,
        done: int,
        index: int,
        energy_before: dict[int, float],
        energy_after: dict[int, float],
        update_norms: dict[int, float],
        timings: dict[str, float],
        target_loss: list[float],
        target_steps: list[int],
        warnings: list[str],
    ) -> None:
        """One batch into the record: the same row whether the batch was just applied or is
        rebuilt from the journal on resume."""
        for phase, seconds in timings.items():
            self.add_time(phase, seconds)
        for layer, energy in energy_after.items():
            self.energy.append({"edits": done, "layer": layer, "energy": energy})
        self.batches.append(
            {
                "batch": index,
                "edits": done,
                "energy_before": energy_before,
                "energy_after": energy_after,
                "energy_change": {k: energy_after[k] - energy_before[k] for k in energy_after},
                "update_norms": update_norms,
                "timings": timings,
                "target_loss_mean": sum(target_loss) / len(target_loss),
                "target_steps_mean": sum(target_steps) / len(target_steps),
                "warnings": warnings,
            }
        )
        if self.warning is not None:
            alarms = self.warning.update(self.batches[-1]["energy_change"])
            self.batches[-1]["he_warnings"] = [
                {**alarm.to_dict(), "message": alarm.message()} for alarm in alarms
            ]
