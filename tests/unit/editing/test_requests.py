"""Request validation and request files: every error names the request and the field."""

from __future__ import annotations

import json

import pytest

from sphere_edit.editing.requests import (
    MAX_FIELD_CHARS,
    EditRequest,
    RequestError,
    load_requests,
    repeated_facts,
    validate_batch,
)


def _fails(field: str | None, *, index: int | None = None, match: str | None = None):
    """Context manager: a RequestError naming ``field`` (and ``index``)."""

    class _Check:
        def __enter__(self):
            self._raises = pytest.raises(RequestError, match=match)
            self.info = self._raises.__enter__()
            return self.info

        def __exit__(self, *exc):
            result = self._raises.__exit__(*exc)
            error = self.info.value
            assert error.field == field
            assert error.index == index
            if field is not None:
                assert f"field '{field}'" in str(error)
            if index is not None:
                assert f"request {index}" in str(error)
            return result

    return _Check()


def test_create_with_placeholder():
    request = EditRequest.create("{} plays the", "Glenn Gould", "guitar", "piano")
    assert request.prompt == "{} plays the"
    assert request.text == "Glenn Gould plays the"
    assert request.target_true == "piano"


def test_create_with_verbatim_subject_becomes_template_at_first_occurrence():
    request = EditRequest.create("Rome is in Italy near Rome", "Rome", "France")
    assert request.prompt == "{} is in Italy near Rome"
    assert request.text == "Rome is in Italy near Rome"


def test_subject_not_in_prompt_names_subject():
    with _fails("subject", match="does not occur"):
        EditRequest.create("The capital of France is", "Toronto", "Paris")


def test_subject_not_in_prompt_with_index():
    with _fails("subject", index=4):
        EditRequest.create("The capital of France is", "Toronto", "Paris", index=4)


@pytest.mark.parametrize("target", ["", "   ", "\n\t"])
def test_empty_target_names_target_new(target):
    with _fails("target_new", match="empty"):
        EditRequest.create("{} is located in", "Toronto", target)


def test_empty_subject_and_prompt():
    with _fails("subject", match="empty"):
        EditRequest.create("{} is located in", " ", "France")
    with _fails("prompt", match="empty"):
        EditRequest.create("", "Toronto", "France")


def test_two_placeholders_name_prompt():
    with _fails("prompt", match="more than one"):
        EditRequest.create("{} is located in {}", "Toronto", "France")


def test_prompt_that_is_only_the_subject():
    with _fails("prompt", match="besides the subject"):
        EditRequest.create(" {} ", "Toronto", "France")
    with _fails("prompt", match="besides the subject"):
        EditRequest.create("Toronto", "Toronto", "France")


@pytest.mark.parametrize(
    ("args", "field"),
    [
        ((42, "Toronto", "France"), "prompt"),
        (("{} is in", ["Toronto"], "France"), "subject"),
        (("{} is in", "Toronto", None), "target_new"),
        (("{} is in", "Toronto", "France", 3), "target_true"),
    ],
)
def test_wrong_types_name_the_field(args, field):
    with _fails(field, match="must be a string"):
        EditRequest.create(*args)


def test_too_long_field():
    with _fails("target_new", match=str(MAX_FIELD_CHARS)):
        EditRequest.create("{} is in", "Toronto", "x" * (MAX_FIELD_CHARS + 1))
    EditRequest.create("{} is in", "Toronto", "x" * MAX_FIELD_CHARS)


def test_target_new_equal_to_target_true():
    with _fails("target_new", match="change nothing"):
        EditRequest.create("{} is located in", "Toronto", " Canada", "Canada ")


def test_duplicates_in_a_batch():
    a = EditRequest.create("{} is located in", "Toronto", "France")
    b = EditRequest.create("{} is located in", "Toronto", " France ")
    with _fails("prompt", index=1, match="duplicates request 0"):
        validate_batch([a, b])


def test_contradictory_requests_in_a_batch():
    a = EditRequest.create("{} is located in", "Rome", "France")
    b = EditRequest.create("{} plays the", "Glenn Gould", "guitar")
    c = EditRequest.create("{} is located in", "Rome", "Japan")
    with _fails("prompt", index=2, match="contradicts request 0"):
        validate_batch([a, b, c])


def test_repeats_edited_together_when_allowed():
    a = EditRequest.create("{} is located in", "Rome", "France")
    b = EditRequest.create("{} plays the", "Glenn Gould", "guitar")
    c = EditRequest.create("{} is located in", "Rome", "Japan")
    d = EditRequest.create("{} is located in", "Rome", " France")
    assert repeated_facts([a, b, c, d]) == [(0, 2), (0, 3)]
    assert repeated_facts([a, b]) == []
    validate_batch([a, b, c, d], repeats=True)
    with pytest.raises(RequestError, match="empty"):
        validate_batch([], repeats=True)


def test_valid_batches():
    validate_batch([EditRequest.create("{} is located in", "Rome", "France")])
    # Same subject, different prompt; same prompt, different subject: both fine.
    validate_batch(
        [
            EditRequest.create("{} is located in", "Rome", "France"),
            EditRequest.create("{} speaks", "Rome", "French"),
            EditRequest.create("{} is located in", "Milan", "France"),
        ]
    )
    with pytest.raises(RequestError, match="empty"):
        validate_batch([])


