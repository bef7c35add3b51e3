"""Filters are typed pyarrow expressions checked against the schema: bad names and
values are refused by name, and no hostile string ever widens what a query reads."""

from __future__ import annotations

import lance
import numpy as np
import pyarrow as pa
import pytest
from conftest import manifest_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from operators.filters import compile_filter, parse_clauses
from operators.search import VectorSearcher
from schemas.errors import FilterError
from schemas.records import table_schema

HOSTILE = ["en' OR 1=1 --", "en\" OR \"1\"=\"1", "`lang`", "en; DROP TABLE t", "/* x */ en",
           "ünïcödé", "en\x00", "", " en", "1 OR 1", "lang = lang", "%", "_", "\\", "'"]
LANGS = ["en", "de", "fr", *HOSTILE[:6]]
N = 400


@pytest.fixture(scope="module")
def table(tmp_path_factory, model_info):
    rng = np.random.default_rng(7)
    langs = [LANGS[i % len(LANGS)] for i in range(N)]
    years = [1990 + (i * 7) % 35 for i in range(N)]
    vectors = rng.standard_normal((N, 384)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    meta = pa.schema([("lang", pa.string()), ("year", pa.int64()), ("score_f", pa.float64())])
    schema = table_schema(meta, dim=384).with_metadata(manifest_for(model_info).to_metadata())
    rows = pa.table({
        "id": [f"d{i}#0" for i in range(N)], "doc_id": [f"d{i}" for i in range(N)],
        "chunk": pa.array([0] * N, pa.int32()),
        "text": pa.array([f"text {i}" for i in range(N)], pa.large_string()),
        "content_hash": pa.array([bytes(16)] * N, pa.binary(16)),
        "doc_hash": pa.array([bytes(16)] * N, pa.binary(16)),
        "lang": langs, "year": years, "score_f": [i / 10 for i in range(N)],
        "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), 384),
    }, schema=schema)
    path = str(tmp_path_factory.mktemp("filters") / "t.lance")
    ds = lance.write_dataset(rows, path)
    ds.create_scalar_index("lang", "BITMAP")
    ds.create_scalar_index("year", "BTREE")
    ds = lance.dataset(path)
    return ds, VectorSearcher(ds, manifest_for(model_info)), rows.to_pylist(), vectors


def _read(table, expr) -> list[dict]:
    """Rows the filter lets through, both by a plain scan and by a prefiltered search."""
    ds, searcher, _, vectors = table
    scanned = ds.to_table(filter=expr, columns=["id", "lang", "year"]).to_pylist()
    hits = searcher.search(vectors[0], k=N, using="float", exact=True, where=expr,
                           columns=("id", "lang", "year")).to_pylist()
    assert sorted(r["id"] for r in hits) == sorted(r["id"] for r in scanned)
    return scanned


def test_structured_filter_matches_python(table) -> None:
    _, _, rows, _ = table
    where = {"year": {"gte": 2010, "lt": 2020}, "lang": {"in": ["en", "de"]}}
    got = _read(table, compile_filter(where, table[0].schema))
    expected = [r for r in rows if 2010 <= r["year"] < 2020 and r["lang"] in ("en", "de")]
    assert sorted(r["id"] for r in got) == sorted(r["id"] for r in expected) and expected


def test_prefiltered_search_returns_k_rows_when_k_match(table) -> None:
    ds, searcher, rows, vectors = table
    expr = compile_filter({"lang": "fr"}, ds.schema)
    matching = sum(r["lang"] == "fr" for r in rows)
    for k in (5, matching):
        hits = searcher.search(vectors[3], k=k, using="float", where=expr, columns=("lang",))
        assert hits.num_rows == k and set(hits.column("lang").to_pylist()) == {"fr"}


def test_cli_clauses_compile_with_types_from_the_schema(table) -> None:
    ds, _, rows, _ = table
    where = parse_clauses(["year>=2020", "lang in en,fr", "score_f<30"])
    got = _read(table, compile_filter(where, ds.schema))
    expected = [r for r in rows if r["year"] >= 2020 and r["lang"] in ("en", "fr")
                and r["score_f"] < 30]
    assert sorted(r["id"] for r in got) == sorted(r["id"] for r in expected)


@pytest.mark.parametrize(("where", "message"), [
    ({"yaer": 2020}, "unknown column 'yaer'"),
    ({"vector": 1}, "unknown column 'vector'"),
    ({"content_hash": "x"}, "unknown column 'content_hash'"),
    ({"year": "2020 OR 1=1"}, "'2020 OR 1=1' is not a valid int64"),
    ({"year": {"between": [1, 2]}}, "unknown operator 'between'"),
    ({"year": {"in": "2020"}}, "in takes a non-empty list"),
    ({"year": True}, "is not a valid int64"),
    ({"lang": 3}, "is not a valid string"),
    ({"score_f": "nan"}, "is not a valid double"),
])
def test_bad_filters_name_the_problem(table, where, message) -> None:
    with pytest.raises(FilterError, match=message):
        compile_filter(where, table[0].schema)


def test_unreadable_clause_is_refused() -> None:
    with pytest.raises(FilterError, match="cannot read filter clause"):
        parse_clauses(["year"])


hostile_text = st.one_of(st.sampled_from(HOSTILE), st.text(max_size=40))


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(value=hostile_text)
def test_fuzz_values_never_widen_a_filter(table, value: str) -> None:
    ds, _, rows, _ = table
    got = _read(table, compile_filter({"lang": value}, ds.schema))
    assert sorted(r["id"] for r in got) == sorted(r["id"] for r in rows if r["lang"] == value)
    got = _read(table, compile_filter({"lang": {"ne": value}, "year": {"lt": 2000}}, ds.schema))
    assert all(r["lang"] != value and r["year"] < 2000 for r in got)
    try:
        expr = compile_filter({"year": value}, ds.schema)
    except FilterError:
        return
    year = int(value)  # only a clean integer literal gets through
    assert all(r["year"] == year for r in _read(table, expr))


def _oracle(row: dict, where: dict) -> bool:
    """The structured filter evaluated in plain Python, as the test's reference."""
    ops = {"eq": lambda a, b: a == b, "ne": lambda a, b: a != b, "gt": lambda a, b: a > b,
           "gte": lambda a, b: a >= b, "lt": lambda a, b: a < b, "lte": lambda a, b: a <= b}
    for column, conditions in where.items():
        cell = row[column]
        convert = type(cell) if not isinstance(cell, str) else str
        for op, value in conditions.items():
            if op == "in":
                if cell not in [convert(v) for v in value]:
                    return False
            elif not ops[op](cell, convert(value)):
                return False
    return True


FILTERABLE = ("lang", "year", "score_f")


def test_fuzz_names_and_clauses_never_reach_lance_unchecked(table, capsys) -> None:
    """Hostile clauses `name op value`: half the names are the table's real columns (with
    values drawn from its rows 3 times in 4, else hostile text), so many clauses compile;
    every one that compiles is read both ways and checked against a plain-Python oracle;
    the rest must be refused by name. At least 500 oracle comparisons must run."""
    ds, _, rows, _ = table
    ran = {"oracle": 0, "refused": 0}
    real_values = {c: sorted({str(r[c]) for r in rows}) for c in FILTERABLE}

    @settings(max_examples=1500, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(real=st.booleans(), column=st.sampled_from(FILTERABLE), hostile_name=hostile_text,
           pick=st.integers(0, 10_000), hostile_value=hostile_text, odds=st.integers(0, 3),
           op=st.sampled_from(["=", "!=", ">=", "<", " in "]))
    def check(real: bool, column: str, hostile_name: str, pick: int, hostile_value: str,
              odds: int, op: str) -> None:
        name = column if real else hostile_name
        if name in real_values and odds:  # a value from the rows, 3 times in 4
            values = real_values[name]
            value = values[pick % len(values)]
            if op == " in ":
                value = f"{value},{values[(pick // 7) % len(values)]}"
        else:
            value = hostile_value
        if name not in {f.name for f in ds.schema}:
            with pytest.raises(FilterError, match="unknown column"):
                compile_filter({name: value}, ds.schema)
        try:
            where = parse_clauses([f"{name}{op}{value}"])
            expr = compile_filter(where, ds.schema)
        except FilterError:
            ran["refused"] += 1
            return
        got = sorted(r["id"] for r in _read(table, expr))
        assert got == sorted(r["id"] for r in rows if _oracle(r, where))
        ran["oracle"] += 1

    check()
    with capsys.disabled():
        print(f"\n[fuzz] {ran['oracle']} clauses checked against the oracle, "
              f"{ran['refused']} refused by name")
    assert ran["oracle"] >= 500, ran
