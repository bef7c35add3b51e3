"""`quiver serve`'s `GET /metrics`: a real server on 127.0.0.1 over a real table, scraped
after a known mix of searches and refusals. Counts are checked, never timings."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import start_server, write_jsonl
from prometheus_client.parser import text_string_to_metric_families

from jobs._embed_job import run_embed
from schemas.spec import parse_spec

TOKEN = "m3trics"
SEARCH = "/tables/{name}/search"
BATCH = "/tables/{name}/search/batch"


@pytest.fixture(scope="module")
def warehouse(tmp_path_factory, stdlib_docs, tiny_model, ray_local) -> Path:
    root = tmp_path_factory.mktemp("metrics-warehouse")
    corpus = write_jsonl(root / "docs.jsonl", [
        {"id": d["id"], "text": d["text"], "year": 1990 + i}
        for i, d in enumerate(stdlib_docs[:30])])
    run_embed(parse_spec({"kind": "embed", "table": str(root / "docs.lance"),
                          "model": {"name": tiny_model},
                          "source": {"uri": str(corpus), "id_field": "id"},
                          "vectors": {"codecs": ["float32", "binary"]}}))
    return root


def _call(url: str, body: object | None = None, *, token: str | None = TOKEN) -> int:
    req = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(),
                                 method="GET" if body is None else "POST")
    req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            resp.read()
            return resp.status
    except urllib.error.HTTPError as err:
        err.read()
        return err.code


def _announce_oversized_body(base: str, path: str) -> int:
    """The status of a POST that announces 2 MB and sends none of it (the server answers
    on the header alone)."""
    import http.client
    from urllib.parse import urlsplit

    conn = http.client.HTTPConnection(urlsplit(base).netloc, timeout=60)
    conn.putrequest("POST", path)
    for name, value in (("Content-Type", "application/json"),
                        ("Authorization", f"Bearer {TOKEN}"), ("Content-Length", "2000000")):
        conn.putheader(name, value)
    conn.endheaders()
    status = conn.getresponse().status
    conn.close()
    return status


def _scrape(base: str, token: str | None = TOKEN) -> dict[tuple, float]:
    """Every sample of /metrics as {(name, sorted labels): value}."""
    req = urllib.request.Request(f"{base}/metrics")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(req, timeout=60) as resp:
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = resp.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _server(warehouse: Path, *extra: str):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "QUIVER_TOKEN": TOKEN}
    try:
        return start_server(warehouse, env, extra=list(extra))
    except RuntimeError as err:
        pytest.fail(str(err))


def test_metrics_count_every_request_and_split_search_time_by_stage(warehouse) -> None:
    proc, base = _server(warehouse)
    try:
        sent: dict[tuple[str, str, str], int] = {}

        def send(endpoint: str, mode: str, status: int, url: str, body=None, **kw) -> None:
            assert _call(url, body, **kw) == status, (url, body)
            sent[(endpoint, mode, str(status))] = sent.get((endpoint, mode, str(status)), 0) + 1

        search = f"{base}/tables/docs/search"
        for q in ("regular expressions", "sockets", "dates and times"):
            send(SEARCH, "dense", 200, search, {"query": q, "k": 3})
        send(SEARCH, "dense", 200, search, {"query": "files", "k": 3, "using": "float"})
        for q in ("regular expressions", "sockets"):
            send(SEARCH, "fts", 200, search, {"query": q, "k": 3, "mode": "fts"})
            send(SEARCH, "hybrid", 200, search, {"query": q, "k": 3, "mode": "hybrid"})
        send(BATCH, "dense", 200, f"{search}/batch", {"queries": ["a", "b", "c"], "k": 2})
        send("/tables", "none", 200, f"{base}/tables")
        # refused: no token, a wrong token, a bad filter, an unknown table, a k over the
        # limit (FastAPI's own 422), a body over the limit
        send("/tables", "none", 401, f"{base}/tables", token=None)
        send(SEARCH, "none", 401, search, {"query": "x"}, token="wrong")
        send(SEARCH, "dense", 400, search, {"query": "x", "where": {"year": "soon"}})
        send(SEARCH, "dense", 404, f"{base}/tables/nope/search", {"query": "x"})
        send(SEARCH, "none", 422, search, {"query": "x", "k": 100_000})
        assert _announce_oversized_body(base, "/tables/docs/search") == 413
        sent[(SEARCH, "none", "413")] = 1
        assert _call(f"{base}/metrics", token=None) == 401  # guarded by the token
        sent[("/metrics", "none", "401")] = 1

        samples = _scrape(base)
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    requests = {tuple(v for _, v in labels): value for (name, labels), value in samples.items()
                if name == "quiver_requests_total"}
    health = requests.pop(("/health", "none", "200"))  # start_server's polls: at least 1
    assert health >= 1
    assert requests == {k: float(v) for k, v in sent.items()}
    total = sum(sent.values()) + health
    durations = sum(v for (name, _), v in samples.items()
                    if name == "quiver_request_duration_seconds_count")
    assert durations == total
    rejected = {dict(labels)["status"]: v for (name, labels), v in samples.items()
                if name == "quiver_rejected_requests_total"}
    assert rejected == {"401": 3.0, "400": 1.0, "404": 1.0, "422": 1.0, "413": 1.0}

    def stage_count(mode: str, stage: str) -> float:
        return samples.get(("quiver_search_stage_seconds_count",
                            (("mode", mode), ("stage", stage), ("table", "docs"))), 0.0)

    # each successful search request observes each stage it ran once; refused ones none
    assert stage_count("dense", "embed") == 5  # 4 searches and the batch (one embedding)
    assert stage_count("dense", "first_stage") == 5
    # the table's default first stage is its sign bits, rescored, then the rows fetched;
    # the float search finds and fetches its rows in one Lance call (its first stage)
    assert stage_count("dense", "rescore") == stage_count("dense", "fetch") == 4
    assert stage_count("fts", "embed") == 0 and stage_count("fts", "first_stage") == 2
    assert stage_count("fts", "fetch") == 2
    assert stage_count("hybrid", "embed") == stage_count("hybrid", "fetch") == 2
    assert stage_count("hybrid", "first_stage") == 2  # bits and BM25, one observation
    assert samples[("quiver_model_loads_total", ())] == 1.0
    assert samples[("quiver_open_table_versions", ())] == 1.0
    labels = {v for (_, ls), _ in samples.items() for _, v in ls}
    assert not any("regular" in v or "sockets" in v for v in labels)  # never query text


def test_metrics_public_serves_them_without_the_token(warehouse) -> None:
    proc, base = _server(warehouse, "--metrics-public")
    try:
        assert _call(f"{base}/tables", token=None) == 401  # everything else still guarded
        samples = _scrape(base, token=None)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert samples[("quiver_requests_total",
                    (("endpoint", "/tables"), ("mode", "none"), ("status", "401")))] == 1.0
    assert samples[("quiver_model_loads_total", ())] == 0.0
