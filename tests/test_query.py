"""Querying a real table: filtered search with scalar indices, full-text and hybrid search,
time travel by version and tag, batch queries, the CLI, other Lance readers, and the HTTP
server over a real socket on 127.0.0.1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import lance
import pytest
from conftest import REPO, checkpoint_versions, free_port, start_server, write_jsonl

from jobs._embed_job import run_embed
from jobs.api import info, open_table
from operators.search import MAX_REFINE
from schemas.errors import FilterError, QueryError, SpecError, TableError
from schemas.spec import parse_spec

LANGS = ("en", "de", "fr")
N_DOCS = 45


@pytest.fixture(scope="module")
def warehouse(tmp_path_factory, stdlib_docs, ray_local) -> tuple[Path, list[dict]]:
    docs = [{"id": d["id"], "text": d["text"], "year": 1990 + i, "lang": LANGS[i % 3]}
            for i, d in enumerate(stdlib_docs[100:100 + N_DOCS])]
    root = tmp_path_factory.mktemp("warehouse")
    corpus = write_jsonl(root / "docs.jsonl", docs)
    spec = {"kind": "embed", "table": str(root / "docs.lance"),
            "source": {"uri": str(corpus), "id_field": "id", "records_per_shard": 15},
            "write": {"shards_per_commit": 2, "keep_checkpoints": True},
            "index": {"filterable": ["year", "lang"]}}
    run_embed(parse_spec(spec))
    return root, docs


def test_indices_for_filters_and_full_text(warehouse) -> None:
    root, _ = warehouse
    kinds = {tuple(i["fields"]): i["type"] for i in info(root / "docs.lance")["indices"]}
    assert kinds[("id",)] == "BTree" and kinds[("lang",)] == "Bitmap"
    assert kinds[("year",)] == "Bitmap"  # 45 distinct values: low cardinality
    assert kinds[("text",)] == "Inverted"


def test_filtered_search_returns_k_matching_rows(warehouse) -> None:
    root, docs = warehouse
    table = open_table(root / "docs.lance")
    hits = table.search("regular expressions", k=6, where={"lang": "de", "year": {"gte": 2000}},
                        columns=["lang", "year"])
    assert len(hits) == 6
    assert all(h.fields["lang"] == "de" and h.fields["year"] >= 2000 for h in hits)
    with pytest.raises(FilterError, match="unknown column 'langg'"):
        table.search("x", where={"langg": "de"})
    unfiltered = table.search("regular expressions", k=6)
    assert hits[0].score <= unfiltered[0].score + 1e-6


def test_full_text_and_hybrid_search(warehouse) -> None:
    root, docs = warehouse
    table = open_table(root / "docs.lance")
    target = docs[7]
    word = max(target["text"].split(), key=len).strip(".,:;()`'\"")
    fts = table.search(word, k=3, mode="fts")
    assert fts and any(word.lower() in h.text.lower() for h in fts)
    hybrid = table.search(target["text"][:300], k=5, mode="hybrid")
    assert hybrid[0].doc_id == target["id"]
    assert [h.score for h in hybrid] == sorted((h.score for h in hybrid), reverse=True)
    with pytest.raises(QueryError, match="unknown search mode"):
        table.search("x", mode="sparse")


def test_time_travel_by_version_and_tag(warehouse) -> None:
    root, _ = warehouse
    path = root / "docs.lance"
    version = checkpoint_versions(path)[0]
    first = lance.dataset(str(path), version=version)
    lance.dataset(str(path)).tags.create("first-commit", version)
    old = open_table(path, version="first-commit")
    assert old.ds.count_rows() == first.count_rows() < lance.dataset(str(path)).count_rows()
    allowed = set(first.to_table(columns=["id"]).column("id").to_pylist())
    hits = old.search("files and directories", k=10, exact=True)
    assert {h.id for h in hits} <= allowed
    assert open_table(path, version=version).ds.count_rows() == first.count_rows() > 0
    assert info(path)["tags"]["first-commit"] == version
    assert info(path)["tags"]["current"] == lance.dataset(str(path)).version


def test_batch_queries_equal_single_queries(warehouse) -> None:
    root, _ = warehouse
    table = open_table(root / "docs.lance")
    queries = ["network sockets", "date and time", "compression"]
    batch = table.search_batch(queries, k=4)
    for q, hits in zip(queries, batch, strict=True):
        single = table.search(q, k=4)
        assert [h.id for h in hits] == [h.id for h in single]
        assert [h.score for h in hits] == pytest.approx([h.score for h in single], abs=1e-5)


def test_cli_where_and_mode(warehouse) -> None:
    root, _ = warehouse
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "jobs.cli", "query", str(root / "docs.lance"), "parse text",
         "-k", "4", "--where", "lang in en,fr", "--where", "year<2020", "--mode", "hybrid",
         "--refine", "8", "--json"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    hits = json.loads(out.stdout)["hits"]
    assert len(hits) == 4
    assert all(h["fields"]["lang"] in ("en", "fr") and h["fields"]["year"] < 2020 for h in hits)
    bad = subprocess.run(
        [sys.executable, "-m", "jobs.cli", "query", str(root / "docs.lance"), "x",
         "--where", "year>=soon"], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=300)
    assert bad.returncode == 2 and "'soon' is not a valid int64" in bad.stderr
    too_far = subprocess.run(
        [sys.executable, "-m", "jobs.cli", "query", str(root / "docs.lance"), "x",
         "--refine", str(MAX_REFINE + 1)], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=300)
    assert too_far.returncode == 2 and "Invalid value for '--refine'" in too_far.stderr
    assert "Traceback" not in too_far.stderr  # a usage error is one line, not a trace
    missing = subprocess.run([sys.executable, "-m", "jobs.cli", "query"], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2 and "Missing argument 'table'" in missing.stderr


def test_other_lance_readers_see_the_same_rows(warehouse) -> None:
    import lancedb
    import polars as pl

    root, _ = warehouse
    ds = lance.dataset(str(root / "docs.lance"))
    expected = sorted(ds.to_table(columns=["id"]).column("id").to_pylist())
    via_lancedb = lancedb.connect(str(root)).open_table("docs").to_arrow()
    assert sorted(via_lancedb.column("id").to_pylist()) == expected
    assert via_lancedb.schema.field("vector").type == ds.schema.field("vector").type
    via_polars = pl.scan_pyarrow_dataset(ds).select("id", "lang").collect()
    assert sorted(via_polars["id"].to_list()) == expected
    import duckdb

    arrow = ds.to_table(columns=["id", "lang"])  # noqa: F841 - DuckDB reads it by name
    counts = duckdb.sql("select lang, count(*) from arrow group by lang order by lang").fetchall()
    assert sum(c for _, c in counts) == len(expected)


def test_spec_refuses_an_unknown_filterable_column(warehouse, tmp_path) -> None:
    root, _ = warehouse
    spec = parse_spec({"kind": "embed", "table": str(tmp_path / "t.lance"),
                       "source": {"uri": str(root / "docs.jsonl"), "id_field": "id"},
                       "index": {"filterable": ["country"]}})
    with pytest.raises(SpecError, match="index.filterable: 'country' is not a column"):
        run_embed(spec)


# ------------------------------------------------------------------------- HTTP server


def _call(url: str, body: object | None = None, token: str | None = None,
          raw: bytes | None = None) -> tuple[int, dict]:
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None
                                        else None)
    req = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


@pytest.fixture(scope="module")
def server(warehouse):
    root, _ = warehouse
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "QUIVER_TOKEN": "s3cret"}
    try:
        proc, base = start_server(root, env)
    except RuntimeError as err:
        pytest.fail(str(err))
    yield base
    proc.terminate()
    proc.wait(timeout=30)


def test_server_lists_describes_and_searches(server) -> None:
    status, body = _call(f"{server}/tables", token="s3cret")
    assert status == 200 and body["tables"] == ["docs"]
    status, body = _call(f"{server}/tables/docs", token="s3cret")
    assert status == 200 and body["rows"] > N_DOCS - 1
    status, body = _call(f"{server}/tables/docs/search", {
        "query": "regular expressions", "k": 3, "where": {"lang": {"in": ["de"]}},
        "columns": ["lang"]}, token="s3cret")
    assert status == 200 and len(body["hits"]) == 3
    assert {h["fields"]["lang"] for h in body["hits"]} == {"de"}
    status, body = _call(f"{server}/tables/docs/search/batch",
                         {"queries": ["sockets", "time"], "k": 2, "mode": "hybrid"},
                         token="s3cret")
    assert status == 200 and [len(r) for r in body["results"]] == [2, 2]
    status, body = _call(f"{server}/openapi.json", token="s3cret")
    assert status == 200 and "/tables/{name}/search" in body["paths"]


def test_server_searches_with_qbnorm_once_the_table_has_a_bank(server, warehouse,
                                                              tmp_path) -> None:
    from jobs import api

    root, _ = warehouse
    ask = {"query": "regular expressions", "k": 3, "qbnorm": True}
    status, body = _call(f"{server}/tables/docs/search", ask, token="s3cret")
    assert status == 400 and "quiver table qbnorm" in body["detail"]
    queries = tmp_path / "bank.txt"
    queries.write_text("\n".join(["read a csv file", "parse arguments", "send an email",
                                   "compress data", "random numbers", "dates and times"]))
    built = api.qbnorm_bank(str(root / "docs.lance"), queries)
    assert built["queries"] == 6 and built["activated"] >= 1
    status, body = _call(f"{server}/tables/docs/search", ask, token="s3cret")
    assert status == 200 and len(body["hits"]) == 3
    local = api.open_table(root / "docs.lance").search("regular expressions", k=3,
                                                        qbnorm=True)
    assert [h["id"] for h in body["hits"]] == [h.id for h in local]


def test_server_keeps_a_sample_of_query_texts_a_bank_is_built_from(warehouse,
                                                                   tmp_path) -> None:
    """`quiver serve --keep-queries DIR`: the texts of answered text and batch queries
    land in DIR/TABLE.queries.jsonl when the server stops; vector queries and refused
    requests do not; `quiver table qbnorm --queries` builds a bank from the file."""
    from jobs import api

    root, _ = warehouse
    kept = tmp_path / "kept"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "QUIVER_TOKEN": "s3cret"}
    proc, base = start_server(root, env, extra=["--keep-queries", str(kept)])
    try:
        url = f"{base}/tables/docs/search"
        assert _call(url, {"query": "regular expressions", "k": 2}, token="s3cret")[0] == 200
        assert _call(f"{url}/batch", {"queries": ["parse arguments", "send an email"],
                                       "k": 2}, token="s3cret")[0] == 200
        dims = api.open_table(root / "docs.lance").searcher.book.dims
        assert _call(url, {"vector": [1.0] * dims, "k": 2}, token="s3cret")[0] == 200
        assert _call(url, {"query": "refused", "version": "gone"}, token="s3cret")[0] == 404
        assert _call(url, {"query": "no token"})[0] == 401
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    path = kept / "docs.queries.jsonl"
    texts = [json.loads(line)["text"] for line in path.read_text().splitlines()]
    assert texts == ["regular expressions", "parse arguments", "send an email"]
    built = api.qbnorm_bank(str(root / "docs.lance"), path)
    assert built["queries"] == 3


def test_server_refuses_bad_auth_names_and_requests(server, warehouse) -> None:
    assert _call(f"{server}/tables")[0] == 401
    assert _call(f"{server}/tables", token="wrong")[0] == 401
    assert _call(f"{server}/openapi.json")[0] == 401  # the schema, behind the token too
    for page in ("/docs", "/redoc"):  # pages FastAPI serves outside the auth: off
        assert _call(f"{server}{page}", token="s3cret")[0] == 404, page
    for name in ("..%2F..%2Fetc", "docs.rejects", "nope", "a%00b"):
        assert _call(f"{server}/tables/{name}", token="s3cret")[0] == 404, name
    assert _call(f"{server}/tables/docs/search", {"query": "x", "k": 100000},
                 token="s3cret")[0] == 422
    assert _call(f"{server}/tables/docs/search", {"k": 3}, token="s3cret")[0] == 422
    for refine in (0, MAX_REFINE + 1):
        assert _call(f"{server}/tables/docs/search", {"query": "x", "refine": refine},
                     token="s3cret")[0] == 422, refine
    assert _call(f"{server}/tables/docs/search", {"query": "x", "refine": 8},
                 token="s3cret")[0] == 200
    assert _call(f"{server}/tables/docs/search", {"query": "x", "version": "v" * 129},
                 token="s3cret")[0] == 422  # no tag is that long: refused before any I/O
    status, body = _call(f"{server}/tables/docs/search",
                         {"query": "x", "where": {"year": "soon"}}, token="s3cret")
    assert status == 400 and "not a valid int64" in body["detail"]
    status, body = _call(f"{server}/tables/docs/search", {"query": "x", "version": "gone"},
                         token="s3cret")
    assert status == 404 and "docs.lance" in body["detail"]  # named, relative to it:
    assert str(warehouse[0].resolve()) not in body["detail"]  # no path of this machine
    assert _status_of_oversized_post(server, "/tables/docs/search", 2_000_002) == 413


def _status_of_oversized_post(server: str, path: str, length: int) -> int:
    """Announce a `length`-byte body and read the answer before sending any of it: the
    server must refuse on the header alone (a client streaming the body into an early
    413 would only see a broken pipe)."""
    import http.client
    from urllib.parse import urlsplit

    conn = http.client.HTTPConnection(urlsplit(server).netloc, timeout=60)
    conn.putrequest("POST", path)
    for name, value in (("Content-Type", "application/json"),
                        ("Authorization", "Bearer s3cret"), ("Content-Length", str(length))):
        conn.putheader(name, value)
    conn.endheaders()
    status = conn.getresponse().status
    conn.close()
    return status


def test_server_will_not_bind_beyond_loopback_without_a_token(warehouse) -> None:
    from jobs.server import serve

    root, _ = warehouse
    with pytest.raises(SpecError, match="token"):
        serve(root, host="0.0.0.0", port=free_port(), token=None)


def _chunked_post(server: str, path: str, body: bytes) -> int:
    """POST `body` with Transfer-Encoding: chunked (no Content-Length), 64 KiB at a time;
    the server may answer before it has read everything."""
    import http.client
    from urllib.parse import urlsplit

    conn = http.client.HTTPConnection(urlsplit(server).netloc, timeout=60)
    conn.putrequest("POST", path)
    for name, value in (("Content-Type", "application/json"),
                        ("Authorization", "Bearer s3cret"), ("Transfer-Encoding", "chunked")):
        conn.putheader(name, value)
    conn.endheaders()
    try:
        for i in range(0, len(body), 1 << 16):
            piece = body[i:i + (1 << 16)]
            conn.send(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
        conn.send(b"0\r\n\r\n")
    except (BrokenPipeError, ConnectionResetError):
        pass  # refused mid-stream: the answer is already there
    status = conn.getresponse().status
    conn.close()
    return status


def test_server_bounds_streamed_bodies_and_names_bad_columns(server) -> None:
    """A chunked body is read only up to the limit (413 past it, served below it); an
    unknown or hidden column in `columns` is a 400 naming it, not a 500; the OpenAPI
    document shows the bearer scheme."""
    small = json.dumps({"query": "sockets", "k": 2}).encode()
    assert _chunked_post(server, "/tables/docs/search", small) == 200
    huge = json.dumps({"query": "x", "columns": ["lang"] * 10, "pad": "y" * 1_500_000}).encode()
    assert _chunked_post(server, "/tables/docs/search", huge) == 413
    for column in ("nope", "vector", "content_hash"):
        status, body = _call(f"{server}/tables/docs/search",
                             {"query": "x", "columns": [column]}, token="s3cret")
        assert status == 400 and f"unknown column {column!r}" in body["detail"], body
    status, body = _call(f"{server}/openapi.json", token="s3cret")
    schemes = body["components"]["securitySchemes"]
    assert any(s == {"type": "http", "scheme": "bearer", **({"description": s[
        "description"]} if "description" in s else {})} for s in schemes.values()), schemes


def test_warehouse_keeps_an_lru_of_tables_and_one_model(warehouse, monkeypatch) -> None:
    """Versions opened past the LRU's size close the oldest; every version shares one
    query model; concurrent first requests for one version open it once."""
    import threading

    import jobs.server as server_module
    from jobs.server import Warehouse

    root, _ = warehouse
    versions = [v["version"] for v in lance.dataset(str(root / "docs.lance")).versions()]
    assert len(versions) >= 2
    store = Warehouse(root, open_tables=len(versions) - 1)
    tables = [store.table("docs", v) for v in versions]
    assert store.open_count() == len(versions) - 1
    assert len({id(t._encoder) for t in tables}) == 1  # one model for every version
    import jobs.api as api

    opened, original = [], api.open_table
    assert "open_table" not in vars(server_module)  # imported at call time, from jobs.api

    def counting(*args, **kwargs):
        opened.append(kwargs.get("version"))
        time.sleep(0.2)  # a slow open: the other threads arrive meanwhile
        return original(*args, **kwargs)

    monkeypatch.setattr(api, "open_table", counting)
    fresh = Warehouse(root)
    threads = [threading.Thread(target=fresh.table, args=("docs", versions[0]))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert opened == [versions[0]]
    with pytest.raises(TableError):  # a failed open leaves no per-version lock behind
        fresh.table("docs", "no-such-tag")
    assert fresh._opening == {}


def test_warehouse_reads_its_listing_and_current_version_again_after_refresh_s(
        warehouse, tmp_path) -> None:
    """A search costs no LIST or manifest read of its own: the listing and a table's
    `current` version are kept for `refresh_s`; after it, a new table and a moved
    `current` tag both show."""
    import shutil

    from jobs.server import Warehouse

    root, _ = warehouse
    shutil.copytree(root / "docs.lance", tmp_path / "docs.lance")
    now = [0.0]
    store = Warehouse(tmp_path, refresh_s=2.0, clock=lambda: now[0])
    ds = lance.dataset(str(tmp_path / "docs.lance"))
    first = store.table("docs").ds.version
    assert first == ds.tags.list()["current"]["version"]
    assert store.names() == ["docs"]

    (tmp_path / "later.lance").mkdir()  # a table that appears, and a tag that moves
    older = min(v["version"] for v in ds.versions())
    assert older != first
    ds.tags.update("current", older)
    now[0] = 1.9
    assert store.names() == ["docs"]
    assert store.table("docs").ds.version == first
    now[0] = 2.0
    assert store.names() == ["docs", "later"]
    assert store.table("docs").ds.version == older


def test_opening_a_table_for_search_imports_nothing_that_runs_jobs() -> None:
    """The search side (`jobs.table`) and a cut-over's comparison (`jobs._cutover`) load
    without the job machinery: no import cycle through `jobs.api` is left to hide."""
    code = ("import sys, jobs._cutover, jobs.table, jobs.server\n"
            "print(sorted(m for m in sys.modules if m in ('jobs.api', 'jobs._embed_job',"
            " 'jobs._maintenance', 'jobs._dryrun')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
