"""Reading the RECT general-ability files into prompts and gold answers."""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..data import DATA_ENV, DataSourceError, data_root
from .prompts import GeneralDataError, boolq_prompt, gsm8k_gold, gsm8k_prompt, nq_prompt, rte_prompt

DEFAULT_N_ITEMS = 200


@dataclass(frozen=True)
class Example:
    """One item: its prompt and its gold answer (a number for GSM8K, a label for RTE and
    BoolQ, a list of acceptable strings for NQ)."""

    prompt: str
    gold: Any


def resolve_data_dir(data_dir: str | Path | None = None) -> Path:
    """The folder of the general-ability files: ``data_dir`` itself or its ``general/``
    subfolder; by default ``$SPHERE_EDIT_DATA/general``."""
    if data_dir is None:
        try:
            data_dir = data_root()
        except DataSourceError:
            raise GeneralDataError(
                f"no data folder: pass one (--data) or set {DATA_ENV} to the folder "
                "holding general/"
            ) from None
    path = Path(data_dir)
    if (path / "general").is_dir():
        path = path / "general"
    if not path.is_dir():
        raise GeneralDataError(f"data folder {path} does not exist")
    return path


def _jsonl(path: Path, n_items: int) -> list[dict[str, Any]]:
    records = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if len(records) >= n_items:
                break
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise GeneralDataError(f"{path}:{number}: not JSON ({error})") from None
    return records


def _field(record: Mapping[str, Any], name: str, path: Path, number: int) -> Any:
    if name not in record:
        raise GeneralDataError(
            f"{path}: record {number} has no field {name!r} (fields: {', '.join(record)})"
        )
    return record[name]


def load_gsm8k(path: str | Path, n_items: int = DEFAULT_N_ITEMS) -> list[Example]:
    path = Path(path)
    examples = []
    for i, record in enumerate(_jsonl(path, n_items), 1):
        question, answer = _field(record, "question", path, i), _field(record, "answer", path, i)
        examples.append(Example(gsm8k_prompt(question, answer), gsm8k_gold(answer)))
    return examples


def load_rte(path: str | Path, n_items: int = DEFAULT_N_ITEMS) -> list[Example]:
    path = Path(path)
    labels = {"entailment": True, "not_entailment": False}
    examples = []
    with open(path, encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        for i, record in enumerate(reader, 1):
            if len(examples) >= n_items:
                break
            label = _field(record, "label", path, i)
            if label not in labels:
                raise GeneralDataError(f"{path}: record {i} has label {label!r}")
            s1, s2 = _field(record, "sentence1", path, i), _field(record, "sentence2", path, i)
            examples.append(Example(rte_prompt(s1, s2), labels[label]))
    return examples


def load_nq(path: str | Path, n_items: int = DEFAULT_N_ITEMS) -> list[Example]:
    path = Path(path)
    examples = []
    for i, record in enumerate(_jsonl(path, n_items), 1):
        answers = _field(record, "answer", path, i)
        output = _field(record, "output", path, i)
        passage = output[0] if isinstance(output, list) and output else output
        if not isinstance(passage, str):
            raise GeneralDataError(f"{path}: record {i} has no passage in 'output'")
        golds = [answers] if isinstance(answers, str) else [str(a) for a in answers]
        examples.append(
            Example(nq_prompt(_field(record, "question", path, i), passage.strip()), golds)
        )
    return examples


def load_boolq(path: str | Path, n_items: int = DEFAULT_N_ITEMS) -> list[Example]:
    path = Path(path)
    examples = []
    for i, record in enumerate(_jsonl(path, n_items), 1):
        answer = _field(record, "answer", path, i)
        if isinstance(answer, str) and answer.lower() in ("true", "false"):
            answer = answer.lower() == "true"
        if not isinstance(answer, bool):
            raise GeneralDataError(f"{path}: record {i} has answer {answer!r}, not true/false")
        prompt = boolq_prompt(
            _field(record, "question", path, i), _field(record, "passage", path, i)
        )
        examples.append(Example(prompt, answer))
    return examples
