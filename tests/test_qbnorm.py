"""QB-Norm as a query option (`operators.qbnorm`, `quiver table qbnorm`): the bank is
built from a queries file as the table embeds queries, a search with `qbnorm` re-ranks
its candidates exactly as the dynamic inverted softmax says (checked against numpy on
every row of a small table), and a bank that is missing or for another embedding is
refused by name."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import write_jsonl

from jobs import api
from jobs._embed_job import run_embed
from operators.qbnorm import QBNORM_POOL, QueryBank, bank_uri, load_bank, save_bank
from schemas.errors import ManifestMismatchError, QueryError, SpecError
from schemas.spec import parse_spec

BETA = 5.0


@pytest.fixture(scope="module")
def banked(tmp_path_factory, stdlib_docs, tiny_model, ray_local):
    root = tmp_path_factory.mktemp("qbnorm")
    docs = [{"id": d["id"], "text": d["text"]} for d in stdlib_docs[:60]]
    corpus = write_jsonl(root / "c.jsonl", docs)
    table = root / "t.lance"
    run_embed(parse_spec({"kind": "embed", "table": str(table), "model": {"name": tiny_model},
                          "source": {"uri": str(corpus), "id_field": "id"}}))
    queries = root / "queries.jsonl"
    write_jsonl(queries, [{"_id": f"q{i}", "text": " ".join(d["text"].split()[:12])}
                          for i, d in enumerate(stdlib_docs[60:100])])
    built = api.qbnorm_bank(str(table), queries, beta=BETA)
    return table, built, [d["text"] for d in docs]


def _reference(t, text: str, k: int) -> tuple[list[str], np.ndarray]:
    """DIS by hand on every row: the raw top `QBNORM_POOL`, re-scored when its best row
    is activated."""
    rows = t.ds.to_table(columns=["id", "vector"])
    ids = rows.column("id").to_pylist()
    matrix = np.asarray(rows.column("vector").to_pylist(), np.float32)
    q = t.embed_queries([text])[0]
    raw = matrix @ q
    pool = np.argsort(-raw, kind="stable")[:QBNORM_POOL]
    bank = t.query_bank()
    scores = raw[pool].astype(np.float64)
    if ids[pool[0]] in bank.activated:
        z = BETA * (matrix[pool] @ bank.vectors.T).astype(np.float64)
        scores = BETA * scores - np.log(np.exp(z).sum(axis=1))
    order = np.argsort(-scores, kind="stable")[:k]
    return [ids[pool[i]] for i in order], scores[order]


def test_the_bank_holds_the_queries_and_each_ones_best_chunk(banked) -> None:
    table, built, _ = banked
    t = api.open_table(table)
    bank = t.query_bank()
    assert built["queries"] == 40 and bank.vectors.shape == (40, 32)
    assert bank.beta == BETA and bank.fingerprint == t.manifest.embedding_fingerprint()
    assert 1 <= len(bank.activated) == built["activated"] <= 40
    assert bank.activated <= set(t.ds.to_table(columns=["id"]).column("id").to_pylist())


def test_a_qbnorm_search_reranks_as_the_dynamic_inverted_softmax(banked) -> None:
    """Queries whose best row is activated are re-scored, the others keep their raw
    order: both cases occur among these, and each equals the numpy reference."""
    table, _, texts = banked
    t = api.open_table(table)
    activated = t.query_bank().activated
    seen = set()
    for text in [" ".join(x.split()[:12]) for x in texts[::3]]:
        want_ids, want_scores = _reference(t, text, k=5)
        hits = t.search(text, k=5, qbnorm=True, using="float", exact=True)
        assert [h.id for h in hits] == want_ids
        np.testing.assert_allclose([h.score for h in hits], want_scores, rtol=1e-4,
                                   atol=1e-4)
        raw = t.search(text, k=1, using="float", exact=True)[0]
        seen.add(raw.id in activated)
        if raw.id not in activated:  # DIS keeps the raw ranking
            assert [h.id for h in t.search(text, k=5, using="float", exact=True)] == want_ids
    assert seen == {True, False}


def test_a_missing_or_foreign_bank_and_other_modes_are_refused(banked, tmp_path) -> None:
    table, _, _ = banked
    t = api.open_table(table)
    with pytest.raises(QueryError, match="qbnorm re-ranks dense searches"):
        t.search("open a file", k=3, mode="fts", qbnorm=True)
    other = tmp_path / "other.lance"
    assert not Path(bank_uri(str(other))).exists()
    with pytest.raises(QueryError, match="quiver table qbnorm"):
        load_bank(str(other), "x")
    bank = t.query_bank()
    save_bank(str(other), QueryBank(bank.vectors, bank.beta, bank.activated, "another"))
    with pytest.raises(ManifestMismatchError, match="another embedding"):
        load_bank(str(other), t.manifest.embedding_fingerprint())
    bad = tmp_path / "q.jsonl"
    bad.write_text(json.dumps({"_id": "1", "title": "no text"}) + "\n")
    with pytest.raises(SpecError, match="q.jsonl:1: no 'text'"):
        api.qbnorm_bank(str(table), bad)


def test_the_quality_report_measures_qbnorm_when_the_table_has_a_bank(banked,
                                                                      tmp_path) -> None:
    table, _, texts = banked
    beir = tmp_path / "beir"
    (beir / "qrels").mkdir(parents=True)
    t = api.open_table(table)
    ids = t.ds.to_table(columns=["doc_id"]).column("doc_id").to_pylist()
    picks = sorted(set(ids))[:10]
    write_jsonl(beir / "queries.jsonl",
                [{"_id": f"q{i}", "text": " ".join(texts[i].split()[:12])} for i in range(10)])
    (beir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(
        f"q{i}\t{d}\t1\n" for i, d in enumerate(picks)))
    ways = {w["way"]: w for w in api.quality(table, beir)["ways"]}
    assert "float32 exact + QB-Norm" in ways and "float32 exact" in ways
    assert 0 <= ways["float32 exact + QB-Norm"]["ndcg_at_10"] <= 1
