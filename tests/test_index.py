"""Indices follow table size: exact search below `ann_min_rows`, an ANN index above it,
and a BTREE index on `id` always. ANN results are checked against exact search."""

from __future__ import annotations

from pathlib import Path

import lance
import numpy as np
import pyarrow as pa
import pytest
from conftest import manifest_for

from operators.chunk import Chunker
from operators.index import build_indices
from operators.search import VectorSearcher
from operators.write import commit, write_fragments
from schemas.records import table_schema
from schemas.spec import IndexSpec


@pytest.fixture(scope="module")
def vectors_table(tmp_path_factory, model_info, embedder, stdlib_docs) -> pa.Table:
    docs = pa.table({"doc_id": [d["id"] for d in stdlib_docs[:80]],
                     "text": pa.array([d["text"] for d in stdlib_docs[:80]], pa.large_string())})
    chunker = Chunker(model_info.path, max_tokens=128, overlap=16, document_prefix="",
                      metadata=pa.schema([]), config_fingerprint="test")
    return embedder(chunker(docs))


def _write(path: Path, rows: pa.Table) -> lance.LanceDataset:
    schema = table_schema(pa.schema([]), dim=384)
    return commit(str(path), write_fragments(rows, str(path), schema=schema), mode="create",
                  schema=schema, job="t", shards=["s"])


def _searcher(ds: lance.LanceDataset, model_info) -> VectorSearcher:
    return VectorSearcher(ds, manifest_for(model_info))


def test_small_table_stays_exact(tmp_path: Path, vectors_table: pa.Table) -> None:
    ds = _write(tmp_path / "small.lance", vectors_table)
    report = build_indices(ds, IndexSpec(), metric="dot")
    assert report.vector.startswith("exact")
    indexed = sorted(i["fields"] for i in lance.dataset(str(tmp_path / "small.lance"))
                     .list_indices())
    # BTREE on id and doc_id (a reindex's lookups), BM25 on text, no vector index
    assert indexed == [["doc_id"], ["id"], ["text"]]


def test_exact_search_equals_numpy_brute_force(tmp_path: Path, vectors_table: pa.Table,
                                               model_info) -> None:
    searcher = _searcher(_write(tmp_path / "exact.lance", vectors_table), model_info)
    matrix = np.array(vectors_table.column("vector").to_pylist(), dtype=np.float32)
    ids = vectors_table.column("id").to_pylist()
    for q in matrix[::25]:
        hits = searcher.search(q, k=10, using="float", exact=True, columns=("id",))
        expected = [ids[i] for i in np.argsort(-(matrix @ q), kind="stable")[:10]]
        assert hits.column("id").to_pylist()[:5] == expected[:5]
        np.testing.assert_allclose(hits.column("score").to_numpy(),
                                   np.sort(matrix @ q)[::-1][:10], atol=1e-5)


def test_large_table_gets_an_ann_index_with_high_recall(tmp_path: Path, model_info,
                                                        vectors_table: pa.Table) -> None:
    path = tmp_path / "ann.lance"
    ds = _write(path, vectors_table)
    assert vectors_table.num_rows >= 200
    report = build_indices(ds, IndexSpec(ann_min_rows=100), metric="dot")
    assert report.vector.startswith("IVF_HNSW_SQ")
    ds = lance.dataset(str(path))
    searcher = _searcher(ds, model_info)
    kinds = {i["fields"][0]: i["type"] for i in ds.list_indices()}
    assert kinds["id"] == "BTree" and "vector" in kinds
    matrix = np.array(vectors_table.column("vector").to_pylist(), dtype=np.float32)
    ids = np.array(vectors_table.column("id").to_pylist())
    recalls = []
    for q in matrix[::7]:
        ann = set(searcher.search(q, k=10, using="float", columns=("id",))
                  .column("id").to_pylist())
        exact = set(ids[np.argsort(-(matrix @ q))[:10]])
        recalls.append(len(ann & exact) / 10)
    assert np.mean(recalls) >= 0.9
