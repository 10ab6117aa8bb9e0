"""The one schema layer of every configuration surface: run configs, comparison configs, serve and caption options.

    class TrainConfig(Schema):
        max_steps: int = -1
        \"\"\"Optimizer steps; -1 means use num_epochs.\"\"\"

    cfg = validate_data(RunConfig, load_yaml_file("run.yaml"), "run.yaml")   # ConfigError listing every problem

A `Schema` is a pydantic model that refuses unknown keys, documents each field with the docstring under it, checks
types strictly (a float is no integer, 3 is no string) and checks assignments too. Two YAML habits are kept: `1e-3`
(a string to YAML 1.1) is a number where a number is expected, and `on`/`off`/`yes`/`no` are booleans where a
boolean is expected. Validation errors become one `ConfigError` line per problem, in the words of the key a user
wrote: "unknown key `trian`; did you mean `train`? (valid keys here: ...)", "`data.format` must be 'auto' | ...,
got 'xml'". Command-line options use the same models: `add_arguments` derives argparse options (help, default,
type, choices) from the fields and `parse_arguments` checks the parsed values, naming the flags.

YAML is read by `load_yaml`: a duplicated key is an error, and only `true`/`false` are booleans (YAML 1.2), so
`feature_cache: off` stays the string "off". This module imports nothing heavy (pydantic and yaml): data_gen uses it.
"""

from __future__ import annotations

import argparse
import copy
import difflib
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import annotated_types
import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from llava_kit.errors import ConfigError, UsageError

# ---------------------------------------------------------------------------------------------- YAML

_BOOL_TAG = "tag:yaml.org,2002:bool"


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 booleans (only true/false) that refuses duplicate keys."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` then overriding a key is no duplicate
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                if isinstance(key, typing.Hashable) and key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key `{key}` at line {line} (first at line {seen[key]}); keep one",
                        key_node.start_mark)
                if isinstance(key, typing.Hashable):
                    seen[key] = line
        return super().construct_mapping(node, deep)


# YAML 1.1 reads on/off/yes/no/y/n as booleans, so `feature_cache: off` would arrive as False; keep them strings.
_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _BOOL_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(_BOOL_TAG, re.compile(r"^(?:true|false)$", re.IGNORECASE), list("tTfF"))


