"""Indices follow table size: exact search below `ann_min_rows`, an ANN index above it,
and a BTREE index on `id` always. ANN results are checked against exact search."""

from __future__ import annotations

from pathlib import Path

import lance
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
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


def test_reindex_upkeep_adds_deltas_never_rewrites_the_base(tmp_path: Path, model_info,
                                                             vectors_table: pa.Table) -> None:
    """Small reindexes each add one delta segment per index; the built segments stay as
    they were; after MAX_INDEX_DELTAS deltas the next upkeep merges them; a change past
    retrain_share rebuilds; every row stays findable by ANN, BM25 and id."""
    from operators.index import MAX_INDEX_DELTAS, index_segments, maintain_indices

    path, schema = tmp_path / "upkeep.lance", table_schema(pa.schema([]), dim=384)
    cut = vectors_table.num_rows - 6 * (MAX_INDEX_DELTAS + 1)
    ds = _write(path, vectors_table.slice(0, cut))
    spec = IndexSpec(ann_min_rows=100, retrain_share=0.5)
    build_indices(ds, spec, metric="dot")
    base = {d.name: {s.uuid for s in d.segments} for d in lance.dataset(str(path))
            .describe_indices()}
    for n in range(MAX_INDEX_DELTAS + 1):
        batch = vectors_table.slice(cut + 6 * n, 6)
        old = lance.dataset(str(path))
        ds = commit(str(path), write_fragments(batch, str(path), schema=schema),
                    mode="append", schema=schema, job="t", shards=[f"s{n}"],
                    read_version=old.version)
        report = maintain_indices(ds, spec, metric="dot", codecs=["float32"], dims=384,
                                  changed=6)
        assert report.vector.startswith("incremental"), report
        ds = lance.dataset(str(path))
        segs = {s.name: s for s in index_segments(ds)}
        assert set(segs) == set(base)
        for name, seg in segs.items():
            # the base is untouched; deltas grow by one, and merge into one past the cap
            assert base[name] <= {s.uuid for d in ds.describe_indices() if d.name == name
                                  for s in d.segments}
            assert seg.deltas == (n + 1 if n < MAX_INDEX_DELTAS else 1)
            assert seg.unindexed_rows == 0 and seg.delta_rows == 6 * (n + 1)
        # the newest rows are found through the indices: ANN, BM25 and the id BTREE
        searcher = _searcher(ds, model_info)
        row = batch.slice(0, 1).to_pylist()[0]
        near = searcher.search(np.asarray(row["vector"], np.float32), k=3, using="float",
                               columns=("id",))
        assert row["id"] in near.column("id").to_pylist()
        assert ds.to_table(filter=pc.field("id") == row["id"]).num_rows == 1
        words = " ".join(row["text"].split()[:6])
        found = ds.to_table(full_text_query=words, columns=["id"], limit=50)
        assert row["id"] in found.column("id").to_pylist()
    # a change past retrain_share retrains: one build, no deltas
    report = maintain_indices(ds, spec, metric="dot", codecs=["float32"], dims=384,
                              changed=ds.count_rows())
    assert "rebuilt" in report.vector
    assert all(s.deltas == 0 for s in index_segments(lance.dataset(str(path))))
