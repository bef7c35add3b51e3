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
from operators.index import ann_params, build_indices, code_partitions
from operators.search import (
    CODE_REFINE,
    INDEX_REFINE,
    MAX_REFINE,
    VectorSearcher,
    code_nprobes,
)
from operators.write import commit, write_fragments
from schemas.errors import QueryError
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


@pytest.mark.parametrize(("spec", "described"), [
    (IndexSpec(ann_min_rows=100, ann_type="IVF_RQ"), "48 B per row"),
    (IndexSpec(ann_min_rows=100, ann_type="IVF_PQ", num_sub_vectors=24, num_bits=4),
     "12 B per row"),
])
def test_a_compact_index_has_its_candidates_rescored_from_the_float_column(
        tmp_path: Path, model_info, vectors_table: pa.Table, spec: IndexSpec,
        described: str) -> None:
    """IVF_RQ and IVF_PQ score rows by a code of a few bytes; a float search through them
    refines by default, so the scores returned are the float vectors' own (and recall
    stays high), where the index alone returns its estimates."""
    path = tmp_path / "compact.lance"
    report = build_indices(_write(path, vectors_table), spec, metric="dot")
    assert report.vector.startswith(spec.ann_type) and described in report.vector
    ds = lance.dataset(str(path))
    assert {i["type"] for i in ds.list_indices() if i["fields"] == ["vector"]} \
        == {spec.ann_type}
    searcher = _searcher(ds, model_info)
    assert searcher.refine_factor == INDEX_REFINE
    matrix = np.array(vectors_table.column("vector").to_pylist(), dtype=np.float32)
    ids = vectors_table.column("id").to_pylist()
    row_of = {v: i for i, v in enumerate(ids)}
    recalls, estimate_errors = [], []
    for q in matrix[::7]:
        hits = searcher.search(q, k=10, using="float", columns=("id",))
        rows = [row_of[v] for v in hits.column("id").to_pylist()]
        np.testing.assert_allclose(hits.column("score").to_numpy(), matrix[rows] @ q,
                                   atol=1e-5)
        exact = set(np.argsort(-(matrix @ q))[:10])
        recalls.append(len(exact & set(rows)) / 10)
    assert np.mean(recalls) >= 0.9
    searcher.refine_factor = None  # the index's own estimates, unrefined
    for q in matrix[::7]:
        hits = searcher.search(q, k=10, using="float", columns=("id",))
        rows = [row_of[v] for v in hits.column("id").to_pylist()]
        estimate_errors.append(np.abs(hits.column("score").to_numpy() - matrix[rows] @ q).max())
    assert max(estimate_errors) > 1e-3


def test_compact_index_settings_are_checked_before_anything_is_built() -> None:
    with pytest.raises(ValueError, match="num_sub_vectors applies to IVF_PQ"):
        IndexSpec(ann_type="IVF_HNSW_SQ", num_sub_vectors=24)
    with pytest.raises(ValueError, match="must be 4 or 8"):
        IndexSpec(ann_type="IVF_PQ", num_bits=2)
    with pytest.raises(ValueError, match="applies to IVF_PQ and IVF_RQ"):
        IndexSpec(ann_type="IVF_FLAT", num_bits=1)
    with pytest.raises(ValueError, match="num_sub_vectors=25 does not divide the vector's 384"):
        ann_params("IVF_PQ", rows=1000, dims=384, num_partitions=None, num_sub_vectors=25)
    with pytest.raises(ValueError, match="divisible by 8"):
        ann_params("IVF_RQ", rows=1000, dims=100, num_partitions=None)
    assert ann_params("IVF_RQ", rows=1_000_000, dims=384, num_partitions=None) \
        == {"num_partitions": 1000, "num_bits": 1}


def test_a_job_refuses_sub_vectors_that_do_not_divide_its_dims_before_it_embeds(
        model_info) -> None:
    """The index is built after the whole corpus is embedded; its settings are checked
    when the job starts, against the dims the model gives."""
    from jobs._embed_job import build_manifest
    from schemas.errors import SpecError
    from schemas.spec import parse_spec

    spec = parse_spec({"kind": "embed", "table": "t.lance",
                       "source": {"uri": "c.jsonl", "id_field": "id"},
                       "index": {"ann_type": "IVF_PQ", "num_sub_vectors": 25}})
    with pytest.raises(SpecError, match="index: index.num_sub_vectors=25 does not divide"):
        build_manifest(spec, model_info, precision="fp32")
    spec = spec.model_copy(update={"vectors": spec.vectors.model_copy(update={"dims": 100})})
    spec = parse_spec({**spec.model_dump(mode="json"), "index": {"ann_type": "IVF_RQ"}})
    with pytest.raises(SpecError, match="IVF_RQ needs dims divisible by 8, got 100"):
        build_manifest(spec, model_info, precision="fp32")


