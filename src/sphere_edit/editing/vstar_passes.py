"""The forward routes of the v* optimisation (:mod:`.vstar`) and the rows they run.

A group of requests becomes :class:`_Rows` (one row per request and context template,
then one "{subject} is a" row per request); a route runs them with the requests' deltas
added at the subject's last token and returns the log-probabilities the loss reads:

- :class:`_ReferencePass`: every step runs every row in full;
- :class:`_CachedPass`: the positions before the subject's last token run once, as a
  key/value cache, and each step runs the rest; :class:`_SplitPass` runs the rewrite rows
  and the "is a" rows in cached passes of their own.

:mod:`.vstar` holds the settings, the optimiser and :func:`~.vstar.compute_vstar`; this
module does not import it.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from ..model.hooks import capture, edit_input, edit_output, run_until_stopped, skipped_layers
from ..model.placement import index_on
from .requests import EditRequest, RequestError
from .text import SubjectPrompt, encode, last_token_index, target_token_ids

KL_TEMPLATE = "{} is a"


@dataclass
class _Rows:
    """The prompts of a group of requests: for each request one row per context template
    (prompt + target tokens but the last), then one "{subject} is a" row per request."""

    ids: list[list[int]]
    lookups: list[int]
    prompt_lengths: list[int]  # tokens before the target tokens
    target_ids: list[list[int]]  # target token ids of each rewrite row
    n_requests: int
    n_rewrite: int

    @property
    def per_request(self) -> int:
        return self.n_rewrite // self.n_requests

    def split(self) -> tuple[_Rows, _Rows]:
        """(the rewrite rows, the "is a" rows), each a ``_Rows`` of its own."""
        k = self.n_rewrite
        rewrite = _Rows(
            self.ids[:k],
            self.lookups[:k],
            self.prompt_lengths[:k],
            self.target_ids,
            self.n_requests,
            k,
        )
        essence = _Rows(self.ids[k:], self.lookups[k:], self.prompt_lengths[k:], [], 0, 0)
        return rewrite, essence


def _build_rows(
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[EditRequest],
    request_ids: Sequence[int],
    templates: Sequence[str],
) -> _Rows:
    ids, lookups, lengths, targets = [], [], [], []
    for rid in request_ids:
        request = requests[rid]
        try:
            target = target_token_ids(tokenizer, request.text, request.target_new)
        except RequestError as error:
            raise error.at(rid, "target_new") from None
        for context in templates:
            prompt = SubjectPrompt.build(request, context=context)
            prompt_ids = encode(tokenizer, prompt.text)
            ids.append(prompt_ids + target[:-1])
            lookups.append(last_token_index(tokenizer, prompt.text, prompt.subject_end))
            lengths.append(len(prompt_ids))
            targets.append(target)
    n_rewrite = len(ids)
    for rid in request_ids:
        prompt = SubjectPrompt.build(requests[rid], template=KL_TEMPLATE)
        prompt_ids = encode(tokenizer, prompt.text)
        ids.append(prompt_ids)
        lookups.append(last_token_index(tokenizer, prompt.text, prompt.subject_end))
        lengths.append(len(prompt_ids))
    return _Rows(ids, lookups, lengths, targets, len(request_ids), n_rewrite)


def _tail_length(
    tokenizer: PreTrainedTokenizerBase, requests: Sequence[EditRequest], rid: int
) -> int:
    """Positions from the subject's last token to the end of the prompt and target."""
    rows = _build_rows(tokenizer, requests, [rid], ["{}"])
    return len(rows.ids[0]) - rows.lookups[0]


