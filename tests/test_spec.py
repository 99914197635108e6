"""The declarative spec: formats, examples, round trips, error paths, schema, and safety."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

import diffkit
from diffkit import SpecError
from diffkit.spec import Spec, dump_spec, json_schema, load_spec, spec_model, to_dict, validate_spec

EXAMPLE_DIR = Path(__file__).parent.parent / "examples"
EXAMPLES = sorted(p for ext in ("yaml", "yml", "json", "toml") for p in EXAMPLE_DIR.glob(f"*.{ext}"))

# A spec whose every section and most parameters are set, in three formats with the same content.
SPEC = {
    "seed": 3,
    "data": {"type": "gaussians", "components": 4, "radius": 1.5, "std": 0.2, "n": 256},
    "schedule": {"type": "cosine", "timesteps": 100, "s": 0.01},
    "denoiser": {"type": "mlp", "hidden": 16, "depth": 2},
    "objective": {"type": "epsilon"},
    "sampler": {"type": "ddpm", "variance": "beta", "steps": 20},
    "train": {"steps": 10, "batch_size": 32, "lr": 0.002, "grad_clip": None, "preview": 0},
}
YAML_TEXT = """\
# a comment, which JSON cannot have
seed: 3
data: {type: gaussians, components: 4, radius: 1.5, std: 0.2, n: 256}
schedule:
  type: cosine
  timesteps: 100
  s: 0.01
denoiser: {type: mlp, hidden: 16, depth: 2}
objective: epsilon
sampler: {type: ddpm, variance: beta, steps: 20}
train: {steps: 10, batch_size: 32, lr: 2.0e-3, grad_clip: null, preview: 0}
"""
TOML_TEXT = """\
seed = 3

[data]
type = "gaussians"
components = 4
radius = 1.5
std = 0.2
n = 256

[schedule]
type = "cosine"
timesteps = 100
s = 0.01

[denoiser]
type = "mlp"
hidden = 16
depth = 2

[objective]
type = "epsilon"

[sampler]
type = "ddpm"
variance = "beta"
steps = 20

