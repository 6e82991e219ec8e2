"""General abilities of a run's model after its first K edits, from the run's journal."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .evaluate import evaluate_general
from .loaders import DEFAULT_N_ITEMS
from .tasks import TASKS, task_list


def accuracy_keys(summaries: Iterable[Mapping[str, Any]]) -> list[str]:
    """The accuracies among the summaries' keys (not the counts), in first-seen order:
    the columns of a general-ability curve, in its plot and its table alike."""
    keys: dict[str, None] = {}
    for summary in summaries:
        keys.update((key, None) for key in summary if key.endswith("_acc"))
    return list(keys)


def general_curve(
    run_dir: str | Path,
    edits: Sequence[int],
    *,
    model: Any = None,
    device: str | None = None,
    device_map: str | None = None,
    data_dir: str | Path | None = None,
    n_items: int = DEFAULT_N_ITEMS,
    tasks: str | Sequence[str] = TASKS,
    batch_size: int = 16,
    out: str | Path | None = None,
    details: bool = False,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """General abilities of a run's model after its first K edits, for each K in
    ``edits`` (0 = the base model; every K a batch end): the benchmark's
    ``--general-every`` curve, measured afterwards from the journal, since evaluating
    inside the benchmark is too slow on a CPU.

    One model is edited step by step (the batches up to the next K are added, then it is
    evaluated), never reloaded. Returns ``{"run_dir", "model", "method", "n_items",
    "tasks", "points"}``, a point being ``{"edits", "batches", **evaluate_general(...)}``.
    With ``out`` the curve is written atomically after every point, and the points
    ``out`` already holds for the same run, items and tasks are kept and not measured
    again, so an interrupted job goes on where it stopped. ``model`` is the base model as in
    :func:`.geometry.geometry_for_run` (loaded onto ``device`` or over ``device_map`` when
    it is a name); a passed :class:`.LoadedModel` gets its weights back.
    """
    from ...common.fileio import write_json
    from ...editing.journal import Journal, index_modules, restore_weights, snapshot_weights
    from ...model.loading import LoadedModel, load_model

    run_dir = Path(run_dir)
    journal = Journal(run_dir)
    index = journal.index()
    reachable = [0, *journal.edit_counts(index)]
    wanted = sorted(set(edits))
    unreachable = [k for k in wanted if k not in reachable]
    if unreachable or not wanted:
        problem = f"{', '.join(map(str, unreachable))} not at a batch end" if wanted else "empty"
        raise ValueError(
            f"--edits: {problem}; the edit counts {run_dir} can be rebuilt at are "
            f"{', '.join(map(str, reachable))}"
        )
    name = model.name if isinstance(model, LoadedModel) else model or index["model"]
    curve: dict[str, Any] = {
        "run_dir": str(run_dir), "model": name, "method": index.get("method_spec"),
        "n_items": n_items, "tasks": task_list(tasks), "points": [],
    }  # fmt: skip
    if out is not None and Path(out).exists():
        curve["points"] = _stored_points(Path(out), curve)
    done = {point["edits"] for point in curve["points"]}
    todo = [k for k in wanted if k not in done]
    if not todo:
        return curve
    if log and done:
        log(f"{out} already holds the points at {sorted(done)} edits; measuring {todo}")
    loaded = (
        model
        if isinstance(model, LoadedModel)
        else load_model(name, device=device, device_map=device_map)
    )
    stored = snapshot_weights(loaded.layout, index["layers"], index_modules(index))
    applied = 0
    try:
        for k in todo:
            batches = reachable.index(k)
            journal.replay(loaded, index, start=applied, stop=batches)
            applied = batches
            if log:
                log(f"{k} edits ({batches} batches)")
            result = evaluate_general(
                loaded.model, loaded.tokenizer, data_dir, n_items=n_items,
                tasks=curve["tasks"], batch_size=batch_size, details=details, log=log,
            )  # fmt: skip
            point = {"edits": k, "batches": batches, **result}
            curve["points"] = sorted([*curve["points"], point], key=lambda p: p["edits"])
            if out is not None:
                write_json(out, curve)
    finally:
        restore_weights(loaded.layout, stored)
    return curve


def _stored_points(path: Path, curve: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The points of the curve in ``path``, refused when it was measured on another run,
    item count or task list (its points would not belong to this curve)."""
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"--out {path} is not a JSON file ({error})") from None
    if not isinstance(stored, dict) or not isinstance(stored.get("points"), list):
        raise ValueError(f"--out {path} holds no general-ability curve; give another file")
    same_run = Path(str(stored.get("run_dir"))).resolve() == Path(curve["run_dir"]).resolve()
    for key, same in (
        ("run_dir", same_run),
        ("n_items", stored.get("n_items") == curve["n_items"]),
        ("tasks", stored.get("tasks") == curve["tasks"]),
    ):
        if not same:
            raise ValueError(
                f"--out {path} holds a curve for {key} {stored.get(key)!r}, not "
                f"{curve[key]!r}; give another file or remove it"
            )
    return stored["points"]