class _Pass:
    """One forward route over a group's rows. ``run(delta_rows, on_init)`` returns the
    log-probabilities the loss needs: per rewrite row and target token, and the full
    distribution at the subject's last token of each "is a" row."""

    def __init__(
        self,
        model: nn.Module,
        layers: list[nn.Module],
        unembed: nn.Module,
        rows: _Rows,
        pad: int,
        device: torch.device,
        bf16: bool,
    ):
        # ``layers``: the decoder layers up to the one delta is added to (its output).
        self.model, self.layers, self.unembed = model, layers, unembed
        self.hidden = layers[-1]
        self.rows, self.bf16 = rows, bf16
        longest = max((len(t) for t in rows.target_ids), default=1)
        target_ids = torch.zeros(rows.n_rewrite, longest, dtype=torch.long)
        target_mask = torch.zeros(rows.n_rewrite, longest)
        for i, target in enumerate(rows.target_ids):
            target_ids[i, : len(target)] = torch.tensor(target)
            target_mask[i, : len(target)] = 1.0
        self.target_ids, self.target_mask = target_ids.to(device), target_mask.to(device)
        self.device = device
        self.pad = pad
        self._prepare()

    def _prepare(self) -> None:
        raise NotImplementedError

    def _forward(self, delta_rows: torch.Tensor, on_init) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (log-probs of the rewrite rows at target positions (rows, T, V) as
        gathered token log-probs (rows, T), kl log-probs (n_requests, V))."""
        raise NotImplementedError

    def run(self, delta_rows: torch.Tensor, on_init) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            return self._forward(delta_rows, on_init)


class _ReferencePass(_Pass):
    """Every step runs every row in full (left-padded, explicit positions)."""

    def _prepare(self) -> None:
        rows = self.rows
        width = max(len(r) for r in rows.ids)
        self.width = width
        ids = torch.full((len(rows.ids), width), self.pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, row in enumerate(rows.ids):
            ids[i, width - len(row) :] = torch.tensor(row)
            mask[i, width - len(row) :] = 1
        self.inputs = {
            "input_ids": ids.to(self.device),
            "attention_mask": mask.to(self.device),
            "position_ids": (mask.cumsum(1) - 1).clamp(min=0).to(self.device),
        }
        shift = torch.tensor([width - len(r) for r in rows.ids])
        self.lookup = (torch.tensor(rows.lookups) + shift).to(self.device)
        t = self.target_ids.shape[1]
        starts = torch.tensor(rows.prompt_lengths[: rows.n_rewrite]) - 1 + shift[: rows.n_rewrite]
        cols = (starts.unsqueeze(1) + torch.arange(t)).clamp(max=width - 1)
        self.keep = int(width - min(int(cols.min()), int(self.lookup[rows.n_rewrite :].min())))
        offset = width - self.keep
        self.rewrite_cols = (cols - offset).to(self.device)
        self.kl_cols = self.lookup[rows.n_rewrite :] - offset

    def _forward(self, delta_rows, on_init):
        rows_index = torch.arange(len(self.rows.ids), device=self.device)

        def add(output: torch.Tensor) -> torch.Tensor:
            # The layer's output is on its own device, delta and the positions on the inputs'.
            at = (rows_index.to(output.device), self.lookup.to(output.device))
            on_init(output[at].to(self.device))
            return output.index_put(at, delta_rows.to(output.device, output.dtype), accumulate=True)

        with edit_output(self.hidden, add):
            logits = self.model(**self.inputs, logits_to_keep=self.keep).logits
        return self._gather(logits, self.rewrite_cols, self.kl_cols)

    def _gather(
        self, logits: torch.Tensor, rewrite_cols: torch.Tensor, kl_cols: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n_rw = self.rows.n_rewrite
        rows = torch.arange(n_rw, device=self.device).unsqueeze(1)
        picked = logits[:n_rw][rows, rewrite_cols].float().log_softmax(-1)
        token_lp = picked.gather(2, self.target_ids.unsqueeze(-1)).squeeze(-1)
        kl_rows = torch.arange(n_rw, len(self.rows.ids), device=self.device)
        kl_lp = logits[kl_rows, kl_cols].float().log_softmax(-1)
        return token_lp, kl_lp


class _CachedPass(_Pass):
    """Positions before the subject's last token run once; each step runs the rest."""

    def _prepare(self) -> None:
        rows = self.rows
        heads = [r[:look] for r, look in zip(rows.ids, rows.lookups, strict=True)]
        # An "is a" row is read at its first tail position only, and causal attention
        # makes that position independent of the tokens after it: run it alone.
        tails = [
            r[look:] if i < rows.n_rewrite else r[look : look + 1]
            for i, (r, look) in enumerate(zip(rows.ids, rows.lookups, strict=True))
        ]
        p_width = max(len(h) for h in heads)
        s_width = max(len(t) for t in tails)
        n = len(rows.ids)
        head_ids = torch.full((n, p_width), self.pad, dtype=torch.long)
        head_mask = torch.zeros_like(head_ids)
        tail_ids = torch.full((n, s_width), self.pad, dtype=torch.long)
        tail_mask = torch.zeros_like(tail_ids)
        for i, (head, tail) in enumerate(zip(heads, tails, strict=True)):
            if head:
                head_ids[i, p_width - len(head) :] = torch.tensor(head)
                head_mask[i, p_width - len(head) :] = 1
            tail_ids[i, : len(tail)] = torch.tensor(tail)
            tail_mask[i, : len(tail)] = 1
        head_len = torch.tensor([len(h) for h in heads])
        tail_pos = head_len.unsqueeze(1) + torch.arange(s_width)
        self.cache = None
        self.cache_arg = None
        dev = self.device
        if p_width > 0:
            from .sampling import cache_argument

            self.cache_arg = cache_argument(self.model)
            with (
                torch.no_grad(),
                torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16),
            ):
                out = self.model(
                    input_ids=head_ids.to(dev),
                    attention_mask=head_mask.to(dev),
                    position_ids=(head_mask.cumsum(1) - 1).clamp(min=0).to(dev),
                    use_cache=True,
                    # Only the cache is wanted, and the unembedding (the widest matrix)
                    # of every prefix position is a large share of this pass.
                    logits_to_keep=1,
                )
            cache = getattr(out, "cache", None)
            self.cache = cache if cache is not None else out.past_key_values
        self.inputs = {
            "input_ids": tail_ids.to(dev),
            "attention_mask": torch.cat([head_mask, tail_mask], dim=1).to(dev),
            "position_ids": tail_pos.to(dev),
        }
        t = self.target_ids.shape[1]
        lengths = torch.tensor(rows.prompt_lengths[: rows.n_rewrite], dtype=torch.long)
        starts = lengths - 1 - head_len[: rows.n_rewrite]
        cols = (starts.unsqueeze(1) + torch.arange(t)).clamp(max=s_width - 1)
        self.rewrite_cols = cols.to(dev)
        self.kl_cols = torch.zeros(n - rows.n_rewrite, dtype=torch.long, device=dev)

        # No tail position depends on delta before it is added at the output of the last
        # of ``layers``: run those layers once here, and skip them in every step.
        with (
            torch.no_grad(),
            torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16),
            capture(self.hidden, stop=True) as seen,
        ):
            run_until_stopped(lambda: self.model(**self.inputs, **self._cache_inputs()))
        self.tail_hidden, self.tail_output = seen.output, seen.raw_output
        self.container = _container_of(self.model, self.layers[0])
        _keep_shapes_only(self.cache, len(self.layers))

    def _cache_inputs(self) -> dict:
        if self.cache is None:
            return {}
        # The forward appends to the cache: give it a copy, keep the prefix intact.
        return {self.cache_arg: _fresh_copy(self.cache), "use_cache": True}

    def _forward(self, delta_rows, on_init):
        def add(output: torch.Tensor) -> torch.Tensor:
            on_init(output[:, 0].to(self.device))
            shifted = output.clone()
            shifted[:, 0] = output[:, 0] + delta_rows.to(output.device, output.dtype)
            return shifted

        n_rw, t = self.rewrite_cols.shape
        kl_rows = torch.arange(n_rw, len(self.rows.ids), device=self.device)
        rows = torch.cat([torch.arange(n_rw, device=self.device).repeat_interleave(t), kl_rows])
        cols = torch.cat([self.rewrite_cols.flatten(), self.kl_cols])

        def only_needed(hidden: torch.Tensor) -> torch.Tensor:
            # The unembedding is the widest matrix of the model: run it only where the
            # loss reads it (every target position and each "is a" row's subject token).
            return index_on(hidden, rows, cols).unsqueeze(0)

        # The layer delta is added to is skipped, so its output is shifted here.
        with (
            skipped_layers(
                self.container, len(self.layers), self.tail_output, add(self.tail_hidden)
            ),
            edit_input(self.unembed, only_needed),
        ):
            logits = self.model(**self.inputs, **self._cache_inputs()).logits[0]
        log_probs = logits.float().log_softmax(-1)
        token_lp = log_probs[: n_rw * t].view(n_rw, t, log_probs.shape[-1])
        token_lp = token_lp.gather(2, self.target_ids.unsqueeze(-1)).squeeze(-1)
        return token_lp, log_probs[n_rw * t :]


