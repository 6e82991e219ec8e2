"""Text sampled from the model itself: context templates and a fallback corpus."""

from __future__ import annotations

import inspect
from collections.abc import Sequence

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
    pad = pad_id_of(tokenizer)
    cache_arg = cache_argument(model)
    texts: list[str] = []
    for begin in range(0, len(starts), batch_size):
        chunk = list(starts[begin : begin + batch_size])
        rows = [encode(tokenizer, s) for s in chunk]
        batch = pad_left(rows, [0] * len(rows), pad, device)
        ids, mask, pos = batch.input_ids, batch.attention_mask, batch.position_ids
        generated: list[torch.Tensor] = []
        past = None
        step_ids, step_pos = ids, pos
        for _ in range(new_tokens):
            cache_kwargs = {} if past is None else {cache_arg: past}
            out = model(
                input_ids=step_ids,
                attention_mask=mask,
                position_ids=step_pos,
                use_cache=True,
                **cache_kwargs,
            )
            past = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
            logits = out.logits[:, -1, :].float()
            top_values, top_index = logits.topk(top_k, dim=-1)
            probs = torch.softmax(top_values, dim=-1).cpu()
            choice = torch.multinomial(probs, 1, generator=generator).to(device)
            next_ids = top_index.gather(1, choice)
            generated.append(next_ids)
            step_ids = next_ids
            step_pos = step_pos[:, -1:] + 1
            mask = torch.cat([mask, torch.ones_like(next_ids)], dim=1)
        new = torch.cat(generated, dim=1)
        for start, row in zip(chunk, new.tolist(), strict=True):
            texts.append(start + tokenizer.decode(row, skip_special_tokens=True))
    return texts


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
    return sample_continuations(
        model, tokenizer, starts, new_tokens=new_tokens, top_k=40, seed=seed
    )