def test_a_pca_rq_code_is_searched_through_lances_ivf_rq_and_rescored(
        tmp_path: Path, model_info, stdlib_vectors: np.ndarray) -> None:
    """`pca-rq` at 24 B on real MiniLM vectors: the table stores the 192-d PCA projection
    (float16), IVF_RQ is built on it, and a code search returns the index's candidates
    rescored by the float vectors: their scores are the float dot products, most of the
    float top 10 is found among 100 candidates, and with `exact` the first stage alone
    scores as numpy does on the stored projection; through the index Lance probes
    `code_nprobes` of its partitions and refines `CODE_REFINE` times the rows it keeps by
    the stored projection, so their scores are the projection's exact ones too."""
    from operators.codecs import fit
    from schemas.manifest import CodeManifest

    matrix = np.ascontiguousarray(stdlib_vectors, np.float32)
    codec = fit(matrix, "pca-rq", 24)
    projected = codec.encode(matrix)
    assert projected.shape == (len(matrix), 192) and projected.dtype == np.float16
    schema = table_schema(pa.schema([]), dim=384, code=("pca-rq", 24))
    rows = pa.table({
        "id": [f"r{i}" for i in range(len(matrix))],
        "doc_id": [f"d{i // 3}" for i in range(len(matrix))],
        "vector": pa.FixedSizeListArray.from_arrays(pa.array(matrix.ravel()), 384),
        "vector_code": pa.FixedSizeListArray.from_arrays(pa.array(projected.ravel()), 192)})
    ds = lance.write_dataset(rows, str(tmp_path / "rq.lance"))
    code = CodeManifest(name="pca-rq", nbytes=24, sha256="x", sample_rows=len(matrix))
    assert schema.field("vector_code").type == rows.schema.field("vector_code").type
    report = build_indices(ds, IndexSpec(ann_min_rows=100, fts=False), metric="dot",
                           code=code)
    assert "IVF_RQ on vector_code" in report.vector and "24 B per row" in report.vector
    ds = lance.dataset(str(tmp_path / "rq.lance"))
    assert {i["type"] for i in ds.list_indices() if i["fields"] == ["vector_code"]} \
        == {"IVF_RQ"}
    manifest = manifest_for(model_info)
    manifest = manifest.model_copy(update={"vectors": manifest.vectors.model_copy(
        update={"code": code})})
    searcher = VectorSearcher(ds, manifest, code=lambda: codec)
    assert searcher.default_mode() == "code"
    ids = rows.column("id").to_pylist()
    row_of = {v: i for i, v in enumerate(ids)}
    asked: list[dict] = []
    nearest = searcher._nearest
    searcher._nearest = lambda query, *args: asked.append(query) or nearest(query, *args)
    recalls = []
    for q in matrix[::9]:
        hits = searcher.search(q, k=10, using="code", depth=100, columns=("id",))
        found = [row_of[v] for v in hits.column("id").to_pylist()]
        np.testing.assert_allclose(hits.column("score").to_numpy(), matrix[found] @ q,
                                   atol=1e-5)
        recalls.append(len(set(np.argsort(-(matrix @ q))[:10]) & set(found)) / 10)
        reference = codec.scores(q, projected)
        _, exact_scores = searcher.candidates(q, k=20, using="code", rescore=1, exact=True)
        np.testing.assert_allclose(np.sort(exact_scores)[::-1],
                                   np.sort(reference)[::-1][:20], rtol=1e-3, atol=1e-3)
        row_ids, refined = searcher.candidates(q, k=20, using="code", rescore=1)
        stored = ds._take_rows(row_ids.tolist(), columns=["vector_code"])
        truth = codec.scores(q, np.array(stored.column("vector_code").to_pylist()))
        np.testing.assert_allclose(refined, truth, rtol=1e-3, atol=1e-3)
    assert np.mean(recalls) >= 0.9, np.mean(recalls)
    partitions = ds.stats.index_stats("vector_code_idx")["indices"][0]["num_partitions"]
    assert partitions == code_partitions(len(matrix))
    through_index = [a for a in asked if a["use_index"]]
    assert through_index and all(
        a["nprobes"] == code_nprobes(partitions) and a["refine_factor"] == CODE_REFINE
        for a in through_index)
    assert all("refine_factor" not in a for a in asked if not a["use_index"])
    # a query's refine replaces CODE_REFINE; refine * depth >= rows with every partition
    # probed makes every row a candidate, so the index's pick is the exact projection's
    asked.clear()
    every = -(-len(matrix) // 20)
    assert every <= MAX_REFINE, len(matrix)
    for q in matrix[::37]:
        ids_all, scores_all = searcher.candidates(q, k=20, using="code", rescore=1,
                                                  nprobes=partitions, refine_factor=every)
        ids_exact, scores_exact = searcher.candidates(q, k=20, using="code", rescore=1,
                                                      exact=True)
        np.testing.assert_allclose(scores_all, scores_exact, rtol=1e-3, atol=1e-3)
        assert len(set(ids_all) & set(ids_exact)) >= 19  # float16 ties may swap the last
    assert asked and all(a["refine_factor"] == every for a in asked if a["use_index"])
    for bad in (0, MAX_REFINE + 1):
        with pytest.raises(QueryError, match=f"refine={bad}"):
            searcher.candidates(matrix[0], k=10, using="code", refine_factor=bad)
