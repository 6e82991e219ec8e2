"""Benchmark data: CounterFact and zsRE edit cases, read from files or downloaded.

Public API
----------
``load_cases(source, *, limit=None, offset=0, skip_invalid=False, cache=None,
download=True) -> CaseSet``
    ``source`` is a path to a JSON list (or JSONL) file, or one of the public names in
    :data:`PUBLIC_DATASETS` (``"counterfact"``, ``"multi_counterfact"``, ``"zsre"``). A name
    is looked up in the cache folder (``cache``, default :func:`data_cache_dir`) and
    downloaded there when missing (unless ``download=False``). The file's format is detected
    from its first record (see :data:`FORMATS`). ``offset``/``limit`` select records
    ``offset .. offset + limit - 1`` in file order *before* validation, so a case keeps its
    place whatever else is in the file; only the selected records are validated.
``CaseSet``
    ``cases: list[EditCase]``, ``problems: list[RecordProblem]`` (records skipped with
    ``skip_invalid=True``; always empty otherwise), ``dataset`` (``"counterfact"`` or
    ``"zsre"``), ``format`` and ``path``. Iterating or indexing a ``CaseSet`` walks its cases.
``EditCase``
    One case: ``case_id``, ``dataset``, ``request`` (an :class:`EditRequest`),
    ``paraphrase_prompts``, ``neighborhood_prompts`` with their expected answer
    ``neighborhood_answer``, ``generation_prompts``, ``attribute_prompts``,
    ``reference_texts``, plus ``relation_id``/``target_new_id`` (ROME format only: the keys of
    the attribute snippets), ``true_answers`` (zsRE) and ``record_index`` (place in the file).
``DatasetError``
    A malformed file or record; carries ``path``, ``index``, ``case_id``, ``field`` and
    ``reason`` and says all of them in its message.
``DataSourceError``
    A file that cannot be found, read or downloaded.
``data_root(path=None) -> Path``
    The local data folder (``counterfact/``, ``corpus/``, ``general/``): ``path``, else
    ``$SPHERE_EDIT_DATA``.
``resolve_source(source, *, cache=None, download=True) -> Path``,
``download_file(url, destination, *, timeout=60.0) -> Path``
    Name-to-file resolution and the atomic download behind it.
``load_attribute_snippets(path) -> AttributeSnippets``,
``with_reference_texts(cases, snippets) -> list[EditCase]``
    MEMIT's ``attribute_snippets.json`` (Wikipedia text about each relation's targets) and
    a way to attach the snippets about each case's new target as its ``reference_texts``
    (the reference of the consistency metric).

How the formats map onto :class:`EditCase`
------------------------------------------
- ROME/MEMIT CounterFact (``counterfact.json``, ``multi_counterfact.json``): the request
  from ``requested_rewrite``; the neighbourhood prompts' answer is ``target_true``.
- Flat CounterFact (EasyEdit; the shared ``data/counterfact/`` files): ``prompt`` (subject
  verbatim in it), ``target_new``, ``ground_truth``, ``rephrase_prompt``,
  ``locality_prompt`` and its answer ``locality_ground_truth``; no generation prompts.
- zsRE (MEND format, also MEMIT's ``zsre_mem_eval.json``): the request is the question
  ``src`` with ``target_new = alt`` and no ``target_true`` (some records' ``alt`` equals the
  old answer); paraphrase ``rephrase``; neighbourhood the NQ question ``loc`` without its
  ``"nq question: "`` prefix, answered by ``loc_ans``. ``case_id`` is the record's index.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from ..common.fileio import RecordsError, atomic_path, read_records
from ..editing.requests import EditRequest, RequestError
from ..model.loading import cache_dir

ROME_DATA_URL = "https://rome.baulab.info/data/dsets"


@dataclass(frozen=True)
class PublicFile:
    filename: str
    url: str


# The files MEMIT's code downloads; the same names are used in the cache folder.
PUBLIC_DATASETS: dict[str, PublicFile] = {
    "counterfact": PublicFile("counterfact.json", f"{ROME_DATA_URL}/counterfact.json"),
    "multi_counterfact": PublicFile(
        "multi_counterfact.json", f"{ROME_DATA_URL}/multi_counterfact.json"
    ),
    "zsre": PublicFile("zsre_mem_eval.json", f"{ROME_DATA_URL}/zsre_mem_eval.json"),
}
# Reference material of the consistency metric (see :mod:`.metrics`).
PUBLIC_REFERENCE_FILES: dict[str, PublicFile] = {
    "attribute_snippets": PublicFile(
        "attribute_snippets.json", f"{ROME_DATA_URL}/attribute_snippets.json"
    ),
    "idf": PublicFile("idf.npy", f"{ROME_DATA_URL}/idf.npy"),
    "tfidf_vocab": PublicFile("tfidf_vocab.json", f"{ROME_DATA_URL}/tfidf_vocab.json"),
}

COUNTERFACT_ROME = "counterfact-rome"
COUNTERFACT_FLAT = "counterfact-flat"
ZSRE_MEND = "zsre-mend"
FORMATS = (COUNTERFACT_ROME, COUNTERFACT_FLAT, ZSRE_MEND)

NQ_PREFIX = "nq question: "


class DataSourceError(ValueError):
    """A data file that cannot be found, read or downloaded."""


DATA_ENV = "SPHERE_EDIT_DATA"


def data_root(path: str | Path | None = None) -> Path:
    """The local data folder (with ``counterfact/``, ``corpus/`` and ``general/``): ``path``
    when given, else the folder ``$SPHERE_EDIT_DATA`` names. Raises
    :class:`DataSourceError` naming the variable when neither is set; whether the folder
    exists is left to the reads that need it."""
    if path is not None and str(path):
        return Path(path)
    value = os.environ.get(DATA_ENV)
    if not value:
        raise DataSourceError(
            f"no data folder: set {DATA_ENV} to the folder holding counterfact/ and "
            "corpus/ (or pass --data)"
        )
    return Path(value)


class DatasetError(ValueError):
    """A malformed data file or record; the message names the record and the field."""

    def __init__(
        self,
        reason: str,
        *,
        path: Path | str | None = None,
        index: int | None = None,
        case_id: Any = None,
        field: str | None = None,
    ) -> None:
        where = [str(path)] if path is not None else []
        if index is not None:
            record = f"record {index}"
            if case_id is not None:
                record += f" (case_id {case_id!r})"
            where.append(record)
        if field is not None:
            where.append(f"field '{field}'")
        super().__init__(", ".join(where) + ": " + reason if where else reason)
        self.reason = reason
        self.path = path
        self.index = index
        self.case_id = case_id
        self.field = field


@dataclass(frozen=True)
class RecordProblem:
    """A record that ``skip_invalid=True`` left out, and why."""

    index: int
    case_id: Any
    field: str | None
    reason: str

    def __str__(self) -> str:
        return str(
            DatasetError(self.reason, index=self.index, case_id=self.case_id, field=self.field)
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class EditCase:
    """One benchmark case: an edit request and the prompts that test it.

    Prompts other than the request's are full texts (the subject filled in). Every
    neighbourhood prompt expects ``neighborhood_answer`` (CounterFact: the old target,
    zsRE: the NQ answer); paraphrase prompts expect ``request.target_new``.
    """

    case_id: int | str
    dataset: str
    request: EditRequest
    paraphrase_prompts: tuple[str, ...]
    neighborhood_prompts: tuple[str, ...]
    neighborhood_answer: str
    generation_prompts: tuple[str, ...] = ()
    attribute_prompts: tuple[str, ...] = ()
    reference_texts: tuple[str, ...] = ()
    relation_id: str | None = None
    target_new_id: str | None = None
    true_answers: tuple[str, ...] = ()
    record_index: int | None = None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["request"] = self.request.to_dict()
        return data


@dataclass
class CaseSet:
    """The cases read from one file, and the records skipped as invalid."""

    cases: list[EditCase]
    problems: list[RecordProblem]
    dataset: str
    format: str
    path: Path

    def __len__(self) -> int:
        return len(self.cases)

    def __iter__(self) -> Iterator[EditCase]:
        return iter(self.cases)

    def __getitem__(self, index: int) -> EditCase:
        return self.cases[index]


# -- reading files ---------------------------------------------------------------------


def data_cache_dir() -> Path:
    """Where downloaded data files live: ``<sphere-edit cache>/data``."""
    return cache_dir() / "data"


def resolve_source(
    source: str | Path, *, cache: str | Path | None = None, download: bool = True
) -> Path:
    """The file for ``source``: an existing path as is, a public name from the cache
    (downloaded first when missing and ``download`` is true)."""
    path = Path(source)
    if path.is_file():
        return path
    if path.is_dir():
        raise DataSourceError(f"{path} is a folder; give the data file itself")
    name = str(source)
    if name not in PUBLIC_DATASETS:
        names = ", ".join(PUBLIC_DATASETS)
        raise DataSourceError(
            f"{name!r} is neither an existing file nor a public dataset name ({names})"
        )
    public = PUBLIC_DATASETS[name]
    target = Path(cache) if cache is not None else data_cache_dir()
    target = target / public.filename
    if target.is_file():
        return target
    if not download:
        raise DataSourceError(
            f"{name} is not in the cache ({target}) and downloading is off; pass the path "
            f"of a local copy of {public.filename} instead"
        )
    return download_file(public.url, target)


def download_file(url: str, destination: str | Path, *, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``destination`` atomically (a partial download never appears
    under the final name)."""
    destination = Path(destination)
    try:
        with atomic_path(destination) as tmp:
            with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as out:
                expected = response.headers.get("Content-Length")
                written = 0
                while block := response.read(1 << 20):
                    out.write(block)
                    written += len(block)
            if expected is not None and written != int(expected):
                raise DataSourceError(
                    f"download of {url} stopped after {written} of {expected} bytes"
                )
    except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
        reason = getattr(error, "reason", error)
        raise DataSourceError(
            f"cannot download {url} ({reason}). Without network access, fetch "
            f"{destination.name} elsewhere and pass its local path instead of the name "
            f"(or put it at {destination})"
        ) from None
    return destination


