"""The general-ability tasks' prompts and answer parsing (RECT's protocol, see the package)."""

from __future__ import annotations

import re
import string
import unicodedata
from collections.abc import Mapping, Sequence
from decimal import Decimal

# Ten tokens: SmolLM2's and Gemma's tokenizers write one digit per token, so a
# six-figure answer with its thousands separator ("100,000") and the space before it
# already takes eight.
GSM8K_NEW_TOKENS = 10
NQ_NEW_TOKENS = 20
RTE_CHOICES = (" True", " False")
BOOLQ_CHOICES = (" yes", " no")


class GeneralDataError(ValueError):
    """A general-ability data file is missing or not in the expected format."""


# -- prompts ---------------------------------------------------------------------------------


def gsm8k_rationale(answer: str) -> str:
    """The gold solution text before ``####``."""
    return answer.split("####", 1)[0].strip()


def gsm8k_gold(answer: str) -> Decimal:
    """The gold number after ``####`` (thousands separators removed)."""
    if "####" not in answer:
        raise GeneralDataError(f"GSM8K answer has no '####': {answer[-60:]!r}")
    numbers = extract_numbers(answer.rsplit("####", 1)[1])
    if not numbers:
        raise GeneralDataError(f"GSM8K answer has no number after '####': {answer[-60:]!r}")
    return numbers[0]


def gsm8k_prompt(question: str, answer: str) -> str:
    return (
        f"Q: {question} A: Let's think step by step. {gsm8k_rationale(answer)} "
        "Therefore, the answer (arabic numerals) is:"
    )


def rte_prompt(sentence1: str, sentence2: str) -> str:
    return f"{sentence1} entails {sentence2}. True or False? answer:"


def nq_prompt(question: str, passage: str) -> str:
    return (
        "Refer to the passage below and answer the following question.\n"
        f"Passage: {passage}\nQuestion: {question}\nAnswer:"
    )


def boolq_prompt(question: str, passage: str) -> str:
    return (
        "Please answer the given question based on the passage. The answer should be "
        f"exact 'yes' or 'no'. passage: {passage} question: {question}. answer:"
    )


# -- answer parsing --------------------------------------------------------------------------

# A number not glued to a word or a decimal point: thousands groups only when every group
# has three digits ("1,000,000"), else plain digits; an optional decimal part.
_NUMBER = re.compile(r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?")


def extract_numbers(text: str) -> list[Decimal]:
    """Every number in ``text``, in order: ``"$1,000.50 and -3"`` → ``[1000.50, -3]``."""
    return [Decimal(match.group().replace(",", "")) for match in _NUMBER.finditer(text)]


def gsm8k_correct(generated: str, gold: Decimal, *, truncated: bool = False) -> bool:
    """Whether a number of ``generated`` equals ``gold``. With ``truncated`` (the
    generation stopped at the token limit) a number running into the end of the text may
    be cut short, so it does not count."""
    text = generated
    if truncated and text and text[-1].isdigit():
        cut = _NUMBER.search(text[::-1])
        text = text[: len(text) - cut.end()] if cut else text
    return any(number == gold for number in extract_numbers(text))


_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD-style: lower-case, drop punctuation, drop the articles a/an/the, collapse
    whitespace."""
    text = text.lower()
    text = "".join(
        ch for ch in text if ch not in _PUNCTUATION and not unicodedata.category(ch).startswith("P")
    )
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def span_match(generated: str, golds: Sequence[str]) -> bool:
    """Whether some gold answer, normalised, is a contiguous run of words of the
    normalised generation (a gold answer that normalises to nothing never matches)."""
    words = normalize_answer(generated).split()
    for gold in golds:
        wanted = normalize_answer(gold).split()
        if not wanted:
            continue
        for begin in range(len(words) - len(wanted) + 1):
            if words[begin : begin + len(wanted)] == wanted:
                return True
    return False


def parse_choice(text: str, choices: Mapping[str, bool]) -> bool | None:
    """Map a one-token answer to a label: surrounding whitespace and punctuation are
    dropped, case ignored; ``None`` when it is none of ``choices``."""
    word = text.strip().strip(string.punctuation + " \t\n").lower()
    return choices.get(word)


TRUE_FALSE = {"true": True, "false": False}
YES_NO = {"yes": True, "no": False}