def _container_of(model: nn.Module, first: nn.Module) -> nn.ModuleList:
    """The model's decoder-layer list, the one whose first entry is ``first``."""
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) and module[0] is first:
            return module
    raise ValueError("v*: the decoder layers are not held in an nn.ModuleList")


def _fresh_copy(cache: object) -> object:
    """A copy of the prefix cache for one forward to append to. A cache layer's update
    replaces its key and value tensors by new ones (``torch.cat``) rather than writing into
    them, so copying the cache and its layer objects, not their tensors, leaves the prefix
    intact and saves copying every prefix tensor every step. A cache without a list of
    layers (an unknown class) is deep-copied."""
    layers = getattr(cache, "layers", None)
    if not isinstance(layers, list):
        return copy.deepcopy(cache)
    fresh = copy.copy(cache)
    fresh.layers = [copy.copy(layer) for layer in layers]  # type: ignore[attr-defined]
    return fresh


def _keep_shapes_only(cache: object, n_layers: int) -> None:
    """Free the prefix keys and values of the first ``n_layers`` decoder layers, which
    every step skips (``skipped_layers``): no attention reads them, but the mask
    construction asks the cache for its length, so each keeps its shape as a zero-stride
    view of one element. A cache without per-layer tensors (an unknown class) is left
    whole."""
    for layer in list(getattr(cache, "layers", []))[:n_layers]:
        for name in ("keys", "values"):
            tensor = getattr(layer, name, None)
            if isinstance(tensor, torch.Tensor) and tensor.numel() > 1:
                setattr(layer, name, tensor.new_zeros(()).expand(tensor.shape))


class _SplitPass:
    """The cached route with the rewrite rows and the "is a" rows in passes of their own:
    an "is a" row needs one tail position, and in a shared pass it would run to the width
    of the longest rewrite tail."""

    def __init__(self, model, layers, unembed, rows: _Rows, pad, device, bf16):
        rewrite, essence = rows.split()
        self.n_rewrite = rows.n_rewrite
        self.rewrite = _CachedPass(model, layers, unembed, rewrite, pad, device, bf16)
        self.essence = _CachedPass(model, layers, unembed, essence, pad, device, bf16)
        self.target_mask = self.rewrite.target_mask

    def run(self, delta_rows: torch.Tensor, on_init) -> tuple[torch.Tensor, torch.Tensor]:
        token_lp, _ = self.rewrite.run(delta_rows[: self.n_rewrite], on_init)
        _, kl_lp = self.essence.run(delta_rows[self.n_rewrite :], lambda _values: None)
        return token_lp, kl_lp
