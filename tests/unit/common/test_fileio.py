"""The one reader of JSON/JSONL record files: the formats it accepts and its errors."""

from __future__ import annotations

import json

import pytest

from sphere_edit.common.fileio import RecordsError, read_located_records, read_records

RECORDS = [{"prompt": "a", "n": 1}, {"prompt": "b", "n": 2}, {"prompt": "c", "n": 3}]


def _write(path, text: str, encoding: str = "utf-8"):
    path.write_bytes(text.encode(encoding))
    return path


def test_a_json_array_an_object_and_jsonl_give_the_same_records(tmp_path):
    array = _write(tmp_path / "a.json", json.dumps(RECORDS, indent=2))
    jsonl = _write(tmp_path / "a.jsonl", "".join(json.dumps(r) + "\n" for r in RECORDS))
    assert read_records(array) == RECORDS
    assert read_records(jsonl) == RECORDS
    # One object, whether written on one line or pretty-printed over several.
    one = _write(tmp_path / "one.json", json.dumps(RECORDS[0], indent=2))
    assert read_records(one) == [RECORDS[0]]
    assert read_records(_write(tmp_path / "flat.json", json.dumps(RECORDS[1]))) == [RECORDS[1]]


def test_jsonl_lines_and_their_numbers(tmp_path):
    # Blank lines are skipped but still counted; CRLF endings and a byte-order mark are fine.
    text = "\ufeff" + json.dumps(RECORDS[0]) + "\r\n\r\n  \n" + json.dumps(RECORDS[1]) + "\r\n"
    path = _write(tmp_path / "crlf.jsonl", text)
    assert read_located_records(path) == [(1, RECORDS[0]), (4, RECORDS[1])]
    # An array's elements carry the line the array starts on.
    array = _write(tmp_path / "a.json", "\n\n" + json.dumps(RECORDS))
    assert [line for line, _ in read_located_records(array)] == [3, 3, 3]


@pytest.mark.parametrize("separator", ["\u2028", "\u2029", "\x85"])
def test_a_raw_line_separator_inside_a_string_stays_in_its_record(tmp_path, separator):
    # JSON allows these characters unescaped in a string; str.splitlines would cut the
    # record in two there, splitting on "\n" alone does not.
    records = [{"text": f"one{separator}two"}, {"text": "three"}]
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    assert separator in text
    assert read_records(_write(tmp_path / "sep.jsonl", text)) == records
    located = read_located_records(_write(tmp_path / "sep.jsonl", text))
    assert [line for line, _ in located] == [1, 2]


def test_a_bad_jsonl_line_is_named_by_file_and_line(tmp_path):
    good = json.dumps(RECORDS[0])
    path = _write(tmp_path / "bad.jsonl", f"{good}\n\n{good}\n{{oops\n")
    with pytest.raises(RecordsError) as caught:
        read_records(path, what="request file")
    error = caught.value
    assert str(error) == (
        f"request file {path}: line 4: not valid JSON (Expecting property name enclosed in "
        "double quotes; lines count from 1); expected a JSON array, a JSON object or one "
        "JSON value per line (JSONL)"
    )
    assert error.line == 4 and error.path == path and not error.unreadable
    assert str(error) == f"request file {path}: {error.reason}"
    assert "\n" not in str(error)


def test_a_bad_json_document_names_line_and_column(tmp_path):
    path = _write(tmp_path / "bad.json", '[\n  {"prompt": "a",\n]\n')
    with pytest.raises(RecordsError, match=r"bad.json: not valid JSON \(line 3, column 1: ") as e:
        read_records(path)
    assert e.value.line == 3
    # A broken first object is a JSON error at its own line too, not taken for JSONL.
    path = _write(tmp_path / "bad_object.json", '{\n  "prompt": "a"\n  "n": 1\n}\n')
    with pytest.raises(RecordsError, match=r"line 3, column 3: Expecting ',' delimiter"):
        read_records(path)


def test_unreadable_empty_and_non_utf8_files(tmp_path):
    with pytest.raises(RecordsError, match=r"^cannot read data file .*missing.json: ") as e:
        read_records(tmp_path / "missing.json", what="data file")
    assert e.value.unreadable
    with pytest.raises(RecordsError, match="the file is empty; it must hold a JSON array"):
        read_records(_write(tmp_path / "empty.jsonl", " \n\n\t"))
    latin = _write(tmp_path / "latin.json", '[{"city": "Zürich"}]', encoding="latin-1")
    with pytest.raises(RecordsError, match=r"not UTF-8 \(byte 12\); save it as UTF-8"):
        read_records(latin)


def test_jsonl_of_other_values(tmp_path):
    # Lines need not be objects (the callers check their records' shape themselves).
    assert read_records(_write(tmp_path / "v.jsonl", '"x"\n3\n[1, 2]\n')) == ["x", 3, [1, 2]]
