"""Benchmark data loaders (sphere_edit.evaluation.data) on small hand-written fixtures."""

from __future__ import annotations

import copy
import json
import urllib.error
from pathlib import Path

import pytest

from sphere_edit.evaluation import data
from sphere_edit.evaluation.data import (
    COUNTERFACT_FLAT,
    COUNTERFACT_ROME,
    ZSRE_MEND,
    DatasetError,
    DataSourceError,
    load_attribute_snippets,
    load_cases,
    resolve_source,
    with_reference_texts,
)
from tests import FIXTURES_DIR

FIXTURES = FIXTURES_DIR
ROME = FIXTURES / "counterfact_rome.json"
FLAT = FIXTURES / "counterfact_flat.json"
ZSRE = FIXTURES / "zsre.json"


def _write(path: Path, records) -> Path:
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def _records(path: Path) -> list[dict]:
    return json.loads(path.read_text(encoding="utf-8"))


# -- the three formats ------------------------------------------------------------------


def test_rome_counterfact():
    loaded = load_cases(ROME)
    assert (loaded.dataset, loaded.format, loaded.path) == ("counterfact", COUNTERFACT_ROME, ROME)
    assert loaded.problems == []
    assert [c.case_id for c in loaded] == [7, 8, 9]
    case = loaded[0]
    assert case.request.prompt == "{} plays the"
    assert case.request.subject == "Glenn Gould"
    assert case.request.text == "Glenn Gould plays the"
    assert (case.request.target_new, case.request.target_true) == ("guitar", "piano")
    assert case.paraphrase_prompts == (
        "Music is loud. Glenn Gould plays the",
        "Glenn Gould is a musician who plays the",
    )
    assert case.neighborhood_prompts == ("Yo-Yo Ma plays the", "She plays the")
    assert case.neighborhood_answer == "piano"  # the old target
    assert case.generation_prompts == ("Glenn Gould is known for", "Glenn Gould plays")
    assert case.attribute_prompts == ("Jimi Hendrix plays the",)
    assert (case.relation_id, case.target_new_id, case.record_index) == ("P1303", "Q6607", 0)
    assert case.reference_texts == ()
    # Generation and attribute prompts are optional.
    assert loaded[2].generation_prompts == () and loaded[2].attribute_prompts == ()
    json.dumps(case.to_dict())  # serialisable


def test_flat_counterfact():
    loaded = load_cases(FLAT)
    assert (loaded.dataset, loaded.format) == ("counterfact", COUNTERFACT_FLAT)
    assert [c.case_id for c in loaded] == [2, 3, 4]
    case = loaded[1]
    # The subject written verbatim in the prompt becomes the placeholder.
    assert case.request.prompt == "{}, which is located in"
    assert (case.request.target_new, case.request.target_true) == ("Italy", "Canada")
    assert case.paraphrase_prompts == ("Where is Toronto located? It is located in",)
    assert case.neighborhood_prompts == ("Vancouver is located in",)
    assert case.neighborhood_answer == "Canada"
    assert case.generation_prompts == () and case.relation_id is None


def test_zsre():
    loaded = load_cases(ZSRE)
    assert (loaded.dataset, loaded.format) == ("zsre", ZSRE_MEND)
    assert [c.case_id for c in loaded] == [0, 1, 2]  # zsRE has no ids: the record index
    case = loaded[0]
    assert case.request.prompt == "Which instrument does {} play?"
    assert case.request.target_new == "guitar"
    assert case.request.target_true is None
    assert case.true_answers == ("piano",)
    assert case.paraphrase_prompts == ("What instrument is played by Glenn Gould?",)
    assert case.neighborhood_prompts == ("who plays the trumpet in the band",)
    assert case.neighborhood_answer == "Miles Davis"


def test_zsre_new_answer_equal_to_old_is_kept(tmp_path):
    """Some zsRE records ask for the answer the model already has; still a valid case."""
    records = _records(ZSRE)
    records[0]["alt"] = records[0]["answers"][0]
    (case, *_) = load_cases(_write(tmp_path / "z.json", records))
    assert case.request.target_new == "piano"


def test_jsonl_and_format_detection_per_file(tmp_path):
    jsonl = tmp_path / "flat.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in _records(FLAT)) + "\n", encoding="utf-8")
    loaded = load_cases(jsonl)
    assert loaded.format == COUNTERFACT_FLAT and len(loaded) == 3
    with pytest.raises(DatasetError, match="record 0.*unknown record format"):
        load_cases(_write(tmp_path / "odd.json", [{"question": "?"}]))
    with pytest.raises(DatasetError, match="not valid JSON"):
        (tmp_path / "broken.json").write_text("[{", encoding="utf-8")
        load_cases(tmp_path / "broken.json")
    with pytest.raises(DatasetError, match="no records"):
        load_cases(_write(tmp_path / "empty.json", []))


