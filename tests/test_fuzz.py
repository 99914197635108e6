"""Specs a hostile newcomer might write, generated: any structure, any types, any bytes,
any nesting. Validation either accepts a spec or refuses it with problems that each name
a field or the file; nothing else ever escapes (no TypeError, no RecursionError, no
UnicodeDecodeError), through the library and through the command line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diffkit import DiffkitError, SpecError
from diffkit.cli import main
from diffkit.spec import SECTIONS, load_spec, validate_spec

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

KEYS = [*SECTIONS, "seed", "train", "requires", "type", "steps", "lr", "hidden", "base", "guidance", "n", "noise"]
NAMES = ["moons", "gaussians", "mlp", "unet", "linear", "cosine", "ddpm", "ddim", "guided", "epsilon", "nope", ""]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(NAMES),
    st.text(max_size=8),
)
# any JSON-like value: lists and mappings of scalars, a few levels deep
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.sampled_from(KEYS), inner, max_size=4),
    ),
    max_leaves=12,
)
# a component section: a name, or a type (of any type) with parameters of any type
sections = st.one_of(
    st.sampled_from(NAMES),
    st.fixed_dictionaries({"type": st.one_of(st.sampled_from(NAMES), values)}, optional={k: values for k in KEYS if k != "type"}),
    values,
)
specs = st.one_of(
    st.fixed_dictionaries(
        {},
        optional={
            **{section: sections for section in SECTIONS},
            "seed": values,
            "train": st.one_of(st.dictionaries(st.sampled_from(["steps", "lr", "batch_size", "ema_decay"]), values), values),
            "requires": values,
            "extra": values,
        },
    ),
    values,
)


def assert_named(exc: SpecError, data: object) -> None:
    """Every problem names its field (or, for data that is not a mapping, says so)."""
    for path, message in exc.problems:
        assert message
        assert path or not isinstance(data, dict) or message.startswith("a spec must")


@FUZZ
@given(specs)
def test_any_structure_validates_or_names_every_problem(data):
    try:
        validate_spec(data)
    except SpecError as exc:
        assert_named(exc, data)


def _nested(depth: int, mapping: bool) -> str:
    """A value nested ``depth`` levels, as flow text that is both JSON and YAML."""
    return ('{"a": ' * depth + "1" + "}" * depth) if mapping else ("[" * depth + "1" + "]" * depth)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.integers(min_value=1, max_value=1500),
    st.booleans(),
    st.sampled_from(list(SECTIONS)),
    st.sampled_from([".yaml", ".json", ".toml"]),
)
def test_any_nesting_loads_or_names_the_field_or_file(tmp_path_factory, depth, mapping, section, suffix):
    path = tmp_path_factory.mktemp("deep") / f"spec{suffix}"
    value = _nested(depth, mapping)
    if suffix == ".toml":
        value = value.replace('": ', '" = ')
        rest = "".join(f'{k} = "{v}"\n' for k, v in [("data", "moons"), ("denoiser", "mlp")] if k != section)
        path.write_text(f'{rest}[{section}]\ntype = "mlp"\nhidden = {value}\n')
    else:
        path.write_text(f'{{"data": "moons", "denoiser": "mlp", "{section}": {{"type": "mlp", "hidden": {value}}}}}')
    try:
        load_spec(path)
    except SpecError as exc:  # a problem of the file's (no field path), or of a field
        assert exc.source == str(path) and str(path) in str(exc)
        assert all(message for _, message in exc.problems)


def _text(data: object, suffix: str) -> str:
    if suffix == ".json":
        return json.dumps(data, allow_nan=True)
    return yaml.safe_dump(data)


@FUZZ
@given(specs, st.sampled_from([".yaml", ".json"]))
def test_any_spec_file_loads_or_names_the_file(tmp_path_factory, data, suffix):
    path = tmp_path_factory.mktemp("fuzz") / f"spec{suffix}"
    path.write_text(_text(data, suffix), encoding="utf-8")
    try:
        load_spec(path)
    except SpecError as exc:
        assert exc.source == str(path) and str(path) in str(exc)
        assert_named(exc, data)


@FUZZ
@given(
    st.binary(max_size=200),
    st.sampled_from(["utf-16", "latin-1", "cp1252", "utf-8"]),
    st.sampled_from([".yaml", ".json", ".toml"]),
)
def test_any_bytes_in_any_encoding_load_or_name_the_file(tmp_path_factory, raw, encoding, suffix):
    """Random bytes, and a real spec in another encoding than UTF-8."""
    folder = tmp_path_factory.mktemp("bytes")
    spec = "seed: 0\ndata: {type: moons, noise: 0.1}  # naïve\ndenoiser: mlp\n" if suffix == ".yaml" else None
    for name, content in [("random", raw), ("encoded", spec.encode(encoding) if spec else raw)]:
        path = folder / f"{name}{suffix}"
        path.write_bytes(content)
        try:
            load_spec(path)
        except SpecError as exc:
            assert str(path) in str(exc)


@FUZZ
@given(
    st.sampled_from(["lr", "weight_decay", "min_lr", "ema_decay", "cond_drop_prob", "grad_clip"]),
    st.sampled_from([math.nan, math.inf, -math.inf]),
)
def test_no_float_field_takes_nan_or_infinity(field, value):
    with pytest.raises(SpecError) as info:
        validate_spec({"data": "moons", "denoiser": "mlp", "train": {field: value}})
    assert info.value.problems == [(f"train.{field}", "Input should be a finite number")]


# -- through the command line ----------------------------------------------------------------
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(specs, st.sampled_from([".yaml", ".json"]), st.sampled_from(["validate", "train"]))
def test_the_command_line_never_shows_a_traceback(tmp_path_factory, capsys, data, suffix, command):
    try:  # train only what is refused: a valid spec would start training
        validate_spec(data)
        command = "validate"
    except SpecError:
        pass
    folder = tmp_path_factory.mktemp("cli")
    path = folder / f"spec{suffix}"
    path.write_text(_text(data, suffix), encoding="utf-8")
    argv = [command, str(path)] + (["--out", str(folder / "run"), "--steps", "1", "--no-progress"] if command == "train" else [])
    try:
        code = main(argv)
    except DiffkitError:  # pragma: no cover - main must not let one out
        raise AssertionError("main() let a DiffkitError escape") from None
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    if code != 0:
        assert err.startswith("diffkit: error: ") and str(path) in err
