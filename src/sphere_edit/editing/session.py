"""Sequential editing: batches applied one after another to the same model.

The session owns each edited layer's state (C0, the method's derived cache, the keys of
every earlier edit) and a journal of every applied batch, from which the edited model can
be saved as deltas, replayed onto the base model, rolled back or exported.

This module holds :class:`EditSession` (its state, :meth:`EditSession.apply`, the journal,
rollback, resume and export) and :class:`BatchResult`; the routes that compute a batch's
update live in :mod:`.routes`, whose :class:`NumericalError` is re-exported here.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..common.heap import release_free_memory
from ..common.progress import Progress
from ..methods import EditMethod, GradientMethod, LayerState
from ..methods.base import (
    default_transform_order,
    edits_per_request,
    edits_restrained,
    edits_single_layer,
    finalizes,
    is_gradient_method,
    restrains,
)
from ..model.loading import LoadedModel
from ..model.placement import require_resident
from ..sphere.energy import hyperspherical_energy
from ..sphere.projection import SphereProjection
from . import routes
from .journal import (
    MLP_OUT,
    AppliedBatch,
    BatchEntry,
    Journal,
    JournalError,
    add_deltas,
    chain_fingerprint,
    require_base,
    restore_weights,
    restrained_weight,
    set_weights,
    snapshot_weights,
)
from .requests import EditRequest, validate_batch
from .routes import NumericalError as NumericalError  # re-exported: apply raises it
from .routes import _timed
from .sampling import generate_context_templates
from .vstar import VStarConfig, VStarResult, compute_vstar

# Where MEMIT's schedule applies the SPHERE projection and a method's ``finalize`` (RECT's
# sparsification) to each layer's ΔW: "inside", before the next layer's residual is read
# (the later layers make up for what was removed), or "after" the whole schedule has run
# with the dense updates, each layer's weight becoming W_before + T(ΔW_dense).
TRANSFORM_ORDERS = ("inside", "after")


@dataclass
class BatchResult:
    index: int
    requests: list[EditRequest]
    energy_before: dict[int, float]
    energy_after: dict[int, float]
    timings: dict[str, float]
    target_loss: list[float]
    target_steps: list[int]
    update_norms: dict[int, float] = field(default_factory=dict)
    # Solver fallbacks (an ill-conditioned system solved by least squares), one line each.
    warnings: list[str] = field(default_factory=list)
    # The v* of the whole batch (closed-form methods; None for ROME and FT): what
    # ``precomputed_vstar`` takes, e.g. to give another method the same first batch.
    vstar: VStarResult | None = None
    # Whether the v* came in as ``precomputed_vstar`` (journaled, so that a report of a
    # resumed run knows which of its methods computed their own first batch's v*).
    vstar_given: bool = False

    @property
    def energy_change(self) -> dict[int, float]:
        return {k: self.energy_after[k] - self.energy_before[k] for k in self.energy_after}


class EditSession:
    # Progress of v* steps and key passes on stderr (build_session sets it).
    progress: bool = False
    # New tokens per context template (sampling.template_new_tokens; build_session sets it).
    template_tokens: str | int = "authors"

    def __init__(
        self,
        loaded: LoadedModel,
        method: EditMethod | GradientMethod,
        layers: Sequence[int],
        second_moments: dict[int, torch.Tensor],
        *,
        transform: SphereProjection | None = None,
        target: VStarConfig = VStarConfig(),
        templates: Sequence[str] | None = None,
        seed: int = 0,
        run_dir: str | Path | None = None,
        energy_s: float = 1.0,
        extra_header: dict[str, Any] | None = None,
        transform_order: str | None = None,
    ) -> None:
        layout = loaded.layout
        # The modules of each layer the method edits (UltraEdit: gate and up projections).
        modules = routes.edited_modules(method, layout)
        if transform_order is None:
            transform_order = default_transform_order(method)
        if transform_order not in TRANSFORM_ORDERS:
            raise ValueError(
                f"transform_order: must be 'inside' or 'after', got {transform_order!r}; "
                "pass --transform-order inside or --transform-order after"
            )
        if not layers:
            raise ValueError("layers: give at least one layer to edit")
        if list(layers) != sorted(set(layers)):
            raise ValueError(f"layers must be increasing and distinct, got {list(layers)}")
        if edits_single_layer(method) and len(layers) != 1:
            raise ValueError(f"{method.name} edits one layer; got layers {list(layers)}")
        if edits_per_request(method) and restrains(method):
            raise ValueError(f"{method.name}: a method cannot both edit per request and restrain")
        for layer in layers:
            if not 0 <= layer < layout.num_layers:
                last = layout.num_layers - 1
                raise ValueError(f"layer {layer} is out of range: the model has layers 0..{last}")
            if modules == MLP_OUT and layer not in second_moments:
                raise ValueError(f"second_moments has no entry for layer {layer}")
        require_resident(layout, layers, modules)
        self.loaded = loaded
        self.layout = layout
        self.method = method
        self.layers = list(layers)
        self.transform = transform
        self.transform_order = transform_order
        self.target = target
        self.seed = seed
        self.energy_s = energy_s
        self.templates = list(templates) if templates is not None else None
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.extra_header = dict(extra_header or {})
        self.modules = modules
        self.states: dict[int, LayerState] = {}
        for layer in self.layers if modules == MLP_OUT else ():
            weight = layout.read_weight(layer).detach()
            d_k = weight.shape[1]
            moment = second_moments[layer].double()
            if moment.shape != (d_k, d_k):
                raise ValueError(
                    f"second moment of layer {layer} has shape {tuple(moment.shape)}, "
                    f"expected {(d_k, d_k)}"
                )
            self.states[layer] = LayerState(
                layer=layer,
                weight_name=layout.mlp_out_weight_name(layer),
                pre_edit=weight.clone().cpu(),
                second_moment=moment,
                edited_keys=torch.zeros(d_k, d_k, dtype=torch.float64),
                accumulated=(
                    torch.zeros(weight.shape, dtype=torch.float64) if restrains(method) else None
                ),
            )
        # The state of each edited (layer, module) of a method that edits other modules.
        self.module_states: dict[tuple[int, str], LayerState] = {
            (layer, name): routes.module_state(layout, layer, name)
            for layer in self.layers
            for name in (modules if modules != MLP_OUT else ())
        }
        self._base_storage = snapshot_weights(layout, self.layers, modules)
        self.batches: list[AppliedBatch] = []
        self.entries: list[BatchEntry] = []

    # -- applying ---------------------------------------------------------------------------

    def context_templates(self) -> list[str]:
        if self.templates is None:
            self.templates = generate_context_templates(
                self.loaded.model,
                self.loaded.tokenizer,
                seed=self.seed,
                template_tokens=self.template_tokens,
            )
        return self.templates

    @property
    def takes_precomputed_vstar(self) -> bool:
        """Whether :meth:`apply` accepts ``precomputed_vstar`` (the closed-form methods,
        which optimise v* for the whole batch at the last edited layer)."""
        return not (is_gradient_method(self.method) or edits_per_request(self.method))

    def vstar_key(self) -> str:
        """What v* depends on besides the requests and the weights: sessions with equal
        keys on the same weights compute the same targets."""
        return vstar_key(self.layers[-1], self.context_templates(), asdict(self.target))

    def _compute_vstar(self, requests: list[EditRequest]) -> VStarResult:
        """v* for ``requests`` (validated by :meth:`apply`) on the weights the model has
        now; :attr:`BatchResult.vstar` hands it to other sessions."""
        bar = Progress("v* steps", self.target.steps, enabled=self.progress)
        result = compute_vstar(
            self.loaded.model, self.loaded.tokenizer, self.layout, self.layers[-1], requests,
            self.context_templates(), self.target,
            on_step=lambda step, done, n: bar.update(step, f"{done}/{n} requests converged"),
        )  # fmt: skip
        bar.close()
        release_free_memory()  # the v* graphs are gone; see heap.py
        return result

    def energy(self) -> dict[int, float]:
        """HE per edited layer of the model as it is evaluated (:meth:`evaluation_weights`:
        for PRUNE editing the raw sum, the restrained weights, so that HE and the metrics
        describe one model); for a method editing other modules, the sum of the HE of the
        layer's edited modules."""
        with self.evaluation_weights():
            return self._energy()

    def _energy(self) -> dict[int, float]:
        if self.modules != MLP_OUT:
            read = self.layout.read_module_weight
            return {
                layer: sum(
                    hyperspherical_energy(read(layer, name), self.energy_s) for name in self.modules
                )
                for layer in self.layers
            }
        return {
            layer: hyperspherical_energy(self.layout.read_weight(layer), self.energy_s)
            for layer in self.layers
        }

    def apply(
        self,
        requests: Sequence[EditRequest],
        *,
        precomputed_vstar: VStarResult | None = None,
        repeats: bool = False,
    ) -> BatchResult:
        """Edit the model so that every request holds; on any error the weights stay as
        they were before the call.

        Three routes, by the kind of method: v* for the whole batch and MEMIT's schedule
        over the layers (closed-form methods); the same one request at a time (``per_request``
        methods: ROME); or ΔW from the method's own ``compute`` (gradient methods: FT).
        Every ΔW then goes through the same SPHERE transform (``routes.commit``).

        ``precomputed_vstar`` skips the v* optimisation and uses these target vectors
        instead; they must come from :func:`compute_vstar` for the same requests, the
        same templates and layer ``layers[-1]``, on the weights the model has now (e.g.
        to give several methods the same v*). ``repeats``: see :func:`.validate_batch`.
        """
        requests = list(requests)
        validate_batch(requests, repeats=repeats)
        if precomputed_vstar is not None:
            if not self.takes_precomputed_vstar:
                raise ValueError(
                    f"precomputed_vstar: {self.method.name} computes its own targets "
                    "(request by request, or by gradient descent on the weight)"
                )
            hidden_size = self.loaded.model.config.get_text_config().hidden_size
            shape = tuple(precomputed_vstar.vectors.shape)
            if shape != (len(requests), hidden_size):
                raise ValueError(
                    f"precomputed_vstar has vectors of shape {shape}, expected "
                    f"{(len(requests), hidden_size)} for {len(requests)} requests"
                )
        timings: dict[str, float] = {}
        templates = self.context_templates()
        with _timed(timings, "energy"):
            energy_before = self.energy()

        backup = snapshot_weights(self.layout, self.layers, self.modules)
        try:
            if self.modules != MLP_OUT:
                edit = routes.modules_route(self, requests, timings)
            elif is_gradient_method(self.method):
                edit = routes.gradient(self, requests, templates, timings)
            elif edits_per_request(self.method):
                edit = routes.one_by_one(self, requests, templates, backup, timings)
            else:
                edit = routes.closed_form(self, requests, templates, precomputed_vstar, timings)
        except BaseException:
            restore_weights(self.layout, backup)
            raise

        self.batches.append(
            AppliedBatch(edit.deltas, edit.keys, edit.raw, method_state=edit.method_state)
        )
        self._count(self.batches[-1])
        with _timed(timings, "energy"):
            energy_after = self.energy()
        batch = BatchResult(
            index=len(self.batches),
            requests=requests,
            energy_before=energy_before,
            energy_after=energy_after,
            timings=timings,
            target_loss=edit.loss,
            target_steps=edit.steps,
            update_norms=edit.norms,
            warnings=edit.notes,
            vstar=edit.vstar,
            vstar_given=precomputed_vstar is not None,
        )
        # What the journal holds besides the tensors, kept so that save() writes it too.
        self.batches[-1] = self.batches[-1]._replace(
            record=_record(batch), energy=_energy(batch, self.layers)
        )
        if self.run_dir is not None:
            try:
                self._journal(batch)
            except BaseException:
                # Not journaled means not applied: memory must match the disk.
                self.batches.pop()
                restore_weights(self.layout, backup)
                self._rebuild_states()
                raise
        return batch

    # -- journal ----------------------------------------------------------------------------

    def header(self) -> dict[str, Any]:
        # A journal of the MLP output projections says nothing of modules, as before.
        modules = {"modules": list(self.modules)} if self.modules != MLP_OUT else {}
        return {
            "model": self.loaded.name,
            "base_fingerprint": self.loaded.fingerprint,
            "method": self.method.describe(),
            "transform": asdict(self.transform) if self.transform is not None else None,
            "transform_order": self.transform_order,
            "layers": self.layers,
            "target": asdict(self.target),
            "templates": self.templates,
            "seed": self.seed,
            "energy_s": self.energy_s,
            **modules,
            **self.extra_header,
        }

    @property
    def journal(self) -> Journal:
        """The journal in :attr:`run_dir`."""
        if self.run_dir is None:
            raise ValueError("the session has no run directory")
        return Journal(self.run_dir)

    def _journal(self, batch: BatchResult) -> None:
        self.entries = self.journal.append(
            self.header(),
            self.entries,
            self.batches[-1],
            base=self.loaded.fingerprint,
            state_before=self.state_fingerprint(),
        )

    def save(self, run_dir: str | Path) -> None:
        """Write the whole journal to ``run_dir`` (a session started without one): the same
        files and records as a journal written batch by batch."""
        self.run_dir = Path(run_dir)
        self.entries = self.journal.write_all(
            self.header(), self.batches, base=self.loaded.fingerprint
        )

    def state_fingerprint(self) -> str:
        """The edit state the next batch applies to: the base model's fingerprint chained
        with the checksum of every journaled batch (``journal.chain_fingerprint``)."""
        if self.entries and self.entries[-1].state_after:
            return self.entries[-1].state_after
        state = self.loaded.fingerprint
        for entry in self.entries:
            state = chain_fingerprint(state, entry.delta_sha256 or entry.tensors_sha256)
        return state

    def rollback(self, n_batches: int = 1) -> None:
        """Undo the last ``n_batches``: the weights become bitwise what they were, by
        replaying the remaining deltas onto the saved base weights in the same order."""
        if not 0 <= n_batches <= len(self.batches):
            raise ValueError(
                f"cannot roll back {n_batches} batches: the session has {len(self.batches)}"
            )
        keep = len(self.batches) - n_batches
        self.batches = self.batches[:keep]
        self.entries = self.entries[:keep]
        restore_weights(self.layout, self._base_storage)
        for applied in self.batches:
            add_deltas(self.layout, self.layers, applied.deltas, self.modules)
        self._rebuild_states()
        if self.run_dir is not None:
            self.journal.write_index(self.header(), self.entries)

    def _count(self, applied: AppliedBatch) -> None:
        """Add a batch's keys (and raw updates) to the layer states."""
        for (layer, name), state in self.module_states.items():
            k = applied.keys[layer].double()
            state.edited_keys += k.T @ k
            state.n_edits += k.shape[0]
            prefix = f"{layer}.{name}."
            stored = applied.method_state or {}
            state.cache["method_state"] = {
                key.removeprefix(prefix): t for key, t in stored.items() if key.startswith(prefix)
            }
        for layer in self.layers if self.modules == MLP_OUT else ():
            state = self.states[layer]
            k = applied.keys[layer].double()
            state.edited_keys += k.T @ k
            state.n_edits += k.shape[0]
            if state.accumulated is not None:
                if layer not in applied.raw:
                    raise JournalError(f"batch has no raw update of layer {layer} for PRUNE")
                state.accumulated += applied.raw[layer].double()

    def _rebuild_states(self) -> None:
        """The layer states from the batches, in order: bitwise what adding them one by
        one gave."""
        for state in [*self.states.values(), *self.module_states.values()]:
            state.cache.pop("method_state", None)
            state.edited_keys.zero_()
            state.n_edits = 0
            if state.accumulated is not None:
                state.accumulated.zero_()
        for applied in self.batches:
            self._count(applied)

    @classmethod
    def load(
        cls,
        run_dir: str | Path,
        loaded: LoadedModel,
        method: EditMethod,
        second_moments: dict[int, torch.Tensor],
        *,
        transform: SphereProjection | None = None,
        target: VStarConfig | None = None,
        transform_order: str | None = None,
    ) -> EditSession:
        """Replay a journal onto the unedited base model ``loaded``, after checking that it
        was recorded with this base model, ``method``, ``transform`` and ``target`` (default:
        the journal's), ``transform_order`` (default: the journal's), naming the first field
        that differs, as :meth:`resume` does."""
        run_dir = Path(run_dir)
        index = Journal(run_dir).index()
        require_base(run_dir, index, loaded.fingerprint)
        own = {"format", "batches", "model", "base_fingerprint", "method", "transform"}
        own |= {"layers", "target", "templates", "seed", "energy_s", "modules", "transform_order"}
        session = cls(
            loaded,
            method,
            index["layers"],
            second_moments,
            transform=transform,
            target=target or VStarConfig(**index["target"]),
            templates=index["templates"],
            seed=index["seed"],
            run_dir=run_dir,
            energy_s=index.get("energy_s", 1.0),
            # What the journal's writer added to the header stays in it.
            extra_header={k: v for k, v in index.items() if k not in own},
            transform_order=transform_order or index.get("transform_order", "inside"),
        )
        session.check_header(index)
        session._replay_or_reset(index)
        return session

    def resume(self) -> int:
        """Continue the journal in ``run_dir``, if there is one: check that it was recorded
        with this session's base model and options, replay its batches (bitwise what
        applying them gave) and return how many there were; the next :meth:`apply` appends
        to it. Without a journal (nothing was completed) return 0."""
        if self.run_dir is None:
            raise ValueError("resume: the session has no run directory")
        if self.batches:
            raise ValueError("resume: the session has already applied batches")
        if not self.journal.exists():
            return 0
        index = self.journal.index()
        self.check_header(index)
        self.templates = list(index["templates"]) if index.get("templates") else None
        self._replay_or_reset(index)
        return len(self.batches)

    def check_header(self, index: dict[str, Any]) -> None:
        """Refuse a journal recorded with another base model or other options, naming
        the first field that differs."""
        index = _with_old_defaults(index)
        if not self.order_matters:
            # Both orders give these edits bitwise: a journal of either one continues.
            index["transform_order"] = self.transform_order
        self.journal.verify(self.header(), self.loaded.fingerprint, index)

    @property
    def order_matters(self) -> bool:
        """Whether ``transform_order`` changes the edits: MEMIT's schedule over several
        layers, with something to apply to each layer's ΔW that the next layer would see."""
        if len(self.layers) < 2 or is_gradient_method(self.method):
            return False
        restrained = restrains(self.method) and edits_restrained(self.method)
        return self.transform is not None or finalizes(self.method) or restrained

    def _replay_or_reset(self, index: dict[str, Any]) -> None:
        try:
            self._replay(index)
        except BaseException:
            # Leave the caller's model as it came: unedited.
            self.batches, self.entries = [], []
            restore_weights(self.layout, self._base_storage)
            self._rebuild_states()
            raise

    def _replay(self, index: dict[str, Any]) -> None:
        """Apply every batch the index names (the journal checks order, checksums and the
        chain of edit states) and count it into the layer states."""
        journal = self.journal
        for entry, applied in journal.replay(self.loaded, index):
            applied = applied._replace(record=journal.record(entry), energy=entry.energy)
            self._count(applied)
            self.batches.append(applied)
            self.entries.append(entry)

    @property
    def evaluates_restrained(self) -> bool:
        """Whether the model is evaluated with other weights than it edits: a restraining
        method that edits the raw sum (PRUNE's default, as the authors' code does)."""
        return restrains(self.method) and not edits_restrained(self.method)

    @contextmanager
    def evaluation_weights(self) -> Iterator[None]:
        """Within the block the model has the weights it is evaluated with: for PRUNE
        editing the raw sum, W0 + SPHERE(restrain(Σ ΔW)); otherwise the live ones. On
        leaving, the live weights come back bitwise."""
        if not self.evaluates_restrained or not self.batches:
            yield
            return
        live = snapshot_weights(self.layout, self.layers)
        try:
            weights = {
                layer: restrained_weight(self.method, self.transform, self.states[layer])
                for layer in self.layers
            }
            set_weights(self.layout, weights)
            yield
        finally:
            restore_weights(self.layout, live)

    def export(self, directory: str | Path) -> None:
        """Save the edited model as an ordinary checkpoint (``save_pretrained``), with the
        weights it is evaluated with (:meth:`evaluation_weights`)."""
        with self.evaluation_weights():
            self.loaded.model.save_pretrained(directory, safe_serialization=True)
        self.loaded.tokenizer.save_pretrained(directory)


