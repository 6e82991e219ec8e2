"""Preset files (--preset): the JSON reader's field checks, the journal header, and
EasyEdit hparams YAML mapped to our settings or refused by name."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from sphere_edit.cli.app import app
from sphere_edit.editing.build import build_session
from sphere_edit.editing.journal import JournalError
from sphere_edit.editing.presets import (
    PresetError,
    check_preset_layers,
    load_preset,
    load_preset_file,
    preset_to_data,
)
from sphere_edit.editing.presets.easyedit import IGNORED_FIELDS
from tests import FIXTURES_DIR
from tests.unit._helpers import requests_abc, tiny_loaded

ALPHAEDIT_YAML = Path(FIXTURES_DIR) / "easyedit_alphaedit_llama3-8b.yaml"


def _write(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data))
    return path


def _good() -> dict:
    return preset_to_data(load_preset("smollm2-135m"))


def test_a_shipped_preset_written_to_a_file_reads_back_the_same(tmp_path):
    shipped = load_preset("smollm2-135m")
    path = _write(tmp_path / "mine.json", _good())
    mine = load_preset_file(path)
    assert (mine.layers, mine.target, mine.methods, mine.sphere, mine.stats_tokens) == (
        shipped.layers, shipped.target, shipped.methods, shipped.sphere, shipped.stats_tokens,
    )  # fmt: skip
    assert mine.header() == {
        "preset": "mine",
        "preset_file": str(path),
        "preset_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
    }
    assert shipped.header() == {"preset": "smollm2-135m"}  # unchanged for shipped presets


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"colour": "red"}, "colour: no such entry"),
        ({"rom": {"layer": 3}}, "rom: no such entry and no known method"),
        ({"layers": "7-11"}, "layers: must be a non-empty list"),
        ({"layers": [7, True]}, "layers: must be a non-empty list"),
        ({"target": {"lr": "fast"}}, "target.lr: must be a number"),
        ({"target": {"steps": 2.5}}, "target.steps: must be an integer"),
        ({"target": {"speed": 1}}, "target.speed: no such v* setting"),
        ({"target": {"lr": -1.0}}, "target: target lr must be positive"),
        ({"memit": {"mom2_weight": -1}}, "memit.mom2_weight: must be a number >= 0"),
        ({"memit": {"lambda": 3}}, "memit.lambda: memit has no such option"),
        ({"alphaedit": {"nullspace_threshold": 0}}, "alphaedit.nullspace_threshold: must be"),
        ({"memit": {"layer": 3}}, "memit.layer: only a one-layer method"),
        ({"ft": {"layer": "middle"}}, "ft.layer: must be a layer number"),
        ({"memit": {"layers": [3, 4]}}, "memit.layers: only a method with a band of its own"),
        ({"ultraedit": {"layers": []}}, "ultraedit.layers: must be a non-empty list"),
        ({"ultraedit": {"layers": [2, -1]}}, "ultraedit.layers: must be a non-empty list"),
        ({"sphere": {"eta": 1.5}}, "sphere.eta: must be a number in (0, 1]"),
        ({"sphere": {"beta": 1}}, "sphere.beta: no such entry"),
        ({"stats_tokens": True}, "stats_tokens: must be an integer"),
        ({"notes": 3}, "notes: must be a string"),
    ],
)
def test_each_bad_field_is_one_line_naming_the_file_and_the_key(tmp_path, change, named):
    path = _write(tmp_path / "bad.json", {**_good(), **change})
    with pytest.raises(PresetError) as caught:
        load_preset_file(path)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ")
    assert named in message


def test_missing_layers_unreadable_json_and_a_missing_file_are_one_line(tmp_path):
    data = _good()
    del data["layers"]
    for path, named in (
        (_write(tmp_path / "a.json", data), "layers: missing"),
        (_write(tmp_path / "b.json", [1, 2]), "one JSON object"),
        (tmp_path / "absent.json", "cannot read"),
    ):
        with pytest.raises(PresetError, match=named) as caught:
            load_preset_file(path)
        assert "\n" not in str(caught.value)
    (tmp_path / "c.json").write_text("{not json")
    with pytest.raises(PresetError, match="not JSON"):
        load_preset_file(tmp_path / "c.json")


def test_layers_out_of_range_for_the_model_are_named(tmp_path):
    preset = load_preset_file(_write(tmp_path / "p.json", {"layers": [2, 3, 4]}))
    check_preset_layers(preset, 5)
    with pytest.raises(PresetError, match=r"p.json: layers: layer 4 is out of range.*0\.\.3"):
        check_preset_layers(preset, 4)
    ok_layers = {"layers": [1], "rome": {"layer": 9}}
    preset = load_preset_file(_write(tmp_path / "q.json", ok_layers))
    with pytest.raises(PresetError, match="q.json: rome.layer: layer 9 is out of range"):
        check_preset_layers(preset, 4)
    band = {"layers": [1], "ultraedit": {"layers": [2, 6]}}
    preset = load_preset_file(_write(tmp_path / "b.json", band))
    with pytest.raises(PresetError, match="b.json: ultraedit.layers: layer 6 is out of range"):
        check_preset_layers(preset, 4)


def test_the_journal_header_refuses_a_resume_with_another_preset_file(tmp_path, tiny_tokenizer):
    loaded = tiny_loaded(tiny_tokenizer, "llama")
    data = {"layers": [1, 2], "target": {"steps": 2}, "memit": {"mom2_weight": 10}}
    first = load_preset_file(_write(tmp_path / "first.json", data))
    run = tmp_path / "run"
    session = build_session(loaded, "memit", preset=first, run_dir=run, progress=False,
                            log=lambda _line: None)  # fmt: skip
    session.apply(requests_abc()[:1])
    index = json.loads((run / "session.json").read_text())
    assert index["preset_file"] == str(tmp_path / "first.json")
    assert index["preset_sha256"] == first.sha256
    loaded = tiny_loaded(tiny_tokenizer, "llama")  # the unedited model again
    # The same settings in another file (other notes): another SHA-256, refused by name.
    second = load_preset_file(_write(tmp_path / "first2.json", {**data, "notes": "copy"}))
    other = build_session(loaded, "memit", preset=second, run_dir=run, progress=False,
                          log=lambda _line: None)  # fmt: skip
    with pytest.raises(JournalError, match="preset"):
        other.resume()
    same = build_session(loaded, "memit", preset=first, run_dir=run, progress=False,
                         log=lambda _line: None)  # fmt: skip
    assert same.resume() == 1


def test_cli_refuses_a_bad_preset_before_loading_the_model(tmp_path):
    requests = _write(tmp_path / "r.json", [r.to_dict() for r in requests_abc()])
    bad = _write(tmp_path / "bad.json", {**_good(), "memit": {"mom2_weight": "big"}})
    result = CliRunner().invoke(app, ["edit", "--requests", str(requests), "--out",
                                      str(tmp_path / "out"), "--model", "no-such-model",
                                      "--preset", str(bad)])  # fmt: skip
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines == [f"error: {bad}: memit.mom2_weight: must be a number >= 0, got 'big'"]


# -- EasyEdit hparams ---------------------------------------------------------------------


def test_easyedit_alphaedit_hparams_are_mapped_field_by_field():
    preset = load_preset_file(ALPHAEDIT_YAML)
    assert preset.layers == (4, 5, 6, 7, 8)
    assert preset.models == ("./hugging_cache/llama-3-8b-instruct",)
    assert preset.target == {
        "steps": 25, "lr": 0.1, "weight_decay": 0.5, "clamp_factor": 0.75, "kl_factor": 0.0625,
    }  # fmt: skip
    assert preset.methods == {"alphaedit": {"nullspace_threshold": 0.02, "l2": 10}}
    assert preset.method_options("alphaedit") == {"nullspace_threshold": 0.02, "l2": 10}
    assert preset.sha256 == hashlib.sha256(ALPHAEDIT_YAML.read_bytes()).hexdigest()
    lines = set(preset.mapping)
    assert "target.lr ← v_lr 0.1" in lines
    assert "alphaedit.l2 ← L2 10" in lines
    assert "layers ← layers [4, 5, 6, 7, 8]" in lines
    # Every field of the file has exactly one line.
    fields = yaml.safe_load(ALPHAEDIT_YAML.read_text())
    for key in fields:
        said = [line for line in preset.mapping if f" {key} " in f" {line} "]
        assert said, key
    for key in set(fields) & set(IGNORED_FIELDS):
        assert any(line.startswith(f"(ignored) {key} ") for line in preset.mapping), key


def _yaml(tmp_path: Path, **changes: object) -> Path:
    fields = yaml.safe_load(ALPHAEDIT_YAML.read_text())
    fields.update(changes)
    fields = {k: v for k, v in fields.items() if v is not None}
    path = tmp_path / "hparams.yaml"
    path.write_text(yaml.safe_dump(fields))
    return path


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"mom2_update_rank": 5}, "mom2_update_rank: an EasyEdit field sphere-edit does not"),
        ({"fact_token": "last"}, "fact_token: 'last' is not implemented; only 'subject_last'"),
        ({"mom2_dtype": "float16"}, "mom2_dtype: 'float16' is not implemented"),
        ({"layer_selection": "random"}, "layer_selection: 'random' is not implemented"),
        ({"mom2_adjustment": False}, "mom2_adjustment: False is not implemented"),
        ({"alg_name": "KN"}, "alg_name: 'KN' is not a method we share"),
        ({"layers": None}, "layers: missing"),
        ({"v_lr": "fast"}, "target.lr: must be a number"),
        ({"L2": -1}, "alphaedit.l2: must be a number >= 0"),
    ],
)
def test_easyedit_fields_we_do_not_implement_are_refused_by_name(tmp_path, changes, named):
    path = _yaml(tmp_path, **changes)
    with pytest.raises(PresetError) as caught:
        load_preset_file(path)
    assert "\n" not in str(caught.value)
    assert str(caught.value).startswith(f"{path}: ")
    assert named in str(caught.value)


def test_easyedit_memit_rome_and_ft_hparams(tmp_path):
    memit = _yaml(tmp_path, alg_name="MEMIT", nullspace_threshold=None, L2=None)
    assert load_preset_file(memit).methods == {"memit": {"mom2_weight": 20000}}
    with pytest.raises(PresetError, match="(L2|nullspace_threshold): an EasyEdit field"):
        load_preset_file(_yaml(tmp_path, alg_name="MEMIT"))
    rome = _yaml(tmp_path, alg_name="ROME", nullspace_threshold=None, L2=None, layers=[5])
    assert load_preset_file(rome).single_layer("rome") == 5
    with pytest.raises(PresetError, match="layers: rome edits one layer"):
        load_preset_file(_yaml(tmp_path, alg_name="ROME", nullspace_threshold=None, L2=None))
    ft = tmp_path / "ft.yaml"
    ft.write_text(yaml.safe_dump({"alg_name": "FT", "layers": [3], "lr": 5e-4, "num_steps": 10,
                                  "norm_constraint": 5e-4, "weight_decay": 0, "kl_factor": 0,
                                  "objective_optimization": "target_new"}))  # fmt: skip
    preset = load_preset_file(ft)
    assert preset.method_options("ft") == {"lr": 5e-4, "steps": 10, "epsilon": 5e-4}
    assert preset.single_layer("ft") == 3
    assert preset.target == {}  # FT has no v*: its lr is the method's
    ft.write_text(yaml.safe_dump({"alg_name": "FT", "layers": [3], "weight_decay": 0.1}))
    with pytest.raises(PresetError, match="weight_decay: 0.1 is not implemented for FT"):
        load_preset_file(ft)


def test_cli_prints_the_yaml_mapping(tmp_path, tiny_tokenizer):
    from tests.tiny_models import make_tiny_model

    folder = tmp_path / "tiny"
    make_tiny_model("llama", tiny_tokenizer).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    path = _yaml(tmp_path, layers=[1, 2])
    result = CliRunner().invoke(app, ["energy", "--model", str(folder), "--preset", str(path)])
    assert result.exit_code == 0, result.output
    assert "target.kl_factor ← kl_factor 0.0625" in result.output
    assert "(ignored) rewrite_module_tmp" in result.output
    shown = [n for n in range(4) if f"model.layers.{n}.mlp.down_proj" in result.output]
    assert shown == [1, 2]  # the YAML's layers, not the generic preset's
    too_deep = _yaml(tmp_path, layers=[4, 5])
    result = CliRunner().invoke(app, ["energy", "--model", str(folder), "--preset", str(too_deep)])
    assert result.exit_code == 2
    assert "layers: layer 4 is out of range" in result.output


def test_a_benchmark_edits_with_the_preset_file(tmp_path, tiny_tokenizer):
    from sphere_edit.bench.runner import Benchmark
    from tests.unit.bench.test_runner import _config

    path = _write(tmp_path / "p.json", {"layers": [2, 3], "memit": {"mom2_weight": 50}})
    loaded = tiny_loaded(tiny_tokenizer, "llama")
    run_dir = tmp_path / "run"
    config = _config(methods=("memit",), preset=str(path))
    Benchmark(config, run_dir, log=lambda _: None, progress=False, loaded=loaded).run()
    header = json.loads((run_dir / "memit" / "journal" / "session.json").read_text())
    assert header["layers"] == [2, 3]
    assert header["method"]["mom2_weight"] == 50
    assert header["preset_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
