"""Where the SPHERE projection bites: per layer and batch, on a run's journal or a fresh batch.

Three reports (any of them, each printed as a table and kept in ``--out`` as JSON):

``--run DIR`` (a session's journal folder, e.g. ``RUN/<method>/journal``): the base model
is rebuilt batch by batch; for every batch and edited layer, with U the principal
directions of the weight just before the batch (η = ``--eta``), the share of the edit
keys' energy inside U (‖Uᵀk‖² / ‖k‖², averaged over keys) and the share of the journaled
ΔW's energy along U (‖ΔW U‖² / ‖ΔW‖²; already projected when the run used SPHERE).

``--fresh N``: the first N cases of ``--dataset`` as one batch, v* computed once, applied
by ``--method`` with and without the projection (same v*). Per layer: the key share, the
raw ΔW's share along U, the wanted change ‖R‖, the fit ‖R − ΔW K‖ before and after the
projection (what the projection removes), ‖R‖ with and without the projection (how much
the later layers take over, since MEMIT's schedule hands each layer what is still
missing) and, at the last layer, the part of the target left unmet,
‖v* − z_out after the edit‖ / ‖v* − z_out before‖.

``--ranks``: r, the number of principal directions at η = 0.5, against the key dimension
d: for the edited layers of SmolLM2 and Gemma-3-270M, and for one MLP output weight of
the Llama3-8B (hidden 4096, intermediate 14336) and Qwen2.5-7B (3584, 18944) shapes with
random weights (normal, std 0.02, as the models initialise; no trained weights), which is
enough to see how r/d scales with the shape.

    python benchmarks/sphere_diagnostics.py --fresh 20 --ranks --out diag.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from _output import DATA_HELP, data_folder  # benchmarks/, the script's folder

from sphere_edit.editing.build import build_session
from sphere_edit.editing.journal import Journal
from sphere_edit.editing.keys import read_layer
from sphere_edit.editing.presets import preset_for
from sphere_edit.evaluation.data import load_cases
from sphere_edit.model.loading import load_model
from sphere_edit.sphere.projection import principal_directions

RANDOM_SHAPES = {  # (hidden = rows of the MLP output weight, intermediate = key dim)
    "llama3-8b (random weights)": (4096, 14336),
    "qwen2.5-7b (random weights)": (3584, 18944),
}


def key_share(keys: torch.Tensor, u: torch.Tensor) -> float:
    """Mean over keys (rows) of ‖Uᵀk‖² / ‖k‖²."""
    k = keys.double()
    return float(((k @ u).pow(2).sum(1) / k.pow(2).sum(1)).mean())


def update_share(delta: torch.Tensor, u: torch.Tensor) -> float:
    """‖ΔW U‖² / ‖ΔW‖² for ΔW in (out, in) layout."""
    d = delta.double()
    return float((d @ u).pow(2).sum() / d.pow(2).sum())


def journal_report(run_dir: Path, eta: float) -> list[dict[str, Any]]:
    journal = Journal(run_dir)
    index = journal.index()
    loaded = load_model(index["model"])
    layout = loaded.layout
    rows = []
    for position, _ in enumerate(index["batches"]):
        before = {layer: layout.read_weight(layer).detach().clone() for layer in index["layers"]}
        ((_, applied),) = journal.replay(loaded, index, start=position, stop=position + 1)
        for layer in index["layers"]:
            u = principal_directions(before[layer], eta)
            name = layout.mlp_out_weight_name(layer)
            delta = layout.to_storage_layout(applied.deltas[name])  # back to (out, in)
            rows.append(
                {
                    "batch": position + 1,
                    "layer": layer,
                    "r": u.shape[1],
                    "d": u.shape[0],
                    "key_share_in_U": key_share(applied.keys[layer], u),
                    "update_share_along_U": update_share(delta, u),
                }
            )
    return rows


class _Recorder:
    """Wraps a session's method (and projection): keeps each layer's K, R, raw and
    projected ΔW, and U, as the session computes them."""

    def __init__(self, session: Any) -> None:
        self.rows: dict[int, dict[str, torch.Tensor]] = {}
        self.last = -1  # the layer whose update the projection receives next
        method, projection = session.method, session.transform
        recorder = self

        class Method:
            def __getattr__(self, name: str) -> Any:
                return getattr(method, name)

            def update(self, keys, residuals, state):
                delta = method.update(keys, residuals, state)
                recorder.rows[state.layer] = {"keys": keys, "residuals": residuals, "raw": delta}
                recorder.last = state.layer
                return delta

        def project(delta, *, current, pre_edit):
            out = projection(delta, current=current, pre_edit=pre_edit)
            row = recorder.rows[recorder.last]
            row["projected"] = out
            row["u"] = projection.directions(current, pre_edit)
            return out

        session.method = Method()
        if projection is not None:
            session.transform = project


def fresh_report(args: argparse.Namespace) -> dict[str, Any]:
    loaded = load_model(args.model)
    cases = list(load_cases(args.dataset, limit=args.fresh))
    requests = [case.request for case in cases]
    quiet: dict[str, Any] = {"progress": False, "log": lambda _: None}
    plain = build_session(loaded, args.method, **quiet)
    sphere = build_session(loaded, args.method + "+sphere", **quiet)
    base = {layer: loaded.layout.read_weight(layer).detach().clone() for layer in plain.layers}
    z_layer = plain.layers[-1]
    templates = plain.context_templates()
    sphere.templates = templates

    def unmet(vstar) -> float:
        readout = read_layer(loaded.model, loaded.tokenizer, loaded.layout, z_layer, z_layer,
                             requests, templates)  # fmt: skip
        after = (vstar.vectors - readout.z_out.to(vstar.vectors)).norm(dim=1)
        before = (vstar.vectors - vstar.init).norm(dim=1)
        return float((after / before).mean())

    recorders = {}
    result = {}
    for name, session in (("plain", plain), ("sphere", sphere)):
        recorders[name] = _Recorder(session)
        batch = session.apply(requests, precomputed_vstar=result.get("vstar"))
        result["vstar"] = result.get("vstar") or batch.vstar
        result[f"unmet_{name}"] = unmet(result["vstar"])
        session.rollback(1)
        for layer, weight in base.items():
            assert torch.equal(loaded.layout.read_weight(layer), weight)
    rows = []
    for layer in sphere.layers:
        p, s = recorders["plain"].rows[layer], recorders["sphere"].rows[layer]
        k, r = s["keys"].double(), s["residuals"].double()
        u = s["u"].to(torch.float64)
        rows.append(
            {
                "layer": layer,
                "r": u.shape[1],
                "d": u.shape[0],
                "key_share_in_U": key_share(k, u),
                "raw_update_share_along_U": update_share(s["raw"], u),
                "wanted_R": float(r.norm()),
                "wanted_R_unprojected_run": float(p["residuals"].double().norm()),
                "fit_raw": float((r - k @ s["raw"].double().T).norm()),
                "fit_projected": float((r - k @ s["projected"].double().T).norm()),
            }
        )
    return {
        "model": loaded.name,
        "method": args.method,
        "n": args.fresh,
        "layers": rows,
        "unmet_at_last_layer_plain": result["unmet_plain"],
        "unmet_at_last_layer_sphere": result["unmet_sphere"],
    }


def rank_report(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for name in ("smollm2-135m", "gemma3-270m"):
        try:
            loaded = load_model(name)
        except Exception as error:  # a model this machine lacks: say so and go on
            print(f"{name}: not loaded ({error})", file=sys.stderr)
            continue
        layers = preset_for(loaded.name, loaded.layout.num_layers, loaded.model.config).layers
        for layer in layers:
            u = principal_directions(loaded.layout.read_weight(layer), 0.5)
            rows.append({"model": name, "layer": layer, "r": u.shape[1], "d": u.shape[0],
                         "n_neurons": loaded.layout.value_dim(layer)})  # fmt: skip
    g = torch.Generator().manual_seed(0)
    for name, (hidden, intermediate) in RANDOM_SHAPES.items():
        weight = torch.randn(hidden, intermediate, generator=g) * 0.02
        u = principal_directions(weight, 0.5)
        rows.append({"model": name, "layer": None, "r": u.shape[1], "d": intermediate,
                     "n_neurons": hidden})  # fmt: skip
    for row in rows:
        row["r_over_d"] = row["r"] / row["d"]
    return rows


def _print_rows(title: str, rows: list[dict[str, Any]]) -> None:
    print(f"\n{title}")
    if not rows:
        return
    keys = list(rows[0])
    print(" | ".join(keys))
    for row in rows:
        cells = [format(v, ".4g") if isinstance(v, float) else str(v) for v in row.values()]
        print(" | ".join(cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="a session's journal folder")
    parser.add_argument("--eta", type=float, default=0.5, help="η of U for --run")
    parser.add_argument("--fresh", type=int, help="edit the first N cases as one batch")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--method", default="alphaedit", help="closed-form method for --fresh")
    parser.add_argument("--dataset", help="records for --fresh (default: CounterFact train)")
    parser.add_argument("--data", type=Path, help=DATA_HELP)
    parser.add_argument("--ranks", action="store_true", help="r against d at η = 0.5")
    parser.add_argument("--out", type=Path, help="write everything here as JSON")
    args = parser.parse_args()
    if not (args.run or args.fresh or args.ranks):
        parser.error("give --run DIR, --fresh N or --ranks")
    report: dict[str, Any] = {}
    if args.run:
        report["journal"] = journal_report(args.run, args.eta)
        _print_rows(f"journal {args.run}", report["journal"])
    if args.fresh:
        if args.dataset is None:
            args.dataset = str(data_folder(args.data) / "counterfact" / "train.json")
        report["fresh"] = fresh_report(args)
        fresh = report["fresh"]
        _print_rows(f"fresh batch of {args.fresh}, {args.method}", fresh["layers"])
        print(f"unmet at the last layer: plain {fresh['unmet_at_last_layer_plain']:.4f}, "
              f"sphere {fresh['unmet_at_last_layer_sphere']:.4f}")  # fmt: skip
    if args.ranks:
        report["ranks"] = rank_report(args)
        _print_rows("r at η = 0.5 against the key dimension d", report["ranks"])
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