[train]
steps = 10
batch_size = 32
lr = 0.002
preview = 0
"""
# TOML has no null; the JSON and YAML versions say grad_clip: null, TOML cannot, so
# the TOML file is compared with the spec minus that key.


def _problems(data) -> dict[str, str]:
    with pytest.raises(SpecError) as err:
        validate_spec(data)
    return dict(err.value.problems)


# -- formats ---------------------------------------------------------------------------------
def test_yaml_json_and_toml_load_to_equal_specs(tmp_path):
    (tmp_path / "s.yaml").write_text(YAML_TEXT)
    (tmp_path / "s.yml").write_text(YAML_TEXT)
    (tmp_path / "s.json").write_text(json.dumps(SPEC, indent=2))
    (tmp_path / "s.toml").write_text(TOML_TEXT)
    from_yaml = load_spec(tmp_path / "s.yaml")
    assert load_spec(tmp_path / "s.yml") == from_yaml
    assert load_spec(str(tmp_path / "s.json")) == from_yaml
    assert load_spec(SPEC) == from_yaml
    no_clip = {**SPEC, "train": {k: v for k, v in SPEC["train"].items() if k != "grad_clip"}}
    assert load_spec(tmp_path / "s.toml") == load_spec(no_clip)
    # and the values are the ones written, not defaults
    assert from_yaml.seed == 3
    assert from_yaml.schedule.type == "cosine" and from_yaml.schedule.timesteps == 100 and from_yaml.schedule.s == 0.01
    assert from_yaml.sampler.variance == "beta" and from_yaml.sampler.steps == 20
    assert from_yaml.train.lr == 0.002 and from_yaml.train.grad_clip is None
    assert load_spec(tmp_path / "s.toml").train.grad_clip == 1.0


def test_string_shorthand_equals_a_section_with_only_a_type():
    a = validate_spec({**SPEC, "objective": "epsilon", "sampler": "ddpm"})
    b = validate_spec({**SPEC, "objective": {"type": "epsilon"}, "sampler": {"type": "ddpm"}})
    assert a == b


def test_omitted_sections_take_their_defaults():
    spec = validate_spec({"data": "moons", "denoiser": "mlp"})
    assert (spec.schedule.type, spec.objective.type, spec.sampler.type) == ("linear", "epsilon", "ddpm")
    assert spec.seed == 0 and spec.train.steps == 3000


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_validates(path):
    spec = load_spec(path)
    assert isinstance(spec, Spec)
    raw = yaml.safe_load(path.read_text()) if path.suffix != ".toml" else None
    if raw is not None:
        assert spec.data.type == (raw["data"] if isinstance(raw["data"], str) else raw["data"]["type"])


def test_there_are_examples_in_each_format():
    assert {p.suffix for p in EXAMPLES} >= {".yaml", ".json", ".toml"}


def test_unknown_format_is_an_error(tmp_path):
    path = tmp_path / "spec.ini"
    path.write_text("[data]\ntype = moons\n")
    with pytest.raises(SpecError, match=r"unknown spec format '\.ini'; use \.yaml, \.yml, \.json or \.toml"):
        load_spec(path)


def test_missing_file_is_a_spec_error(tmp_path):
    with pytest.raises(SpecError, match="no such spec file"):
        load_spec(tmp_path / "nope.yaml")


@pytest.mark.parametrize("text", ["", "- a\n- b\n", "just a string\n"])
def test_a_document_that_is_not_a_mapping_is_an_error(tmp_path, text):
    path = tmp_path / "s.yaml"
    path.write_text(text)
    with pytest.raises(SpecError, match="a spec must be a mapping of sections"):
        load_spec(path)


# -- round trips ------------------------------------------------------------------------------
@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_round_trip_through_plain_data_and_yaml(path, tmp_path):
    spec = load_spec(path)
    assert validate_spec(to_dict(spec)) == spec
    assert validate_spec(json.loads(json.dumps(to_dict(spec)))) == spec
    out = tmp_path / "again.yaml"
    dump_spec(spec, out)
    assert load_spec(out) == spec
    # to_dict writes every section with its type first
    for section in ("data", "schedule", "denoiser", "objective", "sampler"):
        assert next(iter(to_dict(spec)[section])) == "type"


def test_round_trip_through_a_pipeline():
    spec = validate_spec(SPEC)
    pipe = diffkit.Pipeline.from_spec(spec)
    assert pipe.spec == spec
    assert diffkit.Pipeline.from_spec(pipe.spec).spec == pipe.spec
    assert diffkit.Pipeline.from_spec(to_dict(pipe.spec)).spec == spec


def test_a_spec_is_immutable():
    spec = validate_spec(SPEC)
    with pytest.raises(Exception):
        spec.seed = 4  # type: ignore[misc]
    with pytest.raises(Exception):
        spec.schedule.timesteps = 4


# -- errors name field paths -------------------------------------------------------------------
def test_unknown_key_in_a_component_names_its_path():
    problems = _problems({**SPEC, "denoiser": {"type": "mlp", "hiden": 32}})
    assert list(problems) == ["denoiser.hiden"]
    assert "unknown key" in problems["denoiser.hiden"] and "denoiser 'mlp'" in problems["denoiser.hiden"]


def test_unknown_key_at_top_level_and_in_train():
    problems = _problems({**SPEC, "trian": {}, "train": {"stesp": 3}})
    assert set(problems) == {"trian", "train.stesp"}
    assert all("unknown key" in m for m in problems.values())


def test_wrong_type_names_its_path():
    problems = _problems({**SPEC, "train": {"steps": "many"}})
    assert list(problems) == ["train.steps"]
    assert "valid integer" in problems["train.steps"]


def test_out_of_range_parameter_names_its_path():
    problems = _problems({**SPEC, "schedule": {"type": "linear", "timesteps": 1}})
    assert list(problems) == ["schedule.timesteps"]
    assert "greater than or equal to 2" in problems["schedule.timesteps"]


def test_a_components_own_validator_reports_at_its_section():
    problems = _problems({**SPEC, "schedule": {"type": "linear", "beta_start": 0.1, "beta_end": 0.01}})
    assert list(problems) == ["schedule"]
    assert "beta_start" in problems["schedule"] and "swap" in problems["schedule"]


def test_missing_type_lists_the_choices():
    problems = _problems({**SPEC, "schedule": {"timesteps": 10}})
    assert list(problems) == ["schedule"]
    assert "needs a 'type'" in problems["schedule"]
    assert "cosine" in problems["schedule"] and "linear" in problems["schedule"]


def test_unknown_type_suggests_the_closest_match():
    problems = _problems({**SPEC, "schedule": {"type": "cosin", "timesteps": 10}})
    assert list(problems) == ["schedule"]
    assert "unknown schedule 'cosin'" in problems["schedule"]
    assert "Did you mean 'cosine'?" in problems["schedule"]
    assert "Available:" in problems["schedule"]


def test_missing_required_data():
    problems = _problems({k: v for k, v in SPEC.items() if k != "data"})
    assert problems == {"data": "required; add it"}


def test_wrong_shape_of_a_section():
    problems = _problems({**SPEC, "sampler": 7})
    assert list(problems) == ["sampler"]


def test_every_problem_is_listed_at_once():
    bad = {
        **SPEC,
        "seed": "zero",
        "denoiser": {"type": "mlp", "hiden": 32, "depth": 0},
        "schedule": {"type": "cosin"},
        "train": {"steps": "many", "lr": -1},
        "extra": True,
    }
    with pytest.raises(SpecError) as err:
        validate_spec(bad)
    paths = [p for p, _ in err.value.problems]
    expected = ["seed", "denoiser.hiden", "denoiser.depth", "schedule", "train.steps", "train.lr", "extra"]
    assert sorted(paths) == sorted(expected)
    text = str(err.value)
    assert text.startswith("7 problems:")
    for path in paths:
        assert f"\n  {path}: " in text


def test_spec_error_names_its_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({**SPEC, "train": {"steps": 0}}))
    with pytest.raises(SpecError) as err:
        load_spec(path)
    assert err.value.source == str(path)
    assert str(err.value).startswith(f"1 problem in {path}:")
    assert err.value.problems[0][0] == "train.steps"


def test_bad_yaml_reports_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("seed: 0\ndata: {type: moons\ndenoiser: mlp\n")
    with pytest.raises(SpecError) as err:
        load_spec(path)
    [(where, msg)] = err.value.problems
    assert msg.startswith("not valid YAML at line ")
    line = int(msg.split("at line ")[1].split(",")[0])
    assert 2 <= line <= 4


def test_bad_json_and_toml_report_where(tmp_path):
    (tmp_path / "bad.json").write_text('{"seed": 0,\n "data": }\n')
    with pytest.raises(SpecError, match=r"not valid JSON at line 2, column"):
        load_spec(tmp_path / "bad.json")
    (tmp_path / "bad.toml").write_text("seed = 0\n[data\n")
    with pytest.raises(SpecError, match="not valid TOML"):
        load_spec(tmp_path / "bad.toml")


# -- the spec never imports code -----------------------------------------------------------------
@pytest.mark.parametrize("key", ["_target_", "class_path", "init_args", "__import__"])
def test_import_keys_are_unknown_keys(key):
    problems = _problems({**SPEC, key: "os.system"})
    assert list(problems) == [key] and "unknown key" in problems[key]
    problems = _problems({**SPEC, "denoiser": {"type": "mlp", key: "torch.nn.Linear"}})
    assert list(problems) == [f"denoiser.{key}"] and "unknown key" in problems[f"denoiser.{key}"]


@pytest.mark.parametrize("target", ["os:system", "os.system", "builtins:eval", "torch.nn:Linear", "diffkit.spec:load_spec"])
def test_a_dotted_path_as_type_is_an_unknown_component(target, monkeypatch):
    import importlib

    imported = []
    real_import = importlib.import_module
    monkeypatch.setattr(importlib, "import_module", lambda name, *a: imported.append(name) or real_import(name, *a))
    problems = _problems({**SPEC, "denoiser": {"type": target}})
    assert list(problems) == ["denoiser"]
    assert f"unknown denoiser '{target}'" in problems["denoiser"]
    assert imported == []


def test_a_registered_component_can_only_be_reached_under_its_own_plugin():
    # `plugin:name` resolves within the registry; it is not a module path
    assert validate_spec({**SPEC, "schedule": "diffkit.schedules:cosine"}).schedule.type == "diffkit.schedules:cosine"
    problems = _problems({**SPEC, "schedule": "diffkit_plugins.schedules:cosine"})
    assert "unknown schedule" in problems["schedule"]


# -- JSON Schema -------------------------------------------------------------------------------
def test_json_schema_has_the_component_unions_with_parameter_descriptions():
    schema = json_schema()
    assert schema["$schema"].startswith("https://json-schema.org/")
    props, defs = schema["properties"], schema["$defs"]
    assert {"seed", "train", "data", "schedule", "denoiser", "objective", "sampler"} <= set(props)
    assert schema["additionalProperties"] is False
    assert schema["required"] == ["data", "denoiser"]

    # a section is the union of its components, or a bare name (`sampler: ddpm`)
    schedule, bare = props["schedule"]["anyOf"]
    assert bare["type"] == "string" and {"linear", "cosine", "diffkit.schedules:cosine"} <= set(bare["enum"])
    assert schedule["discriminator"]["propertyName"] == "type"
    tags = set(schedule["discriminator"]["mapping"])
    assert {"linear", "cosine", "diffkit.schedules:linear", "diffkit.schedules:cosine"} <= tags
    assert len(schedule["oneOf"]) == len(diffkit.get_registry().all("schedule"))

    cosine = defs[schedule["discriminator"]["mapping"]["cosine"].split("/")[-1]]
    assert cosine["additionalProperties"] is False
    assert cosine["required"] == ["type"]
    assert set(cosine["properties"]["type"]["enum"]) == {"cosine", "diffkit.schedules:cosine"}
    assert cosine["properties"]["timesteps"]["description"] == "Number of diffusion steps T."
    assert cosine["properties"]["timesteps"]["minimum"] == 2
    assert cosine["description"]  # the component's own description

    # every parameter of every component carries a description, for editors to show
    for name, model in defs.items():
        for field, prop in model.get("properties", {}).items():
            assert prop.get("description"), f"{name}.{field} has no description"
    assert defs["TrainConfig"]["properties"]["steps"]["description"] == "Number of optimiser steps."
    json.dumps(schema)  # plain JSON


def test_spec_model_is_rebuilt_when_the_registry_changes():
    from pydantic import Field

    from diffkit import Component, Params, hookimpl

    class NoiseParams(Params):
        level: float = Field(1.0, description="How loud.")

    class Plugin:
        @hookimpl
        def diffkit_samplers(self):
            return [Component("loud", lambda p, c: None, NoiseParams, "A sampler.")]

    registry = diffkit.load_plugins(autoload=False)
    before = spec_model(registry)
    assert spec_model(registry) is before  # cached
    registry.register_plugin(Plugin(), "loud-plugin")
    assert spec_model(registry) is not before
    assert validate_spec({**SPEC, "sampler": {"type": "loud", "level": 2}}, registry).sampler.level == 2
    schema = json_schema(registry)
    union, bare = schema["properties"]["sampler"]["anyOf"]
    assert "loud" in union["discriminator"]["mapping"] and "loud" in bare["enum"]


# An editor checks a spec against the JSON Schema alone; it must agree with the validator.
def _schema_errors(data) -> list[str]:
    jsonschema = pytest.importorskip("jsonschema")
    return [e.message for e in jsonschema.Draft202012Validator(json_schema()).iter_errors(data)]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_satisfies_the_json_schema(path):
    from diffkit.spec import _parse

    assert _schema_errors(_parse(path)) == []


@pytest.mark.parametrize(
    "data",
    [
        SPEC,
        {"data": "moons", "denoiser": "mlp"},
        {"data": "moons", "denoiser": "mlp", "schedule": "diffkit.schedules:cosine", "sampler": "ddpm"},
    ],
    ids=["full", "bare-names", "qualified-bare-name"],
)
def test_what_validates_satisfies_the_json_schema(data):
    validate_spec(data)
    assert _schema_errors(data) == []


@pytest.mark.parametrize(
    "data",
    [
        {"data": "moonz", "denoiser": "mlp"},
        {"data": {"type": "moons", "_target_": "os.system"}, "denoiser": "mlp"},
        {"data": "moons", "denoiser": {"type": "mlp", "hidden": "wide"}},
        {"denoiser": "mlp"},
        {"data": "moons", "denoiser": "mlp", "class_path": "x"},
    ],
    ids=["unknown-name", "import-key", "wrong-type", "missing-data", "top-level-import-key"],
)
def test_what_fails_validation_fails_the_json_schema(data):
    with pytest.raises(SpecError):
        validate_spec(data)
    assert _schema_errors(data) != []


def test_sampler_steps_beyond_the_schedules_length_fail_validation():
    problems = _problems({**SPEC, "schedule": {"type": "linear", "timesteps": 50}, "sampler": {"type": "ddpm", "steps": 100}})
    assert list(problems) == ["sampler.steps"]
    assert "100" in problems["sampler.steps"] and "50" in problems["sampler.steps"]