def test_jsonl_with_a_raw_line_separator_and_a_single_object(tmp_path):
    # U+2028 unescaped inside a string is valid JSON and so valid JSONL: it must not cut
    # the record in two (str.splitlines would).
    records = _records(FLAT)
    records[1]["prompt"] = records[1]["prompt"].replace(" ", "\u2028", 1)
    jsonl = tmp_path / "sep.jsonl"
    jsonl.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records), "utf-8")
    assert "\u2028" in jsonl.read_text("utf-8")
    loaded = load_cases(jsonl)
    assert len(loaded) == 3 and "\u2028" in loaded[1].request.prompt
    one = tmp_path / "one.json"
    one.write_text(json.dumps(records[0], indent=2), encoding="utf-8")
    assert [c.case_id for c in load_cases(one)] == [loaded[0].case_id]
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(records[0]) + "\n\n{oops\n", encoding="utf-8")
    with pytest.raises(DatasetError, match=r"broken.jsonl: line 3: not valid JSON .*count from 1"):
        load_cases(broken)


def test_limit_and_offset_follow_file_order():
    assert [c.case_id for c in load_cases(ROME, limit=2)] == [7, 8]
    assert [c.case_id for c in load_cases(ROME, offset=1)] == [8, 9]
    assert [c.case_id for c in load_cases(ROME, offset=1, limit=1)] == [8]
    assert [c.record_index for c in load_cases(ROME, offset=2, limit=10)] == [2]
    assert len(load_cases(ROME, limit=0)) == 0
    assert len(load_cases(ROME, offset=5)) == 0
    with pytest.raises(ValueError, match="offset"):
        load_cases(ROME, offset=-1)
    with pytest.raises(ValueError, match="limit"):
        load_cases(ROME, limit=-2)


# -- malformed records --------------------------------------------------------------------


def _break(path: Path, index: int, change) -> list[dict]:
    records = copy.deepcopy(_records(path))
    change(records[index])
    return records


@pytest.mark.parametrize(
    ("source", "change", "field", "reason"),
    [
        (ROME, lambda r: r.pop("paraphrase_prompts"), "paraphrase_prompts", "is missing"),
        (ROME, lambda r: r.update(neighborhood_prompts="x"), "neighborhood_prompts", "list"),
        (ROME, lambda r: r["paraphrase_prompts"].append(""), "paraphrase_prompts[1]", "empty"),
        (
            ROME,
            lambda r: r["requested_rewrite"].pop("target_true"),
            "requested_rewrite.target_true",
            "is missing",
        ),
        (
            ROME,
            lambda r: r["requested_rewrite"].update(subject="Nobody", prompt="It is"),
            "requested_rewrite.subject",
            "does not occur",
        ),
        (
            ROME,
            lambda r: r["requested_rewrite"].update(target_new={"id": "Q1"}),
            "requested_rewrite.target_new",
            "'str'",
        ),
        (ROME, lambda r: r.update(case_id=1.5), "case_id", "integer or a string"),
        (FLAT, lambda r: r.update(ground_truth=r["target_new"]), "target_new", "change nothing"),
        (FLAT, lambda r: r.update(ground_truth=None), "ground_truth", "must be a string"),
        (ZSRE, lambda r: r.update(alt=" "), "alt", "empty"),
        (ZSRE, lambda r: r.pop("loc_ans"), "loc_ans", "is missing"),
        (ZSRE, lambda r: r.update(src="Where is it?"), "subject", "does not occur"),
    ],
)
def test_malformed_record_names_record_and_field(tmp_path, source, change, field, reason):
    path = _write(tmp_path / source.name, _break(source, 1, change))
    with pytest.raises(DatasetError) as caught:
        load_cases(path)
    error = caught.value
    assert (error.index, error.field) == (1, field)
    assert reason in error.reason
    assert "record 1" in str(error) and f"field '{field}'" in str(error)
    assert str(path) in str(error)
    if source is not ZSRE:
        case_id = _records(source)[1]["case_id"]
        if field != "case_id":
            assert error.case_id == case_id and f"case_id {case_id!r}" in str(error)

    skipped = load_cases(path, skip_invalid=True)
    assert len(skipped) == 2 and [c.record_index for c in skipped] == [0, 2]
    (problem,) = skipped.problems
    assert (problem.index, problem.field) == (1, field)
    assert reason in problem.reason and f"field '{field}'" in str(problem)
    json.dumps(problem.to_dict())


def test_non_object_record_and_duplicate_ids(tmp_path):
    records = _records(ROME)
    path = _write(tmp_path / "a.json", [records[0], "oops", records[2]])
    with pytest.raises(DatasetError, match="record 1: must be a JSON object"):
        load_cases(path)
    dup = copy.deepcopy(records)
    dup[2]["case_id"] = dup[0]["case_id"]
    path = _write(tmp_path / "b.json", dup)
    with pytest.raises(DatasetError, match="record 2.*'case_id'.*record 0"):
        load_cases(path)
    loaded = load_cases(path, skip_invalid=True)
    assert [c.case_id for c in loaded] == [7, 8]
    # Only the selected records are checked: the bad one is outside this selection.
    assert len(load_cases(path, limit=2)) == 2


