"""Edit requests: what to change, validated before any model is touched."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..common.fileio import RecordsError, read_records

MAX_FIELD_CHARS = 2000


class RequestError(ValueError):
    """A request (or a request file) is invalid; names the request and field."""

    def __init__(self, message: str, *, index: int | None = None, field: str | None = None):
        where = []
        if index is not None:
            where.append(f"request {index}")
        if field is not None:
            where.append(f"field '{field}'")
        prefix = (", ".join(where) + ": ") if where else ""
        super().__init__(prefix + message)
        self.reason = message  # without the "request i, field f: " prefix
        self.index = index
        self.field = field

    def at(self, index: int, field: str | None = None) -> RequestError:
        """The same reason for request ``index`` of the caller's batch (and ``field``,
        default this error's): what a loop over one request at a time raises."""
        return RequestError(self.reason, index=index, field=field or self.field)


@dataclass(frozen=True)
class EditRequest:
    """Make the model complete ``prompt`` (with ``subject`` in it) with ``target_new``.

    ``prompt`` is a template with ``{}`` where the subject goes, e.g.
    ``"{} plays the"``; a prompt in which the subject occurs verbatim is accepted and
    turned into a template at its first occurrence.
    """

    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None

    @property
    def text(self) -> str:
        """The prompt with the subject filled in."""
        return self.prompt.replace("{}", self.subject, 1)

    @classmethod
    def create(
        cls,
        prompt: str,
        subject: str,
        target_new: str,
        target_true: str | None = None,
        *,
        index: int | None = None,
    ) -> EditRequest:
        for name, value in (("prompt", prompt), ("subject", subject), ("target_new", target_new)):
            if not isinstance(value, str):
                raise RequestError(
                    f"must be a string, got {type(value).__name__}", index=index, field=name
                )
            if not value.strip():
                raise RequestError("must not be empty", index=index, field=name)
            bad = _unencodable(value)
            if bad is not None:
                raise RequestError(
                    f"holds a lone surrogate at character {bad}; it is not valid text",
                    index=index,
                    field=name,
                )
            if len(value) > MAX_FIELD_CHARS:
                raise RequestError(
                    f"is {len(value)} characters long; at most {MAX_FIELD_CHARS} are allowed",
                    index=index,
                    field=name,
                )
        if target_true is not None and not isinstance(target_true, str):
            raise RequestError(
                f"must be a string or null, got {type(target_true).__name__}",
                index=index,
                field="target_true",
            )
        if target_true is not None and _unencodable(target_true) is not None:
            raise RequestError(
                "holds a lone surrogate; it is not valid text", index=index, field="target_true"
            )
        if prompt.count("{}") > 1:
            raise RequestError(
                "contains more than one '{}' placeholder; use exactly one for the subject",
                index=index,
                field="prompt",
            )
        if "{}" not in prompt:
            if subject not in prompt:
                raise RequestError(
                    f"subject {subject!r} does not occur in the prompt {prompt!r}; write the "
                    "subject verbatim in the prompt or put '{}' where it goes",
                    index=index,
                    field="subject",
                )
            prompt = prompt.replace(subject, "{}", 1)
        if prompt.strip() == "{}":
            raise RequestError("must contain text besides the subject", index=index, field="prompt")
        if target_true is not None and target_true.strip() == target_new.strip():
            raise RequestError(
                "target_new equals target_true; the edit would change nothing",
                index=index,
                field="target_new",
            )
        return cls(prompt=prompt, subject=subject, target_new=target_new, target_true=target_true)

    @classmethod
    def from_dict(cls, record: Any, *, index: int | None = None) -> EditRequest:
        if not isinstance(record, dict):
            raise RequestError(f"must be a JSON object, got {type(record).__name__}", index=index)
        for name in ("prompt", "subject", "target_new"):
            if name not in record:
                raise RequestError("is missing", index=index, field=name)
        target_new = _unwrap_target(record["target_new"], index, "target_new")
        target_true = record.get("target_true", record.get("ground_truth"))
        if target_true is not None:
            target_true = _unwrap_target(target_true, index, "target_true")
        return cls.create(record["prompt"], record["subject"], target_new, target_true, index=index)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _unencodable(text: str) -> int | None:
    """Where ``text`` cannot be written as UTF-8 (a lone surrogate, e.g. from a JSON
    ``"\\ud800"`` escape), or ``None``."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        return error.start
    return None


def _unwrap_target(value: Any, index: int | None, field: str) -> Any:
    # ROME-format files write targets as {"str": "...", "id": "..."}.
    if isinstance(value, dict):
        if "str" not in value:
            raise RequestError("is an object without a 'str' entry", index=index, field=field)
        return value["str"]
    return value


def repeated_facts(requests: Sequence[EditRequest]) -> list[tuple[int, int]]:
    """Pairs ``(first, later)`` of requests with the same prompt and subject, in order of
    the later one: one key for two (or the same) targets."""
    seen: dict[tuple[str, str], int] = {}
    pairs = []
    for i, request in enumerate(requests):
        key = (request.prompt, request.subject)
        if key in seen:
            pairs.append((seen[key], i))
        else:
            seen[key] = i
    return pairs


def validate_batch(requests: Sequence[EditRequest], *, repeats: bool = False) -> None:
    """Reject empty batches and, unless ``repeats``, duplicates and contradictions within
    one batch. With ``repeats`` they are edited together, as the authors' code does: the
    requests share one key, so a solve can meet at most one of two different targets."""
    if not requests:
        raise RequestError("the batch is empty; give at least one request")
    pairs = [] if repeats else repeated_facts(requests)
    if pairs:
        first, later = pairs[0]
        same = requests[first].target_new.strip() == requests[later].target_new.strip()
        kind = "duplicates" if same else "contradicts"
        raise RequestError(
            f"{kind} request {first} (same prompt and subject); "
            "remove one or put them in different batches",
            index=later,
            field="prompt",
        )


def load_requests(path: str | Path) -> list[EditRequest]:
    """Read requests from a JSON list, a single JSON object or a JSONL file (one object per
    line); see :func:`.fileio.read_records`."""
    try:
        records = read_records(path, what="request file")
    except RecordsError as error:
        raise RequestError(str(error)) from None
    requests = [EditRequest.from_dict(record, index=i) for i, record in enumerate(records)]
    if not requests:
        raise RequestError(f"{path} holds no requests")
    return requests