def _read_records(path: Path) -> list[Any]:
    try:
        return read_records(path, what="data file")
    except RecordsError as error:
        if error.unreadable:
            raise DataSourceError(str(error)) from None
        raise DatasetError(error.reason, path=path) from None


def detect_format(record: Any) -> str | None:
    """The format of a record, judged from its keys (``None`` if none fits)."""
    if not isinstance(record, Mapping):
        return None
    if "requested_rewrite" in record:
        return COUNTERFACT_ROME
    if "src" in record and "alt" in record:
        return ZSRE_MEND
    if "prompt" in record and "target_new" in record:
        return COUNTERFACT_FLAT
    return None


def load_cases(
    source: str | Path,
    *,
    limit: int | None = None,
    offset: int = 0,
    skip_invalid: bool = False,
    cache: str | Path | None = None,
    download: bool = True,
) -> CaseSet:
    """Read edit cases from a file or a public dataset name (see the module docstring)."""
    if offset < 0:
        raise ValueError(f"offset must be >= 0, got {offset}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0 or None, got {limit}")
    path = resolve_source(source, cache=cache, download=download)
    records = _read_records(path)
    if not isinstance(records, list):
        raise DatasetError(
            f"expected a JSON list of records, got {type(records).__name__}", path=path
        )
    if not records:
        raise DatasetError("the file holds no records", path=path)
    fmt = detect_format(records[0])
    if fmt is None:
        raise DatasetError(
            "unknown record format: expected 'requested_rewrite' (ROME CounterFact), "
            "'prompt' + 'target_new' (flat CounterFact) or 'src' + 'alt' (zsRE MEND)",
            path=path,
            index=0,
        )
    parse = _PARSERS[fmt]
    stop = len(records) if limit is None else min(len(records), offset + limit)
    cases: list[EditCase] = []
    problems: list[RecordProblem] = []
    seen_ids: dict[Any, int] = {}
    for index in range(offset, stop):
        record = records[index]
        case_id = record.get("case_id") if isinstance(record, Mapping) else None
        try:
            case = parse(record, index)
            if case.case_id in seen_ids:
                raise _RecordError(
                    f"duplicates the case_id of record {seen_ids[case.case_id]}", "case_id"
                )
        except _RecordError as error:
            if not skip_invalid:
                raise DatasetError(
                    error.reason, path=path, index=index, case_id=case_id, field=error.field
                ) from None
            problems.append(RecordProblem(index, case_id, error.field, error.reason))
            continue
        seen_ids[case.case_id] = index
        cases.append(case)
    dataset = "zsre" if fmt == ZSRE_MEND else "counterfact"
    return CaseSet(cases=cases, problems=problems, dataset=dataset, format=fmt, path=path)


