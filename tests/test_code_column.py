"""A table's fitted first-stage code (`vectors.code`) through the whole job: fitted on a
sample when the table is made, its codebook stored beside the table under its digest,
every row encoded by the embed actors (a reindex's new rows too, with the stored
codebook), searched with the float query, and refused when the codebook is not the one
the manifest names. The tiny model (32 dims) keeps it fast; the codes' quality on real
vectors is `benchmarks/codecs.py`'s."""

from __future__ import annotations

import shutil
from pathlib import Path

import lance
import numpy as np
import pyarrow.compute as pc
import pytest
from conftest import write_jsonl

from jobs._embed_job import run_embed
from jobs.api import open_table
from operators.codebooks import codebook_uri, load_codebook
from operators.codecs import fit
from operators.quantize import column_matrix
from operators.search import CODE_REFINE
from schemas.errors import ManifestMismatchError, QueryError, TableError
from schemas.manifest import TableManifest
from schemas.records import CODE_COLUMN, VECTOR_COLUMN
from schemas.spec import parse_spec

CODE = {"name": "pca-b2", "bytes": 4}
"""16 of the tiny model's 32 dims after PCA, 2 bits each."""


def _spec(corpus: Path, table: Path, model: str, code: dict | None = CODE,
          kind: str = "embed", index: dict | None = None):
    vectors = {"codecs": ["float32"], **({"code": code} if code else {})}
    return parse_spec({
        "kind": kind, "table": str(table), "model": {"name": model}, "vectors": vectors,
        "source": {"uri": str(corpus), "id_field": "id", "records_per_shard": 10},
        "write": {"shards_per_commit": 2}, "compute": {"rows_per_batch": 32},
        **({"index": index} if index else {}),
    })


def _docs(stdlib_docs, n: int) -> list[dict]:
    return [{"id": d["id"], "text": d["text"]} for d in stdlib_docs[:n]]


@pytest.fixture(scope="module")
def built(tmp_path_factory, stdlib_docs, tiny_model, ray_local):
    root = tmp_path_factory.mktemp("code")
    corpus = write_jsonl(root / "c.jsonl", _docs(stdlib_docs, 40))
    table = root / "t.lance"
    summary = run_embed(_spec(corpus, table, tiny_model))
    return root, corpus, table, summary


def _copy(table: Path, to: Path) -> Path:
    """A copy of the table with its codebooks folder."""
    shutil.copytree(table, to)
    shutil.copytree(Path(codebook_uri(str(table), "x")).parent,
                    Path(codebook_uri(str(to), "x")).parent)
    return to


