"""Weight geometry of an edited layer, before and after: how the neurons sit on the sphere.

A layer's weight in (out, in) layout has one neuron per row; each is normalised to unit
length. For the pre- and post-edit weight this module computes

* the pairwise cosine-similarity matrix of the neurons (heatmaps: pre, post, difference),
* the histogram of pairwise angles in degrees (pre and post overlaid),
* a t-SNE embedding of the pre- and post-edit neurons together (one plot, two colours),
* the hyperspherical energy (:func:`.energy.hyperspherical_energy`) of the whole layer and
  its relative change, and how far each neuron turned and stretched.

Large layers are subsampled for the pairwise views: ``max_neurons`` rows drawn once with
a private seeded generator, the same rows pre and post. HE always uses every neuron.

Figures are drawn with matplotlib's Agg canvas (no pyplot, no display) and written
atomically; :func:`geometry_for_run` does all of it for every edited layer of a run
directory, and :func:`geometry_html` turns the result into an HTML fragment with the
images embedded. matplotlib and scikit-learn are imported only when figures are drawn.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..common.fileio import write_json
from ..sphere.energy import hyperspherical_energy, unit_neurons
from .figures import img_tag, new_figure, save_png

DEFAULT_MAX_NEURONS = 512
ANGLE_BINS = 360  # half a degree each over [0, 180]
PRE_COLOUR, POST_COLOUR = "tab:blue", "tab:orange"


# -- numbers ---------------------------------------------------------------------------------


def sample_neurons(n_neurons: int, max_neurons: int, seed: int = 0) -> torch.Tensor:
    """Indices of the neurons to show: all of them when there are at most
    ``max_neurons``, else ``max_neurons`` drawn without replacement by a private generator
    seeded with ``seed`` (sorted, so the heatmaps keep the layer's order)."""
    if max_neurons < 2:
        raise ValueError(f"max_neurons must be at least 2, got {max_neurons}")
    if n_neurons <= max_neurons:
        return torch.arange(n_neurons)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randperm(n_neurons, generator=generator)[:max_neurons].sort().values


def cosine_matrix(unit: torch.Tensor) -> torch.Tensor:
    """Pairwise cosine similarities of unit rows, clamped to [-1, 1]."""
    return (unit @ unit.T).clamp(-1.0, 1.0)


def pairwise_angles(unit: torch.Tensor) -> torch.Tensor:
    """Angles in degrees between every pair i < j of unit rows (upper triangle, row-major)."""
    n = unit.shape[0]
    rows, cols = torch.triu_indices(n, n, offset=1)
    return torch.rad2deg(torch.arccos(cosine_matrix(unit)[rows, cols]))


def relative_change(before: float, after: float) -> float | None:
    """(after − before) / |before|; ``None`` when it is not defined (zero or infinite HE)."""
    if before == 0 or not math.isfinite(before) or not math.isfinite(after):
        return None
    return (after - before) / abs(before)


def _angle_stats(angles: torch.Tensor) -> dict[str, float]:
    return {
        "mean": float(angles.mean()),
        "std": float(angles.std()) if angles.numel() > 1 else 0.0,
        "min": float(angles.min()),
        "max": float(angles.max()),
    }


def compare_weights(
    pre: torch.Tensor,
    post: torch.Tensor,
    *,
    max_neurons: int = DEFAULT_MAX_NEURONS,
    seed: int = 0,
    s: float = 1.0,
) -> dict[str, Any]:
    """The numbers behind the figures, for one (out, in) weight before and after an edit.

    Returns a JSON-serialisable dict (HE, its relative change, angle statistics of the
    sampled neurons, per-neuron turn and stretch) and, under ``"_arrays"``, the tensors
    the figures are drawn from (sample indices, unit rows, cosine matrices, angles).
    """
    if pre.shape != post.shape or pre.dim() != 2:
        raise ValueError(
            f"pre and post must be 2-D weights of one shape, got {tuple(pre.shape)} and "
            f"{tuple(post.shape)}"
        )
    if pre.shape[0] < 2:
        raise ValueError("a layer needs at least two neurons (rows) for pairwise geometry")
    unit_pre, unit_post = unit_neurons(pre), unit_neurons(post)
    chosen = sample_neurons(pre.shape[0], max_neurons, seed)
    sample_pre, sample_post = unit_pre[chosen], unit_post[chosen]
    cos_pre, cos_post = cosine_matrix(sample_pre), cosine_matrix(sample_post)
    angles_pre, angles_post = pairwise_angles(sample_pre), pairwise_angles(sample_post)
    he_pre = hyperspherical_energy(pre, s)
    he_post = hyperspherical_energy(post, s)
    turn = torch.rad2deg(torch.arccos((unit_pre * unit_post).sum(dim=1).clamp(-1.0, 1.0)))
    norm_pre = pre.detach().double().norm(dim=1)
    stretch = post.detach().double().norm(dim=1) / norm_pre - 1.0
    diff = cos_post - cos_pre
    summary: dict[str, Any] = {
        "shape": list(pre.shape),
        "n_neurons": int(pre.shape[0]),
        "n_sampled": int(len(chosen)),
        "seed": seed,
        "energy_s": s,
        "he_pre": he_pre,
        "he_post": he_post,
        "he_change": he_post - he_pre if math.isfinite(he_pre + he_post) else None,
        "he_relative_change": relative_change(he_pre, he_post),
        "angles_pre": _angle_stats(angles_pre),
        "angles_post": _angle_stats(angles_post),
        "cosine_change_max_abs": float(diff.abs().max()),
        "neuron_turn_deg": {"mean": float(turn.mean()), "max": float(turn.max())},
        "neuron_norm_change": {
            "mean_abs": float(stretch.abs().mean()),
            "max_abs": float(stretch.abs().max()),
        },
        "delta_fro": float((post.detach().double() - pre.detach().double()).norm()),
        "_arrays": {
            "indices": chosen,
            "unit_pre": sample_pre,
            "unit_post": sample_post,
            "cos_pre": cos_pre,
            "cos_post": cos_post,
            "angles_pre": angles_pre,
            "angles_post": angles_post,
        },
    }
    return summary


def angle_histogram(
    angles_pre: torch.Tensor, angles_post: torch.Tensor, bins: int = ANGLE_BINS
) -> dict[str, list[float]]:
    """Counts of the pre- and post-edit angles over the same ``bins`` bins of [0, 180]."""
    edges = torch.linspace(0.0, 180.0, bins + 1, dtype=torch.float64)
    pre = torch.histogram(angles_pre.double().cpu(), bins=edges).hist
    post = torch.histogram(angles_post.double().cpu(), bins=edges).hist
    return {
        "edges": edges.tolist(),
        "pre": [int(x) for x in pre],
        "post": [int(x) for x in post],
    }


def tsne_embedding(
    unit_pre: torch.Tensor, unit_post: torch.Tensor, *, seed: int = 0
) -> tuple[Any, Any]:
    """2-D t-SNE (scikit-learn, ``random_state=seed``) of the pre- and post-edit unit
    neurons embedded together, so the two sets share one map; returns (pre, post)."""
    try:
        from sklearn.manifold import TSNE
    except ImportError as error:
        raise ImportError(
            f"the t-SNE plot needs scikit-learn: pip install scikit-learn ({error})"
        ) from None
    points = torch.cat([unit_pre, unit_post]).double().cpu().numpy()
    n = points.shape[0]
    perplexity = float(min(30.0, max(1.0, (n - 1) / 3.0)))
    embedded = TSNE(
        n_components=2, perplexity=perplexity, init="pca", random_state=seed, n_jobs=1
    ).fit_transform(points)
    half = unit_pre.shape[0]
    return embedded[:half], embedded[half:]


# -- figures ---------------------------------------------------------------------------------


def plot_cosine(cos_pre: torch.Tensor, cos_post: torch.Tensor, path: Path, title: str) -> None:
    figure = new_figure(15, 4.8)
    axes = figure.subplots(1, 3)
    panels = (
        ("pre-edit", cos_pre, "RdBu_r", 1.0),
        ("post-edit", cos_post, "RdBu_r", 1.0),
        ("post − pre", cos_post - cos_pre, "PuOr_r", None),
    )
    for ax, (name, matrix, cmap, limit) in zip(axes, panels, strict=True):
        values = matrix.cpu().numpy()
        if limit is None:
            limit = max(float(abs(values).max()), 1e-12)
        # Antialiased downsampling: a 512-row matrix in a 300-pixel panel keeps its diagonal.
        image = ax.imshow(values, cmap=cmap, vmin=-limit, vmax=limit, interpolation="antialiased")
        ax.set_title(name)
        ax.set_xlabel("neuron")
        ax.set_ylabel("neuron")
        figure.colorbar(image, ax=ax, shrink=0.8)
    figure.suptitle(f"{title}: pairwise cosine similarity of neurons")
    save_png(figure, path)


def plot_angles(histogram: dict[str, list[float]], path: Path, title: str) -> None:
    """Pre-edit filled, post-edit as an outline on top (the two often coincide), the
    axis zoomed to the occupied bins."""
    figure = new_figure(7, 4.5)
    ax = figure.subplots()
    edges = histogram["edges"]
    ax.stairs(histogram["pre"], edges, fill=True, alpha=0.45, color=PRE_COLOUR, label="pre-edit")
    ax.stairs(histogram["post"], edges, color=POST_COLOUR, linewidth=1.5, label="post-edit")
    occupied = [i for i, (a, b) in enumerate(zip(histogram["pre"], histogram["post"], strict=True))
                if a or b]  # fmt: skip
    if occupied:
        margin = 4 * (edges[1] - edges[0])
        ax.set_xlim(
            max(0.0, edges[occupied[0]] - margin), min(180.0, edges[occupied[-1] + 1] + margin)
        )
    ax.set_xlabel("angle between neurons (degrees)")
    ax.set_ylabel("pairs")
    ax.legend()
    ax.set_title(f"{title}: pairwise angles")
    save_png(figure, path)


def plot_tsne(points_pre, points_post, path: Path, title: str) -> None:
    figure = new_figure(6, 6)
    ax = figure.subplots()
    ax.scatter(points_pre[:, 0], points_pre[:, 1], s=8, alpha=0.6, c=PRE_COLOUR, label="pre-edit")
    ax.scatter(
        points_post[:, 0], points_post[:, 1], s=8, alpha=0.6, c=POST_COLOUR, marker="x",
        label="post-edit",
    )  # fmt: skip
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend()
    ax.set_title(f"{title}: t-SNE of unit neurons")
    save_png(figure, path)


def layer_geometry(
    pre: torch.Tensor,
    post: torch.Tensor,
    out_dir: str | Path,
    *,
    name: str = "layer",
    title: str | None = None,
    max_neurons: int = DEFAULT_MAX_NEURONS,
    seed: int = 0,
    s: float = 1.0,
    tsne: bool = True,
) -> dict[str, Any]:
    """Compare one (out, in) weight before and after and write ``{name}_cosine.png``,
    ``{name}_angles.png`` and (with ``tsne``) ``{name}_tsne.png`` into ``out_dir``.
    Returns the JSON-serialisable summary of :func:`compare_weights` with the angle
    histogram and the figure paths added."""
    out_dir = Path(out_dir)
    title = title or name
    summary = compare_weights(pre, post, max_neurons=max_neurons, seed=seed, s=s)
    arrays = summary.pop("_arrays")
    histogram = angle_histogram(arrays["angles_pre"], arrays["angles_post"])
    summary["angle_histogram"] = histogram
    figures = {"cosine": out_dir / f"{name}_cosine.png", "angles": out_dir / f"{name}_angles.png"}
    plot_cosine(arrays["cos_pre"], arrays["cos_post"], figures["cosine"], title)
    plot_angles(histogram, figures["angles"], title)
    if tsne:
        figures["tsne"] = out_dir / f"{name}_tsne.png"
        points_pre, points_post = tsne_embedding(arrays["unit_pre"], arrays["unit_post"], seed=seed)
        plot_tsne(points_pre, points_post, figures["tsne"], title)
    summary["figures"] = {key: str(path) for key, path in figures.items()}
    return summary


# -- a run directory -------------------------------------------------------------------------


def geometry_for_run(
    run_dir: str | Path,
    out_dir: str | Path | None = None,
    max_neurons: int = DEFAULT_MAX_NEURONS,
    *,
    model: Any = None,
    seed: int = 0,
    tsne: bool = True,
    layers: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Geometry of every edited layer of a run: the base model against the model after
    all journaled batches.

    The base model is the one named in the run's ``session.json`` unless ``model`` says
    otherwise (a name, folder or hub id, or an unedited :class:`.LoadedModel`, whose
    weights are restored afterwards). Figures and ``summary.json`` go to ``out_dir``
    (default ``run_dir/geometry``); the summary is returned.
    """
    from ..editing.journal import Journal, index_modules, restore_weights, snapshot_weights
    from ..model.loading import LoadedModel, load_model
    from .rundir import GEOMETRY, GEOMETRY_SUMMARY

    run_dir = Path(run_dir)
    journal = Journal(run_dir)
    index = journal.index()
    out = Path(out_dir) if out_dir is not None else run_dir / GEOMETRY
    loaded = model if isinstance(model, LoadedModel) else load_model(model or index["model"])
    chosen = list(index["layers"]) if layers is None else list(layers)
    missing = [layer for layer in chosen if layer not in index["layers"]]
    if missing:
        raise ValueError(
            f"layers {missing} are not edited by this run (it edits {index['layers']})"
        )
    layout = loaded.layout
    stored = snapshot_weights(layout, index["layers"], index_modules(index))
    pre = {layer: layout.read_weight(layer).detach().cpu().clone() for layer in chosen}
    journal.replay(loaded, index)
    try:
        post = {layer: layout.read_weight(layer).detach().cpu().clone() for layer in chosen}
    finally:
        restore_weights(layout, stored)
    s = float(index.get("energy_s", 1.0))
    results: dict[str, Any] = {}
    for layer in chosen:
        results[str(layer)] = layer_geometry(
            pre[layer], post[layer], out, name=f"layer{layer}",
            title=f"layer {layer} ({layout.mlp_out_weight_name(layer)})",
            max_neurons=max_neurons, seed=seed, s=s, tsne=tsne,
        )  # fmt: skip
        results[str(layer)]["module"] = layout.mlp_out_weight_name(layer)
    summary = {
        "run_dir": str(run_dir),
        "model": index.get("model"),
        "method": index.get("method_spec", index.get("method")),
        "n_batches": len(index["batches"]),
        "max_neurons": max_neurons,
        "seed": seed,
        "out_dir": str(out),
        "layers": results,
    }
    write_json(out / GEOMETRY_SUMMARY, summary)
    return summary


def geometry_for_bench(
    run_dir: str | Path,
    max_neurons: int = DEFAULT_MAX_NEURONS,
    *,
    model: Any = None,
    seed: int = 0,
    tsne: bool = True,
) -> dict[str, dict[str, Any]]:
    """:func:`geometry_for_run` for every method of a benchmark run directory that has
    a journal, into ``RUN/<method>/geometry`` (where ``sphere-edit report`` finds it);
    the base model is loaded once. Returns the summaries by method."""
    from ..editing.journal import read_index
    from ..model.loading import LoadedModel, load_model
    from .rundir import BenchRunDir

    run_dir = Path(run_dir)
    layout = BenchRunDir(run_dir)
    journals = {spec: layout.method(spec) for spec in layout.methods()}
    journals = {s: d for s, d in journals.items() if d.has_journal()}
    if not journals:
        raise ValueError(f"{run_dir}: no method of this benchmark run has a journal yet")
    if not isinstance(model, LoadedModel):
        first = read_index(next(iter(journals.values())).journal)
        model = load_model(model or first["model"])
    return {
        spec: geometry_for_run(
            folder.journal,
            folder.geometry,
            max_neurons,
            model=model,
            seed=seed,
            tsne=tsne,
        )  # fmt: skip
        for spec, folder in journals.items()
    }


# -- HTML ------------------------------------------------------------------------------------


def _number(value: Any, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


def geometry_html(summary: dict[str, Any], *, title: str = "Weight geometry") -> str:
    """An HTML fragment (a ``<section>``) for a report: a table of HE and angle
    statistics per layer and every figure, embedded as base64 PNG."""
    layers = summary["layers"]
    rows = []
    for layer, result in layers.items():
        rows.append(
            "<tr>"
            f"<td>{html.escape(str(layer))}</td>"
            f"<td>{_number(result['he_pre'], '.6g')}</td>"
            f"<td>{_number(result['he_post'], '.6g')}</td>"
            f"<td>{_number(result['he_relative_change'], '+.3e')}</td>"
            f"<td>{result['angles_pre']['mean']:.2f} / {result['angles_post']['mean']:.2f}</td>"
            f"<td>{result['angles_pre']['min']:.2f} / {result['angles_post']['min']:.2f}</td>"
            f"<td>{result['neuron_turn_deg']['mean']:.3g}</td>"
            f"<td>{result['n_sampled']} of {result['n_neurons']}</td>"
            "</tr>"
        )
    parts = [
        '<section class="geometry">',
        f"<h2>{html.escape(title)}</h2>",
        "<table>",
        "<tr><th>layer</th><th>HE pre</th><th>HE post</th><th>HE relative change</th>"
        "<th>mean angle pre / post (°)</th><th>min angle pre / post (°)</th>"
        "<th>mean neuron turn (°)</th><th>neurons shown</th></tr>",
        *rows,
        "</table>",
    ]
    for layer, result in layers.items():
        parts.append(f"<h3>layer {html.escape(str(layer))}</h3>")
        for kind, path in result.get("figures", {}).items():
            parts.append(f"<figure>{img_tag(path, f'layer {layer} {kind}')}</figure>")
    parts.append("</section>")
    return "\n".join(parts)
