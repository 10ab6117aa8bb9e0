"""The schema layer: the YAML loader, lenient-where-YAML-needs-it types, messages, and options derived for argparse."""

from __future__ import annotations

import argparse
from typing import Literal

import pytest
from pydantic import Field

from llava_kit.errors import ConfigError, UsageError
from llava_kit.schema import (
    Schema,
    add_arguments,
    apply_overrides,
    check_data,
    deep_merge,
    load_yaml,
    parse_arguments,
    validate_data,
)


class Inner(Schema):
    count: int = Field(1, ge=1)
    """How many."""
    rate: float = 1e-3
    """A rate."""
    flag: bool = False
    """On or off."""
    mode: Literal["auto", "off"] = "auto"
    """auto or off."""
    layers: int | list[int] = -2
    """One layer or several."""


class Outer(Schema):
    name: str = ""
    """A name."""
    inner: Inner = Field(default_factory=Inner)
    """The nested part."""


def test_duplicate_keys_are_refused_with_their_line():
    with pytest.raises(ConfigError) as err:
        load_yaml("name: a\ninner:\n  count: 2\n  count: 3\n", "x.yaml")
    assert "duplicate key `count` at line 4 (first at line 3)" in str(err.value) and "x.yaml" in str(err.value)
    # the same key in different mappings, and a merge key overridden after `<<`, are no duplicates
    assert load_yaml("a: {k: 1}\nb: {k: 2}\n") == {"a": {"k": 1}, "b": {"k": 2}}
    assert load_yaml("base: &b {k: 1, j: 2}\nx:\n  <<: *b\n  k: 3\n")["x"] == {"k": 3, "j": 2}


def test_only_true_and_false_are_booleans():
    data = load_yaml("a: off\nb: on\nc: yes\nd: no\ne: y\nf: true\ng: False\nh: TRUE\ni: 1e-3\nj: 7\n")
    assert data == {"a": "off", "b": "on", "c": "yes", "d": "no", "e": "y", "f": True, "g": False, "h": True,
                    "i": "1e-3", "j": 7}


def test_invalid_yaml_is_a_config_error():
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml("a: [1, 2\n", "bad.yaml")


def test_yaml_strings_become_numbers_and_booleans_where_the_field_wants_them():
    value = validate_data(Outer, {"inner": {"rate": "1e-3", "flag": "on", "mode": "off"}})
    assert value.inner.rate == pytest.approx(1e-3) and value.inner.flag is True and value.inner.mode == "off"
    for word, expected in (("yes", True), ("no", False), ("off", False), ("True", True), ("FALSE", False)):
        assert validate_data(Inner, {"flag": word}).flag is expected


@pytest.mark.parametrize(("data", "message"), [
    ({"count": "abc"}, "`inner.count` must be an integer (at least 1), got 'abc'"),
    ({"count": 2.0}, "`inner.count` must be an integer (at least 1), got 2.0"),
    ({"count": True}, "`inner.count` must be an integer (at least 1), got True"),
    ({"count": 0}, "`inner.count` must be at least 1, got 0"),
    ({"rate": "fast"}, "`inner.rate` must be a number, got 'fast'"),
    ({"rate": True}, "`inner.rate` must be a number, got True"),
    ({"flag": "maybe"}, "`inner.flag` must be true or false, got 'maybe'"),
    ({"mode": "of"}, "`inner.mode` must be 'auto' | 'off', got 'of'; did you mean `off`?"),
    ({"layers": [-2, "x"]}, "`inner.layers` must be an integer or a list of integers, got [-2, 'x']"),
    ({"cuont": 2}, "unknown key `inner.cuont`; did you mean `inner.count`? (valid keys here: count, rate, flag, "
                   "mode, layers)"),
])
def test_messages_name_the_key_and_what_it_must_be(data, message):
    _, problems = check_data(Outer, {"inner": data})
    assert problems == [message]


def test_every_problem_is_reported_at_once():
    with pytest.raises(ConfigError) as err:
        validate_data(Outer, {"nmae": 1, "inner": {"count": 0, "mode": "x"}}, "c.yaml")
    assert "3 problem(s) in c.yaml" in str(err.value) and "did you mean `name`" in str(err.value)
    assert check_data(Outer, [1, 2])[1] == ["the top level must be a mapping of keys, got list"]
    assert check_data(Outer, {"inner": 3})[1] == ["`inner` must be a mapping, got 3"]


def test_assignments_are_checked():
    value = Outer()
    value.inner.mode = "off"
    with pytest.raises(ValueError):
        value.inner.mode = "xml"


def test_overrides_replace_values_and_deep_merge_merges_mappings():
    data = {"inner": {"count": 2, "layers": [1, 2]}}
    apply_overrides(data, ["inner.mode=off", "inner.layers=[3]", "name=x"])
    assert data == {"inner": {"count": 2, "layers": [3], "mode": "off"}, "name": "x"}
    with pytest.raises(ConfigError, match="not of the form key=value"):
        apply_overrides(data, ["inner.count"])
    base = {"a": {"b": 1, "c": 2}, "d": [1]}
    assert deep_merge(base, {"a": {"b": 3}, "d": [2]}) == {"a": {"b": 3, "c": 2}, "d": [2]}
    assert base == {"a": {"b": 1, "c": 2}, "d": [1]}  # neither input is changed


class Options(Schema):
    port: int = Field(8000, ge=1, le=65535)
    """port to listen on"""
    mode: Literal["fast", "slow"] = "fast"
    """how to run"""
    verbose: bool = False
    """say more"""
    tags: list[Literal["a", "b"]] = Field(default_factory=list)
    """tags; repeatable"""
    timeout: float | None = Field(None, gt=0)
    """seconds (default: none)"""


def test_argparse_options_are_derived_from_the_fields():
    parser = argparse.ArgumentParser(prog="x")
    add_arguments(parser, Options, list(Options.model_fields))
    actions = {a.dest: a for a in parser._actions}
    assert actions["port"].type is int and actions["port"].default == 8000
    assert actions["port"].help == "port to listen on (default: %(default)s)"
    assert actions["mode"].choices == ["fast", "slow"] and actions["tags"].choices == ["a", "b"]
    assert actions["timeout"].type is float and actions["timeout"].default is None
    args = parser.parse_args(["--port", "80", "--verbose", "--tags", "a", "--tags", "b"])
    assert parse_arguments(Options, args) == Options(port=80, verbose=True, tags=["a", "b"])


def test_bad_arguments_are_one_usage_error_naming_every_flag():
    parser = argparse.ArgumentParser(prog="x")
    add_arguments(parser, Options, list(Options.model_fields))
    args = parser.parse_args(["--port", "99999", "--timeout", "-1"])
    with pytest.raises(UsageError) as err:
        parse_arguments(Options, args)
    assert str(err.value) == "--port 99999: must be from 1 to 65535; --timeout -1.0: must be a positive number"