# -- one record per format ---------------------------------------------------------------


class _RecordError(Exception):
    """Raised inside a parser; :func:`load_cases` adds the path, index and case id."""

    def __init__(self, reason: str, field: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.field = field


def _require(record: Mapping[str, Any], key: str, prefix: str = "") -> Any:
    if key not in record:
        raise _RecordError("is missing", prefix + key)
    return record[key]


def _text(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise _RecordError(f"must be a string, got {type(value).__name__}", name)
    if not value.strip():
        raise _RecordError("must not be empty", name)
    return value


def _texts(value: Any, name: str, *, allow_single: bool = False) -> tuple[str, ...]:
    # The flat format sometimes holds one prompt where others hold a list.
    if allow_single and isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise _RecordError(f"must be a list of strings, got {type(value).__name__}", name)
    return tuple(_text(item, f"{name}[{i}]") for i, item in enumerate(value))


def _target(value: Any, name: str) -> tuple[str, str | None]:
    """A target's text and, for ROME's ``{"str": ..., "id": ...}`` objects, its id."""
    if isinstance(value, Mapping):
        if "str" not in value:
            raise _RecordError("is an object without a 'str' entry", name)
        target_id = value.get("id")
        return _text(value["str"], name + ".str"), None if target_id is None else str(target_id)
    return _text(value, name), None


def _request(
    prompt: str, subject: str, new: str, old: str | None, fields: Mapping[str, str]
) -> EditRequest:
    """Build the request, naming the file's own field when it is invalid."""
    try:
        return EditRequest.create(prompt, subject, new, old)
    except RequestError as error:
        raise _RecordError(error.reason, fields.get(error.field or "", error.field)) from None


def _case_id(record: Mapping[str, Any]) -> int | str:
    value = _require(record, "case_id")
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise _RecordError(f"must be an integer or a string, got {type(value).__name__}", "case_id")
    return value


def _mapping(record: Any) -> Mapping[str, Any]:
    if not isinstance(record, Mapping):
        raise _RecordError(f"must be a JSON object, got {type(record).__name__}")
    return record


def _parse_rome(record: Any, index: int) -> EditCase:
    record = _mapping(record)
    case_id = _case_id(record)
    rewrite = _require(record, "requested_rewrite")
    if not isinstance(rewrite, Mapping):
        raise _RecordError("must be a JSON object", "requested_rewrite")
    p = "requested_rewrite."
    prompt = _text(_require(rewrite, "prompt", p), p + "prompt")
    subject = _text(_require(rewrite, "subject", p), p + "subject")
    new, new_id = _target(_require(rewrite, "target_new", p), p + "target_new")
    old, _ = _target(_require(rewrite, "target_true", p), p + "target_true")
    relation = rewrite.get("relation_id")
    fields = {name: p + name for name in ("prompt", "subject", "target_new", "target_true")}
    return EditCase(
        case_id=case_id,
        dataset="counterfact",
        request=_request(prompt, subject, new, old, fields),
        paraphrase_prompts=_texts(_require(record, "paraphrase_prompts"), "paraphrase_prompts"),
        neighborhood_prompts=_texts(
            _require(record, "neighborhood_prompts"), "neighborhood_prompts"
        ),
        neighborhood_answer=old,
        generation_prompts=_texts(record.get("generation_prompts", []), "generation_prompts"),
        attribute_prompts=_texts(record.get("attribute_prompts", []), "attribute_prompts"),
        relation_id=None if relation is None else str(relation),
        target_new_id=new_id,
        record_index=index,
    )


def _parse_flat(record: Any, index: int) -> EditCase:
    record = _mapping(record)
    case_id = _case_id(record)
    prompt = _text(_require(record, "prompt"), "prompt")
    subject = _text(_require(record, "subject"), "subject")
    new, _ = _target(_require(record, "target_new"), "target_new")
    old, _ = _target(_require(record, "ground_truth"), "ground_truth")
    answer = record.get("locality_ground_truth", old)
    return EditCase(
        case_id=case_id,
        dataset="counterfact",
        request=_request(prompt, subject, new, old, {"target_true": "ground_truth"}),
        paraphrase_prompts=_texts(
            _require(record, "rephrase_prompt"), "rephrase_prompt", allow_single=True
        ),
        neighborhood_prompts=_texts(
            _require(record, "locality_prompt"), "locality_prompt", allow_single=True
        ),
        neighborhood_answer=_text(answer, "locality_ground_truth"),
        record_index=index,
    )


def _parse_zsre(record: Any, index: int) -> EditCase:
    record = _mapping(record)
    question = _text(_require(record, "src"), "src")
    subject = _text(_require(record, "subject"), "subject")
    new = _text(_require(record, "alt"), "alt")
    answers = _texts(record.get("answers", []), "answers", allow_single=True)
    loc = _text(_require(record, "loc"), "loc")
    if loc.startswith(NQ_PREFIX):
        loc = _text(loc[len(NQ_PREFIX) :], "loc")
    fields = {"prompt": "src", "target_new": "alt"}
    return EditCase(
        case_id=index,
        dataset="zsre",
        request=_request(question, subject, new, None, fields),
        paraphrase_prompts=_texts(_require(record, "rephrase"), "rephrase", allow_single=True),
        neighborhood_prompts=(loc,),
        neighborhood_answer=_text(_require(record, "loc_ans"), "loc_ans"),
        true_answers=answers,
        record_index=index,
    )


_PARSERS = {COUNTERFACT_ROME: _parse_rome, COUNTERFACT_FLAT: _parse_flat, ZSRE_MEND: _parse_zsre}


# -- reference texts for the consistency metric -----------------------------------------


@dataclass(frozen=True)
class AttributeSnippets:
    """Text snippets about each (relation, target) pair, as in MEMIT's
    ``attribute_snippets.json``: ``texts[(relation_id, target_id)]``."""

    texts: Mapping[tuple[str, str], tuple[str, ...]] = field(default_factory=dict)

    def for_case(self, case: EditCase) -> tuple[str, ...]:
        if case.relation_id is None or case.target_new_id is None:
            return ()
        return self.texts.get((case.relation_id, case.target_new_id), ())


def load_attribute_snippets(path: str | Path) -> AttributeSnippets:
    """Read ``attribute_snippets.json``: a list of ``{"relation_id", "target_id",
    "samples": [{"text": ...}, ...]}`` records."""
    path = Path(path)
    records = _read_records(path)
    if not isinstance(records, list):
        raise DatasetError("expected a JSON list of records", path=path)
    texts: dict[tuple[str, str], list[str]] = {}
    for index, record in enumerate(records):
        try:
            record = _mapping(record)
            relation = str(_require(record, "relation_id"))
            target = str(_require(record, "target_id"))
            samples = _require(record, "samples")
            if not isinstance(samples, list):
                raise _RecordError("must be a list", "samples")
            for j, sample in enumerate(samples):
                if not isinstance(sample, Mapping):
                    raise _RecordError("must be a JSON object", f"samples[{j}]")
                text = _text(_require(sample, "text", f"samples[{j}]."), f"samples[{j}].text")
                texts.setdefault((relation, target), []).append(text)
        except _RecordError as error:
            raise DatasetError(error.reason, path=path, index=index, field=error.field) from None
    return AttributeSnippets({key: tuple(value) for key, value in texts.items()})


def with_reference_texts(cases: Sequence[EditCase], snippets: AttributeSnippets) -> list[EditCase]:
    """The cases with ``reference_texts`` set to the snippets about their new target
    (cases without a relation and target id are returned unchanged)."""
    out = []
    for case in cases:
        texts = snippets.for_case(case)
        out.append(replace(case, reference_texts=texts) if texts else case)
    return out
