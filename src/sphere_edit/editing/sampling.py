"""Text sampled from the model itself: context templates and a fallback corpus."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

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
    new_tokens: int,
    top_k: int,
    seed: int,
    batch_size: int = 32,
) -> list[str]:
    """Top-k sampling from ``starts`` with a private generator (no global RNG use)."""
    device = next(model.parameters()).device
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
        new = decode_tokens(model, tokenizer, rows, new_tokens, sample)
        for start, row in zip(chunk, new, strict=True):
            texts.append(start + tokenizer.decode(row, skip_special_tokens=True))
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
    device = next(model.parameters()).device
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


def generate_context_templates(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    *,
    seed: int = 0,
    starts: Sequence[str] = CONTEXT_STARTS,
    new_tokens: int = 10,
) -> list[str]:
    """``["{}"]`` plus one short model-written prefix per start word, as in MEMIT."""
    samples = sample_continuations(
        model, tokenizer, starts, new_tokens=new_tokens, top_k=5, seed=seed
    )
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
