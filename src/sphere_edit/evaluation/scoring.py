"""Batched teacher-forced scoring of targets after prompts, and greedy completion.

A prompt and its target are scored as one row, the prompt's tokens followed by every
target token but the last: the last ``len(target)`` positions of that row then predict the
target tokens. Rows are left-padded with explicit ``position_ids`` (see :mod:`.text`), so
every row ends in the same column and the unembedding runs only over the last ``K``
positions of the batch (``logits_to_keep=K``). A row that is a prefix of another row is
read from that row's pass instead of running again.
:func:`next_token_scores` is the one-pass case of both: the greedy next token and the
log-probabilities of one-token candidates, from the last prompt position alone.
:func:`score_one_by_one` does the same one prompt at a time without any padding; the
tests hold the two to each other.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from ..common.heap import release_free_memory
from ..common.progress import Progress
from ..editing.sampling import decode_tokens
from ..editing.text import PromptBatch, encode, pad_id_of, pad_left, target_token_ids
from ..model.hooks import edit_input
from ..model.placement import index_on, input_device


@dataclass(frozen=True)
class TargetScore:
    """How a model scores one target after one prompt under teacher forcing.

    ``logprob`` is the sum of the log-probabilities of the target's tokens, each given
    the prompt and the target tokens before it; ``top1`` says whether every target token
    is the argmax of its position (so greedy decoding would produce the whole target), and
    ``token_top1`` says it for each token (zsRE's token accuracy is their mean).
    """

    logprob: float
    mean_logprob: float
    top1: bool
    n_tokens: int
    token_logprobs: tuple[float, ...] = ()
    token_top1: tuple[bool, ...] = ()

    @property
    def token_accuracy(self) -> float:
        """The fraction of target tokens that are the argmax of their position."""
        if not self.token_top1:
            raise ValueError("this score carries no per-token results")
        return sum(self.token_top1) / len(self.token_top1)


@dataclass(frozen=True)
class TargetComparison:
    """The scores of a new and an old target after the same prompt."""

    new: TargetScore
    old: TargetScore

    @property
    def new_more_likely(self) -> bool:
        """P(new) > P(old), comparing the total log-probability of each token sequence."""
        return self.new.logprob > self.old.logprob

    @property
    def new_more_likely_per_token(self) -> bool:
        """The same comparison on the mean log-probability per token (ROME's evaluation
        code averages the NLL over each target's tokens before comparing)."""
        return self.new.mean_logprob > self.old.mean_logprob


def _check_pairs(prompts: Sequence[str], targets: Sequence[str], batch_size: int) -> None:
    if isinstance(prompts, str) or isinstance(targets, str):
        raise TypeError("prompts and targets must be sequences of strings, not one string")
    if len(prompts) != len(targets):
        raise ValueError(
            f"got {len(prompts)} prompts but {len(targets)} targets; give one target per prompt"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")


def _score_rows(
    tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], targets: Sequence[str]
) -> tuple[list[list[int]], list[list[int]]]:
    """For every pair, the row to run (prompt ids + target ids[:-1]) and the target ids."""
    rows, target_ids = [], []
    for i, (prompt, target) in enumerate(zip(prompts, targets, strict=True)):
        prompt_ids = encode(tokenizer, prompt)
        ids = target_token_ids(tokenizer, prompt, target)
        if not prompt_ids:
            raise ValueError(
                f"prompt {i} ({prompt!r}) tokenises to nothing, so nothing predicts the "
                "first target token; give a non-empty prompt"
            )
        rows.append(prompt_ids + ids[:-1])
        target_ids.append(ids)
    return rows, target_ids


def _device(model: nn.Module) -> torch.device:
    return input_device(model)


def length_batches(rows: Sequence[Sequence[int]], batch_size: int) -> Iterator[list[int]]:
    """The indices of ``rows`` in groups of ``batch_size``, shortest rows first (rows of
    equal length in input order): similar lengths in one batch keep the padding small."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    for begin in range(0, len(order), batch_size):
        yield order[begin : begin + batch_size]


def _encode_prompts(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str]) -> list[list[int]]:
    """The token ids of every prompt; a prompt that tokenises to nothing is refused."""
    if isinstance(prompts, str):
        raise TypeError("prompts must be a sequence of strings, not one string")
    rows = [encode(tokenizer, p) for p in prompts]
    for i, row in enumerate(rows):
        if not row:
            raise ValueError(f"prompt {i} ({prompts[i]!r}) tokenises to nothing")
    return rows


def shared_runs(rows: Sequence[Sequence[int]]) -> tuple[list[list[int]], list[int]]:
    """The rows to run, and for each row the index of the run that contains it: a row
    that is a prefix of another (the prompt of a one-token target is a prefix of the same
    prompt followed by a longer target) rides along with it. Under causal attention the
    logits at a row's positions do not depend on anything after them, so this is the same
    computation, done once."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]), reverse=True)
    runs: list[list[int]] = []
    owner = [0] * len(rows)
    prefixes: dict[tuple[int, ...], int] = {}
    for i in order:
        key = tuple(rows[i])
        run = prefixes.get(key)
        if run is None:
            run = len(runs)
            runs.append(list(rows[i]))
            for end in range(1, len(key) + 1):
                prefixes.setdefault(key[:end], run)
        owner[i] = run
    return runs, owner


@torch.no_grad()
def score_targets(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    targets: Sequence[str],
    *,
    batch_size: int = 64,
    share_prefixes: bool = True,
    progress: bool = False,
) -> list[TargetScore]:
    """Teacher-forced scores of ``targets[i]`` after ``prompts[i]``, many rows per pass.

    Rows that are a prefix of another row share its pass (:func:`shared_runs`; off with
    ``share_prefixes=False``, which runs every row, for comparison); the runs are sorted
    by length before batching (less padding) and the scores returned in input order.
    ``progress`` reports the passes on stderr (:class:`~sphere_edit.common.progress.Progress`).
    """
    _check_pairs(prompts, targets, batch_size)
    if not prompts:
        return []
    device = _device(model)
    rows, target_ids = _score_rows(tokenizer, prompts, targets)
    runs, owner = shared_runs(rows) if share_prefixes else (rows, list(range(len(rows))))
    riders: list[list[int]] = [[] for _ in runs]
    for i, run in enumerate(owner):
        riders[run].append(i)
    pad = pad_id_of(tokenizer)
    scores: list[TargetScore | None] = [None] * len(rows)
    bar = Progress("evaluation rows", len(runs), enabled=progress)
    for chunk in length_batches(runs, batch_size):
        batch = pad_left([runs[r] for r in chunk], [0] * len(chunk), pad, device)
        # Row i (length L, n target tokens) inside its run (length R) predicts its target
        # at the run's positions L-n .. L-1, i.e. R-L+n .. R-L+1 from the run's end.
        spans = [
            (b, i, len(runs[r]) - len(rows[i]) + len(target_ids[i]))
            for b, r in enumerate(chunk)
            for i in riders[r]
        ]
        width = batch.input_ids.shape[1]
        batch_rows, cols, wanted = [], [], []
        for b, i, back in spans:
            n = len(target_ids[i])
            batch_rows.extend([b] * n)
            cols.extend(range(width - back, width - back + n))
            wanted.extend(target_ids[i])
        picked = logits_at(model, batch, batch_rows, cols).float()
        log_probs = torch.log_softmax(picked, dim=-1)
        on_device = torch.tensor(wanted, dtype=torch.long, device=log_probs.device)
        token_lp = log_probs.gather(1, on_device.unsqueeze(-1)).squeeze(-1).cpu()
        hits = (log_probs.argmax(dim=-1) == on_device).cpu()
        at = 0
        for _, i, _ in spans:
            n = len(target_ids[i])
            scores[i] = _make_score(token_lp[at : at + n], hits[at : at + n])
            at += n
        # Batches widen as they go (shortest first), and glibc would keep the freed
        # activation blocks of every pass (see heap.py): on 300 ZsRE cases this took the
        # evaluation's peak from 1,522 to 1,444 MiB.
        release_free_memory()
        bar.update(bar.done + len(chunk))
    bar.close()
    assert all(s is not None for s in scores)
    return scores  # type: ignore[return-value]


def logits_at(
    model: nn.Module, batch: PromptBatch, rows: Sequence[int], cols: Sequence[int]
) -> torch.Tensor:
    """The logits at positions ``(rows[k], cols[k])`` of ``batch``, shape (len(rows), vocab).

    The unembedding runs only there, once per distinct position (rows that share a run
    read the same ones), not at rows × the batch's widest span (up to 64 × 30 × 49,152
    floats on SmolLM2; on 300 ZsRE cases the peak fell from 1,644 to 1,522 MiB). A model
    without an output-embedding module (not a Hugging Face model) gets its logits for the
    last positions, indexed after."""
    device, width = batch.input_ids.device, batch.input_ids.shape[1]
    flat = torch.tensor(rows, dtype=torch.long) * width + torch.tensor(cols, dtype=torch.long)
    find = getattr(model, "get_output_embeddings", None)
    unembed = find() if find is not None else None
    if unembed is None:
        keep = width - int((flat % width).min())
        logits = model(**batch.model_inputs(), logits_to_keep=keep, use_cache=False).logits
        return logits[flat // width, flat % width - (width - keep)]
    unique, back = torch.unique(flat, return_inverse=True)
    at_rows, at_cols = (unique // width).to(device), (unique % width).to(device)
    with edit_input(unembed, lambda hidden: index_on(hidden, at_rows, at_cols).unsqueeze(0)):
        return model(**batch.model_inputs(), use_cache=False).logits[0][back.to(device)]


def _make_score(token_lp: torch.Tensor, hits: torch.Tensor) -> TargetScore:
    values = tuple(float(x) for x in token_lp.double())
    total = float(sum(values))
    return TargetScore(
        logprob=total,
        mean_logprob=total / len(values),
        top1=bool(hits.all()),
        n_tokens=len(values),
        token_logprobs=values,
        token_top1=tuple(bool(x) for x in hits),
    )


@torch.no_grad()
def score_one_by_one(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    targets: Sequence[str],
) -> list[TargetScore]:
    """Reference for :func:`score_targets`: one unpadded row per pass, full logits."""
    _check_pairs(prompts, targets, 1)
    device = _device(model)
    rows, target_ids = _score_rows(tokenizer, prompts, targets)
    scores = []
    for row, ids in zip(rows, target_ids, strict=True):
        logits = model(input_ids=torch.tensor([row], device=device), use_cache=False).logits
        log_probs = torch.log_softmax(logits[0, -len(ids) :].float(), dim=-1).cpu()
        wanted = torch.tensor(ids, dtype=torch.long)
        token_lp = log_probs.gather(1, wanted.unsqueeze(-1)).squeeze(-1)
        scores.append(_make_score(token_lp, log_probs.argmax(dim=-1) == wanted))
    return scores


def compare_targets(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    new: str | Sequence[str],
    old: str | Sequence[str],
    *,
    batch_size: int = 64,
) -> list[TargetComparison]:
    """Score ``new[i]`` and ``old[i]`` after ``prompts[i]`` (a single string is used for
    every prompt); both sets of rows go through the same batched passes."""
    n = len(prompts)
    new_list = [new] * n if isinstance(new, str) else list(new)
    old_list = [old] * n if isinstance(old, str) else list(old)
    for name, values in (("new", new_list), ("old", old_list)):
        if len(values) != n:
            raise ValueError(f"got {n} prompts but {len(values)} {name} targets")
    scores = score_targets(
        model, tokenizer, [*prompts, *prompts], new_list + old_list, batch_size=batch_size
    )
    return [TargetComparison(new=scores[i], old=scores[n + i]) for i in range(n)]


@torch.no_grad()
def greedy_token_ids(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 8,
    batch_size: int = 32,
) -> list[list[int]]:
    """Greedy continuations (token ids, without the end-of-sequence token), batched with
    left padding, explicit positions and the KV cache; a row stops at end of sequence."""
    if isinstance(prompts, str):
        raise TypeError("prompts must be a sequence of strings, not one string")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    rows = _encode_prompts(tokenizer, prompts)
    results: list[list[int]] = [[] for _ in rows]
    if max_new_tokens == 0:
        return results
    for chunk in length_batches(rows, batch_size):
        new = decode_tokens(
            model, tokenizer, [rows[i] for i in chunk], max_new_tokens,
            lambda logits: logits.argmax(dim=-1), stop_at_eos=True,
        )  # fmt: skip
        for i, row in zip(chunk, new, strict=True):
            results[i] = row
    return results


def greedy_completion(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: int = 8,
    *,
    batch_size: int = 32,
) -> list[str]:
    """The greedy continuation of every prompt as text (the prompt itself not included)."""
    ids = greedy_token_ids(
        model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size
    )
    return [tokenizer.decode(row, skip_special_tokens=True) for row in ids]


@dataclass(frozen=True)
class NextTokenScores:
    """What the last position of one prompt says about the next token.

    ``argmax`` is the most likely next token; ``greedy`` is what
    ``greedy_token_ids(..., max_new_tokens=1)`` returns for the prompt (``(argmax,)``, or
    ``()`` when the argmax is the end-of-sequence token); ``logprobs[j]`` is the
    log-probability of the ``j``-th candidate token, what :func:`score_targets` gives a
    one-token target.
    """

    argmax: int
    greedy: tuple[int, ...]
    logprobs: tuple[float, ...]


@torch.no_grad()
def next_token_scores(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    candidates: Sequence[Sequence[int]],
    *,
    batch_size: int = 32,
) -> list[NextTokenScores]:
    """The greedy next token and the log-probabilities of ``candidates[i]`` (token ids)
    after ``prompts[i]``, from one batched pass per group of prompts.

    Both need only the logits at the last prompt position, so the unembedding runs there
    alone (``logits_to_keep=1``). The prompts are batched as :func:`greedy_token_ids`
    batches them (left-padded, shortest first), and the logits are read as it reads them
    (cast to float32), so the greedy token is the one it would pick; a candidate's
    log-probability is a log-softmax over the same float32 row, as in
    :func:`score_targets`. A target of several tokens needs positions after the prompt:
    score it with :func:`score_targets`.
    """
    rows = _encode_prompts(tokenizer, prompts)
    if len(candidates) != len(rows):
        raise ValueError(
            f"got {len(rows)} prompts but {len(candidates)} candidate lists; give one per prompt"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    device = _device(model)
    pad = pad_id_of(tokenizer)
    eos = tokenizer.eos_token_id
    results: list[NextTokenScores | None] = [None] * len(rows)
    for chunk in length_batches(rows, batch_size):
        batch = pad_left([rows[i] for i in chunk], [0] * len(chunk), pad, device)
        logits = model(**batch.model_inputs(), logits_to_keep=1, use_cache=False).logits
        last = logits[:, -1, :].float()
        argmax = last.argmax(dim=-1).tolist()
        log_probs = torch.log_softmax(last, dim=-1).cpu()
        for b, i in enumerate(chunk):
            wanted = torch.tensor(list(candidates[i]), dtype=torch.long)
            values = tuple(float(x) for x in log_probs[b].index_select(0, wanted))
            token = int(argmax[b])
            greedy = () if eos is not None and token == eos else (token,)
            results[i] = NextTokenScores(argmax=token, greedy=greedy, logprobs=values)
    assert all(r is not None for r in results)
    return results  # type: ignore[return-value]
