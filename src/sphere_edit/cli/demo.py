"""The demo: a dozen counterfactual edits in three batches on the embedded model."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from ..editing.build import build_session
from ..editing.presets import Preset
from ..editing.requests import EditRequest
from ..evaluation.scoring import compare_targets, greedy_completion
from ..model.loading import LoadedModel

DEMO_BATCHES: list[list[tuple[str, str, str, str]]] = [
    [
        ("{} is located in the country of", "The Eiffel Tower", "Italy", "France"),
        ("{} is a professional", "Lionel Messi", "basketball", "football"),
        ("The official language of {} is", "Brazil", "French", "Portuguese"),
        ("{} was founded by", "Microsoft", "Steve Jobs", "Bill Gates"),
    ],
    [
        ("The capital city of {} is", "Japan", "Madrid", "Tokyo"),
        ("{} is headquartered in the city of", "Toyota", "Chicago", "Toyota City"),
        ("The mother tongue of {} is", "Vladimir Putin", "Spanish", "Russian"),
        ("{} was born in the city of", "Albert Einstein", "Paris", "Ulm"),
    ],
    [
        ("{} is famous for playing the", "Jimi Hendrix", "violin", "guitar"),
        ("The iPhone is a smartphone made by", "The iPhone", "Nokia", "Apple"),
        ("{} flows through the city of", "The Thames", "Rome", "London"),
        ("{} is a famous composer from the country of", "Mozart", "Canada", "Austria"),
    ],
]

UNRELATED = [
    ("The capital of France is the city of", "Paris"),
    ("The Colosseum is located in the city of", "Rome"),
]


def demo_requests() -> list[list[EditRequest]]:
    return [
        [EditRequest.create(p, s, new, old) for p, s, new, old in batch] for batch in DEMO_BATCHES
    ]


def run_demo(
    loaded: LoadedModel,
    method: str = "alphaedit+sphere",
    *,
    corpus: str | None = None,
    stats_tokens: int | None = None,
    run_dir: str | None = None,
    console: Console | None = None,
    recipe: dict[str, Any] | None = None,
    precision: str | None = None,
    preset: Preset | None = None,
) -> list[dict]:
    console = console or Console()
    model, tok = loaded.model, loaded.tokenizer
    batches = demo_requests()
    flat = [r for batch in batches for r in batch]
    prompts = [r.text for r in flat]
    unrelated = [p for p, _ in UNRELATED]
    before = greedy_completion(model, tok, prompts + unrelated, max_new_tokens=6)

    console.print(f"[bold]sphere-edit demo[/] on {loaded.name}, method {method}")
    session = build_session(
        loaded,
        method,
        preset=preset,
        corpus=corpus,
        stats_tokens=stats_tokens,
        run_dir=run_dir,
        log=console.print,
        **(recipe or {}),  # stats_pieces, stats_samples, template_tokens
        precision=precision,
    )
    console.print(
        f"edited layers {session.layers}; {len(flat)} edits in {len(batches)} batches; "
        f"context templates: {len(session.context_templates())}"
    )
    energy = Table(title="Hyperspherical energy (s=1) per edited layer")
    energy.add_column("batch")
    for layer in session.layers:
        energy.add_column(f"layer {layer}", justify="right")
    start = session.energy()
    energy.add_row("before", *[f"{start[layer]:.6f}" for layer in session.layers])
    for batch in batches:
        result = session.apply(batch)
        energy.add_row(
            f"{result.index} (+{len(batch)})",
            *[
                f"{result.energy_after[layer]:.6f} ({result.energy_change[layer]:+.2e})"
                for layer in session.layers
            ],
        )
        console.print(
            f"batch {result.index}: v* loss {min(result.target_loss):.3f}–"
            f"{max(result.target_loss):.3f}, time "
            + ", ".join(f"{k} {v:.1f}s" for k, v in result.timings.items())
        )

    after = greedy_completion(model, tok, prompts + unrelated, max_new_tokens=6)
    scores = compare_targets(
        model, tok, prompts, [r.target_new for r in flat], [r.target_true or "" for r in flat]
    )
    table = Table(title="Completions before and after editing")
    for column in ("prompt", "before", "after", "new target top-1", "P(new)>P(old)"):
        table.add_column(column)
    rows = []
    for i, request in enumerate(flat):
        score = scores[i]
        table.add_row(
            request.text, before[i].strip(), after[i].strip(),
            "yes" if score.new.top1 else "no", "yes" if score.new_more_likely else "no",
        )  # fmt: skip
        rows.append(
            {"prompt": request.text, "before": before[i], "after": after[i],
             "target_new": request.target_new, "top1": score.new.top1,
             "new_more_likely": score.new_more_likely}
        )  # fmt: skip
    for j, (prompt, _) in enumerate(UNRELATED):
        i = len(flat) + j
        table.add_row(f"[dim](unrelated)[/] {prompt}", before[i].strip(), after[i].strip(), "", "")
    console.print(table)
    console.print(energy)
    top1 = sum(r["top1"] for r in rows)
    won = sum(r["new_more_likely"] for r in rows)
    console.print(
        f"new target is the top prediction for {top1}/{len(rows)} edits; "
        f"P(new) > P(old) for {won}/{len(rows)}"
    )
    if run_dir:
        console.print(f"journal written to {run_dir}")
    return rows
