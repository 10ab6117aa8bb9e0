"""Scorers of `llava-kit eval`: is an answer right for its record? Named, and imported only when used.

    name, score = choose_scorer(records, "auto")
    score(record, "It is a star.")      # True / False

- `exact`   `answer`: a case-insensitive match of the whole answer (trailing period and spacing ignored)
- `shapes`  the shapes task's fields (`kind`, `shape`, `color`; llava_kit/demo/shapes.py): the answer names the
            true shape / colour and no other

A task's scorer lives with its task and is registered here by "module:function" name; its `required_fields`
say which records it can score. `auto` picks the first scorer, in SCORERS order, that fits every record. This
module imports nothing heavy, so the CLI lists the scorers without loading torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from llava_kit.errors import DataError, UsageError

SCORERS = {"shapes": "llava_kit.demo.shapes:score_record", "exact": "llava_kit.scoring:exact_match"}
"""Scorer name -> "module:function(record, answer) -> bool"; the function's `required_fields` say which records
it can score. Most specific first: `auto` takes the first that fits."""


def _normalise(text: str) -> str:
    return " ".join(text.lower().strip().rstrip(".").split())


def exact_match(record: dict, answer: str) -> bool:
    """True when `answer` equals the record's `answer` (case, spacing and a trailing period ignored)."""
    return _normalise(answer) == _normalise(record["answer"])


exact_match.required_fields = ("question", "answer")


def load_scorer(name: str) -> Callable[[dict, str], bool]:
    """The scorer function registered as `name`."""
    if name not in SCORERS:
        raise UsageError(f"unknown scorer {name!r}; choose one of: auto, {', '.join(SCORERS)}")
    module_name, function_name = SCORERS[name].split(":")
    return getattr(importlib.import_module(module_name), function_name)


def choose_scorer(records: list[dict], name: str = "auto") -> tuple[str, Callable[[dict, str], bool]]:
    """(name, scorer) for `records`: the one asked for (checked against the records), or with `auto` the first
    registered scorer whose required fields every record has."""
    for candidate in (SCORERS if name == "auto" else [name]):
        scorer = load_scorer(candidate)
        missing = [(i, f) for i, r in enumerate(records) for f in scorer.required_fields if f not in r]
        if not missing:
            return candidate, scorer
        if name != "auto":
            i, field = missing[0]
            raise DataError(f"record {i + 1} has no `{field}`, which scorer {name!r} needs (it reads "
                            f"{', '.join(scorer.required_fields)})")
    needs = "; ".join(f"{n}: {', '.join(load_scorer(n).required_fields)}" for n in SCORERS)
    raise DataError(f"no scorer fits these records; each record needs the fields of one scorer ({needs})")