def _codes_and_vectors(table: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    rows = lance.dataset(str(table)).to_table(columns=["id", VECTOR_COLUMN, CODE_COLUMN])
    return (column_matrix(rows.column(CODE_COLUMN)), column_matrix(rows.column(VECTOR_COLUMN)),
            rows.column("id").to_pylist())


def test_the_code_is_fitted_once_stored_beside_the_table_and_encodes_every_row(built) -> None:
    _, _, table, summary = built
    code = TableManifest.from_schema(lance.dataset(str(table)).schema).vectors.code
    assert (code.name, code.nbytes) == ("pca-b2", 4) and code.sample_rows > 16
    assert Path(codebook_uri(str(table), code.sha256)).is_file()
    codec = load_codebook(str(table), code.sha256)
    codes, vectors, _ = _codes_and_vectors(table)
    assert codes.shape == (summary.chunks, 4) and codes.dtype == np.uint8
    # the actors' codes are the stored codebook's encoding of the stored float vectors
    assert np.array_equal(codes, codec.encode(vectors))
    assert len(np.unique(codes, axis=0)) > 1


def test_a_code_first_stage_ranks_as_the_codebook_scores(built) -> None:
    _, _, table, _ = built
    t = open_table(table)
    code = t.manifest.vectors.code
    codec = load_codebook(str(table), code.sha256)
    codes, vectors, ids = _codes_and_vectors(table)
    assert "code" in t.searcher.modes() and t.searcher.default_mode() == "code"
    row_ids = lance.dataset(str(table)).to_table(columns=["id"], with_row_id=True)
    by_row = dict(zip(row_ids.column("_rowid").to_pylist(), range(len(ids)), strict=True))
    picks = range(0, len(ids), max(1, len(ids) // 12))
    found = 0
    for i in picks:
        q = vectors[i]
        # the first stage alone (no rescoring): numpy's scores of the stored codes
        row_ids, scores = t.searcher.candidates(q, k=20, using="code", rescore=1)
        reference = codec.scores(q, codes)
        assert np.allclose(np.sort(scores)[::-1], np.sort(reference)[::-1][:20], atol=1e-4)
        # rescored: the best of those 20 candidates by the float vectors
        rows = [by_row[r] for r in row_ids.tolist()]
        best = ids[rows[int(np.argmax(vectors[rows] @ q))]]
        hits = t.searcher.search(q, k=1, using="code", rescore=20, columns=["id"])
        assert hits.column("id")[0].as_py() == best
        # the same depth as a count of candidates
        assert t.search_vector(q, k=1, using="code", depth=20)[0].id == best
        found += best == ids[i]
    # The row itself is among its code's 20 nearest far more often than chance (9-11
    # of 13 in runs here; chance is 20 of 116 rows). The tiny model's random vectors
    # crowd together, 4 bytes keep 16 of its 32 dims, and bf16 forwards vary with the
    # batch, so this is a floor, not a quality measure (`benchmarks/codecs.py` is).
    assert found >= 2 * len(picks) * 20 / len(ids)


def test_a_codebook_that_is_not_the_tables_is_refused(built, tmp_path) -> None:
    root, _, table, _ = built
    copy = tmp_path / "t.lance"
    shutil.copytree(table, copy)
    code = TableManifest.from_schema(lance.dataset(str(copy)).schema).vectors.code
    other = fit(np.random.default_rng(1).standard_normal((200, 32)).astype(np.float32),
                "pca-b2", 4)
    path = Path(codebook_uri(str(copy), code.sha256))
    path.parent.mkdir(parents=True)
    path.write_bytes(other.to_bytes())  # another fit's bytes under this table's name
    with pytest.raises(ManifestMismatchError, match="does not match the table's"):
        open_table(copy).search("open a file", k=3, using="code")
    path.unlink()
    with pytest.raises(ManifestMismatchError, match="cannot be read"):
        open_table(copy).search("open a file", k=3, using="code")


def test_a_reindex_encodes_its_new_rows_with_the_stored_codebook(built, tmp_path,
                                                                 stdlib_docs,
                                                                 tiny_model) -> None:
    _, _, table, _ = built
    here = _copy(table, tmp_path / "t.lance")
    before = TableManifest.from_schema(lance.dataset(str(here)).schema).vectors.code
    docs = _docs(stdlib_docs, 46)
    docs[3] = {**docs[3], "text": docs[3]["text"] + " and one more sentence"}
    changed = write_jsonl(tmp_path / "c.jsonl", docs)
    summary = run_embed(_spec(changed, here, tiny_model, code=None, kind="reindex"))
    assert summary.tokens > 0  # six new documents and one changed were embedded
    after = TableManifest.from_schema(lance.dataset(str(here)).schema).vectors.code
    assert after == before  # the same codebook: not fitted again
    codes, vectors, ids = _codes_and_vectors(here)
    assert {d["id"] for d in docs} == {i.rsplit("#", 1)[0] for i in ids}
    assert np.array_equal(codes, load_codebook(str(here), before.sha256).encode(vectors))


def test_another_code_for_an_existing_table_is_refused(built, tiny_model) -> None:
    _, corpus, table, _ = built
    version = lance.dataset(str(table)).version
    with pytest.raises(TableError, match="pca-b2 at 4 bytes.*opq-pq at 8"):
        run_embed(_spec(corpus, table, tiny_model, {"name": "opq-pq", "bytes": 8}))
    assert lance.dataset(str(table)).version == version  # nothing written


def test_the_quality_report_measures_the_code_at_each_depth(built, tmp_path,
                                                            stdlib_docs) -> None:
    """With a depth past the table's rows, every row is re-scored by the float vectors,
    so the code's way must score exactly as float exact search does."""
    from jobs import api

    _, _, table, summary = built
    beir = tmp_path / "beir"
    (beir / "qrels").mkdir(parents=True)
    docs = _docs(stdlib_docs, 40)[:12]
    write_jsonl(beir / "queries.jsonl",
                [{"_id": f"q{i}", "text": d["text"][:200]} for i, d in enumerate(docs)])
    (beir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(
        f"q{i}\t{d['id']}\t1\n" for i, d in enumerate(docs)))
    report = api.quality(table, beir, chunks_per_query=50)
    ways = {w["way"]: w for w in report["ways"]}
    assert {"code pca-b2 alone", "code pca-b2 + rescore@40", "code pca-b2 + rescore@100",
            "code pca-b2 + rescore@200"} <= set(ways)
    assert all(ways[f"code pca-b2 + rescore@{d}"]["bytes_per_vector"] == 4
               for d in (40, 100, 200))
    assert summary.chunks < 200
    assert ways["code pca-b2 + rescore@200"]["ndcg_at_10"] == ways["float32 exact"]["ndcg_at_10"]


def test_refit_adds_a_code_from_the_stored_vectors_in_one_commit(tmp_path, stdlib_docs,
                                                                 tiny_model,
                                                                 ray_local) -> None:
    """`quiver table refit` on a table made without a code: fitted on the stored vectors,
    encoded by Ray tasks, committed as one Lance Merge; nothing embedded again, the
    embedding fingerprint unchanged, so the job that made the table still sees it as
    its own, and readers' `current` moves to the new version."""
    from jobs import api

    corpus = write_jsonl(tmp_path / "c.jsonl", _docs(stdlib_docs, 30))
    table = tmp_path / "plain.lance"
    run_embed(_spec(corpus, table, tiny_model, code=None))
    before = lance.dataset(str(table))
    old = TableManifest.from_schema(before.schema)
    rows = before.to_table(columns=["id", VECTOR_COLUMN]).sort_by("id")
    out = api.refit(str(table), name="pca-b2", nbytes=4, sample=256)
    after = lance.dataset(str(table))
    assert after.version == before.version + 1 and out["current_moved"]
    assert isinstance(after.read_transaction(after.version).operation,
                      lance.LanceOperation.Merge)
    new = TableManifest.from_schema(after.schema)
    assert new.embedding_fingerprint() == old.embedding_fingerprint()
    assert new.vectors.code.sha256 == out["code"]["sha256"] and new.vectors.code.nbytes == 4
    codes, vectors, ids = _codes_and_vectors(table)
    assert np.array_equal(codes, load_codebook(str(table), new.vectors.code.sha256)
                          .encode(vectors))
    now = after.to_table(columns=["id", VECTOR_COLUMN]).sort_by("id")
    assert now.equals(rows)  # the float vectors were not embedded again
    again = run_embed(_spec(corpus, table, tiny_model, code=None))
    assert again.tokens == 0 and again.commits == 0
    assert open_table(table).search("open a file", k=3, using="code")
    with pytest.raises(TableError, match="already has the first-stage code pca-b2"):
        api.refit(str(table), name="pca-b1", nbytes=2)


def test_the_codes_are_held_once_per_fragment_and_shared_by_versions(
        built, tmp_path, stdlib_docs, tiny_model) -> None:
    """Two versions of a table, before and after a reindex that adds documents, open in
    one process: the second loads only the fragments the first does not hold, and its
    code search equals a streamed one."""
    from operators.fragment_codes import FragmentCodes
    from operators.search import VectorSearcher

    _, _, table, _ = built
    here = _copy(table, tmp_path / "t.lance")
    first = lance.dataset(str(here))
    run_embed(_spec(write_jsonl(tmp_path / "c.jsonl", _docs(stdlib_docs, 52)), here,
                    tiny_model, code=None, kind="reindex"))
    second = lance.dataset(str(here))
    shared = FragmentCodes()

    def searcher(ds, cache=shared):
        manifest = TableManifest.from_schema(ds.schema)
        return VectorSearcher(ds, manifest, shared=cache, code=lambda: load_codebook(
            str(here), manifest.vectors.code.sha256))

    def fragments(ds) -> set[int]:
        return {f.fragment_id for f in ds.get_fragments()}

    q = _codes_and_vectors(here)[1][0]
    searcher(first).candidates(q, k=5, using="code")
    assert shared.loads == len(fragments(first))
    held = shared.held_bytes
    ids, scores = searcher(second).candidates(q, k=5, using="code")
    assert fragments(first) & fragments(second)  # the reindex kept some fragments whole
    assert shared.loads == len(fragments(first) | fragments(second))
    assert shared.held_bytes > held
    streamed = searcher(second, FragmentCodes(max_bytes=0)).candidates(q, k=5, using="code")
    assert np.array_equal(ids, streamed[0]) and np.allclose(scores, streamed[1])


def test_the_sample_embeds_the_same_in_a_task_as_on_the_driver(tiny_model, ray_local) -> None:
    """A job on GPUs embeds its calibration sample in a Ray task (a cluster's driver has
    no GPU); that path, run here on CPU, gives the driver's vectors."""
    from jobs._calibrate import embed_sample
    from operators.model import describe_model
    from schemas.spec import ModelSpec

    info = describe_model(ModelSpec(name=tiny_model))
    ids = [[101, 2023 + i, 2003, 1037, 3231, 102] for i in range(40)]
    kwargs = dict(precision="fp32", dims=info.dim, renormalize=False, batch_tokens=512)
    here = embed_sample(info, ids, on_gpu=False, **kwargs)
    there = embed_sample(info, ids, on_gpu=False, in_task=True, **kwargs)
    assert here.shape == (40, info.dim) and np.allclose(here, there, atol=1e-5)
    assert len(np.unique(np.round(here, 4), axis=0)) == 40


def test_a_lance_indexed_code_is_stored_indexed_searched_and_kept_up(
        tmp_path, stdlib_docs, tiny_model, ray_local) -> None:
    """`pca-rq` through the job: the actors store the PCA projection (float16, 8 dims per
    byte), the job builds Lance's IVF_RQ on it, a code search through the index with
    every row as a candidate ranks exactly as float search, and a reindex encodes its
    new rows with the stored projection and adds them to the index as a delta."""
    from operators.index import index_segments

    index = {"ann_min_rows": 50, "fts": False}
    table = tmp_path / "rq.lance"
    code = {"name": "pca-rq", "bytes": 2}  # 16 of the tiny model's 32 dims
    summary = run_embed(_spec(write_jsonl(tmp_path / "c.jsonl", _docs(stdlib_docs, 40)),
                              table, tiny_model, code, index=index))
    assert "IVF_RQ on vector_code" in summary.index and "pca-rq" in summary.index
    ds = lance.dataset(str(table))
    assert str(ds.schema.field(CODE_COLUMN).type) == "fixed_size_list<item: halffloat>[16]"
    assert {i["type"] for i in ds.list_indices() if i["fields"] == [CODE_COLUMN]} == {"IVF_RQ"}
    sha = TableManifest.from_schema(ds.schema).vectors.code.sha256
    codes, vectors, ids = _codes_and_vectors(table)
    assert codes.dtype == np.float16
    np.testing.assert_allclose(codes, load_codebook(str(table), sha).encode(vectors),
                               rtol=2e-3, atol=2e-3)
    t = open_table(table)
    assert t.searcher.default_mode() == "code"
    for q in vectors[::17]:
        row_ids, scores = t.searcher.candidates(q, k=5, using="code", depth=len(ids),
                                                nprobes=1000)
        exact, exact_scores = t.searcher.candidates(q, k=5, using="float", exact=True)
        assert np.array_equal(row_ids, exact) and np.allclose(scores, exact_scores, atol=1e-5)
    # a filter applies before the index's candidates are refined and rescored
    keep = sorted({i.rsplit("#", 1)[0] for i in ids})[::3]
    where = pc.field("doc_id").isin(keep)
    for q in vectors[::17]:
        row_ids, _ = t.searcher.candidates(q, k=5, using="code", depth=len(ids),
                                           nprobes=1000, where=where)
        exact, _ = t.searcher.candidates(q, k=5, using="float", exact=True, where=where)
        assert np.array_equal(row_ids, exact)
        hits = t.searcher.search(q, k=5, using="code", where=where, columns=("doc_id",))
        assert hits.num_rows == 5 and set(hits.column("doc_id").to_pylist()) <= set(keep)
    # a query's `refine` reaches Lance's code search through the Python API
    asked: list[dict] = []
    nearest = t.searcher._nearest
    t.searcher._nearest = lambda query, *args: asked.append(query) or nearest(query, *args)
    assert len(t.search("open a file", k=3, using="code", refine=16)) == 3
    assert len(t.search_vector(vectors[0], k=3, using="code", refine=16)) == 3
    assert len(t.search("open a file", k=3, using="code")) == 3
    assert [a["refine_factor"] for a in asked if a["use_index"]] == [16, 16, CODE_REFINE]
    with pytest.raises(QueryError, match="refine=0"):
        t.search("open a file", using="code", refine=0)
    t.searcher._nearest = nearest

    docs = _docs(stdlib_docs, 46)
    reindexed = run_embed(_spec(write_jsonl(tmp_path / "c2.jsonl", docs), table, tiny_model,
                                code=None, kind="reindex", index=index))
    assert "incremental" in reindexed.index
    ds = lance.dataset(str(table))
    assert TableManifest.from_schema(ds.schema).vectors.code.sha256 == sha
    codes, vectors, ids = _codes_and_vectors(table)
    assert {d["id"] for d in docs} == {i.rsplit("#", 1)[0] for i in ids}
    np.testing.assert_allclose(codes, load_codebook(str(table), sha).encode(vectors),
                               rtol=2e-3, atol=2e-3)
    code_index = [s for s in index_segments(ds) if s.name == f"{CODE_COLUMN}_idx"]
    assert code_index and code_index[0].unindexed_rows == 0 and code_index[0].deltas == 1


def test_refit_to_a_lance_indexed_code_builds_its_index(tmp_path, stdlib_docs, tiny_model,
                                                        ray_local) -> None:
    """`quiver table refit --code pca-rq@2` on a table past `ann_min_rows`: the projection
    is merged in one commit and indexed in a second, and readers' `current` follows to
    the indexed version."""
    from jobs import api
    from jobs._tags import current_version
    from schemas.spec import IndexSpec

    corpus = write_jsonl(tmp_path / "c.jsonl", _docs(stdlib_docs, 30))
    table = tmp_path / "plain.lance"
    run_embed(_spec(corpus, table, tiny_model, code=None, index={"ann_min_rows": 50}))
    before = lance.dataset(str(table)).version
    out = api.refit(str(table), name="pca-rq", nbytes=2, sample=256,
                    index_spec=IndexSpec(ann_min_rows=50))
    ds = lance.dataset(str(table))
    assert out["version"] == ds.version == before + 2 and current_version(ds) == ds.version
    assert "IVF_RQ on vector_code" in out["index"]
    assert {i["type"] for i in ds.list_indices() if i["fields"] == [CODE_COLUMN]} == {"IVF_RQ"}
    codes, vectors, _ = _codes_and_vectors(table)
    np.testing.assert_allclose(codes, load_codebook(str(table), out["code"]["sha256"])
                               .encode(vectors), rtol=2e-3, atol=2e-3)
    assert open_table(table).search("open a file", k=3, using="code")
    # replaced by a scanned code, its index goes with its field
    api.refit(str(table), name="pca-b1", nbytes=2, sample=256, replace=True,
              index_spec=IndexSpec(ann_min_rows=50))
    ds = lance.dataset(str(table))
    assert not [i for i in ds.list_indices() if i["fields"] == [CODE_COLUMN]]
    assert {i["fields"][0] for i in ds.list_indices()} >= {VECTOR_COLUMN, "id"}
    assert open_table(table).search("open a file", k=3, using="code")


def test_refit_replaces_a_code_in_one_commit_and_reports_the_overlap(
        built, tmp_path, stdlib_docs, tiny_model) -> None:
    """`quiver table refit --replace`: one Merge names the new code `vector_code` and
    leaves the old one out, nothing is embedded again, and the result compares the two
    codes on the table's rows. The table then takes a second replacement (its field ids
    now have a gap) and a reindex that encodes new rows with the newest codebook."""
    from jobs import api

    _, corpus, table, _ = built
    here = _copy(table, tmp_path / "t.lance")
    before = lance.dataset(str(here))
    old = TableManifest.from_schema(before.schema)
    floats = before.to_table(columns=["id", VECTOR_COLUMN]).sort_by("id")
    with pytest.raises(TableError, match="--replace"):
        api.refit(str(here), name="pca-b1", nbytes=2)
    assert lance.dataset(str(here)).version == before.version
    out = api.refit(str(here), name="pca-b1", nbytes=2, sample=256, replace=True)

    after = lance.dataset(str(here))
    assert after.version == before.version + 1 == out["version"] and out["current_moved"]
    assert isinstance(after.read_transaction(after.version).operation,
                      lance.LanceOperation.Merge)
    assert after.schema.names == before.schema.names  # the code in its place, no other
    assert after.lance_schema.field(CODE_COLUMN).id() > before.lance_schema.field(
        CODE_COLUMN).id()
    assert str(after.schema.field(CODE_COLUMN).type) == "fixed_size_list<item: uint8>[2]"
    new = TableManifest.from_schema(after.schema)
    assert new.vectors.code.sha256 == out["code"]["sha256"] != old.vectors.code.sha256
    assert new.embedding_fingerprint() == old.embedding_fingerprint()
    assert out["replaced"]["sha256"] == old.vectors.code.sha256
    codes, vectors, _ = _codes_and_vectors(here)
    assert np.array_equal(codes, load_codebook(str(here), new.vectors.code.sha256)
                          .encode(vectors))
    assert after.to_table(columns=["id", VECTOR_COLUMN]).sort_by("id").equals(floats)
    overlap = out["overlap"]
    assert (overlap["old"]["code"], overlap["new"]["code"]) == ("pca-b2@4", "pca-b1@2")
    assert overlap["queries"] == min(200, after.count_rows())
    assert all(0 <= v <= 1 for v in (overlap["old"]["recall"], overlap["new"]["recall"],
                                     overlap["shared"]))
    # the version before still reads its own code: old versions keep their files
    assert np.array_equal(column_matrix(lance.dataset(str(here), version=before.version)
                                        .to_table(columns=[CODE_COLUMN]).column(CODE_COLUMN)),
                          column_matrix(before.to_table(columns=[CODE_COLUMN])
                                        .column(CODE_COLUMN)))
    assert open_table(here).search("open a file", k=3, using="code")
    assert run_embed(_spec(corpus, here, tiny_model, code=None)).tokens == 0

    again = api.refit(str(here), name="pca-b2", nbytes=4, sample=256, replace=True)
    assert again["replaced"]["name"] == "pca-b1"
    docs = _docs(stdlib_docs, 46)
    summary = run_embed(_spec(write_jsonl(tmp_path / "more.jsonl", docs), here, tiny_model,
                              code=None, kind="reindex"))
    assert summary.tokens > 0
    codes, vectors, ids = _codes_and_vectors(here)
    assert {d["id"] for d in docs} == {i.rsplit("#", 1)[0] for i in ids}
    assert np.array_equal(codes, load_codebook(str(here), again["code"]["sha256"])
                          .encode(vectors))