def _with_old_defaults(index: dict[str, Any]) -> dict[str, Any]:
    """``index`` with the settings older journals lack set to what those journals did:
    the transforms inside the schedule, PRUNE editing its restrained model."""
    index = dict(index)
    index.setdefault("transform_order", "inside")
    method = index.get("method")
    if isinstance(method, dict) and method.get("method") == "prune":
        index["method"] = {**method, "edit_restrained": method.get("edit_restrained", True)}
    return index


def _record(batch: BatchResult) -> dict[str, Any]:
    """A batch's request file: its requests and diagnostics."""
    return {
        "index": batch.index,
        "requests": [r.to_dict() for r in batch.requests],
        "target_loss": batch.target_loss,
        "target_steps": batch.target_steps,
        "timings": batch.timings,
        "update_norms": {str(k): v for k, v in batch.update_norms.items()},
        "warnings": batch.warnings,
        # Absent in journals from before the field: there a report derives it.
        "vstar_given": batch.vstar_given,
    }


def _energy(batch: BatchResult, layers: Sequence[int]) -> dict[str, dict[str, float]]:
    """A batch's index entry's HE per layer."""
    return {
        str(layer): {
            "before": batch.energy_before[layer],
            "after": batch.energy_after[layer],
            "change": batch.energy_change[layer],
        }
        for layer in layers
    }


def vstar_key(z_layer: int, templates: Sequence[str], target: dict[str, Any]) -> str:
    """The v* key of a session editing up to ``z_layer`` with these context templates and
    v* settings (``asdict(VStarConfig)``, as the journal header holds them)."""
    return json.dumps([z_layer, list(templates), target])