def load_yaml(text: str, source: str = "YAML") -> Any:
    """Parse YAML text (YAML 1.2 booleans, duplicate keys refused); ConfigError naming `source` when it is invalid."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 (_Loader is a SafeLoader)
    except yaml.constructor.ConstructorError as err:
        if err.problem and err.problem.startswith("duplicate key"):
            raise ConfigError([err.problem], source) from None
        raise ConfigError([f"not valid YAML: {err}"], source) from None
    except yaml.YAMLError as err:
        raise ConfigError([f"not valid YAML: {err}"], source) from None


def load_yaml_file(path: str | Path) -> Any:
    """Read and parse a YAML file with `load_yaml` (the caller checks that it exists, with its own message)."""
    return load_yaml(Path(path).read_text(), str(path))


def dump_yaml(data: Any) -> str:
    """YAML text of plain data, keys in their order; strings such as 'off' are quoted, so any YAML reader agrees."""
    return yaml.safe_dump(data, sort_keys=False)


# ---------------------------------------------------------------------------------------------- dicts


def deep_merge(base: dict, update: dict) -> dict:
    """`base` with `update` merged in recursively (mappings merge, anything else replaces); neither is changed."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a", "b", "c"], value), the value read as YAML (so `off` stays a string)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError([f"override `{text}` is not of the form key=value (e.g. train.max_steps=100)"], "overrides")
    return key.strip().split("."), load_yaml(raw, f"override `{text}`") if raw.strip() else ""


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=value` overrides to a nested dict, in place (the value replaces what was there); returns it."""
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for key in keys[:-1]:
            if not isinstance(node.get(key), dict):
                node[key] = {}
            node = node[key]
        node[keys[-1]] = value
    return data


# ---------------------------------------------------------------------------------------------- models

_BOOL_WORDS = {"true": True, "false": False, "on": True, "off": False, "yes": True, "no": False}


class Described:
    """Annotation metadata naming a constrained type in error messages: `Annotated[str, ..., Described("...")]`."""

    def __init__(self, text: str):
        self.text = text


def _members(tp: Any) -> list[Any]:
    """The alternatives of a union (Annotated stripped), or [tp]."""
    if typing.get_origin(tp) is Annotated:
        return _members(typing.get_args(tp)[0])
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return [m for arg in typing.get_args(tp) for m in _members(arg)]
    return [tp]


def _choices(tp: Any) -> list[Any]:
    """Every Literal value a type admits (directly, not inside lists)."""
    return [value for m in _members(tp) if typing.get_origin(m) is Literal for value in typing.get_args(m)]


def _yaml_scalar(value: Any, tp: Any) -> Any:
    """A YAML string that means a number or a boolean where the field wants one (`1e-3`, `off`); else `value`."""
    if not isinstance(value, str) or value in _choices(tp):
        return value
    members = _members(tp)
    if str in members or Path in members:
        return value
    if float in members:
        try:
            return float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string
        except ValueError:
            pass
    if bool in members and value.lower() in _BOOL_WORDS:
        return _BOOL_WORDS[value.lower()]
    return value


class Schema(BaseModel):
    """Base of every configuration model: unknown keys refused, strict types, field docs from attribute docstrings.

    Subclasses declare fields with a docstring under each; `Field(ge=..., le=...)` bounds are checked and
    described in messages. Assignments are validated too, so `cfg.data.format = "xml"` fails where it happens.
    """

    model_config = ConfigDict(extra="forbid", strict=True, use_attribute_docstrings=True, validate_assignment=True)

    @field_validator("*", mode="before")
    @classmethod
    def _yaml_scalars(cls, value: Any, info) -> Any:
        return _yaml_scalar(value, cls.model_fields[info.field_name].annotation)


def did_you_mean(value: Any, candidates: typing.Iterable[Any], prefix: str = "", cutoff: float = 0.6) -> str:
    """`; did you mean `x`?` for the candidate nearest to `value`, or "" when none is near enough."""
    names = [str(c) for c in candidates]
    close = difflib.get_close_matches(str(value), names, n=1, cutoff=cutoff) if isinstance(value, str) else []
    return f"; did you mean `{prefix}{close[0]}`?" if close else ""


_NOUNS = {int: ("an integer", "integers"), float: ("a number", "numbers"), bool: ("true or false", "true or false"),
          str: ("a string", "strings"), type(None): ("null", "null"), Path: ("a path", "paths"),
          dict: ("a mapping", "mappings"), Any: ("anything", "anything")}


def describe(tp: Any, plural: bool = False) -> str:
    """Words for what a type admits: `int | list[int]` -> "an integer or a list of integers"."""
    if typing.get_origin(tp) is Annotated:
        named = [m.text for m in typing.get_args(tp)[1:] if isinstance(m, Described)]
        return named[0] if named else describe(typing.get_args(tp)[0], plural)
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(v) for v in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        words = []
        for arg in args:
            item = typing.get_args(arg)[0] if typing.get_origin(arg) is list else None
            # `Literal[...] | list[Literal[...]]` (e.g. report_to): "... or a list of them", not the choices twice
            same = item is not None and item in args and typing.get_origin(item) is Literal
            words.append("a list of them" if same else describe(arg, plural))
        return " or ".join(words)
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        return ("lists" if plural else "a list") + f" of {describe(item, plural=True)}"
    if origin is dict or tp is dict:
        values = typing.get_args(tp)[1] if typing.get_args(tp) else Any
        return ("mappings" if plural else "a mapping") + (f" of {describe(values, True)}" if values is not Any else "")
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return "mappings" if plural else "a mapping"
    singular, many = _NOUNS.get(tp, (getattr(tp, "__name__", str(tp)), getattr(tp, "__name__", str(tp))))
    return many if plural else singular


def bounds(field) -> str:
    """Words for a field's numeric bounds: "at least 1", "from 1 to 65535", "a positive number"; "" when none."""
    low = high = None
    for m in field.metadata:
        if isinstance(m, annotated_types.Ge):
            low = ("ge", m.ge)
        elif isinstance(m, annotated_types.Gt):
            low = ("gt", m.gt)
        elif isinstance(m, annotated_types.Le):
            high = ("le", m.le)
        elif isinstance(m, annotated_types.Lt):
            high = ("lt", m.lt)
    if low and high and low[0] == "ge" and high[0] == "le":
        return f"from {low[1]} to {high[1]}"
    words = []
    if low:
        words.append(f"at least {low[1]}" if low[0] == "ge" else
                     "a positive number" if low[1] == 0 else f"greater than {low[1]}")
    if high:
        words.append(f"at most {high[1]}" if high[0] == "le" else f"less than {high[1]}")
    return " and ".join(words)


def _submodel(tp: Any) -> type[BaseModel] | None:
    """The Schema a field holds (`Model` or `Model | None`), if any."""
    models = [m for m in _members(tp) if isinstance(m, type) and issubclass(m, BaseModel)]
    return models[0] if len(models) == 1 else None


_BOUND_ERRORS = ("greater_than", "greater_than_equal", "less_than", "less_than_equal")


def _locate(model: type[BaseModel], data: Any, loc: tuple) -> tuple[type[BaseModel], tuple, Any, Any]:
    """Walk `loc` through nested models: (innermost model, field path, the field (None: none), its raw value).

    The walk stops at the first field that is not itself a model; pydantic adds union members and list indices
    after it, which a message about the field does not need.
    """
    path: list[str] = []
    value = data
    for depth, part in enumerate(loc):
        if not isinstance(part, str) or part not in model.model_fields:
            return model, tuple(path), None, value
        field = model.model_fields[part]
        path.append(part)
        value = value.get(part) if isinstance(value, dict) else getattr(value, part, None)
        inner = _submodel(field.annotation)
        if inner is None or depth == len(loc) - 1:
            return model, tuple(path), field, value
        model = inner
    return model, tuple(path), None, value


def _name(path: tuple, prefix: str, flags: bool) -> str:
    if flags:
        return "--" + path[-1].replace("_", "-")
    return "`" + ".".join((prefix,) * bool(prefix) + path) + "`"


def problems_of(err: ValidationError, model: type[BaseModel], data: Any, prefix: str = "",
                flags: bool = False) -> list[str]:
    """One line per problem of a pydantic ValidationError, in the words of the keys (or `flags`) a user wrote."""
    problems: list[str] = []
    fields: dict[tuple, list[dict]] = {}
    for error in err.errors():
        loc = tuple(error["loc"])
        parent, path, field, value = _locate(model, data, loc)
        if error["type"] == "extra_forbidden" and field is None:
            where = ".".join((prefix,) * bool(prefix) + path)
            key = ".".join((where, str(loc[-1]))) if where else str(loc[-1])
            names = list(parent.model_fields)
            hint = did_you_mean(loc[-1], names, f"{where}." if where else "", cutoff=0.5)
            problems.append(f"unknown key `{key}`{hint} (valid keys here: {', '.join(names)})")
        elif field is None:  # the data itself is not a mapping (nested ones are fields, below)
            where = f"`{prefix}`" if prefix else "the top level"
            problems.append(f"{where} must be a mapping of keys, got {type(data).__name__}")
        else:
            fields.setdefault(path, []).append({**error, "_field": field, "_value": value})
    for path, errors in fields.items():
        field, value = errors[0]["_field"], errors[0]["_value"]
        name = _name(path, prefix, flags)
        if any(e["type"] == "missing" for e in errors):
            problems.append(f"{name} is required")
            continue
        limits = bounds(field)
        if all(e["type"] in _BOUND_ERRORS for e in errors):
            wanted = limits
        else:
            wanted = describe(field.annotation) + (f" ({limits})" if limits else "")
        choices = _choices(field.annotation) or _list_choices(field.annotation)
        bad = [v for v in (value if isinstance(value, list) else [value]) if isinstance(v, str) and v not in choices]
        hint = did_you_mean(bad[0], choices) if bad and choices else ""
        if flags:
            problems.append(f"{name} {value}: must be {wanted}{hint}")
        else:
            problems.append(f"{name} must be {wanted}, got {value!r}{hint}")
    return problems


def _list_choices(tp: Any) -> list[Any]:
    """Literal values a list member of the type admits (`list[Literal[...]]`)."""
    return [v for m in _members(tp) if typing.get_origin(m) is list for v in _choices(typing.get_args(m)[0])]


def check_data(model: type[BaseModel], data: Any, prefix: str = "", flags: bool = False) -> tuple[Any, list[str]]:
    """Validate `data` against `model`: (instance, []) or (None, every problem as a line)."""
    try:
        return model.model_validate(data), []
    except ValidationError as err:
        return None, problems_of(err, model, data, prefix, flags)


def validate_data(model: type[BaseModel], data: Any, source: str = "config", prefix: str = "") -> Any:
    """An instance of `model` from `data`; ConfigError (from `source`) listing every problem otherwise."""
    instance, problems = check_data(model, data, prefix)
    if problems:
        raise ConfigError(problems, source)
    return instance


# ---------------------------------------------------------------------------------------------- command line


def _cli_type(tp: Any) -> Any:
    """The argparse `type` of a field: int, float or Path; None (argparse's str) for strings, choices and flags."""
    members = [m for m in _members(tp) if m is not type(None)]
    for kind in (int, float, Path):
        if kind in members:
            return kind
    return None


def add_arguments(parser, model: type[BaseModel], fields: typing.Iterable[str],
                  options: dict[str, dict] | None = None) -> None:
    """Add one argparse option per field of `model`, derived from the field: `--field-name`, its docstring as the
    help, its default, its type, its Literal values as choices; a boolean field that defaults to false is a flag,
    a list field is repeatable. `options` maps a field to argparse keywords that replace the derived ones, plus
    `flags` (e.g. ("-o", "--output"), or ("image_dir",) for a positional argument).
    """
    options = options or {}
    for name in fields:
        field = model.model_fields[name]
        extra = dict(options.get(name, {}))
        flags = extra.pop("flags", ("--" + name.replace("_", "-"),))
        positional = not flags[0].startswith("-")
        tp, default = field.annotation, field.get_default(call_default_factory=True)
        members = [m for m in _members(tp) if m is not type(None)]
        kwargs: dict[str, Any] = {"help": (field.description or "").replace("%", "%%")}
        if members == [bool] and default is False:
            kwargs["action"] = "store_true"
        elif len(members) == 1 and typing.get_origin(members[0]) is list:
            (item,) = typing.get_args(members[0])
            kwargs.update(action="append", default=list(default or []), type=_cli_type(item),
                          choices=_choices(item) or None)
        else:
            choices = _choices(tp) if len(members) == 1 else []  # `bool | Literal["auto"]` takes more than choices
            kwargs.update(default=default, type=_cli_type(tp), choices=choices or None)
            if not field.is_required() and default not in (None, "", []):
                kwargs["help"] += " (default: %(default)s)"
        if field.is_required():
            kwargs.pop("default", None)
            if not positional:
                kwargs["required"] = True
        kwargs.update(extra)
        kwargs = {k: v for k, v in kwargs.items() if v is not None}  # None: argparse's own default
        if positional:
            parser.add_argument(flags[0], **kwargs)
        else:
            parser.add_argument(*flags, dest=name, **kwargs)


def parse_arguments(model: type[BaseModel], namespace: argparse.Namespace, **values: Any) -> Any:
    """An instance of `model` from the parsed arguments of its fields (and `values`, which take precedence);
    UsageError naming every bad flag (one line) otherwise."""
    data = {name: getattr(namespace, name) for name in model.model_fields if hasattr(namespace, name)}
    instance, problems = check_data(model, {**data, **values}, flags=True)
    if problems:
        raise UsageError("; ".join(problems))
    return instance
