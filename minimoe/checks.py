"""Input checked at the door, one error line naming field, value and rule (`ModelConfig.d_ffn=0:
must be a positive integer`). A rule: "bool", "str", a tuple of allowed values, or a range:
">0", ">=0", "(0, 1]", "[0, 1]", "" (any finite number), with "int" before it for integers."""

from __future__ import annotations

import argparse
import dataclasses
import math

SEED = "int[0, 4294967295]"  # what every seed option and field takes (torch, numpy: 32 bits)


def problem(value, rule) -> str | None:
    """What is wrong with `value` under `rule`, as "must be ..."; None when nothing is."""
    if isinstance(rule, tuple):
        return None if value in rule else f"must be one of {', '.join(map(str, rule))}"
    if rule in ("bool", "str"):
        kind, text = (bool, "true or false") if rule == "bool" else (str, "a string")
        return None if isinstance(value, kind) else f"must be {text}"
    integer = rule.startswith("int")
    low, low_open, high, high_open, text = _range(rule.removeprefix("int").replace(" ", ""),
                                                  integer)
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)) \
            or not math.isfinite(value):
        return f"must be {text if integer else 'a finite number'}"
    inside = (value > low if low_open else value >= low) and \
        (value < high if high_open else value <= high)
    return None if inside else f"must be {text}"


def check(owner: str, name: str, value, rule) -> None:
    """Raise `ValueError("owner.name=value: must be ...")` unless `value` obeys `rule` (an
    owner ending in ": ", a file's name, is followed by the name alone)."""
    text = problem(value, rule)
    if text:
        raise ValueError(f"{_prefix(owner)}{name}={value!r}: {text}")


def _prefix(owner: str) -> str:
    return owner if not owner or owner.endswith(": ") else f"{owner}."


def option(rule):
    """An argparse `type` for a number option: its text parsed and held to `rule` at the door,
    or argparse's one line, exit 2: `argument --lr: 'nan': must be positive`."""
    def parse(text: str):
        try:
            value = int(text) if rule.startswith("int") else float(text)
        except ValueError:
            value = text
        why = problem(value, rule)
        if why:
            raise argparse.ArgumentTypeError(f"{text!r}: {why}")
        return value
    return parse


def check_fields(owner: str, obj, rules: dict) -> None:
    for name, rule in rules.items():
        check(owner, name, getattr(obj, name), rule)


def _range(rule: str, integer: bool):
    """(low, low exclusive?, high, high exclusive?, how the rule reads) of a range rule."""
    if rule == "":
        return -math.inf, True, math.inf, True, "an integer" if integer else "a finite number"
    if rule[0] in "([":
        low, high = rule[1:-1].split(",")
        text = f"{'an integer ' if integer else ''}in {rule[0]}{low}, {high}{rule[-1]}"
        return float(low), rule[0] == "(", float(high), rule[-1] == ")", text
    op = rule[:2] if rule[1] == "=" else rule[:1]
    low = float(rule[len(op):])
    if integer:
        text = {(">", 0): "a positive integer", (">=", 0): "a non-negative integer",
                (">=", 1): "a positive integer"}.get((op, low), f"an integer {op} {low:g}")
    else:
        text = "positive" if (op, low) == (">", 0) else f"{op} {low:g}"
    return low, op == ">", math.inf, True, text


def known_keys(where: str, table, allowed) -> dict:
    """`table`, once it is a table whose keys are all in `allowed`; else one line naming the
    first unknown key and listing the allowed ones. `where` prefixes the key ("runs[0]")."""
    if not isinstance(table, dict):
        raise ValueError(f"{where}={table!r}: must be a table")
    for key in table:
        if key not in allowed:
            allowed = ", ".join(sorted(allowed))
            raise ValueError(f"{_prefix(where)}{key}: unknown key; allowed: {allowed}")
    return table


def from_table(cls, table, where: str, **given):
    """A dataclass from a TOML/JSON table: unknown keys refused, then the class's own field
    rules (its __post_init__ calls check_fields), each a one-line ValueError."""
    fields = dataclasses.fields(cls)
    known_keys(where, table, {f.name for f in fields} - set(given))
    for f in fields:
        if f.name not in table and f.name not in given and f.default is dataclasses.MISSING \
                and f.default_factory is dataclasses.MISSING:
            raise ValueError(f"{_prefix(where)}{f.name}: missing")
    return cls(**table, **given)
