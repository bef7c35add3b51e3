"""User filters, compiled to `pyarrow.compute` expressions: never text pasted into SQL.

Two input forms, one compiler:

- structured, from Python and HTTP: `{"year": {"gte": 2020}, "lang": {"in": ["en", "de"]}}`
  (a bare value means equality: `{"lang": "en"}`);
- command-line clauses: `year>=2020`, `lang=en`, `lang in en,de`, `title!=x`.

Every column name must be a filterable column of the table (scalars: strings, numbers,
booleans, dates and timestamps; not vectors, not Quiver's work columns) and every value is
converted to that column's Arrow type before it enters the expression, so a value can only
ever be a literal. A name or value that does not fit is a `FilterError` naming it.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from schemas.errors import FilterError
from schemas.records import HASH_COLUMNS

OPERATORS = ("eq", "ne", "gt", "gte", "lt", "lte", "in", "not_in", "is_null")
_CLAUSE = re.compile(
    r"^\s*(?P<name>[^\s=!<>]+)\s*(?P<op>>=|<=|!=|=|>|<|\s+in\s+)\s*(?P<value>.*)$", re.DOTALL)
_CLAUSE_OPS = {"=": "eq", "!=": "ne", ">": "gt", ">=": "gte", "<": "lt", "<=": "lte"}
MAX_IN_VALUES = 10_000
UNFILTERABLE_COLUMNS = frozenset(HASH_COLUMNS)


def filterable(schema: pa.Schema) -> dict[str, pa.DataType]:
    """Columns a filter may name: scalar, user-visible ones."""
    out = {}
    for field in schema:
        t = field.type
        scalar = (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_integer(t)
                  or pa.types.is_floating(t) or pa.types.is_boolean(t)
                  or pa.types.is_timestamp(t) or pa.types.is_date(t))
        if scalar and field.name not in UNFILTERABLE_COLUMNS and not field.name.startswith("_"):
            out[field.name] = t
    return out


def _typed(name: str, value: Any, typ: pa.DataType) -> pa.Scalar:
    """`value` as a scalar of the column's type, or a FilterError naming both."""
    try:
        if pa.types.is_boolean(typ):
            if isinstance(value, str) and value.lower() in ("true", "false"):
                value = value.lower() == "true"
            if not isinstance(value, bool):
                raise TypeError
        elif pa.types.is_integer(typ):
            if isinstance(value, bool):
                raise TypeError
            if isinstance(value, str):
                if not re.fullmatch(r"[+-]?\d+", value.strip()):
                    raise TypeError
                value = int(value)
            if not isinstance(value, int):
                raise TypeError
        elif pa.types.is_floating(typ):
            if isinstance(value, bool):
                raise TypeError
            value = float(value) if isinstance(value, (int, float, str)) else None
            if value is None or value != value:  # NaN never compares true
                raise TypeError
        elif pa.types.is_timestamp(typ) or pa.types.is_date(typ):
            if isinstance(value, str):
                value = dt.datetime.fromisoformat(value)
                if pa.types.is_date(typ):
                    value = value.date()
            if not isinstance(value, (dt.date, dt.datetime)):
                raise TypeError
        elif not isinstance(value, str):
            raise TypeError
        return pa.scalar(value, typ)
    except (TypeError, ValueError, OverflowError, pa.ArrowInvalid):
        raise FilterError(
            f"filter on {name!r}: {value!r} is not a valid {typ} value"
        ) from None


def _condition(name: str, op: str, value: Any, typ: pa.DataType) -> pc.Expression:
    field = pc.field(name)
    if op == "is_null":
        if not isinstance(value, bool):
            raise FilterError(f"filter on {name!r}: is_null takes true or false, got {value!r}")
        return field.is_null() if value else field.is_valid()
    if op in ("in", "not_in"):
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value:
            raise FilterError(f"filter on {name!r}: {op} takes a non-empty list, got {value!r}")
        if len(value) > MAX_IN_VALUES:
            raise FilterError(f"filter on {name!r}: {op} takes at most {MAX_IN_VALUES} values")
        values = pa.array([_typed(name, v, typ).as_py() for v in value], type=typ)
        expr = field.isin(values)
        return ~expr if op == "not_in" else expr
    scalar = _typed(name, value, typ)
    return {"eq": field == scalar, "ne": field != scalar, "gt": field > scalar,
            "gte": field >= scalar, "lt": field < scalar, "lte": field <= scalar}[op]


def compile_filter(where: Mapping[str, Any] | None, schema: pa.Schema) -> pc.Expression | None:
    """The structured filter as one expression (conditions joined by AND); None if empty.

    Raises:
        FilterError: for an unknown or unfilterable column, an unknown operator, or a
            value that does not convert to the column's type.

    >>> schema = pa.schema([("year", pa.int64()), ("lang", pa.string())])
    >>> str(compile_filter({"year": {"gte": 2020}, "lang": "en"}, schema))
    '((year >= 2020) and (lang == "en"))'
    """
    if not where:
        return None
    if not isinstance(where, Mapping):
        raise FilterError("a filter is a mapping of column to condition, "
                          f"got {type(where).__name__}")
    columns = filterable(schema)
    parts = []
    for name, condition in where.items():
        if not isinstance(name, str) or name not in columns:
            raise FilterError(
                f"filter names unknown column {name!r}; filterable columns: "
                f"{', '.join(sorted(columns)) or 'none'}"
            )
        ops = condition if isinstance(condition, Mapping) else {"eq": condition}
        if not ops:
            raise FilterError(f"filter on {name!r} has no condition")
        for op, value in ops.items():
            if op not in OPERATORS:
                raise FilterError(f"filter on {name!r}: unknown operator {op!r}; use one of "
                                  f"{', '.join(OPERATORS)}")
            parts.append(_condition(name, op, value, columns[name]))
    expr = parts[0]
    for part in parts[1:]:
        expr = expr & part
    return expr


def parse_clauses(clauses: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Command-line clauses to the structured form (values stay strings until compiled).

    >>> parse_clauses(["year>=2020", "lang in en,de", "title=a=b"])
    {'year': {'gte': '2020'}, 'lang': {'in': ['en', 'de']}, 'title': {'eq': 'a=b'}}
    """
    where: dict[str, dict[str, Any]] = {}
    for clause in clauses:
        m = _CLAUSE.match(clause)
        if not m:
            raise FilterError(f"cannot read filter clause {clause!r}; write NAME=VALUE, "
                              "NAME>=VALUE (also > < <= !=) or 'NAME in A,B'")
        name, op, value = m["name"], m["op"].strip(), m["value"]
        key = "in" if op == "in" else _CLAUSE_OPS[op]
        conditions = where.setdefault(name, {})
        if key in conditions:
            raise FilterError(f"filter clause {clause!r} repeats {name} {op}")
        conditions[key] = value.split(",") if key == "in" else value
    return where
