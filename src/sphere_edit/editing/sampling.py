"""Text sampled from the model itself: context templates and a fallback corpus."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from ..model.placement import input_device
from .text import encode, pad_id_of, pad_left

CONTEXT_STARTS = ("The", "Therefore", "Because", "I", "You")
CORPUS_STARTS = (
    "The", "In", "A", "It", "He", "She", "This", "When", "After", "According to",
    "During", "Many", "Some", "One", "There", "We", "Today", "The history of",
    "Scientists", "The city of",
)  # fmt: skip


@torch.no_grad()
def sample_continuations(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    starts: Sequence[str],
    *,
    new_tokens: int | Sequence[int],
    top_k: int,
    seed: int,
    batch_size: int = 32,
) -> list[str]:
    """Top-k sampling from ``starts`` with a private generator (no global RNG use);
    ``new_tokens`` is one count for all starts or one per start."""
    device = input_device(model)
    generator = torch.Generator(device="cpu").manual_seed(seed)

    def sample(logits: torch.Tensor) -> torch.Tensor:
        top_values, top_index = logits.topk(top_k, dim=-1)
        probs = torch.softmax(top_values, dim=-1).cpu()
        choice = torch.multinomial(probs, 1, generator=generator).to(device)
        return top_index.gather(1, choice).squeeze(1)

    texts: list[str] = []
    for begin in range(0, len(starts), batch_size):
        chunk = list(starts[begin : begin + batch_size])
        rows = [encode(tokenizer, s) for s in chunk]
        counts = (
            [new_tokens] * len(chunk)
            if isinstance(new_tokens, int)
            else list(new_tokens[begin : begin + len(chunk)])
        )
        # A row's token at a step depends only on its own prefix, so the rows asking
        # for fewer tokens are the longest decoding cut short.
        new = decode_tokens(model, tokenizer, rows, max(counts), sample)
        for start, row, count in zip(chunk, new, counts, strict=True):
            texts.append(start + tokenizer.decode(row[:count], skip_special_tokens=True))
    return texts


@torch.no_grad()
def decode_tokens(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    rows: Sequence[Sequence[int]],
    new_tokens: int,
    pick: Callable[[torch.Tensor], torch.Tensor],
    *,
    stop_at_eos: bool = False,
) -> list[list[int]]:
    """Extend every row by up to ``new_tokens`` tokens chosen by ``pick(logits) -> ids``,
    in one left-padded batch with explicit positions and the key/value cache. With
    ``stop_at_eos`` a row ends at the end-of-sequence token (not included)."""
    device = input_device(model)
    batch = pad_left(rows, [0] * len(rows), pad_id_of(tokenizer), device)
    mask, step_ids, step_pos = batch.attention_mask, batch.input_ids, batch.position_ids
    cache_arg = cache_argument(model)
    eos = tokenizer.eos_token_id if stop_at_eos else None
    results: list[list[int]] = [[] for _ in rows]
    finished = [False] * len(rows)
    past = None
    for _ in range(new_tokens):
        cache_kwargs = {} if past is None else {cache_arg: past}
        out = model(
            input_ids=step_ids,
            attention_mask=mask,
            position_ids=step_pos,
            use_cache=True,
            logits_to_keep=1,
            **cache_kwargs,
        )
        past = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
        next_ids = pick(out.logits[:, -1, :].float())
        for r, token in enumerate(next_ids.tolist()):
            if finished[r]:
                continue
            if eos is not None and token == eos:
                finished[r] = True
            else:
                results[r].append(token)
        if all(finished):
            break
        step_ids = next_ids.unsqueeze(1)
        step_pos = step_pos[:, -1:] + 1
        mask = torch.cat([mask, torch.ones_like(step_ids)], dim=1)
    return results


def cache_argument(model: nn.Module) -> str:
    # transformers renamed ``past_key_values`` to ``cache`` in 5.x.
    parameters = inspect.signature(model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


TEMPLATE_LENGTH = 10
"""The authors' ``max_out_len`` for the context templates: prompt and new tokens together."""


def template_new_tokens(
    tokenizer: PreTrainedTokenizerBase, starts: Sequence[str], template_tokens: str | int
) -> list[int]:
    """New tokens to sample after each start word. ``"authors"``: MEMIT's recipe, whose
    ``max_out_len`` of :data:`TEMPLATE_LENGTH` counts the prompt as their tokenizer call
    counts it (a beginning-of-sequence token included when the tokenizer adds one);
    an integer: that many new tokens after every start (10: sphere-edit's old recipe)."""
    template_tokens = parse_template_tokens(template_tokens)
    if template_tokens == "authors":
        return [max(TEMPLATE_LENGTH - len(encode(tokenizer, s)), 0) for s in starts]
    return [int(template_tokens)] * len(starts)


class TemplateTokensError(ValueError):
    pass


def parse_template_tokens(value: str | int) -> str | int:
    """``"authors"`` or a positive count, from the CLI, a preset or a journal."""
    if isinstance(value, str) and value.strip().lower() == "authors":
        return "authors"
    try:
        count = int(value.strip()) if isinstance(value, str) else value
    except ValueError:
        count = None
    if isinstance(count, bool) or not isinstance(count, int):
        raise TemplateTokensError(
            f"template_tokens: cannot read {value!r}; give 'authors' or a number of new "
            "tokens such as 10"
        )
    if count < 1:
        raise TemplateTokensError(f"template_tokens: must be at least 1, got {count}")
    return count


def generate_context_templates(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    *,
    seed: int = 0,
    starts: Sequence[str] = CONTEXT_STARTS,
    new_tokens: int | None = None,
    template_tokens: str | int = "authors",
) -> list[str]:
    """``["{}"]`` plus one short model-written prefix per start word, as in MEMIT.
    ``template_tokens`` sets how many tokens are sampled (:func:`template_new_tokens`);
    ``new_tokens``, when given, is that many after every start."""
    counts = template_new_tokens(
        tokenizer, starts, template_tokens if new_tokens is None else new_tokens
    )
    samples = sample_continuations(model, tokenizer, starts, new_tokens=counts, top_k=5, seed=seed)
    templates = ["{}"]
    for sample in samples:
        clean = " ".join(sample.replace("{", " ").replace("}", " ").split())
        templates.append(clean + ". {}")
    return templates


def sample_corpus(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    *,
    n_texts: int,
    new_tokens: int,
    seed: int,
) -> list[str]:
    """Model-written text for key statistics when no corpus is given."""
    starts = [CORPUS_STARTS[i % len(CORPUS_STARTS)] for i in range(n_texts)]
    # One wide batch: on a CPU a decoding step costs about the same for 1 row or 128
    # (it is bound by reading the weights), so the step count is what matters.
    return sample_continuations(
        model, tokenizer, starts, new_tokens=new_tokens, top_k=40, seed=seed, batch_size=128
    )