# -- names, cache and download -------------------------------------------------------------


class _FakeResponse:
    def __init__(self, payload: bytes, length: int | None = None) -> None:
        self._payload = payload
        self.headers = {} if length is None else {"Content-Length": str(length)}

    def read(self, size: int) -> bytes:
        block, self._payload = self._payload[:size], self._payload[size:]
        return block

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None


def test_public_name_downloads_once_into_the_cache(tmp_path, monkeypatch):
    payload = FLAT.read_bytes()
    urls: list[str] = []

    def fake_urlopen(url, timeout):
        urls.append(url)
        return _FakeResponse(payload, len(payload))

    monkeypatch.setattr(data.urllib.request, "urlopen", fake_urlopen)
    loaded = load_cases("counterfact", cache=tmp_path)
    assert urls == ["https://rome.baulab.info/data/dsets/counterfact.json"]
    assert loaded.path == tmp_path / "counterfact.json" and len(loaded) == 3
    assert [p.name for p in tmp_path.iterdir()] == ["counterfact.json"]  # no temp left
    load_cases("counterfact", cache=tmp_path)
    assert len(urls) == 1  # the cached copy is used


def test_default_cache_is_under_the_sphere_edit_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPHERE_EDIT_CACHE", str(tmp_path))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "zsre_mem_eval.json").write_bytes(ZSRE.read_bytes())
    assert resolve_source("zsre", download=False) == tmp_path / "data" / "zsre_mem_eval.json"


def test_offline_download_says_to_pass_a_local_path(tmp_path, monkeypatch):
    def offline(url, timeout):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(data.urllib.request, "urlopen", offline)
    with pytest.raises(DataSourceError, match="local path"):
        load_cases("zsre", cache=tmp_path)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(DataSourceError, match="downloading is off"):
        load_cases("zsre", cache=tmp_path, download=False)


def test_truncated_download_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(
        data.urllib.request, "urlopen", lambda url, timeout: _FakeResponse(b"[1, 2", 100)
    )
    with pytest.raises(DataSourceError, match="stopped after 5 of 100 bytes"):
        load_cases("multi_counterfact", cache=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_unknown_name_and_folder(tmp_path):
    with pytest.raises(DataSourceError, match="neither an existing file"):
        load_cases("no-such-dataset")
    with pytest.raises(DataSourceError, match="is a folder"):
        load_cases(tmp_path)


# -- attribute snippets -------------------------------------------------------------------


def test_attribute_snippets_become_reference_texts(tmp_path):
    snippets = load_attribute_snippets(FIXTURES / "attribute_snippets.json")
    cases = with_reference_texts(load_cases(ROME).cases, snippets)
    assert cases[0].reference_texts == (
        "Jimi Hendrix plays the guitar with six strings.",
        "The guitar is his favourite instrument.",
    )
    assert cases[1].reference_texts == ("English is spoken in England and Canada.",)
    assert cases[2].reference_texts == ()  # no snippets about Italy (Q38)
    flat = with_reference_texts(load_cases(FLAT).cases, snippets)
    assert all(c.reference_texts == () for c in flat)  # the flat format has no ids
    bad = _write(tmp_path / "s.json", [{"relation_id": "P1", "target_id": "Q1", "samples": [{}]}])
    with pytest.raises(DatasetError, match=r"record 0, field 'samples\[0\].text': is missing"):
        load_attribute_snippets(bad)


# -- the real files, when SPHERE_EDIT_DATA points at them ---------------------------------


def test_real_shared_data(data_dir):
    counterfact = load_cases(data_dir / "counterfact" / "val.json", limit=200)
    assert counterfact.format == COUNTERFACT_FLAT and len(counterfact) == 200
    assert counterfact.problems == []
    zsre = load_cases(data_dir / "zsre" / "dev.json")
    assert zsre.format == ZSRE_MEND and len(zsre) == 500 and zsre.problems == []
    assert not any(c.neighborhood_prompts[0].startswith("nq question") for c in zsre)


def test_data_root_reads_the_one_setting(tmp_path, monkeypatch):
    monkeypatch.setenv(data.DATA_ENV, str(tmp_path))
    assert data.data_root() == tmp_path
    # A given folder wins over the variable, which then need not be set.
    monkeypatch.delenv(data.DATA_ENV)
    assert data.data_root(tmp_path / "elsewhere") == tmp_path / "elsewhere"
    with pytest.raises(data.DataSourceError) as caught:
        data.data_root()
    assert str(caught.value) == (
        "no data folder: set SPHERE_EDIT_DATA to the folder holding counterfact/ and "
        "corpus/ (or pass --data)"
    )
    monkeypatch.setenv(data.DATA_ENV, "")
    with pytest.raises(data.DataSourceError, match="SPHERE_EDIT_DATA"):
        data.data_root()
