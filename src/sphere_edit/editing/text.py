"""Tokenisation helpers: subject positions, target tokens, left-padded batches.

Batches are left-padded with explicit ``position_ids`` so that (a) every real token keeps
the position it has when run alone, for absolute-position models like GPT-2 too, and
(b) the last positions of every row line up, which lets the unembedding run only there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from .requests import EditRequest, RequestError


def join_target(prompt_text: str, target: str) -> str:
    """The prompt followed by the target, with one space between them unless present."""
    if prompt_text.endswith((" ", "\n")) or target.startswith((" ", "\n")):
        return prompt_text + target
    return prompt_text + " " + target


def check_targets(tokenizer: PreTrainedTokenizerBase, requests: Sequence[EditRequest]) -> None:
    """Refuse, before anything is edited, a request whose target tokenises to nothing."""
    for i, request in enumerate(requests):
        try:
            target_token_ids(tokenizer, request.text, request.target_new)
        except RequestError as error:
            raise RequestError(error.reason, index=i, field=error.field) from None


def encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def target_token_ids(
    tokenizer: PreTrainedTokenizerBase, prompt_text: str, target: str, *, field: str = "target_new"
) -> list[int]:
    """Token ids of ``target`` as it continues ``prompt_text``.

    Tokenised in context (prompt + target minus prompt) so that word-boundary markers
    come out as in running text; falls back to the target alone when the prompt's own
    tokens change at the boundary.
    """
    prompt_ids = encode(tokenizer, prompt_text)
    full_ids = encode(tokenizer, join_target(prompt_text, target))
    if full_ids[: len(prompt_ids)] == prompt_ids and len(full_ids) > len(prompt_ids):
        ids = full_ids[len(prompt_ids) :]
    else:
        spaced = join_target(" " if prompt_text else "", target)
        ids = list(tokenizer(spaced, add_special_tokens=False)["input_ids"])
    # A trailing end-of-sequence token is not part of the target.
    if ids and tokenizer.eos_token_id is not None and ids[-1] == tokenizer.eos_token_id:
        ids = ids[:-1]
    # A target of special tokens only (e.g. the eos text) leaves at most the separating
    # space that join_target inserted: that is no target either.
    if not ids or not tokenizer.decode(ids, skip_special_tokens=True).strip():
        raise RequestError(f"{target!r} tokenises to nothing", field=field)
    return ids


def last_token_index(tokenizer: PreTrainedTokenizerBase, text: str, char_end: int) -> int:
    """Index of the token holding character ``char_end - 1`` of ``text``."""
    if tokenizer.is_fast:
        enc = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
        best = -1
        for i, (start, stop) in enumerate(enc["offset_mapping"]):
            if stop > start and start < char_end:
                best = i
        if best >= 0:
            return best
    return len(encode(tokenizer, text[:char_end])) - 1


@dataclass
class PromptBatch:
    """Left-padded token ids, mask, positions, and one lookup position per row."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    lookup: torch.Tensor  # (rows,) absolute column of the subject's last token
    lengths: torch.Tensor  # (rows,) real tokens per row

    def model_inputs(self) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "position_ids": self.position_ids,
        }

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def pad_left(
    rows: Sequence[Sequence[int]], lookups: Sequence[int], pad_id: int, device: torch.device
) -> PromptBatch:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row) :] = 1
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
    lookup = torch.tensor(lookups, dtype=torch.long) + (width - lengths)
    return PromptBatch(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        position_ids=positions.to(device),
        lookup=lookup.to(device),
        lengths=lengths.to(device),
    )


def pad_id_of(tokenizer: PreTrainedTokenizerBase) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


@dataclass(frozen=True)
class SubjectPrompt:
    """A prompt text with the character span of its subject."""

    text: str
    subject_end: int

    @classmethod
    def build(cls, request: EditRequest, context: str = "{}", template: str | None = None):
        """Fill ``template`` (default: the request's prompt) into ``context``."""
        template = request.prompt if template is None else template
        prefix, _, _ = context.partition("{}")
        head, _, tail = template.partition("{}")
        text = context.replace("{}", head + request.subject + tail, 1)
        return cls(text=text, subject_end=len(prefix) + len(head) + len(request.subject))


def encode_subject_prompts(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[SubjectPrompt],
    device: torch.device,
    suffixes: Sequence[Sequence[int]] | None = None,
) -> PromptBatch:
    """Encode prompts (each optionally followed by extra token ids), left-padded."""
    rows, lookups = [], []
    for i, prompt in enumerate(prompts):
        ids = encode(tokenizer, prompt.text)
        if suffixes is not None:
            ids = ids + list(suffixes[i])
        rows.append(ids)
        lookups.append(last_token_index(tokenizer, prompt.text, prompt.subject_end))
    return pad_left(rows, lookups, pad_id_of(tokenizer), device)