def test_from_dict_rome_format_targets():
    record = {
        "prompt": "{} is located in",
        "subject": "Toronto",
        "target_new": {"str": "France", "id": "Q142"},
        "target_true": {"str": "Canada", "id": "Q16"},
    }
    request = EditRequest.from_dict(record)
    assert request == EditRequest("{} is located in", "Toronto", "France", "Canada")


def test_from_dict_ground_truth_alias_and_round_trip():
    record = {
        "prompt": "{} plays the",
        "subject": "Glenn Gould",
        "target_new": "guitar",
        "ground_truth": "piano",
    }
    request = EditRequest.from_dict(record)
    assert request.target_true == "piano"
    assert EditRequest.from_dict(request.to_dict()) == request


def test_from_dict_errors_name_the_field():
    with _fails("target_new", index=2, match="without a 'str'"):
        EditRequest.from_dict(
            {"prompt": "{} is", "subject": "Rome", "target_new": {"id": "Q1"}}, index=2
        )
    with _fails("target_true", index=0, match="without a 'str'"):
        EditRequest.from_dict(
            {"prompt": "{} is", "subject": "Rome", "target_new": "x", "target_true": {}},
            index=0,
        )
    with _fails("subject", index=1, match="missing"):
        EditRequest.from_dict({"prompt": "{} is", "target_new": "x"}, index=1)
    with _fails(None, index=3, match="JSON object, got list"):
        EditRequest.from_dict(["{} is", "Rome", "x"], index=3)
    with _fails("target_new", index=0, match="must be a string, got int"):
        EditRequest.from_dict({"prompt": "{} is", "subject": "Rome", "target_new": 5}, index=0)


def _records():
    return [
        {"prompt": "{} is located in", "subject": "Toronto", "target_new": "France"},
        {
            "prompt": "{} plays the",
            "subject": "Glenn Gould",
            "target_new": {"str": "guitar"},
            "target_true": {"str": "piano"},
        },
    ]


def test_load_json_list(tmp_path):
    path = tmp_path / "requests.json"
    path.write_text(json.dumps(_records(), indent=2), encoding="utf-8")
    requests = load_requests(path)
    assert [r.subject for r in requests] == ["Toronto", "Glenn Gould"]
    assert requests[1].target_new == "guitar"
    assert requests[1].target_true == "piano"


def test_load_jsonl_skips_blank_lines(tmp_path):
    path = tmp_path / "requests.jsonl"
    lines = [json.dumps(r) for r in _records()]
    path.write_text("\n" + lines[0] + "\n\n   \n" + lines[1] + "\n", encoding="utf-8")
    requests = load_requests(str(path))
    assert [r.target_new for r in requests] == ["France", "guitar"]


def test_load_jsonl_bad_line_names_the_line(tmp_path):
    path = tmp_path / "requests.jsonl"
    good = json.dumps(_records()[0])
    path.write_text(good + "\n" + good + "\n{not json\n", encoding="utf-8")
    with pytest.raises(RequestError, match="line 3: not valid JSON"):
        load_requests(path)


def test_load_jsonl_invalid_record_names_index_and_field(tmp_path):
    path = tmp_path / "requests.jsonl"
    bad = {"prompt": "The capital is", "subject": "Toronto", "target_new": "Paris"}
    path.write_text(json.dumps(_records()[0]) + "\n" + json.dumps(bad) + "\n", encoding="utf-8")
    with _fails("subject", index=1):
        load_requests(path)


def test_load_malformed_json_list(tmp_path):
    path = tmp_path / "requests.json"
    path.write_text('[\n  {"prompt": "{} is", "subject": "Rome",\n]\n', encoding="utf-8")
    with pytest.raises(RequestError, match=r"not valid JSON \(line 3"):
        load_requests(path)


def test_load_non_utf8_file(tmp_path):
    path = tmp_path / "requests.json"
    record = {"prompt": "{} is in", "subject": "Zürich", "target_new": "France"}
    text = json.dumps([record], ensure_ascii=False)
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(RequestError, match="not UTF-8"):
        load_requests(path)


def test_load_empty_missing_and_empty_list(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text(" \n\n", encoding="utf-8")
    with pytest.raises(RequestError, match="is empty"):
        load_requests(empty)
    with pytest.raises(RequestError, match="cannot read"):
        load_requests(tmp_path / "missing.json")
    none = tmp_path / "none.json"
    none.write_text("[]", encoding="utf-8")
    with pytest.raises(RequestError, match="no requests"):
        load_requests(none)


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_load_utf8_file_with_byte_order_mark(tmp_path, suffix):
    """Editors on Windows often start UTF-8 files with a BOM; it is not part of the JSON."""
    path = tmp_path / f"requests{suffix}"
    records = _records()
    body = json.dumps(records) if suffix == ".json" else "\n".join(map(json.dumps, records))
    path.write_bytes(b"\xef\xbb\xbf" + body.encode("utf-8"))
    assert [r.subject for r in load_requests(path)] == ["Toronto", "Glenn Gould"]
